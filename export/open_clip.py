"""open_clip: `open_clip_config.json` + `open_clip_model.safetensors` for
`open_clip.create_model_and_transforms("local-dir:DIR")`; whatever open_clip's CLIP cannot hold
(other heads' parameters: curvature, pooling layers, ...) goes to `vlp_extras.safetensors` (our
names) + `vlp_extras.json`. Which head's scalars become open_clip's `logit_scale` (and
`logit_bias`) the heads say themselves (`Head.open_clip_scalars`).

Two kinds of model export: our open_clip_vit (or timm) + open_clip_text towers, whose
`model_cfg` is written from their configs; and a `model.open_clip: {name: ...}` model (towers of
type `open_clip`, built by open_clip's factory), whose `model_cfg` is open_clip's own for that
name, so the weights also load with `open_clip.create_model(name, pretrained=FILE)` for a
built-in name."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from vlp.export.base import (
    EXPORTERS, MODEL_CARD, Exporter, ExportError, RunConfig, model_state, save_tensors, tower_class, write_json,
)
from vlp.models.config import ModelConfig
from vlp.models.dual_encoder import scoring_head


OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
EXTRAS_WEIGHTS = "vlp_extras.safetensors"
EXTRAS_INFO = "vlp_extras.json"


def is_open_clip_model(model_config: ModelConfig) -> bool:
    """Both towers are parts of one open_clip model built by open_clip's factory (`model.open_clip`)."""
    return (tower_class(model_config.image).open_clip_layout == "factory"
            and tower_class(model_config.text).open_clip_layout == "factory")


def open_clip_prefixes(model_config: ModelConfig) -> list[tuple[str, str]]:
    """(our prefix, open_clip CLIP's) per tower. The text tower's TextTransformer is flattened
    into CLIP itself (token_embedding, positional_embedding, transformer, ln_final,
    text_projection); a timm tower is open_clip's TimmModel (trunk + head.proj). An open_clip
    model's towers are open_clip's `visual` and CustomTextCLIP's `text` already (vlp builds it
    with `force_custom_text`): flattened like ours when open_clip's own class for the name is
    CLIP (its loader turns that layout back into CustomTextCLIP's; not the other way round), kept
    under `text.` for a CustomTextCLIP (HF text encoders, `custom_text`)."""
    if is_open_clip_model(model_config):
        return [("image.model.", "visual."), ("text.model.", "text." if _custom_text(_named_model_cfg(model_config)) else "")]
    image = [("image.model.", "visual.")] if tower_class(model_config.image).open_clip_layout == "visual" else [
        ("image.trunk.", "visual.trunk."), ("image.proj.", "visual.head.proj.")]
    return image + [("text.model.", "")]


def _custom_text(model_cfg: dict) -> bool:
    """open_clip builds CustomTextCLIP (text as one `.text` module) rather than CLIP for this
    `model_cfg`, as `open_clip.create_model` decides it."""
    return bool(model_cfg.get("custom_text")) or "hf_model_name" in model_cfg.get("text_cfg", {})


def _is_builtin_name(name: str) -> bool:
    from open_clip.factory import parse_model_name

    return parse_model_name(name)[0] is None


def _named_model_cfg(model_config: ModelConfig) -> dict:
    """open_clip's own `model_cfg` for an open_clip model's name (`hf-hub:` from the local cache,
    `local-dir:` from its folder), refused where our towers cannot be all of that model."""
    import open_clip

    from vlp.models.pretrained import resolve_model_name

    image, text, model = model_config.image, model_config.text, model_config
    if image.name != text.name:
        raise ExportError(f"open_clip export: model.image.name={image.name} and model.text.name={text.name} are two "
                          "open_clip models, open_clip_config.json holds one (use --format safetensors)")
    try:
        model_cfg = open_clip.get_model_config(resolve_model_name(image.name))
    except ValueError as error:  # PretrainedError: an hf-hub: name not in the local cache, ...
        raise ExportError(f"open_clip export: {error}") from None
    if model_cfg is None:
        raise ExportError(f"open_clip export: {image.name} is not an open_clip model config")
    if "multimodal_cfg" in model_cfg:
        raise ExportError(f"open_clip export: {image.name} is a CoCa model; vlp holds its towers without the text "
                          "decoder, which open_clip's CoCa needs (use --format safetensors)")
    if model_cfg["embed_dim"] != model.embed_dim:
        raise ExportError(f"open_clip export: model.embed_dim={model.embed_dim} is not {image.name}'s "
                          f"embed_dim {model_cfg['embed_dim']}")
    return model_cfg


def _timm_default_size(model_name: str) -> int | None:
    import timm

    try:
        return int(timm.get_pretrained_cfg(model_name).input_size[-1])
    except Exception:  # noqa: BLE001 - unknown to timm's registry of default configs
        return None


def open_clip_model_cfg(model_config: ModelConfig) -> dict:
    """open_clip's `model_cfg` for our model config: open_clip_vit, or a timm tower open_clip's
    TimmModel rebuilds identically (no extra timm kwargs, timm's default input size), plus
    open_clip_text."""
    model = model_config
    image, text = model.image, model.text
    if is_open_clip_model(model_config):
        return _named_model_cfg(model_config)
    image_layout, text_layout = tower_class(image).open_clip_layout, tower_class(text).open_clip_layout
    if text_layout != "text" or image_layout not in ("visual", "timm"):
        raise ExportError(
            f"open_clip export needs open_clip_vit (or timm) + open_clip_text towers, or model.open_clip, the model "
            f"has {image.type} + {text.type} (use --format safetensors, timm or monai)"
        )
    if image_layout == "visual":
        vision_cfg = image.open_clip_cfg()
    else:
        # open_clip's TimmModel passes no kwargs (img_size, patch_size, depth ...) to timm.
        default_size = _timm_default_size(image.model_name)
        if image.kwargs or image.image_size != default_size:
            raise ExportError(
                f"open_clip export: open_clip's TimmModel cannot pass timm kwargs {image.kwargs or {}} or "
                f"image_size {image.image_size} (timm default {default_size}) to {image.model_name}; "
                "use --format timm for the trunk"
            )
        vision_cfg = {"timm_model_name": image.model_name, "timm_model_pretrained": False, "timm_pool": "",
                      "timm_proj": "linear", "timm_proj_bias": False, "image_size": image.image_size}
    return {"embed_dim": model.embed_dim, "vision_cfg": vision_cfg, "text_cfg": text.open_clip_cfg()}


def scalar_head(model_config: ModelConfig) -> str | None:
    """The head whose scalars become open_clip's: the first (config order) that declares
    `open_clip_scalars`."""
    from vlp.models.heads import HEADS

    return next((name for name in model_config.heads_dict() if HEADS.get(name).open_clip_scalars), None)


def to_open_clip(state: dict[str, torch.Tensor], model_config: ModelConfig,
                 preprocess_cfg: dict | None = None) -> tuple[dict, dict, dict]:
    """Our state dict -> (open_clip CLIP state dict, extras with our names, open_clip_config).
    `preprocess_cfg`: open_clip's, where the model has it (an open_clip model's image tower
    carries the one open_clip resolved for its name and tag); else built from model.image."""
    from vlp.models.heads import HEADS

    model_cfg = open_clip_model_cfg(model_config)
    open_clip_state, extras = {}, {}
    for key, value in state.items():
        for ours, theirs in open_clip_prefixes(model_config):
            if key.startswith(ours):
                if not key.endswith("attn_mask"):  # a non-persistent buffer in open_clip
                    open_clip_state[theirs + key[len(ours):]] = value
                break
        else:
            extras[key] = value
    head = scalar_head(model_config)
    if head is not None:
        # open_clip's scalars are 0-dim; ours are [1] (DeepSpeed), and the head applies any clamp.
        head_class = HEADS.get(head)
        params = {name: extras.pop(f"objective.heads.{head}.{name}") for name in head_class.open_clip_scalars}
        open_clip_state.update(head_class.to_open_clip_scalars(model_config.heads_dict()[head], params))
        if "logit_bias" in open_clip_state:
            model_cfg["init_logit_bias"] = float(open_clip_state["logit_bias"])
    else:  # no such head (e.g. a hyperbolic head alone): open_clip's default, documented in vlp_extras.json
        open_clip_state["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    if preprocess_cfg is None:
        image = model_config.image
        preprocess_cfg = {"size": image.image_size, "mode": "RGB", "mean": list(image.mean), "std": list(image.std),
                          "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}
    open_clip_config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    if is_open_clip_model(model_config) and _is_builtin_name(model_config.image.name):
        # `open_clip.create_model(model_name, pretrained=<the weights file>)` also loads it (open_clip
        # ignores `pretrained` for `hf-hub:` / `local-dir:` names, so those get no model_name).
        open_clip_config["model_name"] = model_config.image.name
    return open_clip_state, extras, open_clip_config


def from_open_clip(open_clip_state: dict[str, torch.Tensor], extras: dict[str, torch.Tensor], model_config: ModelConfig) -> dict:
    """Inverse of `to_open_clip`: our state dict from an open_clip export (+ its extras)."""
    state = dict(extras)
    # Longest open_clip prefix first, so "" (the text tower) only takes what is left.
    prefixes = sorted(open_clip_prefixes(model_config), key=lambda pair: -len(pair[1]))
    head = scalar_head(model_config)
    for key, value in open_clip_state.items():
        if key in ("logit_scale", "logit_bias"):
            if head is not None:
                state[f"objective.heads.{head}.{key}"] = value.reshape(1)
            continue
        ours, theirs = next(pair for pair in prefixes if key.startswith(pair[1]))
        state[ours + key[len(theirs):]] = value
    return state


def _scoring_head_name(model: torch.nn.Module) -> str | None:
    head = scoring_head(model)
    return next((name for name, h in model.objective.heads.items() if h is head), None)


class OpenClipExporter(Exporter):
    def write(self, model: torch.nn.Module, config: RunConfig, out: Path) -> list[str]:
        # open_clip's resolved preprocessing (size, mean / std of the name's tag, ...) lives on its visual.
        preprocess_cfg = getattr(model.image.model, "preprocess_cfg", None) if is_open_clip_model(config.model) else None
        open_clip_state, extras, open_clip_config = to_open_clip(
            model_state(model), config.model, dict(preprocess_cfg) if preprocess_cfg else None)
        write_json(out / OPEN_CLIP_CONFIG, open_clip_config)
        save_tensors(open_clip_state, out / OPEN_CLIP_WEIGHTS)
        files = [OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS]
        scalars_from = scalar_head(config.model)
        other_heads = [name for name in config.model.heads_dict() if name != scalars_from]
        if extras or other_heads:
            save_tensors(extras, out / EXTRAS_WEIGHTS, vlp="extras")
            scoring = _scoring_head_name(model)
            write_json(out / EXTRAS_INFO, {
                "what": "parameters open_clip's CLIP has no place for, with vlp's names; "
                        "`vlp eval --checkpoint DIR` (or vlp.train.weights.load_model) uses them",
                "heads": {name: cfg.model_dump(mode="json") for name, cfg in config.model.heads_dict().items()},
                "open_clip_logit_scale_from": scalars_from,
                "scoring_head": scoring,
                "open_clip_scores_like_vlp": bool(model.objective.heads[scoring].open_clip_scalars) if scoring else False,
                "keys": sorted(extras),
            })
            files += [EXTRAS_WEIGHTS, EXTRAS_INFO]
        return files

    def read(self, directory: Path) -> dict[str, torch.Tensor]:
        found = self.read_model(directory)
        if found is None:
            raise ExportError(f"{directory}: no open_clip export of vlp ({OPEN_CLIP_WEIGHTS} + {MODEL_CARD})")
        return found[0]

    def read_model(self, directory: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
        from safetensors.torch import load_file

        from vlp.models.config import validate_model_config

        directory = Path(directory)
        if not ((directory / OPEN_CLIP_WEIGHTS).is_file() and (directory / MODEL_CARD).is_file()):
            return None
        tree = json.loads((directory / MODEL_CARD).read_text())["config"]
        extras = load_file(str(directory / EXTRAS_WEIGHTS)) if (directory / EXTRAS_WEIGHTS).is_file() else {}
        return from_open_clip(load_file(str(directory / OPEN_CLIP_WEIGHTS)), extras, validate_model_config(tree["model"])), tree


EXPORTERS.register("open_clip")(OpenClipExporter())
