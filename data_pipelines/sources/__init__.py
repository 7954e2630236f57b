"""Data-source registry for `vlp shards build SOURCE --out DIR`.

A source is a function `build(out_dir: Path, arg: str | None, **options) -> dict` registered
with `@SOURCES.register("name")`; `SOURCE` on the command line is `name` or `name:arg`
(`folder:/data/imgs`, `csv:pairs.tsv`, `ct:/data/volumes`). It writes shards with
`data_pipelines.shards.write_shards` and returns a summary (counts per split, paths).
Every module in this package is imported so its sources register.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, Callable

from vlp.core.registry import Registry

SOURCES: Registry[Callable[..., dict]] = Registry("data source")


def build(spec: str, out_dir: str | Path, **options: Any) -> dict:
    """Build shards for `spec` ("name" or "name:arg") into `out_dir`."""
    name, _, arg = spec.partition(":")
    return SOURCES.get(name)(Path(out_dir), arg or None, **options)


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
