"""The generated multi-object `shapes` source: masks, captions, splits, determinism."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_pipelines.errors import DataError
from data_pipelines.sources import SOURCES, build
from data_pipelines.sources.shapes import BACKGROUND, COLORS, decode_mask, encode_mask, render_sample

OPTIONS = dict(train_size=40, test_size=12, shard_size=16, image_size=64)


def _read(tar_path):
    """{key: {ext: bytes}} of one shard, read with tarfile (independent of the writer)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _split(out_dir, split):
    samples = {}
    for path in sorted(out_dir.glob(f"shapes-{split}-*.tar")):
        samples.update(_read(path))
    return samples


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    summary = build("shapes", out, **OPTIONS)
    return out, summary


def test_registered_and_named_by_split(shards):
    out, summary = shards
    assert "shapes" in SOURCES
    assert summary["generated"] is True
    assert (out / "shapes-train-000000.tar").exists() and (out / "shapes-test-000000.tar").exists()
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(v for k, v in sizes.items() if k.startswith("shapes-train")) == 40
    assert sum(v for k, v in sizes.items() if k.startswith("shapes-test")) == 12


def test_masks_are_the_drawn_pixels_and_captions_name_each_object(shards):
    out, _ = shards
    for key, files in list(_split(out, "train").items()) + list(_split(out, "test").items()):
        meta = json.loads(files["json"])
        assert meta["generated"] is True
        pixels = np.asarray(Image.open(io.BytesIO(files["png"])).convert("RGB"))
        caption = files["txt"].decode()
        assert 2 <= len(meta["objects"]) <= 4
        covered = np.zeros(pixels.shape[:2], dtype=bool)
        for obj in meta["objects"]:
            mask = decode_mask(obj["mask"])
            assert mask.any(), key
            assert not (mask & covered).any(), f"{key}: masks overlap"
            covered |= mask
            # Every mask pixel has the object's colour ...
            assert (pixels[mask] == COLORS[obj["color"]]).all(), f"{key}: {obj['sentence']}"
            assert obj["sentence"] in caption
            for word in (obj["size"], obj["color"], obj["shape"]):
                assert word in obj["sentence"]
        # ... and every pixel outside all masks is background: nothing drawn is unaccounted for.
        assert (pixels[~covered] == BACKGROUND).all(), key
        assert caption == " ".join(obj["sentence"] for obj in meta["objects"])


def test_place_word_matches_box_centre(shards):
    out, _ = shards
    for files in _split(out, "test").values():
        for obj in json.loads(files["json"])["objects"]:
            ys, xs = np.nonzero(decode_mask(obj["mask"]))
            x0, y0, x1, y1 = obj["bbox"]
            assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
            row = min(2, int(3 * ((y0 + y1 - 1) / 2) / 64))
            col = min(2, int(3 * ((x0 + x1 - 1) / 2) / 64))
            words = set(obj["place"].split())
            assert ("top" in words, "bottom" in words) == (row == 0, row == 2), obj
            assert ("left" in words, "right" in words) == (col == 0, col == 2), obj


def test_splits_disjoint_and_build_deterministic(shards, tmp_path):
    out, _ = shards
    train, test = _split(out, "train"), _split(out, "test")
    train_pixels = {hashlib.sha1(f["png"]).hexdigest() for f in train.values()}
    assert not any(hashlib.sha1(f["png"]).hexdigest() in train_pixels for f in test.values())
    assert not set(train) & set(test)
    again = tmp_path / "again"
    build("shapes", again, **OPTIONS)
    assert _split(again, "train") == train and _split(again, "test") == test
    other = tmp_path / "other"
    build("shapes", other, **{**OPTIONS, "seed": 1})
    assert _split(other, "test") != test


def test_rle_round_trip_and_image_size_option():
    rng = np.random.default_rng(0)
    for shape in ((5, 7), (1, 1), (3, 3)):
        mask = rng.random(shape) > 0.5
        np.testing.assert_array_equal(decode_mask(encode_mask(mask)), mask)
    np.testing.assert_array_equal(decode_mask(encode_mask(np.ones((2, 2), bool))), np.ones((2, 2), bool))
    sample = render_sample(random.Random(0), 96, 2, 4)
    assert sample["pixels"].shape == (96, 96, 3)
    assert decode_mask(sample["objects"][0]["mask"]).shape == (96, 96)


def test_bad_options_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="shapes: option image_sise"):
        build("shapes", tmp_path, image_sise=64)
    with pytest.raises(DataError, match="min_objects=5 exceeds max_objects=4"):
        build("shapes", tmp_path, min_objects=5)
    with pytest.raises(DataError, match="takes no argument"):
        build("shapes:x", tmp_path)
