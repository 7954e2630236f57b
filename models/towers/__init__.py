"""Tower registries; importing this package registers every built-in tower."""

from vlp.models.towers import image, text, volume  # noqa: F401  (registers)
from vlp.models.towers.base import (
    IMAGE_TOWERS,
    TEXT_TOWERS,
    ImageTower,
    TextTower,
    TowerConfig,
)

__all__ = ["IMAGE_TOWERS", "TEXT_TOWERS", "ImageTower", "TextTower", "TowerConfig"]
