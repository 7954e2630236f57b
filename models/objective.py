"""One objective: the weighted sum of any mix of registered heads.

The trainer calls `Objective(encoded, batch)` and gets `{"loss", "logging"}` whatever heads run,
so it never branches on model type. Features are L2-normalised and gathered across ranks here,
once per step, and every head reuses them.

Cached accumulation (`train.accumulate: contrastive`, `vlp.train.grad_cache`) runs the same
forward in three roles, told apart by a `CachedPass` the driver puts into the batch under
`CACHED_PASS`, so every call still goes through the engine's forward (ZeRO-3's hooks and
micro-step count): `Capture` returns the pooled features instead of a loss, `WholeBatch` scores
this micro-batch's features together with the cached rest of the accumulated batch, and
`Replay` returns the surrogate whose gradient is the whole-batch loss's for this micro-batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from vlp.core.collectives import gather_with_grad, world
from vlp.models.heads.base import HEADS, HeadConfig, HeadInputs

# Derived features the objective can build from the encoder outputs on demand.
_NORMED = {"image_normed": "image_embed", "text_normed": "text_embed"}

# What cached accumulation can hold for the whole accumulated batch: pooled embeddings, one (E,)
# or (K, E) group per sample. Token maps ("image_tokens" (B, P, E), "text_tokens", masks, the
# masked pass) would cost P times as much per sample, so heads that read them are refused.
POOLED_KEYS = frozenset(_NORMED) | {"image_embed", "text_embed", "sub_text_embed", "sentence_embed",
                                    "parent_text_embed"}

# The batch key under which the cached-accumulation driver tells the objective its role.
CACHED_PASS = "cached_pass"


def beyond_pooled(heads: dict[str, HeadConfig]) -> dict[str, list[str]]:
    """{head name: the keys it reads that are not pooled embeddings}, for heads that read any;
    empty when cached accumulation can train every head (config validation asks)."""
    found = {}
    for name, config in heads.items():
        head_class = HEADS.get(name)
        reads = set(head_class.needs_for(config)) | set(head_class.gathered_keys)
        if reads - POOLED_KEYS:
            found[name] = sorted(reads - POOLED_KEYS)
    return found


@dataclass
class Capture:
    """Pass 1 (under no_grad): return {"features": {key: (B, ...) detached}}, no loss."""


@dataclass
class WholeBatch:
    """The step's one loss: this micro-batch's fresh features (rows first) followed by `rest`,
    the cached features of the other micro-batches ({key: (R, ...)} leaves that require grad,
    in micro-batch order), scored as one batch; `batch` is the whole accumulated data batch."""

    rest: dict[str, torch.Tensor]
    batch: Mapping[str, Any]


@dataclass
class Replay:
    """Pass 2: `grads` {key: (B, ...) fp32} is d(whole-batch loss)/d(this micro-batch's
    features); the returned loss sum <features, grads> back-propagates exactly that."""

    grads: dict[str, torch.Tensor]


CachedPass = Union[Capture, WholeBatch, Replay]


class ConcatenatedBatch(Mapping):
    """The data batches of several micro-batches read as one: each key's values are
    concatenated (tensors along dim 0, lists joined) on first access only, so a head that reads
    nothing from the batch costs no copy of the accumulated images."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches = batches
        self.joined: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key not in self.joined:
            values = [batch[key] for batch in self.batches]
            if torch.is_tensor(values[0]):
                self.joined[key] = torch.cat(values)
            elif isinstance(values[0], (list, tuple)):
                self.joined[key] = [value for part in values for value in part]
            else:  # anything else per micro-batch, in order
                self.joined[key] = values
        return self.joined[key]

    def __iter__(self) -> Iterator[str]:
        return (key for key in self.batches[0] if key != CACHED_PASS)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class Objective(nn.Module):
    def __init__(self, heads: dict[str, HeadConfig], embed_dim: int) -> None:
        super().__init__()
        if not heads:
            raise ValueError("model.heads: at least one head is required")
        self.heads = nn.ModuleDict({name: HEADS.get(name)(cfg, embed_dim) for name, cfg in heads.items()})
        self.weights = {name: float(cfg.weight) for name, cfg in heads.items()}
        self.needs = sorted({key for head in self.heads.values() for key in head.needs})
        self.gathered_keys = sorted({key for head in self.heads.values() for key in head.gathered_keys})
        # The encoder outputs the loss is computed from (the normalised ones are derived here).
        self.cached_keys = sorted({_NORMED.get(key, key) for key in (*self.needs, *self.gathered_keys)})

    def forward(self, encoded: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        role = batch.get(CACHED_PASS)
        if role is None:
            return self.loss(encoded, batch)
        features = {key: encoded[key] for key in self.cached_keys}
        if isinstance(role, Capture):
            return {"features": {key: value.detach() for key, value in features.items()}}
        if isinstance(role, WholeBatch):
            whole = {key: torch.cat([value, role.rest[key]]) for key, value in features.items()}  # (k * B, ...)
            return self.loss(whole, role.batch)
        surrogate = sum((features[key].float() * role.grads[key]).sum() for key in self.cached_keys)
        return {"loss": surrogate, "logging": {}}

    def loss(self, encoded: dict[str, torch.Tensor], batch: Mapping[str, Any]) -> dict[str, Any]:
        """The weighted heads on `encoded` (this rank's rows), gathered across ranks once."""
        local = dict(encoded)
        for derived, source in _NORMED.items():
            if derived in self.needs or derived in self.gathered_keys:
                local[derived] = F.normalize(local[source].float(), dim=-1)
        rank, world_size = world()
        gathered = {key: gather_with_grad(local[key]) for key in self.gathered_keys}
        inputs = HeadInputs(local=local, gathered=gathered, batch=batch, rank=rank, world_size=world_size)

        total = torch.zeros((), device=next(iter(local.values())).device, dtype=torch.float32)
        logging: dict[str, Any] = {}
        for name, head in self.heads.items():
            out = head(inputs)
            loss = out["loss"].float()
            total = total + self.weights[name] * loss
            logging[f"loss/{name}"] = loss.detach()
            for key, value in out.get("logging", {}).items():
                logging[f"{name}/{key}"] = value.detach() if torch.is_tensor(value) else value
        logging["loss/total"] = total.detach()
        return {"loss": total, "logging": logging}
