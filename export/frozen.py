"""Reading a whole vlp model back from an export folder, frozen: what the `compat` evaluator
compares the evaluated model with (its old model), and what any consumer below the training layer
can load without a run folder. (`vlp.train.weights.load_model` also reads run folders and
DeepSpeed checkpoints; it needs the training config, one layer up.)"""

from __future__ import annotations

from pathlib import Path

from vlp.core.errors import ExportError, InputNotFound
from vlp.export.driver import read_export
from vlp.models.config import validate_model_config
from vlp.models.dual_encoder import VLPModel


def model_without_pretrained(model_tree: dict) -> dict:
    """`model:` with open_clip's `pretrained` removed: the export's weights replace those, so
    rebuilding must not need the tag's cache or the file again."""
    model_tree = dict(model_tree)
    for key in ("open_clip", "image", "text"):
        section = model_tree.get(key)
        # Every tower's `pretrained` names weights only (open_clip tag or file, timm overlay file),
        # except hf_text's, a synonym of `path`: the folder its architecture and tokenizer come from.
        if isinstance(section, dict) and section.get("type") != "hf_text":
            model_tree[key] = {k: v for k, v in section.items() if k != "pretrained"}
    return model_tree


def load_export_model(path: str | Path, where: str) -> VLPModel:
    """The model of a safetensors or open_clip export of vlp, in eval mode without gradients. A
    missing path or a folder that is no such export is an input error starting with `where`
    (the key or option that named it) and naming the path."""
    path = Path(path)
    if not path.exists():
        raise InputNotFound(f"{where}: {path}: no such file or folder")
    found = read_export(path) if path.is_dir() else None
    if found is None:
        raise ExportError(f"{where}: {path}: not a safetensors or open_clip export of vlp")
    state, tree = found
    if not isinstance(tree, dict) or not isinstance(tree.get("model"), dict):
        raise ExportError(f"{where}: {path}: its config has no model section")
    model = VLPModel(validate_model_config(model_without_pretrained(tree["model"]), f"{path} (model)"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("attn_mask")]
    if missing or unexpected:
        raise ExportError(f"{where}: {path}: weights do not match its config (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    return model.eval().requires_grad_(False)
