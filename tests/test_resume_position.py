"""The loader's saved position: a resume seeks (no re-reading of the samples before it) and
continues bit for bit; on another layout the rest of the epoch is dealt again, each sample once."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import pytest
import torch
from test_data_loader import NoisyTransform, assert_same_batches, keys, png, train_loader, write

from vlp.data_pipelines import tar_reader
from vlp.data_pipelines.position import read_positions, write_position
from vlp.data_pipelines.shards import write_shards


def roundtrip(state: dict) -> dict:
    return json.loads(json.dumps(state))  # what the checkpoint file gives back


def consume(loaders, epoch: int, batches: int) -> list[list[dict]]:
    """`batches` batches of `epoch` from each loader (one per rank), kept open like the trainer's."""
    streams = [loader.iterate(epoch) for loader in loaders]
    return [[next(stream) for _ in range(batches)] for stream in streams]


def make_ranks(urls, world_size, **cfg):
    return [train_loader(urls, rank=rank, world_size=world_size, **cfg) for rank in range(world_size)]


CASES = {
    "whole-shards": dict(counts=[9, 8, 7, 11], world_size=1, cfg=dict(workers=2, shuffle_buffer=6, batch_size=3)),
    "split-shard": dict(counts=[13, 11], world_size=2, cfg=dict(workers=2, shuffle_buffer=5, batch_size=2)),
    "no-buffer": dict(counts=[10, 10], world_size=2, cfg=dict(workers=0, shuffle_buffer=0, batch_size=2)),
    "padding-cycles": dict(counts=[20, 3, 5, 1], world_size=2, cfg=dict(workers=1, shuffle_buffer=4, batch_size=2)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_seek_resume_is_bit_identical(tmp_path, case, mode):
    spec = CASES[case]
    urls = write(tmp_path, "a", spec["counts"], caption=lambda i: f"Sentence {i}. Second {i}. Third one.")
    cfg = dict(spec["cfg"], mode=mode, seed=3, preprocess=NoisyTransform(), sub_captions=2, sentences=2)
    total = 9 if mode == "resampled" else make_ranks(urls, 1, **cfg)[0].batches_per_epoch
    for cut in (1, total // 2 + 1, total):
        if mode == "epoch":
            fresh = [list(loader.iterate(1)) for loader in make_ranks(urls, spec["world_size"], **cfg)]
        else:
            fresh = consume(make_ranks(urls, spec["world_size"], **cfg), 1, total)
        loaders = make_ranks(urls, spec["world_size"], **cfg)
        consume(loaders, 1, min(cut, len(fresh[0])))
        saved = [roundtrip(loader.state_dict()) for loader in loaders]
        resumed_loaders = make_ranks(urls, spec["world_size"], **cfg)
        for rank, loader in enumerate(resumed_loaders):
            loader.load_state_dict(saved)
            stream = loader.iterate(1, skip_batches=cut)
            rest = list(stream) if mode == "epoch" else [next(stream) for _ in range(total - cut)]
            assert_same_batches(fresh[rank][cut:], rest)
            assert loader.resume_note is None


def test_two_sources_mixed_resume(tmp_path):
    sources = [{"urls": write(tmp_path, "a", [10, 10]), "weight": 3.0},
               {"urls": write(tmp_path, "b", [10, 10]), "weight": 1.0}]
    for mode in ("epoch", "resampled"):
        cfg = dict(batch_size=3, mode=mode, workers=2, shuffle_buffer=4, seed=1)
        fresh = list(itertools_take(train_loader(sources, **cfg).iterate(0), 12))
        loader = train_loader(sources, **cfg)
        consume([loader], 0, 5)
        resumed = train_loader(sources, **cfg)
        resumed.load_state_dict([roundtrip(loader.state_dict())])
        assert_same_batches(fresh[5:], list(itertools_take(resumed.iterate(0, skip_batches=5), 7)))


def itertools_take(stream, count):
    return [batch for _, batch in zip(range(count), stream)]


def test_resume_reads_only_the_current_shard_and_the_buffer(tmp_path, monkeypatch):
    urls = write(tmp_path, "a", [40] * 8)
    cfg = dict(batch_size=4, workers=0, shuffle_buffer=10)
    loader = train_loader(urls, **cfg)
    consume([loader], 0, 60)  # 240 of 320 samples: deep into the epoch
    saved = roundtrip(loader.state_dict())
    reads = Counter()
    real_sample = tar_reader.ShardIndex.sample
    real_read_shard = tar_reader.read_shard

    def counting_sample(self, index):
        reads["indexed"] += 1
        return real_sample(self, index)

    def counting_read_shard(url):
        reads["streamed"] += 1
        return real_read_shard(url)

    monkeypatch.setattr(tar_reader.ShardIndex, "sample", counting_sample)
    monkeypatch.setattr(tar_reader, "read_shard", counting_read_shard)
    resumed = train_loader(urls, **cfg)
    resumed.load_state_dict([saved])
    next(resumed.iterate(0, skip_batches=60))
    # The buffer (10 by reference) plus what one batch needs; no sample before the position.
    assert reads["streamed"] == 0
    assert reads["indexed"] <= 10 + 4 + 10


def test_corrupt_but_parseable_image_before_the_position_does_not_shift_the_stream(tmp_path):
    """The skip-based resume counted such an image as good and came back one sample off."""
    broken = bytearray(png(5))
    broken[-20:-12] = b"\x00" * 8  # the IDAT/IEND bytes: the header still parses, decoding fails
    samples = [{"__key__": f"k{i:03d}", "png": bytes(broken) if i in (1, 2) else png(i), "txt": f"caption {i}"}
               for i in range(30)]
    write_shards(samples, tmp_path, "c", max_count=15)
    urls = f"{tmp_path}/c-{{000000..000001}}.tar"
    cfg = dict(batch_size=3, workers=0, shuffle_buffer=0)
    fresh = list(train_loader(urls, **cfg).iterate(0))
    assert sum(batch["bad"]["bad_image"] for batch in fresh) == 2
    loader = train_loader(urls, **cfg)
    consume([loader], 0, 3)
    resumed = train_loader(urls, **cfg)
    resumed.load_state_dict([roundtrip(loader.state_dict())])
    assert_same_batches(fresh[3:], list(resumed.iterate(0, skip_batches=3)))
    skipped = list(train_loader(urls, **cfg).iterate(0, skip_batches=3))  # the old way, for contrast
    assert keys(skipped) != keys(fresh[3:])


def test_damaged_and_compressed_shards_resume_exactly(tmp_path):
    urls = write(tmp_path, "a", [12, 12, 12]).split("::")
    damaged = tmp_path / "a-s01-000000.tar"
    damaged.write_bytes(damaged.read_bytes()[: 512 * 40])  # truncated mid-shard
    compressed = tmp_path / "a-s02-000000.tar.gz"
    import gzip

    compressed.write_bytes(gzip.compress((tmp_path / "a-s02-000000.tar").read_bytes()))
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    sizes["a-s02-000000.tar.gz"] = 12
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    spec = "::".join([urls[0], str(damaged), str(compressed)])
    cfg = dict(batch_size=2, workers=0, shuffle_buffer=5, max_bad_fraction=1.0)
    fresh = list(train_loader(spec, **cfg).iterate(0))
    assert sum(batch["bad"]["bad_shard"] for batch in fresh) >= 1
    for cut in range(1, len(fresh)):
        loader = train_loader(spec, **cfg)
        consume([loader], 0, cut)
        resumed = train_loader(spec, **cfg)
        resumed.load_state_dict([roundtrip(loader.state_dict())])
        rest = list(resumed.iterate(0, skip_batches=cut))
        assert_same_batches(fresh[cut:], rest)
        assert [b["bad"] for b in rest] == [b["bad"] for b in fresh[cut:]]


def test_shard_index_matches_read_shard(tmp_path):
    names = ["a.txt", "a.png", "deep/" * 24 + "b.txt", "x" * 120 + ".txt", "x" * 120 + ".cls"]
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for index, name in enumerate(names):
            data = name.encode() * (index + 1)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    streamed = list(tar_reader.read_shard(str(path)))
    with tar_reader.ShardIndex(str(path)) as index:
        assert index.damage is None
        assert [index.sample(i) for i in range(len(index))] == streamed
    picked = tar_reader.read_picked(str(path), [2, 0])
    assert picked == {0: streamed[0], 2: streamed[2]}


# --------------------------------------------------------------------------------------------
# Another layout
# --------------------------------------------------------------------------------------------


def _keys_after_redeal(urls, old_world, old_workers, new_world, new_workers, cut, batch_size=2, buffer=5):
    old = make_ranks(urls, old_world, workers=old_workers, batch_size=batch_size, shuffle_buffer=buffer)
    before = [key for batches in consume(old, 0, cut) for batch in batches for key in batch["key"]]
    saved = [roundtrip(loader.state_dict()) for loader in old]
    new = make_ranks(urls, new_world, workers=new_workers, batch_size=batch_size, shuffle_buffer=buffer)
    per_rank = []
    for loader in new:
        loader.load_state_dict(saved)
        per_rank.append(list(loader.iterate(0, skip_batches=cut)))
    assert len({len(batches) for batches in per_rank}) == 1  # every rank steps alike
    after = [key for batches in per_rank for batch in batches for key in batch["key"]]
    return before, after, new[0].resume_note, new, saved


@pytest.mark.parametrize("new_world,new_workers", [(1, 0), (3, 2), (1, 3), (2, 1)])
@pytest.mark.parametrize("counts", [[12, 12, 12, 12], [30, 18]], ids=["whole-shards", "split-shards"])
def test_redeal_reads_every_remaining_sample_once(tmp_path, counts, new_world, new_workers):
    urls = write(tmp_path, "a", counts)
    before, after, note, _, _ = _keys_after_redeal(urls, 2, 2, new_world, new_workers, cut=3)
    total = sum(counts)
    seen = Counter(before + after)
    assert max(seen.values()) == 1  # nothing twice
    assert len(seen) == total - note["dropped"] and note["dropped"] < new_world * 2  # under one global batch
    assert note["event"] == "data_redealt" and note["samples_left"] == total - len(before)
    assert note["from_layout"] == [2, 2] and note["to_layout"] == [new_world, new_workers]


def test_redealt_position_saves_and_moves_again(tmp_path):
    """A redealt epoch is itself a position: it resumes bit for bit on its own layout and can be
    dealt once more to a third one, still each sample once."""
    urls = write(tmp_path, "a", [12, 12, 12, 12])
    cfg = dict(batch_size=2, shuffle_buffer=5)
    old = make_ranks(urls, 2, workers=2, **cfg)
    before = [k for batches in consume(old, 0, 2) for b in batches for k in b["key"]]
    saved = [roundtrip(loader.state_dict()) for loader in old]
    middle = make_ranks(urls, 3, workers=1, **cfg)
    for loader in middle:
        loader.load_state_dict(saved)
    # Reference: the redealt stream uninterrupted.
    reference = []
    for loader in make_ranks(urls, 3, workers=1, **cfg):
        loader.load_state_dict(saved)
        reference.append(list(loader.iterate(0)))
    during = [k for batches in consume(middle, 0, 2) for b in batches for k in b["key"]]
    saved_middle = [roundtrip(loader.state_dict()) for loader in middle]
    for rank, loader in enumerate(make_ranks(urls, 3, workers=1, **cfg)):
        loader.load_state_dict(saved_middle)
        assert loader.resume_note is None
        assert_same_batches(reference[rank][2:], list(loader.iterate(0)))
    last = make_ranks(urls, 1, workers=0, **cfg)[0]
    last.load_state_dict(saved_middle)
    after = [k for b in last.iterate(0) for k in b["key"]]
    seen = Counter(before + during + after)
    assert max(seen.values()) == 1 and len(seen) >= 48 - 2


def test_resampled_on_another_layout_gets_fresh_streams(tmp_path, capsys):
    urls = write(tmp_path, "a", [8, 8, 8])
    old = make_ranks(urls, 2, workers=1, batch_size=2, mode="resampled", shuffle_buffer=4)
    consume(old, 0, 3)
    saved = [roundtrip(loader.state_dict()) for loader in old]
    new = train_loader(urls, batch_size=2, mode="resampled", workers=2, shuffle_buffer=4)
    new.load_state_dict(saved)
    assert new.resume_note["event"] == "data_reseeded"
    assert "fresh streams" in capsys.readouterr().out
    batches = itertools_take(new.iterate(0, skip_batches=3), 5)
    assert len(batches) == 5
    again = train_loader(urls, batch_size=2, mode="resampled", workers=2, shuffle_buffer=4)
    again.load_state_dict(saved)
    assert keys(itertools_take(again.iterate(0), 5)) == keys(batches)  # still deterministic


def test_changed_data_is_refused(tmp_path):
    urls = write(tmp_path, "a", [6, 6])
    loader = train_loader(urls, batch_size=2)
    consume([loader], 0, 1)
    saved = roundtrip(loader.state_dict())
    other = train_loader(urls.split("::")[0], batch_size=2)
    from vlp.data_pipelines.errors import DataError

    with pytest.raises(DataError, match="differs from the checkpoint's"):
        other.load_state_dict([saved])


def test_position_files_round_trip(tmp_path):
    urls = write(tmp_path, "a", [6, 6])
    loaders = make_ranks(urls, 2, batch_size=2)
    consume(loaders, 0, 1)
    for loader in loaders:
        write_position(tmp_path, loader._dataset.rank, loader.state_dict())
    states = read_positions(tmp_path)
    assert [state["rank"] for state in states] == [0, 1]
    assert all(len(json.dumps(state)) < 20_000 for state in states)
    (tmp_path / "loader_rank1.json").unlink()
    from vlp.data_pipelines.errors import DataError

    with pytest.raises(DataError, match="incomplete"):
        read_positions(tmp_path)


# --------------------------------------------------------------------------------------------
# Real ranks: a 2-rank run resumed on 1 and on 3 ranks
# --------------------------------------------------------------------------------------------


def _rank_consume(rank: int, world_size: int, urls: str, folder: str, batches) -> list[str]:
    import torch.distributed as dist

    loader = train_loader(urls, batch_size=2, rank=rank, world_size=world_size, workers=2, shuffle_buffer=5)
    from pathlib import Path

    saved = read_positions(Path(folder) / "in") if (Path(folder) / "in").is_dir() else []
    loader.load_state_dict(saved)
    stream = loader.iterate(0)
    seen = []
    for _ in itertools_count(batches):
        batch = next(stream, None)
        step = torch.tensor([0.0 if batch is None else 1.0])
        dist.all_reduce(step)  # every rank has a batch, or none has
        assert step.item() in (0, world_size)
        if batch is None:
            break
        seen.extend(batch["key"])
    (Path(folder) / "out").mkdir(exist_ok=True)
    write_position(Path(folder) / "out", rank, loader.state_dict())
    return seen


def itertools_count(limit):
    import itertools

    return itertools.count() if limit is None else range(limit)


@pytest.mark.slow
@pytest.mark.parametrize("new_world", [1, pytest.param(3, marks=pytest.mark.nightly)])
def test_two_ranks_resumed_on_other_world_sizes_read_each_key_once(tmp_path, new_world):
    import shutil

    from dist_utils import run_ranks

    urls = write(tmp_path, "a", [24, 24, 12, 12])  # 72 samples: 18 batches of 2 a rank on 2 ranks
    first = run_ranks(_rank_consume, 2, urls, str(tmp_path), 5, timeout=180)
    shutil.move(tmp_path / "out", tmp_path / "in")
    second = run_ranks(_rank_consume, new_world, urls, str(tmp_path), None, timeout=180)
    seen = Counter(key for keys_ in first + second for key in keys_)
    assert max(seen.values()) == 1
    # 72 - 20 consumed = 52 left; on 3 ranks x batch 2 the 4 past the last global batch are dropped.
    assert len(seen) == 72 - (52 % (new_world * 2))


@pytest.mark.slow
def test_trainer_resumed_on_one_rank_logs_the_redeal(tmp_path, digits_dir):
    """`vlp train --nproc 2`, then `--resume latest` on one rank: it goes on, and says in the log
    and in metrics.jsonl that the data order changed."""
    from conftest import run_vlp, tiny_config

    import shutil

    config = tiny_config(tmp_path, digits_dir, train={"steps": 4, "checkpoint_every": 2, "batch_size": 4,
                                                      "warmup_steps": 1, "keep_checkpoints": 2})
    run_dir = tmp_path / "runs" / "tiny"
    run_vlp("train", config, "--nproc", "2")
    shutil.rmtree(run_dir / "checkpoints" / "step_00000004")  # as if stopped after step 2
    (run_dir / "checkpoints" / "latest").write_text("step_00000002\n")
    (run_dir / "results.json").unlink()
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step_00000002").glob("loader_rank*.json")) == [
        "loader_rank0.json", "loader_rank1.json"]
    proc = run_vlp("train", config, "--resume", "latest")
    assert "data order changed" in proc.stdout + proc.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    redealt = [r for r in records if r.get("event") == "data_redealt"]
    assert len(redealt) == 1 and redealt[0]["from_layout"] == [2, 0] and redealt[0]["to_layout"] == [1, 0]
    assert [r["step"] for r in records if "loss/total" in r] == [1, 2, 3, 4]
