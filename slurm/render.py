"""The sbatch script for `vlp submit`: flags merged over the cluster profile into a `Job`, then
slurm/job.sbatch filled in.

The script runs the same entry point a laptop user runs, `vlp train CONFIG overrides...
--resume latest`, under `srun`, so a requeued job resumes the same run. "The same" is literal: the
default entry point is the interpreter that rendered the script (`sys.executable -m
vlp.cli`), not a `vlp` looked up on the compute node's PATH.

Nothing a user typed is executed by the script: values in `#SBATCH` lines must match strict
patterns (`slurm_profile.check`), and values in the script body are `shlex.quote`d. The one
exception is the profile's `setup` lines, which are shell commands by design (the profile is the
user's own file, like ~/.bashrc).
"""

from __future__ import annotations

import importlib.resources
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

from pydantic import ValidationError

from vlp.core.config import Strict
from vlp.slurm.profile import ClusterProfile, SubmitError, check, profile_error, time_limit_seconds

if TYPE_CHECKING:
    from vlp.train.config import ExperimentConfig

# Shipped as package data (`vlp.slurm`), so a non-editable install renders the same script.
TEMPLATE = Path(str(importlib.resources.files("vlp.slurm") / "job.sbatch"))


def default_command() -> list[str]:
    """This interpreter's own entry point: a job started from `/venv/bin/vlp submit` in a shell
    without the venv on PATH still runs that venv's vlp (a bare `vlp` would exit 127)."""
    return [sys.executable, "-m", "vlp.cli"]


@dataclass(frozen=True)
class JobFlags:
    """What `vlp submit`'s resource flags asked for; None leaves the profile's value."""

    nodes: Optional[int] = None
    gpus_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    ntasks_per_node: Optional[int] = None
    partition: Optional[str] = None
    time: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclusive: bool = False
    launcher: Optional[str] = None
    signal_seconds: Optional[int] = None
    job_name: Optional[str] = None


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
    command: list[str]  # the vlp entry point, one word per item


def resolve_job(
    config: ExperimentConfig, config_path: str, overrides: list[str], flags: JobFlags, profile: ClusterProfile
) -> Job:
    """Merge flags over the profile and check the combination before anything is written."""

    def pick(name: str):
        flag = getattr(flags, name)
        return getattr(profile, name) if flag is None else flag

    updates = {name: pick(name) for name in ("partition", "account", "qos", "constraint", "time", "signal_seconds")}
    updates["exclusive"] = flags.exclusive or profile.exclusive
    try:
        profile = ClusterProfile.model_validate({**profile.model_dump(), **updates})
    except ValidationError as error:
        raise SubmitError(profile_error(error, "command line")) from None

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
    job_name = check("job_name", flags.job_name or config.name, "job name")
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
        command=list(profile.command or default_command()),
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
# number of words of the job's command, so "${@:3:$2}" is that command and "${@:3}" the entry.
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
    task = _DEEPSPEED_TASK.replace("{words}", str(len(job.command)))
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
        "command": _words(job.command),
        "launch_setup": "\n".join(launch_setup),
        "launch": launch,
    }

    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"{template}: unknown placeholder {{{{{name}}}}}")
        return values[name]

    return re.sub(r"\{\{(\w+)\}\}", fill, template.read_text(encoding="utf-8"))
