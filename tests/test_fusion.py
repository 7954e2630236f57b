"""Cross-granularity fusion (models/fusion.py): shapes, what each output is, and what it may not see."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from vlp.models.fusion import CrossGranularityFusion, masked_mean

B, L, P, D = 3, 7, 5, 16


def _inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    text = torch.randn(B, L, D, generator=generator)
    mask = torch.arange(L)[None] < torch.tensor([[7], [4], [1]])  # (B, L): rows of 7, 4 and 1 real tokens
    patches = torch.randn(B, P, D, generator=generator)
    volume = torch.randn(B, D, generator=generator)
    return text, mask, patches, volume


def test_shapes_and_what_each_output_is():
    torch.manual_seed(0)
    fusion = CrossGranularityFusion(D, heads=4).eval()
    text, mask, patches, volume = _inputs()
    out = fusion(text, mask, patches, volume)
    assert out.tokens.shape == (B, L, D) and out.pooled.shape == (B, D)
    assert out.match.shape == (B,) and out.gate.shape == (B,) and out.attention.shape == (B, L, P)
    # The instance match is the cosine of the volume with the report's masked mean; the gate a sigmoid of it.
    assert_close(out.match, F.cosine_similarity(volume, masked_mean(text, mask), dim=-1))
    assert bool(((out.gate > 0) & (out.gate < 1)).all())
    assert_close(out.attention.sum(-1), torch.ones(B, L))  # each word's weights over the patches
    assert_close(out.pooled, masked_mean(out.tokens, mask))
    # Row 1's mean over its 4 real tokens, by hand.
    assert_close(out.pooled[1], out.tokens[1, :4].mean(0))


def test_tokens_outside_the_mask_do_not_reach_the_instance_level_or_the_pooled_vector():
    torch.manual_seed(0)
    fusion = CrossGranularityFusion(D, heads=4).eval()
    text, mask, patches, volume = _inputs()
    before = fusion(text, mask, patches, volume)
    changed = text.clone()
    changed[1, 4:] += 10.0  # row 1's padding
    after = fusion(changed, mask, patches, volume)
    assert_close(after.match, before.match)
    assert_close(after.pooled, before.pooled)
    assert_close(after.tokens[1, :4], before.tokens[1, :4])  # a word reads patches, not other words
    assert not torch.allclose(after.tokens[1, 4:], before.tokens[1, 4:])


def test_gradient_reaches_patches_volume_and_words():
    torch.manual_seed(0)
    fusion = CrossGranularityFusion(D, heads=2)
    text, mask, patches, volume = (t.requires_grad_() if t.is_floating_point() else t for t in _inputs())
    out = fusion(text, mask, patches, volume)
    (out.tokens.square().mean() + out.pooled.sum()).backward()
    for tensor in (text, patches, volume):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0
    assert all(p.grad is not None for p in fusion.parameters())


def test_a_patch_that_matches_a_word_gets_its_attention():
    """With identity projections and one patch equal to a word, that word attends mostly to it."""
    fusion = CrossGranularityFusion(D, heads=1).eval()
    with torch.no_grad():
        fusion.cross.in_proj_weight.copy_(torch.cat([torch.eye(D) * 4.0] * 3))
        fusion.cross.in_proj_bias.zero_()
    text, mask, patches, volume = _inputs()
    patches[0, 3] = text[0, 2]
    out = fusion(text, mask, patches, volume)
    assert int(out.attention[0, 2].argmax()) == 3


def test_the_fused_representation_survives_a_safetensors_export(tmp_path):
    """docs/ct.md's downstream path: export the whole model, load it back, fuse whole reports."""
    import yaml
    from conftest import DEMO_CONFIG

    from vlp.export import export_model
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config
    from vlp.train.weights import load_model

    tree = yaml.safe_load(DEMO_CONFIG.read_text())
    tree["model"] = {"embed_dim": 16,
                     "image": {"type": "monai_vit3d", "roi": [16, 16, 16], "patch_size": [8, 8, 8], "hidden_size": 16,
                               "mlp_dim": 32, "num_layers": 1, "num_heads": 2, "spacing": None},
                     "text": {"type": "open_clip_text", "context_length": 16, "width": 16, "heads": 2, "layers": 1},
                     "heads": {"ct_contrastive": {}, "masked_report": {"vocab_size": 49408, "decoder_dim": 16,
                                                                       "decoder_heads": 2}}}
    tree["evals"], tree["export"] = [], []
    config = load_config(tree=tree)
    torch.manual_seed(0)
    model = VLPModel(config.model).eval()
    export_model(model, config, tmp_path / "export", "safetensors")
    loaded, _ = load_model(tmp_path / "export")
    volumes = torch.randn(2, 1, 16, 16, 16)
    ids = model.text.tokenizer()(["A small nodule in the right upper region.", "No focal lesion."])
    outputs = []
    for net in (model, loaded):
        with torch.no_grad():
            image = net.encode_image(volumes)
            fusion, _ = net.objective.heads["masked_report"].fuse(image["image_embed"], image["image_tokens"], ids)
        outputs.append(fusion)
    assert outputs[0].pooled.shape == (2, 16)
    assert_close(outputs[1].pooled, outputs[0].pooled)
    assert_close(outputs[1].attention, outputs[0].attention)
