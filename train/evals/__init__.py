"""Evaluator registry; importing this package registers every evaluator in this folder."""

from vlp.core.registry import discover
from vlp.train.evals.base import EVALUATORS, EvalConfig, EvalContext, Evaluator

__all__ = ["EVALUATORS", "EvalConfig", "EvalContext", "Evaluator"]

discover(__name__)
