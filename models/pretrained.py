"""Pretrained weights in: open_clip models by name, open_clip / timm checkpoint files, Hugging
Face folders. Never touches the network.

Every path goes through the owning library's own loader, not a copy of it:

* open_clip: `open_clip.create_model_and_transforms` builds the model and its preprocessing from
  the model's own config (built-in name, `hf-hub:ORG/REPO`, `local-dir:DIR`; a pretrained tag's
  mean/std/interpolation included), `open_clip.load_checkpoint` reads the weights (its
  `state_dict` / `module.` unwrapping, CLIP -> CustomTextCLIP key conversion, position-embedding
  resizing), `open_clip.get_tokenizer` the tokenizer.
* timm: `timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`, which
  also applies the model's own checkpoint filter (original-format weights, resized embeddings).
* Hugging Face: `transformers.AutoModel.from_pretrained(DIR, local_files_only=True)`.

Pretrained tags and `hf-hub:` names resolve through the local Hugging Face cache only (and
open_clip's `~/.cache/clip` for URL-only tags); what is not cached fails with one line saying
where it looked and how to fetch it. Key mismatches are `PretrainedError` naming the first few,
unless the config says `strict: false` (then they are logged).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from vlp.core.errors import PretrainedError  # noqa: F401 (raised here, imported from here)

log = logging.getLogger("vlp.pretrained")


# ------------------------------------------------------------------------------ offline
@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hugging Face hub and transformers in offline mode for the duration: a cached file resolves,
    anything else raises instead of downloading. huggingface_hub reads HF_HUB_OFFLINE into its
    constants at import, so the constant is set too."""
    import huggingface_hub.constants as hub_constants

    saved_env = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    saved_constant = hub_constants.HF_HUB_OFFLINE
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved_constant
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def hub_cache() -> str:
    import huggingface_hub.constants as hub_constants

    return str(hub_constants.HF_HUB_CACHE)


def cached_hub_file(repo_id: str, filenames: Iterable[str]) -> Optional[str]:
    """Local path of the first of `filenames` in the Hugging Face cache for `repo_id`, else None."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache())
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _weight_names(filename: Optional[str]) -> list[str]:
    """The files open_clip's `download_pretrained_from_hf` would try, in its order."""
    from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives

    filename = filename or HF_WEIGHTS_NAME
    return [*_get_safe_alternatives(filename), filename]


def _fetch_hint(repo_id: str, filename: str) -> str:
    return f"fetch it once with network: `huggingface-cli download {repo_id} {filename}` (or HF_HUB_CACHE=... to point at a cache)"


def resolve_model_name(name: str) -> str:
    """open_clip model name to build offline: `hf-hub:ORG/REPO` becomes `local-dir:SNAPSHOT` of
    its cached copy (open_clip_config.json + weights); built-in names and `local-dir:` stay."""
    from open_clip.factory import parse_model_name

    schema, identifier = parse_model_name(name)
    if schema == "local-dir":
        if not (Path(identifier) / "open_clip_config.json").is_file():
            raise PretrainedError(f"model.open_clip.name={name}: no open_clip_config.json in {identifier}")
        return name
    if schema == "hf-hub":
        config_file = cached_hub_file(identifier, ["open_clip_config.json"])
        if config_file is None:
            raise PretrainedError(f"model.open_clip.name={name}: open_clip_config.json of {identifier} is not in the "
                                  f"local Hugging Face cache ({hub_cache()}); {_fetch_hint(identifier, 'open_clip_config.json')}")
        return "local-dir:" + str(Path(config_file).parent)
    import open_clip

    if open_clip.get_model_config(name) is None:
        from vlp.core.registry import nearest

        raise PretrainedError(f"model.open_clip.name={name}: not an open_clip model config.{nearest(name, open_clip.list_models())}")
    return name


def resolve_pretrained(name: str, pretrained: str) -> str:
    """A pretrained tag of built-in model `name`, or a file path, to a local weights file.

    Tags resolve as open_clip's `download_pretrained` would (hub first, then its URL cache), but
    only from what is cached; an uncached tag raises one line naming where it looked."""
    if os.path.isfile(pretrained):
        return pretrained
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise PretrainedError(f"model.open_clip.pretrained={pretrained}: neither a file nor a pretrained tag of {name} "
                              f"(tags: {', '.join(tags) or 'none'})")
    if cfg.get("file"):
        return cfg["file"]
    looked = []
    if cfg.get("hf_hub"):
        # open_clip's convention: 'org/repo/file.bin', or 'org/repo/' for its default file name.
        repo_id, filename = os.path.split(cfg["hf_hub"])
        names = _weight_names(filename or None)
        found = cached_hub_file(repo_id, names)
        if found:
            return found
        looked.append(f"the Hugging Face cache {hub_cache()} for {repo_id}/{{{', '.join(names)}}}")
        hint = _fetch_hint(repo_id, names[-1])
    if cfg.get("url"):
        target = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        if os.path.isfile(target):
            return target
        looked.append(target)
        if not cfg.get("hf_hub"):
            hint = f"fetch it once with network: `curl -L -o {target} {cfg['url']}`"
    raise PretrainedError(f"model.open_clip.pretrained={pretrained}: {name} weights are not cached "
                          f"(looked in {' and '.join(looked)}); {hint}")


# ------------------------------------------------------------------------------ key checks
def check_keys(where: str, missing: Iterable[str], unexpected: Iterable[str], strict: bool) -> None:
    """Raise one line naming the first few missing / unexpected keys, or (strict false) log them."""
    missing = [k for k in missing if not k.endswith("attn_mask")]  # a non-persistent buffer in open_clip
    unexpected = list(unexpected)
    if not missing and not unexpected:
        return
    summary = f"{len(missing)} missing {missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}"
    if strict:
        raise PretrainedError(f"{where}: weights do not fit the model: {summary} (strict: false loads what fits)")
    log.warning("%s: loaded with strict: false; missing keys %s; unexpected keys %s", where, missing, unexpected)


# ------------------------------------------------------------------------------ open_clip
class OpenClipBuild:
    """One open_clip model (CustomTextCLIP layout: `.visual`, `.text`, `logit_scale`[, `logit_bias`]),
    its train / eval preprocessing and the name its tokenizer is built from."""

    def __init__(self, model: nn.Module, preprocess_train: Any, preprocess_val: Any, tokenizer_name: str) -> None:
        self.model = model
        self.preprocess_train = preprocess_train
        self.preprocess_val = preprocess_val
        self.tokenizer_name = tokenizer_name


def build_open_clip(name: str, pretrained: Optional[str], strict: bool = True, **open_clip_kwargs: Any) -> OpenClipBuild:
    """`open_clip.create_model_and_transforms(name, ...)` offline, then `open_clip.load_checkpoint`.

    The model is built in open_clip's CustomTextCLIP layout (`force_custom_text`: the text tower
    is one `.text` module; open_clip's loader converts CLIP checkpoints to it). Weights: a file,
    a tag (through the local cache) or, for `hf-hub:` / `local-dir:` names, the folder's own."""
    import open_clip
    from open_clip.factory import _find_checkpoint_in_dir, parse_model_name

    local_name = resolve_model_name(name)
    schema, identifier = parse_model_name(local_name)
    weights: Optional[str] = None
    tag_for_preprocess: Optional[str] = None
    if pretrained:
        if schema is None:
            weights = resolve_pretrained(local_name, pretrained)
            if not os.path.isfile(pretrained):
                tag_for_preprocess = pretrained  # the tag's mean / std / interpolation, as open_clip applies them
        elif os.path.isfile(pretrained):
            weights = pretrained
        else:
            raise PretrainedError(f"model.open_clip.pretrained={pretrained}: not a file ({name} carries its own weights; leave it out)")
    elif schema == "local-dir":
        weights = _find_checkpoint_in_dir(Path(identifier))
    with offline():
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            local_name, pretrained=tag_for_preprocess, load_weights=False, force_custom_text=True, **open_clip_kwargs)
        if weights is not None:
            incompatible = open_clip.load_checkpoint(model, weights, strict=False)
            check_keys(f"model.open_clip ({name}, {weights})", incompatible.missing_keys, incompatible.unexpected_keys, strict)
    return OpenClipBuild(model, preprocess_train, preprocess_val, local_name)


_PARTS = ("image", "text", "scalars")
_BUILDS: dict[tuple, OpenClipBuild] = {}


def take_open_clip_part(name: str, pretrained: Optional[str], strict: bool, part: str) -> OpenClipBuild:
    """The open_clip build both towers (and the logit scalars) of `model.open_clip` come from:
    built once, each part handed out once (a second request for a part builds anew, so two
    models never share modules); forgotten once every part is taken or on `release_open_clip`."""
    key = (name, pretrained, strict)
    build = _BUILDS.get(key)
    if build is None or part in build.taken:
        build = build_open_clip(name, pretrained, strict)
        build.taken = set()
        _BUILDS[key] = build
    build.taken.add(part)
    if build.taken >= set(_PARTS):
        _BUILDS.pop(key, None)
    return build


def release_open_clip() -> None:
    """Drop builds whose other parts nobody took (e.g. an open_clip image tower beside an HF text tower)."""
    _BUILDS.clear()


def open_clip_tower_state(path: str, prefix: str) -> dict[str, torch.Tensor]:
    """The `prefix` part (`visual.` or `text.`) of an open_clip checkpoint file, read by open_clip's
    own `load_state_dict` (state_dict / module. wrappers); CLIP-layout text keys are converted to
    CustomTextCLIP's `text.` layout by open_clip's `convert_to_custom_text_state_dict`."""
    from open_clip.factory import load_state_dict
    from open_clip.model import convert_to_custom_text_state_dict

    state = load_state_dict(path)
    if prefix == "text." and "positional_embedding" in state:
        state = convert_to_custom_text_state_dict(state)
    part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not part:
        # A tower-only file (e.g. open_clip's `pretrained_image_path`): its keys are the tower's own.
        part = state
    return part


def load_tower_state(module: nn.Module, state: dict[str, torch.Tensor], where: str, strict: bool) -> None:
    incompatible = module.load_state_dict(state, strict=False)
    check_keys(where, incompatible.missing_keys, incompatible.unexpected_keys, strict)


# ------------------------------------------------------------------------------ timm
def timm_pretrained_kwargs(path: str, strict: bool) -> dict[str, Any]:
    """`timm.create_model` keyword arguments that load `path` by timm's own convention. The
    overlay's `num_classes=0` says the file need not hold a classifier the trunk does not have."""
    if not os.path.isfile(path):
        raise PretrainedError(f"model.image.pretrained={path}: not a file")
    return dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=0), pretrained_strict=strict)


def timm_load_error(error: RuntimeError, where: str) -> PretrainedError:
    """torch's multi-line 'Error(s) in loading state_dict' from timm's strict load, as one line."""
    import re

    text = str(error)
    missing = re.findall(r'"([^"]+)"', text.split("Missing key(s) in state_dict:")[1].split("Unexpected")[0]) if "Missing key(s)" in text else []
    unexpected = re.findall(r'"([^"]+)"', text.split("Unexpected key(s) in state_dict:")[1]) if "Unexpected key(s)" in text else []
    if not missing and not unexpected:
        return PretrainedError(f"{where}: {text.splitlines()[0][:300]}")
    return PretrainedError(f"{where}: weights do not fit the model: {len(missing)} missing {missing[:4]}, "
                           f"{len(unexpected)} unexpected {unexpected[:4]} (strict: false loads what fits)")


# ------------------------------------------------------------------------------ layer ids (LLRD)
def transformer_layer_ids(names: Iterable[str], embed_prefixes: tuple[str, ...], block_prefix: str,
                          num_blocks: int) -> dict[str, int]:
    """Depth of each parameter for layer-wise lr decay: embeddings 0, block i -> i + 1, the rest
    (final norm, projection, pooling) num_blocks + 1."""
    ids = {}
    for name in names:
        if name.startswith(embed_prefixes):
            ids[name] = 0
        elif name.startswith(block_prefix):
            ids[name] = int(name[len(block_prefix):].split(".")[0]) + 1
        else:
            ids[name] = num_blocks + 1
    return ids


def timm_layer_ids(trunk: nn.Module, prefix: str = "") -> dict[str, int]:
    """timm's own grouping (`group_matcher(coarse=False)`, as `timm.optim.param_groups_layer_decay`
    uses it): parameter name -> layer id."""
    from timm.models import group_parameters

    groups = group_parameters(trunk, trunk.group_matcher(coarse=False), reverse=True)
    return {prefix + name: int(layer) for name, layer in groups.items()}
