"""Cross-model compatibility (BCT, Shen et al. 2020): the model being evaluated ("new") against a
frozen old model, in all four pairings of whose image embeddings meet whose text embeddings.

Metric names end in `_{image model}_{text model}`: `new_new` and `old_old` are each model alone,
`new_old` scores new image embeddings against the old model's text embeddings (a new query
against an old gallery of captions, or the old zero-shot classifier), `old_new` the reverse.
BCT's criterion for a compatible new model: every cross pairing at least `old_old`, and
`new_new` close to a new model trained without the compatibility loss.

- zeroshot: top-1 over class names x templates (as the `zeroshot` evaluator reads them); each
  pairing's classifier is the text model's prompt average.
- retrieval: R@k image->text and text->image over the eval set's distinct captions (a caption
  several images share, as digits' do, is one key whose positives are all of them).

Scores are cosine similarities in every pairing (the geometry the `clip` and `compat` heads train).
Both models read the same eval batches, preprocessed by the new model's eval transform, so the
old model must take the same image input and pixel statistics; each tokenizes captions with its
own tokenizer.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import Field

from vlp.core.errors import ConfigError
from vlp.data_pipelines.errors import DataError
from vlp.train.evals.base import EVALUATORS, EvalConfig, EvalContext, EvalExample, Evaluator
from vlp.train.evals.common import encode_texts
from vlp.export.frozen import load_export_model
from vlp.train.evals.harness import gather_rows
from vlp.train.evals.zeroshot import resolve_names

PAIRINGS = (("new", "new"), ("new", "old"), ("old", "new"), ("old", "old"))  # (image model, text model)


class CompatEvalConfig(EvalConfig):
    type: Literal["compat"] = "compat"
    old: str
    """The old model: a vlp export, run folder or checkpoint; `same`: the evaluated model itself (the
    four pairings then coincide: a check of the evaluator, which the registry test runs)."""
    tasks: list[Literal["zeroshot", "retrieval"]] = Field(default_factory=lambda: ["zeroshot", "retrieval"], min_length=1)
    recall_at: list[int] = Field(default_factory=lambda: [1, 5])
    # As the zeroshot evaluator's (lists, files, or the files beside the shards).
    classnames: Optional[Union[list[str], str]] = None
    templates: Optional[Union[list[str], str]] = None
    dataset: Optional[str] = None
    chunk_size: int = Field(2048, ge=1)
    prefix: str = "compat_"


def check_old_model(new: torch.nn.Module, old: torch.nn.Module, path: str) -> None:
    """One line naming `old` when the old model cannot share the new model's eval batches or space."""
    if int(old.config.embed_dim) != int(new.config.embed_dim):
        raise ConfigError(f"compat.old: {path}: embedding width {old.config.embed_dim} differs from the new "
                          f"model's {new.config.embed_dim}")
    if tuple(old.image.input_shape()) != tuple(new.image.input_shape()):
        raise ConfigError(f"compat.old: {path}: image input {tuple(old.image.input_shape())} differs from the "
                          f"new model's {tuple(new.image.input_shape())}")
    for stat in ("mean", "std"):
        if getattr(old.image.config, stat, None) != getattr(new.image.config, stat, None):
            raise ConfigError(f"compat.old: {path}: its image {stat} differs from the new model's (the eval "
                              "batches are normalised once, with the new model's)")


def ranks_of_positives(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """(Q, K) scores and (Q, K) bool positives -> (Q,) how many non-positive keys score strictly
    above each query's best positive."""
    best = scores.masked_fill(~positive, -torch.inf).amax(dim=1, keepdim=True)  # (Q, 1)
    return ((scores > best) & ~positive).sum(dim=1)


@EVALUATORS.register_by_type
class Compat(Evaluator):
    config_class = CompatEvalConfig
    config: CompatEvalConfig
    towers = ("image", "text")

    example = EvalExample(source="digits", build=(("shard_size", 200),), options=(("batch_size", 64), ("old", "same")))

    def prepare(self, model, context: EvalContext) -> None:
        if self.config.old == "same":
            self.old = model
        else:
            self.old = load_export_model(self.config.old, "compat.old")
            check_old_model(model, self.old, self.config.old)
            self.old.to(context.device)
        self.classifiers: dict[str, torch.Tensor] = {}
        if "zeroshot" in self.config.tasks:
            self.classnames, templates = resolve_names(self.config)
            prompts = [t.replace("{c}", name) if "{c}" in t else t.format(name)
                       for name in self.classnames for t in templates]
            for name, which in {"new": model, "old": self.old}.items():
                if name == "old" and which is model:
                    self.classifiers["old"] = self.classifiers["new"]
                    continue
                embeds = encode_texts(which, prompts, context.device).reshape(len(self.classnames), len(templates), -1)
                mean = F.normalize(embeds, dim=-1).mean(dim=1)  # (C, E): CLIP's prompt ensemble
                self.classifiers[name] = F.normalize(mean, dim=-1)

    def per_batch(self, model, batch: dict) -> dict:
        """Per sample: both models' L2-normalised image and caption embeddings (B, E), the label, the caption."""
        rows = {"label": batch["label"], "caption": list(batch["caption"])}
        rows["image_new"] = F.normalize(model.encode_image(batch["image"])["image_embed"].float(), dim=-1)
        rows["text_new"] = F.normalize(model.encode_text(batch["text"])["text_embed"].float(), dim=-1)
        if self.old is model:  # no second forward: under ZeRO-3 each tower call is a collective
            rows["image_old"], rows["text_old"] = rows["image_new"], rows["text_new"]
            return rows
        old_image = batch["image"].to(next(self.old.parameters()).dtype) if batch["image"].is_floating_point() else batch["image"]
        rows["image_old"] = F.normalize(self.old.encode_image(old_image)["image_embed"].float(), dim=-1)
        old_ids = self.old.text.tokenizer()(batch["caption"]).to(batch["image"].device)
        rows["text_old"] = F.normalize(self.old.encode_text(old_ids)["text_embed"].float(), dim=-1)
        return rows

    def reduce(self, rows: dict, model, context: EvalContext) -> dict[str, float]:
        rows = gather_rows(rows)  # every rank's samples: the metrics are computed alike on every rank
        prefix, results = self.config.prefix, {}
        if not rows:
            return results
        if "zeroshot" in self.config.tasks:
            labels = rows["label"]
            if (labels < 0).any():
                raise DataError("compat: zeroshot needs a .cls label on every eval sample (tasks: [retrieval] without)")
            for image_model, text_model in PAIRINGS:
                scores = rows[f"image_{image_model}"] @ self.classifiers[text_model].cpu().T  # (N, C)
                accuracy = (scores.argmax(dim=1) == labels).double().mean()
                results[f"{prefix}zeroshot_top1_{image_model}_{text_model}"] = float(accuracy)
        if "retrieval" in self.config.tasks:
            results.update(self._retrieval(rows))
        results[f"{prefix}samples"] = int(len(rows["caption"]))
        return results

    def _retrieval(self, rows: dict) -> dict[str, float]:
        """R@k both ways for every pairing, over the distinct captions."""
        distinct = {caption: index for index, caption in enumerate(dict.fromkeys(rows["caption"]))}
        caption_of = torch.tensor([distinct[c] for c in rows["caption"]])  # (N,) image -> its caption's key
        first = torch.tensor([rows["caption"].index(c) for c in distinct])  # (U,) a row holding each caption
        chunk, results = self.config.chunk_size, {}
        for image_model, text_model in PAIRINGS:
            images, texts = rows[f"image_{image_model}"], rows[f"text_{text_model}"][first]  # (N, E), (U, E)
            i2t = torch.cat([ranks_of_positives(images[s : s + chunk] @ texts.T,
                                                caption_of[s : s + chunk, None] == torch.arange(len(texts))[None])
                             for s in range(0, len(images), chunk)])
            t2i = torch.cat([ranks_of_positives(texts[s : s + chunk] @ images.T,
                                                torch.arange(s, min(s + chunk, len(texts)))[:, None] == caption_of[None])
                             for s in range(0, len(texts), chunk)])
            for k in self.config.recall_at:
                results[f"{self.config.prefix}i2t_r{k}_{image_model}_{text_model}"] = float((i2t < k).double().mean())
                results[f"{self.config.prefix}t2i_r{k}_{image_model}_{text_model}"] = float((t2i < k).double().mean())
        return results
