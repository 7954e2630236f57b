"""Zero-shot classification: class names x prompt templates -> class embeddings -> top-k.

Class names and templates come from lists in the config, from clip_benchmark's JSON files
(`en_classnames.json`, `en_zeroshot_classification_templates.json`, keyed by dataset), or from
clip_benchmark's webdataset eval layout (`classnames.txt`, `zeroshot_classification_templates.txt`
next to the shards). Labels are the shards' `.cls`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from pydantic import Field

from train.data import expand_urls
from train.evals.base import EVALUATORS, EvalConfig, EvalContext, Evaluator
from train.evals.common import all_reduce_sum, class_embeddings, scoring_head

DEFAULT_TEMPLATES = ["a photo of a {c}."]


class ZeroShotConfig(EvalConfig):
    type: Literal["zeroshot"] = "zeroshot"
    # A list, a .txt (one per line) or a clip_benchmark .json (with `dataset`); None: the
    # `classnames.txt` / `zeroshot_classification_templates.txt` beside the shards.
    classnames: Optional[Union[list[str], str]] = None
    templates: Optional[Union[list[str], str]] = None
    dataset: Optional[str] = None
    prefix: str = "zeroshot_"
    top_k: list[int] = Field(default_factory=lambda: [1, 5])


def _read_list(value: Union[list[str], str, None], dataset: Optional[str], beside: Path, filename: str) -> Optional[list[str]]:
    if isinstance(value, list):
        return value
    path = Path(value) if value else beside / filename
    if not path.is_file():
        if value:
            raise FileNotFoundError(f"{path}: no such file")
        return None
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            if dataset is None or dataset not in data:
                raise KeyError(f"{path}: needs `dataset` (one of {', '.join(sorted(data)[:10])}...)")
            data = data[dataset]
        return [str(x) for x in data]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def resolve_names(config: ZeroShotConfig) -> tuple[list[str], list[str]]:
    beside = Path(expand_urls(config.data)[0]).parent
    classnames = _read_list(config.classnames, config.dataset, beside, "classnames.txt")
    if not classnames:
        raise FileNotFoundError(f"zeroshot: no class names (set `classnames` or put classnames.txt in {beside})")
    templates = _read_list(config.templates, config.dataset, beside, "zeroshot_classification_templates.txt")
    return classnames, templates or DEFAULT_TEMPLATES


def zeroshot_classify(model, config: ZeroShotConfig, context: EvalContext) -> dict[str, float]:
    from data_pipelines.loader import build_eval_loader

    classnames, templates = resolve_names(config)
    device = context.device
    classifier = class_embeddings(model, classnames, templates, device)  # (C, E)
    head = scoring_head(model)
    num_classes = len(classnames)
    ks = sorted(k for k in config.top_k if k <= num_classes)
    correct = torch.zeros(len(ks), dtype=torch.float64)
    per_class_hits = torch.zeros(num_classes, dtype=torch.float64)
    per_class_total = torch.zeros(num_classes, dtype=torch.float64)
    loader = build_eval_loader(
        config.data, preprocess=model.image.preprocess(train=False), tokenizer=model.text.tokenizer(),
        batch_size=config.batch_size, rank=context.rank, world_size=context.world_size, workers=config.workers,
    )
    for batch in loader:
        labels = batch["label"]
        if (labels < 0).any():
            raise ValueError(f"zeroshot: sample {batch['key'][int((labels < 0).nonzero()[0])]} has no .cls label")
        images = batch["image"].to(device, context.dtype)
        scores = head.pairwise_scores(model.encode_image(images)["image_embed"], classifier).cpu()  # (B, C)
        ranked = scores.topk(max(ks), dim=1).indices  # (B, kmax)
        hits = ranked == labels[:, None]
        for i, k in enumerate(ks):
            correct[i] += hits[:, :k].any(dim=1).sum()
        per_class_total += torch.bincount(labels, minlength=num_classes).double()
        per_class_hits += torch.bincount(labels[hits[:, 0]], minlength=num_classes).double()
    stats = all_reduce_sum(torch.cat([correct, per_class_hits, per_class_total]))
    correct, per_class_hits, per_class_total = stats[: len(ks)], stats[len(ks) : len(ks) + num_classes], stats[len(ks) + num_classes :]
    total = per_class_total.sum().clamp(min=1)
    present = per_class_total > 0
    results = {f"{config.prefix}top{k}": float(correct[i] / total) for i, k in enumerate(ks)}
    results[f"{config.prefix}mean_per_class_recall"] = float((per_class_hits[present] / per_class_total[present]).mean())
    results[f"{config.prefix}samples"] = int(total.item())
    return results


@EVALUATORS.register("zeroshot")
class ZeroShot(Evaluator):
    config_class = ZeroShotConfig

    def run(self, model, context: EvalContext) -> dict[str, float]:
        return zeroshot_classify(model, self.config, context)
