"""Cross-rank helpers: feature gathering for the losses, reductions and gathers for the trainer
and the evaluators. Every function is a no-op (returns its input) without a process group of
more than one rank, so single-process code calls them unconditionally.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """True when a process group of more than one rank is up."""
    return world()[1] > 1


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for loss maths; fp32 and fp64 stay as they are (gradcheck runs in fp64)."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    The gloo backward of `torch.distributed.nn.all_gather` is an all-to-all that reads raw
    storage, so a strided incoming gradient (FILIP's `amax` / `masked_fill` backward, a transposed
    similarity) is exchanged scrambled, with no error. Slices along dim 0 of a contiguous gradient
    are contiguous.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def contiguous_grad(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` unchanged; its gradient is made contiguous on the way back (see `_ContiguousGrad`)."""
    return _ContiguousGrad.apply(tensor) if tensor.requires_grad else tensor


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather `tensor` (B, ...) from every rank into (world_size * B, ...), in rank order.

    Gradients flow back to every rank's slice (as open_clip's `gather_with_grad=True`): the
    backward of `torch.distributed.nn.all_gather` reduce-scatters the incoming gradients, so each
    rank receives the sum of all ranks' gradients for its own features. Every rank must pass the
    same B.
    """
    if not is_distributed():
        return tensor
    import torch.distributed.nn.functional as dist_fn

    return contiguous_grad(torch.cat(dist_fn.all_gather(tensor.contiguous()), dim=0))


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather without gradient (for evaluation and logging); every rank passes the same shape."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world()[1])]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (n_r, ...) tensor in rank order -> (sum n_r, ...); the ranks may
    hold different n_r (padded to the largest for the collective, then trimmed)."""
    if not is_distributed():
        return tensor
    world_size = world()[1]
    count = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def gather_objects(items: list[Any]) -> list[Any]:
    """Concatenate a per-rank Python list over ranks, in rank order."""
    if not is_distributed():
        return items
    parts: list = [None] * world()[1]
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over ranks (a new tensor; the input is left as it is)."""
    if is_distributed():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def all_reduce_max(value: torch.Tensor | float) -> torch.Tensor | float:
    """The element-wise max over ranks of a tensor, or of a Python number (returned as a float;
    used to agree on stop and skip decisions). The input is left as it is."""
    if not is_distributed():
        return value
    if isinstance(value, torch.Tensor):
        tensor = value.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


# What gloo and NCCL say when another rank died, was killed or stopped answering. They raise a
# plain RuntimeError (gloo) or a DistError subclass, so the message is what tells.
_LOST_PEER = ("connection reset by peer", "connection closed by peer", "connection refused", "broken pipe",
              "timed out", "nccl error", "nccl communicator was aborted", "socket timeout")


def lost_peer_reason(error: BaseException) -> str | None:
    """One line saying that a collective failed because another rank went away, or None when
    `error` is something else. The first line of the backend's message is kept (it names the
    peer's address) without its source-file prefix."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    is_dist_error = isinstance(error, getattr(dist, "DistError", ()))
    if not (is_dist_error or (isinstance(error, RuntimeError) and any(s in text.lower() for s in _LOST_PEER))):
        return None
    if first.startswith("[") and "] " in first:  # "[.../gloo/transport/tcp/pair.cc:545] Read error ..."
        first = first.split("] ", 1)[1]
    first = first.split(". This is typically caused", 1)[0]
    return f"a collective failed: another rank stopped, was killed or timed out ({first})"


def barrier() -> None:
    if is_distributed():
        dist.barrier()
