"""Learning-rate schedule and the one helper every periodic action uses."""

from __future__ import annotations

import math


def itstime(step: int, every: int, last: int | None = None) -> bool:
    """True when a periodic action (log, checkpoint, eval) is due after `step` (1-based).

    `every=0` means never periodically; `last` (the final step) always counts when every > 0.
    """
    if every <= 0:
        return False
    return step % every == 0 or (last is not None and step == last)


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warmup, cosine decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
