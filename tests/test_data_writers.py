"""Shard writers: folder, csv/tsv and the sklearn digits source, read back with plain tarfile."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_tar
from PIL import Image

from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.sources import SOURCES, build
from vlp.data_pipelines.sources.digits import (
    DIGIT_CLASSNAMES,
    DIGIT_TEMPLATES,
    GENERIC_CAPTIONS,
    split_test,
)


def read_dir(out: Path, pattern: str = "*.tar") -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(out.glob(pattern)):
        samples.update(read_tar(path))
    return samples


def save_image(path: Path, color: tuple[int, int, int], fmt: str) -> None:
    Image.new("RGB", (6, 4), color).save(path, format=fmt)


def test_sources_registered():
    assert {"folder", "csv", "tsv", "digits"} <= set(SOURCES.names())


def test_folder_source(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    save_image(root / "a.jpg", (255, 0, 0), "JPEG")
    save_image(root / "sub" / "b.png", (0, 255, 0), "PNG")
    save_image(root / "c.webp", (0, 0, 255), "WEBP")
    (root / "a.txt").write_text("a red box\n")
    (root / "sub" / "b.txt").write_text("a green box")
    (root / "c.txt").write_text("a blue box")
    (root / "sub" / "b.json").write_text(json.dumps({"license": "cc0"}))
    summary = build("folder:" + str(root), tmp_path / "out", shard_size=2)
    assert summary["counts"] == {"train": 3}
    assert len(summary["shards"]) == 2
    samples = read_dir(tmp_path / "out")
    by_caption = {s["txt"].decode(): s for s in samples.values()}
    assert set(by_caption) == {"a red box", "a green box", "a blue box"}
    assert "jpg" in by_caption["a red box"] and "png" in by_caption["a green box"]
    # WebP is stored losslessly as PNG (img2dataset's jpg|png convention).
    blue = Image.open(io.BytesIO(by_caption["a blue box"]["png"]))
    assert blue.format == "PNG" and blue.size == (6, 4)
    meta = json.loads(by_caption["a green box"]["json"])
    assert meta["license"] == "cc0" and meta["source_path"] == "sub/b.png" and (meta["width"], meta["height"]) == (6, 4)
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sum(sizes.values()) == 3


def test_folder_missing_caption_names_file(tmp_path):
    save_image(tmp_path / "x.png", (1, 2, 3), "PNG")
    with pytest.raises(DataError, match=r"x\.png has no caption file x\.txt") as info:
        build(f"folder:{tmp_path}", tmp_path / "out")
    assert "\n" not in str(info.value)


def _table(tmp_path: Path, delimiter: str, header: tuple[str, str]) -> Path:
    (tmp_path / "img").mkdir()
    save_image(tmp_path / "img" / "one.png", (10, 10, 10), "PNG")
    save_image(tmp_path / "two.jpg", (20, 20, 20), "JPEG")
    rows = [header, ("img/one.png", "first caption"), (str(tmp_path / "two.jpg"), "second caption")]
    table = tmp_path / ("pairs.tsv" if delimiter == "\t" else "pairs.csv")
    table.write_text("\n".join(delimiter.join(row) for row in rows) + "\n")
    return table


@pytest.mark.parametrize("kind,delimiter,header,options", [
    ("csv", ",", ("filepath", "title"), {}),
    ("tsv", "\t", ("image", "caption"), {}),
    ("csv", ",", ("path", "text"), {"image_col": "path", "caption_col": "text"}),
])
def test_table_sources(tmp_path, kind, delimiter, header, options):
    table = _table(tmp_path, delimiter, header)
    summary = build(f"{kind}:{table}", tmp_path / "out", **options)
    assert summary["counts"] == {"train": 2}
    samples = read_dir(tmp_path / "out")
    captions = sorted(s["txt"].decode() for s in samples.values())
    assert captions == ["first caption", "second caption"]
    first = next(s for s in samples.values() if s["txt"] == b"first caption")
    # The relative path was resolved against the table's folder: the bytes are that file's.
    assert first["png"] == (tmp_path / "img" / "one.png").read_bytes()


def test_table_missing_image_names_file_and_row(tmp_path):
    table = tmp_path / "pairs.csv"
    save_image(tmp_path / "ok.png", (0, 0, 0), "PNG")
    table.write_text("filepath,title\nok.png,fine\nmissing.png,gone\n")
    with pytest.raises(DataError, match=r"pairs\.csv row 2: image file .*missing\.png not found") as info:
        build(f"csv:{table}", tmp_path / "out")
    assert "\n" not in str(info.value)


def test_table_unknown_column(tmp_path):
    table = tmp_path / "pairs.csv"
    table.write_text("file,words\n")
    with pytest.raises(DataError, match="none of the columns"):
        build(f"csv:{table}", tmp_path / "out")


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    build("digits", out, image_size=16, seed=0)
    return out


def _pixels(sample: dict[str, bytes]) -> bytes:
    return np.asarray(Image.open(io.BytesIO(sample["png"]))).tobytes()


def test_digits_splits(digits_dir):
    train, test = read_dir(digits_dir, "digits-train-*.tar"), read_dir(digits_dir, "digits-test-*.tar")
    assert len(train) + len(test) == 1797  # sklearn's bundled digits
    assert not set(train) & set(test)
    metas = {split: [json.loads(s["json"]) for s in samples.values()] for split, samples in (("train", train), ("test", test))}
    for split, items in metas.items():
        assert {m["split"] for m in items} == {split}
    train_index = {m["source_index"] for m in metas["train"]}
    test_index = {m["source_index"] for m in metas["test"]}
    assert not train_index & test_index and len(train_index | test_index) == 1797
    # No pixel-identical image on both sides (compared on the decoded PNGs).
    assert not {_pixels(s) for s in train.values()} & {_pixels(s) for s in test.values()}
    # Stratified: every class in both splits, ~20% of each class in test.
    train_counts = Counter(m["label"] for m in metas["train"])
    test_counts = Counter(m["label"] for m in metas["test"])
    assert set(train_counts) == set(test_counts) == set(range(10))
    for label in range(10):
        assert abs(test_counts[label] / (test_counts[label] + train_counts[label]) - 0.2) < 0.02


def test_digits_labels_captions_and_images(digits_dir):
    from sklearn.datasets import load_digits

    reference = load_digits()
    samples = read_dir(digits_dir)
    named_numeral, named_word = Counter(), Counter()
    for sample in samples.values():
        meta = json.loads(sample["json"])
        label = int(sample["cls"])
        assert label == meta["label"] == reference.target[meta["source_index"]]
        assert meta["class_name"] == DIGIT_CLASSNAMES[label]
        image = Image.open(io.BytesIO(sample["png"]))
        assert image.size == (16, 16) and image.mode == "RGB"
        # Nearest upscaling: every 2x2 block is one source pixel (0..16 scaled to 0..255).
        pixels = np.asarray(image)[::2, ::2, 0].astype(float)
        np.testing.assert_allclose(pixels, reference.images[meta["source_index"]] * 255 / 16, atol=0.51)
        caption = sample["txt"].decode()
        words = caption.replace(",", " ").replace("(", " ").replace(")", " ").split()
        assert str(label) in words or DIGIT_CLASSNAMES[label] in words, caption
        named_numeral[label] += str(label) in words
        named_word[label] += DIGIT_CLASSNAMES[label] in words
    assert all(named_numeral[c] > 0 and named_word[c] > 0 for c in range(10))


def test_digits_eval_layout(digits_dir):
    assert (digits_dir / "classnames.txt").read_text().split("\n")[:10] == DIGIT_CLASSNAMES
    templates = (digits_dir / "zeroshot_classification_templates.txt").read_text().strip().split("\n")
    assert templates == DIGIT_TEMPLATES and all("{c}" in t for t in templates)
    sizes = json.loads((digits_dir / "sizes.json").read_text())
    for path in digits_dir.glob("*.tar"):
        assert sizes[path.name] == len(read_tar(path))


def test_digits_hierarchical_and_deterministic(tmp_path):
    build("digits", tmp_path / "a", image_size=8, caption_style="hierarchical", seed=3, mode="L")
    build("digits", tmp_path / "b", image_size=8, caption_style="hierarchical", seed=3, mode="L")
    first, second = read_dir(tmp_path / "a"), read_dir(tmp_path / "b")
    assert {k: s["txt"] for k, s in first.items()} == {k: s["txt"] for k, s in second.items()}
    generic = sum(s["txt"].decode() in GENERIC_CAPTIONS for s in first.values())
    assert 0.28 < generic / len(first) < 0.39
    assert Image.open(io.BytesIO(next(iter(first.values()))["png"])).mode == "L"


def test_digits_parent_captions_keep_the_plain_captions_and_reach_the_batch(tmp_path):
    """caption_style=parent: the specific captions are exactly the plain build's, each sample also
    carries a generic parent caption, and the loader hands it over as batch["parent_text"]."""
    from vlp.data_pipelines.config import DataConfig
    from vlp.data_pipelines.loader import build_train_loader
    from vlp.models.towers.text import OpenClipTokenizer

    build("digits", tmp_path / "plain", image_size=8, seed=3)
    build("digits", tmp_path / "parent", image_size=8, seed=3, caption_style="parent")
    plain, parent = read_dir(tmp_path / "plain"), read_dir(tmp_path / "parent")
    assert {k: s["txt"] for k, s in plain.items()} == {k: s["txt"] for k, s in parent.items()}
    parents = [s["parent.txt"].decode() for s in parent.values()]
    assert set(parents) == set(GENERIC_CAPTIONS) and "parent.txt" not in next(iter(plain.values()))

    cfg = DataConfig(train=[{"urls": str(tmp_path / "parent" / "digits-train-{000000..000002}.tar")}],
                     workers=0, parent_caption_key="parent.txt")
    loader = build_train_loader(cfg, preprocess=lambda image: torch.zeros(1), tokenizer=OpenClipTokenizer(12),
                                batch_size=16, rank=0, world_size=1, seed=0)
    batch = next(loader.iterate(0))
    assert batch["parent_text"].shape == (16, 1, 12)
    assert all(json.loads(json.dumps(m))["parent_caption"] == p for m, p in zip(batch["meta"], batch["parent_caption"]))
    assert torch.equal(batch["parent_text"][:, 0], OpenClipTokenizer(12)(batch["parent_caption"]))
    # A shard without the key: every sample is bad for lack of the field, named as such.
    cfg = DataConfig(train=[{"urls": str(tmp_path / "plain" / "digits-train-{000000..000002}.tar")}],
                     workers=0, parent_caption_key="parent.txt", max_bad_fraction=0.5, bad_window=20)
    with pytest.raises(DataError, match="missing_field"):
        next(build_train_loader(cfg, preprocess=lambda image: torch.zeros(1), tokenizer=OpenClipTokenizer(12),
                                batch_size=16, rank=0, world_size=1, seed=0).iterate(0))


def test_split_test_keeps_duplicates_on_one_side():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 17, size=(200, 8, 8)).astype(np.uint8)
    labels = np.arange(200) % 4
    for source, copy in [(0, 1), (2, 150), (7, 8), (7, 9)]:  # same class and cross-class copies
        images[copy] = images[source]
    for seed in range(5):
        test = split_test(images, labels, 0.3, seed)
        for source, copy in [(0, 1), (2, 150), (7, 8), (7, 9)]:
            assert test[source] == test[copy]
        assert 0.25 < test.mean() < 0.35


def test_write_shards_failure_leaves_no_partial_shard(tmp_path):
    from vlp.data_pipelines.shards import write_shards

    def samples():
        for index in range(5):
            yield {"__key__": f"k{index}", "txt": "x"}
        raise DataError("bad row 6")

    with pytest.raises(DataError, match="bad row 6"):
        write_shards(samples(), tmp_path, "p", max_count=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p-000000.tar", "p-000001.tar", "sizes.json"]
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"p-000000.tar": 2, "p-000001.tar": 2}


def test_ensure_built_refuses_a_folder_built_with_other_options(tmp_path):
    """A config's `build` writes a stamp of its source and options; another config pointing at
    the same folder with other options gets a one-line error instead of the stale shards."""
    import json as _json

    from vlp.data_pipelines.errors import DataError
    from vlp.train.data import STAMP, ensure_built

    spec = str(tmp_path / "d" / "digits-train-000000.tar")
    options = {"image_size": 8, "caption_style": "hierarchical", "generic_fraction": 0.15}
    ensure_built(spec, "digits", str(tmp_path / "d"), options, is_main=True)
    assert _json.loads((tmp_path / "d" / STAMP).read_text()) == {"source": "digits", "options": options}
    ensure_built(spec, "digits", str(tmp_path / "d"), dict(options), is_main=True)  # same options: fine
    with pytest.raises(DataError, match=r"built as digits with options .*generic_fraction.*0\.15.*remove"):
        ensure_built(spec, "digits", str(tmp_path / "d"), {**options, "generic_fraction": 0.3}, is_main=True)
