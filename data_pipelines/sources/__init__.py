"""Data sources (`base.py`: the contract, `SOURCES`, `build`); importing this package registers
every source in this folder."""

from vlp.core.registry import discover
from vlp.data_pipelines.sources.base import SOURCES, build

__all__ = ["SOURCES", "build"]

discover(__name__)
