"""Rebuilding our model from anything a run leaves: a run folder, a `checkpoints/` folder, one
checkpoint tag (ZeRO 0-3, merged by `checkpoint_io.consolidate`), or an export that holds the
whole model (`vlp.export`). `vlp eval`, `vlp export`, `train.init_from` and the end of training
read weights here. Loading never unpickles untrusted objects: safetensors, or the restricted
reading of DeepSpeed checkpoints in `train/checkpoint_io.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from vlp.export import MODEL_CARD, ExportError, export_model, read_export
from vlp.export.frozen import model_without_pretrained
from vlp.train.checkpoint import resolve_checkpoint
from vlp.train.checkpoint_io import CheckpointReadError, consolidate
from vlp.train.config import ExperimentConfig, load_config

__all__ = ["consolidate", "export_checkpoint", "load_model", "read_state_dict", "run_record"]


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
    try:
        return resolve_checkpoint(path, str(path))
    except FileNotFoundError:
        raise ExportError(
            f"{path}: not a run folder, checkpoint, or safetensors / open_clip export of vlp"
        ) from None


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict with our names, experiment config tree) from a run folder, a checkpoints
    folder, one checkpoint tag folder (ZeRO 0-3), or an export that holds the whole model
    (safetensors, open_clip: the formats whose `read_model` answers)."""
    path = Path(path)
    found = read_export(path)
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
    """The config tree without the towers' `pretrained` weight sources (`model_without_pretrained`):
    the state dict read next replaces those weights, so rebuilding needs neither the tag's Hugging
    Face cache nor the file again."""
    return {**tree, "model": model_without_pretrained(tree.get("model") or {})}


def load_model(path: Path) -> tuple[torch.nn.Module, ExperimentConfig]:
    """Rebuild our model from any checkpoint or export; returns (model in eval mode, config)."""
    from vlp.models.dual_encoder import VLPModel

    state, tree = read_state_dict(path)
    config = load_config(tree=without_pretrained_weights(tree))
    model = VLPModel(config.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("attn_mask")]
    if missing or unexpected:
        raise ExportError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), config
