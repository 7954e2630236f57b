"""A frozen model beside the one being trained: the teacher of the `distill` head, the old model
of the `compat` head.

Its embeddings come from one of two places:

- online: the frozen model itself runs on each batch's images and token ids (`FrozenModel`). It
  is attached to the head after the model is built (`vlp.train.frozen.attach_frozen_models`),
  never registered as a submodule, so it is in no state dict, no checkpoint, no optimizer group,
  and DeepSpeed neither partitions nor optimizes it under any ZeRO stage. It runs in the compute
  dtype on the device of the student's features, in eval mode, without autograd.
- offline: the shards carry each sample's frozen embeddings (`vlp shards reinforce`), which the
  collate puts into the batch as `TEACHER_IMAGE`, `TEACHER_TEXT` (B, E) and `TEACHER_SCALE` (B,);
  no frozen model is loaded at all.

Either way a head gets the frozen model's L2-normalised embeddings of this rank's samples, those
of the global batch (all-gathered, no gradient) and its logit scale (`FrozenEmbeddings`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from vlp.core.collectives import gather_no_grad
from vlp.core.config import Strict
from vlp.core.errors import ConfigError, DataError
# The batch keys reinforced shards fill (collate.py): (B, E) image and text embeddings, (B,) scale.
from vlp.data_pipelines.collate import TEACHER_IMAGE, TEACHER_SCALE, TEACHER_TEXT


# Texts whose token ids must agree between the two tokenizers (one check of the whole tokenizer:
# vocabulary, lower-casing, context length and padding all show in the ids).
_TOKENIZER_PROBES = ["a photo of the digit 7.", "A RED circle, left of a small blue square!", ""]


class FrozenOpenClip(Strict):
    """An open_clip model by name (`ViT-B-32`, `hf-hub:ORG/REPO`, `local-dir:DIR`) and weights
    (a tag in the local cache or a checkpoint file), as `model.open_clip` takes them."""

    name: str
    pretrained: Optional[str] = None


class FrozenModelConfig(Strict):
    """Where a frozen model comes from: exactly one of

    export: a vlp export, run folder or checkpoint (anything `vlp eval --checkpoint` reads);
    open_clip: an open_clip model by name and weights file (`name`, `pretrained`);
    from_shards: true: its embeddings are in the training shards (`vlp shards reinforce`).

    logit_scale: the multiplier of its cosine similarities (1 / temperature). None: the frozen
    model's scoring head's own (online), or the one stored in the shards (offline)."""

    export: Optional[str] = None
    open_clip: Optional[FrozenOpenClip] = None
    from_shards: bool = False
    logit_scale: Optional[float] = Field(None, gt=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> "FrozenModelConfig":
        given = [name for name in ("export", "open_clip") if getattr(self, name) is not None]
        given += ["from_shards"] if self.from_shards else []
        if len(given) != 1:
            raise ValueError(f"set exactly one of export, open_clip and from_shards (got {', '.join(given) or 'none'})")
        return self

    @property
    def online(self) -> bool:
        return not self.from_shards


class FrozenModel:
    """A frozen `VLPModel` that scores batches for a head, kept out of the head's parameters.

    `key`: the config path it came from (`model.heads.distill.teacher`), for error messages;
    `logit_scale`: the multiplier its scoring head applies to cosine similarities."""

    def __init__(self, model: torch.nn.Module, key: str, logit_scale: float) -> None:
        self.model = model.eval().requires_grad_(False)
        self.key = key
        self.logit_scale = float(logit_scale)
        self.embed_dim = int(model.config.embed_dim)

    def check_against(self, student: torch.nn.Module, same_width: bool) -> None:
        """Refuse, in one line naming `key`, a frozen model that cannot read the student's batches:
        another tokenizer (it scores the student's token ids), another image input shape, or,
        where the loss compares embeddings directly (`same_width`), another embedding width."""
        if same_width and self.embed_dim != int(student.config.embed_dim):
            raise ConfigError(f"{self.key}: its embedding width {self.embed_dim} differs from model.embed_dim "
                              f"{student.config.embed_dim}")
        check_tokenizers(self.model, student, self.key)
        ours, theirs = tuple(student.image.input_shape()), tuple(self.model.image.input_shape())
        if ours != theirs:
            raise ConfigError(f"{self.key}: its image input {theirs} differs from the student's {ours} "
                              "(it scores the student's batches)")

    def to(self, device: torch.device, dtype: torch.dtype) -> "FrozenModel":
        """Move to `device` in `dtype` (the compute dtype), where it is not already."""
        parameter = next(self.model.parameters())
        if parameter.device != device or parameter.dtype != dtype:
            self.model.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode(self, batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, text) embeddings (B, E), L2-normalised, fp32, of the batch's "image" (uint8
        pixels: each tower normalises them with its own statistics) and "text" token ids."""
        self.to(device, dtype)
        images = batch["image"].to(device)
        image = self.model.encode_image(images if images.dtype == torch.uint8 else images.to(dtype))["image_embed"]
        text = self.model.encode_text(batch["text"].to(device))["text_embed"]
        return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)


def check_tokenizers(frozen: torch.nn.Module, student: torch.nn.Module, key: str) -> None:
    """ConfigError naming `key` unless both text towers turn the probe texts into the same ids."""
    ours, theirs = student.text.tokenizer(), frozen.text.tokenizer()
    ours_ids, theirs_ids = ours(_TOKENIZER_PROBES), theirs(_TOKENIZER_PROBES)
    if ours_ids.shape != theirs_ids.shape or not torch.equal(ours_ids, theirs_ids):
        raise ConfigError(
            f"{key}: its tokenizer differs from the student's ({type(theirs).__name__}, context "
            f"{theirs_ids.shape[-1]} vs {type(ours).__name__}, context {ours_ids.shape[-1]}); it would misread the "
            "student's token ids")


@dataclass
class FrozenEmbeddings:
    """The frozen model's view of one step. local_*: this rank's (B, E); global_*: every rank's
    (N, E) in rank order (no gradient); logit_scale: 0-dim fp32. All fp32, L2-normalised."""

    local_image: torch.Tensor
    local_text: torch.Tensor
    global_image: torch.Tensor
    global_text: torch.Tensor
    logit_scale: torch.Tensor


class FrozenModelUser:
    """Mixin of a head that reads a frozen model (`frozen_key` names its config field).

    The trainer asks every head `isinstance(head, FrozenModelUser)` and, for an online spec,
    loads the model and calls `attach_frozen` before the engine is built."""

    head_name: ClassVar[str]  # its registered name, the key under model.heads
    frozen_key: ClassVar[str]
    # Whether the loss compares the two models' embeddings directly (then their widths must agree).
    frozen_same_width: ClassVar[bool] = True

    def frozen_spec(self) -> FrozenModelConfig:
        return getattr(self.config, self.frozen_key)

    def frozen_path(self) -> str:
        """The config path of the spec, for messages (`model.heads.distill.teacher`)."""
        return f"model.heads.{self.head_name}.{self.frozen_key}"

    def needs_same_width(self) -> bool:
        return self.frozen_same_width

    def attach_frozen(self, frozen: FrozenModel) -> None:
        # A plain attribute: FrozenModel is no nn.Module, so the model inside stays unregistered.
        self.__dict__["_frozen"] = frozen

    def frozen_embeddings(self, local: dict[str, torch.Tensor], batch: dict[str, Any]) -> FrozenEmbeddings:
        """The frozen model's embeddings of this step's samples, from the attached model or the batch.

        local: the objective's "image_normed" (B, E) (its device and the compute dtype of
        "image_embed" decide where the frozen model runs). Row i is sample i of this rank's batch,
        as in every per-sample batch field."""
        spec = self.frozen_spec()
        reference = local["image_normed"]
        if spec.online:
            frozen = self.__dict__.get("_frozen")
            if frozen is None:
                raise RuntimeError(f"{self.frozen_path()}: no frozen model attached; the trainer calls "
                                   "vlp.train.frozen.attach_frozen_models(model) after building it")
            dtype = local["image_embed"].dtype if "image_embed" in local else reference.dtype
            image, text = frozen.encode(batch, reference.device, dtype)
            scale = spec.logit_scale or frozen.logit_scale
        else:
            image, text, scale = self._from_batch(batch, reference)
        if image.shape[0] != reference.shape[0]:
            raise DataError(f"{self.frozen_path()}: {image.shape[0]} frozen embeddings for {reference.shape[0]} samples")
        scale_tensor = torch.as_tensor(scale, dtype=torch.float32, device=reference.device).reshape(())
        return FrozenEmbeddings(image, text, gather_no_grad(image), gather_no_grad(text), scale_tensor)

    def _from_batch(self, batch: dict[str, Any], reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        missing = [key for key in (TEACHER_IMAGE, TEACHER_TEXT) if key not in batch]
        if missing:
            raise DataError(f"{self.frozen_path()}.from_shards: the batch has no {missing[0]}; train on shards "
                            "written by `vlp shards reinforce` (every sample of a batch must carry the embeddings)")
        image = F.normalize(batch[TEACHER_IMAGE].to(reference.device).float(), dim=-1)
        text = F.normalize(batch[TEACHER_TEXT].to(reference.device).float(), dim=-1)
        scale = self.frozen_spec().logit_scale
        if scale is None:
            if TEACHER_SCALE not in batch:
                raise DataError(f"{self.frozen_path()}.from_shards: the batch has no {TEACHER_SCALE}; set logit_scale")
            scale = batch[TEACHER_SCALE].to(reference.device).float().reshape(-1)[0]
        return image, text, scale
