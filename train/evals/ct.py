"""CT evaluator: zero-shot multi-abnormality classification (CT-CLIP protocol) and
sentence-to-patch pointing.

Classification: for each abnormality `name`, the volume's scores against "{name} is present." and
"{name} is not present." go through a softmax over the pair; the positive probability ranks the
volumes, and AUROC (sklearn) is taken per class and averaged over the classes whose held-out set
has both labels. Labels are the shards' `.json` "labels" ({key: 0/1}).

Pointing (where `.mask.npy` and the `.json` "lesions" exist, e.g. ct-lesions): every sentence that
describes a lesion scores every patch of its own volume (cosine of its embedding with the patch
tokens, the alignment head's patch score); a hit is an argmax patch that contains a voxel of that lesion. The
chance level (the fraction of patches touching the lesion, averaged) is reported beside it.

Shards are read by the harness's eval loader; the preprocess (`VolumeWithMask`) carries each
sample's lesion mask beside its volume, on the same grid.
"""

from __future__ import annotations

import io
from typing import Any, Literal, Union

import numpy as np
import torch
from pydantic import Field

from vlp.core.collectives import all_reduce_sum
from vlp.core.errors import ConfigError
from vlp.data_pipelines.sources.ct_rate import CT_RATE_ABNORMALITIES
from vlp.models.heads.ct_align import patch_scores
from vlp.models.dual_encoder import scoring_head
from vlp.train.evals.base import EVALUATORS, EvalConfig, EvalContext, EvalExample, Evaluator
from vlp.train.evals.common import encode_texts
from vlp.train.evals.harness import gather_rows


class CtEvalConfig(EvalConfig):
    type: Literal["ct"] = "ct"
    # A list of label keys (also the prompt names), or {label key: prompt name}.
    classes: Union[list[str], dict[str, str]] = Field(default_factory=lambda: list(CT_RATE_ABNORMALITIES))
    positive_template: str = "{} is present."
    negative_template: str = "{} is not present."
    pointing: bool = True
    prefix: str = "ct_"
    batch_size: int = Field(16, ge=1)


def _class_map(classes: Union[list[str], dict[str, str]]) -> dict[str, str]:
    return dict(classes) if isinstance(classes, dict) else {name: name for name in classes}


class VolumeWithMask:
    """The tower's eval volume preprocess for the shard loader, bringing the sample's lesion mask
    (`.mask.npy`) along on the same grid: raw sample -> (2, H, W, D) float, channel 0 the volume,
    channel 1 the mask's label values (-1 everywhere for a sample without a mask)."""

    wants_sample = True

    def __init__(self, preprocess: Any) -> None:
        self.preprocess = preprocess

    def __call__(self, sample: dict) -> torch.Tensor:
        if "mask.npy" in sample:
            mask = np.load(io.BytesIO(sample["mask.npy"]), allow_pickle=False)
            volume, mask_t = self.preprocess.with_mask(sample, mask)
            return torch.cat([volume, mask_t.float()])
        volume = self.preprocess(sample)
        return torch.cat([volume, torch.full_like(volume, -1.0)])


def _patch_boxes(grid: tuple[int, int, int], patch: tuple[int, int, int]) -> list[tuple[slice, slice, slice]]:
    """Voxel slices of every patch, in the tower's (h, w, d) row-major token order."""
    return [
        (slice(i * patch[0], (i + 1) * patch[0]), slice(j * patch[1], (j + 1) * patch[1]), slice(k * patch[2], (k + 1) * patch[2]))
        for i in range(grid[0]) for j in range(grid[1]) for k in range(grid[2])
    ]


def auroc_per_class(probabilities: np.ndarray, labels: np.ndarray, names: list[str]) -> dict[str, float]:
    """{name: AUROC} for the classes whose labels hold both 0 and 1 (others are left out)."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for c, name in enumerate(names):
        column = labels[:, c]
        known = column >= 0
        if known.sum() and len(np.unique(column[known])) == 2:
            out[name] = float(roc_auc_score(column[known], probabilities[known, c]))
    return out


@EVALUATORS.register_by_type
class CtEvaluator(Evaluator):
    config_class = CtEvalConfig
    config: CtEvalConfig
    example = EvalExample(source="ct-lesions", build=(("train_size", 1), ("test_size", 5), ("size", 16),
                                                      ("spacing", 8.0), ("seed", 1)),
                          options=(("batch_size", 3), ("classes", ("nodule", "cyst", "calcification", "mass"))),
                          heads=("ct_contrastive",),
                          image=(("type", "monai_vit3d"), ("roi", (16, 16, 16)), ("patch_size", (8, 8, 8)),
                                 ("spacing", None), ("hu_window", (-200.0, 400.0)), ("hidden_size", 16),
                                 ("mlp_dim", 32), ("num_layers", 1), ("num_heads", 2)))

    def source(self):
        if not self.config.data:
            raise ConfigError("evals.ct: `data` (a shard spec of held-out CT shards) is required")
        return super().source()

    def preprocess(self, model: Any) -> VolumeWithMask:
        return VolumeWithMask(model.image.preprocess(train=False))

    def prepare(self, model: Any, context: EvalContext) -> None:
        classes = _class_map(self.config.classes)
        self.keys, self.names = list(classes), list(classes.values())
        self.head = scoring_head(model)
        prompts = ([self.config.positive_template.format(n) for n in self.names]
                   + [self.config.negative_template.format(n) for n in self.names])
        self.prompt_embed = encode_texts(model, prompts, context.device)  # (2C, E)
        self.tokenizer = model.text.tokenizer()
        grid = tuple(model.image.grid) if hasattr(model.image, "grid") else None
        self.boxes = _patch_boxes(grid, tuple(model.image.config.patch_size)) if grid else []
        self.pointing = self.config.pointing and grid is not None
        # Pointing encodes each batch's lesion sentences: one text forward per batch, always.
        self.towers = ("image", "text") if self.pointing else ("image",)

    def per_batch(self, model: Any, batch: dict) -> dict:
        """Per volume: the positive probability of each class and its label (-1: unknown); per
        lesion sentence: (hit, 1, chance) of its argmax patch."""
        images, masks = batch["image"][:, :1], batch["image"][:, 1].cpu()  # (B, 1, H, W, D), (B, H, W, D)
        metas = [meta if isinstance(meta, dict) else {} for meta in batch["meta"]]
        encoded = model.encode_image(images)
        names = len(self.names)
        scores = self.head.pairwise_scores(encoded["image_embed"], self.prompt_embed).float().cpu()  # (B, 2C)
        pair = torch.stack([scores[:, :names], scores[:, names:]], dim=-1)  # (B, C, 2)
        rows = {"probability": pair.softmax(dim=-1)[..., 0].double(),
                "label": torch.tensor([[int(meta.get("labels", {}).get(key, -1)) for key in self.keys] for meta in metas],
                                      dtype=torch.long).reshape(len(metas), names)}
        if not self.pointing:
            return rows
        sentences, owners = [], []  # (sample index, lesion mask value)
        for b, meta in enumerate(metas):
            if (masks[b] < 0).all():  # no .mask.npy
                continue
            for lesion in meta.get("lesions", []):
                index = lesion.get("sentence_index", -1)
                if 0 <= index < len(meta.get("sentences", [])):
                    sentences.append(meta["sentences"][index])
                    owners.append((b, int(lesion["mask_value"])))
        # Every batch runs its text forward (the empty caption when it has no lesion sentence):
        # under ZeRO-3 the ranks' forwards must pair up.
        sentence_embed = model.encode_text(self.tokenizer(sentences or [""]).to(images.device))["text_embed"]  # (M, E)
        pointing = []
        if sentences:
            tokens = encoded["image_tokens"][[b for b, _ in owners]]  # (M, P, E)
            best = patch_scores(tokens, sentence_embed[:, None])[:, 0].argmax(dim=-1).cpu()  # (M,)
            for (b, value), p in zip(owners, best.tolist()):
                touched = [bool((masks[b][box] == value).any()) for box in self.boxes]
                if any(touched):  # else the lesion fell outside the crop
                    pointing.append([float(touched[p]), 1.0, sum(touched) / len(touched)])
        rows["pointing"] = torch.tensor(pointing, dtype=torch.float64).reshape(-1, 3)
        return rows

    def reduce(self, rows: dict, model: Any, context: EvalContext) -> dict[str, float]:
        names, prefix = self.names, self.config.prefix
        local = rows.get("pointing", torch.zeros(0, 3, dtype=torch.float64)).sum(dim=0)
        hits = all_reduce_sum(local.to(context.device)).cpu()  # hits, sentences, chance sum
        every = gather_rows(rows, ("probability", "label"))
        probabilities = every.get("probability", torch.zeros(0, len(names), dtype=torch.float64)).numpy()
        labels = every.get("label", torch.zeros(0, len(names), dtype=torch.long)).numpy()
        per_class = auroc_per_class(probabilities, labels, names)
        results = {f"{prefix}auroc/{name}": value for name, value in per_class.items()}
        results[f"{prefix}mean_auroc"] = float(np.mean(list(per_class.values()))) if per_class else float("nan")
        results[f"{prefix}samples"] = int(len(labels))
        if self.config.pointing:
            count = float(hits[1])
            results[f"{prefix}pointing_acc"] = float(hits[0] / count) if count else float("nan")
            results[f"{prefix}pointing_chance"] = float(hits[2] / count) if count else float("nan")
            results[f"{prefix}pointing_sentences"] = int(count)
        return results
