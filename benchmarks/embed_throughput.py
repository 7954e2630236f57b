"""`vlp embed` against clip-retrieval's inference: samples/s per process, same model, same shards.

One model, random weights of a stock open_clip architecture (`--arch`, default ViT-S-32-alt,
the smallest plain ViT open_clip ships), built by vlp (`model.open_clip: {name: ARCH}`) and
written with vlp's open_clip exporter. Both sides load those same weights:

    vlp embed SHARDS --model EXPORT --out DIR       vlp's own command, in a fresh process; the
                                                    rate is its summary line's samples_per_s
    clip-retrieval 2.45.0                           in a fresh process (PYTHONPATH=--crdeps): its
                                                    Runner with its WebdatasetReader
                                                    (create_webdataset + dataset_to_dataloader),
                                                    ClipMapper and NumpyWriter, the model through
                                                    all_clip.load_clip("open_clip:ARCH//abs/weights")

Same shards (the real digits, upscaled to `--image-size` px PNGs and repeated to `--samples`,
in shards of `--shard-size`), batch size, DataLoader workers and device; one process each, one
after the other (`--repeats` alternates which goes first). Each side's clock starts after its
model is loaded and stops when its output is on disk:

    vlp             `embed_shards`' loop: workers start, image and text towers, the scoring
                    head's score, parquet + float16 .npy per shard (plus each image's SHA-256)
    clip-retrieval  `Runner.__call__(0)`: reader, mapper and writer built (the model is cached by
                    load_clip's lru_cache, loaded and warmed up before the clock), its loop
                    (image and text embeddings, L2-normalised, float16), NumpyWriter.flush (one
                    .npy per tower + a parquet of keys and captions). Its LoggerWriter (a spawned
                    process writing stats JSON) is replaced by an in-process counter.

Both outputs are then compared key by key (cosine of the float16 embeddings), which shows the two
ran the same model on the same pixels and tokens.

    python benchmarks/embed_throughput.py --quick      # smoke: about a minute on 2 idle cores
    python benchmarks/embed_throughput.py              # the measurement: 2048 samples, 2 repeats, ~15 min

Prints one JSON line. A side that cannot run reports its exact error there, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("vlp", "clip_retrieval")


# ------------------------------------------------------------------ shards and model (parent process)
def build_shards(data: Path, samples: int, shard_size: int, image_size: int) -> Path:
    """The real digits at `image_size` px (bilinear, so the PNGs decode like photos rather than
    flat blocks), cycled to `samples` samples with unique keys, in shards of `shard_size`."""
    from vlp.data_pipelines.shards import write_shards
    from vlp.data_pipelines.sources import build
    from vlp.data_pipelines.tar_reader import read_shard

    digits = data / f"digits-{image_size}px"
    if not (digits / "sizes.json").is_file():
        build("digits", digits, image_size=image_size, resize="bilinear")
    folder = data / f"shards-{image_size}px-{samples}x{shard_size}"
    if (folder / "sizes.json").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    source = [sample for path in sorted(digits.glob("digits-*.tar")) for sample in read_shard(str(path))
              if "__bad__" not in sample]
    members = ("png", "txt", "cls")

    def cycled():
        for index in range(samples):
            sample = source[index % len(source)]
            yield {"__key__": f"{index:07d}", **{ext: bytes(sample[ext]) for ext in members}}

    write_shards(cycled(), folder, "pool", max_count=shard_size)
    return folder


def build_export(data: Path, arch: str, shards: Path, seed: int) -> Path:
    """A vlp model whose towers are open_clip's `arch` (random weights from `seed`), exported in
    open_clip's layout; reused when present."""
    import torch
    import yaml

    from vlp.export import export_model
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    out = data / f"model-{arch}-seed{seed}"
    if (out / "open_clip_model.safetensors").is_file():
        return out
    tree = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    tree.update(name=f"embed-bench-{arch}", output_dir=str(data / "runs"), evals=[], export=[])
    tree["data"] = {"train": [{"urls": str(shards)}], "workers": 0}
    tree["model"] = {"open_clip": {"name": arch}}
    config = load_config(tree=tree)
    torch.manual_seed(seed)
    model = VLPModel(config.model).eval()
    return export_model(model, config, out, "open_clip")


# ------------------------------------------------------------------ the two sides (child processes)
def run_side(side: str, args: argparse.Namespace, shards: Path, export: Path, out: Path) -> dict:
    """One side in a fresh process; returns its JSON line plus the process's wall time (imports
    and model loading included), or {"error": ...} with the exact error it died of."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if side == "vlp":
        command = [sys.executable, "-m", "vlp.cli", "embed", str(shards), "--model", str(export), "--out", str(out),
                   "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--device", args.device,
                   "--precision", args.vlp_precision]
    else:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.crdeps, env.get("PYTHONPATH")]))
        command = [sys.executable, __file__, "--clip-retrieval-side", "--shards", str(shards), "--export", str(export),
                   "--out", str(out), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                   "--arch", args.arch]
    started, cpu_before = time.perf_counter(), children_cpu_seconds()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - started, children_cpu_seconds() - cpu_before
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {"error": tail[-1] if tail else f"exit {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if side == "vlp":  # its summary line, less what says where the output went
        result = {key: result[key] for key in ("samples", "embedded", "bad", "seconds", "samples_per_s")}
    # Whole process (imports, model load, clip-retrieval's warm-up, its DataLoader workers): the
    # CPU seconds tell the work apart from the waiting when other jobs share the cores.
    result["process_seconds"], result["process_cpu_seconds"] = round(wall, 2), round(cpu, 2)
    return result


def children_cpu_seconds() -> float:
    """User + system CPU seconds of every reaped child process so far (a side and its workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def clip_retrieval_side(args: argparse.Namespace) -> dict:
    """clip-retrieval's worker, as `clip_retrieval.clip_inference.worker.worker` wires it for
    input_format=webdataset and one output partition, minus the stats process."""
    import torch
    from all_clip import load_clip
    from clip_retrieval.clip_inference.mapper import ClipMapper
    from clip_retrieval.clip_inference.reader import WebdatasetReader
    from clip_retrieval.clip_inference.runner import Runner
    from clip_retrieval.clip_inference.writer import NumpyWriter

    urls = sorted(str(path) for path in Path(args.shards).glob("*.tar"))
    weights = (Path(args.export) / "open_clip_model.safetensors").resolve()
    # all_clip splits on "/": the name, then the rest joined back is open_clip's `pretrained` file.
    clip_model = f"open_clip:{args.arch}/{weights}"
    # use_jit=False: open_clip's jit path scripts the model (clip-retrieval's CLI default is True);
    # vlp runs eager too. Keyword order as ClipMapper and the worker pass them, so the lru_cache
    # of load_clip hands the runner this model instead of loading it inside the clock.
    load = dict(clip_model=clip_model, use_jit=False, warmup_batch_size=args.batch_size, clip_cache_path=None)
    started = time.perf_counter()
    _, preprocess, tokenizer = load_clip(**load)
    load_seconds = time.perf_counter() - started

    stats = BatchStats()
    runner = Runner(
        reader_builder=lambda sampler: WebdatasetReader(
            sampler, *load_clip(**load)[1:], urls, args.batch_size, args.workers,
            enable_text=True, enable_image=True, enable_metadata=False, wds_image_key="png", wds_caption_key="txt"),
        mapper_builder=lambda: ClipMapper(enable_image=True, enable_text=True, enable_metadata=False, use_mclip=False,
                                          clip_model=clip_model, use_jit=False, mclip_model=None,
                                          warmup_batch_size=args.batch_size, clip_cache_path=None),
        writer_builder=lambda partition: NumpyWriter(partition_id=partition, output_folder=str(args.out),
                                                     enable_text=True, enable_image=True, enable_metadata=False,
                                                     output_partition_count=1),
        logger_builder=lambda partition: stats,
        output_partition_count=1,
    )
    started = time.perf_counter()
    runner(0)
    seconds = time.perf_counter() - started
    cache = load_clip.cache_info()
    return {"samples": stats.totals["sample_count"], "seconds": round(seconds, 3),
            "samples_per_s": round(stats.totals["sample_count"] / seconds, 1),
            "read_s": round(stats.totals["read_duration"], 3),
            "inference_s": round(stats.totals["inference_duration"], 3),
            "write_s": round(stats.totals["write_duration"], 3), "model_load_s": round(load_seconds, 2),
            "model_loads": cache.misses, "device": "cuda" if torch.cuda.is_available() else "cpu"}


class BatchStats:
    """Stands in for clip-retrieval's LoggerWriter (start / per-batch stats / end), summing in
    process instead of spawning a writer process."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {"sample_count": 0, "read_duration": 0.0, "inference_duration": 0.0,
                                         "write_duration": 0.0}

    def start(self) -> None:
        pass

    def end(self) -> None:
        pass

    def __call__(self, stats: dict) -> None:
        for key in self.totals:
            self.totals[key] += stats[key]


# ------------------------------------------------------------------ same model, same inputs?
def agreement(vlp_out: Path, cr_out: Path) -> dict:
    """Per key, the cosine of the two sides' float16 embeddings (both L2-normalised): the lowest
    and the mean over every sample, image and text."""
    import numpy as np
    import pyarrow.parquet as pq

    ours: dict[str, dict[str, np.ndarray]] = {"image": {}, "text": {}}
    for shard in sorted((vlp_out / "shards").iterdir()):
        table = pq.read_table(shard / "table.parquet", columns=["key", "row"]).to_pydict()
        for tower in ours:
            rows = np.load(shard / f"{tower}.npy").astype(np.float32)
            ours[tower].update({key: rows[row] for key, row in zip(table["key"], table["row"]) if row >= 0})
    keys = pq.read_table(cr_out / "metadata" / "metadata_0.parquet", columns=["image_path"]).column(0).to_pylist()
    theirs = {"image": np.load(cr_out / "img_emb" / "img_emb_0.npy"),
              "text": np.load(cr_out / "text_emb" / "text_emb_0.npy")}
    report: dict = {"samples_compared": len(keys), "same_keys": sorted(keys) == sorted(ours["image"])}
    for tower, matrix in theirs.items():
        mine = np.stack([ours[tower][key] for key in keys])  # (N, E), in clip-retrieval's order
        cosine = np.sum(mine * matrix.astype(np.float32), axis=1)
        report[f"{tower}_cosine_min"] = round(float(cosine.min()), 5)
        report[f"{tower}_cosine_mean"] = round(float(cosine.mean()), 5)
    return report


# ------------------------------------------------------------------ driver
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 samples, batch 16, one repeat: a smoke run")
    parser.add_argument("--data", type=Path, default=Path("/tmp/vlp-embed-bench"))
    parser.add_argument("--arch", default="ViT-S-32-alt", help="a stock open_clip model config name")
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=256, help="px of the PNGs in the shards")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, each side")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side, alternating which goes first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crdeps", default="/tmp/crdeps",
                        help="folder holding clip-retrieval and its dependencies (pip install --no-deps --target)")
    # internal: the clip-retrieval side, run in its own process
    parser.add_argument("--clip-retrieval-side", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--export", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        # A shard per worker, each a whole batch per worker: vlp's batches do not cross shards.
        args.samples, args.shard_size, args.batch_size, args.repeats = 64, 32, 16, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.clip_retrieval_side:
        print(json.dumps(clip_retrieval_side(args)))
        return
    import torch

    # Both sides on the device clip-retrieval picks (cuda when there is one), and at its precision
    # there: all_clip autocasts to bf16 (fp16 without bf16 support) on a GPU, fp32 on the CPU.
    cuda = torch.cuda.is_available()
    args.device = "cuda" if cuda else "cpu"
    args.vlp_precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    args.data.mkdir(parents=True, exist_ok=True)
    shards = build_shards(args.data, args.samples, args.shard_size, args.image_size)
    export = build_export(args.data, args.arch, shards, args.seed)

    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for repeat in range(args.repeats):
        order = SIDES if repeat % 2 == 0 else SIDES[::-1]
        for side in order:
            runs[side].append(run_side(side, args, shards, export, args.data / f"out-{side}"))
    failed = {side: results[-1] for side, results in runs.items() if "error" in results[-1]}
    rates = {side: [run["samples_per_s"] for run in results if "samples_per_s" in run]
             for side, results in runs.items()}
    median = {side: statistics.median(values) if values else None for side, values in rates.items()}
    report = {
        "bench": "embed_throughput", "arch": args.arch, "device": args.device, "precision": args.vlp_precision,
        "threads": torch.get_num_threads(), "samples": args.samples, "shards": len(list(shards.glob("*.tar"))),
        "image_px": args.image_size, "batch_size": args.batch_size,
        "workers": args.workers, "repeats": args.repeats,
        "vlp_samples_per_s": median["vlp"], "clip_retrieval_samples_per_s": median["clip_retrieval"],
        "ratio_vlp_over_clip_retrieval": round(median["vlp"] / median["clip_retrieval"], 3)
        if median["vlp"] and median["clip_retrieval"] else None,
        "runs": runs,
    }
    if not failed:
        report["agreement"] = agreement(args.data / "out-vlp", args.data / "out-clip_retrieval")
    print(json.dumps(report))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
