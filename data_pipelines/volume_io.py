"""CT volume IO: reading NIfTI, DICOM series and `.npy` into HU, and writing shard volumes.

Intensities. Volumes are kept in Hounsfield units (HU) until the last preprocessing transform
(`vlp.data_pipelines.volume_transforms`). Reading a volume records, in a `HUInfo`, whether a
rescale slope/intercept was applied and why (see `to_hu`), so no volume is rescaled twice.

Loading is ours (NIfTI with nibabel, DICOM series with pydicom, `.npy` with numpy) rather than
MONAI's because the HU decision needs the raw stored values and the header. A `Volume` carries
its voxel-to-RAS affine; orienting to RAS is the transforms' job.
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from vlp.data_pipelines.errors import DataError


class VolumeError(DataError):
    """A volume that cannot be read or makes no sense (a `DataError`: exit code 2 at the CLI)."""


# ----------------------------------------------------------------------------------------------
# HU handling
# ----------------------------------------------------------------------------------------------


@dataclass
class HUInfo:
    """What was done to turn stored values into HU; written to each shard's `.json` as "hu"."""

    rescale_applied: bool
    slope: float = 1.0
    intercept: float = 0.0
    reason: str = ""
    stored_min: float = 0.0
    stored_max: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


# Any chest/abdomen CT in HU has air at about -1000 HU, so its minimum is far below this. Raw
# stored values (unsigned 12-bit, `HU = stored * slope + intercept` with intercept -1024) never
# are. Used only when a slope/intercept is known from outside the image (CT-RATE metadata CSV).
STORED_VALUE_MIN = -200.0


def to_hu(
    values: np.ndarray,
    slope: Optional[float],
    intercept: Optional[float],
    *,
    header_scaled: bool = False,
    name: str = "volume",
) -> tuple[np.ndarray, HUInfo]:
    """Apply `values * slope + intercept` only when `values` are still stored values.

    The rule (the CT-RATE double-rescale pitfall: its `*_fixed` volumes are already HU while the
    metadata CSV still lists RescaleSlope/RescaleIntercept):
      1. no slope/intercept known, or the identity (1, 0): nothing to apply;
      2. the file's own header already scaled the data (NIfTI `scl_slope`, applied by nibabel):
         never apply the external one on top;
      3. otherwise apply it iff the data look like stored values: min >= STORED_VALUE_MIN
         (an HU volume has air near -1000). After applying, a minimum below -3100 HU (no
         scanner produces that) means the data were HU already and raises `VolumeError`.

    values: array of any shape. Returns (float32 HU array, HUInfo).
    """
    values = np.asarray(values)
    vmin, vmax = float(values.min()), float(values.max())
    base = dict(stored_min=vmin, stored_max=vmax)
    slope = 1.0 if slope is None or not np.isfinite(slope) else float(slope)
    intercept = 0.0 if intercept is None or not np.isfinite(intercept) else float(intercept)
    if slope == 1.0 and intercept == 0.0:
        return values.astype(np.float32), HUInfo(False, reason="no rescale known (values taken as HU)", **base)
    if header_scaled:
        return values.astype(np.float32), HUInfo(
            False, slope, intercept, reason="header scl_slope/scl_inter already applied", **base
        )
    if vmin < STORED_VALUE_MIN:
        return values.astype(np.float32), HUInfo(
            False, slope, intercept, reason=f"min {vmin:.0f} < {STORED_VALUE_MIN:.0f}: already HU", **base
        )
    hu = values.astype(np.float32) * slope + intercept
    if float(hu.min()) < -3100:
        raise VolumeError(f"{name}: rescale {slope}*x+{intercept} gives min {hu.min():.0f} HU; not stored values")
    return hu, HUInfo(True, slope, intercept, reason=f"min {vmin:.0f} >= {STORED_VALUE_MIN:.0f}: stored values", **base)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


@dataclass
class Volume:
    """A volume in HU with its voxel-to-RAS affine. array: (X, Y, Z) float32."""

    array: np.ndarray
    affine: np.ndarray
    hu: HUInfo
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def _nifti_from_bytes(data: bytes, name: str):
    import nibabel as nib

    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    try:
        return nib.Nifti1Image.from_bytes(data)
    except Exception as error:  # nibabel raises several types for a bad header
        raise VolumeError(f"{name}: not a NIfTI-1 volume ({error.__class__.__name__}: {error})") from None


def _from_nifti(image, name: str, slope=None, intercept=None) -> Volume:
    # On load nibabel moves scl_slope/scl_inter from the header into the array proxy (the header
    # then reads NaN), so the proxy is where to look; np.asanyarray applies them.
    proxy = image.dataobj
    header_slope, header_inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
    header_scaled = not (header_slope == 1.0 and header_inter == 0.0)
    raw = np.asanyarray(proxy)
    if raw.ndim == 4 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise VolumeError(f"{name}: expected a 3-D volume, got shape {raw.shape}")
    array, hu = to_hu(raw, slope, intercept, header_scaled=header_scaled, name=name)
    return Volume(array, np.asarray(image.affine, dtype=np.float64), hu, source=name)


def read_dicom_series(folder: str | Path, slope=None, intercept=None) -> Volume:
    """A folder of single-slice DICOM files (one series), or one file -> Volume in HU, RAS affine.

    Slices are ordered by their position along the slice normal; each slice's own
    RescaleSlope/Intercept is applied (DICOM stores raw values by definition). DICOM patient
    coordinates are LPS; the affine is converted to RAS.
    """
    import pydicom

    folder = Path(folder)
    if folder.is_file():
        files = [folder]
    else:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    slices = []
    for path in files:
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # non-DICOM files beside a series (reports, labels) are skipped
            continue
        if "PixelData" in ds and "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            slices.append(ds)
    if not slices:
        raise VolumeError(f"{folder}: no DICOM slices with pixel data and patient position")
    series = {getattr(ds, "SeriesInstanceUID", "") for ds in slices}
    if len(series) > 1:
        raise VolumeError(f"{folder}: {len(series)} DICOM series in one folder; put each series in its own folder")
    orient = np.array(slices[0].ImageOrientationPatient, dtype=np.float64)
    row, col = orient[:3], orient[3:]
    normal = np.cross(row, col)
    slices.sort(key=lambda ds: float(np.dot(normal, np.array(ds.ImagePositionPatient, dtype=np.float64))))
    stack, infos = [], []
    for ds in slices:
        pixels = ds.pixel_array.astype(np.float32)  # (rows, cols)
        s = float(getattr(ds, "RescaleSlope", 1.0))
        b = float(getattr(ds, "RescaleIntercept", 0.0))
        stack.append(pixels * s + b)
        infos.append((s, b))
    data = np.stack(stack, axis=-1)  # (rows, cols, slices)
    data = np.transpose(data, (1, 0, 2))  # (cols=x along row direction, rows=y, z)
    dr, dc = (float(v) for v in slices[0].PixelSpacing)  # row spacing (between rows), column spacing
    positions = [np.array(ds.ImagePositionPatient, dtype=np.float64) for ds in slices]
    if len(slices) > 1:
        dz = float(np.dot(normal, positions[-1] - positions[0])) / (len(slices) - 1)
    else:
        dz = float(getattr(slices[0], "SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = row * dc
    lps[:3, 1] = col * dr
    lps[:3, 2] = normal * dz
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
    s, b = infos[0]
    hu = HUInfo(True, s, b, reason="DICOM RescaleSlope/Intercept of each slice", stored_min=0.0, stored_max=0.0)
    if slope is not None or intercept is not None:
        hu.reason += " (external slope/intercept ignored: DICOM carries its own)"
    return Volume(data.astype(np.float32), affine, hu, source=str(folder))


def read_volume(path: str | Path, slope: Optional[float] = None, intercept: Optional[float] = None) -> Volume:
    """NIfTI (`.nii`, `.nii.gz`), `.npy` (taken as HU, 1 mm unless a sibling `.json` says
    "spacing") or a DICOM series folder -> Volume in HU with its RAS affine.

    slope/intercept: an external rescale (e.g. CT-RATE's metadata CSV), applied by `to_hu`'s rule.
    """
    path = Path(path)
    name = str(path)
    if path.is_dir():
        return read_dicom_series(path, slope, intercept)
    if not path.is_file():
        raise VolumeError(f"{name}: no such volume file or DICOM folder")
    lower = path.name.lower()
    if lower.endswith((".nii", ".nii.gz")):
        return _from_nifti(_nifti_from_bytes(path.read_bytes(), name), name, slope, intercept)
    if lower.endswith(".npy"):
        array = np.load(path, allow_pickle=False)
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        return _from_array(array, meta, name, slope, intercept)
    if lower.endswith(".dcm"):  # one slice; a series is read from its folder
        return read_dicom_series(path, slope, intercept)
    raise VolumeError(f"{name}: unknown volume format (expected .nii, .nii.gz, .npy or a DICOM folder)")


def _from_array(array: np.ndarray, meta: dict, name: str, slope=None, intercept=None) -> Volume:
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise VolumeError(f"{name}: expected a 3-D array, got shape {array.shape}")
    if "affine" in meta:
        affine = np.asarray(meta["affine"], dtype=np.float64)
    else:
        affine = np.diag([*[float(s) for s in meta.get("spacing", (1.0, 1.0, 1.0))], 1.0])
    array, hu = to_hu(array, slope, intercept, name=name)
    return Volume(array, affine, hu, source=name)


def decode_sample_volume(sample: dict[str, Any]) -> Volume:
    """The volume of a raw webdataset sample (extension -> bytes): "npy" (HU, with "json"
    carrying "affine" or "spacing"), "nii.gz" or "nii". Shard volumes are HU already."""
    key = sample.get("__key__", "?")
    meta = sample.get("json", {})
    if isinstance(meta, (bytes, str)):
        meta = json.loads(meta)
    for ext in ("npy", "nii.gz", "nii"):
        if ext in sample:
            data = sample[ext]
            break
    else:
        raise VolumeError(f"sample {key}: no volume member (.npy, .nii.gz or .nii); has {sorted(sample)}")
    if ext == "npy":
        array = data if isinstance(data, np.ndarray) else np.load(io.BytesIO(data), allow_pickle=False)
        return _from_array(array, meta, f"sample {key}")
    return _from_nifti(_nifti_from_bytes(data, f"sample {key}"), f"sample {key}")


def volume_to_npy(array: np.ndarray) -> bytes:
    """HU array -> `.npy` bytes as int16 (exact for integer HU, half of float32; CT HU fits in
    [-32768, 32767] and sub-HU precision carries no signal)."""
    buffer = io.BytesIO()
    np.save(buffer, np.clip(np.rint(array), -32768, 32767).astype(np.int16), allow_pickle=False)
    return buffer.getvalue()
