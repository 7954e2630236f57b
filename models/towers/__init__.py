"""Tower registries; importing this package registers every tower in this folder."""

from vlp.core.registry import discover
from vlp.models.towers.base import IMAGE_TOWERS, TEXT_TOWERS, ImageTower, TextTower, TowerConfig

__all__ = ["IMAGE_TOWERS", "TEXT_TOWERS", "ImageTower", "TextTower", "TowerConfig"]

discover(__name__)
