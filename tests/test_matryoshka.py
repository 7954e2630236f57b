"""Matryoshka heads: the loss is the weighted sum of the head's own loss on re-normalised
prefixes (reference: the plain head on sliced features), dense and tiled alike."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from vlp.models.heads.base import HeadInputs, MatryoshkaConfig
from vlp.models.heads.clip import ClipConfig, ClipHead, clip_loss
from vlp.models.heads.meru import MeruConfig, MeruHead
from vlp.models.heads.siglip import SigLipConfig, SigLipHead, siglip_loss

EMBED = 16
DIMS, WEIGHTS = [4, 8, 16], [0.5, 1.0, 2.0]


def _inputs(batch: int = 6, seed: int = 0) -> HeadInputs:
    generator = torch.Generator().manual_seed(seed)
    image, text = torch.randn(2, batch, EMBED, generator=generator)
    local = {"image_embed": image, "text_embed": text, "image_normed": F.normalize(image, dim=-1),
             "text_normed": F.normalize(text, dim=-1)}
    return HeadInputs(local=local, gathered={}, batch={})


@pytest.mark.parametrize("tile_size", [None, 4])
def test_clip_and_siglip_sum_their_prefix_losses(tile_size):
    inputs = _inputs()
    image, text = inputs.local["image_embed"], inputs.local["text_embed"]
    matryoshka = MatryoshkaConfig(dims=DIMS, weights=WEIGHTS)
    clip = ClipHead(ClipConfig(matryoshka=matryoshka, tile_size=tile_size), EMBED)
    siglip = SigLipHead(SigLipConfig(matryoshka=matryoshka, tile_size=tile_size), EMBED)
    want_clip = sum(w * clip_loss(F.normalize(image[:, :d], dim=-1), F.normalize(text[:, :d], dim=-1),
                                  torch.tensor([1 / 0.07])) for d, w in zip(DIMS, WEIGHTS))
    want_siglip = sum(w * siglip_loss(F.normalize(image[:, :d], dim=-1), F.normalize(text[:, :d], dim=-1),
                                      torch.tensor([10.0]), torch.tensor([-10.0])) for d, w in zip(DIMS, WEIGHTS))
    out = clip(inputs)
    torch.testing.assert_close(out["loss"], want_clip, rtol=1e-5, atol=1e-6)
    assert {f"loss@{d}" for d in DIMS} <= set(out["logging"])
    torch.testing.assert_close(siglip(inputs)["loss"], want_siglip, rtol=1e-5, atol=1e-6)
    assert clip.matryoshka_dims() == tuple(DIMS)


def test_meru_lifts_each_prefix_with_its_own_exp_map():
    inputs = _inputs()
    head = MeruHead(MeruConfig(matryoshka=MatryoshkaConfig(dims=[8, 16])), EMBED)
    want = 0.0
    for dim in (8, 16):
        plain = MeruHead(MeruConfig(), EMBED)
        plain.load_state_dict(head.state_dict())  # the same scalars (alpha from EMBED, not dim)
        local = {key: value[:, :dim] for key, value in inputs.local.items()}
        want = want + plain(HeadInputs(local=local, gathered={}, batch={}))["loss"]
    torch.testing.assert_close(head(inputs)["loss"], want, rtol=1e-5, atol=1e-6)


def test_matryoshka_config_is_validated():
    with pytest.raises(ValidationError, match="strictly increasing"):
        MatryoshkaConfig(dims=[32, 16])
    with pytest.raises(ValidationError, match="2 weights for 3 dims"):
        MatryoshkaConfig(dims=[4, 8, 16], weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="above model.embed_dim 16"):
        ClipHead(ClipConfig(matryoshka=MatryoshkaConfig(dims=[8, 32])), EMBED)
