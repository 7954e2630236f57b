"""The heads' bounded-parameter rule (`models/heads/base.py`, `bounded`).

A scalar pushed outside its range must come back under every ZeRO stage. open_clip's in-place
clamp after the step cannot do that under ZeRO 2/3 (their fp32 master copy is written back over
the edit), and a clamp inside forward has zero gradient past the bound; `bounded` drops only
the outward part of the gradient, so the optimizer walks the parameter back in.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.dist_utils import run_ranks
from vlp.models.heads.base import HeadInputs, bounded
from vlp.models.heads.clip import ClipConfig, ClipHead
from vlp.models.heads.meru import MeruConfig, MeruHead
from vlp.models.heads.siglip import SigLipConfig, SigLipHead

EMBED = 8
# Outside the logit-scale bound log(100) by log(10): an Adam step of ~lr per step needs ~8 steps.
PUSHED_OUT = math.log(1000.0)
HIGH = math.log(100.0)


def test_gradient_is_dropped_only_where_it_points_further_out():
    value = torch.tensor([2.0, 2.0, -2.0, -2.0, 0.5, 0.5], requires_grad=True)
    out = bounded(value, -1.0, 1.0)
    torch.testing.assert_close(out.detach(), torch.tensor([1.0, 1.0, -1.0, -1.0, 0.5, 0.5]))
    grad = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    out.backward(grad)
    # Above 1: a positive grad (descent lowers it) passes, a negative one is dropped; below -1
    # the mirror image; inside, everything passes.
    torch.testing.assert_close(value.grad, torch.tensor([1.0, 0.0, 0.0, -1.0, 1.0, -1.0]))


class _TwoTowers(nn.Module):
    """Two linear towers and the clip, siglip and meru heads, each head's loss summed."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(EMBED, EMBED)
        self.text = nn.Linear(EMBED, EMBED)
        self.heads = nn.ModuleDict({
            "clip": ClipHead(ClipConfig(), EMBED),
            "siglip": SigLipHead(SigLipConfig(), EMBED),
            "meru": MeruHead(MeruConfig(), EMBED),
        })

    def forward(self, image_in: torch.Tensor, text_in: torch.Tensor) -> torch.Tensor:
        image, text = self.image(image_in), self.text(text_in)
        local = {"image_embed": image, "text_embed": text, "image_normed": nn.functional.normalize(image, dim=-1),
                 "text_normed": nn.functional.normalize(text, dim=-1)}
        inputs = HeadInputs(local=local, gathered={}, batch={})
        return sum(head(inputs)["loss"] for head in self.heads.values())


def _scales(engine) -> dict[str, float]:
    import deepspeed

    params = {name: head.logit_scale for name, head in engine.module.heads.items()}
    with deepspeed.zero.GatheredParameters(list(params.values())):  # a no-op below ZeRO 3
        return {name: param.detach().float().item() for name, param in params.items()}


def _train_from_outside(rank: int, world_size: int, zero_stage: int) -> dict[str, list[float]]:
    import os

    import deepspeed

    os.environ["LOCAL_RANK"] = str(rank)  # what a launcher sets; deepspeed.initialize reads it
    torch.manual_seed(0)
    model = _TwoTowers()
    with torch.no_grad():
        for head in model.heads.values():
            head.logit_scale.fill_(PUSHED_OUT)  # as an Adam overshoot could leave it
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.3, weight_decay=0.0)
    config = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": zero_stage},
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    # Unrelated image and text features: the loss falls with the logit scale, so every gradient
    # on it points back inside the bound.
    generator = torch.Generator().manual_seed(rank)
    image_in, text_in = torch.randn(2, 8, EMBED, generator=generator)
    history = {name: [value] for name, value in _scales(engine).items()}
    for _ in range(15):
        loss = engine(image_in, text_in)
        engine.backward(loss)
        engine.step()
        for name, value in _scales(engine).items():
            history[name].append(value)
    return history


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_scalar_pushed_outside_its_bound_comes_back(zero_stage):
    history = run_ranks(_train_from_outside, 2, zero_stage)[0]
    for name, values in history.items():
        assert values[0] == pytest.approx(PUSHED_OUT), name  # the engine kept the pushed-out value
        assert values[-1] < HIGH, f"{name} at ZeRO {zero_stage}: {values}"
