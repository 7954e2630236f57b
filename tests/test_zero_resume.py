"""ZeRO 1-3 x fp32/bf16 on 2 gloo ranks: train, checkpoint, resume bit for bit; a ZeRO 2
checkpoint resumed on 1 and on 3 ranks through DeepSpeed's universal checkpoint; fp16 refused
at config load where DeepSpeed has none (this CPU).

Every 2-rank run is made once per module (`two_rank_run`) and shared: the world-size tests
resume the matrix's ZeRO 2 fp32 run."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_vlp, tiny_config

from vlp.train.checkpoint_io import consolidate
from vlp.train.config import load_config

# Global batch 12 on every world size (2 x 6, 1 x 12, 3 x 4): the lr schedule and samples_seen
# mean the same thing before and after a world-size change. lr 5e-3 so 2 steps move the weights.
STEPS, SAVED = 4, "step_00000002"
TRAIN = {"steps": STEPS, "batch_size": 6, "warmup_steps": 1, "lr": 5e-3, "checkpoint_every": 2, "keep_checkpoints": 3}
CASES = [(stage, precision) for stage in (1, 2, 3) for precision in ("fp32", "bf16")]
# The default run keeps one partitioned-optimizer case per precision (ZeRO 2 bf16, ZeRO 3 fp32);
# the other four (30 s each) run with `-m nightly`.
DEFAULT_CASES = {(2, "bf16"), (3, "fp32")}
MATRIX = [pytest.param(s, p, id=f"zero{s}-{p}", marks=() if (s, p) in DEFAULT_CASES else pytest.mark.nightly)
          for s, p in CASES]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in metrics(run_dir) if "loss/total" in r}


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, digits_dir):
    """(stage, precision) -> (config path, run folder) of an uninterrupted 4-step 2-rank run,
    checkpoints at steps 2 and 4; each run once per module."""
    made: dict = {}

    def run(stage: int, precision: str) -> tuple[Path, Path]:
        if (stage, precision) not in made:
            root = tmp_path_factory.mktemp(f"zero{stage}_{precision}")
            config = tiny_config(root, digits_dir, train=TRAIN, evals=[],
                                 deepspeed={"zero_stage": stage, "precision": precision})
            run_vlp("train", config, "--nproc", "2")
            made[stage, precision] = config, root / "runs" / "tiny"
        return made[stage, precision]

    return run


def interrupted_copy(run_dir: Path, dest: Path) -> Path:
    """The run as if it had stopped after step 2: later checkpoints gone, `latest` at step 2."""
    shutil.copytree(run_dir.parent, dest)
    copy = dest / run_dir.name
    checkpoints = copy / "checkpoints"
    for later in checkpoints.glob("step_*"):
        if later.name > SAVED:
            shutil.rmtree(later)
    (checkpoints / "latest").write_text(SAVED + "\n")
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("stage,precision", MATRIX)
def test_two_ranks_train_and_resume_bit_identical(tmp_path, two_rank_run, stage, precision):
    """Each ZeRO stage in fp32 and bf16 on 2 ranks: 4 finite steps; resumed from step 2 in new
    processes, the logged losses of steps 3-4 and the final fp32 master weights equal the
    uninterrupted run's bit for bit."""
    config, run_dir = two_rank_run(stage, precision)
    reference = step_records(run_dir)
    assert sorted(reference) == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in reference.values())
    assert reference[4]["samples_seen"] == 4 * 12
    saved = json.loads((run_dir / "checkpoints" / SAVED / "client_state.json").read_text())
    assert saved["dp_world_size"] == 2

    resumed_dir = interrupted_copy(run_dir, tmp_path / "resumed")
    run_vlp("train", config, f"output_dir={resumed_dir.parent}", "--nproc", "2", "--resume", "latest")
    resumed = step_records(resumed_dir)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step]["loss/total"] == reference[step]["loss/total"], step
        assert resumed[step]["lr"] == reference[step]["lr"], step
    assert not (resumed_dir / "checkpoints" / SAVED / "universal").exists()  # same world size: no conversion
    want = consolidate(run_dir / "checkpoints", f"step_{STEPS:08d}")
    got = consolidate(resumed_dir / "checkpoints", f"step_{STEPS:08d}")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


def _fixed_batch(model, size: int) -> dict:
    generator = torch.Generator().manual_seed(7)
    return {"image": torch.randn(size, 3, 32, 32, generator=generator),
            "text": model.text.tokenizer()([f"a handwritten {i % 10}" for i in range(size)])}


def _engine_state_after_load(rank, world_size, config_path, checkpoints):
    """What the trainer's resume path leaves in the engine on `world_size` ranks: the full fp32
    master weights and Adam moments, gathered from the partitions; the step, the lr, and the
    loss on this rank's share of a fixed global batch of 12 (before any further step)."""
    os.environ["LOCAL_RANK"] = str(rank)
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from vlp.train.checkpoint import Checkpointer, TrainState
    from vlp.train.checkpoint_io import Reshard
    from vlp.train.config import load_config
    from vlp.train.trainer import build_engine, build_model

    config = load_config(config_path, [f"train.batch_size={12 // world_size}"])
    torch.manual_seed(1234)  # other initial weights than the run's: the load must overwrite all
    model = build_model(config)
    where = (Path(checkpoints), SAVED)
    resharded = Reshard.plan(where, world_size, rank)
    engine = build_engine(config, model, load_universal=resharded is not None)
    state = TrainState()
    Checkpointer(Path(checkpoints), 1, rank).load(engine, state, where, universal=resharded.folder if resharded else None)
    # DeepSpeed links each parameter to its optimizer-state fragments lazily, at the first step;
    # link them now so the loaded moments can be read before any step changes them.
    engine.optimizer._lazy_init_hp_params_optimizer_state()
    named = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]
    weights = {name: safe_get_full_fp32_param(p).clone() for name, p in named}
    moments = {(name, key): safe_get_full_optimizer_state(p, key).clone() for name, p in named
               for key in ("exp_avg", "exp_avg_sq")}
    share = 12 // world_size
    batch = {k: v[rank * share:(rank + 1) * share] for k, v in _fixed_batch(model, 12).items()}
    with torch.no_grad():
        loss = float(engine(batch)["loss"])
    return {"weights": weights, "moments": moments, "loss": loss, "lr": engine.get_lr()[0],
            "global_steps": engine.global_steps, "schedule_step": engine.lr_scheduler.last_epoch,
            "state": state.state_dict(), "resharded": resharded is not None}


@pytest.fixture(scope="module")
def saved_engine_state(two_rank_run):
    """The ZeRO 2 fp32 checkpoint at step 2 loaded as saved, on its own 2 ranks."""
    from dist_utils import run_ranks

    config, run_dir = two_rank_run(2, "fp32")
    return run_ranks(_engine_state_after_load, 2, str(config), str(run_dir / "checkpoints"), timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, pytest.param(3, marks=pytest.mark.nightly)])
def test_zero2_resumes_on_another_world_size(tmp_path, two_rank_run, saved_engine_state, world_size):
    """A ZeRO 2 checkpoint of 2 ranks resumed on 1 and on 3: `vlp train --resume latest`
    converts it once to DeepSpeed's universal layout and says so; the engine then holds exactly
    the saved fp32 weights and Adam moments, the step and lr schedule continue, and the loss on a
    fixed global batch is the one the 2-rank engine gives."""
    from dist_utils import run_ranks

    config, run_dir = two_rank_run(2, "fp32")
    reference = step_records(run_dir)
    resumed_dir = interrupted_copy(run_dir, tmp_path / "resumed")
    checkpoints = resumed_dir / "checkpoints"
    batch = 12 // world_size
    proc = run_vlp("train", config, f"output_dir={resumed_dir.parent}", f"train.batch_size={batch}",
                   "--nproc", world_size, "--resume", "latest")
    universal = checkpoints / SAVED / "universal"
    line = (f"[vlp] optimizer state re-partitioned: {SAVED} was saved on 2 data-parallel ranks, resumed on "
            f"{world_size}, loaded through DeepSpeed's universal checkpoint {universal}")
    assert proc.stdout.count(line) == 1, proc.stdout[-3000:]
    assert universal.is_dir() and not (checkpoints / SAVED / ".universal.tmp").exists()
    events = [r for r in metrics(resumed_dir) if r.get("event") == "zero_resharded"]
    assert [(e["step"], e["from_dp_world_size"], e["to_dp_world_size"]) for e in events] == [(2, 2, world_size)]
    resumed = step_records(resumed_dir)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):  # the schedule is by step, and the global batch is 12 on every world size
        assert resumed[step]["lr"] == reference[step]["lr"], step
        assert resumed[step]["samples_seen"] == reference[step]["samples_seen"] == 12 * step
        assert torch.isfinite(torch.tensor(resumed[step]["loss/total"]))
    final = json.loads((checkpoints / f"step_{STEPS:08d}" / "client_state.json").read_text())
    assert final["dp_world_size"] == world_size  # the next resume sees the new layout

    # The engine state that load produced, on the new world size, against the saved one on 2.
    converted_at = universal.stat().st_mtime_ns
    states = run_ranks(_engine_state_after_load, world_size, str(config), str(checkpoints), timeout=600)
    assert universal.stat().st_mtime_ns == converted_at  # converted once, then reused
    ours, saved = states[0], saved_engine_state[0]
    assert ours["resharded"] and not saved["resharded"]
    assert ours["weights"].keys() == saved["weights"].keys()
    for name, value in saved["weights"].items():
        torch.testing.assert_close(ours["weights"][name], value, rtol=0, atol=0, msg=name)
    for key, value in saved["moments"].items():
        torch.testing.assert_close(ours["moments"][key], value, rtol=0, atol=0, msg=str(key))
    # The consolidated checkpoint (DeepSpeed's zero_to_fp32 merge) is what both engines hold.
    on_disk = consolidate(checkpoints, SAVED)
    for name, value in saved["weights"].items():
        torch.testing.assert_close(value, on_disk[name], rtol=0, atol=0, msg=name)
    assert ours["global_steps"] == saved["global_steps"] == 2
    assert ours["schedule_step"] == saved["schedule_step"] and ours["lr"] == saved["lr"]
    assert ours["state"]["step"] == 2 and ours["state"]["samples_seen"] == 24
    # Identical weights, identical 12 samples: the per-rank losses (this rank's rows against all
    # gathered columns) average to the same global loss; only the fp32 summation order over 1, 2
    # or 3 shards differs (~1e-7 relative), so 1e-5 is loose for that and far below what one step
    # at lr 5e-3 changes (the logged losses of steps 2 and 3 differ by more).
    ours_loss = sum(s["loss"] for s in states) / world_size
    saved_loss = sum(s["loss"] for s in saved_engine_state) / 2
    assert ours_loss == pytest.approx(saved_loss, rel=1e-5)


def test_fp16_on_this_cpu_is_refused_before_training_starts(tmp_path, digits_dir):
    """DeepSpeed 0.19's CPU accelerator has fp16 only with oneDNN fp16 kernels; without them it
    fails inside `deepspeed.initialize`. `vlp train` refuses it before anything starts instead,
    while the config itself stays valid: submitting, exporting or evaluating an fp16 run from a
    machine without fp16 works."""
    if torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_fp16_supported():
        pytest.skip("this machine has fp16 (a CUDA device or oneDNN fp16 kernels)")
    config = tiny_config(tmp_path, digits_dir, deepspeed={"precision": "fp16"})
    proc = run_vlp("train", config, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"vlp: error: {config}: deepspeed.precision=fp16: DeepSpeed has no fp16 on this CPU (no CUDA device, "
        "no oneDNN fp16 kernels); use bf16 or fp32"]
    assert not (tmp_path / "runs").exists()
    assert load_config(config).deepspeed.precision == "fp16"
