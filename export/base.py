"""The exporter contract, its registry and what every format shares (state copies, file writing).

One exporter per target format, one file each in this folder (`export/<format>.py`), registered
in `EXPORTERS`; the experiment config's `export` list is built from this registry, so
registering a format makes it a valid config value, and tests/test_registries.py gives it a
round-trip test. Exporters ask towers and heads what they are (their capabilities, through the
registries), never for a type name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from vlp.core.errors import ExportError  # noqa: F401 (raised here, imported from here)
from vlp.core.registry import Registry
from vlp.models.config import ModelConfig
from vlp.models.dual_encoder import scoring_head
from vlp.models.towers.base import Tower, TowerConfig


class RunConfig(Protocol):
    """What an exporter reads of the experiment config (`vlp.train.config.ExperimentConfig`,
    a layer above): the run's name, its model config and the whole tree for the model card."""

    name: str
    model: ModelConfig

    def model_dump(self, *, mode: str = "python") -> dict[str, Any]: ...


class Exporter:
    """One target format: `write` what its target loads, `read` our weights back from it."""

    # A tiny image tower config (model.image) this format can hold, for the registry's
    # round-trip test; None: the demo's open_clip tower.
    example_image: ClassVar[dict | None] = None

    def write(self, model: torch.nn.Module, config: RunConfig, out: Path) -> list[str]:
        """Write the format's files for `model` into the empty folder `out`; returns their names."""
        raise NotImplementedError

    def read(self, directory: Path) -> dict[str, torch.Tensor]:
        """The weights an export in `directory` holds, with our parameter names (a trunk format:
        its tower's parameters only)."""
        raise NotImplementedError

    def read_model(self, directory: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(every weight with our names, experiment config tree) when `directory` is an export of
        this format that holds the whole model, else None (`vlp eval` / `vlp export` read it)."""
        return None


EXPORTERS: Registry[Exporter] = Registry("export format")


def tower_class(tower_config: TowerConfig) -> type[Tower]:
    """The registered tower class of `model.image` or `model.text`, whose capabilities
    (`open_clip_layout`, `trunk_format`) say what an exporter can make of it."""
    from vlp.models.towers import IMAGE_TOWERS, TEXT_TOWERS

    for registry in (IMAGE_TOWERS, TEXT_TOWERS):
        if tower_config.type in registry and isinstance(tower_config, registry.get(tower_config.type).config_class):
            return registry.get(tower_config.type)
    raise ExportError(f"no registered tower has the config {type(tower_config).__name__}")

# Every export folder holds this card beside the format's own files (`export.export_model`).
MODEL_CARD = "model_card.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def matryoshka_card(model: torch.nn.Module) -> dict | None:
    """The model card's `matryoshka` entry: the prefix dims the scoring head trained and how to
    take one, or None without Matryoshka. A prefix of an exported model is its first `dim`
    features re-normalised (docs/export.md), so every format serves every prefix."""
    head = scoring_head(model)
    dims = head.matryoshka_dims()
    if not dims:
        return None
    recipe = ("exp_map0(alpha * embed[..., :dim], c), alpha and c the head's (docs/export.md)" if head.hyperbolic
              else "normalize(embed[..., :dim]) for image and text alike")
    return {"dims": list(dims), "prefix": recipe}


def config_tree(config: RunConfig) -> dict:
    return config.model_dump(mode="json")


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of the model's state dict; refuses ZeRO-3 partitioned parameters
    (each rank holds a slice: export from the saved checkpoint, which `consolidate` merges)."""
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id") and param.numel() == 0:
            raise ExportError(
                f"parameter {name} is ZeRO-3 partitioned on this rank: export from the checkpoint "
                "(`vlp export RUN_DIR ...`) instead of from the live engine"
            )
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_tensors(state: dict[str, torch.Tensor], path: Path, **metadata: str) -> None:
    from safetensors.torch import save_file

    # safetensors refuses tensors that share storage; every exported tensor gets its own.
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(path),
              metadata={"format": "pt", **metadata})


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
