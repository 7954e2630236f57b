"""`vlp export` and model loading: rebuild our model from any checkpoint or export, write a format.

Every export folder holds what its target loads plus `model_card.json` (config, samples seen,
eval results, sha256 of each file). Folders are written to a temporary sibling and renamed, so
a crash never leaves a half-written export. Loading never unpickles untrusted objects:
safetensors, or the restricted reading of DeepSpeed checkpoints in `train/checkpoint_io.py`.

Formats (`EXPORTERS`, one file each; docs/export.md has the downstream recipes):

* safetensors (`export_safetensors.py`): the full model with our names + `config.yaml`.
* open_clip (`export_open_clip.py`): open_clip's `local-dir:` layout, plus vlp extras for what
  open_clip's CLIP cannot hold.
* timm (`export_timm.py`): the timm trunk of a `timm` image tower + timm's `config.json`.
* monai (`export_monai.py`): the MONAI ViT of a `monai_vit3d` tower + its constructor arguments.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from vlp.train import export_monai, export_open_clip, export_safetensors, export_timm  # noqa: F401  (register)
from vlp.train.checkpoint_io import CheckpointReadError, consolidate
from vlp.train.exporter import (
    EXPORTERS, MODEL_CARD, ExportError, Exporter, config_tree, matryoshka_card, sha256, write_json,
)

if TYPE_CHECKING:
    from vlp.train.config import ExperimentConfig

__all__ = ["EXPORTERS", "ExportError", "Exporter", "consolidate", "export_checkpoint", "export_model",
           "load_model", "read_state_dict", "run_record", "sha256"]


# ------------------------------------------------------------------------------- writing
def export_model(
    model: torch.nn.Module, config: ExperimentConfig, out_dir: Path, fmt: str,
    results: dict | None = None, samples_seen: int | None = None,
) -> Path:
    """Write `fmt` for `model` into `out_dir` atomically; returns `out_dir`."""
    exporter = EXPORTERS.get(fmt)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        files = exporter.write(model, config, tmp)
        card = {
            "format": fmt,
            "name": config.name,
            "samples_seen": samples_seen,
            "eval_results": results or {},
            "config": config_tree(config),
            "matryoshka": matryoshka_card(model),
            "files": {name: {"sha256": sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in files},
        }
        write_json(tmp / MODEL_CARD, card)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def export_checkpoint(path: Path, out_dir: Path, fmt: str) -> Path:
    """`vlp export`: rebuild the model from any checkpoint or export and write `fmt`, with the
    run's samples seen (client_state.json) and eval results (results.json) in the model card."""
    model, config = load_model(path)
    samples_seen, results = run_record(Path(path))
    return export_model(model, config, out_dir, fmt, results=results, samples_seen=samples_seen)


def run_record(path: Path) -> tuple[int | None, dict]:
    """(samples seen, eval results) of the run a checkpoint or export belongs to, where known."""
    card = path / MODEL_CARD
    if card.is_file():
        data = json.loads(card.read_text())
        return data.get("samples_seen"), data.get("eval_results") or {}
    samples, results = None, {}
    try:
        directory, tag = _resolve_checkpoint(path)
    except ExportError:
        return None, {}
    client = directory / tag / "client_state.json"
    if client.is_file():
        samples = json.loads(client.read_text()).get("train_state", {}).get("samples_seen")
    summary = directory.parent / "results.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        if data.get("samples_seen") == samples:  # results of this very checkpoint only
            results = {k: v for k, v in data.items() if k not in ("name", "steps", "samples_seen")}
    return samples, results


# ------------------------------------------------------------------------------- reading
def _resolve_checkpoint(path: Path) -> tuple[Path, str]:
    from vlp.train.checkpoint import Checkpointer

    try:
        return Checkpointer(path, 1, 0).resolve(str(path))
    except FileNotFoundError:
        raise ExportError(
            f"{path}: not a run folder, checkpoint, or safetensors / open_clip export of vlp"
        ) from None


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict with our names, experiment config tree) from a run folder, a checkpoints
    folder, one checkpoint tag folder (ZeRO 0-3), or an export that holds the whole model
    (safetensors, open_clip: the formats whose `read_model` answers)."""
    path = Path(path)
    for _, exporter in EXPORTERS.items():
        found = exporter.read_model(path)
        if found is not None:
            return found
    directory, tag = _resolve_checkpoint(path)
    config_file = directory.parent / "config.yaml"
    if not config_file.is_file():
        raise ExportError(f"{config_file}: missing (the run's resolved config is needed to rebuild the model)")
    try:
        state = consolidate(directory, tag)
    except CheckpointReadError as error:
        raise ExportError(str(error)) from None
    return state, yaml.safe_load(config_file.read_text())


def without_pretrained_weights(tree: dict) -> dict:
    """The config tree with open_clip's `pretrained` removed: the state dict read next replaces
    those weights, so rebuilding must not need the tag's Hugging Face cache or the file again."""
    model = dict(tree.get("model") or {})
    for key in ("open_clip", "image", "text"):
        section = model.get(key)
        if isinstance(section, dict) and (key == "open_clip" or section.get("type") == "open_clip"):
            model[key] = {k: v for k, v in section.items() if k != "pretrained"}
    return {**tree, "model": model}


def load_model(path: Path) -> tuple[torch.nn.Module, Any]:
    """Rebuild our model from any checkpoint or export; returns (model in eval mode, config)."""
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    state, tree = read_state_dict(path)
    config = load_config(tree=without_pretrained_weights(tree))
    model = VLPModel(config.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("attn_mask")]
    if missing or unexpected:
        raise ExportError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), config
