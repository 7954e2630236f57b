"""Jobs across two Slurm nodes (`bash slurm/local_cluster.sh start --nodes 2`: two slurmd
daemons on this host, nodes vlp-n1 and vlp-n2).

(a) `vlp submit --nodes 2` trains with one rank on each node, with the srun and the deepspeed
    launcher, and ends with the weights of the same world size on one node (1e-6);
(b) the job is submitted by the venv's `vlp` from a shell whose PATH lacks the venv, with a
    profile that names no command: the job must still run the interpreter that submitted it;
(c) every rank on the second node killed with SIGKILL mid-run: the rank left exits with a
    one-line reason within `train.dist_timeout_s`, the job requeues itself and finishes from the
    last checkpoint with the weights of an uninterrupted run.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_slurm import FINAL_STATES, final_weights, last_step, log_of, squeue_state, tiny_config, wait_final

ROOT = Path(__file__).resolve().parents[1]
VLP = Path(sys.executable).with_name("vlp")
NODES = ("vlp-n1", "vlp-n2")
# Generous: it also bounds the rendezvous, which waits for the slowest rank to start (each
# start may first JIT-build DeepSpeed's shm comm op). A killed peer is noticed at once anyway.
DIST_TIMEOUT_S = 300


def _nodes_up() -> list[str]:
    try:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split()[0] for line in result.stdout.splitlines()
            if line.split()[1].rstrip("*~#") in {"idle", "mix", "alloc", "comp"}]


_UP = _nodes_up()
pytestmark = [
    # Five short jobs; the module-scoped fixtures run several inside the first test's time.
    pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(2400),
    pytest.mark.skipif(not set(NODES) <= set(_UP),
                       reason=f"needs the two-node local cluster (bash slurm/local_cluster.sh start --nodes 2); up: {_UP}"),
]


def submit(args: list[str], cwd: Path = ROOT) -> tuple[str, Path]:
    """`vlp submit` by the venv's own entry point, from a shell whose PATH lacks the venv."""
    path = os.pathsep.join(part for part in os.environ["PATH"].split(os.pathsep) if Path(part) != VLP.parent)
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    result = subprocess.run([str(VLP), "submit", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                            env={**env, "PATH": path, "VLP_MAX_RESTARTS": "2"})
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"submitted job (\d+)", result.stdout).group(1)
    return job_id, Path(re.search(r"run folder (\S+)", result.stdout).group(1))


def rank_lines(log: str) -> dict[int, tuple[str, str]]:
    """{rank: (node, master)} from the line every rank prints when it joins the process group."""
    return {int(rank): (node, master) for rank, node, master in
            re.findall(r"\[vlp\] rank (\d+) of \d+ \(local rank \d+\) on node (\S+), host \S+, master (\S+)", log)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("multinode")
    config = tiny_config(base / "cfg", base / "digits")
    profile = base / "cfg" / "cluster.yaml"
    profile.write_text(yaml.safe_dump({"env": {"OMP_NUM_THREADS": "1"}}))  # no `command`: the submitter's own
    return {"base": base, "config": config, "profile": profile}


def run(setup, name: str, *flags: str, overrides: tuple[str, ...] = ()) -> tuple[str, Path]:
    return submit([str(setup["config"]), f"output_dir={setup['base'] / name}", *overrides, *flags,
                   "--profile", str(setup["profile"])])


@pytest.fixture(scope="module")
def one_node_run(setup):
    """World size 2 on one node: the reference for the two-node runs."""
    job_id, run_dir = run(setup, "one-node", "--nodes", "1", "--ntasks-per-node", "2")
    assert wait_final(job_id, run_dir) == "COMPLETED", log_of(run_dir, job_id)[-3000:]
    return run_dir


LAUNCHERS = {"srun": [], "deepspeed": ["--launcher", "deepspeed", "--cpus-per-task", "1"]}


@pytest.fixture(scope="module")
def two_node_run(setup):
    """`two_node_run(launcher)` -> (job id, run folder, final state) of one uninterrupted
    two-node job per launcher, run on first use."""
    runs = {}

    def get(launcher: str) -> tuple[str, Path, str]:
        if launcher not in runs:
            job_id, run_dir = run(setup, f"two-node-{launcher}", "--nodes", "2", "--ntasks-per-node", "1",
                                  *LAUNCHERS[launcher])
            runs[launcher] = (job_id, run_dir, wait_final(job_id, run_dir))
        return runs[launcher]

    return get


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_nodes_train_like_one_node(launcher, two_node_run, one_node_run):
    import torch

    job_id, run_dir, state = two_node_run(launcher)
    log = log_of(run_dir, job_id)
    assert state == "COMPLETED", log[-3000:]
    ranks = rank_lines(log)
    assert sorted(ranks) == [0, 1], log[-3000:]
    assert {node for node, _ in ranks.values()} == set(NODES), "the two ranks did not run on two nodes"
    # Rendezvous at the first node's address as Slurm reaches it (its NodeAddr).
    node_addr = re.search(r"NodeAddr=(\S+)", subprocess.run(["scontrol", "-o", "show", "node", "vlp-n1"],
                                                            capture_output=True, text=True).stdout).group(1)
    assert {master.rsplit(":", 1)[0] for _, master in ranks.values()} == {node_addr}
    assert json.loads((run_dir / "results.json").read_text())["samples_seen"] == last_step(run_dir) * 8 * 2
    reference, ours = final_weights(one_node_run), final_weights(run_dir)
    assert reference.keys() == ours.keys()
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=1e-6, msg=name)


def ranks_on(node: str, job_id: str) -> list[int]:
    """Pids of the trainer processes of `job_id` that node's slurmd started."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = dict(item.split("=", 1) for item in (proc / "environ").read_text(errors="replace").split("\0")
                           if "=" in item)
            cmdline = (proc / "cmdline").read_text(errors="replace").split("\0")
        except OSError:
            continue
        if (environ.get("SLURMD_NODENAME") == node and environ.get("SLURM_JOB_ID") == job_id
                and "train" in cmdline and any("vlp" in word for word in cmdline)):
            pids.append(int(proc.name))
    return pids


def test_lost_node_is_survived_and_the_run_finishes_from_its_checkpoint(setup, two_node_run):
    import torch

    steps_overrides = ("train.checkpoint_every=10", f"train.dist_timeout_s={DIST_TIMEOUT_S}")
    job_id, run_dir = run(setup, "lost-node", "--nodes", "2", "--ntasks-per-node", "1", overrides=steps_overrides)
    checkpoints = run_dir / "checkpoints"
    deadline = time.monotonic() + 1200
    while not ((checkpoints / "latest").is_file() and (run_dir / "metrics.jsonl").is_file()
               and last_step(run_dir) >= 14):
        assert squeue_state(job_id) not in FINAL_STATES, log_of(run_dir, job_id)[-3000:]
        assert time.monotonic() < deadline, "training did not get under way"
        time.sleep(0.5)
    victims = ranks_on("vlp-n2", job_id)
    assert victims, "found no trainer process on vlp-n2"
    killed_at = datetime.datetime.now(datetime.timezone.utc)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)

    state = wait_final(job_id, run_dir)
    log = log_of(run_dir, job_id)
    assert state == "COMPLETED", log[-3000:]
    # The rank left on vlp-n1 gave one line saying why, and the step ended within the timeout.
    first_attempt = log.split("requeued to resume from the last checkpoint")[0]
    reasons = [line for line in first_attempt.splitlines() if line.startswith("vlp: ")]
    assert reasons and all("Traceback" not in line for line in reasons), first_attempt[-3000:]
    exit_line = re.search(r"step exit (\d+) at (\S+)", first_attempt)
    assert exit_line and exit_line.group(1) != "0", first_attempt[-3000:]
    ended = datetime.datetime.fromisoformat(exit_line.group(2).replace("Z", "+00:00"))
    assert (ended - killed_at).total_seconds() < DIST_TIMEOUT_S, first_attempt[-3000:]
    assert "restart 1" in log
    assert last_step(run_dir) == json.loads((run_dir / "results.json").read_text())["steps"]
    # Resumed from a checkpoint, not from scratch: the second attempt's first step is past 1 and
    # after the last checkpoint; metrics.jsonl (cut back to the checkpoint on resume) holds each
    # step once.
    second_attempt = log.split("restart 1 nodes", 1)[1]
    first_resumed = int(re.search(r"\[vlp\] step=(\d+)", second_attempt).group(1))
    assert first_resumed > 1 and (first_resumed - 1) % 10 == 0, second_attempt[-3000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if line and "step" in json.loads(line)]
    assert steps == list(range(1, last_step(run_dir) + 1)), steps
    _, reference_dir, reference_state = two_node_run("srun")
    assert reference_state == "COMPLETED"
    reference, ours = final_weights(reference_dir), final_weights(run_dir)
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=0, msg=name)
