"""`vlp status RUN_DIR`: where a run stands, from its folder and (when there is one) Slurm.

Reads what the other parts leave in the run folder: `slurm/job_id` (written by `vlp submit`),
`metrics.jsonl` (one JSON object per line with "step"), `checkpoints/latest` and `results.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from vlp.slurm.submit import job_state, recorded_job_id


def last_metrics(path: Path) -> Optional[dict[str, Any]]:
    """The last well-formed line of metrics.jsonl that has a step (a line cut off by a kill is skipped)."""
    if not path.is_file():
        return None
    last = None
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "step" in record:
                last = record
    return last


def _format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summary(run_dir: Path) -> dict[str, Any]:
    """Everything `vlp status` prints, as a dict (also printed as the last line with --json)."""
    job_id = recorded_job_id(run_dir)
    latest_file = run_dir / "checkpoints" / "latest"
    results_file = run_dir / "results.json"
    results = None
    if results_file.is_file():
        try:
            results = json.loads(results_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            results = "unreadable"
    return {
        "run_dir": str(run_dir),
        "job_id": job_id,
        "job_state": (job_state(job_id) or "unknown") if job_id else None,
        "last_metrics": last_metrics(run_dir / "metrics.jsonl"),
        "latest_checkpoint": latest_file.read_text(encoding="utf-8").strip() if latest_file.is_file() else None,
        "results": results,
    }


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"vlp status: {run_dir}: run folder does not exist", file=sys.stderr)
        return 2
    info = summary(run_dir)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"run        {info['run_dir']}")
    if info["job_id"]:
        print(f"slurm job  {info['job_id']} {info['job_state']}")
        print(f"slurm log  {run_dir / 'slurm' / ('slurm-' + info['job_id'] + '.out')}")
    else:
        print("slurm job  none recorded")
    metrics = info["last_metrics"]
    if metrics:
        shown = " ".join(f"{key}={_format_value(value)}" for key, value in metrics.items() if key != "step")
        print(f"last step  {metrics['step']} {shown}".rstrip())
    else:
        print("last step  none logged")
    print(f"checkpoint {info['latest_checkpoint'] or 'none'}")
    if info["results"] is not None:
        print(f"results    {json.dumps(info['results'])}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("status", help="Slurm state, last step, latest checkpoint of a run folder")
    parser.add_argument("run_dir", help="the run folder (<output_dir>/<name>)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.set_defaults(func=run)
    return parser
