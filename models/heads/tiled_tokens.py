"""Column-blocked score matrices for the token-level heads (flair, filip, ct_align).

`models/heads/tiled.py` streams the global losses, whose scores are a pairwise function of two
embedding sets. The fine-grained heads score a pair through a much larger intermediate: FLAIR
pools the image tokens once per (image, text) pair, (B, H, T, P) attention and (B, T, E) pooled
vectors; FILIP compares every patch with every text token, (B, N, P, L); the CT head pools every
sentence over every volume, (M, N, P) and (M, N, E). The score matrix itself, (rows, columns) =
(this rank's B, the global N), is small; the intermediate behind it is what outgrows a GPU.

So the blocking here is over the columns of the score matrix only: the forward computes
`scores[:, c0:c1]` one block of columns at a time under `no_grad` and keeps nothing but the
inputs; the backward recomputes each block under `enable_grad` and pushes `grad_scores[:, c0:c1]`
through it (`torch.autograd.grad`), so at most one block's intermediate is alive at any time.
The loss on the score matrix (sigmoid, InfoNCE) stays the head's own dense code: the values and
gradients are those of the dense computation up to summation order.

    blockwise_columns(column_fn, whole, columns, block_size) -> scores (..., C)

* `whole`: tensors every block reads entirely (this rank's image tokens, projection weights,
  a logit scale); their gradients are summed over blocks.
* `columns`: `(source, index)` pairs; block [c0, c1) reads `source[index[..., c0:c1]]`, and its
  gradient is added back into `source` at those rows (`index_add_`, so repeated rows sum). A
  plain slice of the global batch is `index = arange(C)`; FLAIR's per-image caption lists are a
  (B, T) index into the (N * K) captions.
* `column_fn(*whole, *column_blocks) -> (..., c)`: differentiable by autograd.

Extra memory: the inputs' gradients (linear in N) plus one block's intermediate, whose size is
set by `block_size`; `auto_block_size` turns a byte budget into a column count. First-order
gradients only, like tiled.py.

Dense or tiled: the recompute makes a tiled step 1.14-2.2x the dense one (docs/benchmarks.md),
so blocking only pays where the dense intermediate would not fit. The heads ask `block_plan`:
a config's integer `block_size` always tiles; unset, the predicted dense intermediate
(columns x the head's `*_bytes_per_column`) decides: dense up to `dense_budget_bytes(device)`,
else blocks of `DEFAULT_BLOCK_BYTES`. The budget is the memory the device has left: on CUDA
`DENSE_FREE_FRACTION` of what is free at the loss (`torch.cuda.mem_get_info` plus the caching
allocator's unused blocks), on CPU the fixed `DENSE_BUDGET_BYTES`.

Softmax over the rows of every rank (filip's text -> image, ct_align's sentence -> volume):

    global_logsumexp(scores, scale, exclude) -> (lse (C,), max (C,))

Each rank scores ITS OWN rows (images, volumes) against the gathered columns (texts,
sentences), so the big row tokens never cross ranks; only the per-column log-sum-exp does. The
forward all-gathers every rank's (C,) log-sum-exp and max, the backward all-reduces one (2, C)
tensor: the columns' loss gradients, and each column's softmax-weighted mean score (for the
scale's gradient). Every rank must call it, and back-propagate through it, in the same order.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from vlp.core.collectives import all_reduce_sum, gather_no_grad

ColumnFn = Callable[..., Tensor]

# Bytes one block's intermediate may take when the head's config does not fix the block size
# (also the eval scorers' streaming blocks in flair.py and filip.py). 256 MiB keeps a block's
# matmuls large (hundreds of columns for FLAIR and the CT head at B = 256, P = 196) while the
# whole loss stays far under a GPU's memory; measured in benchmarks/loss_memory.py --head.
DEFAULT_BLOCK_BYTES = 256 * 2**20

# Predicted dense intermediate (bytes) up to which an unset `block_size` takes the dense path.
# Dense skips the recompute (tiled costs 1.14-2.2x its time) and, at this size, spends at most
# 0.75 GiB more than 256 MiB blocks would: about 1% of an 80 GB GPU, small next to the towers'
# activations. Beyond it the dense intermediate grows as B x N (7.7 GiB for filip at N = 256),
# which is what tiling is for. Larger than DEFAULT_BLOCK_BYTES, so a tiled loss has >= 4 blocks.
DENSE_BUDGET_BYTES = 2**30

# On CUDA the budget is this fraction of the memory free when the loss runs. The towers'
# activations are already allocated by then; the half left over covers the backward, which
# holds the dense intermediate's gradient next to it for a moment (the `*_bytes_per_column`
# estimates count what the forward keeps alive, not that transient), and the allocator's
# fragmentation. On an 80 GB GPU with 40 GB free this is dense up to 20 GB, where 1 GiB tiled
# every FILIP batch beyond N = 64 at 1.14-2.2x the step time for memory it did not need.
DENSE_FREE_FRACTION = 0.5


def dense_budget_bytes(device: torch.device | str | None = None) -> int:
    """Bytes the dense path may take on `device`: `DENSE_FREE_FRACTION` of the free memory
    on a CUDA device (free on the device plus reserved-but-unallocated in torch's cache, both
    reusable by the loss), else `DENSE_BUDGET_BYTES` (CPU, or no device given)."""
    if device is None or torch.device(device).type != "cuda":
        return DENSE_BUDGET_BYTES
    device = torch.device(device)
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(DENSE_FREE_FRACTION * (free + cached))


def auto_block_size(num_columns: int, bytes_per_column: int, budget: int = DEFAULT_BLOCK_BYTES) -> int:
    """Columns per block so that one block's intermediate stays within `budget` bytes, in
    [1, num_columns]."""
    return max(1, min(num_columns, budget // max(1, bytes_per_column)))


def block_plan(
    num_columns: int, bytes_per_column: int, block_size: int | None = None, device: torch.device | str | None = None
) -> int | None:
    """How a head scores its `num_columns` columns: None for the dense path (one autograd graph,
    no recompute), else the columns per block for `blockwise_columns`.

    block_size: the config's; an integer always tiles (one block, recomputed, when it is at
    least `num_columns`). None: dense when the predicted dense intermediate, `num_columns x
    bytes_per_column`, fits in `dense_budget_bytes(device)` (the device the scores live on);
    blocks of DEFAULT_BLOCK_BYTES beyond it. Ranks may decide differently (their free memory
    differs): both paths make the same collective calls and agree up to summation order."""
    if block_size is not None:
        return block_size
    if num_columns * bytes_per_column <= dense_budget_bytes(device):
        return None
    return auto_block_size(num_columns, bytes_per_column)


def _blocks(length: int, block_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + block_size, length)) for start in range(0, length, block_size)]


def _take(source: Tensor, index: Tensor) -> Tensor:
    return source[index]


class _BlockwiseColumns(torch.autograd.Function):
    @staticmethod
    def forward(ctx, column_fn, block_size, num_whole, num_columns, *tensors):
        whole = tensors[:num_whole]
        sources = tensors[num_whole : num_whole + num_columns]
        indices = tensors[num_whole + num_columns :]
        length = indices[0].shape[-1]
        blocks = []
        for c0, c1 in _blocks(length, block_size):
            parts = [_take(source, index[..., c0:c1]) for source, index in zip(sources, indices)]
            blocks.append(column_fn(*whole, *parts))
        ctx.column_fn, ctx.block_size, ctx.num_whole, ctx.num_columns = column_fn, block_size, num_whole, num_columns
        ctx.save_for_backward(*tensors)
        return torch.cat(blocks, dim=-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_scores):
        tensors = ctx.saved_tensors
        num_whole, num_columns = ctx.num_whole, ctx.num_columns
        whole = tensors[:num_whole]
        sources = tensors[num_whole : num_whole + num_columns]
        indices = tensors[num_whole + num_columns :]
        whole_needs = ctx.needs_input_grad[4 : 4 + num_whole]
        source_needs = ctx.needs_input_grad[4 + num_whole : 4 + num_whole + num_columns]
        whole_leaves = [t.detach().requires_grad_(need) for t, need in zip(whole, whole_needs)]
        whole_totals = [torch.zeros_like(t) if need else None for t, need in zip(whole, whole_needs)]
        source_totals = [torch.zeros_like(t) if need else None for t, need in zip(sources, source_needs)]
        length = indices[0].shape[-1]
        for c0, c1 in _blocks(length, ctx.block_size):
            block_index = [index[..., c0:c1] for index in indices]
            parts = [_take(source, index).detach().requires_grad_(need)
                     for source, index, need in zip(sources, block_index, source_needs)]
            wanted = [leaf for leaf in whole_leaves + parts if leaf.requires_grad]
            if not wanted:
                break
            with torch.enable_grad():
                scores = ctx.column_fn(*whole_leaves, *parts)
            grads = iter(torch.autograd.grad(scores, wanted, grad_scores[..., c0:c1], allow_unused=True))
            for position, leaf in enumerate(whole_leaves):
                if leaf.requires_grad:
                    grad = next(grads)
                    if grad is not None:
                        whole_totals[position] += grad
            for position, (leaf, index) in enumerate(zip(parts, block_index)):
                if leaf.requires_grad:
                    grad = next(grads)
                    if grad is not None:
                        flat = grad.reshape(-1, *grad.shape[index.dim():])  # (rows of the block, ...)
                        source_totals[position].index_add_(0, index.reshape(-1), flat)
        return (None, None, None, None, *whole_totals, *source_totals, *(None for _ in indices))


def blockwise_columns(
    column_fn: ColumnFn,
    whole: Sequence[Tensor],
    columns: Sequence[tuple[Tensor, Tensor]],
    block_size: int,
) -> Tensor:
    """`column_fn(*whole, *[source[index] for source, index in columns])`, computed in blocks of
    `block_size` columns with per-block recompute in backward.

    whole: tensors read whole by every block; columns: (source (R, ...), index (..., C) long)
    pairs whose index shares its last axis C (the score columns); `column_fn` returns (..., c)
    for a block of c columns. Returns (..., C): the blocks concatenated along the last axis.
    """
    if not columns:
        raise ValueError("blockwise_columns: needs at least one (source, index) column input")
    lengths = {index.shape[-1] for _, index in columns}
    if len(lengths) != 1:
        raise ValueError(f"blockwise_columns: column indices disagree on their last axis: {sorted(lengths)}")
    if block_size < 1:
        raise ValueError(f"blockwise_columns: block_size must be >= 1, got {block_size}")
    sources = [source for source, _ in columns]
    indices = [index for _, index in columns]
    return _BlockwiseColumns.apply(column_fn, block_size, len(whole), len(columns), *whole, *sources, *indices)


class _GlobalLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, scale, exclude):
        logits = scale * scores  # (R, C)
        if exclude is not None:
            logits = logits.masked_fill(exclude, float("-inf"))
        local = torch.stack([logits.logsumexp(dim=0), logits.amax(dim=0)])[None]  # (1, 2, C)
        every_rank = gather_no_grad(local)  # (world, 2, C)
        lse, best = every_rank[:, 0].logsumexp(dim=0), every_rank[:, 1].amax(dim=0)
        ctx.save_for_backward(scores, scale, lse, exclude if exclude is not None else scores.new_empty(0))
        ctx.has_exclude = exclude is not None
        ctx.mark_non_differentiable(best)
        return lse, best

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lse, _grad_best):
        scores, scale, lse, exclude = ctx.saved_tensors
        logits = scale * scores
        if ctx.has_exclude:
            logits = logits.masked_fill(exclude, float("-inf"))
        probabilities = (logits - lse[None]).exp()  # (R, C), 0 where excluded
        weighted = probabilities * (scores.masked_fill(exclude, 0.0) if ctx.has_exclude else scores)
        # Row (rank) r's share of every column's loss gradient reaches it from the column's owner;
        # the scale's gradient is this rank's own columns only: sum_c g_c * E_softmax[score_c].
        totals = all_reduce_sum(torch.stack([grad_lse, weighted.sum(dim=0)]))  # (2, C)
        grad_scores = scale * probabilities * totals[0][None] if ctx.needs_input_grad[0] else None
        grad_scale = (grad_lse * totals[1]).sum().reshape(scale.shape) if ctx.needs_input_grad[1] else None
        return grad_scores, grad_scale, None


def global_logsumexp(scores: Tensor, scale: Tensor, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per column, the log-sum-exp (and the max) of `scale * scores` over the rows of EVERY rank.

    scores: (R, C), this rank's R rows against the C columns every rank shares (in the same
    order); scale: a tensor that broadcasts against scores ([1] for the heads' temperatures);
    exclude: (R, C) bool, entries left out of the sum (each column needs one kept entry on some
    rank). Returns (lse (C,), max (C,)); the max carries no gradient.

    Gradients are those of the single-process computation over the concatenated rows: `scores`
    receives the gradient of every rank's loss (their (C,) lse gradients are all-reduced), and
    `scale` the gradient of THIS rank's loss only, as if the rows of the other ranks were
    inputs gathered with gradient. Without a process group it is a plain logsumexp over dim 0.
    """
    return _GlobalLogSumExp.apply(scores, scale, exclude)
