"""`vlp shards build ct:DIR`: CT volumes (NIfTI, `.npy` in HU, DICOM series) with their reports."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

from pydantic import Field
from tqdm import tqdm

from vlp.core.config import Strict
from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.shards import write_shards
from vlp.data_pipelines.sources.base import SOURCES
from vlp.data_pipelines.sources.ct_sample import ct_sample, parse_options, safe_key, source_folder
from vlp.data_pipelines.volume_io import read_volume
from vlp.data_pipelines.volume_transforms import resample_to_spacing


class CtDirOptions(Strict):

    spacing: tuple[float, float, float] = (1.5, 1.5, 3.0)
    shard_size: int = Field(200, ge=1)
    prefix: str = "ct"


def _is_dicom_folder(path: Path) -> bool:
    for child in path.iterdir():
        if child.is_file():
            if child.suffix.lower() == ".dcm":
                return True
            with open(child, "rb") as handle:
                head = handle.read(132)
            if head[128:132] == b"DICM":
                return True
    return False


def find_volumes(root: Path) -> list[Path]:
    """Volumes under `root`: `.nii`, `.nii.gz`, `.npy` files and DICOM series folders, sorted."""
    found = []
    for path in sorted(root.rglob("*")):
        name = path.name.lower()
        if path.is_file() and name.endswith((".nii", ".nii.gz", ".npy")) and not name.endswith(".mask.npy"):
            found.append(path)
        elif path.is_dir() and _is_dicom_folder(path):
            found.append(path)
    return found


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _read_labels_csv(path: Path) -> dict[str, dict[str, int]]:
    """A CSV whose first column names the volume (file name or stem) and whose other columns are
    0/1 labels -> {volume name: {label: 0/1}}."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise DataError(f"{path}: empty labels CSV")
    header, table = rows[0], {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            table[_stem(Path(row[0]))] = {name: int(float(value)) for name, value in zip(header[1:], row[1:])}
        except ValueError:
            raise DataError(f"{path}:{line}: labels must be 0/1, got {row[1:]}") from None
    return table


@SOURCES.register("ct")
def build_ct(out_dir: Path, arg: str | None, **options: Any) -> dict:
    """`ct:DIR`: every volume under DIR (NIfTI, `.npy` in HU, or a DICOM series folder) with its
    report `<name>.txt` beside it (or `report.txt` inside a DICOM folder); labels from
    `<name>.json` ({"labels": {...}} or a flat {name: 0/1}) or a `labels.csv` in DIR.

    Options: spacing (mm, default 1.5,1.5,3.0), shard_size, prefix. Writes `{prefix}-*.tar`.
    """
    root = source_folder("ct", arg, "a folder: ct:/path/to/volumes")
    opts = parse_options(CtDirOptions, "ct", options)
    volumes = find_volumes(root)
    if not volumes:
        raise DataError(f"ct:{arg}: no .nii/.nii.gz/.npy volumes or DICOM folders found")
    labels_csv = root / "labels.csv"
    table = _read_labels_csv(labels_csv) if labels_csv.is_file() else {}

    def samples() -> Iterator[dict]:
        for path in tqdm(volumes, desc="ct", unit="volume"):
            stem = _stem(path)
            report_path = path.with_name(stem + ".txt")
            if path.is_dir() and not report_path.is_file():
                report_path = path / "report.txt"
            if not report_path.is_file():
                raise DataError(f"{path}: no report {report_path.name} beside the volume")
            report = report_path.read_text(encoding="utf-8").strip()
            if not report:
                raise DataError(f"{report_path}: empty report")
            labels = dict(table.get(stem, {}))
            label_json = path.with_name(stem + ".json")
            if label_json.is_file() and not path.name.endswith(".npy"):
                data = json.loads(label_json.read_text())
                labels.update(data.get("labels", data))
            volume = resample_to_spacing(read_volume(path), opts.spacing)
            yield ct_sample(safe_key(str(path.relative_to(root))), volume, report, labels)

    paths = write_shards(samples(), out_dir, opts.prefix, opts.shard_size)
    return {"source": "ct", "count": len(volumes), "shards": [str(p) for p in paths]}
