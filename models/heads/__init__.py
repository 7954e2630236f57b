"""Head registry; importing this package registers every head in this folder (one per file)."""

from vlp.core.registry import discover
from vlp.models.heads.base import HEADS, Head, HeadConfig, HeadInputs

__all__ = ["HEADS", "Head", "HeadConfig", "HeadInputs"]

discover(__name__)
