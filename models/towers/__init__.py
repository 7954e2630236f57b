"""Tower registries; importing this package registers every built-in tower."""

from models.towers.base import IMAGE_TOWERS, TEXT_TOWERS, ImageTower, TextTower, TowerConfig
from models.towers import image, text, volume  # noqa: F401  (registers)

__all__ = ["IMAGE_TOWERS", "TEXT_TOWERS", "ImageTower", "TextTower", "TowerConfig"]
