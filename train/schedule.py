"""Learning-rate schedules (open_clip's cosine, const, const-cooldown; each with linear warmup) and the one helper every periodic action uses."""

from __future__ import annotations

import math
from typing import Any


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


def warmup_constant(step: int, warmup: int) -> float:
    """open_clip's `const`: linear warmup, then the base lr."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return 1.0


def warmup_constant_cooldown(step: int, total: int, warmup: int, cooldown: int, end_ratio: float = 0.0,
                             power: float = 1.0) -> float:
    """open_clip's `const-cooldown`: linear warmup, the base lr, then over the last `cooldown`
    steps `end + (1 - end) * (1 - e / cooldown) ** power` down to `end_ratio` at the final step."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    start = total - cooldown
    if step < start:
        return 1.0
    decay = (1 - min(1.0, (step - start) / max(1, cooldown))) ** power
    return end_ratio + (1 - end_ratio) * decay


def lr_multiplier(step: int, train: "Any") -> float:
    """The multiplier of every group's lr at optimizer step `step` (0-based) for `train.schedule`."""
    if train.schedule == "constant":
        return warmup_constant(step, train.warmup_steps)
    if train.schedule == "const-cooldown":
        return warmup_constant_cooldown(step, train.steps, train.warmup_steps, train.cooldown_steps,
                                        train.lr_cooldown_end / train.lr, train.lr_cooldown_power)
    return warmup_cosine(step, train.steps, train.warmup_steps, train.min_lr_ratio)
