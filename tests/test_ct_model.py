"""The 3-D tower and the CT heads: MONAI/UNETR state-dict compatibility, patch order, the
sentence-to-patch alignment on hand-made tensors (independent loop reference, gradcheck, normal
sentences masked), 2 gloo ranks against one process, masked volume modelling (the tower's masked
pass, keyed masks, the model's two passes, masks across a state-dict restore), the
ct_contrastive head against open_clip, and the CT evaluator's AUROC and pointing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_ranks

from vlp.models.heads.base import HeadInputs
from vlp.models.heads.ct_align import (
    CtAlignConfig,
    CtAlignHead,
    alignment_loss,
    cross_region_scores,
    patch_scores,
    selection_weights,
    sentence_regions,
)
from vlp.models.heads.ct_contrastive import CtContrastiveConfig, CtContrastiveHead
from vlp.models.heads.masked_volume import (
    MaskedVolumeConfig,
    MaskedVolumeHead,
    keyed_visible_patches,
    mask_from_visible,
    patchify,
    reconstruction_loss,
)
from vlp.models.towers.volume import MonaiViT3D, MonaiViT3DConfig


def small_tower(**overrides) -> MonaiViT3D:
    options = dict(roi=(16, 16, 8), patch_size=(8, 8, 4), hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4)
    options.update(overrides)
    return MonaiViT3D(MonaiViT3DConfig(**options), embed_dim=24)


# ---------------------------------------------------------------------------------------------
# tower


def test_tower_shapes_and_mean_pool_matches_monai_vit():
    torch.manual_seed(0)
    tower = small_tower().eval()
    volumes = torch.randn(3, 1, 16, 16, 8)
    out = tower(volumes)
    assert out["image_embed"].shape == (3, 24) and out["image_tokens"].shape == (3, 8, 24)
    hidden, _ = tower.vit(volumes)  # MONAI's own forward: (B, P, W) after the final norm
    torch.testing.assert_close(out["image_tokens"], tower.proj(hidden))
    torch.testing.assert_close(out["image_embed"], tower.proj(hidden.mean(1)))


def _einsum_reference(tower: MonaiViT3D) -> MonaiViT3D:
    """A copy of `tower` on MONAI's einsum attention (the path the tower ran before SDPA)."""
    import copy

    reference = copy.deepcopy(tower)
    for block in reference.vit.blocks:
        block.attn.use_flash_attention = False
    return reference


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_sdpa_attention_equals_monai_einsum_path_forward_and_backward(pool, monkeypatch):
    torch.manual_seed(0)
    tower = small_tower(pool=pool).train()
    reference = _einsum_reference(tower)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    volumes = torch.randn(3, 1, 16, 16, 8)
    outputs = [model(volumes) for model in (tower, reference)]
    assert len(calls) == 2  # one SDPA per block in the tower, none in the reference
    for key in ("image_embed", "image_tokens"):
        torch.testing.assert_close(outputs[0][key], outputs[1][key], atol=1e-5, rtol=1e-5)
    for model, out in zip((tower, reference), outputs):
        (out["image_embed"].square().sum() + out["image_tokens"].sin().sum()).backward()
    for (name, param), ref in zip(tower.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, ref.grad, atol=1e-5, rtol=1e-5, msg=name)
    # No parameter or buffer moved: checkpoints and UNETR exports keep loading.
    assert list(tower.state_dict()) == list(reference.state_dict())


def test_sdpa_attention_dropout_only_in_training():
    torch.manual_seed(0)
    tower = small_tower(dropout_rate=0.5).eval()
    volumes = torch.randn(2, 1, 16, 16, 8)
    torch.testing.assert_close(tower(volumes)["image_embed"], _einsum_reference(tower)(volumes)["image_embed"])
    tower.train()
    assert not torch.equal(tower(volumes)["image_embed"], tower(volumes)["image_embed"])
    tower.eval()  # back to deterministic
    torch.testing.assert_close(tower(volumes)["image_embed"], tower(volumes)["image_embed"])


def test_max_pool_is_the_elementwise_max_of_monai_hidden_states():
    torch.manual_seed(0)
    tower = small_tower(pool="max").eval()
    volumes = torch.randn(3, 1, 16, 16, 8)
    hidden, _ = tower.vit(volumes)  # (B, P, W)
    pooled = tower(volumes)["image_embed"]
    torch.testing.assert_close(pooled, tower.proj(hidden.amax(1)))
    assert not torch.allclose(pooled, tower.proj(hidden.mean(1)))


def test_cls_pool_and_separate_token_projection():
    tower = small_tower(pool="cls", token_proj="separate")
    out = tower(torch.randn(2, 1, 16, 16, 8))
    assert out["image_tokens"].shape == (2, 8, 24)
    assert "cls_token" in tower.no_weight_decay()
    assert not any(name.startswith("vit.cls_token") for name, _ in tower.named_parameters())


def test_vit_weights_load_into_monai_unetr():
    from monai.networks.nets import UNETR

    tower = small_tower(roi=(32, 32, 32), patch_size=(16, 16, 16), hidden_size=48, mlp_dim=96, num_layers=12, num_heads=4)
    unetr = UNETR(in_channels=1, out_channels=2, img_size=(32, 32, 32), hidden_size=48, mlp_dim=96, num_heads=4)
    unetr.vit.load_state_dict(tower.monai_state_dict(), strict=True)
    volumes = torch.randn(1, 1, 32, 32, 32)
    tower.eval(), unetr.eval()
    torch.testing.assert_close(unetr.vit(volumes)[0], tower.features(volumes)[1])


def test_token_order_is_the_patchify_order():
    """Token p is patch p of `patchify`: the conv patch embedding equals a matmul on patchify."""
    tower = small_tower()
    volumes = torch.randn(2, 1, 16, 16, 8)
    conv = tower.vit.patch_embedding.patch_embeddings
    by_conv = conv(volumes).flatten(2).transpose(1, 2)  # (B, P, W), MONAI's order
    by_patchify = patchify(volumes, (8, 8, 4)) @ conv.weight.reshape(conv.weight.shape[0], -1).T + conv.bias
    torch.testing.assert_close(by_conv, by_patchify, atol=1e-5, rtol=1e-5)


def test_tower_rejects_wrong_volume_size_and_bad_config():
    with pytest.raises(ValueError, match=r"expects volumes \(B, 1, 16, 16, 8\)"):
        small_tower()(torch.randn(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="roi\\[2\\]=10 is not a multiple"):
        MonaiViT3DConfig(roi=(16, 16, 10), patch_size=(8, 8, 4))


def test_tower_preprocess_is_the_volume_pipeline():
    prep = small_tower(spacing=None, hu_window=(-100.0, 100.0)).preprocess(train=False)
    assert prep.wants_sample and prep.roi == (16, 16, 8) and prep.hu_window == (-100.0, 100.0)


# ---------------------------------------------------------------------------------------------
# ct_align on hand-made tensors


def _hand_made(batch: int = 2, sentences: int = 3, patches: int = 6, dim: int = 12):
    """Patch tokens are distinct noisy basis vectors; sentence (b, s) matches patch targets[b, s]."""
    basis = torch.eye(dim)
    tokens = torch.zeros(batch, patches, dim)
    for b in range(batch):
        for p in range(patches):
            tokens[b, p] = basis[(b * patches + p) % dim] + 0.05 * torch.randn(dim)
    targets = torch.tensor([[0, 2, 4], [1, 3, 5]])[:batch, :sentences]
    text = torch.stack([tokens[b, targets[b]] for b in range(batch)]) + 0.01 * torch.randn(batch, sentences, dim)
    return tokens, text, targets


def test_selection_picks_the_patches_each_sentence_describes():
    torch.manual_seed(0)
    tokens, text, targets = _hand_made()
    scores = patch_scores(tokens, text)
    weights = selection_weights(scores, "topk", 1, 0.1)
    assert torch.equal(weights.argmax(-1), targets)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3))
    top2 = selection_weights(scores, "topk", 2, 0.1)
    assert int((top2 > 0).sum(-1).max()) == 2
    regions, _ = sentence_regions(tokens, text, "topk", 1, 0.1)
    expected = F.normalize(torch.stack([tokens[b, targets[b]] for b in range(2)]), dim=-1)
    torch.testing.assert_close(regions, expected)
    soft = selection_weights(scores, "softmax", 1, 0.1)
    assert (soft > 0).all() and torch.equal(soft.argmax(-1), targets)


def _reference_alignment(sentences, tokens, owners, scale, k, temperature):
    """An independent loop: pool sentence i over volume b (top-k softmax), CE over volumes."""
    losses = []
    for i in range(sentences.shape[0]):
        s = sentences[i] / sentences[i].norm()
        logits = []
        for b in range(tokens.shape[0]):
            patches = tokens[b] / tokens[b].norm(dim=-1, keepdim=True)
            scores = patches @ s
            top = scores.topk(k)
            weights = (top.values / temperature).softmax(0)
            region = (weights[:, None] * patches[top.indices]).sum(0)
            logits.append(scale * s @ (region / region.norm()))
        losses.append(-torch.stack(logits).log_softmax(0)[owners[i]])
    return torch.stack(losses).mean()


def test_alignment_loss_matches_a_loop_reference_and_gradcheck():
    torch.manual_seed(1)
    sentences = torch.randn(5, 6, dtype=torch.double)
    tokens = torch.randn(3, 7, 6, dtype=torch.double)
    owners = torch.tensor([0, 0, 1, 2, 2])
    scale = torch.tensor([10.0], dtype=torch.double)
    loss, _ = alignment_loss(cross_region_scores(sentences, tokens, "topk", 2, 0.5), owners, scale)
    torch.testing.assert_close(loss, _reference_alignment(sentences, tokens, owners, 10.0, 2, 0.5))
    s = sentences.clone().requires_grad_(True)
    t = tokens.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: alignment_loss(cross_region_scores(a, b, "topk", 2, 0.5), owners, scale)[0], (s, t)
    )


def test_own_volume_wins_only_where_the_finding_is():
    """The sentence pooled over every volume: only the volume with the matching patch wins,
    although the top-k selection makes every region look like the sentence somewhat."""
    torch.manual_seed(0)
    tokens = F.normalize(torch.randn(4, 16, 32), dim=-1)
    lesion = F.normalize(torch.randn(32), dim=0)
    tokens[2, 5] = lesion  # only volume 2 holds the finding
    similarity = cross_region_scores(lesion[None], tokens, "topk", 1, 0.1)  # (1, 4)
    assert int(similarity.argmax()) == 2
    loss_right, _ = alignment_loss(similarity, torch.tensor([2]), torch.tensor([10.0]))
    loss_wrong, _ = alignment_loss(similarity, torch.tensor([0]), torch.tensor([10.0]))
    assert loss_right < loss_wrong


def test_duplicates_are_removed_from_negatives():
    similarity = torch.tensor([[0.9, 0.8, 0.1]])
    exclude = torch.tensor([[True, True, False]])  # the owner is never excluded
    loss, _ = alignment_loss(similarity, torch.tensor([0]), torch.tensor([10.0]), exclude=exclude)
    reference = F.cross_entropy(torch.tensor([[9.0, float("-inf"), 1.0]]), torch.tensor([0]))
    torch.testing.assert_close(loss, reference)


def _head_inputs(tokens, text, mask, normal, rank=0, world_size=1, caption=None):
    batch = {"sentence_mask": mask, "sentence_normal": normal}
    if caption is not None:
        batch = {"sentence_mask": mask, "caption": caption}
    return HeadInputs(local={"image_tokens": tokens, "sentence_embed": text}, gathered={}, batch=batch,
                      rank=rank, world_size=world_size)


def test_normal_sentences_are_masked_out_of_the_alignment():
    torch.manual_seed(2)
    tokens, text, _ = _hand_made()
    head = CtAlignHead(CtAlignConfig(topk=1, dedup_threshold=None), embed_dim=12)
    mask = torch.ones(2, 3, dtype=torch.bool)
    normal = torch.tensor([[False, False, True], [False, True, False]])
    out = head(_head_inputs(tokens, text, mask, normal))
    changed = text.clone()
    changed[0, 2] = torch.randn(12) * 5  # a normal sentence: whatever it says changes nothing
    changed[1, 1] = torch.randn(12) * 5
    torch.testing.assert_close(head(_head_inputs(tokens, changed, mask, normal))["loss"], out["loss"])
    assert out["logging"]["aligned_sentences"] == 4
    assert out["logging"]["accuracy"] == 1.0  # each sentence finds its own volume
    # Derived from the captions when the loader sends no flags ("No effusion." is normal).
    caption = ["FINDINGS: A nodule. A cyst. No effusion.", "A mass. Heart is not enlarged. A cyst."]
    derived = head(_head_inputs(tokens, text, mask, None, caption=caption))
    torch.testing.assert_close(derived["loss"], out["loss"])
    # Sentences paired with the wrong volumes score a higher loss.
    swapped = text[[1, 0]]
    assert head(_head_inputs(tokens, swapped, mask, normal))["loss"] > out["loss"]


def test_alignment_with_no_valid_sentence_is_zero_but_connected():
    tokens = torch.randn(2, 4, 8, requires_grad=True)
    text = torch.randn(2, 3, 8, requires_grad=True)
    head = CtAlignHead(CtAlignConfig(), embed_dim=8)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out = head(_head_inputs(tokens, text, mask, mask))
    assert float(out["loss"].detach()) == 0.0
    out["loss"].backward()
    assert tokens.grad is not None


def _rank_alignment(rank: int, world_size: int, tokens, text, mask, normal):
    torch.manual_seed(0)
    head = CtAlignHead(CtAlignConfig(topk=2, dedup_threshold=None), embed_dim=tokens.shape[-1])
    per = tokens.shape[0] // world_size
    part = slice(rank * per, (rank + 1) * per)
    local_tokens = tokens[part].clone().requires_grad_(True)
    local_text = text[part].clone().requires_grad_(True)
    loss = head(_head_inputs(local_tokens, local_text, mask[part], normal[part], rank, world_size))["loss"]
    loss.backward()
    # numpy, not tensors: shared-memory tensors die with the worker process before the parent reads them.
    return loss.item(), local_tokens.grad.numpy(), local_text.grad.numpy()


def test_two_gloo_ranks_equal_one_process():
    torch.manual_seed(3)
    tokens, text = torch.randn(4, 6, 8), torch.randn(4, 3, 8)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    normal = torch.tensor([[0, 1, 0], [0, 0, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    single_loss, single_tokens, single_text = _rank_alignment(0, 1, tokens, text, mask, normal)
    results = run_ranks(_rank_alignment, 2, tokens, text, mask, normal)
    # DDP averages gradients over ranks; the per-rank normaliser makes that the global gradient.
    assert sum(r[0] for r in results) / 2 == pytest.approx(single_loss, rel=1e-5)
    grad_tokens = torch.from_numpy(np.concatenate([r[1] for r in results])) / 2
    grad_text = torch.from_numpy(np.concatenate([r[2] for r in results])) / 2
    single_tokens, single_text = torch.from_numpy(single_tokens), torch.from_numpy(single_text)
    # Each rank's local grad holds every rank's loss terms (gather_with_grad reduce-scatters),
    # i.e. world_size times its share of the global-mean gradient; halved, it is that gradient.
    torch.testing.assert_close(grad_tokens, single_tokens, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad_text, single_text, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# masked_volume


def test_patchify_and_keyed_masks():
    volumes = torch.arange(2 * 16 * 16 * 8, dtype=torch.float32).reshape(2, 1, 16, 16, 8)
    patches = patchify(volumes, (8, 8, 4))
    assert patches.shape == (2, 8, 256)
    # Patch (i, j, k) = (1, 0, 1) is token 1 * 4 + 0 * 2 + 1 = 5.
    torch.testing.assert_close(patches[0, 5], volumes[0, 0, 8:16, 0:8, 4:8].reshape(-1))
    visible = keyed_visible_patches(["a", "b", "c"], seed=7, step=0, patches=8, ratio=0.75)
    assert visible.shape == (3, 2) and (visible.diff(dim=1) > 0).all()
    assert mask_from_visible(visible, 8).sum(1).tolist() == [6, 6, 6]


def test_keyed_masks_depend_on_the_sample_not_the_batch():
    """A sample's mask is the same whichever batch (hence rank) holds it and wherever in it: two
    ranks of 2 draw exactly what one process of 4 draws; another step or seed draws anew."""
    keys = ["s0", "s1", "s2", "s3"]
    one_process = keyed_visible_patches(keys, seed=3, step=5, patches=64, ratio=0.75)
    ranks = [keyed_visible_patches(keys[r * 2 : (r + 1) * 2], seed=3, step=5, patches=64, ratio=0.75) for r in range(2)]
    assert torch.equal(torch.cat(ranks), one_process)
    shuffled = keyed_visible_patches(keys[::-1], seed=3, step=5, patches=64, ratio=0.75)
    assert torch.equal(shuffled, one_process.flip(0))
    assert not torch.equal(keyed_visible_patches(keys, seed=3, step=6, patches=64, ratio=0.75), one_process)
    assert not torch.equal(keyed_visible_patches(keys, seed=4, step=5, patches=64, ratio=0.75), one_process)


def test_masked_pass_sees_only_the_visible_patches():
    """encode_visible with every patch visible is the full pass; with a subset, its tokens are
    unchanged by anything in the masked patches' voxels (the encoder never sees them) and
    equal the blocks run on the kept patch embeddings (an independent loop over MONAI's ViT)."""
    torch.manual_seed(0)
    tower = small_tower().eval()
    volumes = torch.randn(2, 1, 16, 16, 8)
    everything = torch.arange(8).expand(2, -1)
    torch.testing.assert_close(tower.encode_visible(volumes, everything)["visible_image_tokens"],
                               tower(volumes)["image_tokens"])
    visible = torch.tensor([[0, 5], [3, 6]])
    out = tower.encode_visible(volumes, visible)["visible_image_tokens"]
    assert out.shape == (2, 2, 24)
    changed = volumes + 5.0 * (1 - _voxel_mask(visible, (16, 16, 8), (8, 8, 4)))  # alter masked voxels only
    torch.testing.assert_close(tower.encode_visible(changed, visible)["visible_image_tokens"], out)
    for row in range(2):
        x = tower.vit.patch_embedding(volumes[row : row + 1])[:, visible[row]]  # (1, K, W)
        for block in tower.vit.blocks:
            x = block(x)
        torch.testing.assert_close(out[row], tower.proj(tower.vit.norm(x))[0], atol=1e-5, rtol=1e-5)


def _voxel_mask(visible: torch.Tensor, roi, patch_size) -> torch.Tensor:
    """(B, K) visible patches -> (B, 1, H, W, D) 1.0 on their voxels, 0.0 elsewhere."""
    grid = [n // p for n, p in zip(roi, patch_size)]
    cells = torch.zeros(visible.shape[0], int(np.prod(grid)))
    cells.scatter_(1, visible, 1.0)
    cells = cells.reshape(-1, 1, *grid)
    for axis, p in enumerate(patch_size):
        cells = cells.repeat_interleave(p, dim=2 + axis)
    return cells


def test_reconstruction_loss_closed_form():
    prediction = torch.zeros(1, 2, 4)
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]]])
    mask = torch.tensor([[True, False]])
    # Raw MSE on patch 0 only: (1 + 4 + 9 + 16) / 4.
    assert float(reconstruction_loss(prediction, target, mask, norm_target=False)) == pytest.approx(7.5)
    # Standardised target of patch 0 has mean 0, variance 1 -> MSE against 0 is 1 (up to eps).
    assert float(reconstruction_loss(prediction, target, mask, norm_target=True)) == pytest.approx(1.0, rel=1e-5)


def test_masked_volume_head_trains_the_visible_tokens():
    tower = small_tower()
    head = MaskedVolumeHead(MaskedVolumeConfig(patch_size=(8, 8, 4), decoder_dim=32, decoder_heads=4), embed_dim=24)
    volumes = torch.randn(2, 1, 16, 16, 8)
    batch = {"image": volumes, "key": ["a", "b"]}
    visible = head.visible_patches(batch, tower.grid)  # (2, 2): 6 of 8 masked
    tokens = tower.encode_visible(volumes, visible)["visible_image_tokens"]
    out = head(HeadInputs(local={"visible_image_tokens": tokens, "image_visible": visible}, gathered={}, batch=batch))
    assert out["loss"].ndim == 0 and out["logging"]["masked_patches"] == 6
    out["loss"].backward()
    assert tower.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    bad = MaskedVolumeHead(MaskedVolumeConfig(patch_size=(4, 4, 4), decoder_dim=32), embed_dim=24)
    with pytest.raises(ValueError, match="set model.heads.masked_volume.patch_size"):
        bad.visible_patches(batch, tower.grid)


def test_loss_counts_only_the_masked_patches():
    """The prediction at visible patches does not enter the loss: its gradient there is 0."""
    torch.manual_seed(0)
    prediction = torch.randn(2, 8, 16, requires_grad=True)
    visible = torch.tensor([[1, 4], [0, 7]])
    mask = mask_from_visible(visible, 8)
    reconstruction_loss(prediction, torch.randn(2, 8, 16), mask).backward()
    per_patch = prediction.grad.abs().sum(-1)  # (2, 8)
    assert (per_patch[~mask] == 0).all() and (per_patch[mask] > 0).all()


def _mae_model(**heads):
    """A tiny VLPModel on 16^3 volumes (8 patches) with the masked pass; `heads` as in the config."""
    import yaml
    from conftest import DEMO_CONFIG

    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    tree = yaml.safe_load(DEMO_CONFIG.read_text())
    tree["data"] = {"train": [{"urls": "unused.tar"}]}
    tree["model"] = {
        "embed_dim": 16,
        "image": {"type": "monai_vit3d", "roi": [16, 16, 16], "patch_size": [8, 8, 8], "hidden_size": 16,
                  "mlp_dim": 32, "num_layers": 1, "num_heads": 2, "spacing": None},
        "text": {"type": "open_clip_text", "context_length": 8, "width": 16, "heads": 2, "layers": 1},
        "heads": heads,
    }
    tree["evals"], tree["export"] = [], []
    torch.manual_seed(0)
    return VLPModel(load_config(tree=tree).model)


def _mae_batch(keys):
    generator = torch.Generator().manual_seed(1)
    return {"image": torch.randn(len(keys), 1, 16, 16, 16, generator=generator),
            "text": torch.randint(1, 100, (len(keys), 8), generator=generator), "key": list(keys)}


MAE_HEAD = {"masked_volume": {"patch_size": [8, 8, 8], "decoder_dim": 8, "decoder_heads": 2}}


def test_model_runs_both_passes_and_new_masks_each_step():
    model = _mae_model(ct_contrastive={}, **MAE_HEAD).train()
    head = model.objective.heads["masked_volume"]
    batch = _mae_batch(["a", "b", "c"])
    first = model.encode(batch)
    assert first["image_tokens"].shape == (3, 8, 16)  # the full pass, for ct_contrastive
    assert first["visible_image_tokens"].shape == (3, 2, 16) and first["image_visible"].shape == (3, 2)
    second = model.encode(batch)
    assert int(head.mask_step) == 2 and not torch.equal(first["image_visible"], second["image_visible"])
    model.eval()
    model.encode(batch)
    assert int(head.mask_step) == 2  # evaluation draws no training masks
    model(batch)["loss"].backward()
    assert model.image.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_masked_only_model_skips_the_full_pass():
    model = _mae_model(**MAE_HEAD).train()
    encoded = model.encode(_mae_batch(["a", "b"]))
    assert "image_tokens" not in encoded and "image_embed" not in encoded
    assert torch.isfinite(model(_mae_batch(["a", "b"]))["loss"])


def test_masks_resume_from_the_state_dict():
    """A model restored from a state dict draws the masks the original draws next (the seed and
    the step are buffers, so a checkpoint carries them); a fresh init with another seed differs."""
    model = _mae_model(**MAE_HEAD).train()
    batch = _mae_batch(["a", "b", "c"])
    for _ in range(3):
        model.encode(batch)
    restored = _mae_model(**MAE_HEAD).train()
    torch.manual_seed(99)
    other = type(restored)(restored.config).train()  # another init RNG: another mask seed
    restored.load_state_dict(model.state_dict())
    assert torch.equal(restored.encode(batch)["image_visible"], model.encode(batch)["image_visible"])
    assert int(other.objective.heads["masked_volume"].mask_seed) != int(restored.objective.heads["masked_volume"].mask_seed)


# ---------------------------------------------------------------------------------------------
# ct_contrastive


def test_ct_contrastive_equals_open_clip_loss():
    from open_clip.loss import ClipLoss

    torch.manual_seed(4)
    image = F.normalize(torch.randn(6, 16), dim=-1)
    text = F.normalize(torch.randn(6, 16), dim=-1)
    head = CtContrastiveHead(CtContrastiveConfig(init_temperature=0.05), embed_dim=16)
    out = head(HeadInputs(local={"image_normed": image, "text_normed": text}, gathered={}, batch={}))
    reference = ClipLoss()(image, text, torch.tensor(20.0))
    torch.testing.assert_close(out["loss"], reference)


# ---------------------------------------------------------------------------------------------
# evaluator maths


def test_auroc_per_class_skips_single_label_classes():
    from sklearn.metrics import roc_auc_score

    from vlp.train.evals.ct import auroc_per_class

    probabilities = np.array([[0.9, 0.1], [0.2, 0.3], [0.7, 0.8]])
    labels = np.array([[1, 0], [0, 0], [1, 0]])
    out = auroc_per_class(probabilities, labels, ["a", "b"])
    assert out == {"a": roc_auc_score([1, 0, 1], [0.9, 0.2, 0.7])}


def test_ct_evaluator_runs_on_a_tiny_semi_synthetic_split(tmp_path):
    from types import SimpleNamespace

    from vlp.data_pipelines.sources import build
    from vlp.train.evals.base import EvalContext
    from vlp.train.evals.ct import CtEvalConfig, CtEvaluator

    build("ct-lesions", tmp_path, train_size=1, test_size=8, size=16, spacing=8.0, seed=1)
    tower = small_tower(roi=(16, 16, 16), patch_size=(8, 8, 8), spacing=None, hu_window=(-200.0, 400.0))

    class Text(torch.nn.Module):
        def tokenizer(self):
            return lambda texts: torch.tensor([[hash(t) % 997] for t in texts])

    embed = torch.nn.Embedding(997, 24)
    model = SimpleNamespace(
        image=tower, text=Text(), training=False, eval=lambda: None, train=lambda mode=True: None,
        parameters=lambda: iter(()),
        encode_image=tower, encode_text=lambda ids: {"text_embed": embed(ids[:, 0])},
        objective=SimpleNamespace(heads={"ct_contrastive": CtContrastiveHead(CtContrastiveConfig(), 24)}),
    )
    config = CtEvalConfig(data=str(tmp_path / "ct-lesions-test-000000.tar"), batch_size=3,
                          classes={"nodule": "nodule", "cyst": "cyst", "calcification": "calcification",
                                   "mass": "mass", "fat": "fat-containing lesion"})
    results = CtEvaluator(config).run(model, EvalContext())
    assert results["ct_samples"] == 8
    assert 0.0 <= results["ct_pointing_chance"] <= 1.0 and results["ct_pointing_sentences"] > 0
    assert 0.0 <= results["ct_pointing_acc"] <= 1.0
    assert all(0.0 <= v <= 1.0 for k, v in results.items() if k.startswith("ct_auroc/"))
