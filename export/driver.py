"""Writing an export and reading one back: the part of `vlp export` that needs no run folder.

Every export folder holds what its target loads plus `model_card.json` (config, samples seen,
eval results, sha256 of each file). Folders are written to a temporary sibling and renamed, so
a crash never leaves a half-written export. Reading never unpickles: each format's `read_model`.
Rebuilding a model from a run's checkpoints is the training layer's (`vlp.train.weights`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlp.core.files import atomic_folder
from vlp.export.base import EXPORTERS, MODEL_CARD, RunConfig, config_tree, matryoshka_card, sha256, write_json


def export_model(
    model: torch.nn.Module, config: RunConfig, out_dir: Path, fmt: str,
    results: dict | None = None, samples_seen: int | None = None,
) -> Path:
    """Write `fmt` for `model` into `out_dir` atomically; returns `out_dir`."""
    exporter = EXPORTERS.get(fmt)
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:
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
    return out_dir


def read_export(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(state dict with our names, experiment config tree) of an export that holds the whole model
    (the formats whose `read_model` answers: safetensors, open_clip), else None."""
    for _, exporter in EXPORTERS.items():
        found = exporter.read_model(Path(path))
        if found is not None:
            return found
    return None
