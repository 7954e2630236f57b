"""CT volumes and their reports: reading, HU handling, MONAI preprocessing, report sentences.

Axis order. Every volume tensor in `vlp` is MONAI's `(C, H, W, D)` with C = 1: the three spatial
axes are the RAS+ world axes after `Orientationd("RAS")`, so index 0 grows toward the patient's
Right, index 1 toward Anterior, index 2 toward Superior (D is the axial slice axis, last).
Batches are `(B, 1, H, W, D)`. The MONAI ViT in `models/towers/volume.py` takes the same order
(`img_size=(H, W, D)`, `patch_size=(16, 16, 8)`), so a checkpoint's encoder drops into MONAI's
UNETR with no permutation.

Intensities. Volumes are kept in Hounsfield units (HU) until the last transform, which maps the
window `hu_window` (default [-1000, 1000]) linearly onto [-1, 1] and clips. Reading a volume
records, in a `HUInfo`, whether a rescale slope/intercept was applied and why (see `to_hu`), so
no volume is rescaled twice.

Loading is ours (NIfTI with nibabel, DICOM series with pydicom, `.npy` with numpy) because the
HU decision needs the raw stored values and the header; everything after loading is a MONAI
dictionary-transform pipeline (`EnsureChannelFirstd -> Orientationd -> Spacingd ->
ScaleIntensityRanged -> SpatialPadd -> RandSpatialCropd | CenterSpatialCropd -> RandFlipd`).
"""

from __future__ import annotations

import gzip
import io
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.text import split_report_sections, split_sentences

DEFAULT_HU_WINDOW = (-1000.0, 1000.0)


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


# ----------------------------------------------------------------------------------------------
# MONAI preprocessing
# ----------------------------------------------------------------------------------------------


# nibabel's axis-label convention, passed explicitly (MONAI is changing its default).
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def _to_meta(array: np.ndarray, affine: np.ndarray):
    from monai.data import MetaTensor

    return MetaTensor(torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32), affine=torch.as_tensor(affine))


def build_transforms(
    train: bool,
    spacing: Optional[Sequence[float]],
    roi: Sequence[int],
    hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
    flip_prob: float = 0.0,
    keys: Sequence[str] = ("image",),
    label_keys: Sequence[str] = (),
):
    """The MONAI dictionary pipeline on {"image": MetaTensor (H, W, D) HU, [label keys]}.

    spacing None keeps the stored spacing (shards are resampled at build time). Labels (lesion
    masks) follow every spatial transform with nearest-neighbour interpolation.
    """
    import monai.transforms as mt

    all_keys = list(keys) + list(label_keys)
    modes = ["bilinear"] * len(keys) + ["nearest"] * len(label_keys)
    steps: list = [
        mt.EnsureChannelFirstd(all_keys, channel_dim="no_channel"),
        mt.Orientationd(all_keys, axcodes="RAS", labels=_RAS_LABELS),
    ]
    if spacing is not None:
        steps.append(mt.Spacingd(all_keys, pixdim=tuple(float(s) for s in spacing), mode=modes))
    low, high = float(hu_window[0]), float(hu_window[1])
    steps += [
        mt.ScaleIntensityRanged(list(keys), a_min=low, a_max=high, b_min=-1.0, b_max=1.0, clip=True),
        # Pad with air (-1 after windowing) rather than 0 (= mid-window, soft tissue-like).
        mt.SpatialPadd(list(keys), spatial_size=tuple(roi), mode="constant", constant_values=-1.0),
    ]
    if label_keys:
        steps.append(mt.SpatialPadd(list(label_keys), spatial_size=tuple(roi), mode="constant"))
    if train:
        steps.append(mt.RandSpatialCropd(all_keys, roi_size=tuple(roi), random_size=False))
        if flip_prob > 0:
            steps += [mt.RandFlipd(all_keys, prob=flip_prob, spatial_axis=axis) for axis in range(3)]
    else:
        steps.append(mt.CenterSpatialCropd(all_keys, roi_size=tuple(roi)))
    return mt.Compose(steps)


class VolumePreprocess:
    """Picklable sample -> FloatTensor (1, H, W, D) in [-1, 1] (RAS, `spacing`, `roi`).

    Called by the shard loader with the raw sample dict (`wants_sample = True`), or with a path
    (NIfTI, `.npy`, DICOM folder). The MONAI pipeline is built lazily inside each worker.

    train: random crop (and flips when flip_prob > 0) vs centre crop. Flips are off by default:
    a left-right flip makes "right lower lobe" in the paired report false.
    spacing: target voxel spacing in mm (x, y, z); None keeps the stored spacing.
    """

    wants_sample = True

    def __init__(
        self,
        train: bool,
        spacing: Optional[Sequence[float]] = (1.5, 1.5, 3.0),
        roi: Sequence[int] = (224, 224, 112),
        hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
        flip_prob: float = 0.0,
        seed: Optional[int] = None,
    ) -> None:
        if len(roi) != 3 or min(roi) < 1:
            raise ValueError(f"roi must be three positive sizes (H, W, D), got {roi}")
        if hu_window[1] <= hu_window[0]:
            raise ValueError(f"hu_window must be [low, high] with low < high, got {hu_window}")
        self.train = bool(train)
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.roi = tuple(int(r) for r in roi)
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        self.flip_prob = float(flip_prob)
        self.seed = seed
        self._fn = None
        self._fn_masked = None

    def _transform(self, with_mask: bool):
        attr = "_fn_masked" if with_mask else "_fn"
        if getattr(self, attr) is None:
            fn = build_transforms(
                self.train, self.spacing, self.roi, self.hu_window, self.flip_prob,
                label_keys=("mask",) if with_mask else (),
            )
            if self.seed is not None:
                fn.set_random_state(seed=self.seed)
            setattr(self, attr, fn)
        return getattr(self, attr)

    def load(self, item: Any) -> Volume:
        if isinstance(item, dict):
            volume = decode_sample_volume(item)
        elif isinstance(item, Volume):
            volume = item
        else:
            volume = read_volume(item)
        # NaN/inf voxels would poison every patch they touch (and the loss); the loader counts
        # the raised error as a bad sample and moves on.
        if not np.isfinite(volume.array).all():
            bad = int((~np.isfinite(volume.array)).sum())
            raise VolumeError(f"{volume.source}: {bad} non-finite voxels")
        return volume

    def __call__(self, item: Any) -> torch.Tensor:
        volume = self.load(item)
        out = self._transform(False)({"image": _to_meta(volume.array, volume.affine)})
        return out["image"].as_tensor().float()

    def with_mask(self, item: Any, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Volume and a voxel label map on the same grid -> ((1, H, W, D) float, (1, H, W, D) long)."""
        volume = self.load(item)
        if mask.shape != volume.array.shape:
            raise VolumeError(f"{volume.source}: mask shape {mask.shape} != volume shape {volume.array.shape}")
        out = self._transform(True)(
            {"image": _to_meta(volume.array, volume.affine), "mask": _to_meta(mask.astype(np.float32), volume.affine)}
        )
        return out["image"].as_tensor().float(), out["mask"].as_tensor().round().long()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fn"] = state["_fn_masked"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"VolumePreprocess(train={self.train}, spacing={self.spacing}, roi={self.roi}, "
            f"hu_window={self.hu_window}, flip_prob={self.flip_prob})"
        )


def resample_to_spacing(volume: Volume, spacing: Sequence[float]) -> Volume:
    """Orient to RAS and resample to `spacing` (build time, so shards are small): trilinear."""
    import monai.transforms as mt

    fn = mt.Compose(
        [
            mt.EnsureChannelFirstd(["image"], channel_dim="no_channel"),
            mt.Orientationd(["image"], axcodes="RAS", labels=_RAS_LABELS),
            mt.Spacingd(["image"], pixdim=tuple(float(s) for s in spacing), mode="bilinear", padding_mode="border"),
        ]
    )
    out = fn({"image": _to_meta(volume.array, volume.affine)})["image"]
    return Volume(out.as_tensor()[0].numpy(), out.affine.numpy().astype(np.float64), volume.hu, volume.source, volume.extra)


def volume_to_npy(array: np.ndarray) -> bytes:
    """HU array -> `.npy` bytes as int16 (exact for integer HU, half of float32; CT HU fits in
    [-32768, 32767] and sub-HU precision carries no signal)."""
    buffer = io.BytesIO()
    np.save(buffer, np.clip(np.rint(array), -32768, 32767).astype(np.int16), allow_pickle=False)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------

# A heading is a known section name in any case, or any ALL-CAPS phrase, at a line start + ":".
def report_sentences(text: str, sections: Sequence[str] = ("findings", "impression")) -> list[str]:
    """The sentences of the wanted sections of a report, in section order.

    Section and sentence splitting are `data_pipelines.text`'s (headers, enumerators, decimals,
    abbreviations); a report without any of the wanted headers gives all its sentences.
    """
    parts = split_report_sections(text)
    chosen = [parts[name] for name in sections if name in parts]
    if not chosen:
        chosen = list(parts.values())
    return [sentence for part in chosen for sentence in split_sentences(part)]


_NORMAL = re.compile(
    r"\b(no|not|without|absent|negative for|free of|unremarkable|normal|within normal limits|"
    r"preserved|clear|intact|patent|none)\b",
    re.IGNORECASE,
)
_ABNORMAL_DESPITE = re.compile(r"\b(but|however|except|although)\b", re.IGNORECASE)


def is_normal_sentence(sentence: str) -> bool:
    """True for a sentence that states absence or normality ("No pleural effusion.", "The
    heart is not enlarged."). Such sentences describe no region, so the alignment head must not
    pull them onto a patch. A sentence that also turns ("no effusion, but a nodule") counts as
    abnormal: misflagging an abnormal sentence as normal only drops its alignment term, while
    the reverse would force a normal statement onto a patch."""
    return bool(_NORMAL.search(sentence)) and not _ABNORMAL_DESPITE.search(sentence)


def pad_sentences(
    sentences: Sequence[Sequence[str]],
    normal: Sequence[Sequence[bool]] | None,
    max_sentences: int,
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Per-sample sentence lists -> (flat list of B * S strings, sentence_mask (B, S) bool,
    sentence_normal (B, S) bool); missing sentences are "" with mask False. Samples with more
    than S sentences keep their first S."""
    batch = len(sentences)
    flat, mask = [], torch.zeros(batch, max_sentences, dtype=torch.bool)
    normal_out = torch.zeros(batch, max_sentences, dtype=torch.bool)
    for b, items in enumerate(sentences):
        items = list(items)[:max_sentences]
        flags = list(normal[b])[: len(items)] if normal is not None else [is_normal_sentence(s) for s in items]
        for s in range(max_sentences):
            flat.append(items[s] if s < len(items) else "")
        mask[b, : len(items)] = True
        normal_out[b, : len(flags)] = torch.tensor(flags, dtype=torch.bool)
    return flat, mask, normal_out


def collate_sentences(
    metas: Sequence[dict], tokenizer: Any, max_sentences: int
) -> dict[str, torch.Tensor]:
    """The sentence part of a CT batch from each sample's `.json` (keys "sentences" and
    "sentence_normal"): {"sentences": (B, S, L) token ids, "sentence_mask": (B, S) bool,
    "sentence_normal": (B, S) bool}. The loader calls this; so do the CT evaluator and tests."""
    lists = [meta.get("sentences", []) for meta in metas]
    normal = [meta.get("sentence_normal", [is_normal_sentence(s) for s in meta.get("sentences", [])]) for meta in metas]
    flat, mask, normal_mask = pad_sentences(lists, normal, max_sentences)
    tokens = tokenizer(flat)  # (B * S, L)
    return {
        "sentences": tokens.view(len(metas), max_sentences, -1),
        "sentence_mask": mask,
        "sentence_normal": normal_mask & mask,
    }


def batch_sentence_normal(batch: dict[str, Any], max_sentences: int) -> torch.Tensor:
    """batch["sentence_normal"] (B, S) bool when the loader provides it; otherwise derived from
    batch["caption"] with the loader's own split (`caption_sentences`, first S sentences), so
    flag s is about sentence s of batch["sentences"]. All False when neither is there."""
    if "sentence_normal" in batch:
        return torch.as_tensor(batch["sentence_normal"], dtype=torch.bool)
    captions = batch.get("caption")
    if captions is None:
        return torch.zeros(len(batch.get("sentence_mask", [])), max_sentences, dtype=torch.bool)
    from vlp.data_pipelines.text import caption_sentences

    flags = torch.zeros(len(captions), max_sentences, dtype=torch.bool)
    for b, caption in enumerate(captions):
        for s, sentence in enumerate((caption_sentences(caption) or [caption])[:max_sentences]):
            flags[b, s] = is_normal_sentence(sentence)
    return flags
