"""`vlp shards build ct-rate:DIR`: the public CT-RATE chest CT release (volumes, reports, metadata,
the 18 predicted abnormality labels)."""

from __future__ import annotations

import ast
import csv
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from pydantic import Field
from tqdm import tqdm

from vlp.core.config import Strict
from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.shards import write_shards
from vlp.data_pipelines.sources.base import SOURCES
from vlp.data_pipelines.sources.ct_sample import ct_sample, parse_options, safe_key, source_folder
from vlp.data_pipelines.volume_io import Volume, read_volume
from vlp.data_pipelines.volume_transforms import resample_to_spacing

# The 18 abnormalities of CT-RATE's multi_abnormality_labels CSVs, in their column order.
CT_RATE_ABNORMALITIES = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema",
    "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
)


class CtRateOptions(Strict):

    split: str = Field("train", pattern="^(train|valid)$")
    spacing: tuple[float, float, float] = (1.5, 1.5, 3.0)
    shard_size: int = Field(100, ge=1)
    limit: int = Field(0, ge=0, description="0: every volume")


# CT-RATE file names per split (dataset/radiology_text_reports/train_reports.csv, ...).
_CT_RATE_FILES = {
    "train": ("train_reports.csv", "train_metadata.csv", "train_predicted_labels.csv"),
    "valid": ("validation_reports.csv", "validation_metadata.csv", "valid_predicted_labels.csv"),
}


def _find_one(root: Path, name: str, required: bool = True) -> Optional[Path]:
    hits = sorted(root.rglob(name))
    if not hits and required:
        raise DataError(f"ct-rate:{root}: no {name} under the dataset folder")
    return hits[0] if hits else None


def _csv_by_volume(path: Optional[Path]) -> dict[str, dict[str, str]]:
    if path is None:
        return {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "VolumeName" not in reader.fieldnames:
            raise DataError(f"{path}: no VolumeName column")
        return {row["VolumeName"]: row for row in reader}


def _float(row: dict, column: str, where: str) -> Optional[float]:
    value = row.get(column)
    if value is None or str(value).strip() in ("", "nan", "None"):
        return None
    try:
        return float(value)
    except ValueError:
        raise DataError(f"{where}: {column}={value!r} is not a number") from None


def _metadata_spacing(row: dict, where: str) -> Optional[tuple[float, float, float]]:
    """CT-RATE's XYSpacing ("[0.75, 0.75]") and ZSpacing -> (x, y, z) mm, or None."""
    xy, z = row.get("XYSpacing"), _float(row, "ZSpacing", where)
    if not xy or z is None:
        return None
    try:
        values = ast.literal_eval(str(xy))
    except (ValueError, SyntaxError):
        raise DataError(f"{where}: XYSpacing={xy!r} is not a [x, y] list") from None
    return float(values[0]), float(values[1]), float(z)


def read_ct_rate_volume(path: Path, meta_row: dict) -> Volume:
    """A CT-RATE `.nii.gz` in HU with its metadata spacing.

    HU: the metadata's RescaleSlope/RescaleIntercept go through `to_hu`'s rule, so a volume that
    is already HU (the `*_fixed` release, or a header that scales) is never rescaled twice.
    Spacing: the first CT-RATE release wrote 1 mm voxels into every header, so the metadata's
    XYSpacing/ZSpacing win over the header's voxel sizes (the axis directions are kept).
    """
    where = f"{path.name} (metadata)"
    volume = read_volume(path, _float(meta_row, "RescaleSlope", where), _float(meta_row, "RescaleIntercept", where))
    spacing = _metadata_spacing(meta_row, where)
    if spacing is not None:
        directions = volume.affine[:3, :3] / np.linalg.norm(volume.affine[:3, :3], axis=0)
        volume.affine = volume.affine.copy()
        volume.affine[:3, :3] = directions * np.asarray(spacing)
        volume.extra["spacing_from"] = "metadata XYSpacing/ZSpacing"
    return volume


@SOURCES.register("ct-rate")
def build_ct_rate(out_dir: Path, arg: str | None, **options: Any) -> dict:
    """`ct-rate:DIR`: the public CT-RATE layout under DIR (the dataset root or its `dataset/`):
        {split}[_fixed]/<patient>/<study>/<VolumeName>.nii.gz
        radiology_text_reports/{train,validation}_reports.csv   VolumeName, Findings_EN, Impressions_EN
        metadata/{train,validation}_metadata.csv                VolumeName, RescaleSlope, RescaleIntercept,
                                                                XYSpacing, ZSpacing, ...
        multi_abnormality_labels/{train,valid}_predicted_labels.csv   VolumeName + the 18 abnormalities
    Report = "FINDINGS: ... IMPRESSION: ...". Options: split (train|valid), spacing, shard_size,
    limit. Writes `ct-rate-{split}-*.tar`.
    """
    root = source_folder("ct-rate", arg, "the dataset folder: ct-rate:/data/CT-RATE")
    opts = parse_options(CtRateOptions, "ct-rate", options)
    reports_name, meta_name, labels_name = _CT_RATE_FILES[opts.split]
    reports = _csv_by_volume(_find_one(root, reports_name))
    metadata = _csv_by_volume(_find_one(root, meta_name, required=False))
    labels = _csv_by_volume(_find_one(root, labels_name, required=False))
    folders = [p for p in sorted(root.rglob(f"{opts.split}*")) if p.is_dir() and p.name in (opts.split, f"{opts.split}_fixed")]
    # Both releases side by side hold the same VolumeNames: prefer the `_fixed` one.
    fixed = [p for p in folders if p.name.endswith("_fixed")]
    folders = fixed or folders
    if not folders:
        raise DataError(f"ct-rate:{arg}: no {opts.split}/ or {opts.split}_fixed/ volume folder")
    volumes = sorted(p for folder in folders for p in folder.rglob("*.nii.gz"))
    if opts.limit:
        volumes = volumes[: opts.limit]
    if not volumes:
        raise DataError(f"ct-rate:{arg}: no .nii.gz volumes under {', '.join(map(str, folders))}")

    def samples() -> Iterator[dict]:
        for path in tqdm(volumes, desc=f"ct-rate {opts.split}", unit="volume"):
            row = reports.get(path.name)
            if row is None:
                raise DataError(f"{path}: VolumeName {path.name} not in {reports_name}")
            findings = (row.get("Findings_EN") or "").strip()
            impression = (row.get("Impressions_EN") or "").strip()
            if not findings and not impression:
                raise DataError(f"{reports_name}: {path.name} has empty Findings_EN and Impressions_EN")
            report = f"FINDINGS: {findings}\nIMPRESSION: {impression}".strip()
            label_row = labels.get(path.name, {})
            sample_labels = {name: int(float(label_row[name])) for name in CT_RATE_ABNORMALITIES if name in label_row}
            volume = read_ct_rate_volume(path, metadata.get(path.name, {}))
            spacing_from = volume.extra.get("spacing_from", "NIfTI header")
            volume = resample_to_spacing(volume, opts.spacing)
            yield ct_sample(safe_key(path.name), volume, report, sample_labels, {"spacing_from": spacing_from})

    paths = write_shards(samples(), out_dir, f"ct-rate-{opts.split}", opts.shard_size)
    return {"source": "ct-rate", "split": opts.split, "count": len(volumes), "shards": [str(p) for p in paths]}
