"""The 3-D image tower: MONAI's ViT over CT volumes, plus projections to `embed_dim`.

Input volumes are (B, 1, H, W, D) in MONAI's axis order (RAS: H toward Right, W toward
Anterior, D toward Superior; see `data_pipelines/volume_transforms.py`), intensities in [-1, 1]. Patch tokens
come out in the row-major order of MONAI's patch grid (h, w, d): token p sits at grid cell
`divmod` of p over (H / ph, W / pw, D / pd), which the grounding evaluator and tests rely on.

The MONAI ViT is kept at `self.vit`, built with `classification=False` and MONAI's own parameter
names, so its state dict is exactly `UNETR(...).vit`'s (for UNETR's fixed 16^3 patches and 12
layers): export is a prefix strip. The optional class token therefore lives outside it
(`self.cls_token`), and the tower runs the ViT's submodules itself.

Attention runs through `scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA),
by MONAI's own `SABlock.use_flash_attention` switch, which `ViT` does not expose but which only
changes `SABlock.forward` (no parameter, so state dicts are unchanged). MONAI passes its
`dropout_rate` to SDPA whatever the module's mode, so a pre-forward hook sets it to 0 outside
training; with that, the SDPA path equals MONAI's einsum path (tests/test_ct_model.py).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlp.data_pipelines.volume_transforms import DEFAULT_HU_WINDOW, VolumePreprocess
from vlp.models.towers.base import IMAGE_TOWERS, ImageTower, TowerConfig, share_with_zero3


def patchify(volumes: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, H, W, D) -> (B, P, ph * pw * pd * C), patches in (h, w, d) row-major order
    (the order of MONAI's conv patch embedding followed by `flatten(2)`)."""
    b, c, h, w, d = volumes.shape
    ph, pw, pd = patch_size
    if h % ph or w % pw or d % pd:
        raise ValueError(f"masked_volume: volume {tuple(volumes.shape[2:])} is not divisible by patch_size {patch_size}")
    x = volumes.reshape(b, c, h // ph, ph, w // pw, pw, d // pd, pd)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, gh, gw, gd, ph, pw, pd, C)
    return x.reshape(b, (h // ph) * (w // pw) * (d // pd), ph * pw * pd * c)


def use_sdpa(attention: nn.Module, dropout_rate: float) -> None:
    """Switch a MONAI `SABlock` to `scaled_dot_product_attention` (MONAI's own flag), with the
    attention dropout applied in training only: MONAI hands `attention.dropout_rate` to SDPA as
    `dropout_p` in every mode, where its einsum path drops weights through an `nn.Dropout`."""

    def dropout_follows_mode(module: nn.Module, _args) -> None:
        module.dropout_rate = dropout_rate if module.training else 0.0

    attention.use_flash_attention = True
    attention.register_forward_pre_hook(dropout_follows_mode)


class MonaiViT3DConfig(TowerConfig):
    type: Literal["monai_vit3d"] = "monai_vit3d"
    roi: tuple[int, int, int] = (224, 224, 112)
    patch_size: tuple[int, int, int] = (16, 16, 8)
    hidden_size: int = Field(768, ge=8)
    mlp_dim: int = Field(3072, ge=8)
    num_layers: int = Field(12, ge=1)
    num_heads: int = Field(12, ge=1)
    dropout_rate: float = Field(0.0, ge=0, lt=1)
    qkv_bias: bool = False
    # The global embedding: mean of the patch tokens, a learned CLS token, or the element-wise
    # max over patches (a finding that fills 1 of 64 patches is 1/64 of a mean, all of a max).
    pool: Literal["mean", "cls", "max"] = "mean"
    # "shared": patch tokens go through the pooled embedding's projection (open_clip's
    # convention; with mean pooling the global embedding is then the mean of the token
    # embeddings); "separate": a projection of their own for the token-level heads.
    token_proj: Literal["shared", "separate"] = "shared"
    # Preprocessing (the tower owns it, as image towers own their mean/std).
    spacing: Optional[tuple[float, float, float]] = (1.5, 1.5, 3.0)
    hu_window: tuple[float, float] = DEFAULT_HU_WINDOW
    flip_prob: float = Field(0.0, ge=0, le=1)
    embed_dim: Optional[int] = None

    @model_validator(mode="after")
    def _divisible(self):
        for axis, (size, patch) in enumerate(zip(self.roi, self.patch_size)):
            if size % patch:
                raise ValueError(f"roi[{axis}]={size} is not a multiple of patch_size[{axis}]={patch}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        return self

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(size // patch for size, patch in zip(self.roi, self.patch_size))


@IMAGE_TOWERS.register_by_type
class MonaiViT3D(ImageTower):
    """volumes (B, 1, H, W, D) -> {"image_embed": (B, E), "image_tokens": (B, P, E)}."""

    config_class = MonaiViT3DConfig
    # Unequal sides (H, W, D) = (32, 16, 8) and patches (8, 8, 4): a grid of (4, 2, 2) = 16 tokens.
    example_config = {"roi": (32, 16, 8), "patch_size": (8, 8, 4), "hidden_size": 32, "mlp_dim": 64,
                      "num_layers": 1, "num_heads": 2}
    trunk_format = "monai"

    def __init__(self, config: MonaiViT3DConfig, embed_dim: int) -> None:
        super().__init__(config, embed_dim)
        from monai.networks.nets import ViT

        self.vit = ViT(
            in_channels=1,
            img_size=config.roi,
            patch_size=config.patch_size,
            hidden_size=config.hidden_size,
            mlp_dim=config.mlp_dim,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            proj_type="conv",
            classification=False,
            dropout_rate=config.dropout_rate,
            spatial_dims=3,
            qkv_bias=config.qkv_bias,
        )
        for block in self.vit.blocks:
            use_sdpa(block.attn, config.dropout_rate)
        if config.pool == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
            nn.init.normal_(self.cls_token, std=0.02)
        self.proj = nn.Linear(config.hidden_size, embed_dim, bias=False)
        if config.token_proj == "separate":
            self.token_proj = nn.Linear(config.hidden_size, embed_dim, bias=False)
        self.grad_checkpointing = False
        # The masked pass reads the patch embedding's conv weights and position embeddings
        # without calling those modules (a matmul on the kept patches): under ZeRO-3 they are
        # gathered with the tower's own parameters instead.
        embedding = self.vit.patch_embedding
        share_with_zero3(self, embedding.patch_embeddings.weight, embedding.patch_embeddings.bias,
                         embedding.position_embeddings)

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.config.grid

    def _check(self, volumes: torch.Tensor) -> None:
        if volumes.dim() != 5 or tuple(volumes.shape[2:]) != tuple(self.config.roi):
            raise ValueError(
                f"monai_vit3d expects volumes (B, 1, {', '.join(map(str, self.config.roi))}), got {tuple(volumes.shape)}"
            )

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch embeddings with positions (B, N, W_h) -> (pooled (B, W_h), tokens (B, N, W_h)) after the final norm."""
        prefix = 0
        if self.config.pool == "cls":
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)  # (B, 1 + N, W_h)
            prefix = 1
        for block in self.vit.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and self.training else block(x)
        x = self.vit.norm(x)
        tokens = x[:, prefix:]
        if prefix:
            pooled = x[:, 0]
        else:
            pooled = tokens.amax(dim=1) if self.config.pool == "max" else tokens.mean(dim=1)
        return pooled, tokens

    def features(self, volumes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """volumes (B, 1, H, W, D) -> (pooled (B, W_h), patch hidden states (B, P, W_h)) after the final norm."""
        self._check(volumes)
        return self._encode(self.vit.patch_embedding(volumes))  # (B, P, W_h), positions added

    def encode_visible(self, volumes: torch.Tensor, visible: torch.Tensor) -> dict[str, torch.Tensor]:
        """The masked pass (MAE's encoder): only the listed patches are embedded and encoded.

        volumes (B, 1, H, W, D); visible (B, K) long, patch indices in grid order, the same K for
        every row. Returns {"visible_image_tokens": (B, K, E)}, row k the token of patch
        `visible[:, k]`, projected like "image_tokens". The kept patches get their positions, as
        in MAE, so each token knows where it sits. Compute falls with the mask ratio: the patch
        embedding runs on the K patches only (MONAI's conv, whose kernel equals its stride, as a
        matmul on `patchify`), the blocks' linear layers cost K / P of the full pass and attention
        (K / P)^2. Measured: benchmarks/masked_volume_step.py.

        A call of the tower (`forward(volumes, visible)`), not a method call: ZeRO-3 gathers a
        module's parameters in the hooks around its call, and this pass reads the tower's own
        (cls_token, the shared patch embedding)."""
        return self(volumes, visible=visible)

    def _masked(self, volumes: torch.Tensor, visible: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check(volumes)
        embedding = self.vit.patch_embedding
        conv = embedding.patch_embeddings  # Conv3d(1, W_h, kernel = stride = patch_size)
        patches = patchify(volumes, self.config.patch_size)  # (B, P, V)
        visible = visible.to(patches.device)
        kept = patches.gather(1, visible.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))  # (B, K, V)
        x = kept @ conv.weight.flatten(1).T.to(kept.dtype) + conv.bias.to(kept.dtype)  # (B, K, W_h)
        x = embedding.dropout(x + embedding.position_embeddings[0, visible].to(x.dtype))
        _, tokens = self._encode(x)  # (B, K, W_h)
        token_proj = self.token_proj if self.config.token_proj == "separate" else self.proj
        return {"visible_image_tokens": token_proj(tokens)}

    def forward(self, volumes: torch.Tensor, visible: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """volumes (B, 1, H, W, D) -> the full pass; with visible (B, K), the masked pass
        (`encode_visible`)."""
        if visible is not None:
            return self._masked(volumes, visible)
        pooled, tokens = self.features(volumes)
        token_proj = self.token_proj if self.config.token_proj == "separate" else self.proj
        return {"image_embed": self.proj(pooled), "image_tokens": token_proj(tokens)}

    def input_shape(self) -> tuple[int, ...]:
        return (1, *self.config.roi)

    def preprocess(self, train: bool) -> VolumePreprocess:
        c = self.config
        return VolumePreprocess(train, spacing=c.spacing, roi=c.roi, hu_window=c.hu_window, flip_prob=c.flip_prob)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        names = {"vit.patch_embedding.position_embeddings"}
        if self.config.pool == "cls":
            names.add("cls_token")
        return names

    def monai_state_dict(self) -> dict[str, torch.Tensor]:
        """The ViT's weights under MONAI's names: `UNETR(...).vit.load_state_dict(...)` takes them."""
        return {name: tensor.detach().clone() for name, tensor in self.vit.state_dict().items()}
