"""CLIP's symmetric InfoNCE loss (Radford et al. 2021) and its head.

`clip_loss` equals open_clip's `ClipLoss(local_loss=True, gather_with_grad=True, rank, world_size)`
in loss and gradients: this rank's B images are scored against all N texts of the global batch
(and its B texts against all N images), the positives sitting at columns rank * B + i. Each rank
only ever builds (B, N) logits, never (N, N). From `TILED_MIN_LOGITS_*` logits per direction it
switches to the memory-bounded kernels of `models/heads/tiled.py`, which hold one tile of logits
at a time.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from vlp.models.heads.base import HEADS, Head, HeadConfig, HeadInputs, MatryoshkaConfig, bounded, prefix_normed
from vlp.models.heads.tiled import (
    DEFAULT_TILE_SIZE,
    tiled_cross_entropy,
    tiled_symmetric_cross_entropy,
)

# Logits per direction (B * N) above which `clip_loss` uses the tiled kernels (CPU, fp32, E=512,
# forward + backward, 2 threads; see the final report of benchmarks/loss_memory.py for large N).
# One rank: the symmetric kernel scores each block once for both directions and never writes an
# (N, N) softmax, so it ties the dense path at N = 2048 (0.09 s vs 0.10 s) and wins beyond
# (N = 4096: 0.34 s vs 0.50 s; N = 8192: 1.4 s vs 2.7 s).
TILED_MIN_LOGITS_ONE_RANK = 2048 * 2048
# Several ranks: i2t and t2i are different (B, N) matrices, so the tiled path scores each block
# twice (forward and backward) per direction; it is ~20% slower at 1024 x 4096 and ties or wins from
# 2048 x 8192 (0.59 s vs 0.79 s). Above these sizes the dense path's ~6 fp32 copies of the
# logits (two logit matrices, their softmax and gradients) are pure cost.
TILED_MIN_LOGITS_SHARDED = 4096 * 4096


def scaled_dot(queries: Tensor, keys: Tensor, logit_scale: Tensor) -> Tensor:
    """CLIP logits of a block: (b, E), (n, E), scale [1] or [] -> (b, n).

    The scale multiplies the queries, not the (b, n) product, as open_clip's
    `logit_scale * image @ text.T` does; its gradient then costs O(b * E), not O(b * n)."""
    return (queries * logit_scale) @ keys.T


def _global_features(name: str, local: Tensor, gathered: Tensor | None, rank: int) -> Tensor:
    """Validated (N, E) features of all ranks; `local` itself on one rank."""
    if gathered is None:
        if rank != 0:
            raise ValueError(f"{name}: rank is {rank} but no gathered features were given")
        return local
    batch = local.shape[0]
    if gathered.dim() != 2 or gathered.shape[1] != local.shape[1] or gathered.shape[0] < (rank + 1) * batch:
        raise ValueError(
            f"{name}: gathered features {tuple(gathered.shape)} do not hold rank {rank}'s {tuple(local.shape)} block"
        )
    return gathered.float()


def clip_loss_and_accuracy(
    image: Tensor,
    text: Tensor,
    logit_scale: Tensor,
    *,
    gathered_image: Tensor | None = None,
    gathered_text: Tensor | None = None,
    rank: int = 0,
    tile_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """`clip_loss` plus the image->text top-1 accuracy of this rank's images among all N texts.

    The accuracy (0-dim, no gradient) counts a row as correct when its positive text scores
    highest; the tiled path gets that from the running row max it keeps anyway."""
    if image.dim() != 2 or image.shape != text.shape:
        raise ValueError(f"clip_loss: image {tuple(image.shape)} and text {tuple(text.shape)} must both be (B, E)")
    image, text, logit_scale = image.float(), text.float(), logit_scale.float()
    all_image = _global_features("clip_loss gathered_image", image, gathered_image, rank)
    all_text = _global_features("clip_loss gathered_text", text, gathered_text, rank)
    if all_image.shape != all_text.shape:
        raise ValueError(f"clip_loss: gathered image {tuple(all_image.shape)} and text {tuple(all_text.shape)} differ")
    batch, num_global = image.shape[0], all_text.shape[0]
    labels = torch.arange(batch, device=image.device) + rank * batch
    one_rank = num_global == batch  # then i2t and t2i are the two directions of one matrix
    threshold = TILED_MIN_LOGITS_ONE_RANK if one_rank else TILED_MIN_LOGITS_SHARDED
    if tile_size is None and batch * num_global >= threshold:
        tile_size = DEFAULT_TILE_SIZE

    if tile_size is None:
        logits_per_image = scaled_dot(image, all_text, logit_scale)  # (B, N)
        logits_per_text = logits_per_image.T if one_rank else scaled_dot(text, all_image, logit_scale)
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        is_top1 = logits_per_image.detach().argmax(dim=1) == labels
    elif one_rank:
        rows, columns = tiled_symmetric_cross_entropy(image, text, scaled_dot, tile_size, logit_scale)
        loss = (rows.loss.mean() + columns.loss.mean()) / 2
        is_top1 = rows.is_top1
    else:
        i2t = tiled_cross_entropy(image, all_text, labels, scaled_dot, tile_size, logit_scale)
        t2i = tiled_cross_entropy(text, all_image, labels, scaled_dot, tile_size, logit_scale)
        loss = (i2t.loss.mean() + t2i.loss.mean()) / 2
        is_top1 = i2t.is_top1
    accuracy = is_top1.float().mean()
    return loss, accuracy


def clip_loss(
    image: Tensor,
    text: Tensor,
    logit_scale: Tensor,
    *,
    gathered_image: Tensor | None = None,
    gathered_text: Tensor | None = None,
    rank: int = 0,
    tile_size: int | None = None,
) -> Tensor:
    """Symmetric InfoNCE of this rank's pairs against the global batch (fp32 scalar).

    image, text: (B, E) this rank's L2-normalised features, row i of each a positive pair.
    logit_scale: the multiplier (1 / temperature), shape [1] or [].
    gathered_image, gathered_text: (N, E) every rank's features in rank order, this rank's block
        at rows [rank * B, (rank + 1) * B) (None on one rank: image and text themselves).
    tile_size: None picks dense or tiled by size (`TILED_MIN_LOGITS_*`); an int forces the tiled
        kernels with that tile edge.
    """
    loss, _ = clip_loss_and_accuracy(
        image, text, logit_scale, gathered_image=gathered_image, gathered_text=gathered_text, rank=rank,
        tile_size=tile_size,
    )
    return loss


class ClipConfig(HeadConfig):
    init_temperature: float = Field(0.07, gt=0)
    """Initial softmax temperature; the learnable parameter is log(1 / temperature)."""
    max_logit_scale: float = Field(100.0, gt=1)
    """1 / temperature stays in [1, max_logit_scale], open_clip's range, by `base.bounded`."""
    learn_temperature: bool = True
    tile_size: int | None = Field(None, ge=1)
    """None: dense below `TILED_MIN_LOGITS_*` logits, tiled above; an int forces tiling."""
    matryoshka: MatryoshkaConfig | None = None
    """Nested prefix dims with weights: the loss summed over re-normalised prefixes (base.py)."""

    @model_validator(mode="after")
    def _starts_below_clamp(self) -> "ClipConfig":
        scale = 1.0 / self.init_temperature
        if not 1.0 <= scale <= self.max_logit_scale:
            where = f"above max_logit_scale {self.max_logit_scale}" if scale > 1 else "below 1 (open_clip's lower bound)"
            raise ValueError(f"init_temperature {self.init_temperature} gives logit scale {scale:.4g}, {where}")
        return self


@HEADS.register("clip")
class ClipHead(Head):
    """Learnable temperature (log of the logit scale, shape [1]) around `clip_loss`."""

    config_class = ClipConfig
    gathered_keys = ("image_normed", "text_normed")
    # open_clip's CLIP computes this very loss and score with its own logit_scale.
    open_clip_scalars = ("logit_scale",)
    config: ClipConfig

    def __init__(self, config: ClipConfig, embed_dim: int) -> None:
        super().__init__(config, embed_dim)
        init = torch.full((1,), math.log(1.0 / config.init_temperature))
        self.logit_scale = nn.Parameter(init, requires_grad=config.learn_temperature)
        self.check_matryoshka()

    @staticmethod
    def logit_scale_bounds(config: ClipConfig) -> tuple[float, float]:
        """[low, high] of the log logit scale: open_clip's clamp(0, log(100)) after each step."""
        return 0.0, math.log(config.max_logit_scale)

    def scale(self) -> Tensor:
        """The multiplier exp(logit_scale) in [1, max_logit_scale], shape [1], fp32, by the
        heads' bounded-parameter rule (`base.bounded`: an overshoot can come back, any ZeRO stage)."""
        return bounded(self.logit_scale.float(), *self.logit_scale_bounds(self.config)).exp()

    @classmethod
    def to_open_clip_scalars(cls, config: ClipConfig, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """The bound `scale` applies, applied once: open_clip's exp(logit_scale) is the scale we used."""
        return {"logit_scale": params["logit_scale"].float().reshape(()).clamp(*cls.logit_scale_bounds(config))}

    def forward(self, inputs: HeadInputs) -> dict[str, Any]:
        logit_scale = self.scale()
        image, text = inputs.local["image_normed"], inputs.local["text_normed"]
        gathered_image, gathered_text = inputs.gathered.get("image_normed"), inputs.gathered.get("text_normed")
        if self.config.matryoshka is None:
            loss, accuracy = clip_loss_and_accuracy(
                image, text, logit_scale, gathered_image=gathered_image, gathered_text=gathered_text,
                rank=inputs.rank, tile_size=self.config.tile_size,
            )
            return {"loss": loss, "logging": {"logit_scale": logit_scale.detach()[0], "accuracy": accuracy}}
        # Matryoshka: one encoder pass, one loss per nested prefix, each through the same dense or
        # tiled kernel (memory stays linear in the global batch when tiled), weighted and summed.
        loss = image.new_zeros((), dtype=torch.float32)
        logging: dict[str, Any] = {"logit_scale": logit_scale.detach()[0]}
        for dim, weight in self.config.matryoshka.pairs():
            prefix_loss, accuracy = clip_loss_and_accuracy(
                prefix_normed(image, dim), prefix_normed(text, dim), logit_scale,
                gathered_image=prefix_normed(gathered_image, dim), gathered_text=prefix_normed(gathered_text, dim),
                rank=inputs.rank, tile_size=self.config.tile_size,
            )
            loss = loss + weight * prefix_loss
            logging[f"loss@{dim}"], logging[f"accuracy@{dim}"] = prefix_loss.detach(), accuracy
        logging["accuracy"] = accuracy  # the largest prefix's
        return {"loss": loss, "logging": logging}
