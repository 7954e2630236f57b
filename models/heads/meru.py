"""MERU: contrastive + entailment loss in hyperbolic space (Desai et al. 2023, "Hyperbolic
Image-Text Representations").

Raw tower outputs ("image_embed", "text_embed"; no L2 normalisation) are scaled by learnable
exp(alpha) per modality and lifted onto the Lorentz hyperboloid of curvature -c with `exp_map0`.
The loss is

    contrastive(-d(image, text) * logit_scale)  +  entail_weight * entailment(text -> image)

where the entailment term pushes each image inside the entailment cone of its caption (generic
text near the origin, specific images further out). Every learnable scalar (log c, the two
alphas, the log logit scale) is a [1]-shaped parameter, kept in its range inside `forward` by
the heads' rule `base.bounded`, applied once per forward (`MeruHead.scalars`) so that its gate
judges the summed gradient of every use, and logged every step.

The contrastive scores come from `lorentz_logits(queries, keys, curv, logit_scale)`, a
`score_fn(query_block, key_block, *score_params)` as `models/heads/tiled.py` expects, so the dense
cross-entropy here can be swapped for the tiled one when batches get large.
"""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from vlp.models import lorentz as L
from vlp.models.heads.base import (  # noqa: F401 (bounded: re-exported)
    HEADS, Head, HeadConfig, HeadInputs, MatryoshkaConfig, bounded,
)
from vlp.models.heads.tiled import DEFAULT_TILE_SIZE, tiled_cross_entropy

log = logging.getLogger(__name__)


class MeruConfig(HeadConfig):
    curv_init: float = Field(1.0, gt=0, description="c at init; the hyperboloid has curvature -c")
    learn_curv: bool = True
    curv_range: float = Field(10.0, ge=1, description="c stays in [curv_init / curv_range, curv_init * curv_range]")
    temperature_init: float = Field(0.07, gt=0)
    max_logit_scale: float = Field(100.0, gt=0)
    entail_weight: float = Field(0.2, ge=0, description="lambda of the entailment term (0.2 in MERU)")
    min_radius: float = Field(0.1, gt=0, description="K of the entailment cone half aperture")
    # Weight of the parent-caption entailment (needs data.parent_caption_key): each sample's
    # generic parent caption ("a digit") must entail both its image and its specific caption, as
    # HyCoCLIP's inter- and intra-modal terms (Pal et al. 2024). The parents take no part in the
    # contrastive term, so generic captions never stand in for a class caption there. 0: off.
    parent_weight: float = Field(0.0, ge=0)
    # Logged as meru/curv_bound_steps; a warning is printed once when c has sat at a bound for
    # this many consecutive training steps (0: never warn). See docs/meru.md.
    curv_bound_warn_steps: int = Field(1000, ge=0)
    # Contrastive term in (tile x tile) blocks (memory linear in the global batch); None: automatic.
    tile_size: Optional[int] = Field(None, ge=1)
    # Nested prefix dims with weights: the whole MERU loss (contrastive, entailment, parents) on
    # each prefix of the raw embeddings, each prefix lifted by its own exp-map (same c, alphas).
    matryoshka: Optional[MatryoshkaConfig] = None


def lorentz_logits(queries: Tensor, keys: Tensor, curv: Tensor, logit_scale: Tensor) -> Tensor:
    """Contrastive scores -d(query_i, key_j) * logit_scale.

    Args:
        queries: Tensor of shape (N, E), lifted points (space components).
        keys: Tensor of shape (M, E), lifted points.
        curv: Tensor of shape [1], c.
        logit_scale: Tensor of shape [1], 1 / temperature.

    Returns:
        Tensor of shape (N, M), fp32.
    """
    return -L.pairwise_dist(queries, keys, curv) * logit_scale


# Above this many logits per direction the contrastive term streams column tiles
# (models/heads/tiled.py) instead of holding the (B, W * B) distance matrix; the distance's
# acosh makes each block dearer than CLIP's dot product, so tiling pays from the same size.
TILED_MIN_LOGITS = 4096 * 4096


def contrastive_loss(
    image: Tensor, text: Tensor, all_image: Tensor, all_text: Tensor, curv: Tensor, logit_scale: Tensor, offset: int,
    tile_size: Optional[int] = None,
) -> Tensor:
    """Symmetric InfoNCE over this rank's rows against every rank's columns (local loss).

    Args:
        image: Tensor of shape (B, E), this rank's lifted images.
        text: Tensor of shape (B, E), this rank's lifted captions (paired row by row).
        all_image: Tensor of shape (W * B, E), every rank's lifted images in rank order.
        all_text: Tensor of shape (W * B, E), every rank's lifted captions.
        offset: rank * B, where this rank's pairs sit among the columns.
        tile_size: stream (tile x tile) blocks; None picks tiling from TILED_MIN_LOGITS.

    Returns:
        scalar fp32: 0.5 * (CE(image -> text) + CE(text -> image)).
    """
    targets = torch.arange(image.shape[0], device=image.device) + offset
    if tile_size is None and image.shape[0] * all_text.shape[0] >= TILED_MIN_LOGITS:
        tile_size = DEFAULT_TILE_SIZE
    if tile_size is not None:
        i2t = tiled_cross_entropy(image, all_text, targets, lorentz_logits, tile_size, curv, logit_scale)
        t2i = tiled_cross_entropy(text, all_image, targets, lorentz_logits, tile_size, curv, logit_scale)
        return 0.5 * (i2t.loss.mean() + t2i.loss.mean())
    image_logits = lorentz_logits(image, all_text, curv, logit_scale)  # (B, W * B)
    text_logits = lorentz_logits(text, all_image, curv, logit_scale)  # (B, W * B)
    return 0.5 * (F.cross_entropy(image_logits, targets) + F.cross_entropy(text_logits, targets))


def entailment_loss(text: Tensor, image: Tensor, curv: Tensor, min_radius: float = 0.1) -> Tensor:
    """mean(relu(exterior angle at text of O-text-image - half aperture of the text's cone)).

    Zero when every image lies inside its caption's entailment cone.

    Args:
        text: Tensor of shape (B, E), lifted captions (cone apexes).
        image: Tensor of shape (B, E), lifted images, paired row by row.

    Returns:
        scalar fp32.
    """
    angle = L.oxy_angle(text, image, curv)  # (B,)
    aperture = L.half_aperture(text, curv, min_radius=min_radius)  # (B,)
    return torch.relu(angle - aperture).mean()


class MeruScalars(NamedTuple):
    """The effective scalars of one forward, each [1] fp32 inside its range."""

    curv: Tensor
    image_scale: Tensor
    text_scale: Tensor
    logit_scale: Tensor


@HEADS.register("meru")
class MeruHead(Head):
    config_class = MeruConfig
    # Raw embeddings (not "*_normed"): MERU lifts them with exp_map0 instead of normalising. Each
    # rank lifts every rank's gathered rows itself (cheap next to the pairwise distances).
    needs = ("image_embed", "text_embed")
    gathered_keys = ("image_embed", "text_embed")
    # Lorentz hyperboloid: `curvature` and `lift_text` below are the hierarchy capability.
    hyperbolic = True

    @classmethod
    def needs_for(cls, config: MeruConfig) -> tuple[str, ...]:
        return cls.needs + (("parent_text_embed",) if config.parent_weight > 0 else ())

    def __init__(self, config: MeruConfig, embed_dim: int) -> None:
        super().__init__(config, embed_dim)
        self.config: MeruConfig = config
        self.log_curv = nn.Parameter(torch.tensor([math.log(config.curv_init)]), requires_grad=config.learn_curv)
        # exp(alpha) = 1/sqrt(E) makes tangent vectors of ~unit norm at init (tower outputs have
        # per-coordinate scale ~1).
        alpha_init = math.log(embed_dim**-0.5)
        self.alpha_image = nn.Parameter(torch.tensor([alpha_init]))
        self.alpha_text = nn.Parameter(torch.tensor([alpha_init]))
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / config.temperature_init)]))
        self.log_curv_bounds = (
            math.log(config.curv_init / config.curv_range),
            math.log(config.curv_init * config.curv_range),
        )
        # Consecutive training steps with c at a bound; on device so counting needs no host sync.
        # int64 survives DeepSpeed's bf16/fp16 cast of floating buffers; not in the state dict.
        self.register_buffer("curv_bound_steps", torch.zeros(1, dtype=torch.long), persistent=False)
        self._warned_at_bound = False
        self._calls = 0
        self.check_matryoshka()

    # Effective scalars, each [1]-shaped fp32 and inside its range. `forward` takes them once
    # from `scalars()`; the single-scalar methods below serve evaluators.
    def scalars(self) -> MeruScalars:
        """Each parameter through `bounded` exactly once. The curvature has three uses per forward
        (both lifts and the losses' distances); bounding it per use would gate each use's gradient
        on its own, and past the bound their gated sum can point inward while the total points out."""
        config = self.config
        return MeruScalars(
            curv=bounded(self.log_curv.float(), *self.log_curv_bounds).exp(),
            # <= 1: alpha never scales features up (once it reaches 1 it can be dropped at inference).
            image_scale=bounded(self.alpha_image.float(), high=0.0).exp(),
            text_scale=bounded(self.alpha_text.float(), high=0.0).exp(),
            logit_scale=bounded(self.logit_scale.float(), high=math.log(config.max_logit_scale)).exp(),
        )

    def curvature(self) -> Tensor:
        return self.scalars().curv

    def image_scale(self) -> Tensor:
        return self.scalars().image_scale

    def text_scale(self) -> Tensor:
        return self.scalars().text_scale

    def logit_scale_value(self) -> Tensor:
        return self.scalars().logit_scale

    def lift_image(self, embed: Tensor, scalars: MeruScalars | None = None) -> Tensor:
        """Raw image embeddings (B, E) -> space components (B, E) on the hyperboloid, fp32."""
        scalars = scalars or self.scalars()
        return L.exp_map0(embed.float() * scalars.image_scale, scalars.curv)

    def lift_text(self, embed: Tensor, scalars: MeruScalars | None = None) -> Tensor:
        """Raw text embeddings (B, E) -> space components (B, E) on the hyperboloid, fp32."""
        scalars = scalars or self.scalars()
        return L.exp_map0(embed.float() * scalars.text_scale, scalars.curv)

    def forward(self, inputs: HeadInputs) -> dict[str, Any]:
        scalars = self.scalars()
        curv, logit_scale = scalars.curv, scalars.logit_scale
        if self.config.matryoshka is None:
            loss, terms = self._loss_at(inputs, scalars, self.embed_dim)
        else:
            # One forward of the towers; each prefix its own exp-map and MERU loss, weighted.
            loss, prefix_terms = logit_scale.new_zeros(()), {}
            for dim, weight in self.config.matryoshka.pairs():
                prefix_loss, terms = self._loss_at(inputs, scalars, dim)
                loss = loss + weight * prefix_loss
                prefix_terms[f"loss@{dim}"] = prefix_loss.detach()
            # `terms` (radii, entailment ...) are the largest prefix's.
        contrastive, entailment, image, text = terms["contrastive"], terms["entailment"], terms["image"], terms["text"]
        parent, parent_entailment = terms.get("parent"), terms.get("parent_entailment")

        at_bound = self._track_bound()
        with torch.no_grad():
            logging_out = {
                "curvature": curv.squeeze(0),
                "alpha_image": scalars.image_scale.squeeze(0),
                "alpha_text": scalars.text_scale.squeeze(0),
                "logit_scale": logit_scale.squeeze(0),
                "contrastive_loss": contrastive,
                "entailment_loss": entailment,
                "curv_at_bound": at_bound.float().squeeze(0),
                "curv_bound_steps": self.curv_bound_steps.squeeze(0).float(),
                # Mean distance to the origin: captions should sit closer than images.
                "text_radius": L.origin_dist(text, curv).mean(),
                "image_radius": L.origin_dist(image, curv).mean(),
            }
            if parent is not None:
                logging_out["parent_entailment_loss"] = parent_entailment
                logging_out["parent_radius"] = L.origin_dist(parent, curv).mean()
            if self.config.matryoshka is not None:
                logging_out.update(prefix_terms)
        return {"loss": loss, "logging": logging_out}

    def _loss_at(self, inputs: HeadInputs, scalars: MeruScalars, dim: int) -> tuple[Tensor, dict[str, Tensor]]:
        """MERU's loss on the first `dim` features of the raw embeddings (all of them at embed_dim)."""
        curv, logit_scale = scalars.curv, scalars.logit_scale
        image = self.lift_image(inputs.local["image_embed"][:, :dim], scalars)  # (B, dim)
        text = self.lift_text(inputs.local["text_embed"][:, :dim], scalars)  # (B, dim)
        if inputs.world_size == 1:  # gathered is local itself: do not lift it twice
            all_image, all_text = image, text
        else:
            all_image = self.lift_image(inputs.gathered["image_embed"][:, :dim], scalars)  # (W * B, dim)
            all_text = self.lift_text(inputs.gathered["text_embed"][:, :dim], scalars)  # (W * B, dim)

        contrastive = contrastive_loss(
            image, text, all_image, all_text, curv, logit_scale, inputs.rank * image.shape[0], self.config.tile_size
        )
        entailment = entailment_loss(text, image, curv, self.config.min_radius)
        loss = contrastive + self.config.entail_weight * entailment
        terms = {"contrastive": contrastive, "entailment": entailment, "image": image, "text": text}
        if self.config.parent_weight > 0:
            parent = self.lift_text(inputs.local["parent_text_embed"][:, 0, :dim], scalars)  # (B, dim)
            parent_entailment = 0.5 * (entailment_loss(parent, image, curv, self.config.min_radius)
                                       + entailment_loss(parent, text, curv, self.config.min_radius))
            loss = loss + self.config.parent_weight * parent_entailment
            terms.update(parent=parent, parent_entailment=parent_entailment)
        return loss, terms

    @torch.no_grad()
    def _track_bound(self) -> Tensor:
        """Update the consecutive at-bound step count (training only); returns the bool flag [1]."""
        low, high = self.log_curv_bounds
        raw = self.log_curv.float()
        # A small tolerance: the raw value sits within float rounding of the bound, or beyond it.
        at_bound = (raw <= low + 1e-6) | (raw >= high - 1e-6)
        if self.training and self.config.learn_curv:
            self.curv_bound_steps.copy_(torch.where(at_bound, self.curv_bound_steps + 1, 0))
            self._calls += 1
            limit = self.config.curv_bound_warn_steps
            # Read the device counter only every 50 steps: one host sync there, none in between.
            if limit and not self._warned_at_bound and self._calls % 50 == 0:
                steps = int(self.curv_bound_steps.item())
                if steps >= limit:
                    self._warned_at_bound = True
                    log.warning(
                        "meru: curvature c=%.4g has sat at its bound [%.4g, %.4g] for %d steps; the "
                        "entailment loss is likely near 0 with trivially wide cones (docs/meru.md)",
                        math.exp(raw.item()), math.exp(low), math.exp(high), steps,
                    )
        return at_bound

    # Zero-shot and retrieval in MERU's geometry.
    def prompt_ensemble(self, text_embed: Tensor) -> Tensor:
        """Prompt embeddings (C, T, E) -> class embeddings (C, E): the mean of the raw embeddings,
        i.e. an average in the tangent space at the origin (alpha is linear), lifted later by
        `pairwise_scores` like any text embedding. This is MERU's zero-shot classifier."""
        return text_embed.float().mean(dim=1)

    def pairwise_scores(self, image_embed: Tensor, text_embed: Tensor) -> Tensor:
        """Lorentzian inner product of lifted images (N, E) and texts (M, E) -> (N, M).

        Higher is closer: -c <x, y>_L = cosh(sqrt(c) d(x, y)), so this ranks like -distance, as
        MERU's zero-shot classification and retrieval do."""
        scalars = self.scalars()
        return L.pairwise_inner(self.lift_image(image_embed, scalars), self.lift_text(text_embed, scalars), scalars.curv)
