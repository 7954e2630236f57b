"""Alignment and uniformity on the hypersphere (Wang & Isola 2020) and their head.

As in the paper's reference code (`align_loss`, `uniform_loss`):

    alignment(x, y)  = mean_i ||x_i - y_i||^alpha                       (alpha = 2)
    uniformity(x)    = log mean_{i != j} exp(-t ||x_i - x_j||^2)        (t = 2)

on L2-normalised features. Alignment of a perfect pairing is 0 (at most 4: antipodal pairs);
uniformity is 0 when every point coincides and falls towards its minimum as the points spread
(-4 for mutually orthogonal points, -8 for an antipodal pair). The head adds the two (with their
weights) and combines with any other head; the evaluator in `train/evals/alignment.py` reports
the same quantities on eval data.

Distributed: uniformity runs over every pair of the global batch (N = world_size * B) without
building (N, N) on any rank: each rank sums the Gaussian potential of its own B rows against
all N, the sums are all-reduced, and the log is taken of the global mean. The gradient of log S
is dS / S, so each rank's loss carries `world_size * (own_sum - own_sum.detach()) / S`: summed
over ranks by the gather's backward that is exactly the one-process gradient (times world_size,
as every head's input gradients are; see tests/test_registries.py).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from vlp.core.collectives import all_reduce_sum, at_least_fp32
from vlp.models.heads.base import HEADS, Head, HeadConfig, HeadInputs


def alignment(image: Tensor, text: Tensor, alpha: float = 2.0) -> Tensor:
    """Mean distance^alpha of positive pairs: image (B, E), text (B, E), row i a pair -> 0-dim.

    Wang & Isola's `align_loss`; alpha = 2 is the mean squared distance."""
    if image.dim() != 2 or image.shape != text.shape:
        raise ValueError(f"alignment: image {tuple(image.shape)} and text {tuple(text.shape)} must both be (B, E)")
    image, text = at_least_fp32(image), at_least_fp32(text)
    squared = (image - text).pow(2).sum(dim=1)  # (B,)
    # pow(alpha / 2) of the squared norm: no sqrt, so no infinite gradient at a perfect pair.
    return squared.mean() if alpha == 2 else squared.pow(alpha / 2).mean()


def gaussian_potential_sum(rows: Tensor, keys: Tensor, t: float, row_offset: int = 0) -> Tensor:
    """Sum of exp(-t ||rows_i - keys_j||^2) over all (i, j) except j = row_offset + i -> 0-dim.

    rows: (b, E), this block's features; keys: (N, E), every feature, the block itself at rows
    [row_offset, row_offset + b). Squared distances from the Gram matrix (clamped at 0 against
    rounding), so the potential of a pair is exactly 1 at distance 0 with a finite gradient."""
    squared = (rows.pow(2).sum(1, keepdim=True) + keys.pow(2).sum(1)[None, :] - 2 * rows @ keys.T).clamp(min=0)
    potential = torch.exp(-t * squared)  # (b, N)
    own = torch.arange(rows.shape[0], device=rows.device)
    potential = potential.index_put((own, own + row_offset), potential.new_zeros(()))
    return potential.sum()


def uniformity(features: Tensor, t: float = 2.0, *, gathered: Tensor | None = None, rank: int = 0) -> Tensor:
    """log of the mean Gaussian potential over the distinct pairs of the global batch -> 0-dim.

    features: (B, E) this rank's features; gathered: (N, E) every rank's, this rank's block at
    rows [rank * B, (rank + 1) * B) (None on one process). Wang & Isola's `uniform_loss` (which
    averages `pdist` over i < j: the same mean as over ordered pairs i != j). On several ranks the
    value is the global one on every rank (see the module docstring for the gradient)."""
    features = at_least_fp32(features)
    keys = features if gathered is None else at_least_fp32(gathered)
    batch, total = features.shape[0], keys.shape[0]
    if features.dim() != 2 or keys.dim() != 2 or keys.shape[1] != features.shape[1] or total < (rank + 1) * batch:
        raise ValueError(f"uniformity: gathered {tuple(keys.shape)} does not hold rank {rank}'s {tuple(features.shape)}")
    if total < 2:
        raise ValueError("uniformity: needs at least 2 features in the (global) batch")
    own_sum = gaussian_potential_sum(features, keys, t, rank * batch)
    pairs = total * (total - 1)
    if gathered is None or total == batch:
        return torch.log(own_sum / pairs)
    world_size = total // batch
    global_sum = all_reduce_sum(own_sum.detach())
    return torch.log(global_sum / pairs) + world_size * (own_sum - own_sum.detach()) / global_sum


class AlignUniformConfig(HeadConfig):
    align_weight: float = Field(1.0, ge=0)
    """Weight of the alignment term inside this head (the head's `weight` scales the whole)."""
    uniform_weight: float = Field(1.0, ge=0)
    """Weight of the uniformity term: the mean of the image and the text uniformity."""
    alpha: float = Field(2.0, gt=0)
    """Exponent of the positive-pair distance (2: mean squared distance)."""
    t: float = Field(2.0, gt=0)
    """Scale of the Gaussian potential."""


@HEADS.register("align_uniform")
class AlignUniformHead(Head):
    """`align_weight * alignment + uniform_weight * (uniformity(image) + uniformity(text)) / 2`,
    as the paper's experiments combine them; no learnable scalars."""

    config_class = AlignUniformConfig
    gathered_keys = ("image_normed", "text_normed")
    config: AlignUniformConfig

    def forward(self, inputs: HeadInputs) -> dict[str, Any]:
        image, text = inputs.local["image_normed"], inputs.local["text_normed"]
        align = alignment(image, text, self.config.alpha)
        uniform_image = uniformity(image, self.config.t, gathered=inputs.gathered.get("image_normed"), rank=inputs.rank)
        uniform_text = uniformity(text, self.config.t, gathered=inputs.gathered.get("text_normed"), rank=inputs.rank)
        loss = self.config.align_weight * align + self.config.uniform_weight * (uniform_image + uniform_text) / 2
        return {"loss": loss, "logging": {"alignment": align.detach(), "uniformity_image": uniform_image.detach(),
                                          "uniformity_text": uniform_text.detach()}}
