"""CT sources for `vlp shards build`: `ct:DIR`, `ct-rate:DIR` and the SEMI-SYNTHETIC `ct-lesions`.

Every CT sample is written as
    {key}.npy   the volume: int16 HU, RAS-oriented (H, W, D) = (x, y, z), resampled at build
                time to the source's `spacing` (so shards stay small and loaders do no resampling;
                int16 is exact for integer HU and half the bytes of float32, where float16 would
                round HU above 2048 to even numbers);
    {key}.txt   the report;
    {key}.json  "sentences" (findings + impression), "sentence_normal" (per sentence: states
                absence/normality, see `data_pipelines.ct.is_normal_sentence`), "labels"
                {name: 0/1}, "spacing", "affine" (voxel -> RAS mm), "shape", "axis_order",
                "hu" (whether a rescale slope/intercept was applied and why) and "intensity"
                (what the stored values are: HU, no window applied).
ct-lesions also writes {key}.mask.npy (int8 label map: voxel value i + 1 is lesion i) and the
lesion list in .json.
"""

from __future__ import annotations

import ast
import csv
import functools
import importlib.util
import io
import json
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from pydantic import BaseModel, Field, ValidationError
from tqdm import tqdm

from vlp.core.config import Strict
from vlp.data_pipelines.ct import (
    HUInfo,
    Volume,
    is_normal_sentence,
    read_volume,
    report_sentences,
    resample_to_spacing,
    volume_to_npy,
)
from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.shards import write_shards
from vlp.data_pipelines.sources import SOURCES

# The 18 abnormalities of CT-RATE's multi_abnormality_labels CSVs, in their column order.
CT_RATE_ABNORMALITIES = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema",
    "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
)
AXIS_ORDER = "RAS (H, W, D) = (x: toward Right, y: toward Anterior, z: toward Superior)"
INTENSITY = {"stored": "int16 HU", "window_applied": False}


def _options(model: type[BaseModel], source: str, options: dict) -> BaseModel:
    try:
        return model(**options)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "options"
        raise DataError(f"{source}: option {where}: {first['msg']}") from None


def ct_sample(key: str, volume: Volume, report: str, labels: dict[str, int], extra: dict | None = None) -> dict:
    """One shard sample from a volume already at its target spacing (see the module docstring)."""
    sentences = report_sentences(report)
    meta = {
        "sentences": sentences,
        "sentence_normal": [is_normal_sentence(s) for s in sentences],
        "labels": {name: int(value) for name, value in labels.items()},
        "spacing": list(volume.spacing),
        "affine": np.asarray(volume.affine).round(6).tolist(),
        "shape": list(volume.array.shape),
        "axis_order": AXIS_ORDER,
        "hu": volume.hu.to_json(),
        "intensity": INTENSITY,
        "source": volume.source,
    }
    meta.update(extra or {})
    return {"__key__": key, "npy": volume_to_npy(volume.array), "txt": report, "json": meta}


def _safe_key(name: str) -> str:
    key = name.replace(".nii.gz", "").replace(".nii", "").replace(".npy", "")
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in key) or "volume"


# ----------------------------------------------------------------------------------------------
# ct:DIR
# ----------------------------------------------------------------------------------------------


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
    if not arg:
        raise DataError("source 'ct' needs a folder: ct:/path/to/volumes")
    root = Path(arg)
    if not root.is_dir():
        raise DataError(f"ct:{arg}: not a folder")
    opts = _options(CtDirOptions, "ct", options)
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
            yield ct_sample(_safe_key(str(path.relative_to(root))), volume, report, labels)

    paths = write_shards(samples(), out_dir, opts.prefix, opts.shard_size)
    return {"source": "ct", "count": len(volumes), "shards": [str(p) for p in paths]}


# ----------------------------------------------------------------------------------------------
# ct-rate:DIR
# ----------------------------------------------------------------------------------------------


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
    if not arg:
        raise DataError("source 'ct-rate' needs the dataset folder: ct-rate:/data/CT-RATE")
    root = Path(arg)
    if not root.is_dir():
        raise DataError(f"ct-rate:{arg}: not a folder")
    opts = _options(CtRateOptions, "ct-rate", options)
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
            yield ct_sample(_safe_key(path.name), volume, report, sample_labels, {"spacing_from": spacing_from})

    paths = write_shards(samples(), out_dir, f"ct-rate-{opts.split}", opts.shard_size)
    return {"source": "ct-rate", "split": opts.split, "count": len(volumes), "shards": [str(p) for p in paths]}


# ----------------------------------------------------------------------------------------------
# ct-lesions: SEMI-SYNTHETIC benchmark
# ----------------------------------------------------------------------------------------------

# Lesion kinds: HU inside, radius range (voxels at the benchmark spacing), texture (noise SD in
# HU inside the lesion) and shape. Distinct HU/size/texture so each kind is identifiable.
LESION_KINDS: dict[str, dict[str, Any]] = {
    "nodule": {"hu": 150.0, "radius": (2.4, 3.0), "texture": 6.0, "shape": "sphere", "phrase": "solid nodule"},
    "cyst": {"hu": -15.0, "radius": (3.0, 3.8), "texture": 1.0, "shape": "sphere", "phrase": "fluid-density cyst"},
    "calcification": {"hu": 700.0, "radius": (1.6, 2.2), "texture": 10.0, "shape": "sphere", "phrase": "calcification"},
    "mass": {"hu": 100.0, "radius": (3.8, 4.6), "texture": 25.0, "shape": "blob", "phrase": "heterogeneous mass"},
    "fat": {"hu": -120.0, "radius": (2.6, 3.4), "texture": 4.0, "shape": "sphere", "phrase": "fat-containing lesion"},
}
# The zero-shot class name of each kind ("{name} is present.").
LESION_NAMES = {"nodule": "nodule", "cyst": "cyst", "calcification": "calcification", "mass": "mass", "fat": "fat-containing lesion"}
NORMAL_FINDINGS = (
    "The ventricles are normal in size.",
    "No midline shift.",
    "No pleural effusion.",
    "The gray-white matter differentiation is preserved.",
    "No acute hemorrhage.",
)


class LesionOptions(Strict):

    train_size: int = Field(1200, ge=1)
    test_size: int = Field(300, ge=1)
    size: int = Field(32, ge=16, le=96, description="volume edge in voxels (cube)")
    spacing: float = Field(4.0, gt=0, description="mm per voxel of the benchmark volumes")
    lesion_prob: float = Field(0.4, gt=0, lt=1, description="chance each kind is present")
    noise_hu: float = Field(6.0, ge=0)
    seed: int = 0
    shard_size: int = Field(500, ge=1)


def atlas_path() -> Path:
    """The real CT volume shipped by the `totalsegmentator` package (brain atlas, 1 mm, HU)."""
    spec = importlib.util.find_spec("totalsegmentator")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("ct-lesions needs the `totalsegmentator` package's data: pip install --no-deps totalsegmentator")
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "ct_brain_atlas_1mm.nii.gz"
    if not path.is_file():
        raise DataError(f"ct-lesions: {path} is missing from the totalsegmentator package")
    return path


@functools.lru_cache(maxsize=4)
def _atlas(spacing: float) -> Volume:
    return resample_to_spacing(read_volume(atlas_path()), (spacing, spacing, spacing))


def location_words(center: Sequence[float], size: int) -> str:
    """RAS voxel centre -> "right anterior upper" (index 0 grows to the Right, 1 Anterior, 2 Superior)."""
    half = size / 2
    side = "right" if center[0] >= half else "left"
    front = "anterior" if center[1] >= half else "posterior"
    level = "upper" if center[2] >= half else "lower"
    return f"{side} {front} {level}"


def _plant(volume: np.ndarray, mask: np.ndarray, kind: str, center: np.ndarray, radius: float,
           label: int, rng: np.random.Generator) -> None:
    spec = LESION_KINDS[kind]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), axis=-1).astype(np.float32)
    if spec["shape"] == "blob":  # lobulated: a union of three offset spheres
        region = np.zeros(volume.shape, dtype=bool)
        for _ in range(3):
            offset = rng.normal(0, radius * 0.35, size=3)
            r = radius * rng.uniform(0.6, 0.9)
            region |= np.linalg.norm(grid - (center + offset), axis=-1) <= r
    else:
        region = np.linalg.norm(grid - center, axis=-1) <= radius
    region &= mask == 0
    values = spec["hu"] + rng.normal(0, spec["texture"], size=int(region.sum()))
    volume[region] = values
    mask[region] = label


def lesion_sample(rng: np.random.Generator, opts: LesionOptions) -> dict:
    """One semi-synthetic volume: a jittered crop of the real atlas with planted lesions.

    Returns {"volume": (S, S, S) float32 HU, "mask": (S, S, S) int8, "lesions": [...],
    "sentences": [...], "sentence_lesion": [lesion index or -1], "labels": {kind: 0/1}, "report"}.
    """
    atlas = _atlas(opts.spacing)
    size = opts.size
    data = atlas.array
    foreground = np.argwhere(data > 10)
    center = (foreground.min(0) + foreground.max(0)) // 2
    start = [int(np.clip(c - size // 2 + rng.integers(-3, 4), 0, max(0, n - size))) for c, n in zip(center, data.shape)]
    crop = np.zeros((size, size, size), dtype=np.float32)
    piece = data[start[0] : start[0] + size, start[1] : start[1] + size, start[2] : start[2] + size]
    crop[: piece.shape[0], : piece.shape[1], : piece.shape[2]] = piece
    crop = crop * rng.uniform(0.95, 1.05) + rng.uniform(-5, 5)
    crop += rng.normal(0, opts.noise_hu, size=crop.shape).astype(np.float32)
    tissue = crop > 15  # brain parenchyma: lesions sit inside the real anatomy
    mask = np.zeros(crop.shape, dtype=np.int8)
    present = [kind for kind in LESION_KINDS if rng.random() < opts.lesion_prob]
    rng.shuffle(present)
    lesions, sentences, sentence_lesion = [], [], []
    for kind in present:
        low, high = LESION_KINDS[kind]["radius"]
        radius = float(rng.uniform(low, high))
        margin = int(np.ceil(radius)) + 1
        for _ in range(200):
            c = rng.integers(margin, size - margin, size=3).astype(np.float32)
            if any(abs(v - size / 2) < 1.5 for v in c):  # keep clear of the midplanes: unambiguous words
                continue
            if not tissue[tuple(c.astype(int))]:
                continue
            if all(np.linalg.norm(c - np.asarray(l["center"])) > radius + l["radius"] + 2 for l in lesions):
                break
        else:
            continue
        label = len(lesions) + 1
        _plant(crop, mask, kind, c, radius, label, rng)
        where = location_words(c, size)
        size_word = "small" if radius < (low + high) / 2 else "large"
        sentence = f"A {size_word} {LESION_KINDS[kind]['phrase']} in the {where} region."
        lesions.append({"kind": kind, "center": c.tolist(), "radius": radius, "mask_value": label,
                        "location": where, "sentence_index": len(sentences)})
        sentence_lesion.append(len(lesions) - 1)
        sentences.append(sentence)
    kinds_present = [l["kind"] for l in lesions]
    absent = [k for k in LESION_KINDS if k not in kinds_present]
    for kind in absent:
        if rng.random() < 0.5:
            sentences.append(f"No {LESION_NAMES[kind]} is seen.")
            sentence_lesion.append(-1)
    if not lesions:
        sentences.append("No focal lesion is identified.")
        sentence_lesion.append(-1)
    for normal in rng.choice(NORMAL_FINDINGS, size=int(rng.integers(1, 3)), replace=False):
        sentences.append(str(normal))
        sentence_lesion.append(-1)
    # Lesion sentences first (in random order), then the normal findings (in random order): a
    # loader that keeps the first S sentences (`data.sentences`) keeps every lesion sentence.
    first = [i for i in range(len(sentences)) if sentence_lesion[i] >= 0]
    rest = [i for i in range(len(sentences)) if sentence_lesion[i] < 0]
    order = [first[i] for i in rng.permutation(len(first))] + [rest[i] for i in rng.permutation(len(rest))]
    sentences = [sentences[i] for i in order]
    sentence_lesion = [sentence_lesion[i] for i in order]
    for new_index, lesion_index in enumerate(sentence_lesion):
        if lesion_index >= 0:
            lesions[lesion_index]["sentence_index"] = new_index
    if lesions:
        names = [LESION_NAMES[k] for k in kinds_present]
        impression = (", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]).capitalize()
        impression += " as described."
    else:
        impression = "No focal lesion."
    sentences.append(impression)
    sentence_lesion.append(-1)
    report = "FINDINGS: " + " ".join(sentences[:-1]) + "\nIMPRESSION: " + impression
    labels = {kind: int(kind in kinds_present) for kind in LESION_KINDS}
    return {"volume": crop, "mask": mask, "lesions": lesions, "sentences": sentences,
            "sentence_lesion": sentence_lesion, "labels": labels, "report": report}


def _lesion_samples(split: str, count: int, opts: LesionOptions) -> Iterator[dict]:
    affine = np.diag([opts.spacing] * 3 + [1.0])
    for index in tqdm(range(count), desc=f"ct-lesions {split}", unit="volume"):
        rng = np.random.default_rng([opts.seed, 0 if split == "train" else 1, index])
        drawn = lesion_sample(rng, opts)
        volume = Volume(drawn["volume"], affine, HUInfo(False, reason="semi-synthetic: atlas HU + planted lesion HU"),
                        source="ct-lesions (semi-synthetic)")
        mask_bytes = io.BytesIO()
        np.save(mask_bytes, drawn["mask"], allow_pickle=False)
        sample = ct_sample(f"{split}{index:06d}", volume, drawn["report"], drawn["labels"], {
            "semi_synthetic": True,
            "lesions": drawn["lesions"],
            "sentence_lesion": drawn["sentence_lesion"],
            "label_names": [LESION_NAMES[k] for k in LESION_KINDS],
        })
        # Sentences as generated (the report is built from them, so splitting would give the same).
        sample["json"]["sentences"] = drawn["sentences"]
        sample["json"]["sentence_normal"] = [is_normal_sentence(s) for s in drawn["sentences"]]
        sample["mask.npy"] = mask_bytes.getvalue()
        yield sample


@SOURCES.register("ct-lesions")
def build_ct_lesions(out_dir: Path, arg: str | None, **options: Any) -> dict:
    """`ct-lesions`: a SEMI-SYNTHETIC benchmark. Lesions of five kinds (nodule, cyst,
    calcification, mass, fat-containing lesion; distinct HU, size and texture) are planted at
    known positions into jittered crops of the real CT volume shipped by `totalsegmentator`
    (resampled to `spacing`). The report has one sentence per lesion (kind + location words) and
    normal-finding sentences; `mask.npy` marks each lesion's voxels; labels say which kinds are
    present. Deterministic in `seed`. Writes `ct-lesions-train-*.tar` and `ct-lesions-test-*.tar`.

    Options: train_size, test_size, size (voxels), spacing (mm), lesion_prob, noise_hu, seed,
    shard_size.
    """
    if arg:
        raise DataError(f"source 'ct-lesions' takes no argument, got ct-lesions:{arg}")
    opts = _options(LesionOptions, "ct-lesions", options)
    summary: dict[str, Any] = {"source": "ct-lesions", "semi_synthetic": True, "counts": {}, "shards": {}}
    for split, count in (("train", opts.train_size), ("test", opts.test_size)):
        paths = write_shards(_lesion_samples(split, count, opts), out_dir, f"ct-lesions-{split}", opts.shard_size)
        summary["counts"][split] = count
        summary["shards"][split] = [str(p) for p in paths]
    return summary
