"""The contract every head follows.

A head is a pure loss function plus a thin `nn.Module` that owns its learnable scalars. The
objective hands every head the same `HeadInputs`: this rank's encoder outputs and, for the keys
the head lists in `gathered_keys`, the features of every rank concatenated in rank order, with
gradient flowing back into this rank's slice. Gathering happens once per step in the objective,
so heads that need negatives from other ranks share one all-gather.

A head returns `{"loss": scalar tensor (fp32), "logging": {name: float or 0-dim tensor}}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from vlp.core.config import Strict
from vlp.core.errors import ConfigError
from vlp.core.registry import Registry


class _Bounded(torch.autograd.Function):
    """clamp(value, low, high) forward; backward passes the gradient except where it would push
    an out-of-range value further out."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, low: float, high: float) -> torch.Tensor:
        ctx.save_for_backward(value)
        ctx.low, ctx.high = low, high
        return value.clamp(min=low, max=high)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (value,) = ctx.saved_tensors
        # Gradient descent moves the value by -grad: above `high` only a positive grad moves it
        # back down, below `low` only a negative one moves it back up. Inside the range (the
        # bound included) the gradient is the plain one.
        outward = ((value > ctx.high) & (grad < 0)) | ((value < ctx.low) & (grad > 0))
        return torch.where(outward, torch.zeros_like(grad), grad), None, None


def bounded(value: torch.Tensor, low: float = -math.inf, high: float = math.inf) -> torch.Tensor:
    """The bounded-parameter rule for every learnable scalar of every head (logit scale, bias,
    curvature, MERU's alphas): `value` clamped to [low, high] in forward, with a gradient that
    lets a parameter come back from outside its range.

    Why not the alternatives: a plain `clamp` in forward has exactly zero gradient past the
    bound, so a parameter that overshoots (Adam momentum) never returns; open_clip clamps the
    parameter in place after each step, but ZeRO 2/3 write their fp32 master copy back over
    in-place edits at the next step. Here the effective value never leaves the range, outward
    gradients are dropped, and an inward gradient moves the parameter back, whatever the ZeRO
    stage (tests/test_bounded.py).

    Call it ONCE per forward per parameter and reuse the result for every use: the gate then
    judges the summed gradient of all uses. Calling it per use gates each use's gradient on its
    own, and the sum of the gated parts can point back inside when the true total points out.
    (Micro-batches and ranks are still gated one by one; a wrong-signed step there only moves an
    out-of-range parameter toward its bound, where the value used was anyway.)

    value: a tensor of any shape (heads use [1]); low, high: floats, -inf / inf for one-sided.
    """
    return _Bounded.apply(value, low, high)


class MatryoshkaConfig(Strict):
    """Matryoshka Representation Learning (Kusupati et al. 2022): the head's loss on nested
    prefixes of the embedding, `sum_k weights[k] * loss(prefix of dims[k], re-normalised)`.

    dims: strictly increasing prefix sizes, the largest at most `model.embed_dim` (say
    [16, 32, 64, 128] of 128; leave the full size out to train the prefixes only).
    weights: one per dim; None: 1 each (MRL's uniform weighting)."""

    dims: list[int] = Field(min_length=1)
    weights: Optional[list[float]] = None

    @model_validator(mode="after")
    def _nested(self) -> "MatryoshkaConfig":
        if any(dim < 1 for dim in self.dims) or any(b <= a for a, b in zip(self.dims, self.dims[1:])):
            raise ValueError(f"matryoshka.dims {self.dims}: needs strictly increasing sizes >= 1")
        if self.weights is not None:
            if len(self.weights) != len(self.dims):
                raise ValueError(f"matryoshka.weights: {len(self.weights)} weights for {len(self.dims)} dims")
            if any(weight < 0 for weight in self.weights) or not any(self.weights):
                raise ValueError(f"matryoshka.weights {self.weights}: need >= 0, not all 0")
        return self

    def pairs(self) -> list[tuple[int, float]]:
        """[(dim, weight)] in dims order."""
        return list(zip(self.dims, self.weights or [1.0] * len(self.dims)))


def prefix_normed(features: Optional[torch.Tensor], dim: int) -> Optional[torch.Tensor]:
    """The first `dim` features (..., E) re-normalised to unit length -> (..., dim), fp32 (None stays None).

    The same whether `features` were normalised at full width or not (normalising is scale-free)."""
    if features is None:
        return None
    return torch.nn.functional.normalize(features[..., :dim].float(), dim=-1)


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

    # -- capabilities: what evaluators and exporters may ask of a head -----------------------
    # Each is off by default; a head that has one sets the flag and implements its methods, so a
    # consumer asks `head.grounds` (say) and never which head it holds.

    # Token scoring: `pairwise_scores` also takes `image_tokens=` (N, P, E) and then scores every
    # pair text-conditioned, and `pair_scores` re-scores listed pairs (retrieval re-ranking).
    scores_with_tokens: ClassVar[bool] = False

    def pair_scores(
        self, image_tokens: torch.Tensor, text_embed: torch.Tensor, image_index: torch.Tensor,
        text_index: torch.Tensor, *, image_embed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token-conditioned score of listed pairs: images (N, P, E), texts (M, E), indices (Q,) -> (Q,)."""
        raise NotImplementedError(f"{type(self).__name__} does not score with tokens")

    # Grounding: the head can place a sentence on its image's patches (`vlp eval grounding`).
    grounds: ClassVar[bool] = False

    def patch_map(self, image: dict[str, torch.Tensor], text: dict[str, torch.Tensor]) -> torch.Tensor:
        """(Q, P) map of each of Q sentences over its own image's patches; higher is more likely.

        image: "image_embed" (Q, E) and "image_tokens" (Q, P, E) of each sentence's image;
        text: "text_embed" (Q, E), "text_tokens" (Q, L, E), "text_mask" (Q, L) bool."""
        raise NotImplementedError(f"{type(self).__name__} does not ground")

    def grounding_scores(
        self, images: dict[str, torch.Tensor], texts: dict[str, torch.Tensor], topk: int | None = None
    ) -> torch.Tensor:
        """(N images, M sentences) retrieval scores in this head's grounding geometry.

        images: "image_embed" (N, E), "image_tokens" (N, P, E); texts as in `patch_map` with M
        rows. topk: re-rank only each sentence's top-k images, where the head supports it."""
        raise NotImplementedError(f"{type(self).__name__} does not ground")

    # open_clip export: this head's parameters that open_clip's CLIP holds as its own 0-dim
    # scalars under the same names ("logit_scale", "logit_bias"), because open_clip scores the
    # way this head does. Empty: the head's parameters go to the export's vlp extras.
    open_clip_scalars: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def to_open_clip_scalars(cls, config: HeadConfig, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our stored scalars ({name: [1]} for the names in `open_clip_scalars`) -> open_clip's
        values ({name: 0-dim fp32}), as this head uses them in forward (clamps included)."""
        return {name: params[name].float().reshape(()) for name in cls.open_clip_scalars}

    # Matryoshka: the head trains nested prefixes of the embedding (`matryoshka` in its config,
    # heads whose config has that field). Evaluators score every prefix through
    # `pairwise_scores(image_embed[:, :d], text_embed[:, :d])` (and `prompt_ensemble` of prefixes):
    # a head's geometry re-normalises (or re-lifts) whatever width it is given.
    def matryoshka_dims(self) -> tuple[int, ...]:
        """The prefix sizes this head trained, in increasing order; () without Matryoshka."""
        matryoshka = getattr(self.config, "matryoshka", None)
        return tuple(matryoshka.dims) if matryoshka is not None else ()

    def check_matryoshka(self) -> None:
        """Raise when the config's prefixes do not fit `embed_dim` (called by heads at build)."""
        dims = self.matryoshka_dims()
        if dims and dims[-1] > self.embed_dim:
            raise ConfigError(f"matryoshka.dims {list(dims)}: the largest is above model.embed_dim {self.embed_dim}")

    # Hierarchy geometry: embeddings live on a Lorentz hyperboloid (`models/lorentz.py`), where
    # generic concepts sit near the origin (`vlp eval hierarchy`).
    hyperbolic: ClassVar[bool] = False

    def curvature(self) -> torch.Tensor:
        """The hyperboloid's curvature c, shape [1], fp32."""
        raise NotImplementedError(f"{type(self).__name__} has no hyperbolic geometry")

    def lift_text(self, embed: torch.Tensor) -> torch.Tensor:
        """Raw text embeddings (B, E) -> space components (B, E) on the hyperboloid, fp32."""
        raise NotImplementedError(f"{type(self).__name__} has no hyperbolic geometry")

    # -- tiny example inputs, so the registry tests (tests/test_registries.py) cover every head --
    # Config fields of the example head (small sizes; deterministic options where there is one).
    example_config: ClassVar[dict[str, Any]] = {}

    @classmethod
    def example_inputs(
        cls, config: HeadConfig, batch_size: int, embed_dim: int, generator: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(encoder outputs, data batch) of `batch_size` samples with every key this head needs.

        Shapes: "*_embed" (B, E), "image_tokens" (B, 4, E), "text_tokens" (B, 5, E) with
        "text_mask" (B, 5) (at least one real token), "sub_text_embed" (B, 2, E),
        "sentence_embed" (B, 3, E), "parent_text_embed" (B, 1, E). A head that also reads the
        data batch overrides this and adds what it reads."""
        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator)

        shapes = {"image_tokens": (4,), "text_tokens": (5,), "sub_text_embed": (2,), "sentence_embed": (3,),
                  "parent_text_embed": (1,)}
        sources = {"image_normed": "image_embed", "text_normed": "text_embed"}
        encoded: dict[str, torch.Tensor] = {}
        for key in cls.needs_for(config) + cls.gathered_keys:
            key = sources.get(key, key)
            if key == "text_mask":
                lengths = torch.randint(1, 6, (batch_size,), generator=generator)
                encoded[key] = torch.arange(5)[None] < lengths[:, None]  # (B, 5)
            elif key not in encoded:
                encoded[key] = randn(batch_size, *shapes.get(key, ()), embed_dim)
        return encoded, {}

    def no_weight_decay(self) -> set[str]:
        """Names of own parameters (relative to this module) excluded from weight decay.

        Every parameter of a head is a learnable scalar (temperature, bias, curvature...), so the
        default excludes all of them.
        """
        return {name for name, _ in self.named_parameters()}


HEADS: Registry[type[Head]] = Registry("head")
