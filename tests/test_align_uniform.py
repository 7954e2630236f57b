"""Alignment and uniformity (Wang & Isola): closed-form values, gradcheck, the paper's own code,
two gloo ranks equal one process, and the evaluator on the digits shards.

The head is also registered, so tests/test_registries.py runs its forward/backward/bf16/two-rank
and zero-shot checks; the two-rank test here covers the log-of-a-global-mean gradient directly.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_ranks
from torch.testing import assert_close

from vlp.models.heads import HEADS
from vlp.models.heads.align_uniform import AlignUniformConfig, AlignUniformHead, alignment, uniformity
from vlp.models.heads.base import HeadInputs


def _paper_align(x, y, alpha=2):
    """Wang & Isola's reference `align_loss` (github.com/SsnL/align_uniform)."""
    return (x - y).norm(p=2, dim=1).pow(alpha).mean()


def _paper_uniform(x, t=2):
    """Wang & Isola's reference `uniform_loss`."""
    return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()


def test_closed_form_values_on_hand_made_embeddings():
    eye = torch.eye(4)
    # Mutually orthogonal unit vectors: every squared distance is 2 -> log exp(-2 * 2) = -4.
    assert_close(uniformity(eye), torch.tensor(-4.0))
    # An antipodal pair: squared distance 4 -> -8, the minimum for two points.
    assert_close(uniformity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])), torch.tensor(-8.0))
    # The vertices of a regular simplex (3 points at 120 degrees): squared distance 3 -> -6.
    angles = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
    assert_close(uniformity(torch.stack([angles.cos(), angles.sin()], 1)), torch.tensor(-6.0))
    # Coincident points: the potential is 1 everywhere -> 0.
    assert_close(uniformity(torch.ones(5, 3) / math.sqrt(3)), torch.tensor(0.0))
    # Two distances mixed: 3 orthogonal pairs (d^2 = 2) and... mean of exp(-4) x2 and exp(-8) x1
    # for the points e1, e2, -e1 (pairs: e1-e2 2, e2-(-e1) 2, e1-(-e1) 4).
    points = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert_close(uniformity(points), torch.tensor(math.log((2 * math.exp(-4) + math.exp(-8)) / 3)))
    assert_close(uniformity(points, t=1.0), torch.tensor(math.log((2 * math.exp(-2) + math.exp(-4)) / 3)))
    # Alignment: perfect pairs 0, orthogonal pairs 2, antipodal pairs 4; alpha = 1 gives sqrt(2).
    assert_close(alignment(eye, eye), torch.tensor(0.0))
    assert_close(alignment(eye, eye.roll(1, dims=0)), torch.tensor(2.0))
    assert_close(alignment(eye, -eye), torch.tensor(4.0))
    assert_close(alignment(eye, eye.roll(1, dims=0), alpha=1.0), torch.tensor(math.sqrt(2)))


def test_equals_the_papers_code_on_random_features():
    generator = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(33, 16, generator=generator, dtype=torch.float64), dim=1)
    y = F.normalize(torch.randn(33, 16, generator=generator, dtype=torch.float64), dim=1)
    for t in (0.5, 2.0, 5.0):
        assert_close(uniformity(x, t), _paper_uniform(x, t))
    for alpha in (1.0, 2.0, 3.0):
        assert_close(alignment(x, y, alpha), _paper_align(x, y, alpha))


def test_gradients_by_gradcheck():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: uniformity(a, 2.0), (x,))
    assert torch.autograd.gradcheck(lambda a: uniformity(F.normalize(a, dim=1), 2.0), (x,))
    for alpha in (2.0, 1.5):
        assert torch.autograd.gradcheck(lambda a, b, alpha=alpha: alignment(a, b, alpha), (x, y))
    # Through the whole head, features normalised as the objective does.
    head = AlignUniformHead(AlignUniformConfig(align_weight=0.7, uniform_weight=1.3), embed_dim=4)

    def head_loss(a, b):
        local = {"image_normed": F.normalize(a, dim=1), "text_normed": F.normalize(b, dim=1)}
        return head(HeadInputs(local=local, gathered={}, batch={}))["loss"]

    assert torch.autograd.gradcheck(head_loss, (x, y))


def test_head_is_registered_and_weighs_its_terms():
    assert HEADS.get("align_uniform") is AlignUniformHead
    generator = torch.Generator().manual_seed(2)
    image = F.normalize(torch.randn(8, 5, generator=generator), dim=1)
    text = F.normalize(torch.randn(8, 5, generator=generator), dim=1)
    head = AlignUniformHead(AlignUniformConfig(align_weight=0.25, uniform_weight=3.0, t=1.0), embed_dim=5)
    out = head(HeadInputs(local={"image_normed": image, "text_normed": text}, gathered={}, batch={}))
    expected = 0.25 * _paper_align(image, text) + 3.0 * (_paper_uniform(image, 1.0) + _paper_uniform(text, 1.0)) / 2
    assert_close(out["loss"], expected)
    assert set(out["logging"]) == {"alignment", "uniformity_image", "uniformity_text"}


def test_config_rejects_a_negative_weight_and_unknown_keys():
    with pytest.raises(ValueError, match="align_weight"):
        AlignUniformConfig(align_weight=-1)
    with pytest.raises(ValueError, match="tt"):
        AlignUniformConfig(tt=2)


BATCH, WORLD, DIM = 5, 2, 6


def _global_batch():
    generator = torch.Generator().manual_seed(3)
    image = F.normalize(torch.randn(BATCH * WORLD, DIM, generator=generator, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(BATCH * WORLD, DIM, generator=generator, dtype=torch.float64), dim=1)
    return image, text


def _two_rank_fn(rank: int, world: int) -> dict:
    from vlp.core.collectives import gather_with_grad

    image, text = _global_batch()
    image = image[rank * BATCH : (rank + 1) * BATCH].clone().requires_grad_()
    text = text[rank * BATCH : (rank + 1) * BATCH].clone().requires_grad_()
    head = AlignUniformHead(AlignUniformConfig(align_weight=0.5, uniform_weight=2.0), embed_dim=DIM)
    gathered = {"image_normed": gather_with_grad(image), "text_normed": gather_with_grad(text)}
    out = head(HeadInputs(local={"image_normed": image, "text_normed": text}, gathered=gathered, batch={},
                          rank=rank, world_size=world))
    out["loss"].backward()
    return {"loss": out["loss"].detach(), "uniformity_image": out["logging"]["uniformity_image"],
            "image_grad": image.grad, "text_grad": text.grad}


def test_two_gloo_ranks_equal_one_process():
    """Mean of the ranks' losses = the one-process loss; each rank's uniformity is the global one;
    a rank's input gradient = world x the one-process gradient of its slice (as for every head)."""
    ranks = run_ranks(_two_rank_fn, WORLD, timeout=120)
    image, text = _global_batch()
    image.requires_grad_()
    text.requires_grad_()
    head = AlignUniformHead(AlignUniformConfig(align_weight=0.5, uniform_weight=2.0), embed_dim=DIM)
    out = head(HeadInputs(local={"image_normed": image, "text_normed": text}, gathered={}, batch={}))
    out["loss"].backward()
    assert_close(torch.stack([r["loss"] for r in ranks]).mean(), out["loss"].detach())
    for rank, result in enumerate(ranks):
        assert_close(result["uniformity_image"], _paper_uniform(image.detach()))
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        assert_close(result["image_grad"], WORLD * image.grad[rows])
        assert_close(result["text_grad"], WORLD * text.grad[rows])


# ----------------------------------------------------------------------------- the evaluator
def test_evaluator_on_the_digits_shards_and_its_plot(tmp_path, digits_dir):
    from test_export import model_from_tree, tiny_tree

    from vlp.train.evals import EVALUATORS, EvalContext
    from vlp.data_pipelines.loader import build_eval_loader
    from vlp.train.evals.alignment import AlignmentConfig, blockwise_uniformity
    from vlp.train.evals.common import encode_texts

    model, _ = model_from_tree(tiny_tree(tmp_path, digits_dir))
    model.eval()
    shard = str(digits_dir / "digits-test-000000.tar")
    config = AlignmentConfig(data=shard, batch_size=128, chunk_size=50)
    evaluator = EVALUATORS.get("alignment")(config)
    with torch.no_grad():
        # The reference: every sample's normalised embeddings in key order, read without the harness.
        images, captions, keys = [], [], []
        for batch in build_eval_loader(shard, preprocess=model.image.preprocess(train=False),
                                       tokenizer=model.text.tokenizer(), batch_size=100):
            images.append(model.encode_image(batch["image"])["image_embed"])
            captions, keys = captions + batch["caption"], keys + batch["key"]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        image = torch.nn.functional.normalize(torch.cat(images), dim=-1)[order]
        text = torch.nn.functional.normalize(encode_texts(model, captions, torch.device("cpu")), dim=-1)[order]
        first = evaluator.run(model, EvalContext(out_dir=tmp_path / "plots", step=10))
        second = evaluator.run(model, EvalContext(out_dir=tmp_path / "plots", step=20))
    assert image.shape == text.shape == (359, 32)
    assert_close(first["alignment"], float(_paper_align(image, text)))
    assert_close(first["uniformity_image"], float(_paper_uniform(image)), rtol=1e-5, atol=1e-5)
    assert_close(first["uniformity_text"], float(_paper_uniform(text)), rtol=1e-5, atol=1e-5)
    assert_close(blockwise_uniformity(image, 2.0, 7), float(_paper_uniform(image)), rtol=1e-5, atol=1e-5)
    assert first == second and sorted(evaluator.history) == [10, 20]
    assert (tmp_path / "plots" / "alignment_uniformity.png").stat().st_size > 0
