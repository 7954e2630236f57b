"""Distillation from a frozen CLIP teacher: the student's image-text similarity distributions
are pulled toward the teacher's over the global batch.

`distill_loss` is open_clip's `DistillClipLoss` distillation term (its trainer's
`--distill-model`) and, the same formula, TinyCLIP's affinity mimicking (Wu et al. 2023,
`ClipSoftLoss`): for each of this rank's images, the cross-entropy between the teacher's softmax
over all N captions of the global batch and the student's, and the same for each caption over
all N images, averaged over the two directions. It differs from the KL divergence only by the
teacher's entropy, a constant of the student, so the gradients are the KL's; the head logs the
KL itself. Each rank builds (B, N) logits only, as `clip_loss` does.

An optional feature term (`feature_weight`, CLIP-KD's feature distillation, Yang et al. 2024)
pulls each student embedding toward the teacher's own: 1 - cosine, which needs the same
embedding width.

The teacher is frozen and never a parameter of this head (`models/teacher.py`): run online from
an export or an open_clip model, or read from reinforced shards (`vlp shards reinforce`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from vlp.models.heads.base import HEADS, Head, HeadConfig, HeadInputs, bounded
from vlp.models.heads.clip import scaled_dot
from vlp.models.teacher import TEACHER_IMAGE, TEACHER_SCALE, TEACHER_TEXT, FrozenModelConfig, FrozenModelUser


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean over rows of -sum_j softmax(teacher)_j * log_softmax(student)_j: (B, N), (B, N) -> 0-dim."""
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean()


def distill_loss_and_kl(
    image: Tensor, text: Tensor, logit_scale: Tensor, teacher_image: Tensor, teacher_text: Tensor,
    teacher_logit_scale: Tensor, *, gathered_image: Tensor | None = None, gathered_text: Tensor | None = None,
    gathered_teacher_image: Tensor | None = None, gathered_teacher_text: Tensor | None = None, rank: int = 0,
) -> tuple[Tensor, Tensor]:
    """(`distill_loss`, its KL divergence (0-dim, no gradient)); arguments as `distill_loss`."""
    if image.dim() != 2 or image.shape != text.shape:
        raise ValueError(f"distill_loss: image {tuple(image.shape)} and text {tuple(text.shape)} must both be (B, E)")
    if teacher_image.shape[0] != image.shape[0] or teacher_image.shape != teacher_text.shape:
        raise ValueError(f"distill_loss: teacher {tuple(teacher_image.shape)} / {tuple(teacher_text.shape)} "
                         f"for {image.shape[0]} student rows")
    image, text, logit_scale = image.float(), text.float(), logit_scale.float()
    teacher_image, teacher_text = teacher_image.float(), teacher_text.float()
    all_image = image if gathered_image is None else gathered_image.float()
    all_text = text if gathered_text is None else gathered_text.float()
    all_teacher_image = teacher_image if gathered_teacher_image is None else gathered_teacher_image.float()
    all_teacher_text = teacher_text if gathered_teacher_text is None else gathered_teacher_text.float()
    if all_teacher_image.shape[0] != all_image.shape[0] or all_image.shape[0] < (rank + 1) * image.shape[0]:
        raise ValueError(f"distill_loss: {all_image.shape[0]} gathered student rows, {all_teacher_image.shape[0]} "
                         f"teacher rows, rank {rank} of {image.shape[0]}")
    student_i2t = scaled_dot(image, all_text, logit_scale)  # (B, N)
    student_t2i = scaled_dot(text, all_image, logit_scale)  # (B, N)
    with torch.no_grad():
        teacher_scale = teacher_logit_scale.float()
        teacher_i2t = scaled_dot(teacher_image, all_teacher_text, teacher_scale)  # (B, N)
        teacher_t2i = scaled_dot(teacher_text, all_teacher_image, teacher_scale)
    loss = (soft_cross_entropy(student_i2t, teacher_i2t) + soft_cross_entropy(student_t2i, teacher_t2i)) / 2
    with torch.no_grad():
        # KL = cross-entropy - the teacher's entropy (the part the student cannot change).
        entropy = sum(-(t.softmax(1) * t.log_softmax(1)).sum(1).mean() for t in (teacher_i2t, teacher_t2i)) / 2
        kl = loss.detach() - entropy
    return loss, kl


def distill_loss(
    image: Tensor, text: Tensor, logit_scale: Tensor, teacher_image: Tensor, teacher_text: Tensor,
    teacher_logit_scale: Tensor, *, gathered_image: Tensor | None = None, gathered_text: Tensor | None = None,
    gathered_teacher_image: Tensor | None = None, gathered_teacher_text: Tensor | None = None, rank: int = 0,
) -> Tensor:
    """Similarity-distribution distillation of this rank's pairs over the global batch (fp32 0-dim).

    image, text: (B, E) the student's L2-normalised features; logit_scale: [1] or [] the
    student's multiplier. teacher_image, teacher_text: (B, E') the teacher's, for the same B
    samples (E' may differ from E); teacher_logit_scale: [1] or [].
    gathered_*: (N, E) / (N, E') every rank's rows in rank order, this rank's at [rank * B, (rank + 1) * B)
    (None on one rank). Equals open_clip's `DistillClipLoss(local_loss=True, gather_with_grad=True)`
    distillation term."""
    return distill_loss_and_kl(
        image, text, logit_scale, teacher_image, teacher_text, teacher_logit_scale, gathered_image=gathered_image,
        gathered_text=gathered_text, gathered_teacher_image=gathered_teacher_image,
        gathered_teacher_text=gathered_teacher_text, rank=rank,
    )[0]


def feature_distill_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean of 1 - cosine(student_i, teacher_i): (B, E), (B, E) -> 0-dim fp32 (CLIP-KD's FD on unit vectors)."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


class DistillConfig(HeadConfig):
    teacher: FrozenModelConfig
    """The frozen teacher: `export: PATH`, `open_clip: {name, pretrained}` or `from_shards: true`."""
    init_temperature: float = Field(0.07, gt=0)
    """The student's own softmax temperature in this loss (learnable, bounded as the clip head's)."""
    max_logit_scale: float = Field(100.0, gt=1)
    learn_temperature: bool = True
    affinity_weight: float = Field(1.0, ge=0)
    """Weight of the similarity-distribution term (`distill_loss`)."""
    feature_weight: float = Field(0.0, ge=0)
    """Weight of the feature term (1 - cosine of student and teacher embeddings; same width only)."""

    @model_validator(mode="after")
    def _something_to_learn(self) -> "DistillConfig":
        if self.affinity_weight == 0 and self.feature_weight == 0:
            raise ValueError("affinity_weight and feature_weight are both 0: the head would learn nothing")
        if not 1.0 <= 1.0 / self.init_temperature <= self.max_logit_scale:
            raise ValueError(f"init_temperature {self.init_temperature}: its logit scale is outside [1, max_logit_scale]")
        return self


@HEADS.register("distill")
class DistillHead(FrozenModelUser, Head):
    """The student's distillation temperature (log of its logit scale, [1]) around `distill_loss`."""

    config_class = DistillConfig
    head_name = "distill"
    frozen_key = "teacher"
    gathered_keys = ("image_normed", "text_normed")
    needs = ("image_normed", "text_normed")
    example_config = {"teacher": {"from_shards": True}, "feature_weight": 0.5}
    config: DistillConfig

    def __init__(self, config: DistillConfig, embed_dim: int) -> None:
        super().__init__(config, embed_dim)
        init = torch.full((1,), math.log(1.0 / config.init_temperature))
        self.logit_scale = nn.Parameter(init, requires_grad=config.learn_temperature)

    def needs_same_width(self) -> bool:
        return self.config.feature_weight > 0

    def scale(self) -> Tensor:
        """exp(logit_scale) in [1, max_logit_scale], [1] fp32."""
        return bounded(self.logit_scale.float(), 0.0, math.log(self.config.max_logit_scale)).exp()

    def forward(self, inputs: HeadInputs) -> dict[str, Any]:
        teacher = self.frozen_embeddings(inputs.local, inputs.batch)
        image, text = inputs.local["image_normed"], inputs.local["text_normed"]
        logit_scale = self.scale()
        loss = image.new_zeros((), dtype=torch.float32)
        logging: dict[str, Any] = {"logit_scale": logit_scale.detach()[0], "teacher_logit_scale": teacher.logit_scale}
        if self.config.affinity_weight > 0:
            affinity, kl = distill_loss_and_kl(
                image, text, logit_scale, teacher.local_image, teacher.local_text, teacher.logit_scale,
                gathered_image=inputs.gathered.get("image_normed"), gathered_text=inputs.gathered.get("text_normed"),
                gathered_teacher_image=teacher.global_image, gathered_teacher_text=teacher.global_text, rank=inputs.rank,
            )
            loss = loss + self.config.affinity_weight * affinity
            logging.update(affinity=affinity.detach(), kl=kl)
        if self.config.feature_weight > 0:
            if teacher.local_image.shape[1] != image.shape[1]:
                raise ValueError(f"{self.frozen_path()}: feature_weight needs the teacher's width "
                                 f"{teacher.local_image.shape[1]} to be model.embed_dim {image.shape[1]}")
            feature = (feature_distill_loss(image, teacher.local_image) + feature_distill_loss(text, teacher.local_text)) / 2
            loss = loss + self.config.feature_weight * feature
            logging["feature"] = feature.detach()
        return {"loss": loss, "logging": logging}

    @classmethod
    def example_inputs(cls, config: DistillConfig, batch_size: int, embed_dim: int, generator: torch.Generator):
        """The base example plus a reinforced batch: teacher embeddings (B, E) and scale (B,)."""
        encoded, batch = super().example_inputs(config, batch_size, embed_dim, generator)
        return encoded, {**batch, **example_teacher_batch(batch_size, embed_dim, generator)}


def example_teacher_batch(batch_size: int, embed_dim: int, generator: torch.Generator) -> dict[str, Tensor]:
    """What a reinforced batch carries, random: teacher image and text embeddings (B, E), scale (B,)."""
    return {TEACHER_IMAGE: F.normalize(torch.randn(batch_size, embed_dim, generator=generator), dim=-1),
            TEACHER_TEXT: F.normalize(torch.randn(batch_size, embed_dim, generator=generator), dim=-1),
            TEACHER_SCALE: torch.full((batch_size,), 20.0)}
