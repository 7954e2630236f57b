"""`vlp shards build digits`: scikit-learn's bundled handwritten digits as an offline dataset.

1,797 real 8x8 grey images (UCI optdigits, shipped inside scikit-learn, so no download),
upscaled to `image_size`, with captions from templates that name the class as a numeral and
as a word. Split stratified into train and test, written as `digits-train-*.tar` and
`digits-test-*.tar` in one folder with one `sizes.json`. Exact pixel duplicates are kept on one
side of the split, so no test image is also a training image. The folder also gets
clip_benchmark's webdataset eval files (`classnames.txt`, `zeroshot_classification_templates.txt`).
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from vlp.core.files import atomic_write
from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.shards import progress, write_shards
from vlp.data_pipelines.sources.base import SOURCES

DIGIT_CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Zero-shot prompts for the evaluator (`{c}` is a class name from DIGIT_CLASSNAMES).
DIGIT_TEMPLATES = [
    "a photo of the number {c}.",
    "a handwritten {c}.",
    "the digit {c}.",
    "a blurry photo of the number {c}.",
    "a low resolution image of the digit {c}.",
    "a drawing of the number {c}.",
]
# Training captions: `{n}` is the numeral ("7"), `{w}` the word ("seven").
CAPTION_TEMPLATES = [
    "a photo of the number {n}",
    "a handwritten {w}",
    "the digit {n}",
    "a handwritten digit {n}",
    "an image of the number {w}",
    "the number {w}, written by hand",
    "a scan of a handwritten {n}",
    "a low resolution picture of the digit {w}",
    "the numeral {n} ({w})",
    "a {w} written in ink",
]
# Shared by every class: the parent concept the hyperbolic (MERU) head places above the classes.
GENERIC_CAPTIONS = ["a handwritten number", "a digit", "a number written by hand", "a handwritten digit", "a number"]
GENERIC_FRACTION = 1 / 3


@SOURCES.register("digits")
def build(
    out_dir: Path,
    arg: str | None,
    *,
    image_size: int = 32,
    resize: Literal["nearest", "bilinear"] = "nearest",
    mode: Literal["RGB", "L"] = "RGB",
    seed: int = 0,
    test_fraction: float = 0.2,
    caption_style: Literal["plain", "hierarchical", "parent"] = "plain",
    generic_fraction: float = GENERIC_FRACTION,
    shard_size: int = 500,
) -> dict:
    """Options: image_size (px), resize (nearest|bilinear), mode (RGB|L), seed, test_fraction,
    caption_style (plain; hierarchical: a `generic_fraction` of captions are generic instead of
    specific; parent: every sample keeps its plain caption and gets a generic one as `parent.txt`,
    for `data.parent_caption_key`), shard_size."""
    from sklearn.datasets import load_digits

    if arg:
        raise DataError(f"source 'digits' takes no argument, got digits:{arg}")
    if resize not in ("nearest", "bilinear"):
        raise DataError(f"digits: resize must be 'nearest' or 'bilinear', got {resize!r}")
    if mode not in ("RGB", "L"):
        raise DataError(f"digits: mode must be 'RGB' or 'L', got {mode!r}")
    if caption_style not in ("plain", "hierarchical", "parent"):
        raise DataError(f"digits: caption_style must be 'plain', 'hierarchical' or 'parent', got {caption_style!r}")
    if not 0 <= generic_fraction < 1:
        raise DataError(f"digits: generic_fraction must be in [0, 1), got {generic_fraction}")
    if not 0 < test_fraction < 1:
        raise DataError(f"digits: test_fraction must be in (0, 1), got {test_fraction}")

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # (N, 8, 8), values 0..16 -> 0..255
    labels = digits.target.astype(int)
    test = split_test(images, labels, test_fraction, seed)

    rng = random.Random(seed)
    # Parent captions come from an RNG of their own, so the specific captions are the plain build's.
    parent_rng = random.Random(seed + 1) if caption_style == "parent" else None
    resample = Image.NEAREST if resize == "nearest" else Image.BILINEAR
    out_dir = Path(out_dir)
    summary: dict[str, Any] = {"source": "digits", "counts": {}, "shards": {}}
    for split in ("train", "test"):
        indices = [i for i in range(len(labels)) if test[i] == (split == "test")]
        samples = (
            _sample(i, images[i], int(labels[i]), split, image_size, resample, mode,
                    caption_style, generic_fraction, rng, parent_rng)
            for i in indices
        )
        paths = write_shards(progress(samples, total=len(indices), desc=f"digits {split}", unit="img"),
                             out_dir, f"digits-{split}", shard_size)
        summary["counts"][split] = len(indices)
        summary["shards"][split] = [str(p) for p in paths]
    atomic_write(out_dir / "classnames.txt", "\n".join(DIGIT_CLASSNAMES) + "\n")
    atomic_write(out_dir / "zeroshot_classification_templates.txt", "\n".join(DIGIT_TEMPLATES) + "\n")
    summary["clip_benchmark"] = str(write_clip_benchmark_layout(out_dir, [Path(p) for p in summary["shards"]["test"]]))
    return summary


def write_clip_benchmark_layout(out_dir: Path, test_shards: list[Path]) -> Path:
    """clip_benchmark's webdataset eval layout over the test split, as relative links (nothing is
    copied): `clip_benchmark/test/{0..n-1}.tar`, `test/nshards.txt`, and the class-name and
    template files one level up. Use: `clip_benchmark eval --dataset wds/digits
    --dataset_root OUT/clip_benchmark ...`."""
    root = out_dir / "clip_benchmark"
    (root / "test").mkdir(parents=True, exist_ok=True)
    for index, shard in enumerate(sorted(test_shards)):
        link = root / "test" / f"{index}.tar"
        link.unlink(missing_ok=True)
        link.symlink_to(Path("..") / ".." / shard.name)
    atomic_write(root / "test" / "nshards.txt", f"{len(test_shards)}\n")
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
        link = root / name
        link.unlink(missing_ok=True)
        link.symlink_to(Path("..") / name)
    return root


def split_test(images: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of test samples: stratified per class, duplicates kept together.

    Exact pixel duplicates form one group that goes wholly to the side of its first member,
    so the same image never appears in both splits.
    """
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        test[members[: int(round(test_fraction * len(members)))]] = True
    first_of: dict[bytes, int] = {}
    for index in range(len(labels)):
        first = first_of.setdefault(images[index].tobytes(), index)
        test[index] = test[first]
    return test


def _sample(index, pixels, label, split, image_size, resample, mode, caption_style, generic_fraction, rng,
            parent_rng=None) -> dict:
    image = Image.fromarray(pixels, mode="L").resize((image_size, image_size), resample)
    if mode == "RGB":
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    if caption_style == "hierarchical" and rng.random() < generic_fraction:
        caption = rng.choice(GENERIC_CAPTIONS)
    else:
        caption = rng.choice(CAPTION_TEMPLATES).format(n=label, w=DIGIT_CLASSNAMES[label])
    meta = {"label": label, "class_name": DIGIT_CLASSNAMES[label], "split": split, "source_index": index,
            "caption": caption}
    sample = {"__key__": f"{index:06d}", "png": buffer.getvalue(), "txt": caption, "cls": label, "json": meta}
    if parent_rng is not None:
        sample["parent.txt"] = meta["parent_caption"] = parent_rng.choice(GENERIC_CAPTIONS)
    return sample
