"""Training batches on the device, copied one batch ahead of the step that uses them.

`DeviceStream(loader, state, device, dtype)` is how the trainer reads its batches (the plain
read-then-copy loop it replaced stays in tests/test_device_stream.py as the reference it must
equal): `next(stream)` returns the next micro-batch with its tensors on
`device` (float tensors in the compute `dtype`; uint8 pixels, token ids and masks keep theirs),
while the copy of the following `lookahead` batches is already under way:

  * CUDA: the host-to-device copies (from pinned memory, non-blocking) and `device_stage` (e.g. the
    batched GPU JPEG decode, `data_pipelines.gpu_decode`) run on a side stream; at hand-over the
    consumer's stream waits for that copy and every handed-over tensor is `record_stream`ed on it,
    so the caching allocator does not reuse its memory while the step still reads it.
  * CPU: the same lookahead and stages, without streams (the copy is a no-op).

The data position stays exact. The loader's position (`TrainLoader.position()`) and the trainer's
`state.epoch` / `state.batch_in_epoch` are taken when a batch is pulled from the loader and
committed when the consumer takes it (`TrainLoader.commit`), so a checkpoint written between two
`next()` calls records the batches consumed, not the ones prefetched, and a resume continues with
the batch that was in flight.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterator, Optional

import torch

Batch = dict[str, Any]


class DeviceStream:
    """Endless micro-batches of `loader` on `device`, `lookahead` batches copied ahead.

    `state`: the trainer's TrainState (fields `epoch`, `batch_in_epoch`): where the stream starts
    and what it advances at each hand-over. `host_stage(batch)`: applied
    at hand-over to the batch (its tensors on the device, its host fields such as "bad" as the
    loader gave them), e.g. `BadSampleTally.take`, so the bad-sample counts and stop rule see the
    same batch at the same step as without lookahead. `device_stage(batch)`: applied right after
    the copy (on the side stream on CUDA), e.g. GPU JPEG decode into batch["image"].
    `channels_last`: 4-D images in channels_last memory format (after `device_stage`)."""

    def __init__(self, loader: Any, state: Any, device: torch.device, dtype: torch.dtype,
                 channels_last: bool = False, lookahead: int = 1,
                 host_stage: Optional[Callable[[Batch], Batch]] = None,
                 device_stage: Optional[Callable[[Batch], Batch]] = None) -> None:
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        self.loader, self.state = loader, state
        self.device, self.dtype, self.channels_last = torch.device(device), dtype, channels_last
        self.lookahead = lookahead
        self.host_stage, self.device_stage = host_stage, device_stage
        self._batches = self._host_batches()
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._ready: deque[tuple[Batch, Any, tuple[int, int], Any]] = deque()

    def __iter__(self) -> "DeviceStream":
        return self

    def __next__(self) -> Batch:
        while len(self._ready) <= self.lookahead:
            self._ready.append(self._pull())
        batch, position, (epoch, batch_in_epoch), copied = self._ready.popleft()
        if copied is not None:
            # Wait for this batch's copy only: `wait_stream` would also wait for the copies of
            # the batches behind it, which the lookahead queued after it on the same side stream.
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(copied)
            for value in batch.values():
                for tensor in value if isinstance(value, list) else [value]:
                    if torch.is_tensor(tensor) and tensor.device.type == "cuda":
                        tensor.record_stream(consumer)
        # The hand-over: the batch counts as consumed from here on (checkpoints record it).
        if position is not None:
            self.loader.commit(position)
        self.state.epoch, self.state.batch_in_epoch = epoch, batch_in_epoch
        return self.host_stage(batch) if self.host_stage is not None else batch

    def close(self) -> None:
        """Stop reading. The generators down to the loader's DataLoader iterator close now, so the
        workers of a partly read epoch shut down here; left to the garbage collector (the stream
        and its generator form a reference cycle), each such shutdown happened at some later
        collection and waited seconds for its workers (10 s for 2, measured in the test suite)."""
        self._batches.close()
        self._ready.clear()

    def _host_batches(self) -> Iterator[tuple[Batch, Any, tuple[int, int]]]:
        """(host batch, the loader's position after it, (epoch, batch_in_epoch) after it), endless;
        the epoch loop, on counters of its own (the state moves at hand-over)."""
        epoch, done = self.state.epoch, self.state.batch_in_epoch
        position = getattr(self.loader, "position", None)
        while True:
            for batch in self.loader.iterate(epoch, skip_batches=done):
                done += 1
                yield batch, position() if position is not None else None, (epoch, done)
            epoch, done = epoch + 1, 0

    def _pull(self) -> tuple[Batch, Any, tuple[int, int], Optional[torch.cuda.Event]]:
        """The next host batch on the device, with its position, counters and (CUDA) the event
        recorded after its copy and device stage."""
        batch, position, counters = next(self._batches)
        if self._copy_stream is None:
            return self._to_device(batch), position, counters, None
        # No wait on the consumer's stream here: that would queue the copy behind the step in
        # flight. Memory is safe without it: the copy allocates from the side stream's pool, and
        # handed-over tensors are record_stream'ed on the consumer's stream.
        with torch.cuda.stream(self._copy_stream):
            moved = self._to_device(batch)
            copied = torch.cuda.Event()
            copied.record(self._copy_stream)
        return moved, position, counters, copied

    def _to_device(self, batch: Batch) -> Batch:
        moved = {}
        for key, value in batch.items():
            # Lists stay on the host, tensors in them too: GPU JPEG decode reads its bytes there.
            moved[key] = self._copy(value) if torch.is_tensor(value) else value
        if self.device_stage is not None:
            moved = self.device_stage(moved)
        for key, value in moved.items():
            if torch.is_tensor(value) and value.is_floating_point() and value.dtype != self.dtype:
                moved[key] = value = value.to(self.dtype)
            if self.channels_last and key == "image" and torch.is_tensor(value) and value.ndim == 4:
                moved[key] = value.contiguous(memory_format=torch.channels_last)
        return moved

    def _copy(self, value: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return value.to(self.device)
        if not value.is_pinned():  # workers=0 runs without the DataLoader's pinning thread
            value = value.pin_memory()
        return value.to(self.device, non_blocking=True)
