"""Helpers shared by evaluators: the scoring head, batched class embeddings, frozen image
features, where the evaluation samples come from (shards or an image-folder tree) and named template sets."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from vlp.data_pipelines.image_folder import ImageFolder, split_root


def scoring_head(model: Any) -> Any:
    """The head whose geometry scores zero-shot and retrieval: the first (in config order) that
    declares `scores_embeddings` (cosine by default, a head's own geometry where it overrides
    `pairwise_scores`)."""
    for head in model.objective.heads.values():
        if head.scores_embeddings:
            return head
    return next(iter(model.objective.heads.values()))


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


def resolve_shard_spec(spec: str, split: str = "test") -> str:
    """A shard spec as given, or for a folder: clip_benchmark's webdataset layout
    (`DIR/{split}/nshards.txt` + `DIR/{split}/{0..n-1}.tar`), else every `*.tar` in it."""
    from pathlib import Path

    from vlp.data_pipelines.errors import DataError

    folder = Path(spec)
    if not folder.is_dir():
        return spec
    nshards = folder / split / "nshards.txt"
    if nshards.is_file():
        count = int(nshards.read_text().strip())
        return str(folder / split / f"{{0..{count - 1}}}.tar") if count > 1 else str(folder / split / "0.tar")
    tars = sorted(str(path) for path in folder.glob("*.tar"))
    if not tars:
        raise DataError(f"{folder}: no {split}/nshards.txt (clip_benchmark layout) and no .tar shards")
    return "::".join(tars)


# ------------------------------------------------------------------ evaluation inputs
@dataclass
class EvalSource:
    """Where an evaluator's samples come from: webdataset shards (a spec, a folder of `*.tar`,
    clip_benchmark's `DIR/{split}/nshards.txt` layout) or an image-folder tree (one folder per
    class, `data_pipelines/image_folder.py`).

    folders: where `classnames.txt` / `zeroshot_classification_templates.txt` may lie (beside
    the shards and one level up, or the tree's root and its parent); classnames: the tree's
    class folders (None for shards: labels are the shards' `.cls`)."""

    spec: str
    image_folder: Optional[ImageFolder] = None
    folders: tuple[Path, ...] = ()

    @property
    def classnames(self) -> Optional[list[str]]:
        return self.image_folder.classnames if self.image_folder is not None else None


def resolve_eval_source(spec: str, split: str = "test") -> EvalSource:
    """`spec` as an image-folder tree (`spec/split/<class>/` or `spec/<class>/`) when it is one,
    else as shards (`resolve_shard_spec`)."""
    from vlp.train.data import expand_urls

    root = split_root(spec, split) if Path(spec).is_dir() else None
    if root is not None:
        return EvalSource(spec=str(root), image_folder=ImageFolder.read(root), folders=(root, root.parent))
    shards = resolve_shard_spec(spec, split)
    shard_folder = Path(expand_urls(shards)[0]).parent
    return EvalSource(spec=shards, folders=(shard_folder, shard_folder.parent))


def image_features(model: Any, source: EvalSource, context: Any, *, batch_size: int, workers: int = 0,
                   normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Frozen image features (N, E) fp32 (L2-normalised unless `normalize=False`), labels (N,)
    and sample keys of every sample of `source`, sorted by key (so the order, and whatever is
    drawn from it, does not depend on the world size), on the CPU. Through the harness: every
    rank reads its share, the rows are gathered."""
    from vlp.data_pipelines.errors import DataError
    from vlp.train.evals.harness import eval_batches, evaluating, gather_rows, run_batches

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
            raise FileNotFoundError(f"template_sets: {path}: no such file")
        import yaml

        value = yaml.safe_load(path.read_text())  # JSON is YAML
        base = path.parent
        if not isinstance(value, dict):
            raise ValueError(f"template_sets: {path}: needs a mapping of set name to a list of templates")
    sets: dict[str, list[str]] = {}
    for name, templates in value.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
            raise ValueError(f"template_sets: set name {name!r}: use letters, digits, '_', '.', '-'")
        if isinstance(templates, str):
            path = Path(templates) if Path(templates).is_absolute() else base / templates
            if not path.is_file():
                raise FileNotFoundError(f"template_sets.{name}: {path}: no such file")
            templates = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
            raise ValueError(f"template_sets.{name}: needs a non-empty list of template strings")
        for template in templates:
            if "{c}" not in template and "{}" not in template:
                raise ValueError(f"template_sets.{name}: {template!r} has no {{c}} for the class name")
        sets[str(name)] = templates
    return sets
