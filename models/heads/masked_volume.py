"""Masked patch reconstruction of the CT volume (MAE-style), an auxiliary head.

Needs batch["image"] (B, 1, H, W, D), the volume the tower saw, and the encoder's
"image_tokens" (B, P, E) in MONAI's patch-grid order (h, w, d row-major), P = prod(grid) with
grid = (H / ph, W / pw, D / pd) for the configured `patch_size` (the tower's).

Because the volume tower runs once per step (its output also feeds the contrastive heads), the
encoder sees every patch; masking happens AFTER the encoder: a random `mask_ratio` of the patch
tokens is replaced by a learned mask token, a small transformer decoder (fixed 3-D sin-cos
positions, as MAE's decoder) sees the rest, and the masked patches' voxels are regressed (MSE,
per-patch normalised targets as MAE's `norm_pix_loss`). This differs from MAE, whose encoder
sees only the visible patches: here the visible tokens may carry some of their masked
neighbours' content through encoder attention, so the task is easier, but it still makes
every patch token describe its own voxels and their surroundings, which the sentence-to-patch
alignment relies on. A true MAE would need a second, masked encoder pass per step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from vlp.models.heads.base import HEADS, Head, HeadConfig, HeadInputs


def patchify(volumes: Tensor, patch_size: tuple[int, int, int]) -> Tensor:
    """(B, C, H, W, D) -> (B, P, ph * pw * pd * C), patches in (h, w, d) row-major order
    (the order of MONAI's conv patch embedding followed by `flatten(2)`)."""
    b, c, h, w, d = volumes.shape
    ph, pw, pd = patch_size
    if h % ph or w % pw or d % pd:
        raise ValueError(f"masked_volume: volume {tuple(volumes.shape[2:])} is not divisible by patch_size {patch_size}")
    x = volumes.reshape(b, c, h // ph, ph, w // pw, pw, d // pd, pd)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, gh, gw, gd, ph, pw, pd, C)
    return x.reshape(b, (h // ph) * (w // pw) * (d // pd), ph * pw * pd * c)


def sincos_positions(grid: tuple[int, int, int], dim: int) -> Tensor:
    """Fixed 3-D sin-cos position embeddings (P, dim) for a (gh, gw, gd) grid, row-major."""
    per_axis = 2 * math.ceil(dim / 6)
    coords = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in grid], indexing="ij"), -1)
    coords = coords.reshape(-1, 3)  # (P, 3)
    freqs = 1.0 / (10000 ** (torch.arange(per_axis // 2, dtype=torch.float32) / max(per_axis // 2, 1)))
    parts = []
    for axis in range(3):
        angles = coords[:, axis : axis + 1] * freqs  # (P, per_axis / 2)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)[:, :dim]


def random_patch_mask(batch: int, patches: int, ratio: float, device: torch.device) -> Tensor:
    """(B, P) bool, exactly round(ratio * P) True per row (at least 1, at most P - 1)."""
    count = min(max(1, round(ratio * patches)), patches - 1)
    order = torch.rand(batch, patches, device=device).argsort(dim=1)
    mask = torch.zeros(batch, patches, dtype=torch.bool, device=device)
    return mask.scatter(1, order[:, :count], True)


def reconstruction_loss(prediction: Tensor, target: Tensor, mask: Tensor, norm_target: bool = True) -> Tensor:
    """Mean squared error over the masked patches.

    prediction, target: (B, P, V); mask: (B, P) bool. With `norm_target`, each target patch is
    standardised by its own mean and variance (MAE's norm_pix_loss). fp32 scalar."""
    prediction, target = prediction.float(), target.float()
    if norm_target:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, unbiased=False)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (prediction - target).pow(2).mean(dim=-1)  # (B, P)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)


class MaskedVolumeConfig(HeadConfig):
    patch_size: tuple[int, int, int] = (16, 16, 8)
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    decoder_dim: int = Field(128, ge=8)
    decoder_layers: int = Field(1, ge=1)
    decoder_heads: int = Field(4, ge=1)
    norm_target: bool = True


@HEADS.register("masked_volume")
class MaskedVolumeHead(Head):
    config_class = MaskedVolumeConfig
    config: MaskedVolumeConfig
    needs = ("image_tokens",)
    scores_embeddings = False
    # 2 x 2 x 2 voxel patches of a (4, 4, 2) volume: the 4 tokens of the base example.
    example_config = {"patch_size": (2, 2, 2), "decoder_dim": 8, "decoder_heads": 2}

    def __init__(self, config: MaskedVolumeConfig, embed_dim: int) -> None:
        super().__init__(config, embed_dim)
        if config.decoder_dim % config.decoder_heads:
            raise ValueError(
                f"model.heads.masked_volume: decoder_dim={config.decoder_dim} is not a multiple of decoder_heads"
            )
        voxels = int(math.prod(config.patch_size))
        self.embed = nn.Linear(embed_dim, config.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        layer = nn.TransformerEncoderLayer(
            config.decoder_dim, config.decoder_heads, 4 * config.decoder_dim, dropout=0.0, batch_first=True,
            norm_first=True,
        )
        self.decoder = nn.TransformerEncoder(layer, config.decoder_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.decoder_dim)
        self.predict = nn.Linear(config.decoder_dim, voxels)

    def no_weight_decay(self) -> set[str]:
        # A real decoder: its weight matrices decay like any other; only the mask token does not.
        return {"mask_token"}

    @classmethod
    def example_inputs(cls, config: MaskedVolumeConfig, batch_size: int, embed_dim: int, generator: torch.Generator):
        """The base example plus batch["image"]: volumes (B, 1, 2p, 2p, p) for patch edge p, i.e. 4 patches."""
        encoded, batch = super().example_inputs(config, batch_size, embed_dim, generator)
        shape = tuple(n * p for n, p in zip((2, 2, 1), config.patch_size))
        return encoded, {**batch, "image": torch.randn(batch_size, 1, *shape, generator=generator)}

    def forward(self, inputs: HeadInputs) -> dict[str, Any]:
        c = self.config
        volumes = inputs.batch["image"]
        tokens = inputs.local["image_tokens"]  # (B, P, E)
        target = patchify(volumes.to(tokens.device), c.patch_size)  # (B, P, V)
        grid = tuple(n // p for n, p in zip(volumes.shape[2:], c.patch_size))
        if target.shape[1] != tokens.shape[1]:
            raise ValueError(
                f"masked_volume: {tokens.shape[1]} image tokens but patch_size {c.patch_size} gives "
                f"{target.shape[1]} patches; set model.heads.masked_volume.patch_size to the tower's"
            )
        b, p, _ = tokens.shape
        mask = random_patch_mask(b, p, c.mask_ratio, tokens.device)  # (B, P)
        x = self.embed(tokens)  # (B, P, Dd)
        x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype).expand(b, p, -1), x)
        x = x + sincos_positions(grid, c.decoder_dim).to(x.device, x.dtype)
        prediction = self.predict(self.norm(self.decoder(x)))  # (B, P, V)
        loss = reconstruction_loss(prediction, target, mask, c.norm_target)
        return {"loss": loss, "logging": {"masked_patches": mask.float().sum(1).mean()}}
