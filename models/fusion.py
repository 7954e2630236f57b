"""Cross-granularity fusion (after SimCroP): one representation of a (volume, report) pair that
joins the instance level (the whole volume against the whole report) with the word-patch level
(each report token attending over the volume's patches).

`CrossGranularityFusion` works in one width D (the masked report head's `decoder_dim`; callers
project tower outputs to it). For report tokens T (B, L, D) with mask M (B, L), patch tokens
V (B, P, D) and the volume's global embedding g (B, D):

1. word-patch: `local = MultiheadAttention(query=LN(T), key=value=LN(V))` (B, L, D), with the
   attention map A (B, L, P) (averaged over heads): which patches each word reads;
2. instance: the report's global embedding r = masked mean of T over M (B, D) and the match
   m = cos(g, r) (B,); a learned affine of m through a sigmoid gates how much of the projected
   volume embedding W g each token receives: a report that matches its volume as a whole leans
   on the whole volume, one that does not leans on its words' patches;
3. fused = T + local + gate(m) * W g (B, L, D); pooled = the masked mean of the fused tokens
   (B, D), the pair's single vector. No MLP of its own: the masked report head runs its decoder
   layers (self-attention + MLP) on the fused tokens, and the budget of a SimCroP step is tight
   (a 1.6x ceiling over the ct_lesions step, benchmarks/masked_volume_step.py).

The report side is whatever tokens the caller gives: the masked report head gives the tokens of
the MASKED report, so neither r nor m carries a masked word (the unmasked report embedding would
tell the decoder which findings the report names). For a downstream user it is the whole report.

Cost per pair, with L tokens, P patches and width D: the attention's projections 2 L D^2 + 2 P D^2
multiply-adds (queries and output on L tokens, keys and values on P), its scores and weighted sum
2 L P D, the instance terms D^2 + 4 D. At the ct_simcrop size (L = 94 positions, the longest
report, P = 16 visible patches, D = 32) that is about 0.35 M multiply-adds forward, against about
38 M for one volume's full encoder pass (64 patches, 4 layers, width 128).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class FusionOutput:
    """tokens (B, L, D) fused per report token; pooled (B, D) their masked mean; match (B,) the
    instance-level cosine of volume and report; gate (B,) how much of the volume embedding each
    token received; attention (B, L, P) each token's weights over the patches (mean over heads)."""

    tokens: Tensor
    pooled: Tensor
    match: Tensor
    gate: Tensor
    attention: Tensor


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean of tokens (B, L, D) over the positions where mask (B, L) is True -> (B, D); a row
    without any True position gives zeros."""
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)


class CrossGranularityFusion(nn.Module):
    """(report tokens, their mask, patch tokens, volume embedding) -> `FusionOutput`; see the module docstring."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.text_norm = nn.LayerNorm(dim)
        self.patch_norm = nn.LayerNorm(dim)
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.instance = nn.Linear(dim, dim)
        # gate = sigmoid(gate_scale * match + gate_bias): starts at sigmoid(0) = 1/2 for every pair.
        self.gate_scale = nn.Parameter(torch.ones(1))
        self.gate_bias = nn.Parameter(torch.zeros(1))

    def forward(self, text_tokens: Tensor, text_mask: Tensor, patch_tokens: Tensor, volume_embed: Tensor) -> FusionOutput:
        """text_tokens (B, L, D), text_mask (B, L) bool (True: a real token), patch_tokens (B, P, D),
        volume_embed (B, D) -> FusionOutput."""
        text_mask = text_mask.to(torch.bool)
        local, attention = self.cross(self.text_norm(text_tokens), self.patch_norm(patch_tokens),
                                      self.patch_norm(patch_tokens), need_weights=True, average_attn_weights=True)
        report = masked_mean(text_tokens, text_mask)  # (B, D)
        match = F.cosine_similarity(volume_embed.float(), report.float(), dim=-1)  # (B,)
        gate = torch.sigmoid(self.gate_scale * match + self.gate_bias)  # (B,)
        instance = self.instance(volume_embed)  # (B, D)
        fused = text_tokens + local + gate.to(text_tokens.dtype)[:, None, None] * instance[:, None, :]  # (B, L, D)
        return FusionOutput(tokens=fused, pooled=masked_mean(fused, text_mask), match=match, gate=gate,
                            attention=attention)
