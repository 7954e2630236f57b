"""Cluster profiles for `vlp submit`: one YAML file of cluster defaults (partition, account,
modules, container, NCCL variables), found as `--profile FILE`, else $VLP_CLUSTER_PROFILE, else
~/.config/vlp/cluster.yaml, else none; plus the strict patterns every value bound for an
`#SBATCH` line must match (sbatch parses those lines itself, so shell quoting means nothing there).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import Field, ValidationError, field_validator

from vlp.core.config import Strict
from vlp.core.errors import SubmitError  # noqa: F401 (raised here, imported from here)
from vlp.core.registry import nearest

DEFAULT_PROFILE = Path("~/.config/vlp/cluster.yaml")
PROFILE_ENV = "VLP_CLUSTER_PROFILE"


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
    # None: the interpreter that ran `vlp submit` (`sys.executable -m vlp.cli`), so a job
    # runs the same vlp whatever its PATH holds; set it where that path does not exist on the
    # compute nodes (a container, another install).
    command: Optional[list[str]] = Field(None, min_length=1, description="the vlp entry point")

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


def profile_error(error: ValidationError, source: str) -> str:
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
        raise SubmitError(profile_error(error, str(path))) from None
