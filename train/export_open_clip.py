"""open_clip: `open_clip_config.json` + `open_clip_model.safetensors` for
`open_clip.create_model_and_transforms("local-dir:DIR")`; whatever open_clip's CLIP cannot hold
(other heads' parameters: curvature, pooling layers, ...) goes to `vlp_extras.safetensors` (our
names) + `vlp_extras.json`. Which head's scalars become open_clip's `logit_scale` (and
`logit_bias`) the heads say themselves (`Head.open_clip_scalars`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vlp.train.exporter import EXPORTERS, MODEL_CARD, ExportError, Exporter, model_state, save_tensors, write_json

if TYPE_CHECKING:
    from vlp.train.config import ExperimentConfig

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
EXTRAS_WEIGHTS = "vlp_extras.safetensors"
EXTRAS_INFO = "vlp_extras.json"


def open_clip_prefixes(config: ExperimentConfig) -> list[tuple[str, str]]:
    """(our prefix, open_clip CLIP's) per tower. The text tower's TextTransformer is flattened
    into CLIP itself (token_embedding, positional_embedding, transformer, ln_final,
    text_projection); a timm tower is open_clip's TimmModel (trunk + head.proj)."""
    image = [("image.model.", "visual.")] if config.model.image.type == "open_clip_vit" else [
        ("image.trunk.", "visual.trunk."), ("image.proj.", "visual.head.proj.")]
    return image + [("text.model.", "")]


def _timm_default_size(model_name: str) -> int | None:
    import timm

    try:
        return int(timm.get_pretrained_cfg(model_name).input_size[-1])
    except Exception:  # noqa: BLE001 - unknown to timm's registry of default configs
        return None


def open_clip_model_cfg(config: ExperimentConfig) -> dict:
    """open_clip's `model_cfg` for our model config: open_clip_vit, or a timm tower open_clip's
    TimmModel rebuilds identically (no extra timm kwargs, timm's default input size), plus
    open_clip_text."""
    model = config.model
    image, text = model.image, model.text
    if text.type != "open_clip_text" or image.type not in ("open_clip_vit", "timm"):
        raise ExportError(
            f"open_clip export needs open_clip_vit (or timm) + open_clip_text towers, the model has "
            f"{image.type} + {text.type} (use --format safetensors, timm or monai)"
        )
    if image.type == "open_clip_vit":
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


def scalar_head(config: ExperimentConfig) -> str | None:
    """The head whose scalars become open_clip's: the first (config order) that declares
    `open_clip_scalars`."""
    from vlp.models.heads import HEADS

    return next((name for name in config.model.heads_dict() if HEADS.get(name).open_clip_scalars), None)


def to_open_clip(state: dict[str, torch.Tensor], config: ExperimentConfig) -> tuple[dict, dict, dict]:
    """Our state dict -> (open_clip CLIP state dict, extras with our names, open_clip_config)."""
    from vlp.models.heads import HEADS

    model_cfg = open_clip_model_cfg(config)
    open_clip_state, extras = {}, {}
    for key, value in state.items():
        for ours, theirs in open_clip_prefixes(config):
            if key.startswith(ours):
                if not key.endswith("attn_mask"):  # a non-persistent buffer in open_clip
                    open_clip_state[theirs + key[len(ours):]] = value
                break
        else:
            extras[key] = value
    head = scalar_head(config)
    if head is not None:
        # open_clip's scalars are 0-dim; ours are [1] (DeepSpeed), and the head applies any clamp.
        head_class = HEADS.get(head)
        params = {name: extras.pop(f"objective.heads.{head}.{name}") for name in head_class.open_clip_scalars}
        open_clip_state.update(head_class.to_open_clip_scalars(config.model.heads_dict()[head], params))
        if "logit_bias" in open_clip_state:
            model_cfg["init_logit_bias"] = float(open_clip_state["logit_bias"])
    else:  # no such head (e.g. a hyperbolic head alone): open_clip's default, documented in vlp_extras.json
        open_clip_state["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    image = config.model.image
    preprocess_cfg = {"size": image.image_size, "mode": "RGB", "mean": list(image.mean), "std": list(image.std),
                      "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}
    return open_clip_state, extras, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def from_open_clip(open_clip_state: dict[str, torch.Tensor], extras: dict[str, torch.Tensor], config: ExperimentConfig) -> dict:
    """Inverse of `to_open_clip`: our state dict from an open_clip export (+ its extras)."""
    state = dict(extras)
    # Longest open_clip prefix first, so "" (the text tower) only takes what is left.
    prefixes = sorted(open_clip_prefixes(config), key=lambda pair: -len(pair[1]))
    head = scalar_head(config)
    for key, value in open_clip_state.items():
        if key in ("logit_scale", "logit_bias"):
            if head is not None:
                state[f"objective.heads.{head}.{key}"] = value.reshape(1)
            continue
        ours, theirs = next(pair for pair in prefixes if key.startswith(pair[1]))
        state[ours + key[len(theirs):]] = value
    return state


def _scoring_head_name(model: torch.nn.Module) -> str | None:
    from vlp.train.evals.common import scoring_head

    head = scoring_head(model)
    return next((name for name, h in model.objective.heads.items() if h is head), None)


class OpenClipExporter(Exporter):
    def write(self, model: torch.nn.Module, config: ExperimentConfig, out: Path) -> list[str]:
        open_clip_state, extras, open_clip_config = to_open_clip(model_state(model), config)
        write_json(out / OPEN_CLIP_CONFIG, open_clip_config)
        save_tensors(open_clip_state, out / OPEN_CLIP_WEIGHTS)
        files = [OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS]
        scalars_from = scalar_head(config)
        other_heads = [name for name in config.model.heads_dict() if name != scalars_from]
        if extras or other_heads:
            save_tensors(extras, out / EXTRAS_WEIGHTS, vlp="extras")
            scoring = _scoring_head_name(model)
            write_json(out / EXTRAS_INFO, {
                "what": "parameters open_clip's CLIP has no place for, with vlp's names; "
                        "`vlp eval --checkpoint DIR` (or train.export.load_model) uses them",
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

        from vlp.train.config import load_config

        directory = Path(directory)
        if not ((directory / OPEN_CLIP_WEIGHTS).is_file() and (directory / MODEL_CARD).is_file()):
            return None
        tree = json.loads((directory / MODEL_CARD).read_text())["config"]
        extras = load_file(str(directory / EXTRAS_WEIGHTS)) if (directory / EXTRAS_WEIGHTS).is_file() else {}
        return from_open_clip(load_file(str(directory / OPEN_CLIP_WEIGHTS)), extras, load_config(tree=tree)), tree


EXPORTERS.register("open_clip")(OpenClipExporter())
