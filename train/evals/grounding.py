"""Grounding: where in the image does an object's sentence land, and does it find its image?

For every held-out (image, object sentence) pair of a dataset whose `.json` lists `objects` with
a `sentence` and a run-length `mask` (the generated `shapes` source), a map over the image's
patches is computed by one of two kinds of method:

* a head that grounds (`Head.grounds`), named by its key in `model.heads`: the head's own
  `patch_map` (e.g. text-conditioned attention, or token similarity) and `grounding_scores`;
* patch: the baseline, cosine between each projected patch token and the sentence embedding.

`auto` takes the first head (in config order) that grounds, else patch.

Metrics (each pair counts once; sums are reduced over ranks):

* pointing_acc: the arg-max patch is one of the object's patches. An object's patches are those
  whose pixels are at least half covered by its mask (the mask brought to the model's input
  the same way as the image: resized so the short side is the input size, centre-cropped), or,
  for an object that half-covers no patch, the patches of highest coverage.
* miou: the map min-max normalised per pair and thresholded at `threshold` (default 0.5, i.e.
  the middle of its range) -> a set of patches; IoU with the object's patches, averaged.
* retrieval_r1 / retrieval_r5: each sentence queries all held-out images (a grounding head:
  its `grounding_scores`, which may re-rank each query's `retrieval_topk`; patch: global
  cosine). A hit is an image in the top k whose caption contains the same sentence (an
  identical object can occur in several images).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from vlp.core.collectives import all_reduce_sum
from vlp.core.errors import ConfigError, DataError
from vlp.models.heads.ct_align import patch_scores
from vlp.train.evals.base import EVALUATORS, EvalConfig, EvalContext, EvalExample, Evaluator
from vlp.train.evals.harness import gather_rows


class GroundingConfig(EvalConfig):
    type: Literal["grounding"] = "grounding"
    # "auto", "patch", or the name of a head that grounds.
    method: str = "auto"
    # Fraction of a map's min-max range at which it is thresholded for mIoU.
    threshold: float = Field(0.5, gt=0, lt=1)
    # Retrieval: re-rank each sentence's top-k images by global cosine, where the grounding head
    # supports it (None: score all pairs).
    retrieval_topk: Optional[int] = Field(None, ge=1)
    # Metric names are prefixed with this (e.g. "grounding_") when several runs share a log.
    prefix: str = ""
    grid_pairs: int = Field(12, ge=0, description="(image, sentence) maps drawn into the PNG grid")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from vlp.core.registry import nearest
        from vlp.models.heads import HEADS

        methods = ["auto", "patch"] + [name for name, head in HEADS.items() if head.grounds]
        if value not in methods:
            raise ValueError(f"{value!r} is not one of {', '.join(methods)}.{nearest(value, methods)}")
        return value


def resolve_method(model: Any, method: str) -> str:
    """The grounding head's name in `model.objective.heads` (first that grounds for auto), or "patch"."""
    heads = model.objective.heads
    if method == "auto":
        return next((name for name, head in heads.items() if head.grounds), "patch")
    if method != "patch" and method not in heads:
        raise ConfigError(f"grounding: method={method} needs a `{method}` head; the model has {', '.join(heads)}")
    return method


def mask_to_patches(mask: np.ndarray, input_size: int, grid: int) -> torch.Tensor:
    """Fraction of each patch's pixels covered by `mask` (H, W) bool -> (grid * grid,) float.

    The mask follows the eval transform of the image: shortest side resized to `input_size`
    (nearest), then centre-cropped to input_size x input_size; patches are row-major, as ViT
    tokens are.
    """
    height, width = mask.shape
    scale = input_size / min(height, width)
    size = (max(input_size, round(height * scale)), max(input_size, round(width * scale)))
    resized = F.interpolate(torch.from_numpy(mask).float()[None, None], size=size, mode="nearest")[0, 0]
    top, left = (size[0] - input_size) // 2, (size[1] - input_size) // 2
    cropped = resized[top : top + input_size, left : left + input_size]
    if input_size % grid:
        raise ConfigError(f"grounding: input size {input_size} is not a multiple of the {grid}x{grid} patch grid")
    return F.avg_pool2d(cropped[None, None], input_size // grid).reshape(-1)


def object_patches(coverage: torch.Tensor) -> torch.Tensor:
    """Patches (bool, (P,)) that belong to an object: >= half covered, else the best-covered ones."""
    inside = coverage >= 0.5
    if not inside.any():
        inside = (coverage == coverage.max()) & (coverage > 0)
    return inside


def pointing_and_iou(maps: torch.Tensor, targets: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """maps (Q, P) float, targets (Q, P) bool -> (hit (Q,) bool, IoU (Q,) float)."""
    hit = targets.gather(1, maps.argmax(dim=1, keepdim=True))[:, 0]
    low, high = maps.amin(dim=1, keepdim=True), maps.amax(dim=1, keepdim=True)
    predicted = (maps - low) / (high - low).clamp(min=1e-12) >= threshold
    iou = (predicted & targets).sum(1).float() / (predicted | targets).sum(1).clamp(min=1).float()
    return hit, iou


def recall_at(scores: torch.Tensor, positives: torch.Tensor, ks: tuple[int, ...]) -> dict[int, float]:
    """scores (N images, M queries), positives (N, M) bool -> {k: fraction of queries with a positive in the top k}."""
    out = {}
    for k in ks:
        top = scores.topk(min(k, scores.shape[0]), dim=0).indices  # (k, M)
        out[k] = float(positives.gather(0, top).any(dim=0).float().mean()) if scores.shape[1] else 0.0
    return out


class _Maps:
    """The map and retrieval score of one method: a grounding head's, or the patch baseline."""

    def __init__(self, model: Any, method: str) -> None:
        self.head = None if method == "patch" else model.objective.heads[method]
        if self.head is not None and not self.head.grounds:
            raise ConfigError(f"grounding: the `{method}` head does not ground (Head.grounds)")

    def maps(self, image: dict, text: dict, owner: torch.Tensor) -> torch.Tensor:
        """(Q, P) maps of sentence q over the patches of image owner[q]."""
        paired = {"image_embed": image["image_embed"][owner], "image_tokens": image["image_tokens"][owner]}  # (Q, ...)
        if self.head is not None:
            return self.head.patch_map(paired, text)
        return patch_scores(paired["image_tokens"], text["text_embed"][:, None])[:, 0]  # (Q, P)

    def retrieval(self, images: dict, texts: dict, topk: Optional[int]) -> torch.Tensor:
        """(N images, M sentences) scores."""
        if self.head is not None:
            return self.head.grounding_scores(images, texts, topk)
        return F.normalize(images["image_embed"].float(), dim=-1) @ F.normalize(texts["text_embed"].float(), dim=-1).T


def _write_grid(grid: list[dict], model: Any, context: EvalContext, method: str) -> None:
    """One row per (image, sentence): the image with the object's patches outlined, and the map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = torch.tensor(getattr(model.image.config, "mean", (0.0, 0.0, 0.0)))[:, None, None]
    std = torch.tensor(getattr(model.image.config, "std", (1.0, 1.0, 1.0)))[:, None, None]
    columns = min(4, len(grid))
    rows = (len(grid) + columns - 1) // columns
    figure, axes = plt.subplots(rows, 2 * columns, figsize=(4.2 * columns, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for index, item in enumerate(grid):
        ax_image, ax_map = axes[index // columns, 2 * (index % columns)], axes[index // columns, 2 * (index % columns) + 1]
        picture = (item["image"].float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        size, g = picture.shape[0], item["grid"]
        ax_image.imshow(picture)
        target = item["target"].reshape(g, g).float().numpy()
        ax_image.contour(np.kron(target, np.ones((size // g, size // g))), levels=[0.5], colors="cyan", linewidths=0.8)
        ax_image.set_title(item["sentence"], fontsize=6)
        heat = item["map"].reshape(g, g).numpy()
        ax_map.imshow(heat, cmap="magma")
        best = int(item["map"].argmax())
        ax_map.scatter([best % g], [best // g], marker="x", color="cyan" if target.flat[best] else "red", s=30)
        ax_map.set_title(f"{method} map", fontsize=6)
    figure.tight_layout()
    context.out_dir.mkdir(parents=True, exist_ok=True)
    figure.savefig(context.out_dir / f"grounding_{method}_step{context.step:06d}.png", dpi=110)
    plt.close(figure)


@EVALUATORS.register_by_type
class Grounding(Evaluator):
    config_class = GroundingConfig
    config: GroundingConfig
    towers = ("image", "text")  # each batch encodes its images, then its object sentences
    example = EvalExample(source="shapes", build=(("train_size", 1), ("test_size", 41), ("shard_size", 50),
                                                   ("image_size", 64)),
                          options=(("batch_size", 20),), heads=("flair",))

    def source(self):
        if not self.config.data:
            raise ConfigError("grounding: `data` (the held-out shard spec) is required")
        return super().source()

    def prepare(self, model: Any, context: EvalContext) -> None:
        self.method = resolve_method(model, self.config.method)
        self.scorer = _Maps(model, self.method)
        self.tokenizer = model.text.tokenizer()
        self.grid: list[dict] = [] if context.out_dir is not None else None

    def per_batch(self, model: Any, batch: dict) -> dict:
        """Per object sentence: pointing hit and IoU of its map; per image and sentence: the
        embeddings (and tokens, for a grounding head) that retrieval scores."""
        from vlp.data_pipelines.sources.shapes import decode_mask

        images = batch["image"]
        encoded = model.encode_image(images)
        grid_size = int(round(encoded["image_tokens"].shape[1] ** 0.5))
        if grid_size * grid_size != encoded["image_tokens"].shape[1]:
            raise ConfigError(f"grounding: {encoded['image_tokens'].shape[1]} image tokens do not form a square grid")
        owner, sentences, targets = [], [], []
        for index, (key, meta) in enumerate(zip(batch["key"], batch["meta"])):
            objects = meta.get("objects") if isinstance(meta, dict) else None
            if not objects:
                raise DataError(f"grounding: sample {key} has no `objects` (sentence + mask) in its .json")
            for obj in objects:
                owner.append(index)
                sentences.append(obj["sentence"])
                targets.append(object_patches(mask_to_patches(decode_mask(obj["mask"]), images.shape[-1], grid_size)))
        text = model.encode_text(self.tokenizer(sentences).to(images.device))
        maps = self.scorer.maps(encoded, text, torch.tensor(owner, device=images.device)).cpu()  # (Q, P)
        targets_t = torch.stack(targets)
        hit, iou = pointing_and_iou(maps, targets_t, self.config.threshold)
        if self.grid is not None and len(self.grid) < self.config.grid_pairs:
            for q in range(min(len(owner), self.config.grid_pairs - len(self.grid))):
                self.grid.append({"image": images[owner[q]].cpu(), "map": maps[q], "target": targets_t[q],
                                  "sentence": sentences[q], "grid": grid_size})
        rows = {"hit": hit.double(), "iou": iou.double(), "caption": batch["caption"], "sentence": sentences,
                "image_embed": encoded["image_embed"].float(), "text_embed": text["text_embed"].float()}
        if self.scorer.head is not None:
            rows.update(image_tokens=encoded["image_tokens"].float(), text_tokens=text["text_tokens"].float(),
                        text_mask=text["text_mask"])
        return rows

    def reduce(self, rows: dict, model: Any, context: EvalContext) -> dict[str, float]:
        local = torch.tensor([float(rows["hit"].sum()), float(rows["iou"].sum()), len(rows["hit"])]
                             if rows else [0.0, 0.0, 0.0], dtype=torch.float64)
        hits, iou_sum, pairs = all_reduce_sum(local.to(context.device)).cpu().tolist()  # pointing hits, IoU sum, pairs
        total = max(1.0, pairs)
        results = {"pointing_acc": hits / total, "miou": iou_sum / total}
        # Retrieval over the whole held-out set: every rank gathers the (small) set and scores it.
        every = gather_rows(rows, ("image_embed", "image_tokens", "text_embed", "text_tokens", "text_mask",
                                   "caption", "sentence"))
        images = {k: every[k].to(context.device) for k in ("image_embed", "image_tokens") if k in every}
        texts = {k: every[k].to(context.device) for k in ("text_embed", "text_tokens", "text_mask") if k in every}
        scores = self.scorer.retrieval(images, texts, self.config.retrieval_topk).cpu()
        positives = torch.tensor([[sentence in caption for sentence in every["sentence"]] for caption in every["caption"]],
                                 dtype=torch.bool)
        recall = recall_at(scores, positives, (1, 5))
        results.update(retrieval_r1=recall[1], retrieval_r5=recall[5])
        if context.out_dir is not None and self.grid:
            _write_grid(self.grid, model, context, self.method)
        results = {f"{self.config.prefix}{name}": value for name, value in results.items()}
        results[f"{self.config.prefix}pairs"] = int(total)
        return results
