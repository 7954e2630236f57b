"""Process-group set-up for every way `vlp train` is started.

One plain process, `--nproc N` (we start the ranks), `deepspeed --num_gpus N` (which also passes
`--local_rank`, checked against LOCAL_RANK by the CLI), torchrun and srun all end here: rank,
local rank and world size come from the environment. A plain process gets a one-rank environment
of its own, because DeepSpeed otherwise falls into MPI discovery. The device comes from
`vlp.core.devices.compute_device` (`train.device`); the backend follows it: NCCL on CUDA, gloo
on CPU.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from dataclasses import dataclass

import torch

from vlp.core.devices import DeviceRequest, compute_device, use_compute_device


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fill_env() -> None:
    """Make RANK / LOCAL_RANK / WORLD_SIZE / MASTER_* present, from Slurm or for one process."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        from vlp.train.preemption import slurm_env_to_dist

        slurm_env_to_dist()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")


def init_distributed(timeout_s: float = 600, device_request: DeviceRequest = "auto") -> DistEnv:
    """Pick this rank's device (`DeviceError` when the request cannot be met), make it current,
    then initialise torch.distributed through DeepSpeed (NCCL on CUDA, gloo on CPU)."""
    import deepspeed
    import torch.distributed as dist

    fill_env()
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    # Before the process group: NCCL binds each rank's communicator to the current device.
    device = use_compute_device(compute_device(device_request, local_rank))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s), verbose=False
        )
    if world_size > 1:
        # One line per rank: which node and host each rank landed on and where it met the others
        # (what a user reads first when a multi-node job misbehaves; the Slurm tests check it).
        node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
        print(f"[vlp] rank {rank} of {world_size} (local rank {local_rank}) on node {node}, host "
              f"{socket.gethostname()}, master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}, device {device}",
              file=sys.stderr, flush=True)
    return DistEnv(rank, local_rank, world_size, device)
