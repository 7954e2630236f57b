"""`Engine`: what the trainer and the checkpointer use of the object `deepspeed.initialize`
returns, written down so signatures can say `engine: Engine` instead of `Any`.

DeepSpeed's `DeepSpeedEngine` satisfies it; a test double needs only these members.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import torch

from vlp.models.dual_encoder import VLPModel


class Engine(Protocol):
    """The few members of DeepSpeed's engine the training loop calls."""

    module: VLPModel  # the wrapped model (ZeRO-3: its parameters are partitioned)
    dp_world_size: int  # data-parallel ranks
    global_steps: int  # optimizer steps taken (skipped fp16 overflow steps not counted)
    enable_backward_allreduce: bool  # False: the engine does not reduce gradients itself

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]: ...

    def backward(self, loss: torch.Tensor) -> Any: ...

    def step(self) -> None: ...

    def is_gradient_accumulation_boundary(self) -> bool: ...

    def gradient_accumulation_steps(self) -> int: ...

    def zero_optimization_stage(self) -> int: ...

    def get_lr(self) -> list[float]: ...

    def save_checkpoint(self, save_dir: str, tag: Optional[str] = None, client_state: Optional[dict] = None,
                        save_latest: bool = True) -> Any: ...

    def load_checkpoint(self, load_dir: str, tag: Optional[str] = None, **options: Any) -> tuple[Optional[str], dict]: ...
