"""Masked volume modelling as in MAE, an auxiliary head on the volume tower's masked pass.

The model runs the tower twice when this head is on (`models/dual_encoder.py`): the full pass
that the contrastive heads read, and a masked pass in which the encoder sees only the visible
patches (`MonaiViT3D.encode_visible`), as MAE's encoder does. This head says which patches each
volume shows (`visible_patches`), and reconstructs the others: the visible tokens are embedded to
`decoder_dim`, put back on the full patch grid with a learned mask token at every masked cell, given
fixed 3-D sin-cos positions (MAE's decoder), run through a small transformer, and the masked
patches' voxels are regressed (MSE on per-patch standardised targets, MAE's `norm_pix_loss`;
visible patches carry no loss).

Needs batch["image"] (B, 1, H, W, D), the volume the tower saw, "visible_image_tokens" (B, K, E)
and "image_visible" (B, K) long, the patch indices (grid order, h, w, d row-major, as
`patchify`) of those tokens, K = P - round(mask_ratio * P) for every volume.

Masks are a function of (the head's `mask_seed`, its `mask_step`, the sample's key): no global
RNG, so a sample gets the same mask on any number of ranks, and both buffers are in the state dict,
so a resumed run draws the very masks the uninterrupted run draws. `mask_seed` is drawn once at
construction from the init RNG, which the trainer seeds alike on every rank.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from pydantic import Field
from torch import Tensor, nn

from vlp.core.errors import ConfigError
from vlp.data_pipelines.seeds import stable_seed
from vlp.models.heads.base import HEADS, Head, HeadConfig, HeadInputs
from vlp.models.towers.volume import patchify  # noqa: F401 - also this module's public name


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


def masked_count(patches: int, ratio: float) -> int:
    """round(ratio * P) masked patches, at least 1 and at most P - 1."""
    return min(max(1, round(ratio * patches)), patches - 1)


def keyed_visible_patches(keys: Sequence[str], seed: int, step: int, patches: int, ratio: float) -> Tensor:
    """The visible patches of each sample: (B, K) long, each row sorted, K = P - masked_count.

    Row b is a function of (seed, step, keys[b]) only (a generator of its own per sample), so it
    does not depend on the batch the sample sits in, on the rank, or on any global RNG."""
    hidden = masked_count(patches, ratio)
    rows = []
    for key in keys:
        generator = torch.Generator().manual_seed(stable_seed("masked_volume", seed, step, key))
        order = torch.rand(patches, generator=generator).argsort()  # (P,)
        rows.append(order[hidden:].sort().values)
    return torch.stack(rows)  # (B, K)


def mask_from_visible(visible: Tensor, patches: int) -> Tensor:
    """(B, K) visible indices -> (B, P) bool, True where the patch is masked (to reconstruct)."""
    mask = torch.ones(visible.shape[0], patches, dtype=torch.bool, device=visible.device)
    return mask.scatter(1, visible, False)


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
    patch_size: tuple[int, int, int] = (16, 16, 8)  # the tower's
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    decoder_dim: int = Field(128, ge=8)
    decoder_layers: int = Field(1, ge=1)
    decoder_heads: int = Field(4, ge=1)
    norm_target: bool = True


@HEADS.register("masked_volume")
class MaskedVolumeHead(Head):
    config_class = MaskedVolumeConfig
    config: MaskedVolumeConfig
    # "visible_image_tokens" asks the model for the tower's masked pass (and `visible_patches`).
    needs = ("visible_image_tokens", "image_visible")
    scores_embeddings = False
    # 2 x 2 x 2 voxel patches of a (4, 4, 2) volume: 4 patches, 1 visible at the default ratio.
    example_config = {"patch_size": (2, 2, 2), "decoder_dim": 8, "decoder_heads": 2}

    def __init__(self, config: MaskedVolumeConfig, embed_dim: int) -> None:
        super().__init__(config, embed_dim)
        if config.decoder_dim % config.decoder_heads:
            raise ConfigError(
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
        # Persistent, so checkpoints carry them: resume continues the same mask sequence.
        self.register_buffer("mask_seed", torch.randint(0, 2**62, (), dtype=torch.long))
        self.register_buffer("mask_step", torch.zeros((), dtype=torch.long))

    def no_weight_decay(self) -> set[str]:
        # A real decoder: its weight matrices decay like any other; only the mask token does not.
        return {"mask_token"}

    def grid_of(self, volumes: Tensor) -> tuple[int, int, int]:
        shape = tuple(volumes.shape[2:])
        if any(n % p for n, p in zip(shape, self.config.patch_size)):
            raise ValueError(f"masked_volume: volume {shape} is not divisible by patch_size {self.config.patch_size}")
        return tuple(n // p for n, p in zip(shape, self.config.patch_size))

    def visible_patches(self, batch: dict[str, Any], tower_grid: tuple[int, ...]) -> Tensor:
        """The patches the masked pass encodes: (B, K) long, on the CPU.

        batch: the data batch ("image" (B, 1, H, W, D); "key", B sample keys, which the loader
        sends; without them the row index stands in, and masks then depend on the batch layout).
        tower_grid: the tower's patch grid, checked against this head's `patch_size`. Each call in
        training mode advances `mask_step`, so every step draws new masks."""
        volumes = batch["image"]
        grid = self.grid_of(volumes)
        if tuple(grid) != tuple(tower_grid):
            raise ConfigError(  # the head's config disagrees with the tower's
                f"masked_volume: patch_size {self.config.patch_size} gives a {grid} grid but the tower's is "
                f"{tuple(tower_grid)}; set model.heads.masked_volume.patch_size to the tower's"
            )
        keys = batch.get("key") or [str(row) for row in range(volumes.shape[0])]
        visible = keyed_visible_patches(keys, int(self.mask_seed), int(self.mask_step), math.prod(grid),
                                        self.config.mask_ratio)
        if self.training:
            self.mask_step += 1
        return visible

    @classmethod
    def example_inputs(cls, config: MaskedVolumeConfig, batch_size: int, embed_dim: int, generator: torch.Generator):
        """Volumes (B, 1, 2p, 2p, p) for patch edge p (4 patches), the visible patches of each
        (drawn from `generator`) and their tokens (B, K, E)."""
        shape = tuple(n * p for n, p in zip((2, 2, 1), config.patch_size))
        patches = 4
        hidden = masked_count(patches, config.mask_ratio)
        order = torch.rand(batch_size, patches, generator=generator).argsort(dim=1)
        visible = order[:, hidden:].sort(dim=1).values  # (B, K)
        tokens = torch.randn(batch_size, patches - hidden, embed_dim, generator=generator)
        volumes = torch.randn(batch_size, 1, *shape, generator=generator)
        return {"visible_image_tokens": tokens, "image_visible": visible}, {"image": volumes}

    def forward(self, inputs: HeadInputs) -> dict[str, Any]:
        c = self.config
        volumes = inputs.batch["image"]
        tokens = inputs.local["visible_image_tokens"]  # (B, K, E)
        visible = inputs.local["image_visible"].to(tokens.device)  # (B, K)
        grid = self.grid_of(volumes)
        target = patchify(volumes.to(tokens.device), c.patch_size)  # (B, P, V)
        b, p, _ = target.shape
        if int(visible.max()) >= p:
            raise ValueError(
                f"masked_volume: visible patch {int(visible.max())} but patch_size {c.patch_size} gives {p} "
                f"patches; set model.heads.masked_volume.patch_size to the tower's"
            )
        mask = mask_from_visible(visible, p)  # (B, P), True = reconstruct
        embedded = self.embed(tokens)  # (B, K, Dd)
        # The decoder's input: the mask token everywhere, the visible tokens scattered back in place.
        x = self.mask_token.to(embedded.dtype).expand(b, p, -1)
        x = x.scatter(1, visible.unsqueeze(-1).expand(-1, -1, embedded.shape[-1]), embedded)  # (B, P, Dd)
        x = x + sincos_positions(grid, c.decoder_dim).to(x.device, x.dtype)
        prediction = self.predict(self.norm(self.decoder(x)))  # (B, P, V)
        loss = reconstruction_loss(prediction, target, mask, c.norm_target)
        return {"loss": loss, "logging": {"masked_patches": mask.float().sum(1).mean()}}
