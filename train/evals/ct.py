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

Shards are read directly (tar members grouped by key), each rank taking every world_size-th
shard, because pointing needs the lesion masks, which the generic eval loader does not carry.
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any, Iterator, Literal, Union

import numpy as np
import torch
from pydantic import Field

from vlp.core.collectives import all_reduce_sum, gather_objects
from vlp.data_pipelines.sources.ct_rate import CT_RATE_ABNORMALITIES
from vlp.train.evals.base import EVALUATORS, EvalConfig, EvalContext, Evaluator
from vlp.train.evals.common import encode_texts, patch_cosine, scoring_head


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


def read_ct_shards(urls: list[str]) -> Iterator[dict[str, Any]]:
    """Raw samples ({"__key__", ext: bytes}) of local tar shards, in order."""
    for url in urls:
        try:
            tar = tarfile.open(url)
        except (OSError, tarfile.TarError) as error:
            raise ValueError(f"ct eval: cannot read shard {url} ({error})") from None
        with tar:
            current: dict[str, Any] = {}
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if current and current["__key__"] != key:
                    yield current
                    current = {}
                current.setdefault("__key__", key)
                current[ext] = tar.extractfile(member).read()
            if current:
                yield current


def _batches(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


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


@torch.no_grad()
def evaluate_ct(model: Any, config: CtEvalConfig, context: EvalContext) -> dict[str, float]:
    from vlp.data_pipelines.sharding import expand_urls

    if not config.data:
        raise ValueError("evals.ct: `data` (a shard spec of held-out CT shards) is required")
    classes = _class_map(config.classes)
    keys, names = list(classes), list(classes.values())
    device = context.device
    was_training = model.training
    model.eval()
    head = scoring_head(model)
    prompts = [config.positive_template.format(n) for n in names] + [config.negative_template.format(n) for n in names]
    prompt_embed = encode_texts(model, prompts, device)  # (2C, E)
    preprocess = model.image.preprocess(train=False)
    tokenizer = model.text.tokenizer()
    grid = tuple(model.image.grid) if hasattr(model.image, "grid") else None
    patch = tuple(model.image.config.patch_size) if grid else None
    boxes = _patch_boxes(grid, patch) if grid else []

    urls = expand_urls(config.data)[context.rank :: context.world_size]
    probabilities: list[list[float]] = []
    labels: list[list[int]] = []
    hits = torch.zeros(3, dtype=torch.float64)  # hits, sentences, chance sum
    for group in _batches(read_ct_shards(urls), config.batch_size):
        volumes, masks, metas = [], [], []
        for sample in group:
            meta = json.loads(sample.get("json", b"{}"))
            metas.append(meta)
            if config.pointing and "mask.npy" in sample and grid is not None:
                mask = np.load(io.BytesIO(sample["mask.npy"]), allow_pickle=False)
                volume, mask_t = preprocess.with_mask(sample, mask)
                masks.append(mask_t[0].numpy())
            else:
                volume = preprocess(sample)
                masks.append(None)
            volumes.append(volume)
        images = torch.stack(volumes).to(device, context.dtype)  # (B, 1, H, W, D)
        encoded = model.encode_image(images)
        scores = head.pairwise_scores(encoded["image_embed"], prompt_embed).float().cpu()  # (B, 2C)
        pair = torch.stack([scores[:, : len(names)], scores[:, len(names) :]], dim=-1)  # (B, C, 2)
        probabilities += pair.softmax(dim=-1)[..., 0].tolist()
        labels += [[int(meta.get("labels", {}).get(key, -1)) for key in keys] for meta in metas]

        if not config.pointing or grid is None:
            continue
        sentences, owners = [], []  # (sample index, lesion mask value)
        for b, meta in enumerate(metas):
            if masks[b] is None:
                continue
            for lesion in meta.get("lesions", []):
                index = lesion.get("sentence_index", -1)
                if 0 <= index < len(meta.get("sentences", [])):
                    sentences.append(meta["sentences"][index])
                    owners.append((b, int(lesion["mask_value"])))
        if not sentences:
            continue
        sentence_embed = model.encode_text(tokenizer(sentences).to(device))["text_embed"]  # (M, E)
        tokens = encoded["image_tokens"][[b for b, _ in owners]]  # (M, P, E)
        best = patch_cosine(tokens, sentence_embed).argmax(dim=-1).cpu()  # (M,)
        for (b, value), p in zip(owners, best.tolist()):
            touched = [bool((masks[b][box] == value).any()) for box in boxes]
            if not any(touched):  # the lesion fell outside the crop
                continue
            hits += torch.tensor([float(touched[p]), 1.0, sum(touched) / len(touched)], dtype=torch.float64)

    hits = all_reduce_sum(hits.to(device)).cpu()
    probabilities_all = np.asarray(gather_objects(probabilities), dtype=np.float64).reshape(-1, len(names))
    labels_all = np.asarray(gather_objects(labels), dtype=np.int64).reshape(-1, len(names))
    if was_training:
        model.train()
    per_class = auroc_per_class(probabilities_all, labels_all, names)
    results = {f"{config.prefix}auroc/{name}": value for name, value in per_class.items()}
    results[f"{config.prefix}mean_auroc"] = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    results[f"{config.prefix}samples"] = int(len(labels_all))
    if config.pointing:
        count = float(hits[1])
        results[f"{config.prefix}pointing_acc"] = float(hits[0] / count) if count else float("nan")
        results[f"{config.prefix}pointing_chance"] = float(hits[2] / count) if count else float("nan")
        results[f"{config.prefix}pointing_sentences"] = int(count)
    return results


@EVALUATORS.register("ct")
class CtEvaluator(Evaluator):
    config_class = CtEvalConfig

    def run(self, model: Any, context: EvalContext) -> dict[str, float]:
        return evaluate_ct(model, self.config, context)
