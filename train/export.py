"""Checkpoint loading and export, one state-dict adapter per target format.

Every export folder holds what its target loads plus `model_card.json` (config, samples seen,
eval results, sha256 of each file). Folders are written to a temporary sibling and renamed, so
a crash never leaves a half-written export. Loading never unpickles untrusted objects:
safetensors, or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from models.registry import Registry

EXPORTERS: Registry[Callable[..., list[str]]] = Registry("export format")


class ExportError(ValueError):
    """Bad export input (exit code 2)."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def config_tree(config: Any) -> dict:
    return config.model_dump(mode="json")


def _contiguous_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


@EXPORTERS.register("safetensors")
def export_safetensors(model: torch.nn.Module, config: Any, out: Path) -> list[str]:
    """The full model (`model.safetensors`, our parameter names) plus `config.yaml`."""
    from safetensors.torch import save_file

    state = _contiguous_state(model)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "vlp"})
    (out / "config.yaml").write_text(yaml.safe_dump(config_tree(config), sort_keys=False))
    return ["model.safetensors", "config.yaml"]


def export_model(
    model: torch.nn.Module, config: Any, out_dir: Path, fmt: str,
    results: dict | None = None, samples_seen: int | None = None,
) -> Path:
    """Write `fmt` for `model` into `out_dir` atomically; returns `out_dir`."""
    exporter = EXPORTERS.get(fmt)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        files = exporter(model, config, tmp)
        card = {
            "format": fmt,
            "name": config.name,
            "samples_seen": samples_seen,
            "eval_results": results or {},
            "config": config_tree(config),
            "files": {name: {"sha256": sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in files},
        }
        (tmp / "model_card.json").write_text(json.dumps(card, indent=1, default=str))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict with our names, experiment config tree) from a run folder, a checkpoints
    folder, one checkpoint tag folder (ZeRO 0-3) or a safetensors export folder."""
    from safetensors.torch import load_file

    path = Path(path)
    if (path / "model.safetensors").is_file() and (path / "config.yaml").is_file():
        return load_file(str(path / "model.safetensors")), yaml.safe_load((path / "config.yaml").read_text())
    from train.checkpoint import Checkpointer

    try:
        directory, tag = Checkpointer(path, 1, 0).resolve(str(path))
    except FileNotFoundError:
        raise ExportError(f"{path}: not a run folder, checkpoint or safetensors export") from None
    run_dir = directory.parent
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ExportError(f"{config_file}: missing (the run's resolved config is needed to rebuild the model)")
    tree = yaml.safe_load(config_file.read_text())
    return consolidate(directory, tag), tree


def consolidate(directory: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint of any ZeRO stage, via DeepSpeed's own utilities."""
    tag_dir = Path(directory) / tag
    if any(tag_dir.glob("*optim_states.pt")) and any(tag_dir.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
        # ZeRO 1/2 keep full weights in the model file too; both paths give fp32 tensors here.
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise ExportError(f"{tag_dir}: no DeepSpeed model states found")
    blob = torch.load(model_file, map_location="cpu", weights_only=True)
    return {k: v.float() if v.is_floating_point() else v for k, v in blob["module"].items()}


def load_model(path: Path) -> tuple[torch.nn.Module, Any]:
    """Rebuild our model from any checkpoint or export; returns (model in eval mode, config)."""
    from models.dual_encoder import VLPModel
    from train.config import load_config

    state, tree = read_state_dict(path)
    config = load_config(tree=tree)
    model = VLPModel(config.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("attn_mask")]
    if missing or unexpected:
        raise ExportError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), config
