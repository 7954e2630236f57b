"""Masked report modelling conditioned on the volume (SimCroP's masked report half), through the
cross-granularity fusion (`models/fusion.py`).

A share (`mask_ratio`) of each report's word tokens is masked; a small decoder predicts them from
the report's visible tokens and the volume: the report positions (visible token or a learned mask
embedding, plus fixed 1-D sin-cos positions) go through `CrossGranularityFusion` with the volume's
patch tokens and global embedding, then `decoder_layers` pre-norm transformer layers over the
report, then a linear layer to token ids. Cross-entropy on the masked positions only. The loss
reaches the volume tower through the fusion's word-to-patch attention and its instance gate: the
words the report hides can often be read only off the volume ("A small <calcification> in the
<right> anterior ...").

Where the visible tokens come from (`text_input`):
* "embeddings" (default): the decoder embeds the visible token ids itself (a table of
  vocab_size x decoder_dim). No text-tower pass is added, which keeps a step within the SimCroP
  budget with a frozen MiniLM (a second MiniLM pass over 24 masked reports costs more than the
  whole ct_lesions step on CPU), and no text tower is trained by this head.
* "tower": the text tower's outputs for the MASKED report ("masked_text_tokens" (B, L, E), the
  masked positions replaced by `pad_id`, which an HF tower leaves out of attention), so a
  trainable tower learns from the masked words too. The model must run that pass: it asks this
  head `masked_text(batch)` for the ids (the hook is in `models/dual_encoder.py`).
Never the tokens of the unmasked report: a bidirectional encoder's visible tokens already hold the
masked words, and the decoder would read them off instead of the volume.

Which patch tokens (`volume_tokens`): "visible" uses the masked volume pass's tokens
("visible_image_tokens", B x K) when a masking head (`masked_volume`) runs one, as in joint
masked modelling, and the full pass's otherwise; "full" always the full pass's ("image_tokens").

Which tokens can be masked: the real tokens of batch["text"] (id != pad_id) except each row's
first and last (BERT's [CLS] / [SEP], open_clip's start / end of text); round(mask_ratio * n) of
the n of a row, at least 1. The masked set is a function of (mask_seed, mask_step, the sample's
key, its token ids) only, as `masked_volume`'s: the same on any number of ranks and in any batch
position, and both buffers are in the state dict, so a resumed run draws the uninterrupted run's
masks. A caller may pass its own masks as batch["masked_report"] (B, L) bool (tests do).

Vocabulary of the softmax (`vocabulary`): "full" scores every id of the tokenizer (30522 for
MiniLM: about 1 M multiply-adds per masked token at decoder_dim 32); "batch" scores only the ids
that occur in the global batch's reports (the union over ranks, so the loss does not depend on
the world size), a sampled softmax whose negatives are the batch's own words: the loss then asks
"which of the words these reports use", which is what ties a masked finding to the volume.

Distributed: each rank's loss is its summed cross-entropy over the global masked count / world,
so the ranks' mean is the global-batch mean (tests/test_registries.py checks it on 2 gloo ranks).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from vlp.core.collectives import all_reduce_max, all_reduce_sum
from vlp.core.errors import ConfigError
from vlp.data_pipelines.seeds import stable_seed
from vlp.models.fusion import CrossGranularityFusion, FusionOutput
from vlp.models.heads.base import HEADS, Head, HeadConfig, HeadInputs


def sincos_1d(length: int, dim: int) -> Tensor:
    """Fixed 1-D sin-cos position embeddings (length, dim), as a transformer's original ones."""
    half = math.ceil(dim / 2)
    freqs = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / max(half, 1)))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * freqs  # (length, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)[:, :dim]


def maskable_positions(real: Tensor) -> Tensor:
    """(B, L) bool: the real tokens (True in `real`) minus each row's first and last real token
    (the tokenizer's start and end markers), which are never masked."""
    positions = torch.arange(real.shape[1], device=real.device).expand_as(real)
    first = torch.where(real, positions, real.shape[1]).min(dim=1, keepdim=True).values
    last = torch.where(real, positions, -1).max(dim=1, keepdim=True).values
    return real & (positions > first) & (positions < last)


def row_key(key: Optional[str], ids: Tensor) -> str:
    """The sample's key, or its token ids where the batch carries no keys: either way a function
    of the sample alone, not of its place in the batch."""
    return key if key is not None else ",".join(map(str, ids.tolist()))


def keyed_token_masks(keys: Sequence[str], maskable: Tensor, seed: int, step: int, ratio: float) -> Tensor:
    """The masked tokens of each report: (B, L) bool, True at round(ratio * n) (at least 1) of the
    n maskable positions of row b (none where n = 0).

    Row b is a function of (seed, step, keys[b], maskable[b]) only: one generator per sample,
    never a global RNG, so it does not depend on the rank or the batch the sample sits in."""
    masked = torch.zeros_like(maskable, dtype=torch.bool)
    for row, key in enumerate(keys):
        candidates = maskable[row].nonzero(as_tuple=True)[0]  # (n,)
        if len(candidates) == 0:
            continue
        count = min(max(1, round(ratio * len(candidates))), len(candidates))
        generator = torch.Generator().manual_seed(stable_seed("masked_report", seed, step, key))
        order = torch.rand(len(candidates), generator=generator).argsort()  # (n,)
        masked[row, candidates[order[:count]].to(masked.device)] = True
    return masked


def masked_token_loss(logits: Tensor, targets: Tensor, normaliser: float) -> Tensor:
    """Summed cross-entropy of the masked tokens / normaliser, fp32.

    logits: (N, V) scores of the N masked tokens over V candidate ids; targets: (N,) their index
    among the candidates. Unmasked tokens never reach this function, so they carry no loss."""
    return F.cross_entropy(logits.float(), targets, reduction="sum") / normaliser


class MaskedReportConfig(HeadConfig):
    mask_ratio: float = Field(0.5, gt=0, lt=1, description="share of each report's maskable tokens masked")
    vocab_size: int = Field(30522, ge=2, description="the text tower tokenizer's vocabulary (MiniLM / BERT: 30522)")
    pad_id: int = Field(0, ge=0, description="the tokenizer's padding id (MiniLM and open_clip: 0)")
    decoder_dim: int = Field(64, ge=8)
    decoder_layers: int = Field(1, ge=1)
    decoder_heads: int = Field(4, ge=1)
    text_input: Literal["embeddings", "tower"] = "embeddings"
    volume_tokens: Literal["visible", "full"] = "visible"
    vocabulary: Literal["batch", "full"] = "batch"


@HEADS.register("masked_report")
class MaskedReportHead(Head):
    config_class = MaskedReportConfig
    config: MaskedReportConfig
    scores_embeddings = False
    example_config = {"vocab_size": 40, "decoder_dim": 8, "decoder_heads": 2}

    @classmethod
    def needs_for(cls, config: MaskedReportConfig) -> tuple[str, ...]:
        # The instance level reads the global volume embedding (full pass); the patch tokens come
        # from the full pass too unless a masking head adds the visible ones (then both run).
        needs = ("image_embed", "image_tokens")
        if config.text_input == "tower":
            needs += ("masked_text_tokens",)
        return needs

    def __init__(self, config: MaskedReportConfig, embed_dim: int) -> None:
        super().__init__(config, embed_dim)
        dim = config.decoder_dim
        if dim % config.decoder_heads:
            raise ConfigError(f"model.heads.masked_report: decoder_dim={dim} is not a multiple of decoder_heads")
        if config.pad_id >= config.vocab_size:
            raise ConfigError(f"model.heads.masked_report: pad_id={config.pad_id} is not below vocab_size={config.vocab_size}")
        if config.text_input == "embeddings":
            self.token_embed = nn.Embedding(config.vocab_size, dim)
            nn.init.normal_(self.token_embed.weight, std=0.02)
        else:
            self.text_proj = nn.Linear(embed_dim, dim)
        self.patch_proj = nn.Linear(embed_dim, dim)
        self.volume_proj = nn.Linear(embed_dim, dim)
        self.mask_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_embedding, std=0.02)
        self.fusion = CrossGranularityFusion(dim, config.decoder_heads)
        layer = nn.TransformerEncoderLayer(dim, config.decoder_heads, 4 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.decoder = nn.TransformerEncoder(layer, config.decoder_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.predict = nn.Linear(dim, config.vocab_size)
        # Persistent, so checkpoints carry them: resume continues the same mask sequence.
        self.register_buffer("mask_seed", torch.randint(0, 2**62, (), dtype=torch.long))
        self.register_buffer("mask_step", torch.zeros((), dtype=torch.long))

    def no_weight_decay(self) -> set[str]:
        names = {"mask_embedding", "fusion.gate_scale", "fusion.gate_bias"}
        return names | ({"token_embed.weight"} if self.config.text_input == "embeddings" else set())

    # -- masks -------------------------------------------------------------------------------
    def token_masks(self, batch: dict[str, Any]) -> Tensor:
        """(B, L) bool, True at the masked tokens of batch["text"]: batch["masked_report"] when the
        caller drew them, else this step's keyed draw. Does not advance the step."""
        ids = batch["text"]
        if "masked_report" in batch:
            masked = torch.as_tensor(batch["masked_report"], dtype=torch.bool)
            if tuple(masked.shape) != tuple(ids.shape):
                raise ValueError(f"masked_report: batch['masked_report'] {tuple(masked.shape)} does not match "
                                 f"batch['text'] {tuple(ids.shape)}")
            return masked.to(ids.device) & (ids != self.config.pad_id)
        keys = batch.get("key") or [None] * ids.shape[0]
        keys = [row_key(key, row) for key, row in zip(keys, ids.cpu())]
        maskable = maskable_positions(ids.cpu() != self.config.pad_id)
        masked = keyed_token_masks(keys, maskable, int(self.mask_seed), int(self.mask_step), self.config.mask_ratio)
        return masked.to(ids.device)

    def masked_text(self, batch: dict[str, Any]) -> Tensor:
        """The token ids the text tower encodes for `text_input: tower`: batch["text"] (B, L) with
        this step's masked tokens replaced by `pad_id` (B, L)."""
        return batch["text"].masked_fill(self.token_masks(batch), self.config.pad_id)

    # -- the fused pair ----------------------------------------------------------------------
    def fuse(self, image_embed: Tensor, patch_tokens: Tensor, token_ids: Tensor,
             text_tokens: Optional[Tensor] = None, masked: Optional[Tensor] = None) -> tuple[FusionOutput, Tensor]:
        """The fused (volume, report) representation, at decoder_dim D.

        image_embed (B, E) the volume's global embedding; patch_tokens (B, P, E) its patch tokens
        (all, or the visible ones); token_ids (B, L) the report; text_tokens (B, L, E) the text
        tower's tokens (`text_input: tower` only); masked (B, L) bool, positions shown as the mask
        embedding (None: none, the whole report, as a downstream user gives it).
        Returns (FusionOutput, decoder states (B, L, D) after the decoder layers and final norm)."""
        real = token_ids != self.config.pad_id  # (B, L)
        masked = torch.zeros_like(real) if masked is None else masked
        if self.config.text_input == "embeddings":
            vocab = self.config.vocab_size
            if int(token_ids.max()) >= vocab:
                raise ConfigError(f"model.heads.masked_report.vocab_size={vocab}, but the text holds id "
                                  f"{int(token_ids.max())}: set it to the text tower tokenizer's vocabulary size")
            words = self.token_embed(token_ids.masked_fill(masked, self.config.pad_id))  # (B, L, D)
        else:
            if text_tokens is None:
                raise ValueError("masked_report (text_input: tower) needs the text tower's tokens of the masked report")
            words = self.text_proj(text_tokens)  # (B, L, D)
        words = torch.where(masked.unsqueeze(-1), self.mask_embedding.to(words.dtype), words)
        words = words + sincos_1d(words.shape[1], words.shape[2]).to(words.device, words.dtype)
        fusion = self.fusion(words, real & ~masked, self.patch_proj(patch_tokens), self.volume_proj(image_embed))
        # A row without any real token would mask every key (NaN): it attends to all positions instead.
        padding = ~real & real.any(dim=1, keepdim=True)
        states = self.norm(self.decoder(fusion.tokens, src_key_padding_mask=padding))
        return fusion, states

    # -- training ----------------------------------------------------------------------------
    @classmethod
    def example_inputs(cls, config: MaskedReportConfig, batch_size: int, embed_dim: int, generator: torch.Generator):
        """The base example plus batch["text"] (B, 6) ids below vocab_size (start id, 2-4 words,
        end id, padding) and batch["masked_report"], 1-2 of each row's words."""
        encoded, batch = super().example_inputs(config, batch_size, embed_dim, generator)
        length = 6
        words = torch.randint(1, 4, (batch_size,), generator=generator)  # words per row
        ids = torch.randint(3, config.vocab_size, (batch_size, length), generator=generator)
        ids[:, 0] = 1
        positions = torch.arange(length)[None]
        ids = torch.where(positions == words[:, None] + 1, 2, ids)
        ids = torch.where(positions > words[:, None] + 1, config.pad_id, ids)
        maskable = (positions >= 1) & (positions <= words[:, None])
        scores = torch.rand(batch_size, length, generator=generator).masked_fill(~maskable, 2.0)
        masked = scores <= scores.min(dim=1, keepdim=True).values  # one word per row at least
        masked |= maskable & (scores < 0.3)
        if config.text_input == "tower":
            encoded["masked_text_tokens"] = torch.randn(batch_size, length, embed_dim, generator=generator)
        return encoded, {**batch, "text": ids, "masked_report": masked}

    def forward(self, inputs: HeadInputs) -> dict[str, Any]:
        c = self.config
        batch = inputs.batch
        ids = batch["text"]
        drawn_here = "masked_report" not in batch
        masked = self.token_masks(batch)  # (B, L)
        if drawn_here and self.training:
            self.mask_step += 1
        # Columns that are padding in every row carry nothing: cut them (the decoder's cost is per column).
        real = ids != c.pad_id
        used = int(real.any(0).nonzero().max()) + 1 if bool(real.any()) else 1
        ids, masked = ids[:, :used], masked[:, :used]
        volume = inputs.local["image_embed"]  # (B, E)
        patches = inputs.local.get("visible_image_tokens") if c.volume_tokens == "visible" else None
        if patches is None:
            patches = inputs.local["image_tokens"]  # (B, P, E)
        text_tokens = None
        if c.text_input == "tower":
            if "masked_text_tokens" not in inputs.local:
                raise ConfigError("model.heads.masked_report.text_input=tower: the model ran no masked text pass "
                                  "(masked_text_tokens); use text_input: embeddings")
            text_tokens = inputs.local["masked_text_tokens"][:, :used]
        fusion, states = self.fuse(volume, patches, ids, text_tokens, masked)

        targets = ids[masked]  # (N,)
        count = torch.tensor([float(len(targets))], device=ids.device)
        total = float(all_reduce_sum(count)[0])
        hidden = states[masked]  # (N, D)
        if c.vocabulary == "batch":
            present = torch.zeros(c.vocab_size, dtype=torch.long, device=ids.device)
            present[ids[ids != c.pad_id]] = 1
            candidates = all_reduce_max(present).nonzero(as_tuple=True)[0]  # (U,) sorted, the same on every rank
            logits = F.linear(hidden, self.predict.weight[candidates], self.predict.bias[candidates])  # (N, U)
            targets = torch.searchsorted(candidates, targets)
        else:
            logits = self.predict(hidden)  # (N, V)
        if total == 0:  # no rank has a token to predict (every report empty): a zero that keeps the graph
            loss = states.sum() * 0.0
            accuracy = torch.zeros((), device=ids.device)
        else:
            loss = masked_token_loss(logits, targets, total / inputs.world_size) + 0.0 * states.sum()
            accuracy = (logits.detach().argmax(dim=-1) == targets).float().mean() if len(targets) else \
                torch.zeros((), device=ids.device)
        return {"loss": loss, "logging": {"accuracy": accuracy, "masked_tokens": count[0],
                                          "match": fusion.match.detach().mean(), "gate": fusion.gate.detach().mean()}}
