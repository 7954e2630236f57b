"""The dual encoder: one image (or volume) tower, one text tower, one objective of weighted heads."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlp.models.config import ModelConfig
from vlp.models.objective import Objective
from vlp.models.towers import IMAGE_TOWERS, TEXT_TOWERS

# Extra text groups a head can ask for in `needs`: encoded key -> batch key of (B, K, L) token ids.
EXTRA_TEXT = {"sub_text_embed": "sub_text", "sentence_embed": "sentences", "parent_text_embed": "parent_text"}


class VLPModel(nn.Module):
    """`forward(batch)` -> `{"loss", "logging"}`; `encode_image` / `encode_text` for evaluation.

    batch: {"image": (B, C, H, W) or (B, 1, D, H, W), "text": (B, L) token ids, ...}.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        embed_dim = config.embed_dim
        self.image = IMAGE_TOWERS.get(config.image.type)(config.image, embed_dim)
        self.text = TEXT_TOWERS.get(config.text.type)(config.text, embed_dim)
        self.objective = Objective(config.heads_dict(), embed_dim)

    def encode_image(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.image(images)

    def encode_text(self, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.text(token_ids)

    def encode(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Run each tower once for every head: image, caption and, when a head needs them, the
        extra text groups (K sub-captions, report sentences) as one flattened text batch."""
        encoded = dict(self.encode_image(batch["image"]))
        encoded.update(self.encode_text(batch["text"]))
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

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: no decay for gains, biases (ndim < 2), embeddings and learnable scalars."""
        exempt = self.no_weight_decay()
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or name in exempt else decay).append(param)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
