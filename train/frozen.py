"""Loading the frozen models that heads read (the `distill` teacher, the `compat` old model) and
attaching them to those heads: the training layer's part of `models/teacher.py`, because a model
is rebuilt from an export or a run here (`train.weights.load_model`).

The trainer calls `attach_frozen_models(model)` once, after building the model and before the
engine: the frozen models then never enter the module tree DeepSpeed wraps, so no ZeRO stage
partitions them or gives them optimizer state, and checkpoints do not hold them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlp.core.errors import ConfigError, ExportError, InputNotFound
from vlp.models.dual_encoder import VLPModel, scoring_head
from vlp.models.teacher import FrozenModel, FrozenModelConfig, FrozenModelUser


def frozen_heads(model: VLPModel) -> list[FrozenModelUser]:
    """The heads of `model` that read a frozen model, in config order."""
    return [head for head in model.objective.heads.values() if isinstance(head, FrozenModelUser)]


def attach_frozen_models(model: VLPModel) -> list[FrozenModel]:
    """Load the frozen model of every head that runs one online and attach it (checked against
    `model`: tokenizer, image input, width where the loss needs it). Heads reading embeddings from
    the shards need nothing. Returns the models attached (frozen, on the CPU until first used)."""
    attached = []
    for head in frozen_heads(model):
        spec = head.frozen_spec()
        if not spec.online:
            continue
        frozen = load_frozen_model(spec, head.frozen_path())
        frozen.check_against(model, same_width=head.needs_same_width())
        head.attach_frozen(frozen)
        attached.append(frozen)
    return attached


def load_frozen_model(spec: FrozenModelConfig, key: str) -> FrozenModel:
    """The frozen model a spec names: `export` (a vlp export, run folder or checkpoint) or
    `open_clip` (name + weights). A missing path or a folder that holds no vlp model is an input
    error naming `key` and the path (exit 2)."""
    if spec.export is not None:
        model = load_frozen_export(spec.export, f"{key}.export")
    elif spec.open_clip is not None:
        from vlp.models.config import validate_model_config

        section = {"name": spec.open_clip.name}
        if spec.open_clip.pretrained is not None:
            section["pretrained"] = spec.open_clip.pretrained
        model = VLPModel(validate_model_config({"open_clip": section}, f"{key}.open_clip"))
    else:
        raise ValueError(f"{key}: embeddings from the shards have no model to load")
    scale = spec.logit_scale if spec.logit_scale is not None else logit_scale_of(model, key)
    return FrozenModel(model, key, scale)


def load_frozen_export(path: str | Path, where: str) -> VLPModel:
    """A vlp model (eval mode, no gradients) from an export, run folder or checkpoint; a missing
    path or one that holds no vlp model is an input error starting with `where` (the config key
    or option that named it) and naming the path."""
    from vlp.train.weights import load_model

    path = Path(path)
    if not path.exists():
        raise InputNotFound(f"{where}: {path}: no such file or folder")
    try:
        model, _ = load_model(path)
    except (ExportError, ConfigError) as error:
        raise type(error)(f"{where}: {error}") from None
    return model.eval().requires_grad_(False)


def logit_scale_of(model: VLPModel, key: str) -> float:
    """The multiplier the model's scoring head applies to cosine similarities (`scale()`, as the
    clip head has); ConfigError naming `key` for a head without one (then set `logit_scale`)."""
    head = scoring_head(model)
    if not callable(getattr(head, "scale", None)):
        raise ConfigError(f"{key}: its scoring head {type(head).__name__} has no logit scale; set {key}.logit_scale")
    with torch.no_grad():
        return float(head.scale().float().reshape(-1)[0])
