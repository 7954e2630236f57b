"""Checkpoints through the DeepSpeed engine, with a `latest` pointer that is never left dangling.

Layout of `runs/NAME/checkpoints/`:
    step_00000100/          DeepSpeed's own files (model, optimizer partitions per rank),
                            client_state.json, rng_rank{r}.pt, loader_rank{r}.json (the data
                            position), and COMPLETE once every rank has finished writing
    latest                  the tag of the newest COMPLETE checkpoint, replaced atomically

Resume order (the one place it is written down): model + optimizer + lr schedule (DeepSpeed) ->
client state (step, samples seen, epoch, batch position in the epoch) -> this rank's RNG states
-> the loader's position (every rank's file: another layout re-deals the rest of the epoch).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlp.core.collectives import barrier
from vlp.core.devices import current_compute_device
from vlp.core.errors import InputNotFound, UnsafeCheckpoint  # noqa: F401 (UnsafeCheckpoint: raised here, imported from here)
from vlp.core.files import atomic_write
from vlp.data_pipelines.position import read_positions, write_position
from vlp.train.engine import Engine

LATEST = "latest"
COMPLETE = "COMPLETE"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # global samples consumed
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` this rank has consumed
    nonfinite_steps: int = 0  # skipped steps in a row

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, int(value))


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        # This rank's own GPU only: a resume may see another number of GPUs (per-task binding,
        # fewer GPUs per node), and this rank's device is the only one its kernels drew from.
        "cuda": torch.cuda.get_rng_state(current_compute_device()) if current_compute_device().type == "cuda" else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    device, cuda_state = current_compute_device(), state.get("cuda")
    if isinstance(cuda_state, list):  # saved before vlp kept one state per rank: every visible GPU's
        index = device.index or 0
        cuda_state = cuda_state[index] if index < len(cuda_state) else None
    if cuda_state is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_state, device)


def deepspeed_safe_globals() -> list:
    """The few plain-data DeepSpeed classes its checkpoints pickle: the ZeRO stage enum, the loss
    scaler's attribute bags and ZeRO-1/2's fragment addresses (two ints). Shared by resume
    (`verify_safe`) and export (`train.checkpoint_io.consolidate`)."""
    names = [
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaleProfile"),
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaleConfig"),
        ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ]
    found = []
    for module_name, attr in names:
        try:
            module = __import__(module_name, fromlist=[attr])
            found.append(getattr(module, attr))
        except (ImportError, AttributeError):
            continue
    return found


def verify_safe(tag_dir: Path, recursive: bool = False) -> None:
    """Refuse a checkpoint whose pickles hold anything but tensors, containers and the allowed
    DeepSpeed data classes.

    DeepSpeed loads its own files with `weights_only=False`; running the restricted unpickler over
    every file first means nothing it then loads can construct arbitrary objects or run code.
    `recursive`: the files of subfolders too (a universal checkpoint's one folder per parameter).
    """
    allowed = deepspeed_safe_globals()
    for path in sorted(Path(tag_dir).rglob("*.pt") if recursive else Path(tag_dir).glob("*.pt")):
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            first = str(error).strip().splitlines()
            reason = next((line.strip() for line in first if "GLOBAL" in line), first[0] if first else type(error).__name__)
            raise UnsafeCheckpoint(f"{path}: refused to load ({reason[:300]})") from None


def latest_tag(directory: Path) -> str | None:
    """The tag `latest` in a checkpoints folder points to, when that checkpoint is complete."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (Path(directory) / tag / COMPLETE).is_file() else None


def resolve_checkpoint(directory: Path, resume: str) -> tuple[Path, str] | None:
    """`latest` -> the newest complete checkpoint in the checkpoints folder `directory` (None when
    there is none yet); a path (run folder, checkpoints folder or tag) -> that tag.

    Raises FileNotFoundError (exit 2 at the CLI) for a path that is not a complete checkpoint.
    """
    if resume == LATEST:
        tag = latest_tag(directory)
        return (Path(directory), tag) if tag else None
    path = Path(resume)
    for checkpoints in (path, path / "checkpoints"):  # a checkpoints folder, a run folder
        if (checkpoints / LATEST).is_file() and (tag := latest_tag(checkpoints)):
            return checkpoints, tag
    if (path / COMPLETE).is_file():
        return path.parent, path.name
    raise InputNotFound(f"--resume {resume}: not a complete checkpoint (no {COMPLETE} marker found)")


class Checkpointer:
    def __init__(self, directory: Path, keep: int, rank: int, loader: Any = None) -> None:
        self.directory = Path(directory)
        self.keep = max(1, keep)
        self.rank = rank
        self.loader = loader  # saved and restored with the checkpoint: its data position

    @staticmethod
    def tag(step: int) -> str:
        return f"step_{step:08d}"

    def latest_tag(self) -> str | None:
        return latest_tag(self.directory)

    def complete_tags(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir() if p.is_dir() and (p / COMPLETE).is_file())

    def save(self, engine: Engine, state: TrainState, extra: dict[str, Any] | None = None) -> str:
        """Write a checkpoint on every rank, then mark it complete and point `latest` at it."""
        tag = self.tag(state.step)
        self.directory.mkdir(parents=True, exist_ok=True)
        # dp_world_size: ZeRO 1-3 partition the optimizer over it; a resume on another one converts.
        client = {"train_state": state.state_dict(), "dp_world_size": engine.dp_world_size, **(extra or {})}
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client, save_latest=False)
        torch.save(rng_state(), self.directory / tag / f"rng_rank{self.rank}.pt")
        if self.loader is not None:
            write_position(self.directory / tag, self.rank, self.loader.state_dict())
        barrier()  # every rank's shards are on disk before the checkpoint is called complete
        if self.rank == 0:
            (self.directory / tag / "client_state.json").write_text(json.dumps(client, indent=1, default=str))
            (self.directory / tag / COMPLETE).write_text("ok\n")
            atomic_write(self.directory / LATEST, tag + "\n")
            self._prune(keep_tag=tag)
        barrier()
        return tag

    def _prune(self, keep_tag: str) -> None:
        tags = [t for t in self.complete_tags() if t != keep_tag]
        for old in tags[: max(0, len(tags) - (self.keep - 1))]:
            shutil.rmtree(self.directory / old, ignore_errors=True)
        # Partial checkpoints (a crash mid-write) are never pointed to; remove them too.
        for path in self.directory.iterdir():
            if path.is_dir() and not (path / COMPLETE).is_file() and path.name < keep_tag:
                shutil.rmtree(path, ignore_errors=True)

    def load(self, engine: Engine, state: TrainState, where: tuple[Path, str], universal: Path | None = None) -> dict[str, Any]:
        """`universal`: the tag's universal layout (`checkpoint_io.Reshard`), which an engine built
        with `checkpoint.load_universal` loads on another data-parallel world size; the client
        state, RNG and loader files still come from the tag itself."""
        directory, tag = where
        verify_safe(directory / tag)
        engine_dir, engine_tag = (directory, tag) if universal is None else (universal.parent, universal.name)
        if universal is not None:
            verify_safe(universal, recursive=True)
        _, client = engine.load_checkpoint(
            str(engine_dir), tag=engine_tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if client is None:
            raise RuntimeError(f"{directory / tag}: DeepSpeed could not load the checkpoint")
        state.load_state_dict(client["train_state"])
        rng_file = directory / tag / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        if self.loader is not None:  # every rank's, so another layout can deal out what is left
            self.loader.load_state_dict(read_positions(directory / tag))
        return client
