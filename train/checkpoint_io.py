"""Reading DeepSpeed checkpoints without unpickling untrusted objects, beside the checkpointer.

`consolidate` merges a checkpoint of any ZeRO stage into one fp32 state dict (what `vlp export`
and `vlp eval --checkpoint` rebuild the model from). Every pickle is read by torch's restricted
unpickler (`weights_only=True`) with exactly the DeepSpeed data classes of
`checkpoint.deepspeed_safe_globals` allowed, DeepSpeed's own `zero_to_fp32` merge included (its
`torch.load` is forced to `weights_only=True`, see `_weights_only_deepspeed`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from vlp.core.errors import CheckpointReadError  # noqa: F401 (raised here, imported from here)
from vlp.core.files import atomic_folder
from vlp.train.checkpoint import deepspeed_safe_globals, verify_safe


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


# ------------------------------------------------------------- resume on another world size
UNIVERSAL = "universal"  # DeepSpeed's universal layout of a checkpoint, inside its tag folder


def partition_files(tag_dir: Path) -> list[Path]:
    """ZeRO 1-3 optimizer partitions, one per data-parallel rank (none at ZeRO 0)."""
    return sorted(Path(tag_dir).glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt"))


def saved_dp_world_size(tag_dir: Path) -> int | None:
    """The data-parallel world size a ZeRO 1-3 checkpoint was partitioned over; None at ZeRO 0,
    whose single model file loads on any world size.

    The client state records it (`dp_world_size`, written since it was needed); older
    checkpoints are counted by their optimizer partition files."""
    import json

    partitions = partition_files(tag_dir)
    if not partitions:
        return None
    client_file = Path(tag_dir) / "client_state.json"
    if client_file.is_file():
        recorded = json.loads(client_file.read_text()).get("dp_world_size")
        if recorded is not None:
            return int(recorded)
    return len(partitions)


def universal_checkpoint(directory: Path, tag: str, rank: int) -> Path:
    """`<tag>/universal`: the checkpoint in DeepSpeed's universal layout (one folder per parameter
    with its fp32 weights and optimizer moments, whole), which `checkpoint.load_universal`
    re-partitions over any data-parallel world size. Converted once, by rank 0, with DeepSpeed's
    own `ds_to_universal` into a temporary folder renamed into place, so a crash mid-way leaves
    no half folder to load; the other ranks wait at the barrier. Call on every rank, after
    `checkpoint.verify_safe(tag_dir)` (the converter unpickles with `weights_only=False`)."""
    import argparse
    import os

    from vlp.core.collectives import barrier

    tag_dir = Path(directory) / tag
    target = tag_dir / UNIVERSAL
    if rank == 0 and not target.is_dir():
        from deepspeed.checkpoint import ds_to_universal

        # One worker: the converter runs in this process (no process pool forked off a process
        # that holds a process group). Missing `universal_checkpoint_info` (plain data
        # parallelism writes none) is injected as the empty one: no TP/PP slices to merge.
        with atomic_folder(target) as tmp:
            args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1,
                                      num_merge_workers=1, keep_temp_folder=False, strict=True,
                                      inject_missing_state=True)
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                ds_to_universal.main(args)  # its prints and progress bars; an error still raises
    barrier()
    return target


@dataclass(frozen=True)
class Reshard:
    """A resume onto another data-parallel world size than the checkpoint was partitioned over:
    the engine is built with `checkpoint.load_universal` and loads `folder` instead of the tag."""

    tag: str
    from_world_size: int
    to_world_size: int
    folder: Path  # <tag>/universal

    @classmethod
    def plan(cls, where: tuple[Path, str], world_size: int, rank: int) -> "Reshard | None":
        """None where the checkpoint loads as saved (ZeRO 0, or the same world size); otherwise
        the universal folder, converted now if it is not there yet (every rank calls this)."""
        directory, tag = where
        saved = saved_dp_world_size(Path(directory) / tag)
        if saved is None or saved == world_size:
            return None
        verify_safe(Path(directory) / tag)  # before the converter unpickles anything
        return cls(tag, saved, world_size, universal_checkpoint(directory, tag, rank))

    def note(self) -> dict:
        message = (f"optimizer state re-partitioned: {self.tag} was saved on {self.from_world_size} "
                   f"data-parallel ranks, resumed on {self.to_world_size}, loaded through DeepSpeed's "
                   f"universal checkpoint {self.folder}")
        return {"event": "zero_resharded", "from_dp_world_size": self.from_world_size,
                "to_dp_world_size": self.to_world_size, "universal": str(self.folder), "message": message}
