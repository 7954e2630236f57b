"""Helpers shared by evaluators: the scoring head, batched class embeddings, rank reductions."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def scoring_head(model: Any) -> Any:
    """The head whose geometry scores zero-shot and retrieval: the first (in config order) that
    declares `scores_embeddings` (cosine for clip/siglip, Lorentzian for meru, ...)."""
    for head in model.objective.heads.values():
        if getattr(head, "scores_embeddings", False):
            return head
    return next(iter(model.objective.heads.values()))


def encode_texts(model: Any, texts: list[str], device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Raw text embeddings (N, E) of `texts`, in batches, fp32."""
    tokenizer = model.text.tokenizer()
    out = []
    for start in range(0, len(texts), batch_size):
        ids = tokenizer(texts[start : start + batch_size]).to(device)
        out.append(model.encode_text(ids)["text_embed"].float())
    return torch.cat(out) if out else torch.zeros(0, model.objective.heads[next(iter(model.objective.heads))].embed_dim)


def class_embeddings(
    model: Any, classnames: list[str], templates: list[str], device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """(C, E) class embeddings: every template for every class, encoded in batches of prompts
    (not one class at a time), then averaged by the scoring head's own rule."""
    prompts = [t.replace("{c}", name) if "{c}" in t else t.format(name) for name in classnames for t in templates]
    embeds = encode_texts(model, prompts, device, batch_size)  # (C*T, E)
    embeds = embeds.reshape(len(classnames), len(templates), -1)  # (C, T, E)
    return scoring_head(model).prompt_ensemble(embeds)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor
