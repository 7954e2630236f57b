"""Cross-rank feature gathering used by the objective (once per step, shared by all heads)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    all_gather's backward hands each rank's gradient slice to gloo's collectives, which read raw
    storage: a strided gradient (e.g. from a transposed similarity in FILIP) came back scrambled
    with no error. Slices along dim 0 of a contiguous gradient are contiguous.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather `tensor` (B, ...) from every rank into (world_size * B, ...), in rank order.

    Gradients flow back to every rank's slice (as open_clip's `gather_with_grad=True`): the
    backward of `torch.distributed.nn.all_gather` reduce-scatters the incoming gradients, so each
    rank receives the sum of all ranks' gradients for its own features. Every rank must pass the
    same B.
    """
    rank, world_size = world()
    if world_size == 1:
        return tensor
    import torch.distributed.nn.functional as dist_fn

    return _ContiguousGrad.apply(torch.cat(dist_fn.all_gather(tensor.contiguous()), dim=0))


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather without gradient (for evaluation and logging)."""
    rank, world_size = world()
    if world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)
