"""Sentence-to-patch alignment for CT reports (after fVLM and SimCroP).

Each report sentence scores every patch of a volume (cosine of the sentence embedding and the
patch tokens), keeps the patches that matter to it and pools them into a sentence-specific
volume embedding ("region"). The sentence does this for ITS OWN volume and for every other
volume of the global batch, and an InfoNCE over volumes asks its own volume's region to match
it best: logit(i, b) = scale * cos(sentence_i, region_i(b)), target = the sentence's volume.

Why pool the same sentence over every volume: if the negatives were regions pooled by OTHER
sentences, the loss would have a shortcut: a region selected by a sentence's own similarity is
close to that sentence whatever the volume contains. Pooling sentence i over every volume
cancels the selection effect; only a volume that really holds a patch matching sentence i (the
lesion) wins, which is what makes the argmax patch point at the finding.

Patch selection (`selection`):
* "topk" (default): the k best-scoring patches, weighted by a softmax of their scores at
  `select_temperature`; the others get weight 0. A lesion covers a handful of patches, so a hard
  top-k keeps the region from being diluted by hundreds of background patches, and the gradient
  still reaches the scores (through the softmax) and the chosen tokens.
* "softmax": a softmax over all patches at `select_temperature` (soft attention pooling).

Normal sentences ("No pleural effusion.", "The heart is not enlarged.") describe no region: this
head flags them (`sentence_normal_flags`: `is_normal_sentence` on the loader's own split of
batch["caption"]) and masks them out of the alignment entirely; they still shape the report
embedding through the global `ct_contrastive` head. A batch that carries its own
batch["sentence_normal"] (B, S) is taken as it is.

Duplicate findings ("Nodule as described." in two reports, the same lesion words twice) make
false negatives: a volume holding a sentence with cosine >= `dedup_threshold` to sentence i is
removed from sentence i's negatives.

Needs encoder outputs "image_tokens" (B, P, E) and "sentence_embed" (B, S, E) (the model encodes
batch["sentences"] (B, S, L) as one text batch), and batch["sentence_mask"] (B, S) bool. The loss
on each rank is normalised so that the ranks' mean is the global-batch loss.

Distributed scheme: every sentence meets every volume of the global batch, but the patch tokens
stay on their rank. The sentences are gathered instead (`gathered_keys`, N x S x E, with gradient
by the objective), each rank scores its own B volumes against every aligned sentence of the
global batch in blocks of sentences (`blockwise_columns`), and the softmax over volumes combines
the ranks' per-sentence log-sum-exps (`global_logsumexp`, tiled_tokens.py). A rank's loss is
over its own sentences, as before; tests/test_tiled_tokens.py checks it and the gradients
against the single-process formula (`alignment_loss` over `cross_region_scores`).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from vlp.core.collectives import at_least_fp32, gather_no_grad, gather_with_grad
from vlp.data_pipelines.text import caption_sentences, is_normal_sentence
from vlp.models.heads.base import HEADS, Head, HeadConfig, HeadInputs, bounded
from vlp.models.heads.tiled_tokens import block_plan, blockwise_columns, global_logsumexp


def patch_scores(patch_tokens: Tensor, sentences: Tensor) -> Tensor:
    """Cosine of every sentence with every patch of its own volume.

    patch_tokens: (B, P, E); sentences: (B, S, E) -> scores (B, S, P), fp32."""
    patches = F.normalize(at_least_fp32(patch_tokens), dim=-1)
    text = F.normalize(at_least_fp32(sentences), dim=-1)
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
    """Sentence-specific embeddings of each sentence's own volume.

    patch_tokens: (B, P, E); sentences: (B, S, E) -> (regions (B, S, E) L2-normalised,
    weights (B, S, P))."""
    weights = selection_weights(patch_scores(patch_tokens, sentences), mode, k, temperature)
    patches = F.normalize(at_least_fp32(patch_tokens), dim=-1)
    regions = torch.einsum("bsp,bpe->bse", weights, patches)
    return F.normalize(regions, dim=-1), weights


def _region_scores(text: Tensor, patch_tokens: Tensor, mode: Literal["topk", "softmax"], k: int,
                   temperature: float) -> Tensor:
    """cos(sentence_i, region_i(b)) of normalised sentences (M, E) over volumes (n, P, E) -> (M, n)."""
    patches = F.normalize(at_least_fp32(patch_tokens), dim=-1)
    scores = torch.einsum("me,npe->mnp", text, patches)  # (M, n, P)
    weights = selection_weights(scores, mode, k, temperature)
    regions = F.normalize(torch.einsum("mnp,npe->mne", weights, patches), dim=-1)  # (M, n, E)
    return torch.einsum("me,mne->mn", text, regions)


def region_bytes_per_column(sentences: int, patches: int, width: int) -> int:
    """fp32 bytes one volume column of `cross_region_scores` keeps alive in its backward, about:
    scores, logits and weights (M, P) and the regions before and after normalising (M, E)."""
    return 4 * sentences * (4 * patches + 3 * width)


def cross_region_scores(
    sentences: Tensor, patch_tokens: Tensor, mode: Literal["topk", "softmax"] = "topk", k: int = 4,
    temperature: float = 0.1, block_size: Optional[int] = None,
) -> Tensor:
    """cos(sentence_i, region_i(b)): every sentence pooled over every volume.

    sentences: (M, E); patch_tokens: (N, P, E) -> (M, N), fp32. Built in blocks of `block_size`
    volumes, recomputed in backward (None: `tiled_tokens.block_plan` picks dense or the size)."""
    text = F.normalize(at_least_fp32(sentences), dim=-1)
    total, patches, width = patch_tokens.shape
    block_size = block_plan(total, region_bytes_per_column(text.shape[0], patches, width), block_size,
                            device=patch_tokens.device)
    if block_size is None or text.shape[0] == 0:
        return _region_scores(text, patch_tokens, mode, k, temperature)
    columns = torch.arange(total, device=patch_tokens.device)
    return blockwise_columns(lambda t, tokens: _region_scores(t, tokens, mode, k, temperature),
                             (text,), [(patch_tokens, columns)], block_size)


def local_volume_alignment_loss(
    patch_tokens: Tensor,
    queries: Tensor,
    owners: Tensor,
    logit_scale: Tensor,
    *,
    mode: Literal["topk", "softmax"] = "topk",
    k: int = 4,
    temperature: float = 0.1,
    exclude: Optional[Tensor] = None,
    normaliser: Optional[float] = None,
    block_size: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """`alignment_loss` of this rank's sentences, scored from this rank's volumes only.

    patch_tokens: (B, P, E) this rank's volumes; queries: (M, E) the L2-normalised aligned
    sentences of EVERY rank, in the same order on every rank; owners: (M,) long, the local
    volume of each sentence of this rank, -1 for the other ranks' sentences; exclude: (M, B)
    bool, volumes removed from a sentence's negatives (never its owner); normaliser: as in
    `alignment_loss` (default: this rank's sentence count). Every rank must call this together:
    the softmax over volumes adds up the ranks' per-sentence log-sum-exps (`global_logsumexp`).
    The (B, M) scores are built in blocks of `block_size` sentences with recompute in backward
    (None: `tiled_tokens.block_plan` picks dense or the block size).
    Returns (loss, top-1 accuracy of finding the own volume over the global batch).
    """
    batch, patches, width = patch_tokens.shape
    total = queries.shape[0]
    block_size = block_plan(total, region_bytes_per_column(batch, patches, width), block_size,
                            device=patch_tokens.device)

    def column_fn(tokens: Tensor, sentences: Tensor) -> Tensor:  # (B, P, E), (c, E) -> (B, c)
        return _region_scores(sentences, tokens, mode, k, temperature).T

    if block_size is None:
        similarity = column_fn(patch_tokens, queries)  # (B, M)
    else:
        columns = torch.arange(total, device=queries.device)
        similarity = blockwise_columns(column_fn, (patch_tokens,), [(queries, columns)], block_size)
    scale = at_least_fp32(logit_scale)
    lse, best = global_logsumexp(at_least_fp32(similarity), scale, None if exclude is None else exclude.T)
    mine = (owners >= 0).nonzero(as_tuple=True)[0]  # (m,) this rank's sentences
    positive = scale * similarity[owners[mine], mine]  # (m,)
    denominator = float(normaliser) if normaliser is not None else float(max(len(mine), 1))
    # `0 * lse.sum()`: every rank back-propagates through the collective, with or without sentences.
    loss = (lse[mine] - positive).sum() / denominator + 0.0 * lse.sum()
    accuracy = (positive.detach() >= best[mine]).float().mean() if len(mine) else torch.zeros((), device=lse.device)
    return loss, accuracy


def alignment_loss(
    similarity: Tensor,
    owners: Tensor,
    logit_scale: Tensor,
    *,
    exclude: Optional[Tensor] = None,
    normaliser: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """InfoNCE of each sentence over the volumes of the global batch: the single-process
    definition (the head computes the same from local volumes, `local_volume_alignment_loss`).

    similarity: (M, N) cos(sentence_i, region_i(b)); owners: (M,) the index of each sentence's
    own volume; exclude: (M, N) bool, volumes removed from row i's negatives (never its owner).
    normaliser: divide the summed row losses by this (default M); pass (aligned sentences of
    all ranks) / world_size so the ranks' mean is the global mean.
    Returns (loss, top-1 accuracy of finding the own volume), fp32 scalars.
    """
    logits = at_least_fp32(similarity) * at_least_fp32(logit_scale)  # (M, N)
    if logits.shape[0] == 0:
        return logits.sum() * 0.0, torch.zeros((), device=logits.device)
    if exclude is not None:
        exclude = exclude.clone()
        exclude[torch.arange(len(owners)), owners] = False
        logits = logits.masked_fill(exclude, float("-inf"))
    losses = F.cross_entropy(logits, owners, reduction="none")
    denominator = float(normaliser) if normaliser is not None else float(len(owners))
    accuracy = (logits.detach().argmax(dim=1) == owners).float().mean()
    return losses.sum() / denominator, accuracy


def sentence_normal_flags(batch: dict[str, Any], max_sentences: int) -> Tensor:
    """(B, S) bool: which of batch["sentences"] state absence or normality.

    Derived from batch["caption"] with the loader's own split (`caption_sentences`, first S
    sentences, the whole caption when it splits into none), so flag s is about sentence s of
    batch["sentences"]; batch["sentence_normal"] when the batch carries it. All False when
    neither is there. The shards store no flags: this head is their one owner."""
    if "sentence_normal" in batch:
        return torch.as_tensor(batch["sentence_normal"], dtype=torch.bool)
    captions = batch.get("caption")
    if captions is None:
        return torch.zeros(len(batch.get("sentence_mask", [])), max_sentences, dtype=torch.bool)
    flags = torch.zeros(len(captions), max_sentences, dtype=torch.bool)
    for b, caption in enumerate(captions):
        for s, sentence in enumerate((caption_sentences(caption) or [caption])[:max_sentences]):
            flags[b, s] = is_normal_sentence(sentence)
    return flags


class CtAlignConfig(HeadConfig):
    selection: Literal["topk", "softmax"] = "topk"
    topk: int = Field(4, ge=1, description="patches kept per sentence (selection=topk)")
    select_temperature: float = Field(0.1, gt=0, description="softmax temperature of the pooling weights")
    init_temperature: float = Field(0.07, gt=0)
    max_logit_scale: float = Field(100.0, gt=0, description="upper bound of exp(logit_scale), by `base.bounded`")
    exclude_normal: bool = Field(True, description="mask normal/negated sentences out of the alignment")
    dedup_threshold: Optional[float] = Field(0.98, gt=0, le=1, description="None: keep duplicates as negatives")
    block_size: Optional[int] = Field(
        None, ge=1,
        description="sentences per alignment block (an int always tiles); None: dense up to 1 GiB, else ~256 MiB blocks")


@HEADS.register("ct_align")
class CtAlignHead(Head):
    config_class = CtAlignConfig
    config: CtAlignConfig
    needs = ("image_tokens", "sentence_embed")
    # Sentences only: the patch tokens stay on their rank (see the module docstring).
    gathered_keys = ("sentence_embed",)
    # Alignment pools per sentence; it defines no global image-text geometry for zero-shot.
    scores_embeddings = False

    def __init__(self, config: CtAlignConfig, embed_dim: int) -> None:
        super().__init__(config, embed_dim)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / config.init_temperature)))

    def scale(self) -> Tensor:
        """exp(logit_scale) at most max_logit_scale, [1] fp32, by the heads' bounded-parameter rule
        (`base.bounded`: an overshoot can come back, any ZeRO stage). `forward` calls it once."""
        return bounded(self.logit_scale.float(), high=math.log(self.config.max_logit_scale)).exp()

    def aligned_mask(self, batch: dict[str, Any], shape: tuple[int, int]) -> Tensor:
        """(B, S) bool: real sentences, minus normal ones when `exclude_normal`."""
        if "sentence_mask" not in batch:
            raise ValueError("ct_align needs batch['sentence_mask'] (set data.sentences > 0)")
        mask = torch.as_tensor(batch["sentence_mask"], dtype=torch.bool)
        if tuple(mask.shape) != shape:
            raise ValueError(f"ct_align: sentence_mask {tuple(mask.shape)} does not match sentences {shape}")
        if self.config.exclude_normal:
            mask = mask & ~sentence_normal_flags(batch, shape[1]).to(mask.device)
        return mask

    @classmethod
    def example_inputs(cls, config: CtAlignConfig, batch_size: int, embed_dim: int, generator: torch.Generator):
        """The base example plus batch["sentence_mask"] (B, 3): the first 1-3 sentences are real."""
        encoded, batch = super().example_inputs(config, batch_size, embed_dim, generator)
        sentences = encoded["sentence_embed"].shape[1]
        counts = torch.randint(1, sentences + 1, (batch_size,), generator=generator)
        return encoded, {**batch, "sentence_mask": torch.arange(sentences)[None] < counts[:, None]}

    def forward(self, inputs: HeadInputs) -> dict[str, Any]:
        c = self.config
        logit_scale = self.scale()
        tokens = inputs.local["image_tokens"]  # (B, P, E): this rank's volumes, never gathered
        sentences = inputs.local["sentence_embed"]  # (B, S, E)
        batch, num_sentences = sentences.shape[:2]
        valid = self.aligned_mask(inputs.batch, (batch, num_sentences)).to(tokens.device)  # (B, S)
        # (N, S, E) in rank order; gathered here when the caller (a test, another objective) did not.
        all_sentences = inputs.gathered.get("sentence_embed")
        if all_sentences is None:
            all_sentences = gather_with_grad(sentences)
        all_valid = gather_no_grad(valid.to(torch.uint8)).bool()  # (N, S)
        total_valid = int(all_valid.sum())
        if total_valid == 0:  # no rank has a sentence to align: every rank skips the collectives
            return {"loss": (tokens.sum() + all_sentences.sum()) * 0.0,
                    "logging": {"logit_scale": logit_scale.detach()[0], "accuracy": torch.zeros((), device=tokens.device),
                                "aligned_sentences": 0.0}}

        rows = all_valid.nonzero(as_tuple=False)  # (M, 2): (global volume, sentence), rank order
        queries = F.normalize(at_least_fp32(all_sentences[rows[:, 0], rows[:, 1]]), dim=-1)  # (M, E)
        first = inputs.rank * batch
        owned = (rows[:, 0] >= first) & (rows[:, 0] < first + batch)
        owners = torch.where(owned, rows[:, 0] - first, -1)  # (M,) local volume, -1: another rank's
        exclude = None
        if c.dedup_threshold is not None:
            with torch.no_grad():
                local = F.normalize(at_least_fp32(sentences.detach()), dim=-1)  # (B, S, E)
                same = torch.einsum("me,bse->mbs", queries.detach(), local) >= c.dedup_threshold
                exclude = (same & valid.unsqueeze(0)).any(dim=-1)  # (M, B)
                mine = owned.nonzero(as_tuple=True)[0]
                exclude[mine, owners[mine]] = False
        loss, accuracy = local_volume_alignment_loss(
            tokens, queries, owners, logit_scale, mode=c.selection, k=c.topk, temperature=c.select_temperature,
            exclude=exclude, normaliser=total_valid / inputs.world_size, block_size=c.block_size)
        return {
            "loss": loss,
            "logging": {
                "logit_scale": logit_scale.detach()[0],
                "accuracy": accuracy,
                "aligned_sentences": float(total_valid),
            },
        }
