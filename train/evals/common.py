"""Helpers shared by evaluators: batched text and class embeddings, frozen image features (read
through the harness) and named template sets. Where samples come from (`EvalSource`) is the
harness's; the scoring head is the models layer's (`vlp.models.dual_encoder.scoring_head`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Union

import torch

from vlp.core.errors import ConfigError, InputNotFound
from vlp.data_pipelines.errors import DataError
from vlp.models.dual_encoder import scoring_head
from vlp.train.evals.harness import EvalContext, EvalSource, eval_batches, evaluating, gather_rows, run_batches


def encode_texts(model: Any, texts: list[str], device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Raw text embeddings (N, E) of `texts`, in batches, fp32."""
    tokenizer = model.text.tokenizer()
    out = []
    for start in range(0, len(texts), batch_size):
        ids = tokenizer(texts[start : start + batch_size]).to(device)
        out.append(model.encode_text(ids)["text_embed"].float())
    return torch.cat(out) if out else torch.zeros(0, model.objective.heads[next(iter(model.objective.heads))].embed_dim)


def class_embeddings(
    model: Any, classnames: list[str], templates: list[str], device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """(C, E) class embeddings: every template for every class, encoded in batches of prompts
    (not one class at a time), then averaged by the scoring head's own rule."""
    prompts = [t.replace("{c}", name) if "{c}" in t else t.format(name) for name in classnames for t in templates]
    embeds = encode_texts(model, prompts, device, batch_size)  # (C*T, E)
    embeds = embeds.reshape(len(classnames), len(templates), -1)  # (C, T, E)
    return scoring_head(model).prompt_ensemble(embeds)


def image_features(model: Any, source: EvalSource, context: EvalContext, *, batch_size: int, workers: int = 0,
                   normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Frozen image features (N, E) fp32 (L2-normalised unless `normalize=False`), labels (N,)
    and sample keys of every sample of `source`, sorted by key (so the order, and whatever is
    drawn from it, does not depend on the world size), on the CPU. Through the harness: every
    rank reads its share, the rows are gathered."""

    def per_batch(model: Any, batch: dict) -> dict:
        if (batch["label"] < 0).any():
            raise DataError(f"{source.spec}: sample {batch['key'][int((batch['label'] < 0).nonzero()[0])]} has no .cls label")
        embed = model.encode_image(batch["image"])["image_embed"].float()
        return {"feature": torch.nn.functional.normalize(embed, dim=-1) if normalize else embed,
                "label": batch["label"], "key": batch["key"]}

    model = getattr(model, "module", model)
    with evaluating(model):
        batches = eval_batches(source, model, batch_size=batch_size, rank=context.rank,
                               world_size=context.world_size, workers=workers)
        rows = gather_rows(run_batches(per_batch, ("image",), model, batches, context))
    keys = rows.get("key", [])
    features = rows.get("feature", torch.zeros(0, model.config.embed_dim))
    labels = rows.get("label", torch.zeros(0, dtype=torch.long))
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return features[order], labels[order], [keys[i] for i in order]


def load_template_sets(value: Union[str, dict[str, Union[list[str], str]], None]) -> dict[str, list[str]]:
    """Named prompt-template sets: a JSON or YAML file `{name: [templates] or a .txt path}`, or that
    mapping itself; a `.txt` holds one template per line. Templates use `{c}` (or `{}`) for the
    class name. Names go into metric keys (`zeroshot_top1@templates=NAME`), so they must be
    plain words."""
    if value is None:
        return {}
    base = Path(".")
    if isinstance(value, str):
        path = Path(value)
        if not path.is_file():
            raise InputNotFound(f"template_sets: {path}: no such file")
        import yaml

        value = yaml.safe_load(path.read_text())  # JSON is YAML
        base = path.parent
        if not isinstance(value, dict):
            raise ConfigError(f"template_sets: {path}: needs a mapping of set name to a list of templates")
    sets: dict[str, list[str]] = {}
    for name, templates in value.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
            raise ConfigError(f"template_sets: set name {name!r}: use letters, digits, '_', '.', '-'")
        if isinstance(templates, str):
            path = Path(templates) if Path(templates).is_absolute() else base / templates
            if not path.is_file():
                raise InputNotFound(f"template_sets.{name}: {path}: no such file")
            templates = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
            raise ConfigError(f"template_sets.{name}: needs a non-empty list of template strings")
        for template in templates:
            if "{c}" not in template and "{}" not in template:
                raise ConfigError(f"template_sets.{name}: {template!r} has no {{c}} for the class name")
        sets[str(name)] = templates
    return sets
