"""Tower contract and registries.

An image tower maps images (B, C, H, W) (or volumes (B, 1, H, W, D)) to
`{"image_embed": (B, E), "image_tokens": (B, P, E)}`; a text tower maps token ids (B, L) to
`{"text_embed": (B, E), "text_tokens": (B, L, E), "text_mask": (B, L) bool}`. E is the shared
`model.embed_dim`: towers own their projections, so heads never see tower widths.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

from pydantic import Field, model_validator
from torch import nn

from vlp.core.config import Strict
from vlp.core.registry import Registry


class TowerConfig(Strict):
    type: str


class PretrainedFields(Strict):
    """`pretrained`: where the tower's weights come from (the tower says what it reads); `strict`:
    missing or unexpected keys are an error (false: loaded anyway, the keys listed in the log)."""

    pretrained: Optional[str] = None
    strict: bool = True


class ImageLockFields(Strict):
    """open_clip's `--lock-image`, `--lock-image-unlocked-groups`, `--lock-image-freeze-bn-stats`:
    locked parameters get no gradient (and so no optimizer state); the last N layer groups stay
    trainable; BatchNorm statistics of the locked groups are frozen (FrozenBatchNorm2d)."""

    lock: bool = False
    lock_unlocked_groups: int = Field(0, ge=0)
    lock_freeze_bn_stats: bool = False

    @model_validator(mode="after")
    def _lock_options_need_lock(self):
        if (self.lock_unlocked_groups or self.lock_freeze_bn_stats) and not self.lock:
            raise ValueError("lock_unlocked_groups / lock_freeze_bn_stats need lock: true")
        return self


class TextLockFields(Strict):
    """open_clip's `--lock-text`, `--lock-text-unlocked-layers`, `--lock-text-freeze-layer-norm`
    (open_clip's `lock()` default: LayerNorms of locked layers are frozen with them)."""

    lock: bool = False
    lock_unlocked_layers: int = Field(0, ge=0)
    lock_freeze_layer_norm: bool = True

    @model_validator(mode="after")
    def _lock_options_need_lock(self):
        if self.lock_unlocked_layers and not self.lock:
            raise ValueError("lock_unlocked_layers needs lock: true")
        return self


class Tower(nn.Module):
    config_class: ClassVar[type[TowerConfig]] = TowerConfig

    # -- capabilities: what exporters ask of a tower (by its registered class), never its type name.
    # open_clip_layout: where open_clip's CLIP holds this tower's weights: "visual" (`model` is
    # open_clip's VisionTransformer), "timm" (`trunk` + `proj`, open_clip's TimmModel), "text"
    # (`model` is open_clip's TextTransformer), "factory" (a part of one open_clip model built by
    # open_clip's factory); None: open_clip's CLIP cannot hold it.
    open_clip_layout: ClassVar[Optional[str]] = None
    # trunk_format: the export format that holds this tower's trunk alone ("timm", "monai"), if any.
    trunk_format: ClassVar[Optional[str]] = None

    # -- a tiny example, so tests/test_tower_registry.py builds and runs every registered tower --
    # Config fields (besides `type`) of a small instance that builds offline with random weights
    # (a tower that reads files names installed ones; missing, it raises InputNotFound and the
    # test skips). None: the tower gives no example, which that test reports as a failure.
    example_config: ClassVar[Optional[dict[str, Any]]] = None

    def __init__(self, config: TowerConfig, embed_dim: int) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = embed_dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        pass

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this tower) besides gains and biases to exempt from decay."""
        return set()

    def layer_ids(self) -> dict[str, int]:
        """Depth of each parameter (relative name -> 0 for the embeddings ... top) for layer-wise
        lr decay: a parameter at depth d of a tower whose deepest is D gets lr * decay ** (D - d).
        Names left out sit at the top (no decay); the default leaves out all of them."""
        return {}


class ImageTower(Tower):
    def preprocess(self, train: bool) -> Any:
        """A picklable callable PIL image -> tensor (C, H, W), applied in loader workers."""
        raise NotImplementedError

    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample the tower takes: (C, H, W) for images, (1, H, W, D) for volumes.

        Evaluators ask it for a throwaway forward (ranks in lockstep under ZeRO-3)."""
        raise NotImplementedError

    # Optional: a tower with a patch grid (`grid`) may offer a masked pass for MAE-style heads.
    def encode_visible(self, images: Any, visible: Any) -> dict[str, Any]:
        """images and visible (B, K) long patch indices -> {"visible_image_tokens": (B, K, E)}:
        only the listed patches go through the encoder."""
        raise NotImplementedError(f"{type(self).__name__} has no masked pass (encode_visible)")


class TextTower(Tower):
    def tokenizer(self) -> Any:
        """A picklable callable list[str] -> LongTensor (N, L), applied in loader workers."""
        raise NotImplementedError


def share_with_zero3(module: nn.Module, *params) -> None:
    """Let `module.forward` use parameters of a child outside the child's own forward.

    Under ZeRO-3 a parameter is gathered for the forward of the module that owns it and may be
    partitioned again when that forward returns; projecting patch tokens with the tower's
    projection after the child returns needs it registered as external to the parent: the
    parent's hooks then gather it with the parent's own and keep it until the parent returns
    (and again for its backward). Outside ZeRO-3 the registration is an unused attribute.

    `deepspeed.zero` is an attribute of the deepspeed package (`deepspeed.runtime.zero`), not an
    importable module: `from deepspeed.zero import ...` raises ImportError, which once made this
    a silent no-op (the tower's proj partitioned again before the tower used it).
    """
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for param in params:
        if isinstance(param, nn.Parameter):
            register_external_parameter(module, param)


IMAGE_TOWERS: Registry[type[ImageTower]] = Registry("image tower")
TEXT_TOWERS: Registry[type[TextTower]] = Registry("text tower")
