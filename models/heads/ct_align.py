"""Sentence-to-patch alignment for CT reports (after fVLM and SimCroP).

Each report sentence scores every patch of ITS OWN volume (cosine of the sentence embedding and
the patch tokens), keeps the patches that matter to it and pools them into a sentence-specific
volume embedding ("region"). Regions and sentences are then contrasted with a symmetric
InfoNCE over every aligned sentence of the global batch: a sentence's positive is the region it
pooled, its negatives the regions of every other sentence, of its own and of other volumes.

Patch selection (`selection`):
* "topk" (default): the k best-scoring patches, weighted by a softmax of their scores at
  `select_temperature`; the others get weight 0. A lesion covers a handful of patches, so a hard
  top-k keeps the region embedding from being diluted by hundreds of background patches, and the
  gradient still reaches the scores (through the softmax) and the chosen tokens.
* "softmax": a softmax over all patches at `select_temperature` (a soft attention pooling).

Normal sentences ("No pleural effusion.", "The heart is not enlarged.") describe no region: a
sentence flagged in batch["sentence_normal"] (set at data time by
`data_pipelines.ct.is_normal_sentence`, or derived from the captions when the loader does not
send it) is masked out of the alignment entirely: it pools nothing and is nobody's negative.
It still shapes the report embedding through the global `ct_contrastive` head.

Duplicate sentences ("Nodule as described." in two reports) would be false negatives of each
other; columns whose sentence embedding has cosine >= `dedup_threshold` with the row's are
masked from its negatives.

Needs encoder outputs "image_tokens" (B, P, E) and "sentence_embed" (B, S, E) (the model encodes
batch["sentences"] (B, S, L) as one text batch), and batch["sentence_mask"] (B, S) bool.
Regions and sentences are gathered across ranks inside the head (they exist only here); the
loss on each rank is normalised so that the ranks' mean is the global-batch loss.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from models.distributed import gather_no_grad, gather_with_grad
from models.heads.base import HEADS, Head, HeadConfig, HeadInputs


def _fp32(tensor: Tensor) -> Tensor:
    """At least fp32 (losses never run in half precision; float64 stays for gradcheck)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def patch_scores(patch_tokens: Tensor, sentences: Tensor) -> Tensor:
    """Cosine of every sentence with every patch of its own volume.

    patch_tokens: (B, P, E); sentences: (B, S, E) -> scores (B, S, P), fp32."""
    patches = F.normalize(patch_tokens.float(), dim=-1)
    text = F.normalize(sentences.float(), dim=-1)
    return torch.einsum("bse,bpe->bsp", text, patches)


def selection_weights(
    scores: Tensor, mode: Literal["topk", "softmax"], k: int, temperature: float
) -> Tensor:
    """Pooling weights over patches from the scores (B, S, P) -> (B, S, P), each row sums to 1.

    "topk": softmax(score / temperature) over the k largest scores, 0 elsewhere.
    "softmax": softmax(score / temperature) over all patches."""
    logits = scores / temperature
    if mode == "softmax" or k >= scores.shape[-1]:
        return logits.softmax(dim=-1)
    top = logits.topk(k, dim=-1)
    weights = torch.zeros_like(logits)
    return weights.scatter(-1, top.indices, top.values.softmax(dim=-1))


def sentence_regions(
    patch_tokens: Tensor, sentences: Tensor, mode: Literal["topk", "softmax"] = "topk", k: int = 4,
    temperature: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Sentence-specific volume embeddings.

    patch_tokens: (B, P, E); sentences: (B, S, E) -> (regions (B, S, E) L2-normalised,
    weights (B, S, P))."""
    weights = selection_weights(patch_scores(patch_tokens, sentences), mode, k, temperature)
    patches = F.normalize(patch_tokens.float(), dim=-1)
    regions = torch.einsum("bsp,bpe->bse", weights, patches)
    return F.normalize(regions, dim=-1), weights


def alignment_loss(
    regions: Tensor,
    sentences: Tensor,
    valid: Tensor,
    logit_scale: Tensor,
    *,
    rows: slice | None = None,
    dedup_threshold: Optional[float] = None,
    normaliser: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE between regions and sentences of the global batch.

    regions, sentences: (M, E) L2-normalised, row i of each a positive pair (M = N * S).
    valid: (M,) bool: rows that take part (real, non-normal sentences).
    rows: this rank's rows (default all). Each valid row in `rows` is a query in both directions
        against every valid column.
    dedup_threshold: columns whose sentence has cosine >= this with the row's sentence (other
        than the row itself) are removed from its negatives.
    normaliser: divide the summed row losses by this (default: the number of valid rows in
        `rows`); pass (valid rows of all ranks) / world_size so the ranks' mean is the global mean.
    Returns (loss, sentence->region top-1 accuracy), fp32 scalars.
    """
    regions, sentences, logit_scale = _fp32(regions), _fp32(sentences), _fp32(logit_scale)
    rows = rows if rows is not None else slice(0, regions.shape[0])
    local_valid = valid[rows]
    query_index = torch.arange(regions.shape[0], device=regions.device)[rows][local_valid]  # (m,)
    if query_index.numel() == 0:
        zero = (regions.sum() + sentences.sum()) * 0.0  # keeps every rank's graph connected
        return zero, torch.zeros((), device=regions.device)
    column_index = torch.nonzero(valid, as_tuple=False).squeeze(1)  # (n,)
    s2r = (sentences[query_index] * logit_scale) @ regions[column_index].T  # (m, n)
    r2s = (regions[query_index] * logit_scale) @ sentences[column_index].T  # (m, n)
    targets = (column_index.unsqueeze(0) == query_index.unsqueeze(1)).float().argmax(dim=1)  # (m,)
    if dedup_threshold is not None:
        with torch.no_grad():
            same = sentences[query_index] @ sentences[column_index].T >= dedup_threshold  # (m, n)
            same[torch.arange(len(query_index)), targets] = False
        s2r = s2r.masked_fill(same, float("-inf"))
        r2s = r2s.masked_fill(same, float("-inf"))
    per_row = (F.cross_entropy(s2r, targets, reduction="none") + F.cross_entropy(r2s, targets, reduction="none")) / 2
    denominator = float(normaliser) if normaliser is not None else float(len(query_index))
    accuracy = (s2r.detach().argmax(dim=1) == targets).float().mean()
    return per_row.sum() / denominator, accuracy


class CtAlignConfig(HeadConfig):
    selection: Literal["topk", "softmax"] = "topk"
    topk: int = Field(4, ge=1, description="patches kept per sentence (selection=topk)")
    select_temperature: float = Field(0.1, gt=0, description="softmax temperature of the pooling weights")
    init_temperature: float = Field(0.07, gt=0)
    max_logit_scale: float = Field(100.0, gt=0)
    exclude_normal: bool = Field(True, description="mask normal/negated sentences out of the alignment")
    dedup_threshold: Optional[float] = Field(0.98, gt=0, le=1, description="None: keep duplicates as negatives")


@HEADS.register("ct_align")
class CtAlignHead(Head):
    config_class = CtAlignConfig
    config: CtAlignConfig
    needs = ("image_tokens", "sentence_embed")
    # Alignment pools per sentence; it defines no global image-text geometry for zero-shot.
    scores_embeddings = False

    def __init__(self, config: CtAlignConfig, embed_dim: int) -> None:
        super().__init__(config, embed_dim)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / config.init_temperature)))

    def scale(self) -> Tensor:
        """exp(logit_scale) clamped in forward (ZeRO 2/3 would undo an in-place clamp), [1] fp32."""
        return self.logit_scale.float().clamp(max=math.log(self.config.max_logit_scale)).exp()

    def aligned_mask(self, batch: dict[str, Any], shape: tuple[int, int]) -> Tensor:
        """(B, S) bool: real sentences, minus normal ones when `exclude_normal`."""
        from data_pipelines.ct import batch_sentence_normal

        if "sentence_mask" not in batch:
            raise ValueError("ct_align needs batch['sentence_mask'] (set data.sentences > 0)")
        mask = torch.as_tensor(batch["sentence_mask"], dtype=torch.bool)
        if tuple(mask.shape) != shape:
            raise ValueError(f"ct_align: sentence_mask {tuple(mask.shape)} does not match sentences {shape}")
        if self.config.exclude_normal:
            mask = mask & ~batch_sentence_normal(batch, shape[1]).to(mask.device)
        return mask

    def forward(self, inputs: HeadInputs) -> dict[str, Any]:
        c = self.config
        tokens = inputs.local["image_tokens"]  # (B, P, E)
        sentences = F.normalize(inputs.local["sentence_embed"].float(), dim=-1)  # (B, S, E)
        batch, num_sentences = sentences.shape[:2]
        valid = self.aligned_mask(inputs.batch, (batch, num_sentences)).to(tokens.device)
        regions, weights = sentence_regions(tokens, sentences, c.selection, c.topk, c.select_temperature)
        all_regions = gather_with_grad(regions.reshape(batch * num_sentences, -1))  # (N * S, E)
        all_sentences = gather_with_grad(sentences.reshape(batch * num_sentences, -1))
        all_valid = gather_no_grad(valid.reshape(-1).to(torch.uint8)).bool()  # (N * S,)
        total_valid = int(all_valid.sum())
        start = inputs.rank * batch * num_sentences
        loss, accuracy = alignment_loss(
            all_regions, all_sentences, all_valid, self.scale(),
            rows=slice(start, start + batch * num_sentences),
            dedup_threshold=c.dedup_threshold,
            normaliser=max(total_valid, 1) / inputs.world_size,
        )
        selected = (weights.detach() > 0).float().sum(-1)[valid].mean() if valid.any() else torch.zeros(())
        return {
            "loss": loss,
            "logging": {
                "logit_scale": self.scale().detach()[0],
                "accuracy": accuracy,
                "aligned_sentences": float(total_valid),
                "patches_per_sentence": selected,
            },
        }
