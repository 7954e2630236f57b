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
from vlp.models.heads import HEADS
from vlp.models.heads.base import bounded
from vlp.models.objective import Objective

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


# Every head with a learnable logit scale bounded above by log(max_logit_scale) = log(100).
BOUNDED_HEADS = ("clip", "siglip", "meru", "flair", "filip", "ct_align")


class _Towers(nn.Module):
    """One linear tower over every head's own example inputs (`Head.example_inputs`) and the
    `BOUNDED_HEADS` in one `Objective`, which gathers across ranks as in training."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.tower = nn.Linear(EMBED, EMBED)
        configs = {name: HEADS.get(name).config_class(**HEADS.get(name).example_config) for name in BOUNDED_HEADS}
        self.objective = Objective(configs, EMBED)
        # The heads' examples agree on shared keys' shapes; a later head's draw replaces an earlier one.
        self.encoded: dict[str, torch.Tensor] = {}
        self.batch: dict = {}
        for name, config in configs.items():
            encoded, batch = HEADS.get(name).example_inputs(config, 8, EMBED, generator)
            self.encoded.update(encoded)
            self.batch.update(batch)

    def forward(self) -> torch.Tensor:
        encoded = {key: self.tower(value) if value.is_floating_point() else value
                   for key, value in self.encoded.items()}
        return self.objective(encoded, self.batch)["loss"]


def _scales(engine) -> dict[str, float]:
    import deepspeed

    params = {name: head.logit_scale for name, head in engine.module.objective.heads.items()}
    with deepspeed.zero.GatheredParameters(list(params.values())):  # a no-op below ZeRO 3
        return {name: param.detach().float().item() for name, param in params.items()}


def _train_from_outside(rank: int, world_size: int, zero_stage: int) -> dict[str, list[float]]:
    import os

    import deepspeed

    os.environ["LOCAL_RANK"] = str(rank)  # what a launcher sets; deepspeed.initialize reads it
    torch.manual_seed(0)
    # Unrelated image and text features, different on each rank: the loss falls with the logit
    # scale, so every gradient on it points back inside the bound.
    model = _Towers(torch.Generator().manual_seed(rank))
    with torch.no_grad():
        for head in model.objective.heads.values():
            head.logit_scale.fill_(PUSHED_OUT)  # as an Adam overshoot could leave it
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.3, weight_decay=0.0)
    config = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": zero_stage},
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    history = {name: [value] for name, value in _scales(engine).items()}
    for _ in range(15):
        loss = engine()
        engine.backward(loss)
        engine.step()
        for name, value in _scales(engine).items():
            history[name].append(value)
    return history


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_scalar_pushed_outside_its_bound_comes_back(zero_stage):
    history = run_ranks(_train_from_outside, 2, zero_stage)[0]
    assert set(history) == set(BOUNDED_HEADS)
    for name, values in history.items():
        assert values[0] == pytest.approx(PUSHED_OUT), name  # the engine kept the pushed-out value
        assert values[-1] < HIGH, f"{name} at ZeRO {zero_stage}: {values}"
