"""Shard lists and sizes, and how the eval loader deals shards to reading slots.

A reading slot is one (rank, worker role) pair: `world_size * workers` slots read disjoint
shares that together cover every sample once (see `slot_share`). The training loader's deal and
shuffle buffer live in `position`, where they are plain data a checkpoint can hold.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from vlp.data_pipelines.config import DataConfig
from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.tar_reader import is_local, local_path, read_shard


def expand_urls(spec: str) -> list[str]:
    """Shard URLs of a spec: brace ranges (`s/{000000..000009}.tar`) and `::`-joined lists."""
    from webdataset.shardlists import expand_urls as wds_expand

    urls = wds_expand(spec)
    if not urls:
        raise DataError(f"shard spec {spec!r} names no shard")
    return list(urls)


def check_urls(cfg: DataConfig) -> None:
    """Fail before training starts, with one line naming the path, when a local shard is missing."""
    for index, source in enumerate(cfg.train):
        for url in expand_urls(source.urls):
            if is_local(url) and not os.path.isfile(local_path(url)):
                raise DataError(f"data.train[{index}].urls: shard {url} not found")


def shard_sizes(urls: list[str]) -> list[int]:
    """Samples per shard: from the `sizes.json` beside each shard, else by counting tar members."""
    tables: dict[str, dict] = {}
    sizes = []
    for url in urls:
        count = None
        if is_local(url):
            path = Path(local_path(url))
            folder = str(path.parent)
            if folder not in tables:
                try:
                    tables[folder] = json.loads((path.parent / "sizes.json").read_text())
                except (OSError, ValueError):
                    tables[folder] = {}
            count = tables[folder].get(path.name)
        sizes.append(int(count) if count is not None else _count_samples(url))
    return sizes


def _count_samples(url: str) -> int:
    return sum(1 for sample in read_shard(url) if "__bad__" not in sample)


@dataclass(frozen=True)
class Share:
    """What one reading slot reads: the samples of `urls` (read in this order, counted across
    them) whose running index is `remainder` mod `modulo`."""

    urls: tuple[str, ...]
    modulo: int = 1
    remainder: int = 0


def slot_share(urls: list[str], slot: int, slots: int) -> Share:
    """Slot `slot` of `slots`: whole shards when there are at least as many shards as slots;
    else every slot reads all shards and keeps every `slots`-th sample, so shares stay balanced
    (one shard still splits across two ranks). Slots are disjoint and cover every sample."""
    if len(urls) >= slots:
        return Share(tuple(urls[slot::slots]))
    return Share(tuple(urls), slots, slot)


def read_share(share: Share) -> Iterator[dict]:
    """The raw samples of `share`, in order; bad-shard markers pass through uncounted."""
    index = 0
    for url in share.urls:
        for sample in read_shard(url):
            if "__bad__" not in sample:
                keep = index % share.modulo == share.remainder
                index += 1
                if not keep:
                    continue
            yield sample
