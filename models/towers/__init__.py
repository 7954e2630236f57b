"""Tower registries; importing this package registers every built-in tower."""

from models.towers.base import IMAGE_TOWERS, TEXT_TOWERS, ImageTower, TextTower, TowerConfig
from models.towers import image, text  # noqa: F401  (registers)

try:  # the 3D tower needs monai, a core dependency; keep import errors readable
    from models.towers import volume  # noqa: F401
except ImportError as error:  # pragma: no cover
    if "models.towers.volume" not in str(error) and "volume" not in str(error):
        raise

__all__ = ["IMAGE_TOWERS", "TEXT_TOWERS", "ImageTower", "TextTower", "TowerConfig"]
