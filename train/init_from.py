"""`train.init_from`: start a fresh run from the weights of an earlier one.

Weights only: the optimizer, the lr schedule, the step and the data position start fresh (that
is what separates it from `--resume`, which restores all of them and wins when both are given).
Anything `vlp eval` / `vlp export` reads is accepted: a run folder, a `checkpoints/` folder, one
checkpoint tag (ZeRO 0-3, merged by `checkpoint_io.consolidate`), a safetensors or an open_clip
export of vlp. Loaded into the module before `deepspeed.initialize`, so ZeRO 1-3 partition (and
take their fp32 master copies of) the loaded weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlp.models.pretrained import check_keys


def will_resume(run_dir: Path, resume: str | None) -> bool:
    """True when `--resume` will restore a checkpoint (then init_from is not read)."""
    from vlp.train.checkpoint import resolve_checkpoint

    if resume is None:
        return False
    return resolve_checkpoint(Path(run_dir) / "checkpoints", resume) is not None


def init_from(model: torch.nn.Module, path: str, strict: bool = True) -> None:
    """Copy the weights of a run, checkpoint or export at `path` into `model` (our names)."""
    from vlp.train.weights import read_state_dict

    state, _ = read_state_dict(Path(path))
    incompatible = model.load_state_dict(state, strict=False)
    check_keys(f"train.init_from={path}", incompatible.missing_keys, incompatible.unexpected_keys, strict)
