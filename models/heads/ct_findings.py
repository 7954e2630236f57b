"""Finding-level global alignment for CT reports: the pooled volume against single sentences.

Zero-shot CT classification (CT-CLIP's protocol, `vlp eval ct`) compares the pooled volume with
one-finding sentences ("nodule is present." / "nodule is not present."), but `ct_contrastive`
only ever pairs the volume with its whole report, in which a present finding and a negated one
("No nodule is seen.") differ by a word among seventy. This head pairs the pooled volume with
every report sentence of the global batch, negated and normal ones included, in a sigmoid loss
(SigLIP's, multi-positive as FLAIR's): sentence j is a positive for volume i when volume i's
report holds it (or the same sentence: "No cyst is seen." in five reports is a positive for
all five), and a negative otherwise. "Same sentence"
means the same token ids (batch["sentences"]), never a learned similarity: a threshold on the
embeddings being trained feeds back (more positives pull the sentences together, which makes
more positives) and collapsed every sentence onto one point in a first version.

A finding a report leaves unmentioned is a negative for that volume even when true (the
ct-lesions reports mention only some absent kinds); the loss still ranks "No cyst is seen."
above it for cyst-free volumes, which is what the zero-shot softmax needs.

Needs `image_normed` (B, E) and `sentence_embed` (B, S, E) with batch["sentence_mask"] (B, S)
(`data.sentences` > 0). Sentences are gathered across ranks with gradient; each rank sums its
own volumes' rows and divides by its batch, as the `flair` head's multi-positive loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from models.distributed import gather_no_grad, gather_with_grad
from models.heads.base import HEADS, Head, HeadConfig, HeadInputs


def findings_loss(
    volumes: Tensor, sentences: Tensor, token_ids: Tensor, owners: Tensor, rank_offset: int,
    logit_scale: Tensor, logit_bias: Tensor,
) -> tuple[Tensor, Tensor]:
    """Multi-positive sigmoid loss of volumes against report sentences.

    volumes: (B, E) L2-normalised, this rank's; sentences: (M, E) L2-normalised, every rank's
    real sentences; token_ids: (M, L) their token ids (equal rows = the same sentence); owners:
    (M,) global index of each sentence's volume; rank_offset: global index of this rank's first
    volume. Returns (loss summed over rows / B, positives per row), fp32.
    """
    volumes, sentences = volumes.float(), sentences.float()
    logits = logit_scale * volumes @ sentences.T + logit_bias  # (B, M)
    with torch.no_grad():
        local = torch.arange(volumes.shape[0], device=volumes.device) + rank_offset
        same_text = (token_ids.unsqueeze(1) == token_ids.unsqueeze(0)).all(-1)  # (M, M)
        own = owners.unsqueeze(0) == local.unsqueeze(1)  # (B, M): sentence m is in volume b's report
        positive = (own.float() @ same_text.float()) > 0  # (B, M): b's report holds a duplicate of m
    signs = positive.float() * 2 - 1
    loss = -F.logsigmoid(signs * logits).sum() / max(volumes.shape[0], 1)
    return loss, positive.float().sum(1).mean()


class CtFindingsConfig(HeadConfig):
    init_logit_scale: float = Field(math.log(10.0), description="log of the initial scale (SigLIP)")
    # SigLIP starts at -10 for one positive among 32k; a report shares its normal sentences with many
    # others (about 25 positives among 144 sentences on ct-lesions), so start nearer that prior.
    init_logit_bias: float = -2.0
    max_logit_scale: float = Field(100.0, gt=0)


@HEADS.register("ct_findings")
class CtFindingsHead(Head):
    config_class = CtFindingsConfig
    config: CtFindingsConfig
    needs = ("image_normed", "sentence_embed")
    scores_embeddings = False  # trains the global cosine geometry `ct_contrastive` scores in

    def __init__(self, config: CtFindingsConfig, embed_dim: int) -> None:
        super().__init__(config, embed_dim)
        self.logit_scale = nn.Parameter(torch.full((1,), float(config.init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.full((1,), float(config.init_logit_bias)))

    def no_weight_decay(self) -> set[str]:
        return {"logit_scale", "logit_bias"}

    def forward(self, inputs: HeadInputs) -> dict[str, Any]:
        if "sentence_mask" not in inputs.batch or "sentences" not in inputs.batch:
            raise ValueError("ct_findings needs batch['sentences'] and batch['sentence_mask'] (set data.sentences > 0)")
        volumes = inputs.local["image_normed"]  # (B, E)
        sentences = F.normalize(inputs.local["sentence_embed"].float(), dim=-1)  # (B, S, E)
        batch, num = sentences.shape[:2]
        mask = torch.as_tensor(inputs.batch["sentence_mask"], dtype=torch.bool, device=volumes.device)
        if tuple(mask.shape) != (batch, num):
            raise ValueError(f"ct_findings: sentence_mask {tuple(mask.shape)} does not match sentences {(batch, num)}")
        all_sentences = gather_with_grad(sentences)  # (N, S, E)
        all_mask = gather_no_grad(mask.to(torch.uint8)).bool()  # (N, S)
        all_ids = gather_no_grad(torch.as_tensor(inputs.batch["sentences"], device=volumes.device))  # (N, S, L)
        rows = all_mask.nonzero(as_tuple=False)  # (M, 2): (global volume, sentence)
        scale = self.logit_scale.float().clamp(max=math.log(self.config.max_logit_scale)).exp()
        loss, positives = findings_loss(
            volumes, all_sentences[rows[:, 0], rows[:, 1]], all_ids[rows[:, 0], rows[:, 1]], rows[:, 0],
            inputs.rank * batch, scale, self.logit_bias.float(),
        )
        return {"loss": loss, "logging": {"logit_scale": scale.detach()[0], "logit_bias": self.logit_bias.detach()[0],
                                          "positives_per_volume": positives}}
