"""Memory-bounded contrastive losses: never more than one (tile x tile) block of scores at a time.

In the spirit of Inf-CL (Cheng et al. 2024, "Breaking the Memory Barrier: Near Infinite Batch Size
Scaling for Contrastive Loss"): the dense losses hold the whole (B, N) logit matrix plus its
softmax and gradient, which is what limits contrastive batch size. Here the forward streams over
column tiles with an online log-sum-exp and keeps only per-row statistics; the backward recomputes
each block and pushes its gradient into queries, keys and the score parameters. Extra memory is
O((B + N) * E + tile^2) instead of O(B * N).

The core is generic over a block score function

    score_fn(query_block (b, E), key_block (n, E), *score_params) -> scores (b, n)

so any head whose logits are a pairwise function of two embedding sets (cosine with a temperature,
negative Lorentz distance with a curvature, ...) reuses it. The backward re-runs `score_fn` on each
block under `torch.enable_grad` and calls `torch.autograd.grad`, so `score_fn` only has to be
differentiable by autograd; its parameters (temperature, bias, curvature) must be tensors and get
their gradients summed over blocks.

Three functions:
    tiled_cross_entropy            queries (B, E) vs keys (N, E), one positive key per query.
    tiled_symmetric_cross_entropy  a (N, E) vs b (N, E), positives on the diagonal, both
                                   directions (rows and columns) from the same blocks.
    tiled_sigmoid_loss             SigLIP's pairwise sigmoid loss, one positive key per query.

They compute in the dtype of their inputs (callers cast to fp32; gradcheck uses fp64). First-order
gradients only (the backward is not itself differentiable).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

ScoreFn = Callable[..., Tensor]
"""(query_block (b, E), key_block (n, E), *score_params) -> scores (b, n)."""

# Block edge used when the caller does not choose one. 2048 x 2048 fp32 is 16 MiB per block; the
# backward holds a handful of blocks at once. Larger tiles do not speed up the CPU matmuls
# measurably (benchmarks/loss_memory.py) and only cost memory.
DEFAULT_TILE_SIZE = 2048


class TiledCrossEntropy(NamedTuple):
    loss: Tensor
    """(B,) cross-entropy of each query against all keys."""
    is_top1: Tensor
    """(B,) bool, whether each query's positive scores highest among all keys (ties count), no
    gradient; for accuracy logging at no cost (the running row max is the log-sum-exp's shift)."""


def _tiles(length: int, tile_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + tile_size, length)) for start in range(0, length, tile_size)]


def _check(queries: Tensor, keys: Tensor, positive_index: Tensor, tile_size: int) -> None:
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"tiled loss: queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must be (B, E), (N, E)")
    if positive_index.shape != (queries.shape[0],):
        raise ValueError(f"tiled loss: positive_index {tuple(positive_index.shape)} must be ({queries.shape[0]},)")
    if tile_size < 1:
        raise ValueError(f"tiled loss: tile_size must be >= 1, got {tile_size}")


def _positives_in_block(positive_index: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """Column of each row's positive inside key block [start, stop), clamped, and whether it is there.

    Masks instead of `nonzero` so the loop never synchronises with the device."""
    columns = positive_index - start
    inside = (columns >= 0) & (columns < stop - start)
    return columns.clamp(0, stop - start - 1).unsqueeze(1), inside  # (b, 1), (b,)


def _block_max_exp(scores: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """max of a block along `dim`, and exp(scores - max) (a new tensor), with one exp pass.

    `amax`, not `max`: the values-and-indices reduction is much slower on CPU (strided along dim 0,
    and tens of ms per call on tiny inputs with several threads)."""
    best = scores.amax(dim=dim)
    return best, (scores - best.unsqueeze(dim)).exp_()


def _merge_running(best: Tensor, others: Tensor, block_best: Tensor, block_others: Tensor) -> tuple[Tensor, Tensor]:
    """Online softmax statistics: the running (max, sum over the non-positive scores of
    exp(score - max)) merged with one block's."""
    new_best = torch.maximum(best, block_best)
    # exp(-inf - finite) = 0 on the first block, where the running sum is still 0.
    return new_best, others * (best - new_best).exp() + block_others * (block_best - new_best).exp()


def _cross_entropy(best: Tensor, others: Tensor, positive: Tensor) -> Tensor:
    """Cross-entropy from the streamed statistics, as exact as the dense loss: (B,) each.

    CE = log(sum_j exp(s_j - s_pos)) = (max - pos) + log1p(expm1(pos - max) + others), where
    `others` sums exp(s_j - max) over the non-positive scores. When the positive wins, max - pos
    is exactly 0 and the loss is log1p(others), exact however small. The old lse - positive
    subtracted two O(logit scale) numbers, so a loss near 0 lost its digits (relative error 1e-3
    in fp32 at a batch of 2); dense cross-entropy on CPU sums in fp64 and kept them."""
    return (best - positive) + torch.log1p(torch.expm1(positive - best) + others)


def _detached_inputs(tensors: tuple[Tensor, ...], needs: tuple[bool, ...]) -> list[Tensor]:
    return [t.detach().requires_grad_(need) for t, need in zip(tensors, needs)]


def _block_backward(
    scores: Tensor, grad_scores: Tensor, leaves: list[Tensor], needs: tuple[bool, ...]
) -> list[Tensor | None]:
    """Gradients of `sum(scores * grad_scores)` w.r.t. the leaves that need them (None elsewhere)."""
    wanted = [leaf for leaf, need in zip(leaves, needs) if need]
    grads = iter(torch.autograd.grad(scores, wanted, grad_scores, allow_unused=True))
    return [next(grads) if need else None for need in needs]


def _add_block_grads(totals: list[Tensor | None], grads: list[Tensor | None], rows: slice, columns: slice) -> None:
    """In place: add one block's gradients to the (queries, keys, *score_params) totals."""
    for index, (total, grad) in enumerate(zip(totals, grads)):
        if total is None or grad is None:
            continue
        if index < 2:
            total[rows if index == 0 else columns] += grad
        else:
            total += grad  # a score parameter, possibly 0-dim: summed over blocks


class _TiledCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, keys, positive_index, score_fn, tile_size, *score_params):
        num_queries, num_keys = queries.shape[0], keys.shape[0]
        others = queries.new_zeros(num_queries)
        positive_score = queries.new_zeros(num_queries)
        best = queries.new_full((num_queries,), float("-inf"))
        for q0, q1 in _tiles(num_queries, tile_size):
            for k0, k1 in _tiles(num_keys, tile_size):
                scores = score_fn(queries[q0:q1], keys[k0:k1], *score_params)  # (b, n)
                columns, inside = _positives_in_block(positive_index[q0:q1], k0, k1)
                positive_score[q0:q1] += torch.where(inside, scores.gather(1, columns).squeeze(1), 0.0)
                block_best, exp_shifted = _block_max_exp(scores, 1)
                # Each row's positive leaves the sum (a (b, 1) scatter): see `_cross_entropy`.
                exp_shifted.scatter_(1, columns, torch.where(inside.unsqueeze(1), 0.0, exp_shifted.gather(1, columns)))
                best[q0:q1], others[q0:q1] = _merge_running(best[q0:q1], others[q0:q1], block_best, exp_shifted.sum(1))
        loss = _cross_entropy(best, others, positive_score)
        ctx.score_fn, ctx.tile_size = score_fn, tile_size
        # The log-sum-exp the backward's softmax needs: positive + loss.
        ctx.save_for_backward(queries, keys, positive_index, positive_score + loss, loss, *score_params)
        is_top1 = positive_score >= best
        ctx.mark_non_differentiable(is_top1)
        return loss, is_top1

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_is_top1):
        queries, keys, positive_index, lse, loss, *score_params = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], *ctx.needs_input_grad[5:])
        totals = [torch.zeros_like(t) if need else None for t, need in zip((queries, keys, *score_params), needs)]
        for q0, q1 in _tiles(queries.shape[0], ctx.tile_size):
            row_grad = grad_loss[q0:q1].unsqueeze(1)  # (b, 1)
            # softmax(positive) - 1 = exp(-loss) - 1, as expm1: exact where the loss is near 0,
            # where exp(score - lse) - 1 would cancel.
            positive_grad = torch.expm1(-loss[q0:q1]).unsqueeze(1) * row_grad  # (b, 1)
            for k0, k1 in _tiles(keys.shape[0], ctx.tile_size):
                leaves = _detached_inputs((queries[q0:q1], keys[k0:k1], *score_params), needs)
                with torch.enable_grad():
                    scores = ctx.score_fn(*leaves)  # (b, n)
                # d CE / d scores = softmax - one_hot(positive), per row, times the row's grad.
                grad_scores = (scores.detach() - lse[q0:q1].unsqueeze(1)).exp_().mul_(row_grad)
                columns, inside = _positives_in_block(positive_index[q0:q1], k0, k1)
                at_positive = torch.where(inside.unsqueeze(1), positive_grad, grad_scores.gather(1, columns))
                grad_scores.scatter_(1, columns, at_positive)
                grads = _block_backward(scores, grad_scores, leaves, needs)
                _add_block_grads(totals, grads, slice(q0, q1), slice(k0, k1))
        grad_queries, grad_keys, *grad_params = totals
        return (grad_queries, grad_keys, None, None, None, *grad_params)


class _TiledSymmetricCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, columns, score_fn, tile_size, *score_params):
        n = rows.shape[0]
        row_best, col_best = (rows.new_full((n,), float("-inf")) for _ in range(2))
        row_others, col_others = rows.new_zeros(n), rows.new_zeros(n)
        diagonal = rows.new_zeros(n)
        tiles = _tiles(n, tile_size)
        for r0, r1 in tiles:
            for c0, c1 in tiles:
                scores = score_fn(rows[r0:r1], columns[c0:c1], *score_params)  # (b, n)
                if r0 == c0:  # same tiling on both axes: the diagonal lies in these blocks only
                    diagonal[r0:r1] = scores.diagonal()
                row_block_best, row_exp = _block_max_exp(scores, 1)
                col_block_best, col_exp = _block_max_exp(scores, 0)
                if r0 == c0:  # the positives leave the sums: see `_cross_entropy`
                    row_exp.diagonal().zero_()
                    col_exp.diagonal().zero_()
                row_best[r0:r1], row_others[r0:r1] = _merge_running(
                    row_best[r0:r1], row_others[r0:r1], row_block_best, row_exp.sum(1))
                col_best[c0:c1], col_others[c0:c1] = _merge_running(
                    col_best[c0:c1], col_others[c0:c1], col_block_best, col_exp.sum(0))
        row_loss = _cross_entropy(row_best, row_others, diagonal)
        col_loss = _cross_entropy(col_best, col_others, diagonal)
        ctx.score_fn, ctx.tile_size = score_fn, tile_size
        # The log-sum-exps the backward's softmaxes need: positive + loss.
        ctx.save_for_backward(rows, columns, diagonal + row_loss, diagonal + col_loss, row_loss, col_loss, *score_params)
        row_top1, col_top1 = diagonal >= row_best, diagonal >= col_best
        ctx.mark_non_differentiable(row_top1, col_top1)
        return row_loss, col_loss, row_top1, col_top1

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_row_loss, grad_col_loss, _grad_row_top1, _grad_col_top1):
        rows, columns, row_lse, col_lse, row_loss, col_loss, *score_params = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], *ctx.needs_input_grad[4:])
        totals = [torch.zeros_like(t) if need else None for t, need in zip((rows, columns, *score_params), needs)]
        tiles = _tiles(rows.shape[0], ctx.tile_size)
        for r0, r1 in tiles:
            row_grad = grad_row_loss[r0:r1].unsqueeze(1)  # (b, 1)
            for c0, c1 in tiles:
                col_grad = grad_col_loss[c0:c1].unsqueeze(0)  # (1, n)
                leaves = _detached_inputs((rows[r0:r1], columns[c0:c1], *score_params), needs)
                with torch.enable_grad():
                    scores = ctx.score_fn(*leaves)  # (b, n)
                detached = scores.detach()
                # Row softmax and column softmax of the same block, each times its loss's grad.
                grad_scores = (detached - row_lse[r0:r1].unsqueeze(1)).exp_().mul_(row_grad)
                grad_scores += (detached - col_lse[c0:c1].unsqueeze(0)).exp_().mul_(col_grad)
                if r0 == c0:
                    # Each softmax at the positive minus 1, as expm1(-loss): see _TiledCrossEntropy.
                    grad_scores.diagonal().copy_(torch.expm1(-row_loss[r0:r1]) * grad_row_loss[r0:r1]
                                                 + torch.expm1(-col_loss[c0:c1]) * grad_col_loss[c0:c1])
                grads = _block_backward(scores, grad_scores, leaves, needs)
                _add_block_grads(totals, grads, slice(r0, r1), slice(c0, c1))
        grad_rows, grad_columns, *grad_params = totals
        return (grad_rows, grad_columns, None, None, *grad_params)


class _TiledSigmoidLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, keys, positive_index, score_fn, tile_size, *score_params):
        loss = queries.new_zeros(queries.shape[0])
        for q0, q1 in _tiles(queries.shape[0], tile_size):
            for k0, k1 in _tiles(keys.shape[0], tile_size):
                scores = score_fn(queries[q0:q1], keys[k0:k1], *score_params)  # (b, n)
                # -log sigmoid(label * s) = softplus(-label * s): softplus(s) for negatives, and
                # softplus(-s) = softplus(s) - s for the positive.
                loss[q0:q1] += torch.nn.functional.softplus(scores).sum(dim=1)
                columns, inside = _positives_in_block(positive_index[q0:q1], k0, k1)
                loss[q0:q1] -= torch.where(inside, scores.gather(1, columns).squeeze(1), 0.0)
        ctx.score_fn, ctx.tile_size = score_fn, tile_size
        ctx.save_for_backward(queries, keys, positive_index, *score_params)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        queries, keys, positive_index, *score_params = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], *ctx.needs_input_grad[5:])
        totals = [torch.zeros_like(t) if need else None for t, need in zip((queries, keys, *score_params), needs)]
        for q0, q1 in _tiles(queries.shape[0], ctx.tile_size):
            row_grad = grad_loss[q0:q1].unsqueeze(1)  # (b, 1)
            for k0, k1 in _tiles(keys.shape[0], ctx.tile_size):
                leaves = _detached_inputs((queries[q0:q1], keys[k0:k1], *score_params), needs)
                with torch.enable_grad():
                    scores = ctx.score_fn(*leaves)  # (b, n)
                # d/ds softplus(s) = sigmoid(s); the positive's "- s" adds -1.
                grad_scores = scores.detach().sigmoid().mul_(row_grad)
                columns, inside = _positives_in_block(positive_index[q0:q1], k0, k1)
                grad_scores.scatter_add_(1, columns, -row_grad * inside.unsqueeze(1))
                grads = _block_backward(scores, grad_scores, leaves, needs)
                _add_block_grads(totals, grads, slice(q0, q1), slice(k0, k1))
        grad_queries, grad_keys, *grad_params = totals
        return (grad_queries, grad_keys, None, None, None, *grad_params)


def tiled_cross_entropy(
    queries: Tensor,
    keys: Tensor,
    positive_index: Tensor,
    score_fn: ScoreFn,
    tile_size: int = DEFAULT_TILE_SIZE,
    *score_params: Tensor,
) -> TiledCrossEntropy:
    """Cross-entropy of each query over all keys, without materialising the (B, N) scores.

    queries: (B, E); keys: (N, E); positive_index: (B,) long, the key index of each query's
    positive; score_fn(q (b, E), k (n, E), *score_params) -> (b, n); score_params: tensors the
    scores depend on (e.g. a logit scale of shape [1]), which receive gradients.
    Returns `TiledCrossEntropy(loss (B,), is_top1 (B,))`; `loss[i]` equals
    `F.cross_entropy(score_fn(queries, keys, *score_params), positive_index, reduction="none")[i]`.
    """
    _check(queries, keys, positive_index, tile_size)
    loss, is_top1 = _TiledCrossEntropy.apply(queries, keys, positive_index, score_fn, tile_size, *score_params)
    return TiledCrossEntropy(loss, is_top1)


def tiled_symmetric_cross_entropy(
    rows: Tensor,
    columns: Tensor,
    score_fn: ScoreFn,
    tile_size: int = DEFAULT_TILE_SIZE,
    *score_params: Tensor,
) -> tuple[TiledCrossEntropy, TiledCrossEntropy]:
    """Both directions of the diagonal-positive cross-entropy over one (N, N) score matrix.

    rows: (N, E), columns: (N, E); scores S = score_fn(rows, columns, *score_params) (N, N) are
    computed block by block, once per pass, and feed the row and the column log-sum-exp together
    (CLIP on one rank: rows = images, columns = texts). Returns (row-wise, column-wise)
    `TiledCrossEntropy`: `row.loss[i] = CE(S[i, :], i)`, `col.loss[j] = CE(S[:, j], j)`.
    """
    if rows.shape != columns.shape or rows.dim() != 2:
        raise ValueError(f"tiled loss: rows {tuple(rows.shape)} and columns {tuple(columns.shape)} must both be (N, E)")
    if tile_size < 1:
        raise ValueError(f"tiled loss: tile_size must be >= 1, got {tile_size}")
    row_loss, col_loss, row_top1, col_top1 = _TiledSymmetricCrossEntropy.apply(
        rows, columns, score_fn, tile_size, *score_params
    )
    return TiledCrossEntropy(row_loss, row_top1), TiledCrossEntropy(col_loss, col_top1)


def tiled_sigmoid_loss(
    queries: Tensor,
    keys: Tensor,
    positive_index: Tensor,
    score_fn: ScoreFn,
    tile_size: int = DEFAULT_TILE_SIZE,
    *score_params: Tensor,
) -> Tensor:
    """SigLIP's pairwise loss summed per query, without materialising the (B, N) scores.

    Shapes as `tiled_cross_entropy`. Returns (B,): `sum_j -log sigmoid(label_ij * S_ij)` with
    label +1 at j = positive_index[i] and -1 elsewhere (a negative index matches no key, so that
    query has only negatives).
    """
    _check(queries, keys, positive_index, tile_size)
    return _TiledSigmoidLoss.apply(queries, keys, positive_index, score_fn, tile_size, *score_params)
