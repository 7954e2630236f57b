"""`vlp shards build ct-lesions`: a SEMI-SYNTHETIC benchmark of lesions planted at known places
into a real CT volume, with one report sentence per lesion and a voxel mask of each."""

from __future__ import annotations

import functools
import importlib.util
import io
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from pydantic import Field
from tqdm import tqdm

from vlp.core.config import Strict
from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.shards import write_shards
from vlp.data_pipelines.sources.base import SOURCES
from vlp.data_pipelines.sources.ct_sample import ct_sample, parse_options
from vlp.data_pipelines.volume_io import HUInfo, Volume, read_volume
from vlp.data_pipelines.volume_transforms import resample_to_spacing

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
    opts = parse_options(LesionOptions, "ct-lesions", options)
    summary: dict[str, Any] = {"source": "ct-lesions", "semi_synthetic": True, "counts": {}, "shards": {}}
    for split, count in (("train", opts.train_size), ("test", opts.test_size)):
        paths = write_shards(_lesion_samples(split, count, opts), out_dir, f"ct-lesions-{split}", opts.shard_size)
        summary["counts"][split] = count
        summary["shards"][split] = [str(p) for p in paths]
    return summary
