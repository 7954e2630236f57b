"""Head registry; importing this package registers every built-in head."""

import importlib
import pkgutil

from vlp.models.heads.base import HEADS, Head, HeadConfig, HeadInputs

# One file per head: import them all so their @HEADS.register decorators run.
for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["HEADS", "Head", "HeadConfig", "HeadInputs"]
