"""What the training loop watches besides the algorithm, one small object each: bad samples the
loader skipped, non-finite losses, and throughput (with the time spent waiting for data) over a
logging window.

None of them needs a `state_dict` of its own: the non-finite count lives in `TrainState`, which
the checkpointer saves with the data position, and the other two only cover the samples since the
last log line, which a resumed run starts afresh (as `BadSampleMonitor`'s window does).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from vlp.core.collectives import all_reduce_max
from vlp.models.dual_encoder import VLPModel
from vlp.train.checkpoint import TrainState
from vlp.train.config import ExperimentConfig
from vlp.train.distributed import DistEnv


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite losses, too much bad data); exit code 1."""


class BadSampleTally:
    """Takes the loader's bad-sample counts off each batch: feeds them to the stop rule
    (`BadSampleMonitor`, which raises DataError over the limit) and sums them for the next log."""

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor
        self.since_log: dict[str, int] = {}

    def take(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` without its "bad" / "bad_shards" entries (the model never sees them)."""
        bad_counts = batch.pop("bad", {}) or {}
        self.monitor.update(bad_counts, len(batch["key"]), batch.pop("bad_shards", ()) or ())
        for reason, count in bad_counts.items():
            if isinstance(count, int):
                self.since_log[reason] = self.since_log.get(reason, 0) + count
        return batch

    def flush(self) -> dict[str, int]:
        """{"bad/<reason>": count} since the last flush."""
        logged = {f"bad/{reason}": count for reason, count in self.since_log.items()}
        self.since_log = {}
        return logged


def nonfinite_heads(logging: dict[str, Any]) -> list[str]:
    return sorted(
        key.removeprefix("loss/") for key, value in logging.items()
        if key.startswith("loss/") and key != "loss/total" and torch.is_tensor(value) and not torch.isfinite(value).all()
    )


class NonFiniteGuard:
    """Skips an update whose loss is non-finite on any rank (every rank alike), logs the culprit
    heads, and stops the run after `limit` skips in a row. The count is `state.nonfinite_steps`,
    so it is checkpointed and resumed with the rest of the client state.

    The flag is reduced on the device (no CPU tensor reaches NCCL). Reading it on the host is a
    sync: the CPU waits for the forward to finish before it can queue the backward, so the GPU
    idles for the time it takes to launch the backward's first kernels. `deferred` (fp16, where
    DeepSpeed's loss scaler already skips every step whose gradients overflow, on every rank
    alike) keeps the flag on the device and reads it only in `settle`, at log time; fp32 and bf16
    have no such guard, so there the read stays per micro-batch: a non-finite loss must not reach
    backward, whose gradients would be accumulated and applied."""

    def __init__(self, limit: int, state: TrainState, log: Callable[[int, dict], None],
                 last_good: Callable[[], Any], deferred: bool = False) -> None:
        self.limit = limit
        self.state = state
        self.log = log
        self.last_good = last_good  # the latest checkpoint's tag, named when the run stops
        self.deferred = deferred
        self.in_a_row: torch.Tensor | None = None  # deferred: (1,) skips in a row, on the device
        self.since_log: torch.Tensor | None = None  # deferred: (1,) skips since the last `settle`

    def skip(self, out: dict[str, Any]) -> bool:
        """True when this micro-batch's update must be skipped (a collective: call on every rank).
        Deferred: always False (DeepSpeed skips the step); the flag is counted on the device."""
        loss = out["loss"].detach()
        nonfinite = all_reduce_max(torch.logical_not(torch.isfinite(loss).all()).float().reshape(1))
        if self.deferred:
            if self.in_a_row is None:
                self.in_a_row = torch.full_like(nonfinite, float(self.state.nonfinite_steps))
                self.since_log = torch.zeros_like(nonfinite)
            self.in_a_row = (self.in_a_row + nonfinite) * nonfinite  # reset to 0 by a finite loss
            self.since_log = self.since_log + nonfinite
            return False
        if not nonfinite.item():  # the host sync (see the class docstring)
            return False
        self.state.nonfinite_steps += 1
        self._report(nonfinite_heads(out["logging"]) or ["(total)"], self.state.nonfinite_steps)
        return True

    def stepped(self) -> None:
        """An optimizer step went through: the run of skips is over (deferred: counted on the device)."""
        if not self.deferred:
            self.state.nonfinite_steps = 0

    def settle(self) -> None:
        """Deferred: read the device counts (one host sync, at log and checkpoint time), log the
        skips since the last call and stop after `limit` in a row."""
        if not self.deferred or self.in_a_row is None:
            return
        in_a_row, since_log = int(self.in_a_row.item()), int(self.since_log.item())
        self.state.nonfinite_steps = in_a_row
        self.since_log.zero_()
        if since_log:
            self._report(["(skipped by the fp16 loss scaler)"], since_log)

    def _report(self, heads: list[str], skipped: int) -> None:
        state = self.state
        self.log(state.step, {"nonfinite_skipped": skipped, "nonfinite_heads": ",".join(heads)})
        if state.nonfinite_steps >= self.limit:
            raise TrainingStopped(
                f"{state.nonfinite_steps} non-finite losses in a row from head(s) {', '.join(heads)} "
                f"at step {state.step}; last good checkpoint: {self.last_good()}"
            )


class ThroughputMeter:
    """Samples per second over the window since the last `restart`, and the fraction of that
    window spent blocked waiting for the next batch (`data_wait_frac`)."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """Start a new window (after the log line is written, so writing it is not counted)."""
        self.samples = 0
        self.data_wait_s = 0.0
        self.start = time.perf_counter()

    def add(self, samples: int) -> None:
        self.samples += samples

    def next_batch(self, stream: Iterator[Any]) -> Any:
        """`next(stream)`, timing how long the loop was blocked on it."""
        started = time.perf_counter()
        batch = next(stream)
        self.data_wait_s += time.perf_counter() - started
        return batch

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def rate(self) -> float:
        return self.samples / self.elapsed()

    def data_wait_frac(self) -> float:
        return min(1.0, self.data_wait_s / self.elapsed())


INPUT_BOUND_FRAC = 0.3  # above this share of the step time blocked on data, say so once


class StepTelemetry:
    """What a log line adds about the hardware: `data_wait_frac` (the window's share of time
    blocked in `next(stream)`), and `mfu` (model FLOPs utilisation: analytic forward+backward
    FLOPs per sample x samples/s over world_size x the accelerator's peak) where a peak is known,
    i.e. a GPU kind `vlp.models.flops` has in its table or `train.peak_tflops`. Rank 0 prints a
    one-line hint the first time the input is the bottleneck."""

    def __init__(self, config: ExperimentConfig, model: VLPModel, env: DistEnv) -> None:
        """`model`: the VLPModel before `deepspeed.initialize` (ZeRO-3 would partition it); the
        FLOPs are counted once, here, and only where a peak is known."""
        self.world_size = env.world_size
        self.is_main = env.is_main
        self.hinted = False
        self.flops_per_sample, self.peak = None, None
        try:
            from vlp.models.flops import model_flops_per_sample, peak_flops
        except ImportError:  # no FLOPs model for these towers: no mfu, the rest still logs
            return
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config.deepspeed.precision]
        self.peak = peak_flops(env.device, dtype, config.train.peak_tflops)
        if self.peak:
            self.flops_per_sample = model_flops_per_sample(model, config.train.batch_size * env.world_size)

    def window(self, throughput: ThroughputMeter) -> dict[str, float]:
        waiting = throughput.data_wait_frac()
        logged = {"data_wait_frac": waiting}
        if self.flops_per_sample and self.peak:
            logged["mfu"] = self.flops_per_sample * throughput.rate() / (self.world_size * self.peak)
        if waiting > INPUT_BOUND_FRAC and self.is_main and not self.hinted:
            self.hinted = True
            print(f"[vlp] input bound: {waiting:.0%} of the step time is spent waiting for data; raise "
                  "data.workers or use data.decode: gpu", file=sys.stderr, flush=True)
        return logged
