"""The dual encoder: one image (or volume) tower, one text tower, one objective of weighted heads."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlp.core.errors import ConfigError
from vlp.models.config import ModelConfig
from vlp.models.objective import Objective
from vlp.models.towers import IMAGE_TOWERS, TEXT_TOWERS

# Extra text groups a head can ask for in `needs`: encoded key -> batch key of (B, K, L) token ids.
EXTRA_TEXT = {"sub_text_embed": "sub_text", "sentence_embed": "sentences", "parent_text_embed": "parent_text"}


class VLPModel(nn.Module):
    """`forward(batch)` -> `{"loss", "logging"}`; `encode_image` / `encode_text` for evaluation.

    batch: {"image": (B, C, H, W) or (B, 1, H, W, D), "text": (B, L) token ids, ...}.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        embed_dim = config.embed_dim
        self.image = IMAGE_TOWERS.get(config.image.type)(config.image, embed_dim)
        self.text = TEXT_TOWERS.get(config.text.type)(config.text, embed_dim)
        self.objective = Objective(config.heads_dict(), embed_dim)
        # A head that needs "visible_image_tokens" trains on the tower's masked pass (MAE) and
        # says which patches each image shows (`visible_patches`); the full pass runs only when
        # some head reads its outputs.
        self.masking_heads = [head for head in self.objective.heads.values() if "visible_image_tokens" in head.needs]
        if len(self.masking_heads) > 1:
            raise ConfigError("model.heads: at most one head may need the masked pass (visible_image_tokens)")
        # A head that needs "masked_text_tokens" (masked_report, text_input: tower) gives the token
        # ids of the masked report (`masked_text`); the text tower encodes them once more.
        self.text_masking_heads = [head for head in self.objective.heads.values() if "masked_text_tokens" in head.needs]
        if len(self.text_masking_heads) > 1:
            raise ConfigError("model.heads: at most one head may need the masked text pass (masked_text_tokens)")
        reads = set(self.objective.needs) | set(self.objective.gathered_keys)
        self.needs_full_image = not self.masking_heads or bool(reads & {"image_embed", "image_tokens", "image_normed"})
        if config.open_clip is not None:
            self._take_open_clip_scalars(config)

    def _take_open_clip_scalars(self, config: ModelConfig) -> None:
        """open_clip's `logit_scale` (and `logit_bias`) into the first head that holds open_clip's
        scalars (the head an open_clip export takes them from), so step 0 scores like open_clip."""
        from vlp.models import pretrained

        oc = config.open_clip
        build = pretrained.take_open_clip_part(oc.name, oc.pretrained, oc.strict, "scalars")
        pretrained.release_open_clip()
        for name, head in self.objective.heads.items():
            for scalar in getattr(type(head), "open_clip_scalars", ()) or ():
                source = getattr(build.model, scalar, None)
                if source is not None:
                    with torch.no_grad():
                        getattr(head, scalar).copy_(source.detach().reshape(getattr(head, scalar).shape))
            if getattr(type(head), "open_clip_scalars", None):
                return

    def encode_image(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.image(images)

    def encode_text(self, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.text(token_ids)

    def encode(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Run each tower once for every head: image, caption and, when a head needs them, the
        extra text groups (K sub-captions, report sentences) as one flattened text batch, and
        the image tower's masked pass ("visible_image_tokens" (B, K, E), "image_visible" (B, K)).
        With both passes a step costs the full pass plus about K / P of it (docs/ct.md)."""
        encoded = dict(self.encode_image(batch["image"])) if self.needs_full_image else {}
        if self.masking_heads:
            visible = self.masking_heads[0].visible_patches(batch, self.image.grid)  # (B, K)
            encoded["image_visible"] = visible.to(batch["image"].device)
            encoded.update(self.image.encode_visible(batch["image"], encoded["image_visible"]))
        encoded.update(self.encode_text(batch["text"]))
        if self.text_masking_heads:
            masked = self.encode_text(self.text_masking_heads[0].masked_text(batch))  # (B, L) ids, masked words = pad
            encoded["masked_text_tokens"], encoded["masked_text_mask"] = masked["text_tokens"], masked["text_mask"]
        for embed_key, batch_key in EXTRA_TEXT.items():
            if embed_key in self.objective.needs:
                groups = batch[batch_key]  # (B, K, L)
                b, k, length = groups.shape
                text = self.encode_text(groups.reshape(b * k, length))
                encoded[embed_key] = text["text_embed"].reshape(b, k, -1)  # (B, K, E)
                encoded[embed_key.replace("_embed", "_tokens")] = text["text_tokens"].reshape(b, k, length, -1)
                encoded[embed_key.replace("_embed", "_token_mask")] = text["text_mask"].reshape(b, k, length)
        return encoded

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.objective(self.encode(batch), batch)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.image.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Full parameter names exempt from weight decay besides gains and biases (ndim < 2)."""
        names = {f"image.{n}" for n in self.image.no_weight_decay()}
        names |= {f"text.{n}" for n in self.text.no_weight_decay()}
        for head_name, head in self.objective.heads.items():
            names |= {f"objective.heads.{head_name}.{n}" for n in head.no_weight_decay()}
        return names

    def lr_scales(self, layer_decay: dict[str, float]) -> dict[str, float]:
        """Layer-wise lr decay per tower (`{"image": 0.75, "text": 0.9}`): a parameter at depth d
        of a tower whose deepest is D gets lr * decay ** (D - d) (timm / BEiT convention, the
        towers' `layer_ids`); everything else (heads, towers without decay) keeps lr."""
        scales: dict[str, float] = {}
        for tower_name, decay in layer_decay.items():
            if decay == 1.0:
                continue
            ids = getattr(self, tower_name).layer_ids()
            if not ids:
                raise ConfigError(f"train.layer_decay.{tower_name}: the {type(getattr(self, tower_name)).__name__} "
                                 "tower does not say its layers (layer_ids)")
            top = max(ids.values())
            scales.update({f"{tower_name}.{n}": decay ** (top - d) for n, d in ids.items()})
        return scales

    def param_groups(self, weight_decay: float, layer_decay: dict[str, float] | None = None) -> list[dict[str, Any]]:
        """AdamW groups: no decay for gains, biases (ndim < 2), embeddings and learnable scalars.
        Locked parameters (requires_grad false) are left out, so they get no optimizer state.
        Each group carries its `lr_scale` (1 without `layer_decay`; with it, one group per
        (decay, scale)); the learning rate itself is the trainer's (`build_optimizer`)."""
        exempt = self.no_weight_decay()
        scales = self.lr_scales(layer_decay or {})
        groups: dict[tuple[bool, float], list] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            decays = not (param.ndim < 2 or name in exempt)
            groups.setdefault((decays, scales.get(name, 1.0)), []).append(param)
        if not scales:  # the plain two groups, in their old order (checkpoints of earlier runs load)
            return [{"params": groups.get((True, 1.0), []), "weight_decay": weight_decay, "lr_scale": 1.0},
                    {"params": groups.get((False, 1.0), []), "weight_decay": 0.0, "lr_scale": 1.0}]
        return [{"params": params, "weight_decay": weight_decay if decays else 0.0, "lr_scale": scale}
                for (decays, scale), params in sorted(groups.items(), key=lambda item: (not item[0][0], -item[0][1]))]


def scoring_head(model: VLPModel) -> Any:
    """The head whose geometry scores zero-shot and retrieval: the first (in config order) that
    declares `scores_embeddings` (cosine by default, a head's own geometry where it overrides
    `pairwise_scores`). A model question: evaluators and exporters both ask it."""
    for head in model.objective.heads.values():
        if head.scores_embeddings:
            return head
    return next(iter(model.objective.heads.values()))
