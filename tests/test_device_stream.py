"""`DeviceStream` on CPU: the lookahead changes no batch and no saved data position.

Real tiny JPEG shards with vlp's own training transform; a "trainer" loop takes batches, saves the
loader's and the TrainState's position between two `next()` calls (where `run_loop` checkpoints)
and a fresh loader resumed from it must give exactly the batches the first run went on with."""

from __future__ import annotations

import copy
import io
import time
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.data_pipelines.config import DataConfig
from vlp.data_pipelines.device_stream import DeviceStream
from vlp.data_pipelines.image_transforms import ClipImageTransform
from vlp.data_pipelines.loader import build_train_loader
from vlp.data_pipelines.shards import write_shards
from vlp.train.checkpoint import TrainState

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


# The reference: the trainer's feed before DeviceStream, kept here as the plain, obviously right
# version the stream must equal (batch order, data position, dtype and layout).
def micro_batches(loader: Any, state: TrainState) -> Iterator[dict[str, Any]]:
    """Endless micro-batches that keep `state.epoch` / `state.batch_in_epoch` as the data position."""
    while True:
        for batch in loader.iterate(state.epoch, skip_batches=state.batch_in_epoch):
            state.batch_in_epoch += 1
            yield batch
        state.epoch += 1
        state.batch_in_epoch = 0


def to_device(
    batch: dict[str, Any], device: torch.device, dtype: torch.dtype, channels_last: bool = False
) -> dict[str, Any]:
    """Tensors to the device; float inputs to the compute dtype (token ids, masks and uint8 pixels
    keep theirs); 4-D images channels_last if asked."""
    moved = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(device)
            if value.is_floating_point():
                value = value.to(dtype)
            if channels_last and key == "image" and value.ndim == 4:
                value = value.contiguous(memory_format=torch.channels_last)
        moved[key] = value
    return moved


def tokenizer(texts: list[str]) -> torch.Tensor:
    out = torch.zeros(len(texts), 24, dtype=torch.long)
    for row, text in enumerate(texts):
        data = text.encode()[:24]
        out[row, : len(data)] = torch.tensor(list(data))
    return out


def jpeg(index: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(index)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((size + index % 5, size), Image.BILINEAR).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("jpeg_shards")
    samples = [{"__key__": f"k{index:04d}", "jpg": jpeg(index), "txt": f"sample {index}"} for index in range(30)]
    write_shards(samples[:17], out, "a")
    write_shards(samples[17:], out, "b")
    return f"{out}/a-000000.tar::{out}/b-000000.tar"


def make_loader(urls: str, workers: int):
    cfg = DataConfig(train=[{"urls": urls}], workers=workers, shuffle_buffer=6)
    return build_train_loader(cfg, preprocess=ClipImageTransform(16, True, MEAN, STD), tokenizer=tokenizer,
                              batch_size=4, rank=0, world_size=1, seed=3)


def take(stream, count: int) -> list[dict]:
    return [next(stream) for _ in range(count)]


def assert_same(first: list[dict], second: list[dict]) -> None:
    assert [batch["key"] for batch in first] == [batch["key"] for batch in second]
    for a, b in zip(first, second):
        assert a["image"].dtype == b["image"].dtype == torch.uint8
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_at", [2, 7, 8])  # mid-epoch, the last batch of epoch 0 (7 per epoch), epoch 1
def test_resume_with_lookahead_gives_the_uninterrupted_batches(shards, workers, stop_at):
    reference = take(micro_batches(make_loader(shards, workers), TrainState()), 12)

    loader, state = make_loader(shards, workers), TrainState()
    stream = DeviceStream(loader, state, torch.device("cpu"), torch.float32, lookahead=1)
    consumed = take(stream, stop_at)
    saved_loader, saved_state = copy.deepcopy(loader.state_dict()), copy.deepcopy(state.state_dict())
    consumed += take(stream, 12 - stop_at)
    assert_same(consumed, reference)  # the lookahead changes no batch
    # As micro_batches counts: the last batch of an epoch is (epoch, 7) until the next one is taken.
    assert (saved_state["epoch"], saved_state["batch_in_epoch"]) == {2: (0, 2), 7: (0, 7), 8: (1, 1)}[stop_at]
    assert saved_loader["batches"] == saved_state["batch_in_epoch"]  # consumed, not prefetched

    resumed_loader, resumed_state = make_loader(shards, workers), TrainState()
    resumed_loader.load_state_dict([saved_loader])
    resumed_state.load_state_dict(saved_state)
    resumed = DeviceStream(resumed_loader, resumed_state, torch.device("cpu"), torch.float32, lookahead=2)
    assert_same(take(resumed, 12 - stop_at), reference[stop_at:])
    stream.close(), resumed.close()


def test_close_stops_the_workers_of_a_partly_read_epoch(shards):
    """Closed mid-epoch (a resumed epoch's own workers and the persistent ones), no worker process
    is left, without a garbage collection. Left open, a stream's reference cycle kept them until
    some later collection, which then waited 10 s for them (the suite's slowest unit test)."""
    import gc
    import multiprocessing

    gc.disable()
    try:
        for resumed in (False, True):
            loader, state = make_loader(shards, 2), TrainState()
            if resumed:
                state.batch_in_epoch = 1  # a checkpoint without a position: skips, own workers
            stream = DeviceStream(loader, state, torch.device("cpu"), torch.float32, lookahead=1)
            take(stream, 3)
            assert multiprocessing.active_children()
            stream.close()
            loader.close()
            deadline = time.monotonic() + 10
            while multiprocessing.active_children() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert multiprocessing.active_children() == [], resumed
    finally:
        gc.enable()


def test_stream_equals_micro_batches_and_to_device(shards):
    """dtype and layout as `to_device`: floats cast, uint8 pixels and token ids kept, channels_last;
    host_stage sees each batch at its hand-over with the loader's host fields."""
    loader, state = make_loader(shards, 0), TrainState()
    seen = []

    def host_stage(batch):
        seen.append((batch["key"], batch.pop("bad"), state.batch_in_epoch))
        return batch

    stream = DeviceStream(loader, state, torch.device("cpu"), torch.bfloat16, channels_last=True, lookahead=3,
                          host_stage=host_stage)
    plain_state = TrainState()
    plain = micro_batches(make_loader(shards, 0), plain_state)
    for index in range(9):
        ours = next(stream)
        theirs = to_device(next(plain), torch.device("cpu"), torch.bfloat16, channels_last=True)
        assert (state.epoch, state.batch_in_epoch) == (plain_state.epoch, plain_state.batch_in_epoch)
        assert ours["key"] == theirs["key"] and "bad" not in ours and seen[-1][0] == ours["key"]
        assert seen[-1][2] == state.batch_in_epoch and seen[-1][1] == theirs["bad"]
        assert ours["image"].dtype == torch.uint8 and ours["image"].is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(ours["image"], theirs["image"]) and ours["text"].dtype == torch.long
    assert len(seen) == 9


def test_device_stage_runs_after_the_copy(shards):
    calls = []

    def device_stage(batch):
        calls.append(batch["key"][0])
        batch["image"] = batch["image"].float()  # a float result is cast to the compute dtype after the stage
        return batch

    stream = DeviceStream(make_loader(shards, 0), TrainState(), torch.device("cpu"), torch.float16, lookahead=1,
                          device_stage=device_stage)
    batch = next(stream)
    assert batch["image"].dtype == torch.float16 and len(calls) == 2  # one batch ahead


def test_lookahead_must_not_be_negative(shards):
    with pytest.raises(ValueError, match="lookahead"):
        DeviceStream(make_loader(shards, 0), TrainState(), torch.device("cpu"), torch.float32, lookahead=-1)
