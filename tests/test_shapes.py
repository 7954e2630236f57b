"""The generated multi-object `shapes` source: masks, captions, splits, determinism."""

from __future__ import annotations

import hashlib
import io
import json
import random

import numpy as np
import pytest
from conftest import read_tar
from PIL import Image

from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.sources import SOURCES, build
from vlp.data_pipelines.sources.shapes import (
    BACKGROUND,
    COLORS,
    decode_mask,
    encode_mask,
    render_sample,
)

OPTIONS = dict(train_size=40, test_size=12, shard_size=16, image_size=64)


def _split(out_dir, split):
    samples = {}
    for path in sorted(out_dir.glob(f"shapes-{split}-*.tar")):
        samples.update(read_tar(path))
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


# --------------------------------------------------------------------------------------------
# The grounding evaluator's geometry and metrics


def test_mask_to_patches_follows_the_eval_resize_and_crop():
    import torch

    from vlp.train.evals.grounding import mask_to_patches, object_patches

    mask = np.zeros((64, 64), dtype=bool)
    mask[8:16, 16:24] = True  # exactly patch (row 1, col 2) of an 8 x 8 grid
    mask[40:44, 0:8] = True  # half of patch (5, 0)
    coverage = mask_to_patches(mask, 64, 8)
    expected = torch.zeros(64)
    expected[1 * 8 + 2], expected[5 * 8 + 0] = 1.0, 0.5
    torch.testing.assert_close(coverage, expected)
    # A 32 x 48 source: short side resized to 64 (x2), then the 96-wide image centre-cropped by 16 px.
    small = np.zeros((32, 48), dtype=bool)
    small[4:8, 16:20] = True  # -> rows 8:16, cols 32:40 before the crop, 16:24 after
    torch.testing.assert_close(mask_to_patches(small, 64, 8), torch.eye(64)[1 * 8 + 2])
    # An object that half-covers no patch owns its best-covered patches.
    tiny = torch.zeros(64)
    tiny[3], tiny[4] = 0.25, 0.1
    assert object_patches(tiny).nonzero().flatten().tolist() == [3]


def test_pointing_iou_and_recall_on_hand_made_maps():
    import torch

    from vlp.train.evals.grounding import pointing_and_iou, recall_at

    maps = torch.tensor([[0.0, 1.0, 0.9, 0.0], [1.0, 0.0, 0.0, 0.2]])
    targets = torch.tensor([[False, True, True, False], [False, False, True, True]])
    hit, iou = pointing_and_iou(maps, targets, 0.5)
    assert hit.tolist() == [True, False]
    # row 0: predicted {1, 2} = target -> 1; row 1: predicted {0}, target {2, 3} -> 0.
    torch.testing.assert_close(iou, torch.tensor([1.0, 0.0]))
    scores = torch.tensor([[0.9, 0.1], [0.5, 0.8], [0.1, 0.7]])  # 3 images x 2 queries
    positives = torch.tensor([[False, False], [True, False], [False, True]])
    assert recall_at(scores, positives, (1, 2)) == {1: 0.0, 2: 1.0}


def test_grounding_evaluator_end_to_end(tmp_path):
    import torch

    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config
    from vlp.train.evals import EVALUATORS, EvalContext

    build("shapes", tmp_path / "data", train_size=1, test_size=6, shard_size=10)
    tree = {
        "name": "t",
        "data": {"train": [{"urls": str(tmp_path / "data/shapes-train-000000.tar")}], "sub_captions": 2},
        "model": {
            "embed_dim": 32,
            "image": {"type": "open_clip_vit", "image_size": 64, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
            "text": {"type": "open_clip_text", "context_length": 40, "width": 32, "heads": 2, "layers": 1},
            "heads": {"flair": {"num_heads": 2}, "filip": {}},
        },
        "train": {"steps": 1, "batch_size": 2},
    }
    torch.manual_seed(0)
    model = VLPModel(load_config(tree=tree).model).eval()
    data = str(tmp_path / "data/shapes-test-000000.tar")
    results = {}
    for method in ("auto", "filip", "patch"):
        evaluator = EVALUATORS.get("grounding")(EVALUATORS.get("grounding").config_class(
            type="grounding", data=data, batch_size=4, method=method, prefix=f"{method}_"))
        with torch.no_grad():
            results.update(evaluator.run(model, EvalContext(out_dir=tmp_path / "plots")))
    pairs = sum(len(json.loads(f["json"])["objects"]) for f in _split(tmp_path / "data", "test").values())
    for method in ("auto", "filip", "patch"):
        assert results[f"{method}_pairs"] == pairs
        for metric in ("pointing_acc", "miou", "retrieval_r1", "retrieval_r5"):
            assert 0.0 <= results[f"{method}_{metric}"] <= 1.0
        assert results[f"{method}_retrieval_r5"] >= results[f"{method}_retrieval_r1"]
    assert (tmp_path / "plots/grounding_flair_step000000.png").exists()
    assert (tmp_path / "plots/grounding_patch_step000000.png").exists()
