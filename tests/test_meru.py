"""MERU head: clamped scalars, losses against dense references written here, and a real 2-rank run."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_ranks
from test_lorentz import ambient_exterior_angle

from vlp.core.collectives import gather_with_grad
from vlp.models.heads import HEADS, HeadInputs
from vlp.models.heads.meru import MeruConfig, MeruHead, bounded, entailment_loss

EMBED = 16


def make_head(**overrides) -> MeruHead:
    return MeruHead(MeruConfig(**overrides), EMBED)


def features(batch: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, EMBED, generator=generator)
    text = image + 0.8 * torch.randn(batch, EMBED, generator=generator)  # paired, not identical
    return image.to(dtype), text.to(dtype)


def inputs_for(image: torch.Tensor, text: torch.Tensor, rank: int = 0, world_size: int = 1, gathered=None) -> HeadInputs:
    local = {"image_embed": image, "text_embed": text}
    return HeadInputs(local=local, gathered=gathered or dict(local), batch={}, rank=rank, world_size=world_size)


# Dense references from the definitions, in float64. `scale`, `curv` and `logit_scale` may be
# floats or 0-dim tensors (so the references are differentiable in the head's scalars too).
def ref_lift(embed: torch.Tensor, scale, curv) -> torch.Tensor:
    tangent = embed.double() * scale
    norm = curv**0.5 * tangent.norm(dim=-1, keepdim=True)
    return torch.sinh(norm) * tangent / norm


def ref_dist(x: torch.Tensor, y: torch.Tensor, curv) -> torch.Tensor:
    x_time = torch.sqrt(1 / curv + (x * x).sum(-1))
    y_time = torch.sqrt(1 / curv + (y * y).sum(-1))
    inner = x @ y.T - x_time[:, None] * y_time[None, :]
    return torch.acosh(-curv * inner) / curv**0.5


def ref_contrastive(image, text, all_image, all_text, logit_scale, curv, offset: int) -> torch.Tensor:
    rows = torch.arange(image.shape[0]) + offset
    image_logits = -ref_dist(image, all_text, curv) * logit_scale
    text_logits = -ref_dist(text, all_image, curv) * logit_scale
    image_nll = -(image_logits.gather(1, rows[:, None]).squeeze(1) - image_logits.logsumexp(dim=1))
    text_nll = -(text_logits.gather(1, rows[:, None]).squeeze(1) - text_logits.logsumexp(dim=1))
    return 0.5 * (image_nll.mean() + text_nll.mean())


def ref_entailment(text, image, curv, min_radius: float) -> torch.Tensor:
    angle = ambient_exterior_angle(text, image, curv)
    aperture = torch.asin(torch.clamp(2 * min_radius / (curv**0.5 * text.norm(dim=-1)), max=1.0))
    return torch.relu(angle - aperture).mean()


def test_registered_and_config_is_strict():
    assert HEADS.get("meru") is MeruHead
    with pytest.raises(ValueError, match="curv_int"):
        MeruConfig(curv_int=1.0)


def test_forward_backward_and_scalars():
    head = make_head()
    image, text = (t.requires_grad_() for t in features(8, seed=0))
    out = head(inputs_for(image, text))
    assert out["loss"].dtype == torch.float32 and out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    for name, param in head.named_parameters():
        assert param.shape == (1,), name
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert torch.isfinite(image.grad).all() and torch.isfinite(text.grad).all()
    assert head.no_weight_decay() == {"log_curv", "alpha_image", "alpha_text", "logit_scale"}
    logged = out["logging"]
    for key in ("curvature", "alpha_image", "alpha_text", "logit_scale", "contrastive_loss", "entailment_loss",
                "curv_at_bound", "curv_bound_steps", "text_radius", "image_radius"):
        assert key in logged and logged[key].ndim == 0, key
    torch.testing.assert_close(logged["curvature"], torch.tensor(1.0))
    torch.testing.assert_close(logged["alpha_image"], torch.tensor(EMBED**-0.5))
    torch.testing.assert_close(logged["logit_scale"], torch.tensor(1 / 0.07))


def test_parent_entailment_term_against_the_reference():
    """parent_weight adds 0.5 (E(parent, image) + E(parent, text)) and leaves the rest alone."""
    image, text = features(6, seed=3)
    parent = 0.3 * torch.randn(6, EMBED, generator=torch.Generator().manual_seed(4))
    base = make_head()(inputs_for(image, text))
    head = make_head(parent_weight=0.5)
    assert "parent_text_embed" in head.needs and "parent_text_embed" not in MeruHead.needs
    parent_in = parent.clone().requires_grad_()
    inputs = inputs_for(image, text)
    inputs.local["parent_text_embed"] = parent_in[:, None]  # (B, 1, E), as the model encodes it
    out = head(inputs)
    scale, curv = EMBED**-0.5, 1.0
    lifted = {name: ref_lift(t, scale, curv) for name, t in (("image", image), ("text", text), ("parent", parent))}
    expected = 0.5 * (ref_entailment(lifted["parent"], lifted["image"], curv, 0.1)
                      + ref_entailment(lifted["parent"], lifted["text"], curv, 0.1))
    torch.testing.assert_close(out["logging"]["parent_entailment_loss"].double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["loss"].double(), base["loss"].double() + 0.5 * expected, rtol=1e-4, atol=1e-6)
    assert expected > 0  # the case is not trivially inside every cone
    out["loss"].backward()
    assert parent_in.grad is not None and parent_in.grad.abs().sum() > 0


def test_scalars_are_clamped_in_forward():
    head = make_head(curv_init=2.0)
    with torch.no_grad():
        head.log_curv.fill_(math.log(1000.0))
        head.alpha_image.fill_(0.5)
        head.alpha_text.fill_(-0.5)
        head.logit_scale.fill_(math.log(1e4))
    out = head(inputs_for(*features(4, seed=1)))["logging"]
    torch.testing.assert_close(out["curvature"], torch.tensor(20.0))
    torch.testing.assert_close(out["alpha_image"], torch.tensor(1.0))
    torch.testing.assert_close(out["alpha_text"], torch.tensor(math.exp(-0.5)))
    torch.testing.assert_close(out["logit_scale"], torch.tensor(100.0))
    assert out["curv_at_bound"] == 1.0
    with torch.no_grad():
        head.log_curv.fill_(math.log(1e-3))
    torch.testing.assert_close(head.curvature(), torch.tensor([0.2]))


def test_bounded_gradient_only_blocks_outward_pushes():
    value = torch.tensor([5.0, 5.0, -5.0, -5.0, 0.0], requires_grad=True)
    # Descent moves by -grad: grad +1 moves down, -1 moves up.
    grad = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    out = bounded(value, -1.0, 1.0)
    torch.testing.assert_close(out.detach(), torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0]))
    out.backward(grad)
    torch.testing.assert_close(value.grad, torch.tensor([1.0, 0.0, 0.0, -1.0, 1.0]))


@pytest.mark.parametrize("side", ["low", "high"])
def test_curvature_gate_judges_the_summed_gradient_of_all_its_uses(side):
    """Past a bound, log c's gradient is the total over its three uses in one forward (both lifts
    and the losses' distances), dropped as a whole when that total points further out. A gate per
    use (the old code) passed the inward uses alone, so the step could take the wrong sign."""
    from vlp.models.heads.meru import MeruScalars

    head = make_head(curv_init=1.0, curv_range=2.0)
    low, high = head.log_curv_bounds
    outside = {"low": low - 0.5, "high": high + 0.5}[side]
    for seed in range(6):
        image, text = features(8, seed)
        head.zero_grad()
        with torch.no_grad():
            head.log_curv.fill_(outside)
        head(inputs_for(image, text))["loss"].backward()

        # The reference: the loss's total gradient in the bounded value, through a leaf.
        true_scalars = head.scalars()
        at_bound = torch.tensor([low if side == "low" else high], requires_grad=True)
        leaf_scalars = MeruScalars(at_bound.exp(), *(value.detach() for value in true_scalars[1:]))
        head.scalars = lambda: leaf_scalars  # this instance only
        try:
            head(inputs_for(image, text))["loss"].backward()
        finally:
            del head.scalars
        total = at_bound.grad
        outward = bool(total > 0) if side == "low" else bool(total < 0)
        expected = torch.zeros(1) if outward else total
        torch.testing.assert_close(head.log_curv.grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("curv_init", [1.0, 0.5])
def test_losses_match_dense_reference(curv_init):
    head = make_head(curv_init=curv_init, entail_weight=0.3)
    image, text = features(12, seed=2)
    out = head(inputs_for(image, text))
    scale, curv = EMBED**-0.5, curv_init
    image_pts, text_pts = ref_lift(image, scale, curv), ref_lift(text, scale, curv)
    contrastive = ref_contrastive(image_pts, text_pts, image_pts, text_pts, 1 / 0.07, curv, 0)
    entailment = ref_entailment(text_pts, image_pts, curv, 0.1)
    torch.testing.assert_close(out["logging"]["contrastive_loss"].double(), contrastive, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["logging"]["entailment_loss"].double(), entailment, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["loss"].double(), contrastive + 0.3 * entailment, rtol=1e-4, atol=1e-5)


def test_entailment_zero_inside_cone_positive_on_violation():
    curv = torch.tensor([1.0])
    direction = F.normalize(torch.randn(6, EMBED, generator=torch.Generator().manual_seed(3)), dim=-1)
    from vlp.models.lorentz import exp_map0

    text = exp_map0(direction * 1.0, curv)
    # Image further out along the caption's ray: inside the cone.
    image_inside = exp_map0(direction * 3.0, curv)
    assert entailment_loss(text, image_inside, curv).item() < 1e-6
    # Images off in unrelated directions: exterior angles near pi/2, outside cones of ~0.2 rad.
    elsewhere = F.normalize(torch.randn(6, EMBED, generator=torch.Generator().manual_seed(4)), dim=-1)
    image_outside = exp_map0(elsewhere * 3.0, curv)
    violation = entailment_loss(text, image_outside, curv)
    expected = ref_entailment(text.double(), image_outside.double(), 1.0, 0.1)
    assert violation.item() > 0.5
    torch.testing.assert_close(violation.double(), expected, rtol=1e-4, atol=1e-4)


def test_bf16_inputs_and_autocast_stay_fp32():
    head = make_head()
    image, text = features(8, seed=4)
    reference = head(inputs_for(image, text))["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(inputs_for(image.bfloat16(), text.bfloat16()))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"], reference, rtol=5e-2, atol=5e-2)  # bf16 input rounding only


def test_zero_shot_geometry():
    head = make_head()
    image = features(5, seed=5)[0]
    prompts = torch.randn(3, 4, EMBED, generator=torch.Generator().manual_seed(6))  # (C, T, E)
    classes = head.prompt_ensemble(prompts)
    # The class embedding is the tangent-space mean of the scaled prompts, lifted.
    expected_class_pts = ref_lift(prompts.double().mean(dim=1), EMBED**-0.5, 1.0)
    torch.testing.assert_close(head.lift_text(classes).double(), expected_class_pts, rtol=1e-5, atol=1e-6)
    scores = head.pairwise_scores(image, classes)
    assert scores.shape == (5, 3)
    distances = ref_dist(ref_lift(image, EMBED**-0.5, 1.0), expected_class_pts, 1.0)
    # Lorentzian inner product: -c <x, y>_L = cosh(sqrt(c) d).
    torch.testing.assert_close(-scores.double(), torch.cosh(distances), rtol=1e-5, atol=1e-5)


def test_warns_when_curvature_sits_at_bound(caplog):
    head = make_head(curv_bound_warn_steps=50).train()
    with torch.no_grad():
        head.log_curv.fill_(math.log(0.01))  # below 1.0 / 10
    batch = inputs_for(*features(4, seed=7))
    with caplog.at_level(logging.WARNING, logger="vlp.models.heads.meru"):
        for _ in range(50):
            out = head(batch)
    assert out["logging"]["curv_bound_steps"].item() == 50
    assert any("curvature" in record.getMessage() for record in caplog.records)
    with torch.no_grad():
        head.log_curv.fill_(0.0)
    assert head(batch)["logging"]["curv_bound_steps"].item() == 0


GLOBAL_BATCH, WORLD = 8, 2


def _global_features():
    return features(GLOBAL_BATCH, seed=8)


def _rank_step(rank: int, world_size: int):
    torch.manual_seed(0)
    head = make_head(curv_init=0.8)
    image_all, text_all = _global_features()
    per_rank = GLOBAL_BATCH // world_size
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    image = image_all[rows].clone().requires_grad_()
    text = text_all[rows].clone().requires_grad_()
    gathered = {"image_embed": gather_with_grad(image), "text_embed": gather_with_grad(text)}
    out = head(inputs_for(image, text, rank, world_size, gathered))
    out["loss"].backward()
    # numpy, not tensors: tensors cross the result queue as shared-memory handles, which break
    # when this process exits before the parent unpickles them.
    param_grads = {name: p.grad.numpy() for name, p in head.named_parameters()}
    return out["loss"].detach().numpy(), image.grad.numpy(), text.grad.numpy(), param_grads


def test_two_ranks_match_single_process():
    results = [
        (torch.from_numpy(loss), torch.from_numpy(image_grad), torch.from_numpy(text_grad),
         {name: torch.from_numpy(grad) for name, grad in param_grads.items()})
        for loss, image_grad, text_grad, param_grads in run_ranks(_rank_step, WORLD)
    ]

    # Single process, float64, from the reference formulas: the global batch split the same way.
    image_all, text_all = (t.double().requires_grad_() for t in _global_features())
    scalars = {  # the head's raw parameters at init
        "log_curv": torch.tensor(math.log(0.8), dtype=torch.float64, requires_grad=True),
        "alpha_image": torch.tensor(math.log(EMBED**-0.5), dtype=torch.float64, requires_grad=True),
        "alpha_text": torch.tensor(math.log(EMBED**-0.5), dtype=torch.float64, requires_grad=True),
        "logit_scale": torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True),
    }
    curv = scalars["log_curv"].exp()
    image_pts = ref_lift(image_all, scalars["alpha_image"].exp(), curv)
    text_pts = ref_lift(text_all, scalars["alpha_text"].exp(), curv)
    per_rank = GLOBAL_BATCH // WORLD
    total = 0.0
    for rank, (loss, _, _, param_grads) in enumerate(results):
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        expected = ref_contrastive(
            image_pts[rows], text_pts[rows], image_pts, text_pts, scalars["logit_scale"].exp(), curv, rank * per_rank
        ) + 0.2 * ref_entailment(text_pts[rows], image_pts[rows], curv, 0.1)
        torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-5)
        # Head scalars: each rank's gradient is that of its own local loss (DDP averages them).
        own = torch.autograd.grad(expected, list(scalars.values()), retain_graph=True)
        for name, grad in zip(scalars, own):
            torch.testing.assert_close(param_grads[name].double(), grad.reshape(1), rtol=1e-4, atol=1e-5)
        total = total + expected
    # Features: all_gather's backward sums every rank's loss gradient into the owner's slice.
    total.backward()
    for rank, (_, image_grad, text_grad, _) in enumerate(results):
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        torch.testing.assert_close(image_grad.double(), image_all.grad[rows], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(text_grad.double(), text_all.grad[rows], rtol=1e-4, atol=1e-6)


def tiny_meru_model():
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    overrides = ["model.image.layers=1", "model.text.layers=1", "model.embed_dim=32", "model.image.width=32",
                 "model.text.width=32", "model.text.heads=2", "model.image.head_width=16"]
    config = load_config("configs/meru_demo.yaml", overrides)
    torch.manual_seed(0)
    return VLPModel(config.model).eval(), config


def test_configs_load():
    from vlp.train.config import load_config

    for path in ("configs/meru_demo.yaml", "configs/meru_vit_b16.yaml"):
        config = load_config(path)
        assert config.model.heads.meru is not None and config.model.heads_dict().keys() == {"meru"}
        assert {ev.type for ev in config.evals} == {"zeroshot", "hierarchy"}
    with pytest.raises(ValueError, match=r"model\.heads\.meru\.curv_int: unknown key"):
        load_config("configs/meru_demo.yaml", ["model.heads.meru.curv_int=2.0"])
    with pytest.raises(ValueError, match=r"model\.heads\.meru needs data\.parent_caption_key set"):
        load_config("configs/meru_demo.yaml", ["data.parent_caption_key=null"])


def test_hierarchy_evaluator(tmp_path):
    from vlp.train.evals import EVALUATORS, EvalContext
    from vlp.train.evals.common import encode_texts
    from vlp.train.evals.hierarchy import evaluate_hierarchy

    model, config = tiny_meru_model()
    evaluator_cfg = next(ev for ev in config.evals if ev.type == "hierarchy")
    results = EVALUATORS.get("hierarchy")(evaluator_cfg).run(model, EvalContext(out_dir=tmp_path, step=7))
    assert (tmp_path / "hierarchy_step000007.png").stat().st_size > 0
    # Closed form: d(O, exp_map0(alpha * e)) = |alpha * e| (below the sinh clamp).
    head = model.objective.heads["meru"]
    with torch.no_grad():
        generic = encode_texts(model, evaluator_cfg.generic, torch.device("cpu"))
        specific = encode_texts(model, evaluator_cfg.specific, torch.device("cpu"))
        scale = head.text_scale()
    assert results["hierarchy_generic_mean_dist"] == pytest.approx(float((generic * scale).norm(dim=-1).mean()), rel=1e-5)
    assert results["hierarchy_specific_mean_dist"] == pytest.approx(float((specific * scale).norm(dim=-1).mean()), rel=1e-5)
    assert 0.0 <= results["hierarchy_order_accuracy"] <= 1.0
    # The named-function entry point (used by `vlp eval hierarchy`) gives the same numbers.
    again = evaluate_hierarchy(model, evaluator_cfg.generic, evaluator_cfg.specific)
    assert again["hierarchy_generic_mean_dist"] == pytest.approx(results["hierarchy_generic_mean_dist"])


def test_hierarchy_needs_a_hyperbolic_head():
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config
    from vlp.train.evals.hierarchy import evaluate_hierarchy

    config = load_config("configs/meru_demo.yaml", ["model.image.layers=1", "model.text.layers=1"])
    config.model.heads.meru = None
    config.model.heads.clip = HEADS.get("clip").config_class()
    with pytest.raises(ValueError, match="no hyperbolic head"):
        evaluate_hierarchy(VLPModel(config.model), ["a digit"], ["a handwritten digit 7"])


def test_tiled_contrastive_equals_dense_in_loss_and_gradients():
    """The memory-bounded path (tile 3, N not a multiple) against the dense (B, N) one."""
    from vlp.models.heads.meru import contrastive_loss

    torch.manual_seed(0)
    image = (0.5 * torch.randn(5, 8, dtype=torch.float64)).requires_grad_()
    text = (0.5 * torch.randn(5, 8, dtype=torch.float64)).requires_grad_()
    others_i, others_t = 0.5 * torch.randn(6, 8, dtype=torch.float64), 0.5 * torch.randn(6, 8, dtype=torch.float64)
    curv = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([9.0], dtype=torch.float64, requires_grad=True)
    results = []
    for tile in (None, 3):
        all_image, all_text = torch.cat([others_i[:3], image, others_i[3:]]), torch.cat([others_t[:3], text, others_t[3:]])
        loss = contrastive_loss(image, text, all_image, all_text, curv, scale, offset=3, tile_size=tile)
        grads = torch.autograd.grad(loss, (image, text, curv, scale))
        results.append((loss, grads))
    (dense, dense_grads), (tiled, tiled_grads) = results
    torch.testing.assert_close(tiled, dense)
    for a, b in zip(tiled_grads, dense_grads):
        torch.testing.assert_close(a, b)


def test_model_encodes_parent_captions_once_for_the_head():
    """configs/meru_demo.yaml reads batch["parent_text"] (B, 1, L) through the text tower; the
    parent term reaches the loss and the text tower's gradients."""
    model, config = tiny_meru_model()
    model.train()
    assert "parent_text_embed" in model.objective.needs and config.data.parent_caption_key == "parent.txt"
    tokenizer = model.text.tokenizer()
    batch = {"image": torch.randn(4, 3, 32, 32), "text": tokenizer([f"a handwritten {i}" for i in range(4)]),
             "parent_text": tokenizer(["a digit", "a number", "a digit", "a handwritten number"])[:, None]}
    out = model(batch)
    logged = out["logging"]
    assert torch.isfinite(out["loss"]) and logged["meru/parent_entailment_loss"] >= 0
    expected = logged["meru/contrastive_loss"] + 0.1 * logged["meru/entailment_loss"] + 0.1 * logged["meru/parent_entailment_loss"]
    torch.testing.assert_close(logged["loss/meru"], expected)
    out["loss"].backward()
    assert model.text.model.token_embedding.weight.grad is not None
