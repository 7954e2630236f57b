"""Data-source contract and registry for `vlp shards build SOURCE --out DIR`.

A source is a function `build(out_dir: Path, arg: str | None, **options) -> dict` registered
with `@SOURCES.register("name")`, one file per source in this folder; `SOURCE` on the command
line is `name` or `name:arg` (`folder:/data/imgs`, `csv:pairs.tsv`, `ct:/data/volumes`). It
writes shards with `data_pipelines.shards.write_shards` and returns a summary (counts per split,
paths).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from vlp.core.registry import Registry

SOURCES: Registry[Callable[..., dict]] = Registry("data source")


def build(spec: str, out_dir: str | Path, **options: Any) -> dict:
    """Build shards for `spec` ("name" or "name:arg") into `out_dir`."""
    name, _, arg = spec.partition(":")
    return SOURCES.get(name)(Path(out_dir), arg or None, **options)
