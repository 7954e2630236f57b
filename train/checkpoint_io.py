"""Reading DeepSpeed checkpoints without unpickling untrusted objects, beside the checkpointer.

`consolidate` merges a checkpoint of any ZeRO stage into one fp32 state dict (what `vlp export`
and `vlp eval --checkpoint` rebuild the model from). Every pickle is read by torch's restricted
unpickler (`weights_only=True`) with exactly the DeepSpeed data classes of
`checkpoint.deepspeed_safe_globals` allowed, DeepSpeed's own `zero_to_fp32` merge included (its
`torch.load` is forced to `weights_only=True`, see `_weights_only_deepspeed`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch

from vlp.train.checkpoint import deepspeed_safe_globals


class CheckpointReadError(ValueError):
    """A checkpoint that cannot or may not be read (exit code 2)."""


class _WeightsOnlyTorch:
    """`torch` as DeepSpeed's zero_to_fp32 sees it, with `load` forced to `weights_only=True`.

    zero_to_fp32 calls `torch.load(..., weights_only=False)`, which would run any pickled code in
    a checkpoint. Its files hold only tensors, containers, torch.Size and a few plain DeepSpeed
    classes (the ZeRO stage enum, the loss scaler: attribute bags without `__setstate__`), so
    torch's restricted unpickler with exactly those allow-listed reads them."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            try:
                return torch.load(*args, **kwargs)
            except Exception as error:  # pickle.UnpicklingError: an object we do not allow
                raise CheckpointReadError(f"{args[0] if args else kwargs.get('f')}: refusing to unpickle it ({_unpickle_reason(error)})") from None


def _unpickle_reason(error: Exception) -> str:
    lines = str(error).splitlines()
    for marker in ("Unsupported global", "WeightsUnpickler error"):
        found = [line.strip() for line in lines if marker in line]
        if found:
            return found[0][:300]
    return (lines[0] if lines else type(error).__name__)[:300]


@contextlib.contextmanager
def _weights_only_deepspeed() -> Iterator[Any]:
    from deepspeed.utils import zero_to_fp32

    original = zero_to_fp32.torch
    zero_to_fp32.torch = _WeightsOnlyTorch()
    try:
        yield zero_to_fp32
    finally:
        zero_to_fp32.torch = original


def consolidate(directory: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint of any ZeRO stage, via DeepSpeed's own
    `zero_to_fp32` merge (ZeRO 1-3: the fp32 master partitions of every rank), read with
    `weights_only=True`; ZeRO 0: the model file itself."""
    tag_dir = Path(directory) / tag
    if any(tag_dir.glob("*optim_states.pt")) and any(tag_dir.glob("*zero_pp_rank_*")):
        with _weights_only_deepspeed() as zero_to_fp32, contextlib.redirect_stdout(None):
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise CheckpointReadError(f"{tag_dir}: no DeepSpeed model states found")
    blob = torch.load(model_file, map_location="cpu", weights_only=True)
    return {k: v.float() if v.is_floating_point() else v for k, v in blob["module"].items()}
