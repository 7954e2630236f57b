"""`vlp submit`: render an sbatch script from slurm/job.sbatch into the run folder and submit it.

The script runs the same entry point a laptop user runs, `vlp train CONFIG overrides...
--resume latest`, under `srun`, so a requeued job resumes the same run. Cluster defaults
(partition, account, modules, container, NCCL variables) come from a cluster profile YAML:
`--profile FILE`, else $VLP_CLUSTER_PROFILE, else ~/.config/vlp/cluster.yaml, else none.

Nothing a user typed is executed by the script: values in `#SBATCH` lines must match strict
patterns (sbatch parses those lines itself, so shell quoting means nothing there), and values in
the script body are `shlex.quote`d. The one exception is the profile's `setup` lines, which are
shell commands by design (the profile is the user's own file, like ~/.bashrc).
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import Field, ValidationError, field_validator

from vlp.core.config import Strict
from vlp.core.registry import nearest
from vlp.train.preemption import slurm_env_to_dist  # noqa: F401 (re-exported: trainers import it from here too)

# Shipped as package data (`vlp.slurm`), so a non-editable install renders the same script.
TEMPLATE = Path(str(importlib.resources.files("vlp.slurm") / "job.sbatch"))
DEFAULT_PROFILE = Path("~/.config/vlp/cluster.yaml")
PROFILE_ENV = "VLP_CLUSTER_PROFILE"


class SubmitError(ValueError):
    """Bad submission input (profile, option, path); the CLI exits with code 2."""


# --- strict patterns for values that land in #SBATCH lines --------------------------------------

_PATTERNS = {
    "job_name": (r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", "letters, digits, '_', '.', '-'"),
    "partition": (r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*", "letters, digits, '_', '.', '-' (comma-separated)"),
    "account": (r"[A-Za-z0-9_.-]+", "letters, digits, '_', '.', '-'"),
    "qos": (r"[A-Za-z0-9_.-]+", "letters, digits, '_', '.', '-'"),
    # Node features combined with & | , * [ ] ( ) as in `--constraint="a100&ib"`.
    "constraint": (r"[A-Za-z0-9_.&|,*\[\]()-]+", "feature names joined by & | , * [ ] ( )"),
    # Slurm time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
    "time": (r"\d+(-\d+)?(:\d+){0,2}", "minutes, HH:MM:SS or D-HH:MM:SS"),
    "mem": (r"\d+[KMGT]?", "a size such as 64G or 0 (all)"),
    # A path inside '#SBATCH --output=': no whitespace, quotes, '%' (sbatch's pattern escapes) or '\'.
    "sbatch_path": (r"/[A-Za-z0-9_./+@=,:-]*", "an absolute path of letters, digits and _ . / + @ = , : -"),
    "sbatch_flag": (r"--[a-z][a-z0-9-]*(=[A-Za-z0-9_.,:@/+=%-]+)?", "--flag or --flag=value (no spaces or quotes)"),
    "env_name": (r"[A-Za-z_][A-Za-z0-9_]*", "a shell variable name"),
}


def check(kind: str, value: str, what: str) -> str:
    """`value` if it matches the strict pattern for `kind`, else SubmitError naming `what`."""
    pattern, description = _PATTERNS[kind]
    if not isinstance(value, str) or not re.fullmatch(pattern, value):
        raise SubmitError(f"{what}: {value!r} is not allowed here; expected {description}")
    return value


def time_limit_seconds(limit: str) -> int:
    """Slurm time limit -> seconds ('30' is minutes, '1-12' is days-hours)."""
    days, _, rest = limit.rpartition("-") if "-" in limit else ("0", "", limit)
    parts = [int(p) for p in rest.split(":")]
    if "-" in limit:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = (parts + [0, 0])[:3]
    else:  # M, M:S, H:M:S
        hours, minutes, seconds = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds


# --- cluster profile ----------------------------------------------------------------------------




class ContainerConfig(Strict):
    image: str = Field(description="pyxis: image or .sqsh path; apptainer: .sif path")
    runtime: Literal["pyxis", "apptainer"] = "pyxis"
    mounts: list[str] = Field(default_factory=list, description="host:container paths")
    workdir: Optional[str] = None


class ClusterProfile(Strict):
    """Cluster defaults a user keeps in one YAML file; command-line flags win over these."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time: Optional[str] = None
    mem: Optional[str] = None
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: Optional[int] = Field(None, ge=1)
    ntasks_per_node: Optional[int] = Field(None, ge=1, description="CPU runs: ranks per node")
    exclusive: bool = False
    launcher: Literal["srun", "deepspeed"] = "srun"
    signal_seconds: int = Field(120, ge=1, description="SIGUSR1 this long before the time limit")
    modules: list[str] = Field(default_factory=list, description="`module load` each, in order")
    container: Optional[ContainerConfig] = None
    setup: list[str] = Field(default_factory=list, description="shell lines run before training (not quoted)")
    env: dict[str, str] = Field(default_factory=dict, description="exported variables, e.g. NCCL_*")
    sbatch: list[str] = Field(default_factory=list, description="extra #SBATCH flags, e.g. --mail-type=END")
    command: list[str] = Field(default_factory=lambda: ["vlp"], min_length=1, description="the vlp entry point")

    @field_validator("partition", "account", "qos", "constraint", "time", "mem")
    @classmethod
    def _strict(cls, value, info):
        return None if value is None else check(info.field_name, value, info.field_name)

    @field_validator("env")
    @classmethod
    def _env_names(cls, value):
        for name in value:
            check("env_name", name, f"env.{name}")
        return value

    @field_validator("sbatch")
    @classmethod
    def _sbatch_flags(cls, value):
        for flag in value:
            check("sbatch_flag", flag, "sbatch")
        return value


def _profile_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            key = str(item["loc"][-1])
            owner = ContainerConfig if item["loc"][0] == "container" and len(item["loc"]) == 2 else ClusterProfile
            lines.append(f"{source}: {path}: unknown key.{nearest(key, list(owner.model_fields))}")
        else:
            lines.append(f"{source}: {path}: {item['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def find_profile(explicit: Optional[str], environ=os.environ) -> Optional[Path]:
    """--profile, else $VLP_CLUSTER_PROFILE, else ~/.config/vlp/cluster.yaml if it exists."""
    if explicit:
        return Path(explicit)
    if environ.get(PROFILE_ENV):
        return Path(environ[PROFILE_ENV])
    default = DEFAULT_PROFILE.expanduser()
    return default if default.is_file() else None


def load_profile(path: Optional[Path]) -> ClusterProfile:
    if path is None:
        return ClusterProfile()
    if not path.is_file():
        raise SubmitError(f"{path}: cluster profile does not exist")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise SubmitError(f"{path}: invalid YAML ({error.__class__.__name__})") from None
    if not isinstance(tree, dict):
        raise SubmitError(f"{path}: a cluster profile is a mapping of keys")
    try:
        return ClusterProfile.model_validate(tree)
    except ValidationError as error:
        raise SubmitError(_profile_error(error, str(path))) from None


# --- the job ------------------------------------------------------------------------------------


class Job(Strict):
    """Everything the script needs, resolved from config, profile and flags."""

    job_name: str
    config_path: str
    overrides: list[str]
    run_dir: str
    workdir: str
    nodes: int
    gpus_per_node: int
    ntasks_per_node: int
    cpus_per_task: Optional[int]
    launcher: Literal["srun", "deepspeed"]
    slots_per_node: int
    profile: ClusterProfile


def resolve_job(config, config_path: str, overrides: list[str], args: argparse.Namespace, profile: ClusterProfile) -> Job:
    """Merge flags over the profile and check the combination before anything is written."""

    def pick(name: str):
        flag = getattr(args, name, None)
        return getattr(profile, name) if flag is None else flag

    updates = {name: pick(name) for name in ("partition", "account", "qos", "constraint", "time", "signal_seconds")}
    updates["exclusive"] = bool(args.exclusive) or profile.exclusive
    try:
        profile = ClusterProfile.model_validate({**profile.model_dump(), **updates})
    except ValidationError as error:
        raise SubmitError(_profile_error(error, "command line")) from None

    nodes, gpus, launcher = pick("nodes"), pick("gpus_per_node"), pick("launcher")
    if nodes < 1 or gpus < 0:
        raise SubmitError(f"--nodes={nodes} --gpus-per-node={gpus}: need nodes >= 1 and gpus >= 0")
    tasks_flag = pick("ntasks_per_node")
    if gpus and tasks_flag is not None and launcher == "srun" and tasks_flag != gpus:
        raise SubmitError(
            f"--ntasks-per-node={tasks_flag} with --gpus-per-node={gpus}: the srun launcher runs one task per GPU"
        )
    slots = gpus or (tasks_flag or 1)  # ranks per node
    tasks = slots if launcher == "srun" else 1  # deepspeed: one launcher per node starts the ranks
    if profile.time is not None and profile.signal_seconds >= time_limit_seconds(profile.time):
        raise SubmitError(
            f"--signal-seconds={profile.signal_seconds} is not below --time={profile.time}: the job would be warned at start"
        )

    run_dir = os.path.abspath(config.run_dir)
    check("sbatch_path", run_dir, "run folder (output_dir/name), used in '#SBATCH --output'")
    job_name = check("job_name", args.job_name or config.name, "job name")
    return Job(
        job_name=job_name,
        config_path=os.path.abspath(config_path),
        overrides=list(overrides),
        run_dir=run_dir,
        workdir=os.getcwd(),
        nodes=nodes,
        gpus_per_node=gpus,
        ntasks_per_node=tasks,
        cpus_per_task=pick("cpus_per_task"),
        launcher=launcher,
        slots_per_node=slots,
        profile=profile,
    )


def _words(words: list[str]) -> str:
    return " ".join(shlex.quote(word) for word in words)


def _directives(job: Job) -> list[str]:
    profile = job.profile
    lines = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        f"--ntasks-per-node={job.ntasks_per_node}",
    ]
    if job.gpus_per_node:
        lines.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_task:
        lines.append(f"--cpus-per-task={job.cpus_per_task}")
    for name in ("partition", "account", "qos", "constraint", "time", "mem"):
        value = getattr(profile, name)
        if value is not None:
            lines.append(f"--{name}={value}")
    if profile.exclusive:
        lines.append("--exclusive")
    # %j: one log per job id; a requeued job keeps its id, so its restarts append to the same file.
    lines.append(f"--output={job.run_dir}/slurm/slurm-%j.out")
    lines.extend(profile.sbatch)
    return [f"#SBATCH {line}" for line in lines]


def _setup(profile: ClusterProfile) -> list[str]:
    lines = [f"module load {shlex.quote(name)}" for name in profile.modules]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in profile.env.items()]
    if profile.setup:
        lines.append("# profile setup lines (shell, as written in the profile):")
        lines += list(profile.setup)
    return lines or [":"]


def _container(profile: ClusterProfile) -> tuple[list[str], list[str]]:
    """(srun flags, command prefix) for the profile's container, if any."""
    container = profile.container
    if container is None:
        return [], []
    if container.runtime == "pyxis":
        flags = [f"--container-image={container.image}"]
        if container.mounts:
            flags.append(f"--container-mounts={','.join(container.mounts)}")
        if container.workdir:
            flags.append(f"--container-workdir={container.workdir}")
        return flags, []
    prefix = ["apptainer", "exec", "--nv"]
    for mount in container.mounts:
        prefix += ["--bind", mount]
    if container.workdir:
        prefix += ["--pwd", container.workdir]
    return [], prefix + [container.image]


# Sets torch's env:// variables per task from Slurm's (train.preemption.slurm_env_to_dist does the
# same inside the trainer for a bare `srun vlp train`).
_SRUN_TASK = (
    "bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec \"$@\"' vlp-task"
)
# One task per node runs the deepspeed launcher; it must survive SIGUSR1 (the trainer processes it
# starts install their own handler), and it forwards SIGTERM to them itself. The launcher is
# `vlp deepspeed` (DeepSpeed's runner in vlp's own interpreter), not a `deepspeed` looked up on
# PATH, which a job started from an unactivated venv or a container does not have: "$2" is the
# number of words of the profile's command, so "${@:3:$2}" is that command and "${@:3}" the entry.
_DEEPSPEED_TASK = (
    "bash -c 'trap \"\" USR1; exec \"${@:3:$2}\" deepspeed --hostfile \"$1\" --no_ssh --node_rank \"$SLURM_NODEID\""
    " --master_addr \"$MASTER_ADDR\" --master_port \"$MASTER_PORT\" --no_python --no_local_rank \"${@:3}\"'"
    " vlp-node \"$HOSTFILE\" {words}"
)


def _launch(job: Job) -> tuple[list[str], str]:
    flags, prefix = _container(job.profile)
    srun = ["srun", "--kill-on-bad-exit=1"]
    if job.cpus_per_task:
        # Since Slurm 22.05 srun does not inherit --cpus-per-task from sbatch.
        srun.append(f"--cpus-per-task={job.cpus_per_task}")
    srun_words = _words(srun + flags + prefix)
    entry = '"${VLP[@]}" train "$CONFIG" "${OVERRIDES[@]}" --resume latest'
    if job.launcher == "srun":
        return [], f"{srun_words} \\\n    {_SRUN_TASK} \\\n    {entry}"
    setup = [
        "# deepspeed --no_ssh: every node reads the same hostfile and knows its rank from SLURM_NODEID.",
        'HOSTFILE="$RUN_DIR/slurm/hostfile.$SLURM_JOB_ID"',
        f'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\\$/ slots={job.slots_per_node}/" >"$HOSTFILE"',
    ]
    task = _DEEPSPEED_TASK.replace("{words}", str(len(job.profile.command)))
    return setup, f"{srun_words} --ntasks-per-node=1 \\\n    {task} \\\n    {entry}"


def render(job: Job, template: Path = TEMPLATE) -> str:
    """The sbatch script for `job`. Placeholders are `{{name}}`; an unknown one is an error."""
    launch_setup, launch = _launch(job)
    values = {
        "sbatch_directives": "\n".join(_directives(job)),
        "signal_seconds": str(job.profile.signal_seconds),
        "setup": "\n".join(_setup(job.profile)),
        "workdir": shlex.quote(job.workdir),
        "run_dir": shlex.quote(job.run_dir),
        "config": shlex.quote(job.config_path),
        "overrides": _words(job.overrides),
        "command": _words(job.profile.command),
        "launch_setup": "\n".join(launch_setup),
        "launch": launch,
    }

    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"{template}: unknown placeholder {{{{{name}}}}}")
        return values[name]

    return re.sub(r"\{\{(\w+)\}\}", fill, template.read_text(encoding="utf-8"))


# --- submission ---------------------------------------------------------------------------------

_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "CONFIGURING",
           "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT", "PREEMPTED"}


def recorded_job_id(run_dir: Path) -> Optional[str]:
    path = Path(run_dir) / "slurm" / "job_id"
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8").strip()
    return text if text.isdigit() else None


def job_state(job_id: str) -> Optional[str]:
    """Slurm's state for `job_id` (squeue, then sacct), or None when neither knows it."""
    queries = (
        ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"],
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
    )
    for query in queries:
        if shutil.which(query[0]) is None:
            continue
        try:
            result = subprocess.run(query, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        words = result.stdout.split()
        if result.returncode == 0 and words:
            return words[0].split("+")[0]  # sacct: "CANCELLED by 0" / "RUNNING+"
    return None


def write_script(run_dir: Path, script: str) -> Path:
    slurm_dir = Path(run_dir) / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    path = slurm_dir / "job.sbatch"
    partial = path.with_suffix(".sbatch.partial")
    partial.write_text(script, encoding="utf-8")
    partial.chmod(0o755)
    partial.replace(path)  # atomic: a requeued job never reads half a script
    return path


def sbatch(script_path: Path, workdir: str) -> str:
    if shutil.which("sbatch") is None:
        raise RuntimeError("sbatch not found on PATH (is this a Slurm login node? --dry-run only renders)")
    result = subprocess.run(
        ["sbatch", "--parsable", str(script_path)], cwd=workdir, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    job_id = result.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
    if not job_id.isdigit():
        raise RuntimeError(f"sbatch printed {result.stdout.strip()!r}, not a job id")
    return job_id


def run(args: argparse.Namespace) -> int:
    from vlp.train.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
        profile = load_profile(find_profile(args.profile))
        job = resolve_job(config, args.config, args.overrides, args, profile)
        script = render(job)
        if args.dry_run:
            sys.stdout.write(script)
            print(f"# dry run: would write {job.run_dir}/slurm/job.sbatch and submit it", file=sys.stderr)
            return 0
        previous = recorded_job_id(Path(job.run_dir))
        state = job_state(previous) if previous else None
        if state in _ACTIVE:
            raise SubmitError(
                f"{job.run_dir}: job {previous} is {state} on this run folder; two jobs would write the same "
                f"checkpoints (scancel {previous} first)"
            )
    except (ConfigError, SubmitError) as error:
        print(f"vlp submit: {error}", file=sys.stderr)
        return 2
    script_path = write_script(Path(job.run_dir), script)
    try:
        job_id = sbatch(script_path, job.workdir)
    except RuntimeError as error:
        print(f"vlp submit: {error}", file=sys.stderr)
        return 1
    (Path(job.run_dir) / "slurm" / "job_id").write_text(job_id + "\n", encoding="utf-8")
    print(f"submitted job {job_id}")
    print(f"run folder {job.run_dir}")
    print(f"log {job.run_dir}/slurm/slurm-{job_id}.out")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "submit",
        help="render an sbatch script into the run folder and submit it",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("config", help="experiment YAML")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, passed to `vlp train` as is")
    job = parser.add_argument_group("resources (override the cluster profile)")
    job.add_argument("--nodes", type=int)
    job.add_argument("--gpus-per-node", type=int)
    job.add_argument("--cpus-per-task", type=int)
    job.add_argument("--ntasks-per-node", type=int, help="ranks per node on CPU (with GPUs: one per GPU)")
    job.add_argument("--partition")
    job.add_argument("--time", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    job.add_argument("--account")
    job.add_argument("--qos")
    job.add_argument("--constraint")
    job.add_argument("--exclusive", action="store_true", default=False)
    job.add_argument("--launcher", choices=["srun", "deepspeed"])
    job.add_argument("--signal-seconds", type=int, help="SIGUSR1 this many seconds before the limit (120)")
    job.add_argument("--job-name", help="default: the config's name")
    parser.add_argument("--profile", help=f"cluster profile YAML (default ${PROFILE_ENV} or {DEFAULT_PROFILE})")
    parser.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    parser.set_defaults(func=run)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vlp")
    subparsers = parser.add_subparsers(required=True)
    add_parser(subparsers)
    args = parser.parse_args(["submit", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
