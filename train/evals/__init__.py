"""Evaluator registry; importing this package registers every built-in evaluator."""

import importlib
import pkgutil

from vlp.train.evals.base import EVALUATORS, EvalConfig, EvalContext, Evaluator

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "common"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["EVALUATORS", "EvalConfig", "EvalContext", "Evaluator"]
