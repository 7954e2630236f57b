"""Evaluator contract: a config class with `type` and `every`; what is computed per batch
(`per_batch`) and how it reduces (`reduce`). The harness (`train/evals/harness.py`) owns reading,
device, dtype, eval mode, the ZeRO-3 lockstep and gathering.

Evaluators run on every rank over that rank's share of the eval shards and reduce their counts
with collectives, so no rank idles in a barrier while rank 0 works alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

from pydantic import Field, field_validator

from vlp.core.config import Strict
from vlp.core.registry import Registry
from vlp.train.evals.harness import EvalContext, EvalSource, Rows, evaluate, resolve_eval_source

__all__ = ["EVALUATORS", "EvalConfig", "EvalContext", "EvalExample", "Evaluator", "Rows"]


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


class Evaluator:
    """What one evaluation computes. `run` is the harness (`harness.evaluate`): `prepare`, then
    `per_batch` over this rank's batches of `source()`, then `reduce` of this rank's rows.

    towers: the forwards each `per_batch` call runs, in order (the throwaway forwards of a rank
    whose share ran out under ZeRO-3). example: how `tests/test_eval_harness.py` runs it
    (`EvalExample`)."""

    config_class: ClassVar[type[EvalConfig]] = EvalConfig
    towers: ClassVar[tuple[str, ...]] = ("image",)
    example: ClassVar[Optional["EvalExample"]] = None

    def __init__(self, config: EvalConfig) -> None:
        self.config = config

    def source(self) -> Optional[EvalSource]:
        """Where the samples come from (None: no data, `per_batch` is never called)."""
        return resolve_eval_source(self.config.data) if self.config.data else None

    def preprocess(self, model: Any) -> Callable:
        """The per-sample preprocess of the eval data (default: the image tower's eval one)."""
        return model.image.preprocess(train=False)

    def prepare(self, model: Any, context: EvalContext) -> None:
        """State every batch shares (e.g. class embeddings); the same forwards on every rank."""

    def per_batch(self, model: Any, batch: dict) -> Rows:  # pragma: no cover
        """One batch (its "image" on the device in the eval dtype) -> rows: tensors or lists
        whose first dimension is the batch's samples (or pairs). Runs exactly the forwards of
        `towers`."""
        raise NotImplementedError

    def reduce(self, rows: Rows, model: Any, context: EvalContext) -> dict[str, float]:  # pragma: no cover
        """This rank's rows (empty on a rank with no batches) -> metrics, equal on every rank
        (`harness.gather_rows`, `all_reduce_sum`)."""
        raise NotImplementedError

    def run(self, model: Any, context: EvalContext) -> dict[str, float]:
        return evaluate(self, model, context)


@dataclass(frozen=True)
class EvalExample:
    """A tiny run of an evaluator for the registry-driven test: the data source (`SOURCES`
    name and build options; `split` picks the shards `<source>-<split>-*.tar`, None: no data),
    the evaluator's options, and the model's heads and image tower (None: the test's 2-D ViT)."""

    source: Optional[str] = None
    build: tuple[tuple[str, Any], ...] = ()
    split: Optional[str] = "test"
    options: tuple[tuple[str, Any], ...] = ()
    heads: tuple[str, ...] = ("clip",)
    image: Optional[tuple[tuple[str, Any], ...]] = None


EVALUATORS: Registry[type[Evaluator]] = Registry("evaluator")
