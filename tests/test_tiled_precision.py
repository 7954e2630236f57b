"""The tiled contrastive kernels are as exact as the dense loss at every size, fp32 and fp64.

Reference: the dense cross-entropy computed in fp64 (for fp32 inputs) or the dense fp64 loss
itself (for fp64 inputs). The old tiled forward returned lse - positive, two O(logit scale)
numbers whose difference is the loss: near 0 (the positive far ahead, as late in training) that
cancelled to relative errors of 1e-3 and worse at a batch of 2. The check is per row, on the
absolute error, against the dense path's own error plus a few units of rounding at 1.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlp.models.heads.clip import clip_loss, scaled_dot
from vlp.models.heads.tiled import tiled_cross_entropy, tiled_symmetric_cross_entropy

SIZES = [2, 3, 5, 17, 64]
# 10 and 20: row losses of 1e-7 .. 1e-3 on these inputs; 100 (the upper bound): far smaller.
LOGIT_SCALES = [10.0, 20.0, 100.0]


def _nearly_paired(batch: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 16) unit images and texts, each text a small perturbation of its image: the loss is near 0."""
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, 16, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(image + 0.03 * torch.randn(batch, 16, generator=generator, dtype=torch.float64), dim=-1)
    return image.to(dtype), text.to(dtype)


def _dense_rows(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    logits = scaled_dot(image, text, scale)  # (B, B)
    return F.cross_entropy(logits, torch.arange(image.shape[0]), reduction="none")


def _true_rows(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The reference, in fp64: CE_i = log1p(sum_{j != i} exp(s_ij - s_ii)), which keeps every digit
    of a loss near 0 (fp64 dense cross-entropy rounds a loss under 1e-16 to 0)."""
    logits = scaled_dot(image.double(), text.double(), scale.double())  # (B, B)
    relative = logits - logits.diagonal().unsqueeze(1)
    relative = relative.masked_fill(torch.eye(len(logits), dtype=torch.bool), float("-inf"))
    return torch.log1p(relative.exp().sum(dim=1))


def _assert_as_exact_as_dense(tiled: torch.Tensor, dense: torch.Tensor, truth: torch.Tensor, unit: float = 1.0) -> None:
    """max |tiled - truth| <= 2 max |dense - truth| + 8 eps * unit, over the tensor (unit: what a
    rounding is relative to, 1 for a loss next to log(1), the largest element for a gradient).
    The old lse - positive erred by about eps * logit scale, 20 to 100 eps, on a loss."""
    eps = torch.finfo(tiled.dtype).eps
    tiled_error = float((tiled.double() - truth).abs().max())
    allowed = 2 * float((dense.double() - truth).abs().max()) + 8 * eps * unit
    assert tiled_error <= allowed, f"tiled error {tiled_error:.3g} > allowed {allowed:.3g} (truth up to {truth.abs().max():.3g})"


@pytest.mark.parametrize("logit_scale", LOGIT_SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", SIZES)
def test_tiled_loss_rows_as_exact_as_dense(batch, dtype, logit_scale):
    for seed in range(3):
        image64, text64 = _nearly_paired(batch, torch.float64, seed)
        image, text = image64.to(dtype), text64.to(dtype)
        scale = torch.tensor([logit_scale], dtype=dtype)
        truth = _true_rows(image, text, scale)
        dense = _dense_rows(image, text, scale)
        for tile in sorted({1, 2, batch}):
            rows, columns = tiled_symmetric_cross_entropy(image, text, scaled_dot, tile, scale)
            _assert_as_exact_as_dense(rows.loss, dense, truth)
            dense_columns = _dense_rows(text, image, scale)
            _assert_as_exact_as_dense(columns.loss, dense_columns, _true_rows(text, image, scale))
            one_way = tiled_cross_entropy(image, text, torch.arange(batch), scaled_dot, tile, scale)
            _assert_as_exact_as_dense(one_way.loss, dense, truth)


def _clip_loss_and_grads(image, text, logit_scale, tile, dtype):
    leaves = [image.detach().clone().to(dtype).requires_grad_(), text.detach().clone().to(dtype).requires_grad_(),
              torch.tensor([logit_scale], dtype=dtype, requires_grad=True)]
    # clip_loss computes in fp32 (it casts); the fp64 truth goes through `_true_rows`.
    if dtype == torch.float64:
        loss = (_true_rows(leaves[0], leaves[1], leaves[2]).mean() + _true_rows(leaves[1], leaves[0], leaves[2]).mean()) / 2
    else:
        loss = clip_loss(*leaves, tile_size=tile)
    loss.backward()
    return [loss.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("logit_scale", LOGIT_SCALES)
@pytest.mark.parametrize("batch", SIZES)
def test_clip_loss_tiled_as_exact_as_dense_near_zero(batch, logit_scale):
    """The issue's case: clip_loss (fp32) at a loss near 0; loss and gradients against fp64."""
    for seed in range(3):
        image, text = _nearly_paired(batch, torch.float64, seed)
        truth = _clip_loss_and_grads(image, text, logit_scale, None, torch.float64)
        dense = _clip_loss_and_grads(image, text, logit_scale, None, torch.float32)
        for tile in sorted({1, 2, batch}):
            tiled = _clip_loss_and_grads(image, text, logit_scale, tile, torch.float32)
            _assert_as_exact_as_dense(tiled[0], dense[0], truth[0])
            # Each block adds its gradient to the totals: sequential sums over (B / tile)^2 blocks
            # round like sqrt(blocks) units (the logit scale's gradient sums over every block).
            blocks = math.ceil(batch / tile) ** 2
            for tiled_grad, dense_grad, true_grad in zip(tiled[1:], dense[1:], truth[1:]):
                unit = float(true_grad.abs().max()) * blocks**0.5
                _assert_as_exact_as_dense(tiled_grad, dense_grad, true_grad, unit=unit)
