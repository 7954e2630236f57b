"""The webdataset loaders on tiny tars built here: determinism, rank split, resume, mixing,
bad samples, sub-captions and sentences; plus the text utilities and the bad-sample rule."""

from __future__ import annotations

import io
import itertools
import json
import random
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.data_pipelines.bad_samples import BadSampleMonitor
from vlp.data_pipelines.config import DataConfig
from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.loader import build_eval_loader, build_train_loader
from vlp.data_pipelines.sharding import check_urls
from vlp.data_pipelines.shards import write_shards
from vlp.data_pipelines.text import (
    sample_sub_captions,
    split_report_sections,
    split_sentences,
)

TEXT_LEN = 96


class ByteTokenizer:
    """Reversible test tokenizer: UTF-8 bytes padded with zeros to TEXT_LEN."""

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), TEXT_LEN, dtype=torch.long)
        for row, text in enumerate(texts):
            data = text.encode()[:TEXT_LEN]
            out[row, : len(data)] = torch.tensor(list(data), dtype=torch.long)
        return out


def detokenize(tokens: torch.Tensor) -> list[str]:
    return [bytes(t for t in row.tolist() if t).decode() for row in tokens.reshape(-1, TEXT_LEN)]


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255  # (C, H, W)


class NoisyTransform:
    """A random augmentation drawing from torch's global RNG (like RandomResizedCrop)."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return to_tensor(image) + torch.rand(1)


def png(index: int, size: int = 4) -> bytes:
    """A tiny PNG whose pixels encode `index`, so images of different samples differ."""
    pixels = np.full((size, size, 3), 0, dtype=np.uint8)
    pixels[..., 0], pixels[..., 1] = index % 251, index // 251
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png() -> bytes:
    """A valid 1x1 PNG whose header declares 100000 x 100000 pixels (CRC fixed up)."""
    data = bytearray(png(0, size=1))
    ihdr = 8  # after the PNG signature: length (4) + b"IHDR" (4) + data (13) + crc (4)
    data[ihdr + 8: ihdr + 16] = struct.pack(">II", 100_000, 100_000)
    data[ihdr + 21: ihdr + 25] = struct.pack(">I", zlib.crc32(bytes(data[ihdr + 4: ihdr + 21])))
    return bytes(data)


def write(out: Path, prefix: str, counts: list[int], start: int = 0, caption=None, cls: bool = True) -> str:
    """Shards `out/{prefix}-{i:06d}.tar` with `counts[i]` good samples each; returns the brace spec."""
    index = start
    for shard, count in enumerate(counts):
        samples = []
        for _ in range(count):
            text = caption(index) if caption else f"{prefix} sample {index}"
            sample = {"__key__": f"{prefix}{index:05d}", "png": png(index), "txt": text,
                      "json": {"index": index, "prefix": prefix}}
            if cls:
                sample["cls"] = index % 3
            samples.append(sample)
            index += 1
        write_shards(samples, out, f"{prefix}-s{shard:02d}")
    names = [f"{prefix}-s{shard:02d}-000000.tar" for shard in range(len(counts))]
    return "::".join(str(out / name) for name in names)


def train_loader(urls, *, batch_size=4, rank=0, world_size=1, seed=0, preprocess=to_tensor, **cfg):
    config = DataConfig(train=urls if isinstance(urls, list) else [{"urls": urls}], **{"workers": 0, **cfg})
    return build_train_loader(config, preprocess=preprocess, tokenizer=ByteTokenizer(), batch_size=batch_size,
                              rank=rank, world_size=world_size, seed=seed)


def keys(batches) -> list[list[str]]:
    return [batch["key"] for batch in batches]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a["key"] == b["key"]
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
        assert torch.equal(a["text"], b["text"])
        for name in ("sub_text", "sentences"):
            if name in a:
                assert torch.equal(a[name], b[name])


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def test_batch_fields(tmp_path):
    urls = write(tmp_path, "a", [6])
    loader = train_loader(urls, batch_size=3, shuffle_buffer=0)
    batches = list(loader.iterate(0))
    assert loader.batches_per_epoch == 2 and len(batches) == 2
    batch = batches[0]
    assert batch["image"].shape == (3, 3, 4, 4) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (3, TEXT_LEN) and batch["label"].dtype == torch.long
    assert detokenize(batch["text"]) == batch["caption"]
    for key, caption, label, meta, image in zip(batch["key"], batch["caption"], batch["label"], batch["meta"], batch["image"]):
        index = int(key[1:])
        assert caption == f"a sample {index}" and label == index % 3 and meta == {"index": index, "prefix": "a"}
        assert image[0, 0, 0].item() == pytest.approx(index / 255)
    assert batch["bad"] == dict.fromkeys(batch["bad"], 0) and batch["bad_shards"] == []


def test_label_defaults_to_minus_one(tmp_path):
    urls = write(tmp_path, "a", [4], cls=False)
    batch = next(train_loader(urls, batch_size=4).iterate(0))
    assert batch["label"].tolist() == [-1] * 4


def _bad_shards(tmp_path: Path) -> tuple[str, set[str]]:
    good = {"__key__": "good0", "png": png(1), "txt": "fine"}
    samples = [
        good,
        {"__key__": "corrupt", "png": b"\x89PNG\r\n\x1a\n garbage", "txt": "broken image"},
        {"__key__": "empty", "png": png(2), "txt": "   "},
        {"__key__": "latin1", "png": png(3), "txt": "caf\xe9".encode("latin-1")},
        {"__key__": "bomb", "png": bomb_png(), "txt": "huge"},
        {"__key__": "nocaption", "png": png(4)},
        {"__key__": "noimage", "txt": "no image"},
        {"__key__": "good1", "png": png(5), "txt": "also fine"},
    ]
    write_shards(samples, tmp_path, "mixed")
    write_shards([{"__key__": f"t{i}", "png": png(10 + i), "txt": f"t {i}"} for i in range(6)], tmp_path, "trunc")
    truncated = tmp_path / "trunc-000000.tar"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # samples t0..t2 survive (1024 bytes each)
    return f"{tmp_path}/mixed-000000.tar::{truncated}", {"good0", "good1", "t0", "t1", "t2"}


def test_eval_loader_skips_and_counts_bad_samples(tmp_path):
    urls, good = _bad_shards(tmp_path)
    batches = list(build_eval_loader(urls, preprocess=to_tensor, tokenizer=ByteTokenizer(), batch_size=2))
    assert {key for batch in batches for key in batch["key"]} == good
    bad = Counter()
    for batch in batches:
        bad.update(batch["bad"])
    assert bad == Counter(bad_image=1, image_too_large=1, empty_caption=1, bad_caption=1, missing_field=2, bad_shard=1)
    shards = {shard for batch in batches for shard in batch["bad_shards"]}
    assert shards == {f"{tmp_path}/mixed-000000.tar", f"{tmp_path}/trunc-000000.tar"}


def test_max_image_pixels_applies(tmp_path):
    urls = write(tmp_path, "a", [4])
    config = DataConfig(train=[{"urls": urls}], workers=0, max_image_pixels=15, bad_window=20)  # images are 4x4 = 16 px
    loader = build_train_loader(config, preprocess=to_tensor, tokenizer=ByteTokenizer(), batch_size=1, rank=0,
                                world_size=1, seed=0)
    with pytest.raises(DataError, match=r"bad samples in a row \(image_too_large="):
        list(loader.iterate(0))


def test_train_loader_survives_bad_samples(tmp_path):
    urls, good = _bad_shards(tmp_path)
    loader = train_loader(urls, batch_size=2, workers=2, shuffle_buffer=4)
    batches = list(loader.iterate(0))
    # sizes.json still counts the truncated shard's 6 samples; the short stream is padded by cycling.
    assert len(batches) == loader.batches_per_epoch == (8 + 6) // 2
    assert {key for batch in batches for key in batch["key"]} <= good
    assert sum(sum(batch["bad"].values()) for batch in batches) > 0


def test_all_bad_stream_fails_instead_of_hanging(tmp_path):
    samples = [{"__key__": f"k{i}", "png": b"not an image", "txt": "x"} for i in range(5)]
    write_shards(samples, tmp_path, "bad")
    loader = train_loader(str(tmp_path / "bad-000000.tar"), batch_size=2, bad_window=20, workers=1)
    with pytest.raises(DataError, match=r"bad samples in a row \(bad_image=20\) in shards .*bad-000000\.tar"):
        list(loader.iterate(0))


def test_missing_shard_fails_before_training(tmp_path):
    urls = write(tmp_path, "a", [2])
    config = DataConfig(train=[{"urls": urls + f"::{tmp_path}/../nowhere/b-{{000..001}}.tar"}])
    with pytest.raises(DataError, match=r"^data\.train\[0\]\.urls: shard .*nowhere/b-000\.tar not found$"):
        check_urls(config)
    with pytest.raises(DataError, match="not found"):
        build_train_loader(config, preprocess=to_tensor, tokenizer=ByteTokenizer(), batch_size=1, rank=0,
                           world_size=1, seed=0)


def test_paths_with_dotdot_are_fine(tmp_path):
    (tmp_path / "x").mkdir()
    write(tmp_path, "a", [2])
    urls = f"{tmp_path}/x/../a-s00-000000.tar"
    check_urls(DataConfig(train=[{"urls": urls}]))
    assert len(list(train_loader(urls, batch_size=1).iterate(0))) == 2


# --------------------------------------------------------------------------------------------
# Determinism, ranks, resume
# --------------------------------------------------------------------------------------------


def test_deterministic_with_workers(tmp_path):
    urls = write(tmp_path, "a", [7, 5, 9, 4])
    runs = [list(train_loader(urls, batch_size=3, workers=2, shuffle_buffer=8, seed=1,
                              preprocess=NoisyTransform()).iterate(2)) for _ in range(2)]
    assert_same_batches(*runs)
    other_epoch = list(train_loader(urls, batch_size=3, workers=2, shuffle_buffer=8, seed=1).iterate(3))
    assert keys(other_epoch) != keys(runs[0])
    # Shuffled: not the order the samples were written in.
    assert sum(keys(runs[0]), []) != sorted(sum(keys(runs[0]), []))


@pytest.mark.parametrize("counts,world_size,workers", [([12, 12, 12, 12], 2, 2), ([16], 2, 1), ([9, 7], 2, 2)])
def test_ranks_disjoint_and_complete(tmp_path, counts, world_size, workers):
    urls = write(tmp_path, "a", counts)
    total = sum(counts)
    batch_size = 2 if total % (world_size * 2) == 0 else 1
    per_rank = [
        sum(keys(train_loader(urls, batch_size=batch_size, rank=rank, world_size=world_size, workers=workers,
                              shuffle_buffer=5).iterate(0)), [])
        for rank in range(world_size)
    ]
    everything = sum(per_rank, [])
    assert len(everything) == len(set(everything)) == total  # each sample on exactly one rank


def test_equal_batches_per_epoch_with_uneven_shards(tmp_path):
    counts = [20, 3, 5, 1]
    urls = write(tmp_path, "a", counts)
    lengths = []
    for rank in range(3):
        loader = train_loader(urls, batch_size=3, rank=rank, world_size=3, workers=2)
        assert loader.batches_per_epoch == sum(counts) // (3 * 3)
        lengths.append(len(list(loader.iterate(0))))
    assert lengths == [sum(counts) // 9] * 3


def test_batches_per_epoch_without_sizes_json(tmp_path):
    urls = write(tmp_path, "a", [5, 6])
    (tmp_path / "sizes.json").unlink()
    assert train_loader(urls, batch_size=2).batches_per_epoch == 5


@pytest.mark.parametrize("workers,skip", [(0, 3), (2, 3), (2, 4), (2, 0)])
def test_resume_skip_equivalence(tmp_path, workers, skip):
    urls = write(tmp_path, "a", [9, 8, 7], caption=lambda i: f"Sentence {i}. Second {i}. Third one.")
    def make():
        return train_loader(urls, batch_size=3, workers=workers, shuffle_buffer=6, seed=4,
                            preprocess=NoisyTransform(), sub_captions=2, sentences=2)
    fresh = list(make().iterate(1))
    resumed = list(make().iterate(1, skip_batches=skip))
    assert len(fresh) == make().batches_per_epoch
    assert_same_batches(fresh[skip:], resumed)


def test_resampled_mode_runs_past_one_epoch(tmp_path):
    urls = write(tmp_path, "a", [4, 4])
    loader = train_loader(urls, batch_size=3, mode="resampled", workers=2, shuffle_buffer=3)
    assert loader.batches_per_epoch is None
    stream = loader.iterate(0)
    batches = [next(stream) for _ in range(10)]  # 30 samples from 8
    seen = Counter(key for batch in batches for key in batch["key"])
    assert sum(seen.values()) == 30 and max(seen.values()) > 1
    again = loader.iterate(0)
    assert keys(batches) == keys([next(again) for _ in range(10)])


def test_weighted_mixing(tmp_path):
    sources = [{"urls": write(tmp_path, "a", [10, 10]), "weight": 3.0},
               {"urls": write(tmp_path, "b", [10, 10]), "weight": 1.0}]
    for mode in ("epoch", "resampled"):
        loader = train_loader(sources, batch_size=20, mode=mode, workers=0 if mode == "epoch" else 2, shuffle_buffer=4)
        # Epoch mode: 40 samples = 2 batches an epoch, so 10 epochs; resampled: 20 batches of epoch 0.
        epochs = [loader.iterate(epoch) for epoch in range(10)] if mode == "epoch" else [loader.iterate(0)]
        batches = [batch for stream in epochs for batch in itertools.islice(stream, 20)]
        assert len(batches) == 20
        counts = Counter(meta["prefix"] for batch in batches for meta in batch["meta"])
        # 400 draws at p = 0.75: the standard deviation of the fraction is ~0.022.
        assert abs(counts["a"] / 400 - 0.75) < 0.08, (mode, counts)


def test_sub_captions_and_sentences(tmp_path):
    caption = lambda i: f"FINDINGS: Nodule of 3.5 cm in case {i}. No effusion. IMPRESSION: Stable {i}."
    urls = write(tmp_path, "a", [8], caption=caption)
    make = lambda seed: train_loader(urls, batch_size=4, sub_captions=3, sentences=4, seed=seed, workers=2)
    first, second = list(make(0).iterate(0)), list(make(0).iterate(0))
    assert_same_batches(first, second)
    batch = first[0]
    assert batch["sub_text"].shape == (4, 3, TEXT_LEN) and batch["sentences"].shape == (4, 4, TEXT_LEN)
    for row, key in enumerate(batch["key"]):
        index = int(key[1:])
        sentences = [f"Nodule of 3.5 cm in case {index}.", "No effusion.", f"Stable {index}."]
        assert detokenize(batch["sentences"][row])[:3] == sentences
        assert batch["sentence_mask"][row].tolist() == [True, True, True, False]
        for sub in detokenize(batch["sub_text"][row]):
            # Each sub-caption is 1-3 of the sentences, in reading order.
            parts = [s for s in sentences if s in sub]
            assert 1 <= len(parts) <= 3 and sub == " ".join(parts)
    other = list(make(1).iterate(0))
    assert any(not torch.equal(a["sub_text"], b["sub_text"]) for a, b in zip(first, other))
    # The ct_align head's normal-sentence flags are about the sentences this loader sends.
    from vlp.models.heads.ct_align import sentence_normal_flags

    assert sentence_normal_flags(batch, 4).tolist() == [[False, True, False, False]] * 4


def test_wants_sample_preprocess_gets_raw_bytes(tmp_path):
    urls = write(tmp_path, "a", [4])

    class RawPreprocess:
        wants_sample = True

        def __call__(self, sample: dict) -> torch.Tensor:
            assert isinstance(sample["png"], bytes) and "__key__" in sample
            return torch.tensor([float(len(sample["png"]))])

    batch = next(train_loader(urls, batch_size=4, preprocess=RawPreprocess()).iterate(0))
    assert batch["image"].shape == (4, 1)


def test_eval_loader_splits_one_shard_across_ranks(tmp_path):
    urls = write(tmp_path, "a", [11])
    seen = []
    for rank in range(2):
        loader = build_eval_loader(urls, preprocess=to_tensor, tokenizer=ByteTokenizer(), batch_size=4, rank=rank,
                                   world_size=2, workers=2)
        seen.append([key for batch in loader for key in batch["key"]])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"a{i:05d}" for i in range(11)]


# --------------------------------------------------------------------------------------------
# Bad-sample rule
# --------------------------------------------------------------------------------------------


def test_bad_sample_monitor():
    monitor = BadSampleMonitor(max_fraction=0.25, window=100)
    for _ in range(10):
        monitor.update({"bad_image": 2}, 8, ["s/000.tar"])  # 20% bad
    with pytest.raises(DataError, match=r"bad_image=.*empty_caption=.*max_bad_fraction=0\.25; shards: s/000\.tar, s/001\.tar"):
        for _ in range(10):
            monitor.update({"bad_image": 2, "empty_caption": 2}, 6, ["s/001.tar"])  # 40% bad


def test_bad_sample_monitor_early_and_window():
    with pytest.raises(DataError):
        BadSampleMonitor(max_fraction=0.1, window=50).update({"bad_shard": 6}, 2)  # 6 > 0.1 * 50 already
    monitor = BadSampleMonitor(max_fraction=0.1, window=50)
    monitor.update({"bad_image": 4}, 10)  # 4 <= 5: not yet decided
    for _ in range(20):
        monitor.update({}, 10)  # the bad batch leaves the window


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def test_split_sentences_report():
    report = ("FINDINGS: There is a 3.5 cm nodule in the right lobe, e.g. near the hilum. No pleural effusion!\n"
              "Impression: 1. Nodule measuring 12 mm. 2. Dr. Smith was notified? Follow-up in 3 months.")
    assert split_sentences(report) == [
        "There is a 3.5 cm nodule in the right lobe, e.g. near the hilum.",
        "No pleural effusion!",
        "Nodule measuring 12 mm.",
        "Dr. Smith was notified?",
        "Follow-up in 3 months.",
    ]
    assert split_sentences("a dog on a beach") == ["a dog on a beach"]


def test_split_report_sections():
    sections = split_report_sections("CT chest. FINDINGS: Liver is 12.5 cm. IMPRESSION: Normal. Findings: More.")
    assert sections == {"body": "CT chest.", "findings": "Liver is 12.5 cm. More.", "impression": "Normal."}


def test_sample_sub_captions():
    caption = "One. Two. Three. Four. Five."
    first = sample_sub_captions(caption, 50, random.Random(7))
    assert first == sample_sub_captions(caption, 50, random.Random(7))
    order = ["One.", "Two.", "Three.", "Four.", "Five."]
    lengths = Counter()
    for sub in first:
        parts = sub.split(" ")
        assert 1 <= len(parts) <= 3 and all(p in order for p in parts)
        assert [order.index(p) for p in parts] == sorted(order.index(p) for p in parts)
        lengths[len(parts)] += 1
    assert set(lengths) == {1, 2, 3}
    assert set(sample_sub_captions(json.dumps(["a cat", "on a mat"]), 20, random.Random(0))) <= {
        "a cat", "on a mat", "a cat on a mat"}
    assert sample_sub_captions("no boundary here", 2, random.Random(0)) == ["no boundary here"] * 2
    singles = sample_sub_captions(caption, 30, random.Random(1), max_sentences=1)
    assert set(singles) <= set(order) and len(set(singles)) > 1


# --------------------------------------------------------------------------------------------
# Real ranks
# --------------------------------------------------------------------------------------------


def _rank_epoch(rank: int, world_size: int, urls: str) -> list[str]:
    import torch.distributed as dist

    loader = train_loader(urls, batch_size=2, rank=rank, world_size=world_size, workers=0, shuffle_buffer=4)
    seen = []
    for batch in loader.iterate(0):
        step = torch.ones(1)
        dist.all_reduce(step)  # a rank with one batch fewer would leave the other blocked here
        assert step.item() == world_size
        seen.extend(batch["key"])
    return seen


@pytest.mark.slow
def test_uneven_shards_on_real_ranks_step_together(tmp_path):
    from dist_utils import run_ranks

    urls = write(tmp_path, "a", [13, 2, 6])  # 21 samples over 3 shards: ranks get 13+... vs 2+...
    per_rank = run_ranks(_rank_epoch, 2, urls, timeout=120)
    assert [len(keys) for keys in per_rank] == [21 // 4 * 2] * 2


# --------------------------------------------------------------------------------------------
# Tar parsing (the memory-mapped fast path against tarfile)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,suffix", [(tarfile.USTAR_FORMAT, "tar"), (tarfile.GNU_FORMAT, "tar"),
                                        (tarfile.PAX_FORMAT, "tar"), (tarfile.PAX_FORMAT, "tar.gz")])
def test_tar_reader_matches_tarfile(tmp_path, fmt, suffix):
    from vlp.data_pipelines.tar_reader import read_shard

    names = ["a.txt", "a.png", "deep/" * 24 + "b.txt", "deep/" * 24 + "b.png", "x" * 120 + ".txt",
             "caf\u00e9.txt", "big.bin"]
    if fmt == tarfile.USTAR_FORMAT:
        names.remove("x" * 120 + ".txt")  # over ustar's 100-byte name field, and no slash to split at
    path = tmp_path / f"shard.{suffix}"
    members = {name: (name.encode() * 3)[: 7 + 300 * index] for index, name in enumerate(names)}
    members["big.bin"] = bytes(range(256)) * 40
    with tarfile.open(path, "w:gz" if suffix.endswith("gz") else "w", format=fmt) as tar:
        tar.addfile(tarfile.TarInfo("adir"))  # a non-file member is skipped
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if fmt == tarfile.USTAR_FORMAT:
        assert len(names[2]) > 100  # stored with the ustar prefix field
    got = {}
    for sample in read_shard(str(path)):
        assert "__bad__" not in sample
        for ext, data in sample.items():
            if not ext.startswith("__"):
                got[f"{sample['__key__']}.{ext}"] = data
    assert got == members


def test_persistent_workers_give_every_epoch_as_fresh_workers(tmp_path):
    """Whole epochs reuse one DataLoader (workers started once, the epoch passed in shared memory):
    the batches of each epoch equal those of workers started for that epoch alone."""
    urls = write(tmp_path, "a", [7, 6, 5])
    persistent = train_loader(urls, batch_size=2, workers=2, shuffle_buffer=3)
    fresh = train_loader(urls, batch_size=2, workers=2, shuffle_buffer=3)
    fresh.persistent_workers = False
    pids = []
    for epoch in range(3):
        assert_same_batches(list(persistent.iterate(epoch)), list(fresh.iterate(epoch)))
        pids.append(sorted(worker.pid for worker in persistent._workers._iterator._workers))
    assert pids[0] == pids[1] == pids[2]
    assert keys(persistent.iterate(0)) != keys(persistent.iterate(1))  # the epoch did reach the workers
