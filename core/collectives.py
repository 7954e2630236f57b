"""Cross-rank helpers: feature gathering for the losses, reductions and gathers for the trainer
and the evaluators. Every function is a no-op (returns its input) without a process group of
more than one rank, so single-process code calls them unconditionally (`VLP_FORCE_COLLECTIVES=1`
runs them on a one-rank group too).

This is the only module that calls torch.distributed collectives (a test holds the rest of vlp to
it). Each tensor goes to `collective_device()` first, since the backend serves only its own
device types (NCCL: CUDA only), and the result comes back on the caller's device.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from vlp.core.devices import collective_device, force_collectives


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """True when a process group of more than one rank is up (or any, with VLP_FORCE_COLLECTIVES)."""
    world_size = world()[1]
    return world_size > 1 or (force_collectives() and dist.is_available() and dist.is_initialized())


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

    # The features are on the compute device, which is the collective device in every run vlp
    # starts (NCCL with GPUs, gloo on CPU); `.to` is autograd-aware should the two ever differ.
    device = tensor.device
    parts = dist_fn.all_gather(tensor.to(collective_device()).contiguous())
    return contiguous_grad(torch.cat(parts, dim=0).to(device))


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather without gradient (for evaluation and logging); every rank passes the same shape."""
    if not is_distributed():
        return tensor
    local = tensor.to(collective_device()).contiguous()
    parts = [torch.empty_like(local) for _ in range(world()[1])]
    dist.all_gather(parts, local)
    return torch.cat(parts, dim=0).to(tensor.device)


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (n_r, ...) tensor in rank order -> (sum n_r, ...); the ranks may
    hold different n_r (padded to the largest for the collective, then trimmed)."""
    if not is_distributed():
        return tensor
    world_size, device = world()[1], collective_device()
    count = torch.tensor([tensor.shape[0]], dtype=torch.long, device=device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)]).to(tensor.device)


def gather_objects(items: list[Any]) -> list[Any]:
    """Concatenate a per-rank Python list over ranks, in rank order. (Under NCCL torch pickles
    through a tensor on `torch.cuda.current_device()`, which `use_compute_device` set.)"""
    if not is_distributed():
        return items
    parts: list = [None] * world()[1]
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over ranks, on the input's device (a new tensor; the input is left
    as it is)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max(value: torch.Tensor | float) -> torch.Tensor | float:
    """The element-wise max over ranks of a tensor (on the input's device, no host sync), or of a
    Python number (returned as a float: one host sync; used to agree on stop decisions). The
    input is left as it is."""
    if not is_distributed():
        return value
    if isinstance(value, torch.Tensor):
        return _all_reduce(value, dist.ReduceOp.MAX)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _all_reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    if not is_distributed():
        return tensor
    # `.to` copies when the devices differ; `clone` when they do not: the input is never reduced in place.
    reduced = tensor.to(collective_device(), copy=True)
    dist.all_reduce(reduced, op=op)
    return reduced.to(tensor.device)


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
