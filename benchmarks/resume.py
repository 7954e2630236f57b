"""Time from `vlp train CONFIG --resume latest` to the first trained step, by data position.

Generates shards of tiny PNG + caption samples (1,010,000 by default: ~2 GB, ~1 minute), trains
2 steps once per code version to get a real checkpoint, then for each position N in 10^3, 10^4,
10^5, 10^6 samples consumed it rewrites that checkpoint's data position to N and times the real
resume path: `vlp train ... --resume latest` in a subprocess, from its start to the first
metrics.jsonl line of a new step (the process is then stopped).

  * new: commit `--new-ref` (default HEAD, a `git worktree` like the old one). The saved loader position (`loader_rank0.json`) is rewritten to what a
    run that consumed N samples holds: epoch-mode shard N // 1000 + 1 of the (seeded) shard order,
    the sample inside it, a full shuffle buffer of references to the samples read just before,
    an RNG state. The resume indexes that one shard's headers and re-reads the buffer.
  * old: the skip-based loader of commit cb5c39b (a `git worktree`, run with the same venv by
    putting a `vlp` package of its folders first on PYTHONPATH), whose checkpoint holds only
    `batch_in_epoch`, rewritten to N / batch size: it reads and discards N samples.

Prints ONE JSON line: seconds per N for both, and new_ratio = new(10^6) / new(10^3) (target <= 2).
With --plot, writes docs/img/resume.png with both curves.

    python benchmarks/resume.py [--samples 1010000] [--workdir /tmp/vlp-resume-bench] [--plot]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OLD_COMMIT = "cb5c39b"
POSITIONS = (10**3, 10**4, 10**5, 10**6)
SHARD = 1000
BATCH = 8
BUFFER = 1000


def tiny_png(index: int) -> bytes:
    from PIL import Image

    image = Image.new("RGB", (8, 8), (index % 256, index // 256 % 256, 90))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_shards(out: Path, samples: int) -> str:
    """`samples` PNG + caption samples in shards of 1000, with sizes.json; reused when present."""
    shards = (samples + SHARD - 1) // SHARD
    spec = str(out / f"bench-{{000000..{shards - 1:06d}}}.tar")
    if (out / "sizes.json").is_file() and len(json.loads((out / "sizes.json").read_text())) == shards:
        return spec
    out.mkdir(parents=True, exist_ok=True)
    images = [tiny_png(index) for index in range(64)]
    sizes = {}
    for shard in range(shards):
        path = out / f"bench-{shard:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            count = min(SHARD, samples - shard * SHARD)
            for index in range(shard * SHARD, shard * SHARD + count):
                for ext, data in (("png", images[index % 64]), ("txt", f"a small square number {index}".encode())):
                    info = tarfile.TarInfo(f"s{index:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        sizes[path.name] = count
    (out / "sizes.json").write_text(json.dumps(sizes))
    return spec


def write_config(code: Path, work: Path, name: str, spec: str) -> Path:
    """The demo config of that code version, shrunk, on the benchmark shards."""
    tree = yaml.safe_load((code / "configs" / "demo.yaml").read_text())
    tree.update(name=name, output_dir=str(work / "runs"), evals=[], export=[])
    tree["data"] = {"train": [{"urls": spec}], "workers": 1, "shuffle_buffer": BUFFER, "mode": "epoch"}
    tree["model"]["embed_dim"] = 32
    tree["model"]["image"].update(width=32, layers=1, head_width=16)
    tree["model"]["text"].update(width=32, layers=1, heads=2, context_length=16)
    tree["train"].update(steps=2, batch_size=BATCH, warmup_steps=1, log_every=1, checkpoint_every=2)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def worktree_pythonpath(work: Path, ref: str, name: str) -> tuple[Path, str]:
    """(a `git worktree` of `ref`, a PYTHONPATH whose `vlp` package is made of its folders), so
    a run uses that commit's code with this venv, untouched by uncommitted edits in the checkout."""
    tree = work / f"{name}-tree"
    if not tree.is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref], check=True,
                       capture_output=True)
    shim = work / f"{name}-path" / "vlp"
    if not shim.is_dir():
        shim.mkdir(parents=True)
        (shim / "__init__.py").write_text("")
        for folder in ("core", "data_pipelines", "models", "train", "slurm"):
            if (tree / folder).is_dir():
                (shim / folder).symlink_to(tree / folder)
    return tree, str(shim.parent)


def vlp(config: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "vlp.cli", "train", str(config), *args], env=env,
                          capture_output=True, text=True, cwd=env.get("VLP_CWD", ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"vlp train {config} {args} failed:\n{proc.stderr[-3000:]}")
    return proc


def rewrite_position(tag_dir: Path, consumed: int, shard_count: int, new: bool) -> None:
    """Make the checkpoint at `tag_dir` say `consumed` samples of epoch 0 were consumed."""
    import torch

    batches = consumed // BATCH
    states = tag_dir / "mp_rank_00_model_states.pt"
    blob = torch.load(states, map_location="cpu", weights_only=False)  # our own checkpoint
    blob["train_state"].update(batch_in_epoch=batches, samples_seen=consumed)
    torch.save(blob, states)
    if not new:
        return
    from vlp.data_pipelines.position import epoch_pieces, rng_state

    path = tag_dir / "loader_rank0.json"
    saved = json.loads(path.read_text())
    sizes = [SHARD] * shard_count
    seed = saved["seed"]
    pieces = epoch_pieces(sizes, seed, 0, 0, 0, 1)  # world 1 x 1 worker: every shard, seeded order
    read = consumed + BUFFER  # what the slot has read: the consumed samples plus a full buffer
    piece, inside = divmod(read, SHARD)
    behind = [[pieces[(read - back) // SHARD][0], (read - back) % SHARD] for back in range(1, BUFFER + 1)]
    random.Random(consumed).shuffle(behind)
    source = {"seed": f"buffer/{seed}/0/0/0/0", "cycle": 0, "pieces": pieces, "piece": piece, "next": inside,
              "good": read, "buffer": behind, "draining": False, "rng": rng_state(random.Random(consumed))}
    saved.update(epoch=0, batches=batches, roles={"0": {"role": 0, "produced": batches, "position": consumed,
                                                        "augment": 1234, "mix": None, "pending": None,
                                                        "sources": [source]}})
    path.write_text(json.dumps(saved))


def time_resume(config: Path, run: Path, env: dict, step: int, limit: float) -> float | None:
    """Seconds from launching `--resume latest` to the metrics line of step `step` (None: over `limit`)."""
    metrics = run / "metrics.jsonl"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "vlp.cli", "train", str(config), "train.steps=50",
                             "train.checkpoint_every=1000", "--resume", "latest"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        while True:
            if metrics.is_file() and any(json.loads(line).get("step") == step and "loss/total" in line
                                         for line in metrics.read_text().splitlines() if line.strip()):
                return time.perf_counter() - start
            if time.perf_counter() - start > limit:
                return None
            if proc.poll() is not None:
                raise RuntimeError(f"resume of {config} exited {proc.returncode}:\n{proc.stderr.read()[-3000:]}")
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()


def bench(name: str, code: Path, work: Path, spec: str, shard_count: int, env: dict, new: bool,
          limit: float) -> dict[int, float | None]:
    config = write_config(code, work, name, spec)
    run = work / "runs" / name
    if run.exists():
        shutil.rmtree(run)
    vlp(config, env=env)  # 2 steps, checkpoint at step 2
    base = run / "checkpoints" / "step_00000002"
    pristine = work / f"{name}-pristine"
    shutil.rmtree(pristine, ignore_errors=True)
    shutil.copytree(base, pristine)
    pristine_metrics = (run / "metrics.jsonl").read_text()
    times = {}
    for consumed in POSITIONS:
        shutil.rmtree(base)
        shutil.copytree(pristine, base)
        for extra in (run / "checkpoints").iterdir():
            if extra.is_dir() and extra.name != base.name:
                shutil.rmtree(extra)
        (run / "checkpoints" / "latest").write_text(base.name + "\n")
        (run / "metrics.jsonl").write_text(pristine_metrics)  # steps 1-2 only: step 3 is the one timed
        rewrite_position(base, consumed, shard_count, new)
        seconds = time_resume(config, run, env, step=3, limit=limit)
        times[consumed] = None if seconds is None else round(seconds, 2)
        if seconds is None:  # a larger position would only take longer
            print(f"[resume-bench] {name} N={consumed}: over {limit} s, stopped", file=sys.stderr, flush=True)
            break
        print(f"[resume-bench] {name} N={consumed}: {times[consumed]} s", file=sys.stderr, flush=True)
    return times


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("new_s", "seek (position in checkpoint)"), ("old_s", f"skip ({OLD_COMMIT})")):
        points = [(int(k), v) for k, v in result[name].items() if v is not None]
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("samples consumed before the checkpoint")
    ax.set_ylabel("s from `vlp train --resume latest` to first step")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> None:
    global POSITIONS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_010_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vlp-resume-bench"))
    parser.add_argument("--plot", action="store_true", help="write docs/img/resume.png")
    parser.add_argument("--skip-old", action="store_true")
    parser.add_argument("--new-ref", default="HEAD", help="the commit whose seeking resume is timed")
    parser.add_argument("--limit", type=float, default=900, help="seconds before a resume is given up (null)")
    parser.add_argument("--positions", type=lambda text: tuple(int(v) for v in text.split(",")), default=POSITIONS,
                        help="samples consumed to resume after (a smoke test: --samples 30000 --positions 1000,20000)")
    args = parser.parse_args()
    POSITIONS = args.positions
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    spec = make_shards(work / "shards", args.samples)
    shard_count = (args.samples + SHARD - 1) // SHARD
    generate_s = time.perf_counter() - started
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    new_tree, new_path = worktree_pythonpath(work, args.new_ref, "new")
    new = bench("new", new_tree, work, spec, shard_count, dict(env, PYTHONPATH=new_path), new=True, limit=args.limit)
    result = {"benchmark": "resume", "new_ref": subprocess.run(
                  ["git", "-C", str(new_tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
              "old_ref": OLD_COMMIT, "samples_generated": args.samples, "shard_samples": SHARD,
              "batch_size": BATCH, "shuffle_buffer": BUFFER, "workers": 1, "generate_s": round(generate_s, 1),
              "new_s": new}
    if not args.skip_old:
        old_tree, old_path = worktree_pythonpath(work, OLD_COMMIT, "old")
        result["old_s"] = bench("old", old_tree, work, spec, shard_count, dict(env, PYTHONPATH=old_path), new=False,
                                limit=args.limit)
        old_last = result["old_s"].get(POSITIONS[-1])
        result["old_ratio"] = round(old_last / result["old_s"][POSITIONS[0]], 2) if old_last else None
        result["old_limit_s"] = args.limit
    result["new_ratio"] = round(new[POSITIONS[-1]] / new[POSITIONS[0]], 2)
    result["target_met"] = result["new_ratio"] <= 2.0
    result["cpus"] = os.cpu_count()
    print(json.dumps(result))
    if args.plot and "old_s" in result:
        plot(result, ROOT / "docs" / "img" / "resume.png")


if __name__ == "__main__":
    main()
