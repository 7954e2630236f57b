"""Checkpoint loading and export, one state-dict adapter per target format.

Every export folder holds what its target loads plus `model_card.json` (config, samples seen,
eval results, sha256 of each file). Folders are written to a temporary sibling and renamed, so
a crash never leaves a half-written export. Loading never unpickles untrusted objects:
safetensors, or `torch.load(weights_only=True)` (DeepSpeed's ZeRO files included: its
`zero_to_fp32` merge is run with its `torch.load` forced to `weights_only=True`, see
`_weights_only_deepspeed`).

Formats (`EXPORTERS`; docs/export.md has the downstream recipes):

* safetensors: the full model with our names (`model.safetensors`) + `config.yaml`.
* open_clip: `open_clip_config.json` + `open_clip_model.safetensors` for
  `open_clip.create_model_and_transforms("local-dir:DIR")`; whatever open_clip's CLIP cannot hold
  (other heads' parameters: MERU curvature, FLAIR pooling, ...) goes to `vlp_extras.safetensors`
  (our names) + `vlp_extras.json`.
* timm: the timm trunk of a `timm` image tower (timm's names, no classifier) + `config.json`.
* monai: the MONAI ViT of a `monai_vit3d` tower (`monai.networks.nets.ViT` names, which are also
  `UNETR(...).vit`'s) + `monai_vit_config.json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml

from vlp.core.registry import Registry
from vlp.train.checkpoint import deepspeed_safe_globals

EXPORTERS: Registry[Callable[..., list[str]]] = Registry("export format")

# Files of a safetensors export / of an open_clip export (read back by `read_state_dict`).
SAFETENSORS_FILE = "model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
EXTRAS_WEIGHTS = "vlp_extras.safetensors"
EXTRAS_INFO = "vlp_extras.json"
MODEL_CARD = "model_card.json"


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


def _save(state: dict[str, torch.Tensor], path: Path, **metadata: str) -> None:
    from safetensors.torch import save_file

    # safetensors refuses tensors that share storage; every exported tensor gets its own.
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(path),
              metadata={"format": "pt", **metadata})


def _json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


# ------------------------------------------------------------------------------- safetensors
@EXPORTERS.register("safetensors")
def export_safetensors(model: torch.nn.Module, config: Any, out: Path) -> list[str]:
    """The full model (`model.safetensors`, our parameter names) plus `config.yaml`."""
    _save(model_state(model), out / SAFETENSORS_FILE, vlp="full")
    (out / "config.yaml").write_text(yaml.safe_dump(config_tree(config), sort_keys=False))
    return [SAFETENSORS_FILE, "config.yaml"]


# ------------------------------------------------------------------------------- open_clip
# Heads whose learnable scalars open_clip's CLIP has (logit_scale, and logit_bias for siglip).
OPEN_CLIP_SCALAR_HEADS = ("clip", "siglip")


def open_clip_prefixes(config: Any) -> list[tuple[str, str]]:
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


def open_clip_model_cfg(config: Any) -> dict:
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


def _scalar_head(config: Any) -> str | None:
    """The head whose logit scale (and bias) becomes open_clip's: the first clip/siglip head."""
    return next((name for name in config.model.heads_dict() if name in OPEN_CLIP_SCALAR_HEADS), None)


def to_open_clip(state: dict[str, torch.Tensor], config: Any) -> tuple[dict, dict, dict]:
    """Our state dict -> (open_clip CLIP state dict, extras with our names, open_clip_config)."""
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
    head = _scalar_head(config)
    if head is not None:
        head_cfg = config.model.heads_dict()[head]
        # open_clip's scalars are 0-dim; ours are [1] (DeepSpeed). The clamp our heads apply in
        # forward is applied here once, so open_clip's exp(logit_scale) is the scale we used.
        log_scale = extras.pop(f"objective.heads.{head}.logit_scale").float().reshape(())
        open_clip_state["logit_scale"] = log_scale.clamp(max=math.log(head_cfg.max_logit_scale))
        if head == "siglip":
            open_clip_state["logit_bias"] = extras.pop(f"objective.heads.{head}.logit_bias").float().reshape(())
            model_cfg["init_logit_bias"] = float(open_clip_state["logit_bias"])
    else:  # no cosine head (e.g. MERU alone): open_clip's default, documented in vlp_extras.json
        open_clip_state["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    image = config.model.image
    preprocess_cfg = {"size": image.image_size, "mode": "RGB", "mean": list(image.mean), "std": list(image.std),
                      "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}
    return open_clip_state, extras, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def from_open_clip(open_clip_state: dict[str, torch.Tensor], extras: dict[str, torch.Tensor], config: Any) -> dict:
    """Inverse of `to_open_clip`: our state dict from an open_clip export (+ its extras)."""
    state = dict(extras)
    # Longest open_clip prefix first, so "" (the text tower) only takes what is left.
    prefixes = sorted(open_clip_prefixes(config), key=lambda pair: -len(pair[1]))
    head = _scalar_head(config)
    for key, value in open_clip_state.items():
        if key in ("logit_scale", "logit_bias"):
            if head is not None:
                state[f"objective.heads.{head}.{key}"] = value.reshape(1)
            continue
        ours, theirs = next(pair for pair in prefixes if key.startswith(pair[1]))
        state[ours + key[len(theirs):]] = value
    return state


@EXPORTERS.register("open_clip")
def export_open_clip(model: torch.nn.Module, config: Any, out: Path) -> list[str]:
    open_clip_state, extras, open_clip_config = to_open_clip(model_state(model), config)
    _json(out / OPEN_CLIP_CONFIG, open_clip_config)
    _save(open_clip_state, out / OPEN_CLIP_WEIGHTS)
    files = [OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS]
    scalar_head = _scalar_head(config)
    other_heads = [name for name in config.model.heads_dict() if name != scalar_head]
    if extras or other_heads:
        _save(extras, out / EXTRAS_WEIGHTS, vlp="extras")
        scoring = _scoring_head_name(model)
        _json(out / EXTRAS_INFO, {
            "what": "parameters open_clip's CLIP has no place for, with vlp's names; "
                    "`vlp eval --checkpoint DIR` (or train.export.load_model) uses them",
            "heads": {name: cfg.model_dump(mode="json") for name, cfg in config.model.heads_dict().items()},
            "open_clip_logit_scale_from": scalar_head,
            "scoring_head": scoring,
            "open_clip_scores_like_vlp": scoring in OPEN_CLIP_SCALAR_HEADS,
            "keys": sorted(extras),
        })
        files += [EXTRAS_WEIGHTS, EXTRAS_INFO]
    return files


def _scoring_head_name(model: torch.nn.Module) -> str | None:
    from vlp.train.evals.common import scoring_head

    head = scoring_head(model)
    return next((name for name, h in model.objective.heads.items() if h is head), None)


# ------------------------------------------------------------------------------- timm
@EXPORTERS.register("timm")
def export_timm(model: torch.nn.Module, config: Any, out: Path) -> list[str]:
    """The timm trunk (timm's own names, no classifier, no projection) + timm's `config.json`."""
    image = config.model.image
    if image.type != "timm":
        raise ExportError(f"timm export needs a `timm` image tower, the model has {image.type}")
    trunk = {k[len("image.trunk."):]: v for k, v in model_state(model).items() if k.startswith("image.trunk.")}
    _save(trunk, out / "model.safetensors")
    cfg = model.image.trunk.pretrained_cfg
    pretrained_cfg = {
        "architecture": image.model_name,
        "input_size": [3, image.image_size, image.image_size],
        "mean": list(image.mean), "std": list(image.std),
        "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
        "num_classes": 0, "first_conv": cfg.get("first_conv"), "classifier": cfg.get("classifier"),
    }
    _json(out / "config.json", {
        "architecture": image.model_name,
        "num_classes": 0,
        "num_features": int(model.image.trunk.num_features),
        # What the tower passed to timm.create_model besides num_classes / drop_path_rate.
        "model_args": _trunk_kwargs(image),
        "pretrained_cfg": pretrained_cfg,
    })
    return ["model.safetensors", "config.json"]


def _trunk_kwargs(image: Any) -> dict:
    """`TimmTower`'s keyword arguments for timm.create_model (it sets img_size for ViT-like models)."""
    kwargs = dict(image.kwargs)
    if any(tag in image.model_name for tag in ("vit", "deit", "eva")):
        kwargs.setdefault("img_size", image.image_size)
    return kwargs


# ------------------------------------------------------------------------------- monai
@EXPORTERS.register("monai")
def export_monai(model: torch.nn.Module, config: Any, out: Path) -> list[str]:
    """The MONAI ViT (`monai.networks.nets.ViT(..., classification=False)` names, the same as
    `UNETR(...).vit`'s) + the ViT's constructor arguments."""
    image = config.model.image
    if image.type != "monai_vit3d":
        raise ExportError(f"monai export needs a `monai_vit3d` image tower, the model has {image.type}")
    vit = {k[len("image.vit."):]: v for k, v in model_state(model).items() if k.startswith("image.vit.")}
    _save(vit, out / "monai_vit.safetensors")
    vit_args = {
        "in_channels": 1, "img_size": list(image.roi), "patch_size": list(image.patch_size),
        "hidden_size": image.hidden_size, "mlp_dim": image.mlp_dim, "num_layers": image.num_layers,
        "num_heads": image.num_heads, "proj_type": "conv", "classification": False, "spatial_dims": 3,
        "qkv_bias": image.qkv_bias,
    }
    # UNETR builds ViT(patch_size=16, num_layers=12) itself: only then do these weights fit it.
    unetr_ok = tuple(image.patch_size) == (16, 16, 16) and image.num_layers == 12
    _json(out / "monai_vit_config.json", {
        "vit_args": vit_args,
        "unetr_compatible": unetr_ok,
        "unetr_args": {"in_channels": 1, "img_size": list(image.roi), "hidden_size": image.hidden_size,
                       "mlp_dim": image.mlp_dim, "num_heads": image.num_heads, "proj_type": "conv",
                       "qkv_bias": image.qkv_bias} if unetr_ok else None,
        "input": "volumes (B, 1, H, W, D), RAS axis order, intensities in [-1, 1] (hu_window "
                 f"{list(image.hu_window)}, spacing {list(image.spacing) if image.spacing else None})",
    })
    return ["monai_vit.safetensors", "monai_vit_config.json"]


# ------------------------------------------------------------------------------- writing
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
        _json(tmp / MODEL_CARD, card)
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
    folder, one checkpoint tag folder (ZeRO 0-3), a safetensors export or an open_clip export."""
    from safetensors.torch import load_file

    path = Path(path)
    if (path / SAFETENSORS_FILE).is_file() and (path / "config.yaml").is_file():
        return load_file(str(path / SAFETENSORS_FILE)), yaml.safe_load((path / "config.yaml").read_text())
    if (path / OPEN_CLIP_WEIGHTS).is_file() and (path / MODEL_CARD).is_file():
        from vlp.train.config import load_config

        tree = json.loads((path / MODEL_CARD).read_text())["config"]
        extras = load_file(str(path / EXTRAS_WEIGHTS)) if (path / EXTRAS_WEIGHTS).is_file() else {}
        return from_open_clip(load_file(str(path / OPEN_CLIP_WEIGHTS)), extras, load_config(tree=tree)), tree
    directory, tag = _resolve_checkpoint(path)
    config_file = directory.parent / "config.yaml"
    if not config_file.is_file():
        raise ExportError(f"{config_file}: missing (the run's resolved config is needed to rebuild the model)")
    return consolidate(directory, tag), yaml.safe_load(config_file.read_text())


class _WeightsOnlyTorch:
    """`torch` as DeepSpeed's zero_to_fp32 sees it, with `load` forced to `weights_only=True`.

    zero_to_fp32 calls `torch.load(..., weights_only=False)`, which would run any pickled code in
    a checkpoint. Its files hold only tensors, containers, torch.Size and a few plain DeepSpeed
    classes (the ZeRO stage enum, the loss scaler: attribute bags without `__setstate__`), so
    torch's restricted unpickler with exactly those allow-listed reads them."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            try:
                return torch.load(*args, **kwargs)
            except Exception as error:  # pickle.UnpicklingError: an object we do not allow
                raise ExportError(f"{args[0] if args else kwargs.get('f')}: refusing to unpickle it ({_unpickle_reason(error)})") from None


def _unpickle_reason(error: Exception) -> str:
    lines = str(error).splitlines()
    for marker in ("Unsupported global", "WeightsUnpickler error"):
        found = [line.strip() for line in lines if marker in line]
        if found:
            return found[0][:300]
    return (lines[0] if lines else type(error).__name__)[:300]


@contextlib.contextmanager
def _weights_only_deepspeed() -> Iterator[Any]:
    from deepspeed.utils import zero_to_fp32

    original = zero_to_fp32.torch
    zero_to_fp32.torch = _WeightsOnlyTorch()
    try:
        yield zero_to_fp32
    finally:
        zero_to_fp32.torch = original


def consolidate(directory: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint of any ZeRO stage, via DeepSpeed's own
    `zero_to_fp32` merge (ZeRO 1-3: the fp32 master partitions of every rank), read with
    `weights_only=True`; ZeRO 0: the model file itself."""
    tag_dir = Path(directory) / tag
    if any(tag_dir.glob("*optim_states.pt")) and any(tag_dir.glob("*zero_pp_rank_*")):
        with _weights_only_deepspeed() as zero_to_fp32, contextlib.redirect_stdout(None):
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise ExportError(f"{tag_dir}: no DeepSpeed model states found")
    blob = torch.load(model_file, map_location="cpu", weights_only=True)
    return {k: v.float() if v.is_floating_point() else v for k, v in blob["module"].items()}


def load_model(path: Path) -> tuple[torch.nn.Module, Any]:
    """Rebuild our model from any checkpoint or export; returns (model in eval mode, config)."""
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    state, tree = read_state_dict(path)
    config = load_config(tree=tree)
    model = VLPModel(config.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("attn_mask")]
    if missing or unexpected:
        raise ExportError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), config
