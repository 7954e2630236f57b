"""Tests the registries drive, as timm's tests do: every registered head, exporter and data source
is tested by being registered, with no hand-written test of its own.

Heads: forward, backward, an fp32 loss from bf16 inputs, two gloo ranks equal to one process over
the same global batch, and a run through each evaluator its capabilities call for. The inputs are
the head's own tiny example (`Head.example_inputs`, `Head.example_config`).
Exporters: write -> read back with the target's own loader -> our weights, bit for bit.
Sources: build into a folder, read every shard back with plain tarfile.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import DEMO_CONFIG, read_tar
from dist_utils import run_ranks
from torch.testing import assert_close

from vlp.data_pipelines.sources import SOURCES, build
from vlp.models.heads import HEADS
from vlp.models.objective import Objective
from vlp.export import EXPORTERS, export_model

EMBED_DIM = 8
BATCH = 3  # per rank
WORLD = 2


def _example(name: str, batch: int, seed: int = 0):
    """(objective with the one example head, encoder outputs, data batch) for `name`."""
    head_class = HEADS.get(name)
    config = head_class.config_class(**head_class.example_config)
    torch.manual_seed(seed)
    objective = Objective({name: config}, EMBED_DIM)
    encoded, data = head_class.example_inputs(config, batch, EMBED_DIM, torch.Generator().manual_seed(seed + 1))
    return objective, encoded, data


def _floating(encoded: dict) -> list[str]:
    return [key for key, value in encoded.items() if value.is_floating_point()]


# ----------------------------------------------------------------------------- heads
@pytest.mark.parametrize("name", HEADS.names())
def test_head_forward_gives_a_finite_scalar_and_logging(name):
    objective, encoded, data = _example(name, BATCH)
    out = objective(encoded, data)
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    assert f"loss/{name}" in out["logging"]
    assert all(torch.isfinite(torch.as_tensor(value)).all() for value in out["logging"].values())


@pytest.mark.parametrize("name", HEADS.names())
def test_head_backward_reaches_its_inputs(name):
    objective, encoded, data = _example(name, BATCH)
    for key in _floating(encoded):
        encoded[key].requires_grad_()
    objective(encoded, data)["loss"].backward()
    grads = [encoded[key].grad for key in _floating(encoded)]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reached the encoder outputs"
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    for pname, param in objective.named_parameters():
        if param.requires_grad and param.grad is not None:
            assert torch.isfinite(param.grad).all(), pname


@pytest.mark.parametrize("name", HEADS.names())
def test_head_loss_is_fp32_from_bf16_inputs(name):
    objective, encoded, data = _example(name, BATCH)
    objective = objective.to(torch.bfloat16)  # as DeepSpeed's bf16 engine holds it
    encoded = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in encoded.items()}
    data = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in data.items()}
    out = objective(encoded, data)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def _slice(value, rank: int):
    return value[rank * BATCH : (rank + 1) * BATCH] if torch.is_tensor(value) else value


def _rank_fn(rank: int, world: int, names: list[str]) -> dict:
    """Every head on this rank's slice of the global example. Each rank runs `world` forwards with
    one seed and keeps forward number `rank`, so a head that draws random numbers per sample draws
    the very rows the one-process reference draws for this slice (CPU draws fill in order), and
    every rank runs the same collectives."""
    results = {}
    for name in names:
        objective, encoded, data = _example(name, BATCH * world)
        local = {k: v[rank * BATCH : (rank + 1) * BATCH].clone() for k, v in encoded.items()}
        local_data = {k: _slice(v, rank) for k, v in data.items()}
        for key in _floating(local):
            local[key].requires_grad_()
        torch.manual_seed(1234)
        losses = [objective(local, local_data)["loss"] for _ in range(world)]
        losses[rank].backward()
        results[name] = {
            "loss": losses[rank].detach(),
            "input_grads": {k: local[k].grad for k in _floating(local) if local[k].grad is not None},
            "param_grads": {n: p.grad for n, p in objective.named_parameters() if p.grad is not None},
        }
    return results


@pytest.fixture(scope="module")
def two_rank_results():
    # One 2-process gloo run for every head (about 7 s in all).
    return run_ranks(_rank_fn, WORLD, HEADS.names(), timeout=240)


@pytest.mark.parametrize("name", HEADS.names())
def test_two_gloo_ranks_equal_one_process(name, two_rank_results):
    """The mean of the ranks' losses is the one-process loss of the global batch; a rank's input
    gradient is world x the one-process gradient of its slice (ranks' losses are summed into it by
    the gathers' backward); the mean of the ranks' parameter gradients (DeepSpeed's all-reduce)
    is the one-process parameter gradient."""
    objective, encoded, data = _example(name, BATCH * WORLD)
    for key in _floating(encoded):
        encoded[key].requires_grad_()
    torch.manual_seed(1234)
    loss = objective(encoded, data)["loss"]
    loss.backward()
    ranks = [result[name] for result in two_rank_results]
    assert_close(torch.stack([r["loss"] for r in ranks]).mean(), loss.detach(), rtol=1e-5, atol=1e-6)
    for rank, result in enumerate(ranks):
        for key, grad in result["input_grads"].items():
            assert_close(grad, WORLD * _slice(encoded[key].grad, rank), rtol=1e-4, atol=1e-6, msg=f"{key} rank {rank}")
    for pname, param in objective.named_parameters():
        if param.grad is not None:
            mean = torch.stack([r["param_grads"][pname] for r in ranks]).mean(0)
            assert_close(mean, param.grad, rtol=1e-4, atol=1e-6, msg=pname)


def _evaluators_of(head_class) -> list[str]:
    """The evaluators a head's declared capabilities call for."""
    wanted = []
    if head_class.scores_embeddings:
        wanted.append("zeroshot")
    if head_class.grounds:
        wanted.append("grounding")
    if head_class.hyperbolic:
        wanted.append("hierarchy")
    return wanted


EVAL_CASES = [(name, ev) for name, cls in HEADS.items() for ev in _evaluators_of(cls)]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    build("shapes", out, train_size=1, test_size=4, shard_size=10, image_size=64)
    return out


def _tiny_model(name: str, tmp_path: Path):
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    tree = yaml.safe_load(DEMO_CONFIG.read_text())
    tree["output_dir"] = str(tmp_path)
    tree["data"] = {"train": [{"urls": str(tmp_path / "unused.tar")}], "sub_captions": 2}
    tree["model"] = {
        "embed_dim": 16,
        "image": {"type": "open_clip_vit", "image_size": 64, "patch_size": 16, "width": 16, "layers": 1, "head_width": 8},
        "text": {"type": "open_clip_text", "context_length": 40, "width": 16, "heads": 2, "layers": 1},
        "heads": {name: dict(HEADS.get(name).example_config)},
    }
    tree["evals"], tree["export"] = [], []
    torch.manual_seed(0)
    return VLPModel(load_config(tree=tree).model).eval()


@pytest.mark.parametrize(("name", "evaluator"), EVAL_CASES, ids=[f"{n}-{e}" for n, e in EVAL_CASES])
def test_head_runs_through_each_evaluator_it_declares(name, evaluator, tmp_path, digits_dir, shapes_dir):
    from vlp.train.evals import EVALUATORS, EvalContext

    data = {"zeroshot": str(digits_dir / "digits-test-000000.tar"),
            "grounding": str(shapes_dir / "shapes-test-000000.tar"), "hierarchy": None}[evaluator]
    cls = EVALUATORS.get(evaluator)
    options = {"type": evaluator, "data": data, "batch_size": 64}
    if evaluator == "grounding":
        options["method"] = name  # this head's own maps, not the baseline
    model = _tiny_model(name, tmp_path)
    with torch.no_grad():
        results = cls(cls.config_class(**options)).run(model, EvalContext())
    assert results and all(np.isfinite(float(v)) for v in results.values()), results


# ----------------------------------------------------------------------------- exporters
@pytest.mark.parametrize("fmt", EXPORTERS.names())
def test_exporter_round_trip(fmt, tmp_path):
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    exporter = EXPORTERS.get(fmt)
    tree = yaml.safe_load(DEMO_CONFIG.read_text())
    tree["output_dir"] = str(tmp_path)
    tree["data"] = {"train": [{"urls": str(tmp_path / "unused.tar")}]}
    tree["model"]["embed_dim"] = 16
    tree["model"]["image"].update(width=16, layers=1, head_width=8, image_size=32, patch_size=16)
    tree["model"]["text"].update(width=16, layers=1, heads=2, context_length=16)
    if exporter.example_image is not None:
        tree["model"]["image"] = dict(exporter.example_image)
    tree["evals"], tree["export"] = [], []
    config = load_config(tree=tree)
    torch.manual_seed(0)
    model = VLPModel(config.model).eval()
    out = export_model(model, config, tmp_path / fmt, fmt)
    card = json.loads((out / "model_card.json").read_text())
    assert card["format"] == fmt and all((out / name).is_file() for name in card["files"])
    back = exporter.read(out)
    ours = model.state_dict()
    assert back, f"{fmt}: read back nothing"
    for key, value in back.items():
        assert_close(value, ours[key], rtol=0, atol=0, msg=key)


# ----------------------------------------------------------------------------- data sources
def _png(path: Path, colour: tuple[int, int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), colour).save(path)


def _folder_input(tmp_path: Path) -> tuple[str, dict]:
    for index, colour in enumerate([(255, 0, 0), (0, 255, 0)]):
        _png(tmp_path / "in" / f"{index}.png", colour)
        (tmp_path / "in" / f"{index}.txt").write_text(f"box {index}")
    return str(tmp_path / "in"), {}


def _table_input(delimiter: str):
    def make(tmp_path: Path) -> tuple[str, dict]:
        _png(tmp_path / "a.png", (1, 2, 3))
        _png(tmp_path / "b.png", (4, 5, 6))
        table = tmp_path / "pairs.txt"
        table.write_text(delimiter.join(["filepath", "title"]) + "\n" + "\n".join(
            delimiter.join(row) for row in (["a.png", "first"], ["b.png", "second"])) + "\n")
        return str(table), {}
    return make


def _ct_input(tmp_path: Path) -> tuple[str, dict]:
    root = tmp_path / "vols"
    root.mkdir()
    np.save(root / "a.npy", np.full((8, 8, 8), 30, np.int16))
    (root / "a.txt").write_text("FINDINGS: Small cyst. IMPRESSION: Cyst.")
    return str(root), {"spacing": (4.0, 4.0, 4.0)}


def _ct_rate_input(tmp_path: Path) -> tuple[str, dict]:
    from test_ct_data import _ct_rate_fixture

    _ct_rate_fixture(tmp_path / "CT-RATE")
    return str(tmp_path / "CT-RATE"), {"split": "train", "spacing": (1.5, 1.5, 3.0)}


# What each source reads (its `arg` and options). Sources live in data_pipelines/ and declare no
# example of their own yet; a new source fails `test_every_source_has_an_example` until it is here.
SOURCE_INPUTS = {
    "digits": lambda tmp_path: (None, {"image_size": 8, "shard_size": 2000}),
    "shapes": lambda tmp_path: (None, {"train_size": 2, "test_size": 2, "shard_size": 4, "image_size": 32}),
    "ct-lesions": lambda tmp_path: (None, {"train_size": 1, "test_size": 1, "size": 16, "spacing": 8.0, "seed": 1}),
    "folder": _folder_input,
    "csv": _table_input(","),
    "tsv": _table_input("\t"),
    "ct": _ct_input,
    "ct-rate": _ct_rate_input,
}


def test_every_source_has_an_example():
    assert sorted(SOURCE_INPUTS) == SOURCES.names()


@pytest.mark.parametrize("name", SOURCES.names())
def test_source_builds_readable_shards(name, tmp_path):
    if name not in SOURCE_INPUTS:
        pytest.fail(f"source {name!r} has no example input in SOURCE_INPUTS")
    arg, options = SOURCE_INPUTS[name](tmp_path)
    out = tmp_path / "out"
    build(f"{name}:{arg}" if arg else name, out, **options)
    shards = sorted(out.rglob("*.tar"))
    assert shards, f"{name}: no shards written"
    samples = {key: sample for shard in shards for key, sample in read_tar(shard).items()}
    assert samples
    for key, sample in samples.items():
        assert any(ext.endswith("txt") for ext in sample), f"{name}: sample {key} has no text ({sorted(sample)})"
        assert len(sample) >= 2, f"{name}: sample {key} has only {sorted(sample)}"
