"""One metric of several recipes over several seeds: per-seed values, mean and spread, side by side.

Runs `vlp train CONFIG seed=S name=<config name>_s<S>` for every config and seed, one after
another (on a small machine two trainings at once slow each other far more than 2x), then reads
`runs/<name>/results.json`. With `--reuse`, a run folder that already holds a `results.json`
is read instead of trained again. Prints ONE JSON line; `--png` draws the per-seed values.

    python benchmarks/seeds.py configs/demo.yaml configs/meru_demo.yaml --seeds 0 1 2 \\
        --metric zeroshot_top1 --png docs/img/meru_vs_clip_seeds.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_name(config: Path, seed: int) -> str:
    return f"{yaml.safe_load(config.read_text())['name']}_s{seed}"


def result(config: Path, seed: int, metric: str, reuse: bool, output_dir: str) -> float:
    name = run_name(config, seed)
    path = ROOT / output_dir / name / "results.json"
    if not (reuse and path.is_file()):
        print(f"[seeds] training {config} seed {seed} -> {path.parent}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "vlp.cli", "train", str(config), f"seed={seed}", f"name={name}",
                        f"output_dir={output_dir}", "--overwrite"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    results = json.loads(path.read_text())
    if metric not in results:
        raise SystemExit(f"seeds: {path} has no {metric!r} (it has {', '.join(sorted(results))})")
    return float(results[metric])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="+", type=Path)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--metric", default="zeroshot_top1")
    parser.add_argument("--output-dir", default="runs")
    parser.add_argument("--reuse", action="store_true", help="read run folders that already have results.json")
    parser.add_argument("--png", default=None)
    args = parser.parse_args()
    table: dict[str, dict] = {}
    for config in args.configs:
        values = [result(config, seed, args.metric, args.reuse, args.output_dir) for seed in args.seeds]
        table[str(config)] = {
            "values": [round(v, 4) for v in values],
            "mean": round(statistics.mean(values), 4),
            "stdev": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        }
    first = table[str(args.configs[0])]["mean"]
    for row in table.values():
        row["mean_minus_first"] = round(row["mean"] - first, 4)
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(table), 3.6))
        for index, (config, row) in enumerate(table.items()):
            ax.scatter([index] * len(row["values"]), row["values"], color="tab:gray", zorder=3)
            ax.bar(index, row["mean"], color="tab:blue", alpha=0.5)
            ax.text(index, row["mean"], f"{row['mean']:.3f}", ha="center", va="bottom")
        ax.set_xticks(range(len(table)), [Path(c).stem for c in table], rotation=15)
        low = min(v for row in table.values() for v in row["values"])
        ax.set_ylim(max(0.0, low - 0.05), min(1.0, max(v for row in table.values() for v in row["values"]) + 0.02))
        ax.set_ylabel(args.metric)
        ax.set_title(f"bars: mean; dots: seeds {', '.join(map(str, args.seeds))}", fontsize=10)
        fig.tight_layout()
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png, dpi=110)
    print(json.dumps({"benchmark": "seeds", "metric": args.metric, "seeds": args.seeds, "runs": table}))


if __name__ == "__main__":
    main()
