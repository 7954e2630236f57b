"""Real jobs on the local one-node Slurm cluster (`bash slurm/local_cluster.sh start`).

Run with `--basetemp` on a shared machine: pytest deletes old numbered temp folders, which may
be this session's while its jobs still run.

(a) `vlp submit` of a 2-task CPU job trains a tiny demo config to completion on gloo;
(b) the same job sent SIGUSR1 mid-run checkpoints, requeues itself, resumes from `latest` and ends
    with the same step count and bit-identical weights as (a), with the srun and the deepspeed
    launcher;
(c) injection attempts through a real sbatch/srun run nothing and arrive literally;
(d) Slurm's own `--signal=USR1@T` before the time limit reaches the srun tasks, and
    `train.preemption.requeue()` brings the job back with SLURM_RESTART_COUNT=1;
(e) `/venv/bin/vlp submit` from a shell whose PATH lacks the venv, with no `command` in the
    profile, trains to completion: the job runs the submitting interpreter, not a `vlp` on PATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
STEPS = 40
TASKS = 2
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _skip_reason() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm is not installed (bash slurm/local_cluster.sh install)"
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "sinfo does not answer: the local Slurm cluster is not up (bash slurm/local_cluster.sh start)"
    states = result.stdout.split()
    if result.returncode != 0 or not any(s.rstrip("*~#") in {"idle", "mix", "alloc", "comp"} for s in states):
        return f"the local Slurm cluster is not up (sinfo: {result.stderr.strip() or states}); bash slurm/local_cluster.sh start"
    if not DEMO.is_file():
        return "configs/demo.yaml is missing"
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def squeue_state(job_id: str) -> str | None:
    result = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    words = result.stdout.split()
    return words[0] if result.returncode == 0 and words else None


def job_field(job_id: str, field: str) -> str | None:
    result = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
    match = re.search(rf"\b{field}=(\S+)", result.stdout)
    return match.group(1) if match else None


def log_of(run_dir: Path, job_id: str) -> str:
    path = run_dir / "slurm" / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.is_file() else f"(no log at {path})"


def wait_final(job_id: str, run_dir: Path, timeout_s: float = 900) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = squeue_state(job_id)
        if state in FINAL_STATES:
            return state
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} did not finish in {timeout_s}s; log tail:\n{log_of(run_dir, job_id)[-3000:]}")


def write_profile(folder: Path, **extra) -> Path:
    profile = {
        # The same `vlp` entry point; `python -m train.cli` because the repo is not pip-installed here.
        "command": [sys.executable, "-m", "vlp.cli"],
        "env": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra.pop("env", {})},
        **extra,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def tiny_config(folder: Path, data_dir: Path) -> Path:
    """configs/demo.yaml shrunk to seconds per job: small towers, small batches, no evals/exports."""
    tree = yaml.safe_load(DEMO.read_text())
    tree["name"] = "tiny"
    tree["data"].update(build_dir=str(data_dir), train=[{"urls": str(data_dir / "digits-train-{000000..000002}.tar")}])
    tree["model"] = {
        "embed_dim": 32,
        "image": {**tree["model"]["image"], "width": 32, "layers": 1, "head_width": 16},
        "text": {**tree["model"]["text"], "width": 32, "heads": 2, "layers": 1},
        "heads": tree["model"]["heads"],
    }
    tree["train"].update(steps=STEPS, batch_size=8, warmup_steps=0, log_every=1, checkpoint_every=0)
    tree["evals"], tree["export"] = [], []
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def vlp_submit(args: list[str], cwd: Path = ROOT, entry: list[str] | None = None,
               env: dict | None = None) -> tuple[str, Path]:
    entry = entry or [sys.executable, "-m", "vlp.cli"]
    result = subprocess.run([*entry, "submit", *args], cwd=cwd, capture_output=True,
                            text=True, env=env or dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"submitted job (\d+)", result.stdout).group(1)
    run_dir = Path(re.search(r"run folder (\S+)", result.stdout).group(1))
    return job_id, run_dir


def final_weights(run_dir: Path) -> dict:
    import torch

    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    state = torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)
    return state["module"]


def last_step(run_dir: Path) -> int:
    steps = [json.loads(line).get("step", -1) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return max(steps)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("slurm")
    return {"base": base, "config": tiny_config(base / "cfg", base / "digits"), "profile": write_profile(base / "cfg")}


@pytest.fixture(scope="module")
def reference_run(setup):
    """(a)'s uninterrupted job; (b) compares against it."""
    job_id, run_dir = vlp_submit([str(setup["config"]), f"output_dir={setup['base'] / 'ref'}",
                                  "--ntasks-per-node", str(TASKS), "--profile", str(setup["profile"])])
    state = wait_final(job_id, run_dir)
    return job_id, run_dir, state


def test_two_task_job_trains_to_completion(reference_run):
    job_id, run_dir, state = reference_run
    log = log_of(run_dir, job_id)
    assert state == "COMPLETED", log[-3000:]
    assert (run_dir / "slurm" / "job.sbatch").is_file()
    assert (run_dir / "slurm" / "job_id").read_text().strip() == job_id
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == STEPS
    assert results["samples_seen"] == STEPS * 8 * TASKS  # two ranks took part
    assert last_step(run_dir) == STEPS
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert f"job {job_id} start" in log and "restart 0" in log
    status = subprocess.run([sys.executable, "-m", "vlp.cli", "status", str(run_dir)], capture_output=True,
                            text=True, cwd=ROOT)
    assert status.returncode == 0 and f"{job_id} COMPLETED" in status.stdout and f"last step  {STEPS}" in status.stdout


# deepspeed: one launcher task per node starts both ranks; SIGUSR1 must reach the ranks through it
# without killing it.
LAUNCHERS = {"srun": [], "deepspeed": ["--launcher", "deepspeed", "--cpus-per-task", str(TASKS)]}


# The srun case runs by default; the deepspeed launcher's (54 s) with `-m nightly`; both launchers
# also train in test_slurm_multinode.
@pytest.mark.parametrize("launcher", ["srun", pytest.param("deepspeed", marks=pytest.mark.nightly)])
def test_usr1_checkpoints_requeues_and_resumes_to_the_same_weights(launcher, setup, reference_run):
    import torch

    _, ref_dir, ref_state = reference_run
    assert ref_state == "COMPLETED"
    job_id, run_dir = vlp_submit([str(setup["config"]), f"output_dir={setup['base'] / ('preempted-' + launcher)}",
                                  "--ntasks-per-node", str(TASKS), *LAUNCHERS[launcher],
                                  "--profile", str(setup["profile"])])
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # wait for training to be under way
        if metrics.is_file() and last_step(run_dir) >= 5:
            break
        assert squeue_state(job_id) not in FINAL_STATES, log_of(run_dir, job_id)[-3000:]
        time.sleep(0.5)
    # `scancel -s USR1` without --batch signals the job steps (the trainer ranks), not the batch
    # shell: the same processes Slurm's --signal=USR1@T reaches.
    subprocess.run(["scancel", "-s", "USR1", job_id], check=True)
    state = wait_final(job_id, run_dir)
    log = log_of(run_dir, job_id)
    assert state == "COMPLETED", log[-3000:]
    stopped = re.search(r"stopped at step (\d+) on USR1; checkpoint written, job requeued", log)
    assert stopped, f"the trainer did not stop on USR1 and requeue:\n{log[-3000:]}"
    assert int(stopped.group(1)) < STEPS
    assert "restart 1" in log and job_field(job_id, "Restarts") == "1"
    assert last_step(run_dir) == STEPS
    assert json.loads((run_dir / "results.json").read_text())["steps"] == STEPS
    reference, resumed = final_weights(ref_dir), final_weights(run_dir)
    assert reference.keys() == resumed.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=0, atol=0, msg=name)


RECORDER = """
import json, os, sys
with open(os.environ["VLP_TEST_RECORD"] + "." + os.environ["SLURM_PROCID"], "w") as out:
    json.dump({"argv": sys.argv[1:], "value": os.environ["VLP_TEST_VALUE"], "rank": os.environ["RANK"],
               "world": os.environ["WORLD_SIZE"], "master": os.environ["MASTER_ADDR"]}, out)
"""


def test_injection_through_real_sbatch_runs_nothing(tmp_path):
    sentinel = tmp_path / "pwned"
    payloads = [f"$(touch {sentinel})", f"`touch {sentinel}`", f"x; touch {sentinel}", f"x\ntouch {sentinel}",
                f"'; touch {sentinel}; '"]
    weird = tmp_path / "dir$(touch pwned);`touch pwned`"
    config = tiny_config(weird, tmp_path / "digits")
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    record = tmp_path / "record"
    profile = write_profile(tmp_path, command=[sys.executable, str(recorder)],
                            env={"VLP_TEST_RECORD": str(record), "VLP_TEST_VALUE": payloads[0] + payloads[3]})
    # The last caption_key wins in the config; all of them must reach argv as typed.
    overrides = [f"data.caption_key=x{payload}" for payload in payloads] + [f"output_dir={tmp_path / 'runs'}"]
    job_id, run_dir = vlp_submit([str(config), *overrides,
                                  "--ntasks-per-node", str(TASKS), "--profile", str(profile)], cwd=weird)
    state = wait_final(job_id, run_dir, timeout_s=300)
    assert state == "COMPLETED", log_of(run_dir, job_id)
    records = [json.loads(Path(f"{record}.{rank}").read_text()) for rank in range(TASKS)]
    for rank, item in enumerate(records):
        assert item["argv"] == ["train", str(config), *overrides, "--resume", "latest"]
        assert item["value"] == payloads[0] + payloads[3]
        assert (item["rank"], item["world"]) == (str(rank), str(TASKS))
    assert not [hit for hit in tmp_path.rglob("pwned") if hit.is_file()], "an injected command ran"


PREEMPTIBLE = """
import os, sys, time
sys.path.insert(0, os.environ["PYTHONPATH"])
from vlp.train import preemption
preemption.install_handlers()
print("task", os.environ["SLURM_PROCID"], "restart", os.environ.get("SLURM_RESTART_COUNT", "0"), flush=True)
if os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
    sys.exit(0)  # the requeued run: done
deadline = time.time() + 170
while preemption.stop_reason() is None and time.time() < deadline:
    time.sleep(0.2)
print("task", os.environ["SLURM_PROCID"], "reason", preemption.stop_reason(), flush=True)
# Slurm signals the tasks one after another; like the trainer (which agrees on the signal across
# ranks and checkpoints first), give every task time to see it before rank 0 requeues.
time.sleep(5)
if preemption.stop_reason() == "USR1" and preemption.requeue():
    print("requeued", flush=True)
time.sleep(30)  # Slurm kills the step once the requeue lands
"""


def test_signal_before_time_limit_reaches_tasks_and_requeue_restarts(tmp_path):
    """Slurm's own warning: with --time=2 --signal=USR1@60 slurmctld sends SIGUSR1 at its first
    30-second check once `now + 60 + 30 >= end`, i.e. 30-60 s into the job: after the tasks have
    installed their handlers, before the limit."""
    script = tmp_path / "preemptible.py"
    script.write_text(PREEMPTIBLE)
    profile = write_profile(tmp_path, command=[sys.executable, str(script)])
    config = tiny_config(tmp_path / "cfg", tmp_path / "digits")
    job_id, run_dir = vlp_submit([str(config), f"output_dir={tmp_path / 'runs'}", "--ntasks-per-node", str(TASKS),
                                  "--time", "2", "--signal-seconds", "60", "--profile", str(profile)])
    state = wait_final(job_id, run_dir, timeout_s=400)
    log = log_of(run_dir, job_id)
    assert state == "COMPLETED", log
    assert "task 0 reason USR1" in log and "task 1 reason USR1" in log, log
    assert "requeued" in log and "restart 1" in log and job_field(job_id, "Restarts") == "1", log


def test_job_runs_the_submitting_vlp_from_a_shell_without_the_venv(tmp_path):
    """Issue 14: `/venv/bin/vlp submit` from a shell without the venv on PATH used to render
    `vlp train ...`, whose tasks died with `exec: vlp: not found` (exit 127)."""
    venv_bin = Path(sys.executable).parent
    entry = venv_bin / "vlp"
    if not entry.is_file():
        pytest.skip(f"no console script at {entry}")
    path = ":".join(folder for folder in os.environ["PATH"].split(":") if Path(folder) != venv_bin)
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = path
    profile = write_profile(tmp_path / "cfg")
    tree = yaml.safe_load(profile.read_text())
    del tree["command"], tree["env"]["PYTHONPATH"]  # the default entry point, the installed package
    profile.write_text(yaml.safe_dump(tree))
    config = tiny_config(tmp_path / "cfg", tmp_path / "digits")
    job_id, run_dir = vlp_submit([str(config), "--ntasks-per-node", str(TASKS), "--profile", str(profile),
                                  f"output_dir={tmp_path / 'runs'}", "train.steps=5"],
                                 cwd=tmp_path, entry=[str(entry)], env=env)
    script = (run_dir / "slurm" / "job.sbatch").read_text()
    assert re.search(rf"^VLP=\({re.escape(str(venv_bin))}/python3?(\.\d+)? -m vlp\.cli\)$", script, re.M), script
    state = wait_final(job_id, run_dir, timeout_s=600)
    assert state == "COMPLETED", log_of(run_dir, job_id)[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 5
