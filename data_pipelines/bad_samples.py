"""Bad samples: the reasons a sample is skipped, and the rule that stops a run with too many.

The loaders skip a corrupt image, a decompression bomb, an empty or non-UTF-8 caption, a missing
field and an unreadable or truncated shard, and count each in the next batch's "bad" dict
(reason -> count, every reason of `BAD_REASONS` present); the trainer feeds those counts to
`BadSampleMonitor`.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterable

from vlp.data_pipelines.config import DataConfig
from vlp.data_pipelines.errors import DataError

BAD_REASONS = ("bad_image", "image_too_large", "empty_caption", "bad_caption", "bad_shard", "missing_field")


class BadSample(Exception):
    """Raised while decoding a sample that is to be skipped; `reason` is one of `BAD_REASONS`."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def format_reasons(bad: Counter) -> str:
    """The non-zero counts by reason: "bad_image=3, empty_caption=1"."""
    return ", ".join(f"{reason}={count}" for reason, count in sorted(bad.items()) if count)


@dataclass
class BadSampleMonitor:
    """Stops the run when more than `max_fraction` of the last `window` samples were bad.

    Call `update(batch["bad"], len(batch["key"]), batch["bad_shards"])` with every batch (on
    every rank). Judged per whole batch: the window holds the most recent batches whose samples
    (good + bad) add up to at least `window`.
    """

    max_fraction: float
    window: int
    _entries: deque = field(default_factory=deque, init=False, repr=False)
    _good: int = field(default=0, init=False)
    _bad: Counter = field(default_factory=Counter, init=False, repr=False)

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "BadSampleMonitor":
        return cls(max_fraction=cfg.max_bad_fraction, window=cfg.bad_window)

    def update(self, bad: dict[str, int], batch_size: int, bad_shards: Iterable[str] = ()) -> None:
        """Add one batch: `bad` reason -> count skipped before it, `batch_size` good samples.
        Raises DataError naming the reasons and shards when the bad fraction is over the limit."""
        bad = Counter({reason: count for reason, count in bad.items() if count})
        self._entries.append((batch_size, bad, list(bad_shards)))
        self._good += batch_size
        self._bad.update(bad)
        while len(self._entries) > 1 and self._total() - self._entry_total(self._entries[0]) >= self.window:
            old_good, old_bad, _ = self._entries.popleft()
            self._good -= old_good
            self._bad.subtract(old_bad)
        bad_count = sum(self._bad.values())
        # Judge a full window; or earlier, when the bad samples alone already exceed the limit.
        if (self._total() >= self.window and bad_count > self.max_fraction * self._total()) or (
            bad_count > self.max_fraction * self.window
        ):
            shards = sorted({shard for _, _, entry_shards in self._entries for shard in entry_shards})
            raise DataError(
                f"{bad_count} of the last {self._total()} samples were bad ({format_reasons(self._bad)}), over "
                f"data.max_bad_fraction={self.max_fraction}; shards: {', '.join(shards) or 'unknown'}"
            )

    def _total(self) -> int:
        return self._good + sum(self._bad.values())

    @staticmethod
    def _entry_total(entry: tuple) -> int:
        return entry[0] + sum(entry[1].values())
