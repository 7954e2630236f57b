"""Backward-compatible embeddings (BCT, Shen et al. 2020; CoReS): the new model is also trained to
score well against a frozen old model's embeddings, so a gallery embedded by the old model can be
searched with the new one without re-embedding it.

BCT's influence loss trains new embeddings through the old model's frozen classifier. In CLIP the
classifier of an image is the text embeddings, and the reverse, so `compat_loss` is two CLIP
losses over the global batch in the old model's geometry (its fixed logit scale):

    (clip_loss(new images, old captions) + clip_loss(old images, new captions)) / 2

The first pulls each new image toward the old embedding of its own caption (and away from the
other old captions), the second each new caption toward the old embedding of its image. The
old model is frozen and never a parameter of this head (`models/teacher.py`): online from an
export, or its embeddings read from reinforced shards (`vlp shards reinforce --teacher OLD`).
Pair it with the new model's own contrastive head (`clip`) in `model.heads`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vlp.models.heads.base import HEADS, Head, HeadConfig, HeadInputs
from vlp.models.heads.clip import clip_loss_and_accuracy
from vlp.models.heads.distill import example_teacher_batch
from vlp.models.teacher import FrozenModelConfig, FrozenModelUser


def compat_loss_and_accuracy(
    image: Tensor, text: Tensor, old_image: Tensor, old_text: Tensor, old_logit_scale: Tensor, *,
    gathered_image: Tensor | None = None, gathered_text: Tensor | None = None,
    gathered_old_image: Tensor | None = None, gathered_old_text: Tensor | None = None, rank: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(BCT influence loss, new image -> old text top-1 accuracy, old image -> new text top-1).

    image, text: (B, E) the new model's L2-normalised features; old_image, old_text: (B, E) the
    old model's for the same samples (no gradient); old_logit_scale: [1] or []; gathered_*:
    (N, E) every rank's rows in rank order (None on one rank)."""
    old_image, old_text = old_image.detach(), old_text.detach()
    new_to_old, accuracy_new_old = clip_loss_and_accuracy(
        image, old_text, old_logit_scale, gathered_image=gathered_image, gathered_text=gathered_old_text, rank=rank)
    old_to_new, accuracy_old_new = clip_loss_and_accuracy(
        old_image, text, old_logit_scale, gathered_image=gathered_old_image, gathered_text=gathered_text, rank=rank)
    return (new_to_old + old_to_new) / 2, accuracy_new_old, accuracy_old_new


class CompatConfig(HeadConfig):
    old: FrozenModelConfig
    """The frozen old model: `export: PATH` or `from_shards: true` (its embeddings in the shards)."""


@HEADS.register("compat")
class CompatHead(FrozenModelUser, Head):
    """BCT's influence loss against a frozen old model; no parameters of its own (the old model's
    logit scale is part of its frozen classifier)."""

    config_class = CompatConfig
    head_name = "compat"
    frozen_key = "old"
    frozen_same_width = True  # new and old embeddings are scored against each other
    gathered_keys = ("image_normed", "text_normed")
    needs = ("image_normed", "text_normed")
    example_config = {"old": {"from_shards": True}}
    config: CompatConfig

    def forward(self, inputs: HeadInputs) -> dict[str, Any]:
        old = self.frozen_embeddings(inputs.local, inputs.batch)
        image, text = inputs.local["image_normed"], inputs.local["text_normed"]
        if old.local_image.shape[1] != image.shape[1]:
            raise ValueError(f"{self.frozen_path()}: the old embeddings are {old.local_image.shape[1]} wide, "
                             f"model.embed_dim is {image.shape[1]}")
        loss, accuracy_new_old, accuracy_old_new = compat_loss_and_accuracy(
            image, text, old.local_image, old.local_text, old.logit_scale,
            gathered_image=inputs.gathered.get("image_normed"), gathered_text=inputs.gathered.get("text_normed"),
            gathered_old_image=old.global_image, gathered_old_text=old.global_text, rank=inputs.rank,
        )
        return {"loss": loss, "logging": {"accuracy_new_image_old_text": accuracy_new_old,
                                          "accuracy_old_image_new_text": accuracy_old_new,
                                          "old_logit_scale": old.logit_scale}}

    @classmethod
    def example_inputs(cls, config: CompatConfig, batch_size: int, embed_dim: int, generator: torch.Generator):
        """The base example plus the old model's embeddings as reinforced shards carry them."""
        encoded, batch = super().example_inputs(config, batch_size, embed_dim, generator)
        return encoded, {**batch, **example_teacher_batch(batch_size, embed_dim, generator)}
