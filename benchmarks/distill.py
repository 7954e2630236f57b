"""Distillation on the digits: what a teacher costs per step, and what it buys.

Step time (the whole pipeline: loader, engine, heads, as `vlp train` runs it): the quarter-width
student of configs/distill_digits_alone.yaml alone, with the distill head reading the teacher's
embeddings from reinforced shards (offline), and with the teacher running on every batch
(online). Each arm is one `vlp train` of `--steps` steps without evals, checkpoints or exports;
its step time is the median of the logged `samples_per_s` windows after the first two (start-up
and warm-up left out), as ms per step.

Quality (not in --quick): configs/distill_digits_alone.yaml against configs/distill_digits.yaml
(and the offline recipe) over `--seeds`, zero-shot top-1 on the held-out digits, through
benchmarks/seeds.py's runs. The target: distilled mean - alone mean > the seed spread (the larger
max - min of the two arms).

The teacher is the demo model (runs/demo/export/safetensors, trained by `vlp demo` when absent);
--quick times the arms against a random teacher of the demo's architecture instead (the cost of
a teacher does not depend on its weights) and finishes in under a minute on 2 CPU cores.

    python benchmarks/distill.py --quick
    python benchmarks/distill.py --seeds 0 1 2            # the full measurement (about 45 min on CPU)

Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

ALONE = ROOT / "configs" / "distill_digits_alone.yaml"
ONLINE = ROOT / "configs" / "distill_digits.yaml"
OFFLINE = ROOT / "configs" / "distill_digits_offline.yaml"
DEMO_EXPORT = ROOT / "runs" / "demo" / "export" / "safetensors"
TRAIN_SHARDS = "data/digits/digits-train-{000000..000002}.tar"
REINFORCED = ROOT / "data" / "digits_reinforced"


def vlp(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "vlp.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"distill benchmark: vlp {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc.stdout


def random_teacher(out: Path) -> Path:
    """An export of the demo's architecture with random weights (for timing only)."""
    import torch

    from vlp.export import export_model
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    config = load_config(ROOT / "configs" / "demo.yaml", ["export=[]", "evals=[]"])
    torch.manual_seed(0)
    return export_model(VLPModel(config.model), config, out, "safetensors")


def step_ms(config: Path, name: str, steps: int, output_dir: Path, overrides: list[str]) -> dict:
    """One timed `vlp train` arm -> {"step_ms", "samples_per_s", "windows"}."""
    log_every = max(steps // 8, 2)
    vlp("train", str(config), f"name={name}", f"output_dir={output_dir}", f"train.steps={steps}",
        f"train.log_every={log_every}", "train.checkpoint_every=0", f"train.warmup_steps={min(20, steps // 5)}",
        "evals=[]", "export=[]", "--overwrite", *overrides)
    rows = [json.loads(line) for line in (output_dir / name / "metrics.jsonl").read_text().splitlines()]
    rates = [row["samples_per_s"] for row in rows if row.get("samples_per_s")][2:]
    if not rates:
        raise SystemExit(f"distill benchmark: {name}: too few logged windows; raise --steps")
    rate = statistics.median(rates)
    batch = yaml.safe_load(config.read_text())["train"]["batch_size"]
    return {"step_ms": round(1000 * batch / rate, 1), "samples_per_s": round(rate, 1), "windows": len(rates)}


def quality(seeds: list[int], configs: list[Path]) -> dict:
    from seeds import result  # benchmarks/seeds.py: trains `name_s{seed}` or reuses its results.json

    table = {}
    for config in configs:
        values = [result(config, seed, "zeroshot_top1", True, "runs") for seed in seeds]
        table[config.stem] = {"values": [round(v, 4) for v in values], "mean": round(statistics.mean(values), 4),
                              "spread": round(max(values) - min(values), 4)}
    alone = table[ALONE.stem]
    for name, row in table.items():
        if name != ALONE.stem:
            row["gain"] = round(row["mean"] - alone["mean"], 4)
            row["beats_alone_by_more_than_the_spread"] = row["gain"] > max(row["spread"], alone["spread"])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="step times only, random teacher, 16 steps an arm")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed arm (default 16 quick, 200 full)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--quality", nargs="+", choices=["online", "offline"], default=["online", "offline"],
                        help="distilled arms trained over --seeds beside the student alone (offline reads the teacher's "
                             "embeddings of each image's eval view, written once; online runs it on every augmented batch)")
    args = parser.parse_args()
    steps = args.steps or (16 if args.quick else 200)
    with tempfile.TemporaryDirectory(prefix="vlp_distill_bench_") as scratch:
        scratch = Path(scratch)
        if not (ROOT / "data" / "digits" / "digits-train-000002.tar").is_file():
            vlp("shards", "build", "digits", "--out", "data/digits")
        if args.quick:
            teacher, reinforced = random_teacher(scratch / "teacher"), scratch / "reinforced"
        else:
            if not DEMO_EXPORT.is_dir():
                vlp("demo")
            teacher, reinforced = DEMO_EXPORT, REINFORCED
        if not (reinforced / "sizes.json").is_file() or args.quick:
            from vlp.curate.reinforce import reinforce_shards  # in this process: one interpreter start less

            reinforce_shards(str(ROOT / TRAIN_SHARDS), teacher, reinforced, workers=0, rank=0, world_size=1,
                             show_progress=False)
        runs = scratch / "runs"
        offline_urls = f"data.train.0.urls={reinforced}/digits-train-{{000000..000002}}.tar"
        arms = {
            "alone": step_ms(ALONE, "alone", steps, runs, []),
            "offline": step_ms(OFFLINE, "offline", steps, runs, [offline_urls]),
            "online": step_ms(ONLINE, "online", steps, runs, [f"model.heads.distill.teacher.export={teacher}"]),
        }
    alone = arms["alone"]["step_ms"]
    for arm in arms.values():
        arm["over_alone"] = round(arm["step_ms"] / alone, 3)
    line = {"benchmark": "distill", "quick": args.quick, "steps_per_arm": steps, "batch": 64, "teacher": str(teacher) if not args.quick else "random, demo architecture",
            "step_time": arms, "offline_within_1.1x": arms["offline"]["over_alone"] <= 1.1}
    if not args.quick:
        line["quality"] = quality(args.seeds, [ALONE] + [{"online": ONLINE, "offline": OFFLINE}[arm] for arm in args.quality])
    import torch

    line["threads"] = torch.get_num_threads()
    print(json.dumps(line))


if __name__ == "__main__":
    main()
