"""Faults provoked for real: kill -9 (also mid-checkpoint), NaN losses, a dying rank, unsafe
checkpoints. Nothing may cost the run its last good checkpoint."""

import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_vlp, tiny_config
from dist_utils import free_port

from vlp.train.checkpoint import COMPLETE, UnsafeCheckpoint, verify_safe
from vlp.train.weights import consolidate

pytestmark = pytest.mark.slow
DRIVER = ROOT / "tests" / "fault_driver.py"


def start(args, env=None, **kwargs):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


def test_kill_9_at_random_moments_then_resume_matches_uninterrupted(tmp_path, digits_dir):
    config = tiny_config(tmp_path, digits_dir, train={"steps": 8, "checkpoint_every": 2, "keep_checkpoints": 2})
    run_vlp("train", config)
    reference = consolidate(tmp_path / "runs" / "tiny" / "checkpoints", "step_00000008")

    crash_runs = tmp_path / "crash"
    ckpts = crash_runs / "tiny" / "checkpoints"
    argv = ["-m", "vlp.cli", "train", config, f"output_dir={crash_runs}", "--resume", "latest"]
    rng = random.Random(0)

    # 1) kill -9 while a checkpoint is being written (its folder exists, not yet COMPLETE).
    proc = start(argv)
    partial = lambda: any(p.is_dir() and not (p / COMPLETE).exists() for p in ckpts.glob("step_*")) if ckpts.exists() else False
    assert wait_for(partial, proc), proc.communicate()[1][-2000:]
    proc.kill()
    proc.wait()
    latest = (ckpts / "latest").read_text().strip() if (ckpts / "latest").exists() else None
    if latest is not None:  # `latest` may only ever name a complete checkpoint
        assert (ckpts / latest / COMPLETE).is_file()

    # 2) two more kills at random moments after training resumed.
    for _ in range(2):
        proc = start(argv)
        started = time.time()
        wait_for(lambda: (crash_runs / "tiny" / "metrics.jsonl").exists(), proc)
        time.sleep(rng.uniform(0.5, 4.0))
        proc.kill()
        proc.wait()
        latest = (ckpts / "latest").read_text().strip() if (ckpts / "latest").exists() else None
        if latest:
            assert (ckpts / latest / COMPLETE).is_file()
        assert time.time() - started < 240

    # 3) resume to the end: the same weights as the run that was never interrupted.
    run_vlp(*argv[2:])
    resumed = consolidate(ckpts, "step_00000008")
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=0, msg=key)
    assert len([p for p in ckpts.glob("step_*") if (p / COMPLETE).exists()]) <= 2  # keep_checkpoints


def test_transient_nan_is_skipped_and_training_finishes(tmp_path, digits_dir):
    config = tiny_config(tmp_path, digits_dir, train={"steps": 5, "checkpoint_every": 0})
    proc = subprocess.run([sys.executable, DRIVER, "train", config], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, VLP_FAULT_NAN_CALLS="3", OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(l) for l in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("nonfinite_skipped") == 1 and r.get("nonfinite_heads") == "clip" for r in records)
    assert [r["step"] for r in records if "loss/total" in r] == [1, 2, 3, 4, 5]  # every step still done
    assert all(json.loads(json.dumps(r["loss/total"])) == r["loss/total"] for r in records if "loss/total" in r)


def test_repeated_nan_stops_and_keeps_last_good_checkpoint(tmp_path, digits_dir):
    config = tiny_config(tmp_path, digits_dir, train={"steps": 10, "checkpoint_every": 2, "max_nonfinite_steps": 3})
    proc = subprocess.run([sys.executable, DRIVER, "train", config], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, VLP_FAULT_NAN_CALLS=",".join(map(str, range(4, 40))), OMP_NUM_THREADS="1"),
                          timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert "3 non-finite losses in a row from head(s) clip" in last_line and "step_00000002" in last_line
    ckpts = tmp_path / "runs" / "tiny" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    weights = consolidate(ckpts, "step_00000002")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_dead_rank_makes_the_survivor_exit_nonzero(tmp_path, digits_dir):
    """Ranks started by an outside launcher (as torchrun or srun would): rank 1 dies mid-step;
    rank 0 must exit with an error rather than hang in the collective."""
    config = tiny_config(tmp_path, digits_dir, train={"steps": 50, "checkpoint_every": 0, "dist_timeout_s": 30})
    port = free_port()
    procs = [
        start([DRIVER, "train", config], env=dict(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                                  MASTER_PORT=str(port), VLP_FAULT_EXIT_RANK="1", VLP_FAULT_EXIT_CALL="3"))
        for r in range(2)
    ]
    started = time.time()
    codes = [p.wait(timeout=180) for p in procs]
    assert codes[1] == 3
    assert codes[0] == 1
    assert time.time() - started < 180
    # The survivor says why in one line, not a traceback.
    errors = procs[0].stderr.read()
    assert "Traceback" not in errors, errors[-3000:]
    reasons = [line for line in errors.splitlines() if line.startswith("vlp: error: rank 0: a collective failed")]
    assert len(reasons) == 1, errors[-3000:]


def test_unsafe_pickle_in_checkpoint_is_refused(tmp_path, digits_dir):
    config = tiny_config(tmp_path, digits_dir, train={"steps": 2, "checkpoint_every": 2, "warmup_steps": 1})
    run_vlp("train", config)
    tag_dir = tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000002"
    verify_safe(tag_dir)  # our own checkpoints pass
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"module": Evil()}, tag_dir / "mp_rank_00_model_states.pt")
    with pytest.raises(UnsafeCheckpoint, match="mp_rank_00_model_states.pt: refused to load"):
        verify_safe(tag_dir)
    proc = run_vlp("train", config, "train.steps=4", "--resume", "latest", check=False)
    assert proc.returncode == 2 and "refused to load" in proc.stderr
    assert not marker.exists()


def guard_outputs(losses):
    return [{"loss": torch.tensor(value), "logging": {"loss/clip": torch.tensor(value)}} for value in losses]


def test_nonfinite_guard_reads_per_micro_batch_without_a_loss_scaler():
    """fp32/bf16: the decision is taken before backward, one host read per micro-batch."""
    from vlp.train.checkpoint import TrainState
    from vlp.train.monitors import NonFiniteGuard, TrainingStopped

    state, logged = TrainState(), []
    guard = NonFiniteGuard(2, state, lambda step, record: logged.append(record), lambda: "step_1")
    decisions = [guard.skip(out) for out in guard_outputs([1.0, float("nan")])]
    assert decisions == [False, True] and logged[-1] == {"nonfinite_skipped": 1, "nonfinite_heads": "clip"}
    with pytest.raises(TrainingStopped, match="2 non-finite losses in a row from head\\(s\\) clip"):
        guard.skip(guard_outputs([float("inf")])[0])


def test_nonfinite_guard_deferred_under_fp16_counts_on_the_device_and_reads_at_log_time():
    """fp16: DeepSpeed's loss scaler skips the step; the guard never syncs per micro-batch, and
    `settle` (log/checkpoint steps) logs the skips and stops after `limit` in a row."""
    from vlp.train.checkpoint import TrainState
    from vlp.train.monitors import NonFiniteGuard, TrainingStopped

    state, logged = TrainState(), []
    guard = NonFiniteGuard(3, state, lambda step, record: logged.append(record), lambda: "step_1", deferred=True)
    assert not any(guard.skip(out) for out in guard_outputs([float("nan"), float("nan"), 1.0, float("nan")]))
    assert logged == []  # nothing read yet
    guard.settle()
    assert state.nonfinite_steps == 1 and logged[-1]["nonfinite_skipped"] == 3
    guard.settle()
    assert len(logged) == 1  # nothing new since the last read
    for out in guard_outputs([float("nan"), float("nan")]):
        guard.skip(out)
    with pytest.raises(TrainingStopped, match="3 non-finite losses in a row"):
        guard.settle()
