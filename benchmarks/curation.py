"""Curation benchmark: precision and recall of `vlp curate`'s filters against noise planted in
the real digits, and the dedup step's time and memory on synthetic embeddings. One JSON line.

What it builds (offline, under --data, reused by a later run with the same options):

    digits/            `vlp shards build digits` (train / test split)
    scoring/           the other half of the train split, clean: the scoring model's data
    clean/             the pool: half of the train split, captions as built
    oracle/            what a perfect filter keeps: each noisy/ shard without its planted samples
    noisy/             the pool with planted noise, labels.json {key: kind} and copied_from.json
                       {duplicate's key: original's key}:
                       swapped (caption of another class), junk (random letters), empty
                       (blank caption), exact_duplicate (a byte copy of a clean pool sample),
                       near_duplicate (a copy with brightness and grain changed, re-encoded)
    runs/scoring-separate, runs/scoring-bootstrap   the demo model trained on scoring/ (a
                       separate split) and on noisy/ itself (bootstrapped)
    emb-{case}/, curated-{case}/   vlp embed and vlp curate (configs/curate/digits.yaml)

Per case it reports, per drop reason ("filters"): how many it dropped, its precision (the
fraction of them that is planted noise) and how its drops split over the planted kinds and
clean samples; per planted kind ("kinds"): recall by the filters meant to catch it (`TARGETS`)
and by any reason (a duplicate of a low-scoring sample goes for its score, the earlier filter);
"any_noise": precision and recall of every drop against every planted sample; embed samples/s
and the filters' seconds.

    python benchmarks/curation.py --quick                      # smoke run: ~3 min on 2 cores
    python benchmarks/curation.py --data /tmp/vlp-curation     # the measurement (trains 2 models)
    python benchmarks/curation.py --dedup-bench 1000000 --skip-noise   # dedup at 10^6 embeddings

The downstream comparison (the demo trained on clean/, noisy/, oracle/ and curated-separate/ at the same
step budget, three seeds) is a set of `vlp train` commands: docs/curation.md lists them.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import resource
import string
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("swapped", "junk", "empty", "exact_duplicate", "near_duplicate")
# Which drop reasons are meant to catch which planted kind.
TARGETS = {
    "swapped": ("low_score",),
    "junk": ("caption_length", "caption_language", "caption_blocklist", "low_score", "balance"),
    "empty": ("empty_caption", "caption_length"),
    "exact_duplicate": ("duplicate_exact",),
    "near_duplicate": ("duplicate_near",),
}


# ------------------------------------------------------------------ the noisy pool
def build_data(data: Path, fractions: dict[str, float], seed: int) -> dict:
    """Build digits, split its train half into scoring/ and the pool, plant the noise."""
    from vlp.data_pipelines.shards import write_shards
    from vlp.data_pipelines.sources import build
    from vlp.data_pipelines.sources.digits import CAPTION_TEMPLATES, DIGIT_CLASSNAMES
    from vlp.data_pipelines.tar_reader import read_shard

    stamp = {"fractions": fractions, "seed": seed, "version": 3}
    stamp_file = data / "noisy" / "planted.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        labels = json.loads((data / "noisy" / "labels.json").read_text())
        if not (data / "oracle" / "sizes.json").is_file():  # a folder from before oracle/ existed
            write_oracle(data, labels)
        return labels
    if not (data / "digits" / "sizes.json").is_file():
        build("digits", data / "digits", shard_size=400)
    train = sorted((data / "digits").glob("digits-train-*.tar"))
    samples = [sample for path in train for sample in read_shard(str(path)) if "__bad__" not in sample]
    pool = [dict(sample) for sample in samples[0::2]]
    scoring = samples[1::2]
    for folder in ("scoring", "clean", "noisy"):
        for old in (data / folder).glob("*"):
            old.unlink()
    member = lambda sample: {k: (bytes(v) if not k.startswith("__") else v) for k, v in sample.items()}  # noqa: E731
    write_shards((member(s) for s in scoring), data / "scoring", "scoring", max_count=250)
    write_shards((member(s) for s in pool), data / "clean", "clean", max_count=250)

    rng = random.Random(seed)
    count = len(pool)
    order = list(range(count))
    rng.shuffle(order)
    labels: dict[str, str] = {}
    cursor = 0

    def take(kind: str) -> list[int]:
        nonlocal cursor
        chosen = order[cursor:cursor + round(fractions[kind] * count)]
        cursor += len(chosen)
        return chosen

    for index in take("swapped"):
        label = int(pool[index]["cls"])
        wrong = rng.choice([c for c in range(10) if c != label])
        template = rng.choice(CAPTION_TEMPLATES)
        pool[index]["txt"] = template.format(n=wrong, w=DIGIT_CLASSNAMES[wrong]).encode()
        labels[pool[index]["__key__"]] = "swapped"
    for index in take("junk"):
        words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))
                 for _ in range(rng.randint(2, 4))]
        pool[index]["txt"] = " ".join(words).encode()
        labels[pool[index]["__key__"]] = "junk"
    for index in take("empty"):
        pool[index]["txt"] = b" "
        labels[pool[index]["__key__"]] = "empty"
    copies, copied_from = [], {}
    for kind in ("exact_duplicate", "near_duplicate"):
        for index in take(kind):  # copies of untouched samples, placed after every original
            copy = dict(pool[index])
            copy["__key__"] = f"{kind[:5]}{len(copies):05d}"
            if kind == "near_duplicate":
                copy["png"] = retouched_png(bytes(copy["png"]), rng)
            copies.append(copy)
            labels[copy["__key__"]] = kind
            copied_from[copy["__key__"]] = pool[index]["__key__"]
    write_shards((member(s) for s in pool + copies), data / "noisy", "noisy", max_count=250)
    (data / "noisy" / "labels.json").write_text(json.dumps(labels, indent=0, sort_keys=True))
    (data / "noisy" / "copied_from.json").write_text(json.dumps(copied_from, indent=0, sort_keys=True))
    write_oracle(data, labels)
    stamp_file.write_text(json.dumps(stamp))
    return labels


def write_oracle(data: Path, labels: dict[str, str]) -> None:
    """oracle/: every noisy/ shard with its planted samples left out, members in their order. The
    downstream runs train on it as the ceiling of filtering: right pairs only, nothing restored."""
    import tarfile

    from vlp.core.files import atomic_write

    out = data / "oracle"
    out.mkdir(exist_ok=True)
    for old in out.glob("*"):
        old.unlink()
    sizes = {}
    for index, path in enumerate(sorted((data / "noisy").glob("noisy-*.tar"))):
        with tarfile.open(path) as source:
            members = [m for m in source.getmembers() if m.name.split(".", 1)[0] not in labels]
            if not members:
                continue
            name = f"oracle-{index:06d}.tar"
            with tarfile.open(out / f".{name}.tmp", "w") as tar:
                for member in members:
                    tar.addfile(member, source.extractfile(member))
            (out / f".{name}.tmp").rename(out / name)
            sizes[name] = len({m.name.split(".", 1)[0] for m in members})
    atomic_write(out / "sizes.json", json.dumps(sizes, indent=1, sort_keys=True))


def retouched_png(data: bytes, rng: random.Random) -> bytes:
    """The image as a re-upload retouches it: brightness scaled by 0.9-1.1 and grain of +-4 grey
    levels, re-encoded: other bytes, nearly the same picture."""
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(data))).astype(np.float32)
    noise = np.random.default_rng(rng.randrange(2**32)).integers(-4, 5, pixels.shape)
    moved = np.clip(pixels * rng.uniform(0.9, 1.1) + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(moved).save(out, format="PNG")
    return out.getvalue()


# ------------------------------------------------------------------ scoring model, embed, curate
def train_scoring_model(data: Path, name: str, shards: str, steps: int, seed: int) -> Path:
    """The demo config trained on `shards` (a subprocess, like `vlp train`); returns the run folder."""
    run = data / "runs" / name
    if (run / "results.json").is_file() and json.loads((run / "results.json").read_text()).get("steps") == steps:
        return run
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config.update(name=name, output_dir=str(data / "runs"), seed=seed, export=[])
    config["data"].update(build=None, build_dir=None, train=[{"urls": shards}])
    config["train"].update(steps=steps, warmup_steps=min(20, steps // 5), checkpoint_every=steps)
    config["evals"] = [{"type": "zeroshot", "data": str(data / "digits" / "digits-test-000000.tar"), "batch_size": 256}]
    path = data / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    subprocess.run([sys.executable, "-m", "vlp.cli", "train", str(path), "--overwrite"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return run


def score_case(data: Path, case: str, model: Path, labels: dict, config: Path) -> dict:
    import pyarrow.parquet as pq

    from vlp.curate.embed import embed_shards
    from vlp.curate.run import curate

    noisy = str(data / "noisy")
    emb, out = data / f"emb-{case}", data / f"curated-{case}"
    for old in [*emb.glob("shards/*/*"), *emb.glob("embed.json")]:
        old.unlink()
    for old in emb.glob("shards/*"):
        old.rmdir()
    embedded = embed_shards(noisy, model, emb, batch_size=256, workers=0, rank=0, world_size=1, show_progress=False)
    report = curate(noisy, emb, out, str(config), overwrite=True)
    manifest = pq.read_table(out / "manifest.parquet").to_pydict()
    reasons = dict(zip(manifest["key"], manifest["reason"]))
    result = {"embed_samples_per_s": embedded["samples_per_s"], "filter_seconds": report["filter_seconds"],
              "samples": report["samples"], "kept": report["kept"]}
    result["filters"] = {}
    for reason in sorted(set(reasons.values())):
        dropped = [key for key, why in reasons.items() if why == reason]
        by_kind = {kind: sum(labels.get(key) == kind for key in dropped) for kind in KINDS}
        by_kind["clean"] = len(dropped) - sum(by_kind.values())
        result["filters"][reason] = {"dropped": len(dropped), "precision": round(1 - by_kind["clean"] / len(dropped), 4),
                                     "by_kind": by_kind}
    result["kinds"] = {}
    for kind in KINDS:
        planted = {key for key, label in labels.items() if label == kind}
        caught = {key for key in planted if reasons.get(key) in TARGETS[kind]}
        result["kinds"][kind] = {"planted": len(planted),
                                 "recall": round(len(caught) / len(planted), 4) if planted else None,
                                 "recall_any_reason": round(len(planted & set(reasons)) / len(planted), 4) if planted else None}
    noise, dropped = set(labels), set(reasons)
    result["any_noise"] = {"planted": len(noise), "dropped": len(dropped),
                           "precision": round(len(noise & dropped) / len(dropped), 4) if dropped else None,
                           "recall": round(len(noise & dropped) / len(noise), 4) if noise else None}
    return result


# ------------------------------------------------------------------ dedup at scale
def dedup_bench(count: int, dim: int, seed: int = 0, nprobe: int = 16) -> dict:
    """Near-duplicate removal over `count` synthetic L2-normalised embeddings (1% planted copies
    with small noise): seconds and the process's peak resident memory growth."""
    from vlp.curate.config import DedupFilter
    from vlp.curate.filters import near_duplicate_drops

    rng = np.random.default_rng(seed)
    base = rng.standard_normal((count, dim), dtype=np.float32)
    planted = rng.choice(count, count // 100, replace=False)
    sources = rng.choice(count, len(planted), replace=True)
    base[planted] = base[sources] + 0.05 * rng.standard_normal((len(planted), dim), dtype=np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    image = base.astype(np.float16)
    del base
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    drops, _ = near_duplicate_drops(image, np.ones(count, bool), DedupFilter(threshold=0.95, nprobe=nprobe))
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"count": count, "dim": dim, "nprobe": nprobe, "seconds": round(seconds, 2), "dropped": int(drops.sum()),
            "planted": len(planted), "embeddings_mib": round(image.nbytes / 2**20, 1),
            "peak_rss_growth_mib": round((after - before) / 1024, 1), "peak_rss_mib": round(after / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=400, help="scoring model's training steps")
    parser.add_argument("--cases", default="separate,bootstrap")
    parser.add_argument("--config", default=str(ROOT / "configs" / "curate" / "digits.yaml"))
    parser.add_argument("--seed", type=int, default=0)
    for kind, default in zip(KINDS, (0.2, 0.05, 0.03, 0.05, 0.05)):
        parser.add_argument(f"--{kind.replace('_', '-')}", type=float, default=default, help=f"fraction of the pool ({default})")
    parser.add_argument("--dedup-bench", type=int, default=0, help="also time dedup on N synthetic embeddings")
    parser.add_argument("--dim", type=int, default=512, help="dimension of the synthetic embeddings")
    parser.add_argument("--nprobe", type=int, default=16, help="IVF lists probed per query (curate.dedup.nprobe)")
    parser.add_argument("--skip-noise", action="store_true", help="only the dedup benchmark")
    parser.add_argument("--quick", action="store_true", help="smoke mode: 10 training steps, dedup at 5,000")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.dedup_bench = 10, args.dedup_bench or 5_000
    import tempfile

    data = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="vlp-curation-"))
    data.mkdir(parents=True, exist_ok=True)
    line: dict = {"data": str(data), "steps": args.steps}
    if not args.skip_noise:
        fractions = {kind: getattr(args, kind) for kind in KINDS}
        labels = build_data(data, fractions, args.seed)
        line["planted"] = fractions
        for case in args.cases.split(","):
            from vlp.curate.embed import shard_urls

            spec = "::".join(shard_urls(str(data / ("scoring" if case == "separate" else "noisy"))))
            model = train_scoring_model(data, f"scoring-{case}", spec, args.steps, args.seed)
            line[case] = score_case(data, case, model, labels, Path(args.config))
            zeroshot = json.loads((model / "results.json").read_text()).get("zeroshot_top1")
            line[case]["scoring_model_zeroshot_top1"] = zeroshot
    if args.dedup_bench:
        line["dedup"] = dedup_bench(args.dedup_bench, args.dim, args.seed, args.nprobe)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
