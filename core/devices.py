"""Which device a run computes on, and which device its collectives take tensors on.

Two decisions, each made in one place:

- `compute_device(requested, local_rank)`: `train.device` (auto | cuda | cpu) and the launcher's
  local rank -> the device this rank trains and evaluates on. A rank that sees one GPU (Slurm's
  per-task binding, a CUDA_VISIBLE_DEVICES per rank) uses cuda:0 whatever its local rank; a rank
  that sees the whole node uses cuda:<local rank>; more local ranks than visible GPUs is an error
  (NCCL refuses two ranks on one GPU), as is asking for CUDA where there is none.
- `collective_device()`: the device whose tensors the default process group's backend serves.
  torch maps `nccl` to CUDA tensors only: a CPU tensor there raises "No backend type associated
  with device type cpu". Every tensor vlp hands to torch.distributed goes through `vlp.core.
  collectives`, which moves it here first.
"""

from __future__ import annotations

import os
import sys
from typing import Literal, Mapping, Optional

import torch

from vlp.core.errors import DeviceError  # noqa: F401 (raised here, imported from here)

DeviceRequest = Literal["auto", "cuda", "cpu"]

# One NCCL rank (helper tests, a single-GPU device check) can run every collective as if the run
# were distributed, so a CPU tensor reaching NCCL fails there too, not only at world size > 1.
FORCE_COLLECTIVES_ENV = "VLP_FORCE_COLLECTIVES"

_compute_device: Optional[torch.device] = None  # set by `use_compute_device` (the run's own choice)


def force_collectives() -> bool:
    return os.environ.get(FORCE_COLLECTIVES_ENV, "") not in ("", "0")


def local_ranks_per_node(environ: Mapping[str, str] = os.environ) -> Optional[int]:
    """How many ranks share this node, as the launcher says it (torchrun and `vlp train --nproc`:
    LOCAL_WORLD_SIZE; srun: SLURM_NTASKS_PER_NODE, e.g. "8" or "8(x2)"); None when unknown."""
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = environ.get(key, "").split("(")[0].split(",")[0]
        if value.isdigit():
            return int(value)
    return None


def no_cuda_reason(environ: Mapping[str, str] = os.environ) -> str:
    """Why torch sees no usable CUDA device, in one clause."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    if torch.cuda.device_count() == 0:
        return "no GPU is visible to this process (no device, or none assigned to this task)"
    return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, but torch.cuda.is_available() "
            "is false (the NVIDIA driver is missing or too old)")


def gpu_expected(environ: Mapping[str, str] = os.environ) -> bool:
    """True where this process looks meant to have a GPU: the NVIDIA kernel driver is loaded, or
    the launcher assigned GPUs (CUDA_VISIBLE_DEVICES / SLURM_JOB_GPUS naming a device)."""
    assigned = any(environ.get(key, "").strip() not in ("", "-1", "none", "NoDevFiles")
                   for key in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS"))
    return assigned or os.path.exists("/proc/driver/nvidia/version")


def compute_device(requested: DeviceRequest = "auto", local_rank: int = 0,
                   environ: Mapping[str, str] = os.environ, announce: bool = True) -> torch.device:
    """The device this rank computes on (no side effects; `use_compute_device` applies it).

    auto: CUDA when torch sees a GPU, else CPU, with a log line saying so where a GPU was expected
    (`gpu_expected`; rank 0, `announce`).
    cuda without one, or more local ranks than visible GPUs: `DeviceError`."""
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if requested == "cuda":
            raise DeviceError(f"train.device=cuda: no CUDA device: {no_cuda_reason(environ)}")
        # Said where a GPU should have been (an NVIDIA driver on the machine, or GPUs assigned to
        # the job), so a GPU job that falls back to the CPU does not do so without a word; on a
        # machine without GPUs, CPU training is what `auto` means and needs no line.
        if announce and environ.get("RANK", "0") == "0" and gpu_expected(environ):  # one line per run
            print(f"[vlp] train.device=auto: no CUDA device ({no_cuda_reason(environ)}); training on CPU",
                  file=sys.stderr, flush=True)
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    if visible == 1:  # per-task binding: this rank's GPU is the only one it sees
        return torch.device("cuda", 0)
    per_node = local_ranks_per_node(environ)
    if (per_node is not None and per_node > visible) or local_rank >= visible:
        ranks = per_node if per_node is not None else f"local rank {local_rank} needs at least {local_rank + 1}"
        raise DeviceError(f"train.device: {ranks} ranks on this node but {visible} visible GPUs "
                          "(NCCL needs one GPU per rank): start one rank per GPU")
    return torch.device("cuda", local_rank)


def use_compute_device(device: torch.device) -> torch.device:
    """Make `device` this process's current device (NCCL and `all_gather_object` place their
    buffers on `torch.cuda.current_device()`), and remember it for `collective_device`."""
    global _compute_device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _compute_device = device
    return device


def current_compute_device() -> torch.device:
    """The device `use_compute_device` set in this process (CPU before any)."""
    return _compute_device or torch.device("cpu")


def backend_device_types(group=None) -> tuple[str, ...]:
    """The device types the process group's backend takes tensors of ("cpu", "cuda")."""
    import torch.distributed as dist

    group = group if group is not None else dist.group.WORLD
    types = getattr(group, "_device_types", None)
    if types:
        return tuple(t.type for t in types)
    backend = str(dist.get_backend(group))  # older torch: from the backend's name
    return ("cuda",) if backend == "nccl" else ("cpu",)


def collective_device(group=None) -> torch.device:
    """The device vlp's collectives put their tensors on: the run's compute device where the
    backend serves it (no copy), else CPU where it serves CPU (gloo), else this rank's GPU (NCCL)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return _compute_device or torch.device("cpu")
    served = backend_device_types(group)
    if _compute_device is not None and _compute_device.type in served:
        return _compute_device
    if "cpu" in served:
        return torch.device("cpu")
    if _compute_device is not None and _compute_device.type == "cuda":
        return _compute_device
    return torch.device("cuda", torch.cuda.current_device())


def apply_tf32(enabled: bool, device: torch.device) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions on CUDA (Ampere and later: several
    times the fp32 rate at a 10-bit mantissa, what open_clip and timm train with); a no-op on CPU."""
    if device.type != "cuda":
        return
    # The float32-matmul-precision API, not torch >= 2.9's per-backend `fp32_precision`: torch
    # refuses `get_float32_matmul_precision()` (which vlp.models.flops reads) once the two mix.
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
