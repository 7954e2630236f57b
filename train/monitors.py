"""What the training loop watches besides the algorithm, one small object each: bad samples the
loader skipped, non-finite losses, and throughput over a logging window.

None of them needs a `state_dict` of its own: the non-finite count lives in `TrainState`, which
the checkpointer saves with the data position, and the other two only cover the samples since the
last log line, which a resumed run starts afresh (as `BadSampleMonitor`'s window does).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from vlp.core.collectives import all_reduce_max
from vlp.train.checkpoint import TrainState


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
    """Skips an update whose loss is non-finite on any rank (every rank alike: no backward, no
    step), logs the culprit heads, and stops the run after `limit` skips in a row. The count is
    `state.nonfinite_steps`, so it is checkpointed and resumed with the rest of the client state."""

    def __init__(self, limit: int, state: TrainState, log: Callable[[int, dict], None],
                 last_good: Callable[[], Any]) -> None:
        self.limit = limit
        self.state = state
        self.log = log
        self.last_good = last_good  # the latest checkpoint's tag, named when the run stops

    def skip(self, out: dict[str, Any]) -> bool:
        """True when this micro-batch's update must be skipped (a collective: call on every rank)."""
        if all_reduce_max(0.0 if torch.isfinite(out["loss"]).all() else 1.0) == 0:
            return False
        state = self.state
        state.nonfinite_steps += 1
        heads = nonfinite_heads(out["logging"]) or ["(total)"]
        self.log(state.step, {"nonfinite_skipped": state.nonfinite_steps, "nonfinite_heads": ",".join(heads)})
        if state.nonfinite_steps >= self.limit:
            raise TrainingStopped(
                f"{state.nonfinite_steps} non-finite losses in a row from head(s) {', '.join(heads)} "
                f"at step {state.step}; last good checkpoint: {self.last_good()}"
            )
        return True

    def stepped(self) -> None:
        """An optimizer step went through: the run of skips is over."""
        self.state.nonfinite_steps = 0


class ThroughputMeter:
    """Samples per second over the window since the last `restart`."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """Start a new window (after the log line is written, so writing it is not counted)."""
        self.samples = 0
        self.start = time.perf_counter()

    def add(self, samples: int) -> None:
        self.samples += samples

    def rate(self) -> float:
        return self.samples / max(time.perf_counter() - self.start, 1e-9)
