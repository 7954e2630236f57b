"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023) and its head.

Every (image, text) pair is an independent binary problem: positive for the B matching pairs of
this rank, negative for all others, including every text of every other rank. `siglip_loss`
scores this rank's B images against all N texts of the global batch and normalises by B, which
equals open_clip's `SigLipLoss(rank, world_size)` (any `dist_impl`) in loss and gradients: open_clip
passes texts around the ring with gradient, so each rank's texts collect the gradients of every
rank's loss; `gather_with_grad` (all-gather, backward reduce-scatter) sums the same terms.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from vlp.models.heads.base import HEADS, Head, HeadConfig, HeadInputs, MatryoshkaConfig, bounded, prefix_normed
from vlp.models.heads.tiled import DEFAULT_TILE_SIZE, tiled_sigmoid_loss

# Logits (B * N) from which `siglip_loss` uses the tiled kernel. The sigmoid loss has no row
# normalisation, so tiling only adds the backward's recomputation of each block (one extra
# matmul out of three), and pays for itself once the dense path's several fp32 copies of the
# logits get large. Measured on CPU (fp32, E=512, forward + backward, 2 threads, shared machine):
# 2048 x 2048 dense 0.27 s vs tiled 0.29 s; 4096 x 4096 1.32 s vs 0.80 s; 2048 x 8192 1.74 s vs 1.40 s.
TILED_MIN_LOGITS = 4096 * 4096


def scaled_dot_plus_bias(queries: Tensor, keys: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """SigLIP logits of a block: (b, E), (n, E), scale and bias [1] or [] -> (b, n)."""
    return (queries * logit_scale) @ keys.T + logit_bias


def siglip_loss(
    image: Tensor,
    text: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    *,
    gathered_text: Tensor | None = None,
    rank: int = 0,
    tile_size: int | None = None,
) -> Tensor:
    """Sigmoid loss of this rank's images against all texts, summed over pairs / B (fp32 scalar).

    image, text: (B, E) this rank's L2-normalised features, row i of each a positive pair.
    logit_scale: the multiplier (not its log), [1] or []; logit_bias: [1] or [].
    gathered_text: (N, E) every rank's texts in rank order, this rank's block at rows
        [rank * B, (rank + 1) * B) (None on one rank: `text` itself).
    tile_size: None picks dense or tiled by size (`TILED_MIN_LOGITS`); an int forces tiling.
    """
    if image.dim() != 2 or image.shape != text.shape:
        raise ValueError(f"siglip_loss: image {tuple(image.shape)} and text {tuple(text.shape)} must both be (B, E)")
    image, text = image.float(), text.float()
    logit_scale, logit_bias = logit_scale.float(), logit_bias.float()
    batch = image.shape[0]
    if gathered_text is None:
        if rank != 0:
            raise ValueError(f"siglip_loss: rank is {rank} but no gathered_text was given")
        all_text = text
    elif gathered_text.dim() != 2 or gathered_text.shape[1] != text.shape[1] or gathered_text.shape[0] < (rank + 1) * batch:
        raise ValueError(
            f"siglip_loss: gathered_text {tuple(gathered_text.shape)} does not hold rank {rank}'s {tuple(text.shape)} block"
        )
    else:
        all_text = gathered_text.float()
    positives = torch.arange(batch, device=image.device) + rank * batch
    if tile_size is None and batch * all_text.shape[0] >= TILED_MIN_LOGITS:
        tile_size = DEFAULT_TILE_SIZE

    if tile_size is not None:
        per_image = tiled_sigmoid_loss(image, all_text, positives, scaled_dot_plus_bias, tile_size, logit_scale, logit_bias)
        return per_image.sum() / batch
    logits = scaled_dot_plus_bias(image, all_text, logit_scale, logit_bias)  # (B, N)
    # -log sigmoid(label * s): softplus(s) for every pair, minus s at the positives
    # (softplus(-s) = softplus(s) - s), without building a (B, N) label matrix.
    positive_logits = logits.gather(1, positives.unsqueeze(1))
    return (F.softplus(logits).sum() - positive_logits.sum()) / batch


class SigLipConfig(HeadConfig):
    init_logit_scale: float = Field(10.0, gt=0)
    """Initial multiplier; the learnable parameter is its log (SigLIP: t' = log 10)."""
    init_logit_bias: float = -10.0
    max_logit_scale: float = Field(100.0, gt=1)
    """The multiplier stays in [1, max_logit_scale], open_clip's trainer's range, by `base.bounded`.
    The bias is unbounded, as in big_vision and open_clip."""
    learn_temperature: bool = True
    """Learn the scale and the bias (False freezes both)."""
    tile_size: int | None = Field(None, ge=1)
    """None: dense below `TILED_MIN_LOGITS` logits, tiled above; an int forces tiling."""
    matryoshka: MatryoshkaConfig | None = None
    """Nested prefix dims with weights: the loss summed over re-normalised prefixes (base.py)."""

    @model_validator(mode="after")
    def _starts_below_clamp(self) -> "SigLipConfig":
        if not 1.0 <= self.init_logit_scale <= self.max_logit_scale:
            where = f"above max_logit_scale {self.max_logit_scale}" if self.init_logit_scale > 1 else "below 1"
            raise ValueError(f"init_logit_scale {self.init_logit_scale} is {where} (the bounds of the scale)")
        return self


@HEADS.register("siglip")
class SigLipHead(Head):
    """Learnable log logit scale and logit bias (each shape [1]) around `siglip_loss`."""

    config_class = SigLipConfig
    # Only texts cross ranks: each rank's images meet every text, never other ranks' images.
    gathered_keys = ("text_normed",)
    # open_clip's CLIP with `init_logit_bias` is SigLIP: it holds both scalars.
    open_clip_scalars = ("logit_scale", "logit_bias")
    config: SigLipConfig

    def __init__(self, config: SigLipConfig, embed_dim: int) -> None:
        super().__init__(config, embed_dim)
        learn = config.learn_temperature
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(config.init_logit_scale)), requires_grad=learn)
        self.logit_bias = nn.Parameter(torch.full((1,), config.init_logit_bias), requires_grad=learn)
        self.check_matryoshka()

    @staticmethod
    def logit_scale_bounds(config: SigLipConfig) -> tuple[float, float]:
        """[low, high] of the log logit scale: open_clip's clamp(0, log(100)) after each step."""
        return 0.0, math.log(config.max_logit_scale)

    def scale(self) -> Tensor:
        """exp(logit_scale) in [1, max_logit_scale], [1] fp32, by the heads' bounded-parameter
        rule (`base.bounded`: an overshoot can come back, any ZeRO stage)."""
        return bounded(self.logit_scale.float(), *self.logit_scale_bounds(self.config)).exp()

    @classmethod
    def to_open_clip_scalars(cls, config: SigLipConfig, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """logit_scale with the bound of `scale` applied once; logit_bias as it is."""
        scalars = super().to_open_clip_scalars(config, params)
        scalars["logit_scale"] = scalars["logit_scale"].clamp(*cls.logit_scale_bounds(config))
        return scalars

    def forward(self, inputs: HeadInputs) -> dict[str, Any]:
        logit_scale, logit_bias = self.scale(), self.logit_bias.float()
        image, text = inputs.local["image_normed"], inputs.local["text_normed"]
        gathered_text = inputs.gathered.get("text_normed")
        logging = {"logit_scale": logit_scale.detach()[0], "logit_bias": logit_bias.detach()[0]}
        if self.config.matryoshka is None:
            loss = siglip_loss(image, text, logit_scale, logit_bias, gathered_text=gathered_text, rank=inputs.rank,
                               tile_size=self.config.tile_size)
            return {"loss": loss, "logging": logging}
        # Matryoshka: one loss per re-normalised prefix through the same (dense or tiled) kernel.
        loss = logit_scale.new_zeros(())
        for dim, weight in self.config.matryoshka.pairs():
            prefix_loss = siglip_loss(
                prefix_normed(image, dim), prefix_normed(text, dim), logit_scale, logit_bias,
                gathered_text=prefix_normed(gathered_text, dim), rank=inputs.rank, tile_size=self.config.tile_size,
            )
            loss = loss + weight * prefix_loss
            logging[f"loss@{dim}"] = prefix_loss.detach()
        return {"loss": loss, "logging": logging}
