"""Bad data met for real: training goes on and counts it, too much of it stops the run naming
the shards, a shard that vanishes mid-epoch is survived, and random corruption never crashes."""

import io
import json
import os

import pytest
import torch
import yaml
from conftest import run_vlp, tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_data_loader import _bad_shards, png, train_loader, write

from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.shards import write_shards


def _with_train_urls(config, urls, **data):
    tree = yaml.safe_load(config.read_text())
    tree["data"]["train"] = [{"urls": urls}]
    tree["data"].update(data)
    config.write_text(yaml.safe_dump(tree))
    return config


@pytest.mark.slow
def test_training_skips_and_counts_bad_samples_per_reason(tmp_path, digits_dir):
    bad_urls, _ = _bad_shards(tmp_path / "bad")
    config = tiny_config(tmp_path, digits_dir, train={"steps": 4, "checkpoint_every": 0, "log_every": 1})
    urls = f"{digits_dir}/digits-train-000000.tar::{bad_urls}"
    _with_train_urls(config, urls, shuffle_buffer=0)
    run_vlp("train", config)
    records = [json.loads(l) for l in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    counted = {}
    for record in records:
        for key, value in record.items():
            if key.startswith("bad/"):
                counted[key] = counted.get(key, 0) + value
    assert {"bad/bad_image", "bad/empty_caption", "bad/bad_caption", "bad/image_too_large"} <= set(counted), counted
    assert [r["step"] for r in records if "loss/total" in r] == [1, 2, 3, 4]


@pytest.mark.slow
def test_too_much_bad_data_stops_the_run_naming_the_shard(tmp_path, digits_dir):
    samples = [{"__key__": f"k{i}", "png": b"not an image", "txt": "x"} for i in range(300)]
    write_shards(samples, tmp_path / "junk", "junk")
    config = tiny_config(tmp_path, digits_dir, train={"steps": 20, "checkpoint_every": 0})
    _with_train_urls(config, f"{tmp_path}/junk/junk-000000.tar::{digits_dir}/digits-train-000000.tar",
                     max_bad_fraction=0.2, bad_window=64, shuffle_buffer=0)
    proc = run_vlp("train", config, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "junk-000000.tar" in last and "bad_image" in last


def test_shard_vanishing_mid_epoch_is_skipped_and_counted(tmp_path):
    urls = write(tmp_path, "v", [6, 6, 6])
    loader = train_loader(urls, batch_size=3, shuffle_buffer=0)
    stream = loader.iterate(0)
    first = next(stream)
    reading = int(first["key"][0][1:]) // 6  # shard of the first batch (keys v00000.. by index)
    gone = next(s for s in range(3) if s != reading)
    os.remove(tmp_path / f"v-s{gone:02d}-000000.tar")  # vanishes before the loader reaches it
    batches = [first, *stream]
    assert len(batches) == loader.batches_per_epoch  # the epoch keeps its length on this rank
    assert sum(b["bad"].get("bad_shard", 0) for b in batches) >= 1
    vanished = {f"v{i:05d}" for i in range(6 * gone, 6 * gone + 6)}
    assert not vanished & {k for b in batches for k in b["key"]}


def _clean_tar(tmp_path) -> bytes:
    write_shards([{"__key__": f"s{i}", "png": png(i), "txt": f"caption {i}", "cls": i % 3} for i in range(6)],
                 tmp_path, "fuzz")
    return (tmp_path / "fuzz-000000.tar").read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_corrupted_shard_bytes_never_crash_the_loader(tmp_path_factory, data):
    """Flip, zero or cut random bytes of a real shard: the loaders yield well-formed batches of
    the samples that survive, count the rest, or refuse with a DataError; nothing else."""
    tmp_path = tmp_path_factory.mktemp("fuzz")
    raw = bytearray(_clean_tar(tmp_path))
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    shard = tmp_path / "fuzz-000000.tar"
    shard.write_bytes(bytes(raw))
    try:
        loader = train_loader(str(shard), batch_size=2, shuffle_buffer=0, bad_window=50)
        for batch in loader.iterate(0):
            assert batch["image"].ndim == 4 and batch["text"].shape[0] == batch["image"].shape[0]
            assert torch.isfinite(batch["image"]).all()
    except DataError as error:
        assert str(error).strip()
    from test_data_loader import ByteTokenizer, to_tensor

    from vlp.data_pipelines.loader import build_eval_loader

    try:
        for batch in build_eval_loader(str(shard), preprocess=to_tensor, tokenizer=ByteTokenizer(), batch_size=4):
            assert batch["image"].shape[0] == len(batch["key"])
    except DataError as error:
        assert str(error).strip()


def test_ct_volumes_with_nan_voxels_or_wrong_dimensions_are_skipped_and_counted(tmp_path):
    """The volume transform refuses them; the loader counts each as bad_image and goes on."""
    import numpy as np
    from test_data_loader import ByteTokenizer

    from vlp.data_pipelines.volume_transforms import VolumePreprocess

    def npy(array):
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    good = np.full((8, 8, 8), -500, dtype=np.int16)
    with_nan = good.astype(np.float32)
    with_nan[2, 3, 4] = np.nan
    samples = [
        {"__key__": "good", "npy": npy(good), "json": {"spacing": [4, 4, 4]}, "txt": "no lesion."},
        {"__key__": "nan", "npy": npy(with_nan), "json": {"spacing": [4, 4, 4]}, "txt": "a nodule."},
        {"__key__": "flat", "npy": npy(good[0]), "json": {"spacing": [4, 4]}, "txt": "a cyst."},
        {"__key__": "good2", "npy": npy(good + 100), "json": {"spacing": [4, 4, 4]}, "txt": "a mass."},
    ]
    write_shards(samples, tmp_path, "ct")
    preprocess = VolumePreprocess(train=False, spacing=None, roi=(8, 8, 8))
    config_urls = str(tmp_path / "ct-000000.tar")
    from vlp.data_pipelines.loader import build_eval_loader

    batches = list(build_eval_loader(config_urls, preprocess=preprocess, tokenizer=ByteTokenizer(), batch_size=4))
    keys = [k for b in batches for k in b["key"]]
    assert keys == ["good", "good2"]
    assert batches[0]["image"].shape == (2, 1, 8, 8, 8) and torch.isfinite(batches[0]["image"]).all()
    assert sum(b["bad"].get("bad_image", 0) for b in batches) == 2
