"""The contract every head follows.

A head is a pure loss function plus a thin `nn.Module` that owns its learnable scalars. The
objective hands every head the same `HeadInputs`: this rank's encoder outputs and, for the keys
the head lists in `gathered_keys`, the features of every rank concatenated in rank order, with
gradient flowing back into this rank's slice. Gathering happens once per step in the objective,
so heads that need negatives from other ranks share one all-gather.

A head returns `{"loss": scalar tensor (fp32), "logging": {name: float or 0-dim tensor}}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vlp.core.config import Strict
from vlp.core.registry import Registry


class HeadConfig(Strict):
    """Fields every head accepts; a head's own config subclasses this."""


    weight: float = 1.0


@dataclass
class HeadInputs:
    """What a head sees in one step.

    local: this rank's tensors, e.g. "image_normed" (B, E), "image_tokens" (B, P, E),
        "text_normed" (B, E), "text_tokens" (B, L, E), "text_mask" (B, L) bool.
    gathered: for each key any head asked for, (world_size * B, ...) in rank order; the slice
        `[rank * B:(rank + 1) * B]` is `local[key]` itself, so gradients reach this rank's encoder.
    batch: the data batch (labels, sentences, masks ...), untouched.
    """

    local: dict[str, torch.Tensor]
    gathered: dict[str, torch.Tensor]
    batch: dict[str, Any]
    rank: int = 0
    world_size: int = 1
    extras: dict[str, Any] = field(default_factory=dict)


class Head(nn.Module):
    """Base class. Subclasses set `config_class`, `gathered_keys` and implement `forward`."""

    config_class: ClassVar[type[HeadConfig]] = HeadConfig
    # Keys of `HeadInputs.local` this head needs gathered across ranks.
    gathered_keys: ClassVar[tuple[str, ...]] = ()
    # Keys of the encoder output this head needs at all ("image_tokens" makes the tower keep them).
    needs: ClassVar[tuple[str, ...]] = ("image_normed", "text_normed")

    def __init__(self, config: HeadConfig, embed_dim: int) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = embed_dim
        self.needs = self.needs_for(config)

    @classmethod
    def needs_for(cls, config: HeadConfig) -> tuple[str, ...]:
        """What a head with this config reads (config validation asks before building the model)."""
        return cls.needs

    def forward(self, inputs: HeadInputs) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    # Zero-shot scoring in this head's geometry. Evaluators use the first head (in config order)
    # whose `scores_embeddings` is True; cosine similarity is the default geometry.
    scores_embeddings: ClassVar[bool] = True

    def prompt_ensemble(self, text_embed: torch.Tensor) -> torch.Tensor:
        """Average prompt embeddings (C, T, E) -> class embeddings (C, E), as CLIP does."""
        mean = torch.nn.functional.normalize(text_embed.float(), dim=-1).mean(dim=1)
        return torch.nn.functional.normalize(mean, dim=-1)

    def pairwise_scores(self, image_embed: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
        """Similarity of every image (N, E) to every text (M, E) -> (N, M); higher is closer.

        Inputs are raw tower outputs ("image_embed" / "text_embed" or class embeddings)."""
        image = torch.nn.functional.normalize(image_embed.float(), dim=-1)
        text = torch.nn.functional.normalize(text_embed.float(), dim=-1)
        return image @ text.T

    def no_weight_decay(self) -> set[str]:
        """Names of own parameters (relative to this module) excluded from weight decay.

        Every parameter of a head is a learnable scalar (temperature, bias, curvature...), so the
        default excludes all of them.
        """
        return {name for name, _ in self.named_parameters()}


HEADS: Registry[type[Head]] = Registry("head")
