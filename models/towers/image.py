"""Image towers: open_clip's VisionTransformer, any timm model by name, and the image tower of
any open_clip model config (`open_clip`: built by open_clip's own factory, with its weights).

Each takes `pretrained` (open_clip / timm checkpoint file, see models/pretrained.py), `strict`
and open_clip's locking options (`lock`, `lock_unlocked_groups`, `lock_freeze_bn_stats`).

Input: float (B, C, H, W), already normalised (what `preprocess(train)(image)` and the eval
loaders give), or uint8 (B, C, H, W) pixels (what the training loader sends, 4x fewer bytes over
PCIe), which the tower normalises itself with its own mean / std (`model_input`)."""

from __future__ import annotations

import functools
from typing import Literal, Optional, Sequence

import torch
from pydantic import Field
from torch import nn

from vlp.data_pipelines.image_transforms import ClipImageTransform, normalize_pixels
from vlp.models import pretrained as weights
from vlp.models.towers.base import (
    IMAGE_TOWERS,
    ImageLockFields,
    ImageTower,
    PretrainedFields,
    TowerConfig,
    share_with_zero3,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def model_input(tower: nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The tower's input: uint8 pixels (B, C, H, W) normalised with `mean` / `std` into the
    tower's parameter dtype (bit for bit what the eval loaders' `finish_batch` and a cast to that
    dtype give, `normalize_pixels`); any other dtype is taken as already normalised and returned
    as it is. mean / std are not buffers: they would enter the state dict (and every checkpoint
    and export) and be cast to bf16 with the module."""
    if images.dtype != torch.uint8:
        return images
    dtype = next(tower.parameters()).dtype
    return normalize_pixels(images, *_channel_stats(tuple(mean), tuple(std), images.device), dtype)


@functools.lru_cache(maxsize=None)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a host list copied to the GPU at every forward would sync the host.
    return (torch.tensor(mean, dtype=torch.float32, device=device),
            torch.tensor(std, dtype=torch.float32, device=device))


class OpenClipVitConfig(PretrainedFields, ImageLockFields, TowerConfig):
    """open_clip's `vision_cfg` (the same names as its model JSON files). `pretrained`: an open_clip
    checkpoint file (whole model: its `visual.*` part; or the image tower alone)."""

    type: Literal["open_clip_vit"] = "open_clip_vit"
    image_size: int = Field(224, ge=8)
    patch_size: int = Field(16, ge=1)
    width: int = Field(768, ge=8)
    layers: int = Field(12, ge=1)
    head_width: int = Field(64, ge=8)
    mlp_ratio: float = Field(4.0, gt=0)
    patch_dropout: float = Field(0.0, ge=0, lt=1)
    # When set, must equal model.embed_dim (open_clip JSON files carry their own embed_dim).
    embed_dim: Optional[int] = None
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def open_clip_cfg(self) -> dict:
        return dict(
            image_size=self.image_size,
            patch_size=self.patch_size,
            width=self.width,
            layers=self.layers,
            head_width=self.head_width,
            mlp_ratio=self.mlp_ratio,
            patch_dropout=self.patch_dropout,
        )


@IMAGE_TOWERS.register_by_type
class OpenClipVit(ImageTower):
    config_class = OpenClipVitConfig
    open_clip_layout = "visual"
    example_config = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}

    def __init__(self, config: OpenClipVitConfig, embed_dim: int) -> None:
        super().__init__(config, embed_dim)
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        vision_cfg = CLIPVisionCfg(**config.open_clip_cfg(), output_tokens=True)
        self.model = _build_vision_tower(embed_dim, vision_cfg)
        if config.pretrained:
            weights.load_tower_state(self.model, weights.open_clip_tower_state(config.pretrained, "visual."),
                                     f"model.image.pretrained={config.pretrained}", config.strict)
        if config.lock:
            self.model.lock(config.lock_unlocked_groups, config.lock_freeze_bn_stats)  # open_clip's own
        share_with_zero3(self, self.model.proj)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = model_input(self, images, self.config.mean, self.config.std)
        pooled, tokens = self.model(images)  # (B, E), (B, P, W) after ln_post
        if self.model.proj is not None:
            tokens = tokens @ self.model.proj  # (B, P, E): the same projection as the pooled token
        return {"image_embed": pooled, "image_tokens": tokens}

    def preprocess(self, train: bool):
        c = self.config
        return ClipImageTransform(c.image_size, train, c.mean, c.std)

    def input_shape(self) -> tuple[int, ...]:
        return (3, self.config.image_size, self.config.image_size)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {"model.class_embedding", "model.positional_embedding"}

    def layer_ids(self) -> dict[str, int]:
        return vit_layer_ids(self.model, "model.")


def vit_layer_ids(vit: nn.Module, prefix: str) -> dict[str, int]:
    """open_clip VisionTransformer depths, grouped as its `lock()` groups them: patch embedding,
    class / position embeddings and ln_pre 0, block i -> i + 1, ln_post / proj / pooling on top."""
    names = [name for name, _ in vit.named_parameters()]
    ids = weights.transformer_layer_ids(names, ("conv1", "class_embedding", "positional_embedding", "ln_pre"),
                                        "transformer.resblocks.", len(vit.transformer.resblocks))
    return {prefix + name: depth for name, depth in ids.items()}


class TimmConfig(PretrainedFields, ImageLockFields, TowerConfig):
    """Any timm model by name. `pretrained`: a timm weights file (.safetensors / .bin / .pth),
    loaded by timm's `pretrained_cfg_overlay=dict(file=...)` convention."""

    type: Literal["timm"] = "timm"
    model_name: str
    image_size: int = Field(224, ge=8)
    drop_path_rate: float = Field(0.0, ge=0, lt=1)
    # Extra keyword arguments for `timm.create_model` (e.g. {patch_size: 4}).
    kwargs: dict = Field(default_factory=dict)
    embed_dim: Optional[int] = None
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD


def create_timm_trunk(config: TimmConfig) -> tuple[nn.Module, dict]:
    """timm.create_model for `config` without a classifier, and the keyword arguments it was given
    besides num_classes / drop_path_rate (what an export must pass to rebuild it).

    `image_size` goes to timm as `img_size` when the model's class takes one (ViT, DeiT, EVA,
    Swin ...: their position embeddings depend on it); the class is asked, not the model name: a
    class without that argument refuses it before building anything, and is then built without."""
    import timm

    kwargs = dict(config.kwargs)
    load = weights.timm_pretrained_kwargs(config.pretrained, config.strict) if config.pretrained else {"pretrained": False}
    create = functools.partial(timm.create_model, config.model_name, num_classes=0,
                               drop_path_rate=config.drop_path_rate, **load)
    where = f"model.image.pretrained={config.pretrained}"
    try:
        if "img_size" not in kwargs:
            try:
                return create(**kwargs, img_size=config.image_size), {**kwargs, "img_size": config.image_size}
            except TypeError as error:
                if "img_size" not in str(error):
                    raise
        return create(**kwargs), kwargs
    except RuntimeError as error:  # timm's strict load_state_dict: torch's multi-line message
        if config.pretrained and "state_dict" in str(error):
            raise weights.timm_load_error(error, where) from None
        raise


@IMAGE_TOWERS.register_by_type
class TimmTower(ImageTower):
    """Any timm model without its classifier, plus a linear projection to `embed_dim`.

    The timm trunk lives at `self.trunk` with timm's own parameter names, so exporting it for
    `timm.create_model(..., pretrained_cfg_overlay=dict(file=...))` is a prefix strip;
    `self.timm_kwargs` is what else timm needs to rebuild it (`create_timm_trunk`).
    """

    config_class = TimmConfig
    open_clip_layout = "timm"
    trunk_format = "timm"
    # timm's ViT-Tiny cut to 2 blocks on a 4 x 4 patch grid (its class takes img_size).
    example_config = {"model_name": "vit_tiny_patch16_224", "image_size": 32, "kwargs": {"patch_size": 8, "depth": 2}}

    def __init__(self, config: TimmConfig, embed_dim: int) -> None:
        super().__init__(config, embed_dim)
        self.trunk, self.timm_kwargs = create_timm_trunk(config)
        width = self.trunk.num_features
        self.proj = nn.Linear(width, embed_dim, bias=False)
        self.num_prefix = int(getattr(self.trunk, "num_prefix_tokens", 0))
        # The tower calls the trunk's forward_features / forward_head, not the trunk itself, so
        # the trunk's ZeRO-3 hooks never run: its own parameters (a ViT's cls_token, pos_embed)
        # are gathered with the tower's. Its submodules are called, and gather their own.
        share_with_zero3(self, *self.trunk.parameters(recurse=False))
        if config.lock:
            from open_clip.timm_model import TimmModel

            # open_clip's TimmModel.lock touches only `self.trunk`, which this tower also has.
            TimmModel.lock(self, config.lock_unlocked_groups, config.lock_freeze_bn_stats)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = model_input(self, images, self.config.mean, self.config.std)
        features = self.trunk.forward_features(images)
        pooled = self.trunk.forward_head(features, pre_logits=True)  # (B, W)
        if features.ndim == 4:  # CNN feature map (B, W, h, w) -> tokens (B, h*w, W)
            tokens = features.flatten(2).transpose(1, 2)
        else:  # ViT-style (B, prefix + P, W)
            tokens = features[:, self.num_prefix :]
        return {"image_embed": self.proj(pooled), "image_tokens": self.proj(tokens)}

    def preprocess(self, train: bool):
        c = self.config
        return ClipImageTransform(c.image_size, train, c.mean, c.std)

    def input_shape(self) -> tuple[int, ...]:
        return (3, self.config.image_size, self.config.image_size)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        names = getattr(self.trunk, "no_weight_decay", lambda: set())()
        return {f"trunk.{n}" for n in names}

    def layer_ids(self) -> dict[str, int]:
        ids = weights.timm_layer_ids(self.trunk, "trunk.")
        return {**ids, "proj.weight": max(ids.values(), default=0) + 1}


class OpenClipModelImageConfig(ImageLockFields, TowerConfig):
    """The image tower of an open_clip model config (`model.open_clip` fills these in): `name` as
    open_clip takes it (`ViT-B-32`, `convnext_base_w`, `ViT-B-16-SigLIP`, `hf-hub:ORG/REPO`,
    `local-dir:DIR`), `pretrained` a tag (local cache only) or a checkpoint file."""

    type: Literal["open_clip"] = "open_clip"
    name: str
    pretrained: Optional[str] = None
    strict: bool = True
    embed_dim: Optional[int] = None


@IMAGE_TOWERS.register_by_type
class OpenClipModelImage(ImageTower):
    """`open_clip.create_model_and_transforms(name, ...)`'s `.visual`, under `self.model` (so our
    names are `image.model.<open_clip's visual name>`), with open_clip's own preprocessing.

    Token outputs: a VisionTransformer gives its patch tokens (projected as the pooled one); other
    trunks (timm, ModifiedResNet) give their pooled embedding as one token (B, 1, E)."""

    config_class = OpenClipModelImageConfig
    open_clip_layout = "factory"
    # open_clip's smallest built-in config (ViT-S/32, narrow text), random weights; E is its own.
    example_config = {"name": "ViT-S-32-alt", "embed_dim": 256}

    def __init__(self, config: OpenClipModelImageConfig, embed_dim: int) -> None:
        super().__init__(config, embed_dim)
        build = weights.take_open_clip_part(config.name, config.pretrained, config.strict, "image")
        self.model = build.model.visual
        self._preprocess = (build.preprocess_train, build.preprocess_val)
        self.image_size = int(self.model.preprocess_cfg["size"] if isinstance(self.model.preprocess_cfg["size"], int)
                              else self.model.preprocess_cfg["size"][-1])
        self.has_tokens = hasattr(self.model, "output_tokens") and hasattr(self.model, "transformer")
        if self.has_tokens:
            self.model.output_tokens = True
        if config.lock:
            self.model.lock(config.lock_unlocked_groups, config.lock_freeze_bn_stats)  # open_clip's own
        if isinstance(getattr(self.model, "proj", None), nn.Parameter):
            share_with_zero3(self, self.model.proj)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        # open_clip's own transform normalises in the worker; uint8 pixels from elsewhere are
        # normalised with the statistics that transform uses.
        images = model_input(self, images, self.model.preprocess_cfg["mean"], self.model.preprocess_cfg["std"])
        if not self.has_tokens:
            pooled = self.model(images)  # (B, E)
            return {"image_embed": pooled, "image_tokens": pooled[:, None]}
        pooled, tokens = self.model(images)  # (B, E), (B, P, W)
        if self.model.proj is not None:
            tokens = tokens @ self.model.proj  # (B, P, E)
        return {"image_embed": pooled, "image_tokens": tokens}

    def preprocess(self, train: bool):
        return self._preprocess[0] if train else self._preprocess[1]

    def input_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        names = getattr(self.model, "no_weight_decay", lambda: set())()
        return {f"model.{n}" for n in names}

    def layer_ids(self) -> dict[str, int]:
        if hasattr(self.model, "transformer") and hasattr(self.model.transformer, "resblocks"):
            return vit_layer_ids(self.model, "model.")
        if hasattr(self.model, "trunk"):  # open_clip's TimmModel: timm's grouping, the head on top
            ids = weights.timm_layer_ids(self.model.trunk, "model.trunk.")
            top = max(ids.values(), default=0) + 1
            return {**ids, **{f"model.{n}": top for n, _ in self.model.named_parameters() if not n.startswith("trunk.")}}
        return {}
