"""CLIP and SigLIP heads and the tiled kernels, checked against open_clip's own losses
(ClipLoss, SigLipLoss) on one rank and on real gloo ranks, against dense autograd references, and
with float64 gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_ranks
from open_clip.loss import ClipLoss, SigLipLoss
from pydantic import ValidationError
from torch.testing import assert_close

from vlp.core.collectives import gather_with_grad
from vlp.models.heads import HEADS, HeadInputs
from vlp.models.heads.clip import (
    ClipConfig,
    ClipHead,
    clip_loss,
    clip_loss_and_accuracy,
)
from vlp.models.heads.siglip import SigLipConfig, SigLipHead, siglip_loss
from vlp.models.heads.tiled import (
    tiled_cross_entropy,
    tiled_sigmoid_loss,
    tiled_symmetric_cross_entropy,
)

TOL = dict(rtol=1e-5, atol=1e-5)
EMBED = 16
# A forced tile that divides neither the local nor the global batch.
TILE = 3


def _features(num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(num, EMBED, generator=generator), dim=-1)
    # Texts correlated with their images, so the positives are not all lost in the noise.
    text = F.normalize(image + 0.8 * torch.randn(num, EMBED, generator=generator), dim=-1)
    return image, text


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def _grads(loss: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, leaves))


# --- one rank against open_clip -------------------------------------------------------------


@pytest.mark.parametrize("tile_size", [None, TILE, 64])
def test_clip_loss_matches_open_clip_one_rank(tile_size):
    image, text = _features(11, seed=0)
    scale = torch.tensor([14.0])
    ours = _leaves(image, text, scale)
    ref = _leaves(image, text, scale)
    loss = clip_loss(*ours, tile_size=tile_size)
    ref_loss = ClipLoss()(*ref)
    assert_close(loss, ref_loss, **TOL)
    for grad, ref_grad in zip(_grads(loss, ours), _grads(ref_loss, ref)):
        assert_close(grad, ref_grad, **TOL)


@pytest.mark.parametrize("tile_size", [None, TILE])
def test_siglip_loss_matches_open_clip_one_rank(tile_size):
    image, text = _features(11, seed=1)
    scale, bias = torch.tensor([10.0]), torch.tensor([-3.0])
    ours = _leaves(image, text, scale, bias)
    ref = _leaves(image, text, scale, bias)
    loss = siglip_loss(*ours, tile_size=tile_size)
    ref_loss = SigLipLoss()(*ref)
    assert_close(loss, ref_loss, **TOL)
    for grad, ref_grad in zip(_grads(loss, ours), _grads(ref_loss, ref)):
        assert_close(grad, ref_grad, **TOL)


def test_scalar_and_one_element_logit_scale_agree():
    image, text = _features(6, seed=2)
    assert_close(clip_loss(image, text, torch.tensor(5.0)), clip_loss(image, text, torch.tensor([5.0])))


def test_accuracy_is_image_to_text_top1_over_all_texts():
    image, text = _features(12, seed=3)
    expected = ((image @ text.T).argmax(dim=1) == torch.arange(12)).float().mean()
    for tile_size in (None, TILE):
        _, accuracy = clip_loss_and_accuracy(image, text, torch.tensor([10.0]), tile_size=tile_size)
        assert_close(accuracy, expected)


# --- real ranks against open_clip ------------------------------------------------------------

BATCH_PER_RANK = 5


def _rank_case(rank: int, world_size: int) -> dict[str, list]:
    """Each rank slices identical global features, runs ours and open_clip's loss, and returns
    the loss and the gradients of its local features and of the scalars (as numpy arrays: a
    tensor sent through a multiprocessing queue lives in shared memory that vanishes when the
    rank exits before the parent reads it)."""
    image_all, text_all = _features(world_size * BATCH_PER_RANK, seed=7)
    rows = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
    image, text = image_all[rows], text_all[rows]
    scale, bias = torch.tensor([12.0]), torch.tensor([-4.0])
    results: dict[str, list[torch.Tensor]] = {}

    for tile_size in (None, TILE):
        ours = _leaves(image, text, scale)
        loss = clip_loss(
            *ours, gathered_image=gather_with_grad(ours[0]), gathered_text=gather_with_grad(ours[1]), rank=rank,
            tile_size=tile_size,
        )
        results[f"clip/{tile_size}"] = [loss.detach(), *_grads(loss, ours)]

        ours = _leaves(image, text, scale, bias)
        loss = siglip_loss(*ours, gathered_text=gather_with_grad(ours[1]), rank=rank, tile_size=tile_size)
        results[f"siglip/{tile_size}"] = [loss.detach(), *_grads(loss, ours)]

    ref = _leaves(image, text, scale)
    loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)(*ref)
    results["clip/open_clip"] = [loss.detach(), *_grads(loss, ref)]
    ref = _leaves(image, text, scale, bias)
    loss = SigLipLoss(rank=rank, world_size=world_size)(*ref)
    results["siglip/open_clip"] = [loss.detach(), *_grads(loss, ref)]
    return {name: [t.numpy() for t in tensors] for name, tensors in results.items()}


def test_losses_and_gradients_match_open_clip_on_real_ranks():
    # One spawn for all cases: starting ranks costs far more than the losses.
    for rank, results in enumerate(run_ranks(_rank_case, 2)):
        for head in ("clip", "siglip"):
            reference = results[f"{head}/open_clip"]
            for tile_size in (None, TILE):
                for ours, ref, what in zip(results[f"{head}/{tile_size}"], reference, ("loss", "image", "text", "scale", "bias")):
                    assert_close(torch.from_numpy(ours), torch.from_numpy(ref), **TOL, msg=lambda m: f"{head} tile={tile_size} rank={rank} {what}: {m}")


def test_gathered_features_must_hold_this_ranks_block():
    image, text = _features(4, seed=4)
    with pytest.raises(ValueError, match="do not hold rank 1's"):
        clip_loss(image, text, torch.tensor([1.0]), gathered_image=image, gathered_text=text, rank=1)
    with pytest.raises(ValueError, match="no gathered_text"):
        siglip_loss(image, text, torch.tensor([1.0]), torch.tensor([0.0]), rank=1)
    with pytest.raises(ValueError, match="must both be"):
        clip_loss(image, text[:3], torch.tensor([1.0]))


# --- tiled kernels ----------------------------------------------------------------------------


def _cosine(queries, keys, scale):
    return (queries * scale) @ keys.T


def _neg_sq_distance(queries, keys, scale, offset):
    """A non-dot-product score, as a hyperbolic head's would be: -scale * |q - k|^2 + offset."""
    return -scale * torch.cdist(queries, keys).square() + offset


def _float64(*shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_() for shape in shapes]


def test_tiled_cross_entropy_gradcheck():
    queries, keys = _float64((5, 3), (7, 3))
    scale = torch.tensor([1.5], dtype=torch.float64, requires_grad=True)
    offset = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    positives = torch.tensor([6, 0, 3, 3, 1])

    def loss(q, k, s, o):
        return tiled_cross_entropy(q, k, positives, _neg_sq_distance, 2, s, o).loss

    assert torch.autograd.gradcheck(loss, (queries, keys, scale, offset))


def test_tiled_symmetric_cross_entropy_gradcheck():
    rows, columns = _float64((5, 3), (5, 3), seed=1)
    scale = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)

    def loss(r, c, s):
        row, col = tiled_symmetric_cross_entropy(r, c, _cosine, 2, s)
        return torch.cat([row.loss, col.loss])

    assert torch.autograd.gradcheck(loss, (rows, columns, scale))


def test_tiled_sigmoid_loss_gradcheck():
    queries, keys = _float64((4, 3), (7, 3), seed=2)
    scale = torch.tensor([1.5], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    positives = torch.tensor([2, -1, 6, 0])  # -1: a query with negatives only

    def loss(q, k, s, b):
        return tiled_sigmoid_loss(q, k, positives, lambda q_, k_, s_, b_: _cosine(q_, k_, s_) + b_, 3, s, b)

    assert torch.autograd.gradcheck(loss, (queries, keys, scale, bias))


def test_tiled_kernels_match_dense_references_with_generic_score():
    queries, keys = _float64((9, 4), (13, 4), seed=3)
    scale = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    offset = torch.tensor([0.1], dtype=torch.float64, requires_grad=True)
    positives = torch.randint(0, 13, (9,), generator=torch.Generator().manual_seed(0))
    leaves = [queries, keys, scale, offset]
    weights = torch.linspace(0.5, 2.0, 9, dtype=torch.float64)  # unequal per-row grads

    scores = _neg_sq_distance(queries, keys, scale, offset)  # (9, 13)
    dense = F.cross_entropy(scores, positives, reduction="none")
    tiled = tiled_cross_entropy(queries, keys, positives, _neg_sq_distance, 4, scale, offset)
    assert_close(tiled.loss, dense)
    assert torch.equal(tiled.is_top1, scores.argmax(dim=1) == positives)
    for grad, ref in zip(_grads((tiled.loss * weights).sum(), leaves), _grads((dense * weights).sum(), leaves)):
        assert_close(grad, ref)

    scores = _neg_sq_distance(queries, keys, scale, offset)  # a fresh graph for the second loss
    labels = -torch.ones_like(scores)
    labels[torch.arange(9), positives] = 1.0
    dense = -F.logsigmoid(labels * scores).sum(dim=1)
    tiled = tiled_sigmoid_loss(queries, keys, positives, _neg_sq_distance, 4, scale, offset)
    assert_close(tiled, dense)
    for grad, ref in zip(_grads(tiled.sum(), leaves), _grads(dense.sum(), leaves)):
        assert_close(grad, ref)


def test_tiled_symmetric_matches_both_dense_directions():
    rows, columns = _float64((10, 4), (10, 4), seed=4)
    scale = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    labels = torch.arange(10)
    scores = _cosine(rows, columns, scale)
    row, col = tiled_symmetric_cross_entropy(rows, columns, _cosine, 4, scale)
    assert_close(row.loss, F.cross_entropy(scores, labels, reduction="none"))
    assert_close(col.loss, F.cross_entropy(scores.T, labels, reduction="none"))
    assert torch.equal(row.is_top1, scores.argmax(dim=1) == labels)
    assert torch.equal(col.is_top1, scores.argmax(dim=0) == labels)
    leaves = [rows, columns, scale]
    tiled = row.loss.sum() + 2 * col.loss.sum()
    dense = F.cross_entropy(scores, labels, reduction="sum") + 2 * F.cross_entropy(scores.T, labels, reduction="sum")
    for grad, ref in zip(_grads(tiled, leaves), _grads(dense, leaves)):
        assert_close(grad, ref)


def test_tiled_and_dense_clip_agree_on_a_larger_batch_in_fp32():
    image, text = _features(300, seed=5)
    scale = torch.tensor([50.0])
    dense = _leaves(image, text, scale)
    tiled = _leaves(image, text, scale)
    dense_loss = clip_loss(*dense)
    tiled_loss = clip_loss(*tiled, tile_size=128)  # 300 = 2 * 128 + 44
    assert_close(tiled_loss, dense_loss, **TOL)
    for grad, ref in zip(_grads(tiled_loss, tiled), _grads(dense_loss, dense)):
        assert_close(grad, ref, **TOL)


def test_tiled_rejects_bad_shapes():
    queries, keys = torch.randn(3, 4), torch.randn(5, 2)
    with pytest.raises(ValueError, match="must be"):
        tiled_cross_entropy(queries, keys, torch.zeros(3, dtype=torch.long), _cosine, 2, torch.ones(1))
    with pytest.raises(ValueError, match="tile_size"):
        tiled_sigmoid_loss(queries, queries, torch.zeros(3, dtype=torch.long), _cosine, 0, torch.ones(1))


# --- head modules ------------------------------------------------------------------------------


def _inputs(num: int = 6, seed: int = 6) -> HeadInputs:
    image, text = _features(num, seed)
    local = {"image_normed": image, "text_normed": text}
    return HeadInputs(local=local, gathered=dict(local), batch={})


def test_heads_are_registered():
    assert {"clip", "siglip"} <= set(HEADS.names())
    assert HEADS.get("clip") is ClipHead and HEADS.get("siglip") is SigLipHead
    assert ClipHead.gathered_keys == ("image_normed", "text_normed")
    assert SigLipHead.gathered_keys == ("text_normed",)


def test_clip_head_temperature_init_clamp_and_weight_decay():
    head = ClipHead(ClipConfig(), embed_dim=EMBED)
    assert head.logit_scale.shape == (1,)
    assert_close(head.logit_scale.detach(), torch.tensor([math.log(1 / 0.07)]))
    assert head.no_weight_decay() == {"logit_scale"}
    inputs = _inputs()
    out = head(inputs)
    expected = clip_loss(inputs.local["image_normed"], inputs.local["text_normed"], torch.tensor([1 / 0.07]))
    assert_close(out["loss"], expected, **TOL)
    assert set(out["logging"]) == {"logit_scale", "accuracy"}

    with torch.no_grad():
        head.logit_scale.fill_(math.log(1000.0))  # as an optimizer step could leave it
    out = head(inputs)
    assert_close(out["logging"]["logit_scale"], torch.tensor(100.0))
    out["loss"].backward()
    # The bounded rule (base.bounded): the gradient at the bound passes when it points back
    # inside (positive: descent lowers the log scale) and is dropped when it points further out.
    at_bound = torch.tensor([math.log(100.0)], requires_grad=True)
    clip_loss(inputs.local["image_normed"], inputs.local["text_normed"], at_bound.exp()).backward()
    expected = at_bound.grad if at_bound.grad.item() > 0 else torch.zeros(1)
    assert_close(head.logit_scale.grad, expected, **TOL)


def test_clip_head_frozen_temperature_has_no_grad():
    head = ClipHead(ClipConfig(learn_temperature=False, init_temperature=0.05), embed_dim=EMBED)
    assert not head.logit_scale.requires_grad
    assert_close(head(_inputs())["logging"]["logit_scale"], torch.tensor(20.0))


def test_siglip_head_init_clamp_and_weight_decay():
    head = SigLipHead(SigLipConfig(), embed_dim=EMBED)
    assert head.logit_scale.shape == (1,) and head.logit_bias.shape == (1,)
    assert_close(head.logit_scale.detach(), torch.tensor([math.log(10.0)]))
    assert_close(head.logit_bias.detach(), torch.tensor([-10.0]))
    assert head.no_weight_decay() == {"logit_scale", "logit_bias"}
    inputs = _inputs()
    out = head(inputs)
    image, text = inputs.local["image_normed"], inputs.local["text_normed"]
    assert_close(out["loss"], SigLipLoss()(image, text, torch.tensor([10.0]), torch.tensor([-10.0])), **TOL)
    with torch.no_grad():
        head.logit_scale.fill_(math.log(500.0))
    assert_close(head(inputs)["logging"]["logit_scale"], torch.tensor(100.0))


def test_configs_are_validated():
    with pytest.raises(ValidationError, match="extra"):
        ClipConfig(temperature=0.1)
    with pytest.raises(ValidationError, match="greater than 0"):
        ClipConfig(init_temperature=0.0)
    with pytest.raises(ValidationError, match="above max_logit_scale"):
        ClipConfig(init_temperature=0.001)
    with pytest.raises(ValidationError, match="above max_logit_scale"):
        SigLipConfig(init_logit_scale=200.0)
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        SigLipConfig(tile_size=0)


def test_objective_sums_clip_and_siglip_as_open_clip_would():
    from vlp.models.objective import Objective

    generator = torch.Generator().manual_seed(8)
    encoded = {"image_embed": 3 * torch.randn(6, EMBED, generator=generator),
               "text_embed": torch.randn(6, EMBED, generator=generator)}
    objective = Objective({"clip": ClipConfig(), "siglip": SigLipConfig(weight=0.5)}, embed_dim=EMBED)
    assert objective.gathered_keys == ["image_normed", "text_normed"]
    out = objective(encoded, batch={})
    image, text = F.normalize(encoded["image_embed"], dim=-1), F.normalize(encoded["text_embed"], dim=-1)
    expected = ClipLoss()(image, text, torch.tensor([1 / 0.07])) + 0.5 * SigLipLoss()(
        image, text, torch.tensor([10.0]), torch.tensor([-10.0])
    )
    assert_close(out["loss"], expected, **TOL)
    assert {"clip/logit_scale", "clip/accuracy", "siglip/logit_bias"} <= set(out["logging"])
