"""Running inside a Slurm job: rendezvous from the Slurm environment, stop signals, requeue.

Everything here is a no-op outside Slurm, so the trainer calls it unconditionally:

    slurm_env_to_dist()          # once, before init_process_group: RANK etc. from SLURM_*
    install_handlers()           # once, in the main thread
    ...
    # at each log or checkpoint step, on every rank:
    flag = all_reduce_max(stop_flag())   # vlp.core.collectives: on the collective device
    if flag:
        save checkpoint
        if reason_from_flag(int(flag)) == "USR1" and not finished and rank == 0:
            requeue()
        exit

Slurm sends SIGUSR1 (the `--signal=USR1@T` in our sbatch script) T seconds before the time limit:
the job checkpoints and requeues itself, and the requeued job resumes from `latest`. SIGTERM means
the job is being cancelled, preempted (Slurm requeues preempted jobs itself when PreemptMode is
REQUEUE) or killed at its limit: checkpoint and exit, never requeue, or a `scancel`ed job would
come back.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import MutableMapping
from typing import Optional

log = logging.getLogger(__name__)

# Flags are ordered so that a MAX all-reduce picks the signal that must win: if any rank saw
# SIGTERM, nobody requeues.
_FLAGS = {None: 0, "USR1": 1, "TERM": 2}
_REASONS = {flag: reason for reason, flag in _FLAGS.items()}

_stop_reason: Optional[str] = None


def _on_signal(signum: int, frame) -> None:
    # Only record it: the handler runs between two bytecodes of whatever the trainer was doing
    # (maybe inside a collective), so all real work waits for the next step boundary.
    global _stop_reason
    name = signal.Signals(signum).name.removeprefix("SIG")
    if _FLAGS[name] > _FLAGS[_stop_reason]:
        _stop_reason = name


def install_handlers(signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> bool:
    """Catch SIGUSR1 and SIGTERM so that the trainer can stop at a step boundary.

    Returns False (and installs nothing) when called outside the main thread, where Python
    cannot install signal handlers.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        log.warning("install_handlers: not in the main thread; stop signals keep their default action")
        return False
    for signum in signals:
        signal.signal(signum, _on_signal)
    return True


def stop_reason() -> Optional[str]:
    """'USR1', 'TERM' or None: the strongest stop signal this process has received."""
    return _stop_reason


def stop_flag() -> int:
    """`stop_reason()` as an int for a MAX all-reduce across ranks: 0 none, 1 USR1, 2 TERM."""
    return _FLAGS[_stop_reason]


def reason_from_flag(flag: int) -> Optional[str]:
    """Inverse of `stop_flag` (after the all-reduce)."""
    return _REASONS[int(flag)]


def clear() -> None:
    """Forget a received signal (tests; a trainer that chose to keep going)."""
    global _stop_reason
    _stop_reason = None


def in_slurm_job(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    environ = os.environ if environ is None else environ
    return bool(environ.get("SLURM_JOB_ID"))


def requeue(environ: Optional[MutableMapping[str, str]] = None, timeout_s: float = 60) -> bool:
    """`scontrol requeue $SLURM_JOB_ID`; returns whether the job was requeued.

    No-op (False) outside a Slurm job, on any rank but 0, or when scontrol is missing. Slurm then
    kills this job's processes (SIGTERM, then SIGKILL after KillWait), so call it after the
    checkpoint is on disk, right before exiting. The requeued job keeps its id and output file and
    becomes eligible after the credential lifetime (120 s by default).
    """
    environ = os.environ if environ is None else environ
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    rank = environ.get("RANK", environ.get("SLURM_PROCID", "0"))
    if rank != "0":
        return False
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        log.warning("requeue: scontrol not found; job %s is not requeued", job_id)
        return False
    result = subprocess.run(
        [scontrol, "requeue", job_id], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if result.returncode != 0:
        log.warning("requeue: scontrol requeue %s failed: %s", job_id, result.stderr.strip())
        return False
    log.info("requeue: job %s requeued", job_id)
    return True


# --- rendezvous -------------------------------------------------------------------------------

_BRACKET = re.compile(r"\[([^\]]*)\]")


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"nodelist {text!r}: unbalanced ']'")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"nodelist {text!r}: unbalanced '['")
    parts.append(text[start:])
    return [part for part in parts if part]


def _expand_range(spec: str, nodelist: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07'] (zero padding kept, as Slurm does)."""
    values = []
    for item in spec.split(","):
        low, sep, high = item.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"nodelist {nodelist!r}: bad range {item!r}")
        if not sep:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"nodelist {nodelist!r}: range {item!r} runs backwards")
        width = len(low)
        values.extend(str(n).zfill(width) for n in range(int(low), int(high) + 1))
    return values


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list in pure Python: 'gpu[01-02,07],cpu-a[1-2]-b[3]' ->
    ['gpu01', 'gpu02', 'gpu07', 'cpu-a1-b3', 'cpu-a2-b3'] (what `scontrol show hostnames` prints)."""
    hosts = []
    for part in _split_top_level(nodelist.strip()):
        expansions = [""]
        position = 0
        for match in _BRACKET.finditer(part):
            prefix = part[position : match.start()]
            values = _expand_range(match.group(1), nodelist)
            expansions = [done + prefix + value for done in expansions for value in values]
            position = match.end()
        hosts.extend(done + part[position:] for done in expansions)
    return hosts


def first_host(nodelist: str) -> str:
    """First host of a Slurm nodelist: `scontrol show hostnames` when available, else Python."""
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        try:
            result = subprocess.run(
                [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=False
            )
            if result.returncode == 0 and result.stdout.split():
                return result.stdout.split()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise ValueError(f"nodelist {nodelist!r} names no host")
    return hosts[0]


def node_address(node: str) -> str:
    """The address Slurm reaches `node` by (its NodeAddr), else the node name itself. On most
    clusters the two agree; where they differ (several slurmd per host, a management network
    named apart from the nodes) only NodeAddr is sure to resolve from every node."""
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        try:
            result = subprocess.run([scontrol, "-o", "show", "node", node], capture_output=True, text=True,
                                    timeout=30, check=False)
            match = re.search(r"(?:^| )NodeAddr=(\S+)", result.stdout) if result.returncode == 0 else None
            if match:
                return match.group(1)
        except (OSError, subprocess.TimeoutExpired):
            pass
    return node


def master_port(job_id: int | str) -> int:
    """A port per job (10000 + job_id % 20000): two jobs sharing a node do not collide, and every
    rank of one job computes the same port with no communication."""
    return 10000 + int(job_id) % 20000


def slurm_env_to_dist(environ: Optional[MutableMapping[str, str]] = None) -> dict[str, str]:
    """Set torch.distributed's env:// variables from Slurm's, when running as an srun task.

    Acts only when SLURM_PROCID is set and RANK is not (a launcher such as deepspeed or torchrun
    already set RANK and wins). Sets, without overwriting values already present:
    MASTER_ADDR (the NodeAddr of SLURM_JOB_NODELIST's first node), MASTER_PORT (from SLURM_JOB_ID),
    RANK=SLURM_PROCID, LOCAL_RANK=SLURM_LOCALID, WORLD_SIZE=SLURM_NTASKS (LOCAL_WORLD_SIZE too,
    from SLURM_NTASKS_PER_NODE when it is a plain number). Returns what it set.
    """
    environ = os.environ if environ is None else environ
    if "SLURM_PROCID" not in environ or "RANK" in environ:
        return {}
    wanted: dict[str, str] = {
        "RANK": environ["SLURM_PROCID"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": environ.get("SLURM_NTASKS", environ.get("SLURM_NPROCS", "1")),
    }
    per_node = environ.get("SLURM_NTASKS_PER_NODE", "")
    if per_node.isdigit():
        wanted["LOCAL_WORLD_SIZE"] = per_node
    if "MASTER_ADDR" not in environ:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        wanted["MASTER_ADDR"] = node_address(first_host(nodelist)) if nodelist else "127.0.0.1"
    if "MASTER_PORT" not in environ and environ.get("SLURM_JOB_ID"):
        wanted["MASTER_PORT"] = str(master_port(environ["SLURM_JOB_ID"]))
    applied = {key: value for key, value in wanted.items() if key not in environ}
    environ.update(applied)
    return applied
