"""`vlp submit`: render an sbatch script into the run folder and submit it.

Three parts, one file each: the cluster profile (`slurm_profile`), the script
(`slurm_render`), and here the submission: refuse a second job on a busy run folder, write the
script atomically, call `sbatch`, record the job id. `add_parser` is this subcommand's command
line; below it everything takes typed values.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from vlp.core.files import atomic_write
from vlp.slurm.profile import DEFAULT_PROFILE, PROFILE_ENV, SubmitError, find_profile, load_profile
from vlp.slurm.render import JobFlags, render, resolve_job

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
    return atomic_write(path, script, mode=0o755)  # a requeued job never reads half a script


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


def submit(config_path: str, overrides: list[str], flags: JobFlags, profile_path: Optional[str] = None,
           dry_run: bool = False) -> int:
    """Render the job for `config_path` + `overrides` and submit it (or print it with `dry_run`);
    returns the exit code: 0 submitted, 2 bad input, 1 sbatch failed."""
    from vlp.train.config import ConfigError, load_config

    try:
        config = load_config(config_path, overrides)
        profile = load_profile(find_profile(profile_path))
        job = resolve_job(config, config_path, overrides, flags, profile)
        script = render(job)
        if dry_run:
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


# --- command line -------------------------------------------------------------------------------

_FLAG_NAMES = tuple(JobFlags.__dataclass_fields__)


def _from_args(args: argparse.Namespace) -> int:
    flags = JobFlags(**{name: getattr(args, name) for name in _FLAG_NAMES})
    return submit(args.config, args.overrides, flags, profile_path=args.profile, dry_run=args.dry_run)


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
    parser.set_defaults(func=_from_args)
    return parser
