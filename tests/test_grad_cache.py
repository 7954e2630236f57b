"""Cached-feature accumulation (`train.accumulate: contrastive`, vlp.train.grad_cache).

The reference is the dense batch: k micro-batches of b per rank must give the gradient and the
weights of one step on k * b per rank without accumulation. Gradients are compared at the
accumulation boundary (where the trainer clips), because AdamW's update is nearly blind to a
constant factor on a parameter's gradient and would hide a scaling error; weights after three
optimizer steps are compared as well.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vlp.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
MICRO, ACCUM, STEPS = 4, 3, 3

HEADS = {
    "clip": {"clip": {}},
    "siglip": {"siglip": {}},
    "meru": {"meru": {}},
    "mix": {"clip": {"weight": 1.0}, "siglip": {"weight": 0.5}, "align_uniform": {"weight": 0.3}},
    "matryoshka": {"clip": {"matryoshka": {"dims": [8, 16, 32]}}},
    # A third pooled key, cached with the two embeddings: the parent captions' (B, 1, E).
    "meru_parents": {"meru": {"parent_weight": 0.5}},
}


def experiment(heads: dict, **sections) -> dict:
    """A tiny CLIP experiment tree (32-wide one-layer towers); the data section is never read."""
    tree = yaml.safe_load(DEMO.read_text())
    tree.update(name="grad_cache", evals=[], export=[])
    tree["data"] = {"train": [{"urls": "unused-{000..001}.tar"}], "workers": 0, "parent_caption_key": "parent.txt"}
    tree["model"]["embed_dim"] = 32
    tree["model"]["image"].update(width=32, layers=1, head_width=16)
    tree["model"]["text"].update(width=32, layers=1, heads=2, context_length=16)
    tree["model"]["heads"] = heads
    # eps 1e-4: an element whose gradient is ~1e-7, where the batch shape's summation order decides
    # the sign, would otherwise move by +-lr under AdamW (m / sqrt(v) = +-1) and turn rounding into
    # a weight gap; the gradients themselves are compared to 1e-5.
    tree["train"].update(steps=STEPS, warmup_steps=1, lr=5e-3, eps=1e-4, log_every=1, fused_adamw=False)
    for section, values in sections.items():
        tree[section] = {**tree.get(section, {}), **values}
    return tree


def micro_batch(tokenizer, step: int, rank: int, index: int) -> dict:
    """Micro-batch `index` of `rank` at `step`, the same whichever way it is grouped."""
    generator = torch.Generator().manual_seed(1000 * step + 100 * rank + index)
    digits = torch.randint(0, 10, (MICRO,), generator=generator)
    return {"image": torch.randn(MICRO, 3, 32, 32, generator=generator),
            "text": tokenizer([f"a photo of the digit {int(d)}" for d in digits]),
            "parent_text": tokenizer(["a digit" if d < 5 else "a number" for d in digits])[:, None]}  # (B, 1, L)


def train_steps(rank: int, world_size: int, tree: dict, mode: str, break_scaling: bool = False) -> dict:
    """STEPS optimizer steps of `mode` ("dense": batch ACCUM * MICRO, no accumulation; "contrastive"
    or "plain": ACCUM micro-batches of MICRO) through the trainer's engine and accumulation drivers.
    Returns the boundary gradients of each step and the final weights."""
    from deepspeed.utils import safe_get_full_grad

    from vlp.train import grad_cache
    from vlp.train.config import load_config
    from vlp.train.trainer import build_engine, build_model, clip_gradients, engine_dtype

    os.environ.setdefault("LOCAL_RANK", str(rank))
    tree = copy.deepcopy(tree)
    dense = mode == "dense"
    tree["train"].update(batch_size=MICRO * ACCUM if dense else MICRO, accumulate="plain" if dense else mode)
    tree["deepspeed"] = {**tree.get("deepspeed", {}), "grad_accum": 1 if dense else ACCUM}
    config = load_config(tree=tree)
    torch.manual_seed(0)
    model = build_model(config)
    tokenizer = model.text.tokenizer()
    engine = build_engine(config, model)
    device, dtype = torch.device("cpu"), engine_dtype(config)
    accumulation = grad_cache.build_accumulation(engine, config.train.accumulate, device, is_main=False)
    if break_scaling:  # every loss handed to engine.backward without the k factor that undoes its division
        backward = engine.backward
        engine.backward = lambda loss, **options: backward(loss / ACCUM, **options)
    params = {name: param for name, param in engine.module.named_parameters() if param.requires_grad}
    grads, losses = [], []

    def boundary() -> torch.Tensor | None:
        if engine.is_gradient_accumulation_boundary():
            full = {name: safe_get_full_grad(param) for name, param in params.items()}  # ZeRO 1-3: a collective
            grads.append({name: grad.detach().float().clone() for name, grad in full.items() if grad is not None})
        return clip_gradients(engine, config)

    for step in range(STEPS):
        parts = [micro_batch(tokenizer, step, rank, index) for index in range(ACCUM)]
        parts = [{key: value.to(dtype) if value.is_floating_point() else value for key, value in part.items()}
                 for part in parts]  # what DeviceStream hands the step
        if dense:
            parts = [{key: torch.cat([part[key] for part in parts]) for key in parts[0]}]
        stream = iter(parts)
        while True:
            try:
                out = accumulation.forward(lambda: next(stream))
            except StopIteration:
                break
            losses.append(float(out["loss"].detach()))
            accumulation.backward_and_step(out, boundary)
    assert engine.global_steps == STEPS
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # a no-op below ZeRO 3
        weights = {name: value.detach().float().clone() for name, value in engine.module.state_dict().items()}
    return {"grads": grads, "weights": weights, "losses": losses}


@pytest.fixture
def one_rank(monkeypatch):
    """A one-rank gloo group in this process (conftest's fixture destroys it after the test)."""
    import torch.distributed as dist
    from dist_utils import free_port

    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    # DeepSpeed keeps a clone of the first world group it saw in a module global; an earlier
    # test's group is destroyed by now, so let it clone this one.
    from deepspeed.utils import groups

    groups._WORLD_GROUP = None


def assert_same(ours: dict, reference: dict, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    assert len(ours["grads"]) == len(reference["grads"]) == STEPS
    for step, (got, want) in enumerate(zip(ours["grads"], reference["grads"])):
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=atol, rtol=rtol, msg=f"grad {name} at step {step}")
    for name, value in reference["weights"].items():
        torch.testing.assert_close(ours["weights"][name], value, atol=atol, rtol=rtol, msg=name)


def distance(ours: dict, reference: dict) -> float:
    """|ours - reference| / |reference| over every parameter's gradient at the first boundary."""
    names = sorted(reference["grads"][0])
    want = torch.cat([reference["grads"][0][name].flatten() for name in names])
    got = torch.cat([ours["grads"][0][name].flatten() for name in names])
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("heads", list(HEADS), ids=list(HEADS))
def test_cached_accumulation_equals_the_dense_batch(one_rank, heads):
    tree = experiment(HEADS[heads])
    dense = train_steps(0, 1, tree, "dense")
    cached = train_steps(0, 1, tree, "contrastive")
    assert len(cached["grads"]) == len(dense["grads"]) == STEPS
    assert cached["losses"] == pytest.approx(dense["losses"], rel=1e-5)  # the whole batch's loss, logged
    assert_same(cached, dense)


def test_plain_accumulation_is_not_the_dense_batch(one_rank):
    """DeepSpeed's accumulation scores each micro-batch against its own negatives only."""
    tree = experiment(HEADS["clip"])
    dense, plain = train_steps(0, 1, tree, "dense"), train_steps(0, 1, tree, "plain")
    assert distance(plain, dense) > 0.05


def test_a_lost_k_factor_is_caught(one_rank):
    """The gradient comparison sees a scaling error (AdamW's weights alone barely would)."""
    tree = experiment(HEADS["clip"])
    dense, broken = train_steps(0, 1, tree, "dense"), train_steps(0, 1, tree, "contrastive", break_scaling=True)
    assert distance(broken, dense) > 0.05


def _reference_grads(model, parts) -> dict:
    """Every micro-batch forwarded with grad, drawing the RNG in cached accumulation's order
    (pass 1 over micro-batches 1..k-1, then micro-batch 0), one loss over all of them in batch
    order, one backward: GradCache's result without its memory saving."""
    encoded = [model.encode(part) for part in parts[1:]]
    encoded.insert(0, model.encode(parts[0]))
    keys = model.objective.cached_keys
    whole = {key: torch.cat([features[key] for features in encoded]) for key in keys}
    model.objective.loss(whole, {})["loss"].backward()
    return {name: param.grad.detach().clone() for name, param in model.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("replay", [True, False], ids=["rng_replayed", "rng_not_replayed"])
def test_dropout_masks_are_drawn_alike_in_both_passes(one_rank, monkeypatch, replay):
    """Patch dropout > 0: pass 2 must see pass 1's masks, or the cached embeddings belong to
    another network. Without the RNG replay (the negative control) the gradient is wrong."""
    import contextlib

    from vlp.train import grad_cache
    from vlp.train.config import load_config
    from vlp.train.trainer import build_engine, build_model

    if not replay:
        monkeypatch.setattr(grad_cache.RngSnapshot, "replay", lambda self: contextlib.nullcontext())
    tree = experiment(HEADS["clip"], deepspeed={"grad_accum": ACCUM, "grad_clip": 0.0})
    tree["model"]["image"]["patch_dropout"] = 0.5
    tree["train"]["batch_size"] = MICRO
    config = load_config(tree=tree)
    torch.manual_seed(0)
    model = build_model(config)
    reference = copy.deepcopy(model).train()
    engine = build_engine(config, model)
    parts = [micro_batch(model.text.tokenizer(), 0, 0, index) for index in range(ACCUM)]

    torch.manual_seed(7)
    expected = _reference_grads(reference, parts)
    torch.manual_seed(7)
    accumulation = grad_cache.build_accumulation(engine, "contrastive", torch.device("cpu"), is_main=False)
    stream = iter(parts)
    got = {}

    def boundary():
        if engine.is_gradient_accumulation_boundary():
            got.update({name: param.grad.detach().clone() for name, param in engine.module.named_parameters()
                        if param.grad is not None})

    accumulation.backward_and_step(accumulation.forward(lambda: next(stream)), boundary)
    assert got.keys() == expected.keys()
    gaps = {name: (got[name] - expected[name]).abs().max().item() for name in expected}
    if replay:
        assert max(gaps.values()) < 1e-5, gaps
    else:
        assert max(gaps.values()) > 1e-4


class LossScalingEngine:
    """A test double of DeepSpeed's engine under fp16: backward multiplies the loss by a loss
    scale and divides it by gradient_accumulation_steps, as DeepSpeed's scaler does (a CPU has no
    fp16 DeepSpeed to run)."""

    def __init__(self, module, accumulation_steps: int, loss_scale: float) -> None:
        self.module, self.steps, self.loss_scale, self.micro_steps = module, accumulation_steps, loss_scale, 0

    def __call__(self, batch):
        return self.module(batch)

    def gradient_accumulation_steps(self) -> int:
        return self.steps

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.steps == 0

    def backward(self, loss):
        (loss * self.loss_scale / self.steps).backward()

    def step(self) -> None:
        self.micro_steps += 1


def test_the_loss_scale_is_divided_out_of_the_cached_gradients():
    """The leaves' gradients carry the fp16 loss scale; the probe divides it out. With a scale
    of 1024 the accumulated gradient is 1024 x the dense batch's, as DeepSpeed's unscaling expects."""
    from vlp.train import grad_cache
    from vlp.train.config import load_config
    from vlp.train.trainer import build_model

    tree = experiment(HEADS["mix"])
    tree["train"]["batch_size"] = MICRO
    config = load_config(tree=tree)
    torch.manual_seed(0)
    model = build_model(config)
    dense_model = copy.deepcopy(model)
    parts = [micro_batch(model.text.tokenizer(), 0, 0, index) for index in range(ACCUM)]
    dense_model({key: torch.cat([part[key] for part in parts]) for key in parts[0]})["loss"].backward()

    engine = LossScalingEngine(model, ACCUM, loss_scale=1024.0)
    accumulation = grad_cache.CachedAccumulation(engine, torch.device("cpu"))
    stream = iter(parts)
    accumulation.backward_and_step(accumulation.forward(lambda: next(stream)), lambda: None)
    assert engine.micro_steps == ACCUM
    for (name, param), reference in zip(model.named_parameters(), dense_model.parameters()):
        torch.testing.assert_close(param.grad / 1024.0, reference.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("heads,key", [({"flair": {}}, "image_tokens"), ({"clip": {}, "filip": {}}, "text_tokens")],
                         ids=["flair", "filip"])
def test_a_head_that_needs_tokens_is_refused_in_one_line(heads, key):
    from vlp.train.config import load_config

    tree = experiment(heads, deepspeed={"grad_accum": 2})
    tree["data"]["sub_captions"] = 2
    with pytest.raises(ConfigError) as error:
        load_config(tree=tree)
    message = str(error.value)
    assert "\n" not in message
    head = [name for name in heads if name != "clip"][0]
    assert f"head {head} reads" in message and key in message and "train.accumulate: plain" in message
    # Plain accumulation, or no accumulation, trains it.
    tree["train"]["accumulate"] = "plain"
    load_config(tree=tree)
    tree["train"]["accumulate"], tree["deepspeed"]["grad_accum"] = "contrastive", 1
    load_config(tree=tree)


# -- several ranks, ZeRO stages, bf16 (real gloo process groups) ------------------------------

def _dense_and_cached(rank, world_size, tree, modes=("dense", "contrastive")):
    return {mode: train_steps(rank, world_size, tree, mode) for mode in modes}


@pytest.mark.slow
@pytest.mark.parametrize("heads", ["clip", "siglip", "meru", "mix"])
def test_two_ranks_equal_the_dense_batch(heads):
    from dist_utils import run_ranks

    results = run_ranks(_dense_and_cached, 2, experiment(HEADS[heads]), timeout=600)
    for result in results:
        assert_same(result["contrastive"], result["dense"])
    # Both ranks hold the same weights (one data-parallel model).
    for name, value in results[0]["contrastive"]["weights"].items():
        torch.testing.assert_close(results[1]["contrastive"]["weights"][name], value, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_two_ranks_every_zero_stage(zero_stage):
    from dist_utils import run_ranks

    tree = experiment(HEADS["mix"], deepspeed={"zero_stage": zero_stage})
    for result in run_ranks(_dense_and_cached, 2, tree, timeout=600):
        assert_same(result["contrastive"], result["dense"])


@pytest.mark.slow
def test_two_ranks_bf16_zero2_finish_and_match_loosely():
    """bf16 towers: batch shapes change the kernels' rounding, so the match is to bf16's
    precision, and far closer than plain accumulation gets."""
    from dist_utils import run_ranks

    tree = experiment(HEADS["clip"], deepspeed={"zero_stage": 2, "precision": "bf16"})
    for result in run_ranks(_dense_and_cached, 2, tree, ("dense", "contrastive", "plain"), timeout=600):
        dense, cached, plain = result["dense"], result["contrastive"], result["plain"]
        assert all(torch.isfinite(v).all() for v in cached["weights"].values())
        assert cached["losses"] == pytest.approx(dense["losses"], rel=2e-2)
        gap = distance(cached, dense)
        assert gap < 0.2 * distance(plain, dense), (gap, distance(plain, dense))
        for name, value in dense["weights"].items():
            torch.testing.assert_close(cached["weights"][name], value, atol=2e-2, rtol=2e-2, msg=name)


# -- the trainer: log line, non-finite guard, stop signal mid-accumulation, exact resume -------

DRIVER = Path(__file__).with_name("grad_cache_driver.py")


def _run(args, env):
    return subprocess.run([sys.executable, str(DRIVER), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env), timeout=600)


@pytest.mark.slow
def test_signal_mid_accumulation_stops_at_a_step_boundary_and_resumes_exactly(tmp_path, digits_dir):
    from conftest import tiny_config

    from vlp.train.weights import consolidate

    config = tiny_config(tmp_path, digits_dir, train={"steps": 4, "checkpoint_every": 4, "keep_checkpoints": 4},
                         deepspeed={"grad_accum": 2})
    full = _run(["train", config, "name=full"], {})
    assert full.returncode == 0, full.stderr[-3000:]
    assert "train.accumulate: contrastive: 2 micro-batches per step" in full.stdout
    # Objective calls per step with k = 2: the capture of micro-batch 1, the whole batch, one
    # replay. Call 4 is step 2's capture: SIGUSR1 arrives in the middle of its accumulation.
    stopped = _run(["train", config, "name=cut"], {"VLP_SIGNAL_AT_CALL": "4"})
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopped at step 2 on USR1" in stopped.stdout
    cut = tmp_path / "runs" / "cut"
    assert (cut / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    client = json.loads((cut / "checkpoints" / "step_00000002" / "client_state.json").read_text())["train_state"]
    assert client["batch_in_epoch"] == 4 and client["samples_seen"] == 32  # both micro-batches of both steps
    resumed = _run(["train", config, "name=cut", "--resume", "latest"], {})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = consolidate(tmp_path / "runs" / "full" / "checkpoints", "step_00000004")
    ours = consolidate(cut / "checkpoints", "step_00000004")
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_nonfinite_whole_batch_loss_skips_the_accumulated_step(tmp_path, digits_dir):
    from conftest import tiny_config

    config = tiny_config(tmp_path, digits_dir, train={"steps": 3, "checkpoint_every": 0}, deepspeed={"grad_accum": 2})
    # Heads run once per step (on the whole accumulated batch): the first step's loss is NaN.
    proc = _run(["train", config], {"VLP_NAN_AT_HEAD_CALL": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if "nonfinite_skipped" in r]
    assert len(skipped) == 1 and skipped[0]["nonfinite_heads"] == "clip" and skipped[0]["step"] == 0
    steps = [r for r in records if "loss/total" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in steps)
    # Three steps of two micro-batches trained, after the two of the skipped step were consumed.
    client = tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000003" / "client_state.json"
    state = json.loads(client.read_text())["train_state"]
    assert state["batch_in_epoch"] == 8 and state["samples_seen"] == 3 * 16
