"""`vlp submit` without a cluster: the rendered sbatch script, run for real against fake
`srun`/`vlp`/`scontrol`/`deepspeed` shims, must pass every value through literally and execute
nothing a user typed; plus the Slurm-environment helpers and `vlp status`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlp import cli
from vlp.slurm import profile as slurm_profile
from vlp.slurm import render as slurm_render
from vlp.slurm import status as status_cmd
from vlp.slurm import submit
from vlp.train import preemption

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
PYTHON = sys.executable  # the shims' interpreter, whatever a test does to sys.executable
VENV_BIN = str(Path(sys.executable).parent)

# Each payload would create the sentinel file if any shell evaluated it.
PAYLOADS = [
    "$(touch {s})",
    "`touch {s}`",
    "x; touch {s}",
    "x && touch {s} #",
    "x\ntouch {s}",
    "'; touch {s}; '",
    '"; touch {s}; "',
    "${{IFS}}$(touch${{IFS}}{s})",
]


def write_config(folder: Path, output_dir: Path, name: str = "tiny") -> Path:
    if not DEMO.is_file():
        pytest.skip("configs/demo.yaml is not in the repo yet")
    tree = yaml.safe_load(DEMO.read_text())
    tree.update(name=name, output_dir=str(output_dir))
    tree["train"].update(steps=10, warmup_steps=0)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def write_shim(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!{PYTHON}\nimport json, os, sys\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def write_entry_point(folder: Path, name: str, record: str) -> None:
    """A fake vlp entry point: `... deepspeed ...` is the launcher (it starts the command after
    --no_local_rank), anything else a trainer that only records its argv."""
    write_shim(
        folder,
        name,
        record + "\nif 'deepspeed' in sys.argv[1:4] and '--no_local_rank' in sys.argv:\n    args = sys.argv[sys.argv.index('--no_local_rank') + 1:]\n"
        "    os.environ.update(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1')\n    os.execvp(args[0], args)",
    )


def recorder(log: Path) -> str:
    return f"open({str(log)!r}, 'a').write(json.dumps({{'prog': os.path.basename(sys.argv[0]), 'argv': sys.argv[1:], " \
           f"'env': {{k: v for k, v in os.environ.items() if k.startswith(('VLP_TEST_', 'RANK', 'MASTER_'))}}}}) + '\\n')"


def make_shims(bin_dir: Path, log: Path) -> None:
    """Fakes that log their argv (one JSON line each) and, for launchers, exec the command."""
    record = recorder(log)
    write_entry_point(bin_dir, "vlp", record)
    write_shim(bin_dir, "module", record)
    write_shim(bin_dir, "scontrol", record + "\nprint('node01')")
    # srun: drop leading options, then run the task like a one-task step would.
    write_shim(
        bin_dir,
        "srun",
        record + "\nargs = sys.argv[1:]\nwhile args and args[0].startswith('-'):\n    args.pop(0)\n"
        "os.environ.update(SLURM_PROCID='0', SLURM_LOCALID='0', SLURM_NTASKS='1', SLURM_NODEID='0')\n"
        "os.execvp(args[0], args)",
    )
    # A `deepspeed` on PATH must not be what the job runs (an unactivated venv has none).
    write_shim(bin_dir, "deepspeed", "sys.exit('the job ran deepspeed from PATH')")


def render(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(["submit", *argv, "--dry-run"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_script(script: str, tmp_path: Path, without_venv: bool = False) -> list[dict]:
    """bash -n, then execute the script with the shims first on PATH (and, `without_venv`, the
    test's venv off it); returns the shims' log."""
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    make_shims(bin_dir, log)
    search = [folder for folder in os.environ["PATH"].split(":") if not (without_venv and folder == VENV_BIN)]
    env = dict(os.environ, PATH=":".join([str(bin_dir), *search]), SLURM_JOB_ID="1234",
               SLURM_JOB_NODELIST="node01", SLURM_NODEID="0", VLP_TEST_MARK="1")
    env.pop("RANK", None)
    result = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


def vlp_calls(calls: list[dict]) -> list[dict]:
    return [call for call in calls if call["prog"] == "vlp"]


@pytest.fixture(autouse=True)
def vlp_on_path(monkeypatch):
    """Scripts run the `vlp` shim, not this interpreter's real entry point (which would train);
    `test_default_entry_point_is_the_submitting_interpreter` checks the real default."""
    monkeypatch.setattr(slurm_render, "default_command", lambda: ["vlp"])


REAL_DEFAULT_COMMAND = slurm_render.default_command


@pytest.fixture
def sentinel(tmp_path):
    path = tmp_path / "pwned"
    yield path
    # Payloads name the sentinel absolutely, or relatively ("pwned" in whatever folder the shell is in).
    assert not [hit for hit in tmp_path.rglob("pwned") if hit.is_file()], "an injected command ran"


def test_dry_run_renders_requeue_safe_script(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "cfg", tmp_path / "runs")
    code, script, _ = render([str(config), "train.steps=20", "--nodes", "2", "--gpus-per-node", "8",
                              "--cpus-per-task", "12", "--partition", "gpu", "--time", "2-00:00:00",
                              "--account", "proj1", "--qos", "high", "--constraint", "a100&ib", "--exclusive"], capsys)
    assert code == 0
    run_dir = tmp_path / "runs" / "tiny"
    for line in ["--job-name=tiny", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12",
                 "--partition=gpu", "--time=2-00:00:00", "--account=proj1", "--qos=high", "--constraint=a100&ib",
                 "--exclusive", "--requeue", "--open-mode=append", "--signal=USR1@120",
                 f"--output={run_dir}/slurm/slurm-%j.out"]:
        assert f"#SBATCH {line}\n" in script
    assert not run_dir.exists(), "--dry-run must write nothing"
    calls = run_script(script, tmp_path)
    assert [call["argv"] for call in vlp_calls(calls)] == [["train", str(config), "train.steps=20", "--resume", "latest"]]
    srun = [call for call in calls if call["prog"] == "srun"][0]
    assert "--cpus-per-task=12" in srun["argv"]
    env = vlp_calls(calls)[0]["env"]
    assert env["RANK"] == "0" and env["MASTER_ADDR"] == "node01" and env["MASTER_PORT"] == str(10000 + 1234 % 20000)
    assert (run_dir / "slurm" / "job_id").read_text().strip() == "1234"


@pytest.mark.parametrize("payload", PAYLOADS)
def test_injection_in_overrides_is_passed_literally(payload, tmp_path, capsys, monkeypatch, sentinel):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "cfg", tmp_path / "runs")
    override = "data.caption_key=x" + payload.format(s=sentinel)  # 'x': a YAML plain scalar may not start with '`'
    code, script, err = render([str(config), override], capsys)
    assert code == 0, err
    calls = run_script(script, tmp_path)
    assert vlp_calls(calls)[0]["argv"] == ["train", str(config), override, "--resume", "latest"]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_injection_in_config_path_and_workdir_is_passed_literally(payload, tmp_path, capsys, monkeypatch, sentinel):
    weird = tmp_path / ("dir" + payload.format(s="pwned"))
    workdir = weird / "work"
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)
    config = write_config(weird, tmp_path / "runs")
    code, script, err = render([str(config)], capsys)
    assert code == 0, err
    calls = run_script(script, tmp_path)
    assert vlp_calls(calls)[0]["argv"] == ["train", str(config), "--resume", "latest"]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_injection_in_job_name_is_refused(payload, tmp_path, capsys, monkeypatch, sentinel):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "cfg", tmp_path / "runs")
    code, out, err = render([str(config), "--job-name", "run" + payload.format(s=sentinel)], capsys)
    assert code == 2 and out == ""
    assert "job name" in err
    code, out, err = render([str(config), "name=run" + payload.format(s=sentinel)], capsys)
    assert code == 2 and out == ""
    assert "name" in err


@pytest.mark.parametrize("payload", PAYLOADS)
def test_injection_in_run_folder_is_refused(payload, tmp_path, capsys, monkeypatch, sentinel):
    # The run folder lands in '#SBATCH --output=', which sbatch parses itself: strict pattern.
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "cfg", tmp_path / "runs")
    code, out, err = render([str(config), "output_dir=" + str(tmp_path / payload.format(s=sentinel))], capsys)
    assert code == 2 and out == ""
    assert "run folder" in err and "#SBATCH --output" in err


def write_profile(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize("payload", PAYLOADS)
def test_injection_in_profile_values(payload, tmp_path, capsys, monkeypatch, sentinel):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "cfg", tmp_path / "runs")
    value = payload.format(s=sentinel)
    # Values that go into the script body are quoted and arrive literally.
    profile = write_profile(tmp_path, {
        "modules": ["cuda/12.4", value],
        "env": {"VLP_TEST_VALUE": value, "NCCL_DEBUG": "INFO"},
        "container": {"image": "nvcr.io/x" + value, "mounts": ["/data:/data" + value]},
    })
    code, script, err = render([str(config), "--profile", str(profile)], capsys)
    assert code == 0, err
    calls = run_script(script, tmp_path)
    assert [call["argv"] for call in calls if call["prog"] == "module"] == [["load", "cuda/12.4"], ["load", value]]
    assert vlp_calls(calls)[0]["env"]["VLP_TEST_VALUE"] == value
    srun = [call for call in calls if call["prog"] == "srun"][0]["argv"]
    assert f"--container-image=nvcr.io/x{value}" in srun and f"--container-mounts=/data:/data{value}" in srun
    # Values that go into #SBATCH lines must match a strict pattern.
    for key in ("partition", "account", "qos", "constraint", "time", "mem"):
        profile = write_profile(tmp_path, {key: "ok" + value})
        code, out, err = render([str(config), "--profile", str(profile)], capsys)
        assert code == 2 and out == "", key
        assert f"{key}: " in err
    profile = write_profile(tmp_path, {"sbatch": ["--comment=" + value]})
    assert render([str(config), "--profile", str(profile)], capsys)[0] == 2
    profile = write_profile(tmp_path, {"env": {"X" + value: "1"}})
    assert render([str(config), "--profile", str(profile)], capsys)[0] == 2


def test_flags_go_through_the_same_checks(tmp_path, capsys, monkeypatch, sentinel):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "cfg", tmp_path / "runs")
    for flag in ("--partition", "--account", "--qos", "--constraint", "--time"):
        code, out, err = render([str(config), flag, f"x$(touch {sentinel})"], capsys)
        assert code == 2 and out == "", flag


def test_profile_unknown_key_and_bad_values(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "cfg", tmp_path / "runs")
    cases = [
        ({"partion": "gpu"}, r'partion: unknown key\. Did you mean "partition"\?'),
        ({"container": {"image": "x", "mount": ["/a"]}}, r'container\.mount: unknown key\. Did you mean "mounts"\?'),
        ({"launcher": "mpirun"}, r"launcher: "),
        ({"gpus_per_node": -1}, r"gpus_per_node: "),
    ]
    for tree, message in cases:
        profile = write_profile(tmp_path, tree)
        with pytest.raises(slurm_profile.SubmitError, match=message):
            slurm_profile.load_profile(profile)
        code, out, err = render([str(config), "--profile", str(profile)], capsys)
        assert code == 2 and str(profile) in err
    code, _, err = render([str(config), "--profile", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "does not exist" in err


def test_profile_lookup_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(slurm_profile.PROFILE_ENV, raising=False)
    assert slurm_profile.find_profile(None) is None
    home = tmp_path / ".config" / "vlp" / "cluster.yaml"
    home.parent.mkdir(parents=True)
    home.write_text("partition: cpu\n")
    assert slurm_profile.find_profile(None) == home
    monkeypatch.setenv(slurm_profile.PROFILE_ENV, "/from/env.yaml")
    assert slurm_profile.find_profile(None) == Path("/from/env.yaml")
    assert slurm_profile.find_profile("/explicit.yaml") == Path("/explicit.yaml")


def test_profile_defaults_and_flags_win(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "cfg", tmp_path / "runs")
    profile = write_profile(tmp_path, {"partition": "cpu", "account": "lab", "time": "01:00:00",
                                       "signal_seconds": 300, "setup": ["export VLP_TEST_SETUP=from-setup"],
                                       "command": ["vlp"]})
    monkeypatch.setenv(slurm_profile.PROFILE_ENV, str(profile))
    code, script, _ = render([str(config), "--partition", "gpu"], capsys)
    assert code == 0
    assert "#SBATCH --partition=gpu\n" in script and "#SBATCH --account=lab\n" in script
    assert "#SBATCH --signal=USR1@300\n" in script
    assert "export VLP_TEST_SETUP=from-setup\n" in script  # setup lines are shell, by design
    code, _, err = render([str(config), "--time", "4"], capsys)  # 4 minutes < 300 s warning
    assert code == 2 and "--signal-seconds=300" in err


def test_deepspeed_launcher(tmp_path, capsys, monkeypatch, sentinel):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "cfg", tmp_path / "runs")
    override = f"data.caption_key=$(touch {sentinel})"
    code, script, _ = render([str(config), override, "--nodes", "4", "--gpus-per-node", "8",
                              "--launcher", "deepspeed"], capsys)
    assert code == 0
    assert "#SBATCH --ntasks-per-node=1\n" in script and "#SBATCH --gpus-per-node=8\n" in script
    calls = run_script(script, tmp_path)
    launcher, trainer = vlp_calls(calls)
    assert launcher["argv"][0] == "deepspeed"  # `vlp deepspeed`: DeepSpeed's runner in vlp's interpreter
    deepspeed = launcher["argv"][1:]
    hostfile = Path(deepspeed[deepspeed.index("--hostfile") + 1])
    assert hostfile.read_text() == "node01 slots=8\n"
    for flag, value in [("--node_rank", "0"), ("--master_addr", "node01"), ("--master_port", str(10000 + 1234))]:
        assert deepspeed[deepspeed.index(flag) + 1] == value
    assert "--no_ssh" in deepspeed and "--no_python" in deepspeed
    assert deepspeed[deepspeed.index("--no_local_rank") + 1:] == ["vlp", "train", str(config), override, "--resume", "latest"]
    assert trainer["argv"] == ["train", str(config), override, "--resume", "latest"]


def test_deepspeed_launcher_with_a_multi_word_command(tmp_path, capsys, monkeypatch):
    """A profile command of several words (`python -m train.cli`) starts the launcher and every
    rank with all of its words."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "cfg", tmp_path / "runs")
    profile = write_profile(tmp_path, {"command": ["vlp", "--flag with space"]})
    code, script, _ = render([str(config), "--profile", str(profile), "--launcher", "deepspeed"], capsys)
    assert code == 0
    launcher, trainer = vlp_calls(run_script(script, tmp_path))
    assert launcher["argv"][:2] == ["--flag with space", "deepspeed"]
    assert trainer["argv"] == ["--flag with space", "train", str(config), "--resume", "latest"]


@pytest.mark.parametrize("launcher", ["srun", "deepspeed"])
def test_default_entry_point_is_the_submitting_interpreter(launcher, tmp_path, capsys, monkeypatch):
    """`/venv/bin/vlp submit` from a shell without the venv on PATH: the job runs that venv's
    interpreter by its absolute path (`sys.executable -m vlp.cli`), never a `vlp` from PATH."""
    monkeypatch.setattr(slurm_render, "default_command", REAL_DEFAULT_COMMAND)
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "cfg", tmp_path / "runs")
    interpreter = tmp_path / "venv" / "bin" / "python"
    write_entry_point(interpreter.parent, "python", recorder(tmp_path / "calls.jsonl"))
    monkeypatch.setattr(sys, "executable", str(interpreter))
    code, script, _ = render([str(config), "train.steps=20", "--launcher", launcher], capsys)
    assert code == 0
    assert f"VLP=({interpreter} -m vlp.cli)\n" in script
    logged = run_script(script, tmp_path, without_venv=True)
    assert not vlp_calls(logged), "the job ran a `vlp` from PATH"
    calls = [call for call in logged if call["prog"] == "python"]
    entry = ["-m", "vlp.cli", "train", str(config), "train.steps=20", "--resume", "latest"]
    assert calls[-1]["argv"] == entry
    if launcher == "deepspeed":  # the launcher too, and it starts each rank with the same interpreter
        launch = calls[0]["argv"]
        assert launch[:3] == ["-m", "vlp.cli", "deepspeed"]
        assert launch[launch.index("--no_local_rank") + 1:] == [str(interpreter), *entry]


def test_profile_command_wins_over_the_interpreter(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(slurm_render, "default_command", REAL_DEFAULT_COMMAND)
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "cfg", tmp_path / "runs")
    profile = write_profile(tmp_path, {"command": ["/opt/vlp/bin/vlp"]})
    code, script, _ = render([str(config), "--profile", str(profile)], capsys)
    assert code == 0 and "VLP=(/opt/vlp/bin/vlp)\n" in script


def test_overrides_anywhere_among_the_flags(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "cfg", tmp_path / "runs")
    code, script, err = render([str(config), "train.steps=20", "--nodes", "1", "data.caption_key=y",
                                "--exclusive", "train.lr=0.001"], capsys)
    assert code == 0, err
    calls = run_script(script, tmp_path)
    assert vlp_calls(calls)[0]["argv"] == ["train", str(config), "train.steps=20", "data.caption_key=y",
                                           "train.lr=0.001", "--resume", "latest"]
    with pytest.raises(SystemExit) as exit_info:  # an unknown flag is still argparse's error
        render([str(config), "train.steps=20", "--nodez", "2"], capsys)
    assert exit_info.value.code == 2 and "unrecognized arguments: --nodez" in capsys.readouterr().err


def test_cpu_tasks_and_gpu_task_count(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "cfg", tmp_path / "runs")
    code, script, _ = render([str(config), "--ntasks-per-node", "2"], capsys)
    assert code == 0 and "#SBATCH --ntasks-per-node=2\n" in script and "--gpus-per-node" not in script
    code, _, err = render([str(config), "--ntasks-per-node", "2", "--gpus-per-node", "8"], capsys)
    assert code == 2 and "one task per GPU" in err


def test_bad_config_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "cfg", tmp_path / "runs")
    code, out, err = render([str(config), "train.stepz=3"], capsys)
    assert code == 2 and out == "" and "train.stepz" in err
    code, _, err = render([str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "does not exist" in err


def test_submit_writes_script_and_records_job_id(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "cfg", tmp_path / "runs")
    bin_dir = tmp_path / "bin"
    write_shim(bin_dir, "sbatch", f"open({str(tmp_path / 'sbatch.json')!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
                                  "print('4242;cluster')")
    write_shim(bin_dir, "squeue", "sys.exit(1)")
    write_shim(bin_dir, "sacct", "sys.exit(1)")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert cli.main(["submit", str(config), "train.steps=5"]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "tiny"
    script = run_dir / "slurm" / "job.sbatch"
    assert "submitted job 4242" in out and str(run_dir) in out
    assert json.loads((tmp_path / "sbatch.json").read_text()) == ["--parsable", str(script)]
    assert os.access(script, os.X_OK) and "train.steps=5" in script.read_text()
    assert (run_dir / "slurm" / "job_id").read_text().strip() == "4242"
    # A second submission while Slurm says the first is running is refused.
    write_shim(bin_dir, "squeue", "print('RUNNING')")
    assert cli.main(["submit", str(config)]) == 2
    assert "job 4242 is RUNNING" in capsys.readouterr().err


# --- Slurm environment -------------------------------------------------------------------------

NODELISTS = [
    ("node01", ["node01"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu[8-11],cpu3", ["gpu8", "gpu9", "gpu10", "gpu11", "cpu3"]),
    ("rack[1-2]-n[001-002]", ["rack1-n001", "rack1-n002", "rack2-n001", "rack2-n002"]),
    ("a[098-101]", ["a098", "a099", "a100", "a101"]),
    ("x-1,y[3],z[1,5-6]", ["x-1", "y3", "z1", "z5", "z6"]),
]


@pytest.mark.parametrize("nodelist,hosts", NODELISTS)
def test_expand_nodelist(nodelist, hosts):
    assert preemption.expand_nodelist(nodelist) == hosts


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not installed")
@pytest.mark.parametrize("nodelist,hosts", NODELISTS)
def test_expand_nodelist_matches_scontrol(nodelist, hosts):
    result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    assert preemption.expand_nodelist(nodelist) == result.stdout.split()


@pytest.mark.parametrize("bad", ["node[01-04", "node01]", "node[a-b]", "node[5-2]"])
def test_expand_nodelist_rejects(bad):
    with pytest.raises(ValueError, match="nodelist"):
        preemption.expand_nodelist(bad)


def test_slurm_env_to_dist(monkeypatch):
    monkeypatch.setattr(preemption.shutil, "which", lambda name: None)  # python expansion path
    environ = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4",
               "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    applied = preemption.slurm_env_to_dist(environ)
    expected = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
                "MASTER_ADDR": "gpu07", "MASTER_PORT": str(10000 + 123456 % 20000)}
    assert applied == expected and all(environ[k] == v for k, v in expected.items())
    # A launcher that already set RANK wins; MASTER_ADDR exported by the sbatch script is kept.
    assert preemption.slurm_env_to_dist({"SLURM_PROCID": "1", "RANK": "3"}) == {}
    environ = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "10.0.0.1", "SLURM_JOB_ID": "7"}
    assert "MASTER_ADDR" not in preemption.slurm_env_to_dist(environ) and environ["MASTER_ADDR"] == "10.0.0.1"
    assert preemption.slurm_env_to_dist({}) == {}


def test_master_port_in_range_and_shared_formula():
    ports = {preemption.master_port(job) for job in range(0, 100_000, 7)}
    assert min(ports) >= 10000 and max(ports) < 30000


# --- signals and requeue -----------------------------------------------------------------------


@pytest.fixture
def handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    preemption.clear()
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)
    preemption.clear()


def test_signals_set_the_flag_and_term_wins(handlers):
    assert preemption.stop_reason() is None and preemption.stop_flag() == 0
    assert preemption.install_handlers()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert preemption.stop_reason() == "USR1" and preemption.stop_flag() == 1
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.stop_reason() == "TERM" and preemption.stop_flag() == 2
    os.kill(os.getpid(), signal.SIGUSR1)  # a later USR1 does not undo TERM: never requeue a cancel
    assert preemption.stop_reason() == "TERM"
    assert [preemption.reason_from_flag(flag) for flag in (0, 1, 2)] == [None, "USR1", "TERM"]


def test_requeue_is_a_no_op_outside_slurm_and_off_rank_0(tmp_path, monkeypatch):
    assert preemption.requeue({}) is False
    log = tmp_path / "calls.jsonl"
    make_shims(tmp_path / "bin", log)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    assert preemption.requeue({"SLURM_JOB_ID": "77", "RANK": "1"}) is False
    assert not log.exists()
    assert preemption.requeue({"SLURM_JOB_ID": "77", "RANK": "0"}) is True
    assert [json.loads(line)["argv"] for line in log.read_text().splitlines()] == [["requeue", "77"]]
    write_shim(tmp_path / "bin", "scontrol", "sys.exit(1)")
    assert preemption.requeue({"SLURM_JOB_ID": "77"}) is False


# --- vlp status --------------------------------------------------------------------------------


def test_status(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "slurm").mkdir()
    (run_dir / "metrics.jsonl").write_text(
        json.dumps({"step": 10, "loss": 2.5}) + "\n" + json.dumps({"step": 20, "loss": 1.25, "lr": 0.001}) + "\n"
        + '{"step": 30, "lo'  # a line cut off by a kill
    )
    (run_dir / "checkpoints" / "latest").write_text("step_00000020\n")
    (run_dir / "results.json").write_text(json.dumps({"zeroshot/top1": 0.5}))
    (run_dir / "slurm" / "job_id").write_text("99\n")
    bin_dir = tmp_path / "bin"
    write_shim(bin_dir, "squeue", "print('PENDING')")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert status_cmd.run(_Args(run_dir=str(run_dir), json=False)) == 0
    out = capsys.readouterr().out
    assert "99 PENDING" in out and "last step  20 loss=1.25 lr=0.001" in out
    assert "step_00000020" in out and "zeroshot/top1" in out
    write_shim(bin_dir, "squeue", "sys.exit(1)")
    write_shim(bin_dir, "sacct", "sys.exit(1)")
    assert status_cmd.run(_Args(run_dir=str(run_dir), json=True)) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["job_state"] == "unknown" and info["last_metrics"]["step"] == 20
    assert status_cmd.run(_Args(run_dir=str(tmp_path / "missing"), json=False)) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1


class _Args:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


def test_time_limit_seconds():
    cases = {"30": 1800, "30:15": 1815, "01:02:03": 3723, "2-00": 172800, "1-02:03": 93780, "1-02:03:04": 93784}
    assert {limit: slurm_profile.time_limit_seconds(limit) for limit in cases} == cases


def test_example_profile_is_valid_and_renders(tmp_path, capsys, monkeypatch):
    example = ROOT / "slurm" / "cluster.example.yaml"
    profile = slurm_profile.load_profile(example)
    assert profile.gpus_per_node == 8 and profile.env["NCCL_IB_HCA"] == "mlx5"
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "cfg", tmp_path / "runs")
    code, script, _ = render([str(config), "--profile", str(example), "--nodes", "4"], capsys)
    assert code == 0
    assert "#SBATCH --nodes=4\n" in script and "#SBATCH --ntasks-per-node=8\n" in script
    assert "module load cuda/12.4\n" in script and "export NCCL_SOCKET_IFNAME=ib0\n" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
