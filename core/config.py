"""The strict config base: every config section in vlp derives from `Strict`.

An unknown key, a wrong type, NaN or infinity fails at load, before any work starts, and the
error names the dotted key path (`train.config.load_config` formats it, with the nearest key).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A pydantic model that forbids unknown keys and non-finite numbers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
