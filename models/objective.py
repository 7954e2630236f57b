"""One objective: the weighted sum of any mix of registered heads.

The trainer calls `Objective(encoded, batch)` and gets `{"loss", "logging"}` whatever heads run,
so it never branches on model type. Features are L2-normalised and gathered across ranks here,
once per step, and every head reuses them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlp.core.collectives import gather_with_grad, world
from vlp.models.heads.base import HEADS, HeadConfig, HeadInputs

# Derived features the objective can build from the encoder outputs on demand.
_NORMED = {"image_normed": "image_embed", "text_normed": "text_embed"}


class Objective(nn.Module):
    def __init__(self, heads: dict[str, HeadConfig], embed_dim: int) -> None:
        super().__init__()
        if not heads:
            raise ValueError("model.heads: at least one head is required")
        self.heads = nn.ModuleDict({name: HEADS.get(name)(cfg, embed_dim) for name, cfg in heads.items()})
        self.weights = {name: float(cfg.weight) for name, cfg in heads.items()}
        self.needs = sorted({key for head in self.heads.values() for key in head.needs})
        self.gathered_keys = sorted({key for head in self.heads.values() for key in head.gathered_keys})

    def forward(self, encoded: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
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
