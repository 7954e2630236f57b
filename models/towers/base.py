"""Tower contract and registries.

An image tower maps images (B, C, H, W) (or volumes (B, 1, D, H, W)) to
`{"image_embed": (B, E), "image_tokens": (B, P, E)}`; a text tower maps token ids (B, L) to
`{"text_embed": (B, E), "text_tokens": (B, L, E), "text_mask": (B, L) bool}`. E is the shared
`model.embed_dim`: towers own their projections, so heads never see tower widths.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from vlp.core.config import Strict
from vlp.core.registry import Registry


class TowerConfig(Strict):
    type: str


class Tower(nn.Module):
    config_class: ClassVar[type[TowerConfig]] = TowerConfig

    def __init__(self, config: TowerConfig, embed_dim: int) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = embed_dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        pass

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this tower) besides gains and biases to exempt from decay."""
        return set()


class ImageTower(Tower):
    def preprocess(self, train: bool) -> Any:
        """A picklable callable PIL image -> tensor (C, H, W), applied in loader workers."""
        raise NotImplementedError

    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample the tower takes: (C, H, W) for images, (1, H, W, D) for volumes.

        Evaluators ask it for a throwaway forward (ranks in lockstep under ZeRO-3)."""
        raise NotImplementedError


class TextTower(Tower):
    def tokenizer(self) -> Any:
        """A picklable callable list[str] -> LongTensor (N, L), applied in loader workers."""
        raise NotImplementedError


def share_with_zero3(module: nn.Module, *params) -> None:
    """Let `module.forward` use parameters of a child outside the child's own forward.

    Under ZeRO-3 a parameter is gathered for the forward of the module that owns it and may be
    partitioned again when that forward returns; projecting patch tokens with the tower's
    projection after the child returns needs it registered as external to the parent.
    """
    try:
        from deepspeed.zero import register_external_parameter
    except ImportError:  # pragma: no cover - deepspeed is a core dependency
        return
    for param in params:
        if isinstance(param, nn.Parameter):
            register_external_parameter(module, param)


IMAGE_TOWERS: Registry[type[ImageTower]] = Registry("image tower")
TEXT_TOWERS: Registry[type[TextTower]] = Registry("text tower")
