"""Zero-shot classification: class names x prompt templates -> class embeddings -> top-k.

Class names and templates come from lists in the config, from clip_benchmark's JSON files
(`en_classnames.json`, `en_zeroshot_classification_templates.json`, keyed by dataset; templates
fall back to the "imagenet1k" entry as clip_benchmark's do), or from clip_benchmark's webdataset
eval layout: `classnames.txt` and `zeroshot_classification_templates.txt` (one per line, `{c}`
for the class name) next to the shards or one folder above them (clip_benchmark's
`DIR/test/{0..n-1}.tar` + `DIR/classnames.txt`). Labels are the shards' `.cls`. `data` may also
be an image-folder tree (one folder per class, its names the class names); `template_sets` adds
named template sets, each scored as `zeroshot_top1@templates=NAME`.

Class embeddings are built from every (class, template) prompt in batches of prompts and
averaged by the scoring head's `prompt_ensemble`; images are scored by its `pairwise_scores`
(cosine by default, the head's own geometry where it has one, and the image tokens too for a
head that `scores_with_tokens`). Metrics: top-k accuracy and mean per-class recall
(clip_benchmark's `mean_per_class_recall`, i.e. balanced accuracy), counts summed over ranks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from pydantic import Field

from vlp.core.collectives import all_reduce_sum
from vlp.core.errors import ConfigError, InputNotFound
from vlp.data_pipelines.errors import DataError
from vlp.models.dual_encoder import scoring_head
from vlp.train.evals.base import EVALUATORS, EvalConfig, EvalContext, EvalExample, Evaluator
from vlp.train.evals.common import class_embeddings, encode_texts, load_template_sets
from vlp.train.evals.harness import resolve_eval_source

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
    # Extra prompt wordings, each scored on its own (`zeroshot_top1@templates=NAME`): a JSON/YAML
    # file `{name: [templates] or a .txt}` or that mapping (`common.load_template_sets`).
    template_sets: Optional[Union[str, dict[str, Union[list[str], str]]]] = None


def _read_list(
    value: Union[list[str], str, None], dataset: Optional[str], folders: list[Path], filename: str,
    fallback_key: Optional[str] = None,
) -> Optional[list[str]]:
    if isinstance(value, list):
        return value
    if value:
        path = Path(value)
        if not path.is_file():
            raise InputNotFound(f"{path}: no such file")
    else:
        path = next((folder / filename for folder in folders if (folder / filename).is_file()), None)
        if path is None:
            return None
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            key = dataset if dataset in data else fallback_key if fallback_key in data and dataset else None
            if key is None:
                raise ConfigError(f"{path}: needs `dataset` (one of {', '.join(sorted(data)[:10])}, ...), got {dataset!r}")
            data = data[key]
        return [str(x) for x in data]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def resolve_names(config: ZeroShotConfig) -> tuple[list[str], list[str]]:
    """(class names, templates) from the config, or from the files beside the shards (or one
    folder up: clip_benchmark's `DIR/test/*.tar` layout)."""
    source = resolve_eval_source(config.data)
    folders = list(source.folders)
    # An image-folder tree names its classes by its folders, unless a classnames.txt says otherwise.
    classnames = _read_list(config.classnames, config.dataset, folders, "classnames.txt") or source.classnames
    if not classnames:
        raise InputNotFound(f"zeroshot: no class names (set `classnames` or put classnames.txt in {folders[0]})")
    # clip_benchmark uses the imagenet1k templates for datasets without their own.
    templates = _read_list(config.templates, config.dataset, folders, "zeroshot_classification_templates.txt",
                           fallback_key="imagenet1k")
    return classnames, templates or DEFAULT_TEMPLATES


def prefix_classifiers(model, head, classnames: list[str], templates: list[str],
                       device: torch.device) -> dict[int, torch.Tensor]:
    """{dim: (C, dim) class embeddings} for every Matryoshka prefix the scoring head trained
    ({} without Matryoshka, or for a head that scores with tokens): each prompt's prefix goes
    through the head's own `prompt_ensemble` (re-normalised per prefix, as it was trained), not a
    slice of the full-width ensemble."""
    dims = head.matryoshka_dims()
    if not dims or head.scores_with_tokens:
        return {}
    prompts = [t.replace("{c}", name) if "{c}" in t else t.format(name) for name in classnames for t in templates]
    embeds = encode_texts(model, prompts, device).reshape(len(classnames), len(templates), -1)  # (C, T, E)
    return {dim: head.prompt_ensemble(embeds[..., :dim]) for dim in dims}


def plot_prefix_accuracy(results: dict[str, float], metric: str, out_png: Path, title: str = "") -> Optional[Path]:
    """PNG of `metric@dim` against the prefix dim (log2 axis); None when there are no prefixes."""
    points = sorted((int(key.rsplit("@", 1)[1]), value) for key, value in results.items()
                    if key.startswith(f"{metric}@") and key.rsplit("@", 1)[1].isdigit())
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(*zip(*points), marker="o")
    for dim, value in points:
        ax.annotate(f"{value:.3f}", (dim, value), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks([dim for dim, _ in points], [str(dim) for dim, _ in points])
    ax.set_xlabel("embedding prefix dim (Matryoshka)")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


@EVALUATORS.register_by_type
class ZeroShot(Evaluator):
    config_class = ZeroShotConfig
    config: ZeroShotConfig
    example = EvalExample(source="digits", build=(("shard_size", 200),), options=(("batch_size", 64),))

    def prepare(self, model, context: EvalContext) -> None:
        self.classnames, templates = resolve_names(self.config)
        self.head = scoring_head(model)
        self.classifier = class_embeddings(model, self.classnames, templates, context.device)  # (C, E)
        self.prefixes = prefix_classifiers(model, self.head, self.classnames, templates, context.device)  # {dim: (C, dim)}
        self.ks = sorted(k for k in self.config.top_k if k <= len(self.classnames))

    def per_batch(self, model, batch: dict) -> dict:
        """Per image: the label, whether it is ranked first, whether it is in the top k for each k (B, len(ks)), and whether
        each Matryoshka prefix's classifier puts it first (B, prefixes)."""
        labels = batch["label"]
        if (labels < 0).any():
            raise DataError(f"zeroshot: sample {batch['key'][int((labels < 0).nonzero()[0])]} has no .cls label")
        encoded = model.encode_image(batch["image"])
        # A head that scores with tokens (text-conditioned pooling per class) gets the image tokens.
        tokens = {"image_tokens": encoded["image_tokens"]} if self.head.scores_with_tokens else {}
        scores = self.head.pairwise_scores(encoded["image_embed"], self.classifier, **tokens).cpu()  # (B, C)
        hits = scores.topk(max(self.ks), dim=1).indices == labels[:, None]  # (B, kmax)
        prefix_hits = [self.head.pairwise_scores(encoded["image_embed"][:, :dim], classifier).cpu().argmax(dim=1) == labels
                       for dim, classifier in self.prefixes.items()]
        return {"label": labels, "first": hits[:, 0], "top": torch.stack([hits[:, :k].any(dim=1) for k in self.ks], dim=1),
                "prefix": torch.stack(prefix_hits, dim=1) if prefix_hits else torch.zeros(len(labels), 0, dtype=torch.bool)}

    def reduce(self, rows: dict, model, context: EvalContext) -> dict[str, float]:
        num_classes, prefix = len(self.classnames), self.config.prefix
        labels = rows.get("label", torch.zeros(0, dtype=torch.long))
        top = rows.get("top", torch.zeros(0, len(self.ks), dtype=torch.bool)).double()
        prefix_top = rows.get("prefix", torch.zeros(0, len(self.prefixes), dtype=torch.bool)).double()
        per_class_total = torch.bincount(labels, minlength=num_classes).double()
        first = rows.get("first", torch.zeros(0, dtype=torch.bool))
        per_class_hits = torch.bincount(labels[first], minlength=num_classes).double()
        # Reduced on the rank's device (NCCL reduces only GPU tensors).
        stats = torch.cat([top.sum(0), per_class_hits, per_class_total, prefix_top.sum(0)])
        stats = all_reduce_sum(stats.to(context.device)).cpu()
        ks = len(self.ks)
        correct, per_class_hits = stats[:ks], stats[ks : ks + num_classes]
        per_class_total, prefix_correct = stats[ks + num_classes : ks + 2 * num_classes], stats[ks + 2 * num_classes :]
        total = per_class_total.sum().clamp(min=1)
        present = per_class_total > 0
        results = {f"{prefix}top{k}": float(correct[i] / total) for i, k in enumerate(self.ks)}
        results[f"{prefix}mean_per_class_recall"] = float((per_class_hits[present] / per_class_total[present]).mean())
        results[f"{prefix}samples"] = int(total.item())
        for i, dim in enumerate(self.prefixes):
            results[f"{prefix}top1@{dim}"] = float(prefix_correct[i] / total)
        return results

    def run(self, model, context: EvalContext) -> dict[str, float]:
        results = super().run(model, context)
        if context.out_dir is not None:  # beside the loss curve (plots/), rank 0 only
            plot_prefix_accuracy(results, f"{self.config.prefix}top1", Path(context.out_dir) / f"{self.config.prefix}matryoshka.png",
                                 title=f"step {context.step}")
        # Each extra template set is one more full pass with its own classifier: the images are
        # re-encoded per set (the scoring loop stays as it is), so the cost grows with the sets.
        for name, templates in load_template_sets(self.config.template_sets).items():
            # template_sets=None: the set is scored once, not again by its own copy (an endless recursion).
            scored = ZeroShot(self.config.model_copy(update={"templates": templates, "template_sets": None})).run(model, context)
            results.update({f"{key}@templates={name}": value for key, value in scored.items()
                            if not key.endswith("samples")})
        return results
