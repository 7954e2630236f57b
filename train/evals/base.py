"""Evaluator contract: a config class with `type` and `every`, and a `run` that returns metrics.

Evaluators run on every rank over that rank's share of the eval shards and reduce their counts
with collectives, so no rank idles in a barrier while rank 0 works alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from pydantic import Field, field_validator

from vlp.core.config import Strict
from vlp.core.registry import Registry


class EvalConfig(Strict):
    type: str
    # Run every N training steps (0: only at the end of training).
    every: int = Field(0, ge=0)
    batch_size: int = Field(128, ge=1)
    workers: int = Field(0, ge=0)
    # Shard spec of the evaluation data; `build` names an offline dataset to build if absent.
    data: Optional[str] = None
    build: Optional[str] = None
    build_dir: Optional[str] = None

    @field_validator("data")
    @classmethod
    def _no_shell(cls, value: Optional[str]) -> Optional[str]:
        from vlp.data_pipelines.config import refuse_shell_urls

        return refuse_shell_urls(value, hint="copy evaluation shards to a path") if value else value


@dataclass
class EvalContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    out_dir: Optional[Path] = None  # where evaluators put PNGs; None: no files
    step: int = 0


class Evaluator:
    config_class: ClassVar[type[EvalConfig]] = EvalConfig

    def __init__(self, config: EvalConfig) -> None:
        self.config = config

    def run(self, model: Any, context: EvalContext) -> dict[str, float]:  # pragma: no cover
        raise NotImplementedError


EVALUATORS: Registry[type[Evaluator]] = Registry("evaluator")
