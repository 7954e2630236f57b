"""The evaluation harness, driven by the evaluator registry: every registered evaluator runs its
own tiny example (`Evaluator.example`) on 2 gloo ranks under ZeRO-3 with uneven eval shards --
all the data in one shard, so rank 1 reads nothing -- finishes, and equals the one-process
result. Twice: on a real DeepSpeed ZeRO-3 engine made by vlp's own `build_engine` and run by the
trainer's `run_evaluators` (the process group from vlp's `init_distributed` with a short
`train.dist_timeout_s`, so a rank left waiting in a collective fails in seconds instead of
hanging to the 600 s default), and under simulated ZeRO-3, which also counts the forwards.

ZeRO-3 is simulated the way it constrains evaluation: the parameters carry `ds_id` (what
`zero3_partitioned` looks for) and every tower forward is a collective (ZeRO-3 all-gathers the
layer's weights there), here an all-gather of the tower's code that must agree on every rank. A
rank that skips a forward, or runs an image forward against another's text forward, fails or
hangs (until the run_ranks timeout) instead of passing.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DEMO_CONFIG
from dist_utils import free_port, run_ranks

from vlp.data_pipelines.sources import build
from vlp.models.heads import HEADS
from vlp.train.evals import EVALUATORS, EvalContext

WORLD = 2
# The real ZeRO-3 run's collective timeout: a rank out of lockstep fails after this many seconds.
DIST_TIMEOUT_S = 20


def _example_data(name: str, root: Path) -> dict:
    """Build the example's source into root/name; -> the evaluator's options."""
    example = EVALUATORS.get(name).example
    folder = root / name
    options = {key: str(value).format(dir=folder) if isinstance(value, str) else
               (list(value) if isinstance(value, tuple) else value) for key, value in example.options}
    if example.source is not None:
        build(example.source, folder, **dict(example.build))
        options["data"] = str(folder / f"{example.source}-{example.split}-000000.tar")
    return {"type": name, **options}


def _config(name: str, **sections):
    """The experiment config of a tiny model with the example's heads (and image tower); `sections`
    update the config's own (e.g. `deepspeed`, `train`)."""
    from vlp.train.config import load_config

    example = EVALUATORS.get(name).example
    tree = yaml.safe_load(DEMO_CONFIG.read_text())
    tree["data"] = {"train": [{"urls": "unused.tar"}], "sub_captions": 2}
    image = {"type": "open_clip_vit", "image_size": 64, "patch_size": 16, "width": 16, "layers": 1, "head_width": 8}
    tree["model"] = {
        "embed_dim": 16,
        "image": {key: list(value) if isinstance(value, tuple) else value for key, value in example.image}
        if example.image else image,
        "text": {"type": "open_clip_text", "context_length": 40, "width": 16, "heads": 2, "layers": 1},
        "heads": {head: dict(HEADS.get(head).example_config) for head in example.heads},
    }
    tree["evals"], tree["export"] = [], []
    for section, values in sections.items():
        tree[section] = {**tree.get(section, {}), **values}
    return load_config(tree=tree)


def _model(name: str):
    """A tiny model with the example's heads (and image tower), the same weights on every rank."""
    from vlp.models.dual_encoder import VLPModel

    torch.manual_seed(0)
    return VLPModel(_config(name).model).eval()


def _as_zero3(model) -> dict:
    """Mark the parameters partitioned and make each tower forward a collective that checks the
    ranks run the same tower; -> the forward counts."""
    import torch.distributed as dist

    for index, parameter in enumerate(model.parameters()):
        parameter.ds_id = index
    counts = {"image": 0, "text": 0}

    def gathering(tower: str, code: int):
        def hook(module, args):
            mine = torch.tensor([code])
            every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(every, mine)
            if any(int(other) != code for other in every):
                raise RuntimeError(f"ZeRO-3 forwards out of step: this rank runs {tower}, others {every}")
            counts[tower] += 1
        return hook

    model.image.register_forward_pre_hook(gathering("image", 1))
    model.text.register_forward_pre_hook(gathering("text", 2))
    return counts


def _evaluate(name: str, options: dict, context: EvalContext) -> dict:
    cls = EVALUATORS.get(name)
    return cls(cls.config_class.model_validate(options)).run(_model(name), context)


def _on_rank(rank: int, world_size: int, cases: dict) -> dict:
    out = {}
    for name, options in cases.items():
        cls = EVALUATORS.get(name)
        model = _model(name)
        counts = _as_zero3(model)
        results = cls(cls.config_class.model_validate(options)).run(model, EvalContext(rank=rank, world_size=world_size))
        out[name] = {"results": results, "forwards": counts}
    return out


def _on_zero3_engine_rank(rank: int, world_size: int, cases: dict, port: int, run_dir: str) -> dict:
    """Every evaluator on a real ZeRO-3 engine (`build_engine`, `deepspeed.zero_stage=3`), through
    the trainer's `run_evaluators`; -> name -> results."""
    import torch.distributed as dist

    from vlp.models.dual_encoder import VLPModel
    from vlp.train.distributed import init_distributed
    from vlp.train.trainer import build_engine, run_evaluators

    # run_ranks made a gloo group with the default timeout; the run's own, as `vlp train` makes it.
    dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(port)
    env = init_distributed(DIST_TIMEOUT_S, "cpu")
    out = {}
    for name, options in cases.items():
        config = _config(name, deepspeed={"zero_stage": 3, "precision": "fp32"},
                         train={"dist_timeout_s": DIST_TIMEOUT_S, "batch_size": 4, "device": "cpu"})
        torch.manual_seed(0)
        engine = build_engine(config, VLPModel(config.model))
        assert all(hasattr(p, "ds_id") for p in engine.module.parameters())  # partitioned: ZeRO-3
        cls = EVALUATORS.get(name)
        evaluator = cls(cls.config_class.model_validate(options))
        out[name] = run_evaluators([evaluator], engine, env, Path(run_dir), step=1, final=True)
    return out


def _assert_equal_results(name: str, got: dict, one: dict, rank: int) -> None:
    assert sorted(got) == sorted(one), (name, rank)
    for key, want in one.items():
        if isinstance(want, float) and math.isnan(want):
            assert math.isnan(got[key]), (name, key)
        else:
            assert got[key] == pytest.approx(want, rel=1e-5, abs=1e-6), (name, key, rank)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval_examples")
    return {name: _example_data(name, root) for name in EVALUATORS.names()}


def test_every_evaluator_has_an_example():
    missing = [name for name, cls in EVALUATORS.items() if cls.example is None]
    assert not missing, f"evaluators without an `example` (how the registry test runs them): {missing}"


@pytest.mark.slow  # 2 gloo ranks, every evaluator
@pytest.mark.nightly  # 46 s; the real ZeRO-3 engine case below runs by default
def test_every_evaluator_on_two_zero3_ranks_with_uneven_shards_equals_one_process(cases):
    two = run_ranks(_on_rank, WORLD, cases, timeout=240)
    for name, options in cases.items():
        one = _evaluate(name, options, EvalContext())
        ranks = [result[name] for result in two]
        assert ranks[0]["forwards"] == ranks[1]["forwards"], name  # lockstep: the same forwards
        for rank, result in enumerate(ranks):
            _assert_equal_results(name, result["results"], one, rank)


@pytest.mark.slow  # 2 gloo ranks, a DeepSpeed engine per evaluator
def test_every_evaluator_on_a_real_zero3_engine_with_uneven_shards_equals_one_process(cases, tmp_path):
    """One 2-rank pair for every evaluator; rank 1 reads no eval data. A rank out of lockstep
    waits in a collective the other never joins: an error after DIST_TIMEOUT_S, not a pass."""
    two = run_ranks(_on_zero3_engine_rank, WORLD, cases, free_port(), str(tmp_path), timeout=300)
    for name, options in cases.items():
        one = _evaluate(name, options, EvalContext())
        for rank, result in enumerate(two):
            _assert_equal_results(name, result[name], one, rank)
