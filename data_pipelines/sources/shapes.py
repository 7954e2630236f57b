"""`vlp shards build shapes`: a GENERATED multi-object dataset for fine-grained alignment.

Every image is drawn here from a seeded random generator (nothing is downloaded): 2-4
non-overlapping coloured shapes (circle, square, triangle, diamond) of two sizes at random
positions on a plain dark background. The caption has one sentence per object, in drawing
order ("a small red circle in the top left. a large blue square on the right."), so the loader's
sub-caption sampling (`data.sub_captions`) draws object descriptions from it.

Each sample is `{key}.png`, `{key}.txt` (the long caption) and `{key}.json`, whose `objects`
list holds, per object, its words, its sentence, its bounding box and its pixel mask as a
row-major run-length encoding (`decode_mask`). Objects never overlap, so each mask is exactly
the pixels drawn in the object's colour. Train and held-out splits are written as
`shapes-train-*.tar` and `shapes-test-*.tar`; the output is a pure function of the options
(same seed, same bytes), and no test image is pixel-identical to a training image.
"""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw
from pydantic import Field, ValidationError, model_validator

from vlp.core.config import Strict
from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.shards import write_shards
from vlp.data_pipelines.sources.base import SOURCES

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 200),
    "white": (240, 240, 240),
}
BACKGROUND = (30, 30, 30)
# Object edge as a fraction of the image edge, per size word.
SIZES = {"small": (0.16, 0.24), "large": (0.30, 0.40)}
# Where the object's centre falls on a 3 x 3 grid of the image -> the phrase that says so.
PLACES = {
    (0, 0): "in the top left", (0, 1): "at the top", (0, 2): "in the top right",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "in the bottom left", (2, 1): "at the bottom", (2, 2): "in the bottom right",
}


class ShapesOptions(Strict):
    """Options of `vlp shards build shapes` (values from the command line arrive as strings)."""


    image_size: int = Field(64, ge=32, le=512)
    train_size: int = Field(20000, ge=1)
    test_size: int = Field(500, ge=1)
    min_objects: int = Field(2, ge=1)
    max_objects: int = Field(4, ge=1, le=6)
    seed: int = 0
    shard_size: int = Field(2000, ge=1)

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects={self.min_objects} exceeds max_objects={self.max_objects}")
        return self


@SOURCES.register("shapes")
def build(out_dir: Path, arg: str | None, **options: Any) -> dict:
    """Write `shapes-train-*.tar` and `shapes-test-*.tar` into `out_dir`; returns counts and paths.

    Options: image_size (px, default 64), train_size, test_size, min_objects, max_objects,
    seed, shard_size.
    """
    if arg:
        raise DataError(f"source 'shapes' takes no argument, got shapes:{arg}")
    try:
        opts = ShapesOptions(**options)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "options"
        raise DataError(f"shapes: option {where}: {first['msg']}") from None

    out_dir = Path(out_dir)
    summary: dict[str, Any] = {"source": "shapes", "generated": True, "counts": {}, "shards": {}}
    train_hashes: set[str] = set()
    for split, size in (("train", opts.train_size), ("test", opts.test_size)):
        samples = _split_samples(split, size, opts, train_hashes)
        paths = write_shards(samples, out_dir, f"shapes-{split}", opts.shard_size)
        summary["counts"][split] = size
        summary["shards"][split] = [str(p) for p in paths]
    return summary


def _split_samples(split: str, size: int, opts: ShapesOptions, train_hashes: set[str]) -> Iterator[dict]:
    for index in range(size):
        attempt = 0
        while True:
            # One generator per (seed, split, index, attempt): a sample never depends on the others.
            rng = random.Random(f"shapes/{opts.seed}/{split}/{index}/{attempt}")
            sample = render_sample(rng, opts.image_size, opts.min_objects, opts.max_objects)
            digest = hashlib.sha1(sample["pixels"].tobytes()).hexdigest()
            if split == "train":
                train_hashes.add(digest)
                break
            if digest not in train_hashes:  # held-out images are never training images
                break
            attempt += 1
        yield _to_shard_sample(sample, split, index, opts.seed)


def render_sample(rng: random.Random, image_size: int, min_objects: int, max_objects: int) -> dict:
    """Draw one image: {"pixels": (S, S, 3) uint8, "objects": [...], "caption": str}.

    Objects have distinct (colour, shape) pairs, so each sentence names one object even
    without its position; boxes are kept one pixel apart, so masks never touch or overlap.
    """
    count = rng.randint(min_objects, max_objects)
    kinds = rng.sample([(color, shape) for color in COLORS for shape in SHAPES], count)
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    boxes: list[tuple[int, int, int, int]] = []
    objects = []
    for color, shape in kinds:
        placed = _place(rng, image_size, boxes)
        if placed is None:  # no room left for another object: keep the ones already drawn
            continue
        size_word, box = placed
        boxes.append(box)
        mask_image = Image.new("L", (image_size, image_size), 0)
        _draw_shape(draw, shape, box, COLORS[color])
        _draw_shape(ImageDraw.Draw(mask_image), shape, box, 255)
        mask = np.asarray(mask_image) > 0
        x0, y0, x1, y1 = box
        center_row = min(2, int(3 * ((y0 + y1) / 2) / image_size))
        center_col = min(2, int(3 * ((x0 + x1) / 2) / image_size))
        place = PLACES[(center_row, center_col)]
        objects.append({
            "shape": shape,
            "color": color,
            "size": size_word,
            "place": place,
            "sentence": f"a {size_word} {color} {shape} {place}.",
            "bbox": [x0, y0, x1 + 1, y1 + 1],  # pixel box, exclusive end
            "mask": encode_mask(mask),
        })
    caption = " ".join(obj["sentence"] for obj in objects)
    return {"pixels": np.asarray(image), "objects": objects, "caption": caption}


def _place(rng: random.Random, image_size: int, boxes: list) -> tuple[str, tuple[int, int, int, int]] | None:
    """A size word and an inclusive pixel box (x0, y0, x1, y1) clear of `boxes` by one pixel."""
    for _ in range(100):
        size_word = rng.choice(list(SIZES))
        low, high = SIZES[size_word]
        edge = rng.randint(round(low * image_size), round(high * image_size))
        x0 = rng.randint(0, image_size - edge)
        y0 = rng.randint(0, image_size - edge)
        box = (x0, y0, x0 + edge - 1, y0 + edge - 1)
        if all(box[0] > b[2] + 1 or box[2] < b[0] - 1 or box[1] > b[3] + 1 or box[3] < b[1] - 1 for b in boxes):
            return size_word, box
    return None


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(f"unknown shape {shape!r}")


def encode_mask(mask: np.ndarray) -> dict:
    """Row-major run lengths of a boolean (H, W) mask: {"size": [H, W], "counts": [...]}.

    `counts` alternates background and foreground runs over the flattened mask, starting with
    a (possibly empty) background run. (COCO's uncompressed RLE is column-major; this is not.)
    """
    flat = np.asarray(mask, dtype=bool).reshape(-1)
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def decode_mask(rle: dict) -> np.ndarray:
    """Inverse of `encode_mask`: a boolean array of shape `rle["size"]` (H, W)."""
    height, width = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != height * width:
        raise DataError(f"mask run lengths sum to {int(counts.sum())}, expected {height}x{width}")
    values = np.arange(len(counts)) % 2 == 1  # odd runs are foreground
    return np.repeat(values, counts).reshape(height, width)


def _to_shard_sample(sample: dict, split: str, index: int, seed: int) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(sample["pixels"]).save(buffer, format="PNG")
    height, width = sample["pixels"].shape[:2]
    meta = {
        "generated": True,
        "generator": "vlp shapes (data_pipelines/sources/shapes.py)",
        "seed": seed,
        "split": split,
        "index": index,
        "width": width,
        "height": height,
        "caption": sample["caption"],
        "objects": sample["objects"],
    }
    return {"__key__": f"{split}{index:06d}", "png": buffer.getvalue(), "txt": sample["caption"], "json": meta}
