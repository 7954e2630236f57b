"""Peak memory and time of the CLIP loss alone (forward + backward), ours vs open_clip's ClipLoss.

One process, CPU, fp32, D-dimensional L2-normalised features for N pairs. Every case runs in a
fresh subprocess so one case's allocator state cannot leak into the next. Memory is the peak
resident set size above the baseline of the inputs: the child builds its inputs, resets the
kernel's high-water mark (`echo 5 > /proc/self/clear_refs`, Linux) and reads `VmHWM` after the
loss; where that reset is unavailable it falls back to `ru_maxrss` after minus before. The
extra therefore counts everything the loss allocates, including the input gradients (2 N D fp32,
the same for both implementations).

    python benchmarks/loss_memory.py                      # the full sweep, a few minutes
    python benchmarks/loss_memory.py --sizes 1024,4096    # a quick run
    python benchmarks/loss_memory.py --device cuda --sizes 16384,65536 --plot /tmp/loss_memory_cuda.png

`--device cuda`: the same cases on the GPU, memory as `torch.cuda.max_memory_allocated` above
what the inputs hold (the peak is reset after they are built), time after a synchronize.

Prints one JSON line (all numbers, and whether each target is met) and writes the plot.

`--head flair|filip|ct_align` measures a fine-grained head instead (see `run_head_case`): one
rank's share, B_local = 256 local images against N global texts, P = 196 patch tokens, E = 512,
fp32, forward + backward, the tiled path (blocks of text columns, recompute in backward) and the
dense one (no blocks, no recompute). One JSON line per (head, impl, N); sizes above `--measure-max-n` (or whose
dense peak is predicted above `--dense-max-gb`) are predicted from the two smallest measured sizes
by a straight line in N (both paths are linear in N at fixed B), marked `"predicted": true`.

    python benchmarks/loss_memory.py --head flair --sizes 256,1024,4096,16384
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = (4096, 8192, 16384, 32768, 65536)
# The dense loss keeps about six fp32 (N, N) matrices alive at its peak (two logit matrices, their
# log-softmax and their gradients); used only to skip open_clip where it cannot fit.
DENSE_COPIES = 6


def _peak_kib() -> tuple[int, str]:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]), "VmHWM"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def run_case(impl: str, num: int, dim: int, threads: int, reps: int, tile_size: int | None, device: str = "cpu") -> dict:
    """Child side: one implementation at one N; returns its numbers."""
    import torch

    sys.path.insert(0, str(ROOT))
    from open_clip.loss import ClipLoss

    from vlp.models.heads.clip import clip_loss

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    # In-place normalisation: no (N, D) temporaries that would raise the baseline's peak.
    image = torch.randn(num, dim, generator=generator).to(device)
    image.div_(image.norm(dim=1, keepdim=True))
    text = torch.randn(num, dim, generator=generator).to(device)
    text.div_(text.norm(dim=1, keepdim=True))
    image.requires_grad_()
    text.requires_grad_()
    logit_scale = torch.tensor([1 / 0.07], device=device, requires_grad=True)
    reference = ClipLoss()

    def step() -> None:
        if impl == "ours":
            loss = clip_loss(image, text, logit_scale, tile_size=tile_size)
        else:
            loss = reference(image, text, logit_scale)
        loss.backward()
        image.grad = text.grad = logit_scale.grad = None

    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before_bytes, method, reset = torch.cuda.memory_allocated(), "cuda max_memory_allocated", True
    else:
        reset = _reset_peak()
        before, method = _peak_kib()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        if on_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if on_cuda:
        extra_kib = (torch.cuda.max_memory_allocated() - before_bytes) / 1024
    else:
        extra_kib = _peak_kib()[0] - before
    return {
        "impl": impl,
        "n": num,
        "device": device,
        "peak_extra_mb": round(extra_kib / 1024, 1),
        "time_s": round(min(times), 3),
        "reps": reps,
        "memory_method": method + (" reset after inputs" if reset else " after - before"),
    }


def _child(impl: str, num: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", impl, "--sizes", str(num), "--dim", str(args.dim),
               "--threads", str(args.threads), "--reps", str(args.reps if num <= args.reps_below else 1), "--device", args.device]
    if args.tile_size:
        command += ["--tile-size", str(args.tile_size)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {"impl": impl, "n": num, "error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _find(results: list[dict], impl: str, num: int) -> dict | None:
    return next((r for r in results if r["impl"] == impl and r["n"] == num and "error" not in r), None)


def _targets(results: list[dict]) -> dict:
    """Each target: True / False, or None when its N was not run."""
    ours16, ref16 = _find(results, "ours", 16384), _find(results, "open_clip", 16384)
    ours64 = _find(results, "ours", 65536)
    ours8, ref8 = _find(results, "ours", 8192), _find(results, "open_clip", 8192)
    memory_ratio = ours16["peak_extra_mb"] / ref16["peak_extra_mb"] if ours16 and ref16 else None
    time_ratio = ours8["time_s"] / ref8["time_s"] if ours8 and ref8 else None
    return {
        "memory_ratio_16384": None if memory_ratio is None else round(memory_ratio, 4),
        "memory_16384_at_most_1/8_of_open_clip": None if memory_ratio is None else memory_ratio <= 1 / 8,
        "extra_mb_65536": ours64["peak_extra_mb"] if ours64 else None,
        "memory_65536_within_2GB": None if ours64 is None else ours64["peak_extra_mb"] <= 2048,
        "time_ratio_8192": None if time_ratio is None else round(time_ratio, 3),
        "time_8192_at_most_1.5x_open_clip": None if time_ratio is None else time_ratio <= 1.5,
    }


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (memory_ax, time_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for impl, label in (("ours", "vlp clip_loss (tiled)"), ("open_clip", "open_clip ClipLoss")):
        rows = sorted((r for r in results if r["impl"] == impl and "error" not in r), key=lambda r: r["n"])
        if not rows:
            continue
        sizes = [r["n"] for r in rows]
        memory_ax.plot(sizes, [r["peak_extra_mb"] / 1024 for r in rows], marker="o", label=label)
        time_ax.plot(sizes, [r["time_s"] for r in rows], marker="o", label=label)
    for ax, ylabel in ((memory_ax, "peak extra memory (GiB)"), (time_ax, "forward + backward (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch N (one rank, D = 512, fp32, CPU)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("CLIP loss alone: memory and time")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# -- fine-grained heads ---------------------------------------------------------------------------
HEAD_SHAPES = {"batch": 256, "patches": 196, "dim": 512, "flair_captions": 8, "flair_heads": 8, "filip_length": 32}


def run_head_case(head: str, impl: str, num: int, threads: int, block_size: int | None, reps: int = 1) -> dict:
    """Child side: one head's loss, forward + backward, one rank's share of a global batch of `num`."""
    import torch

    sys.path.insert(0, str(ROOT))
    from vlp.models.heads import HeadInputs
    from vlp.models.heads.ct_align import local_volume_alignment_loss
    from vlp.models.heads.filip import FilipConfig, FilipHead
    from vlp.models.heads.flair import FlairConfig, FlairHead

    torch.set_num_threads(threads)
    shapes = HEAD_SHAPES
    batch, patches, dim = shapes["batch"], shapes["patches"], shapes["dim"]
    from vlp.models.heads import tiled_tokens

    # dense: the heads' dense path (one autograd graph, no recompute) whatever its size; tiled:
    # the automatic blocks (or --block-size) even where the automatic choice would go dense.
    forced_budget = 1 << 60 if impl == "dense" else -1
    tiled_tokens.dense_budget_bytes = lambda device=None: forced_budget
    block = None if impl == "dense" else block_size
    generator = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator).requires_grad_()

    if head == "flair":
        module = FlairHead(FlairConfig(num_heads=shapes["flair_heads"], block_size=block), dim)
        k = shapes["flair_captions"]
        image_embed, image_tokens, sub_text = leaf(batch, dim), leaf(batch, patches, dim), leaf(num, k, dim)
        inputs = HeadInputs(local={"image_embed": image_embed, "image_tokens": image_tokens, "sub_text_embed": sub_text[:batch]},
                            gathered={"sub_text_embed": sub_text}, batch={}, rank=0, world_size=num // batch)
        leaves = [image_embed, image_tokens, sub_text]
        loss_fn = lambda: module(inputs)["loss"]  # noqa: E731
    elif head == "filip":  # B local images against N gathered texts; the patch tokens are never gathered
        module = FilipHead(FilipConfig(block_size=block), dim)
        length = shapes["filip_length"]
        image_tokens, text_tokens = leaf(batch, patches, dim), leaf(num, length, dim)
        mask = torch.ones(num, length, dtype=torch.bool)
        local = {"image_tokens": image_tokens, "text_tokens": text_tokens[:batch], "text_mask": mask[:batch]}
        inputs = HeadInputs(local=local, gathered={"text_tokens": text_tokens, "text_mask": mask},
                            batch={}, rank=0, world_size=num // batch)
        leaves = [image_tokens, text_tokens]
        loss_fn = lambda: module(inputs)["loss"]  # noqa: E731
    else:  # ct_align: B local volumes against N gathered sentences (the first B are this rank's)
        volume_tokens, sentences = leaf(batch, patches, dim), leaf(num, dim)
        scale = torch.tensor([1 / 0.07], requires_grad=True)
        owners = torch.where(torch.arange(num) < batch, torch.arange(num), -1)
        leaves = [sentences, volume_tokens, scale]
        loss_fn = lambda: local_volume_alignment_loss(  # noqa: E731
            volume_tokens, torch.nn.functional.normalize(sentences, dim=-1), owners, scale, block_size=block)[0]
        module = None
    params = list(module.parameters()) if module is not None else []

    reset = _reset_peak()
    before, method = _peak_kib()
    times = []
    for _ in range(reps):  # the min of `reps` steps: the shared machine's load only ever adds time
        start = time.perf_counter()
        loss_fn().backward()
        times.append(time.perf_counter() - start)
        for tensor in leaves + params:
            tensor.grad = None
    elapsed = min(times)
    after, _ = _peak_kib()
    del params, leaves
    return {"head": head, "impl": impl, "n": num, "b_local": batch, "peak_extra_mb": round((after - before) / 1024, 1),
            "time_s": round(elapsed, 2), "reps": reps, "predicted": False,
            "memory_method": method + (" reset after inputs" if reset else " after - before")}


def _head_child(head: str, impl: str, num: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--head", head, "--child", impl, "--sizes", str(num), "--threads", str(args.threads),
               "--batch", str(args.batch), "--reps", str(args.reps)]
    if args.tile_size:
        command += ["--tile-size", str(args.tile_size)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {"head": head, "impl": impl, "n": num, "error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def linear_bytes_per_text(head: str) -> int:
    """fp32 bytes of the tiled path's tensors that grow with N, per global text (the formula the
    tiled predictions use above the largest measured N; its block is a constant). flair: the
    (K, E) captions' gradient, projected queries, normalised copies and their gradients (6 K E),
    and the MPS (B, K) logits with their sigmoid terms and gradient (4 B K); filip: the gradient
    of the gathered (L, E) text tokens (the patch tokens are local, B P E, a constant) and the
    (2, B) score columns with their scaled copies, softmax and gradients (12 B); ct_align: the
    gathered (E,) sentence's gradient, normalised copy and its gradient (3 E) and 10 B score
    terms."""
    shapes = HEAD_SHAPES
    batch, dim = shapes["batch"], shapes["dim"]
    if head == "flair":
        return 4 * (6 * shapes["flair_captions"] * dim + 4 * batch * shapes["flair_captions"])
    if head == "filip":
        return 4 * (shapes["filip_length"] * dim + 12 * batch)
    return 4 * (3 * dim + 10 * batch)


def dense_bytes_per_text(head: str) -> int:
    """fp32 bytes the dense path (one block) keeps per global text on top of the tiled path's
    linear terms: the whole intermediate of every column, kept for backward (the heads' own
    `*_bytes_per_column`, the same estimate that sizes a tiled block)."""
    from vlp.models.heads.ct_align import region_bytes_per_column
    from vlp.models.heads.filip import late_interaction_bytes_per_column

    batch, patches, dim = HEAD_SHAPES["batch"], HEAD_SHAPES["patches"], HEAD_SHAPES["dim"]
    if head == "filip":
        return late_interaction_bytes_per_column(batch, patches, HEAD_SHAPES["filip_length"]) + linear_bytes_per_text(head)
    if head == "ct_align":
        return region_bytes_per_column(batch, patches, dim) + linear_bytes_per_text(head)
    raise ValueError(f"no dense formula for {head}: measure two sizes")


def _predict_memory(head: str, impl: str, measured: list[dict], num: int) -> tuple[float, str]:
    """Dense: the straight line through the two smallest measured sizes (its per-text term, the
    (B, P) block of every text, dominates from the first point), or `dense_bytes_per_text` x N
    with fewer than two measured. Tiled: the largest measured peak plus `linear_bytes_per_text`
    for every further text."""
    if impl == "dense":
        if len(measured) >= 2:
            return _line_through(measured, "peak_extra_mb", num), f"line through N = {sorted(r['n'] for r in measured)[:2]}"
        per_text = dense_bytes_per_text(head)
        return num * per_text / 2**20, f"{per_text} B per text (dense_bytes_per_text)"
    last = max(measured, key=lambda r: r["n"])
    per_text = linear_bytes_per_text(head)
    return (last["peak_extra_mb"] + (num - last["n"]) * per_text / 2**20,
            f"measured at N = {last['n']} + {per_text} B per further text (linear_bytes_per_text)")


def _line_through(rows: list[dict], key: str, num: int) -> float:
    """Value of `key` at `num` on the straight line through the two smallest measured sizes."""
    (n0, y0), (n1, y1) = [(r["n"], r[key]) for r in sorted(rows, key=lambda r: r["n"])[:2]]
    return y0 + (y1 - y0) * (num - n0) / (n1 - n0)


def head_sweep(args: argparse.Namespace, sizes: list[int]) -> int:
    results: list[dict] = []
    start = time.perf_counter()
    for impl in ("tiled", "dense"):
        measured: list[dict] = []
        for num in sizes:
            limit = args.measure_max_n if impl == "tiled" else min(args.measure_max_n, args.dense_max_n)
            too_big = num > limit or (impl == "dense" and len(measured) >= 2
                                      and _line_through(measured, "peak_extra_mb", num) > args.dense_max_gb * 1024)
            if too_big and (impl == "dense" or measured):
                memory, how = _predict_memory(args.head, impl, measured, num)
                timing = round(_line_through(measured, "time_s", num), 2) if len(measured) >= 2 else None
                row = {"head": args.head, "impl": impl, "n": num, "b_local": HEAD_SHAPES["batch"], "predicted": True,
                       "peak_extra_mb": round(memory, 1), "time_s": timing,
                       "prediction": f"memory: {how}; time: line through the two smallest measured N (None: fewer measured)"}
            else:
                row = _head_child(args.head, impl, num, args)
                if "error" not in row:
                    measured.append(row)
            results.append(row)
            print(json.dumps({"benchmark": "loss_memory_head", **row}), flush=True)
    _plot_heads(results, args.plot, args.head)
    print(json.dumps({"benchmark": "loss_memory_head", "head": args.head, "shapes": HEAD_SHAPES, "sizes": sizes,
                      "total_s": round(time.perf_counter() - start, 1)}))
    return 0


def _plot_heads(results: list[dict], path: Path, head: str) -> None:
    """One figure per head: memory and time against N, tiled and dense, predicted points hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (memory_ax, time_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for impl, colour in (("tiled", "tab:blue"), ("dense", "tab:red")):
        rows = sorted((r for r in results if r["impl"] == impl and "error" not in r), key=lambda r: r["n"])
        if not rows:
            continue
        for ax, key, scale in ((memory_ax, "peak_extra_mb", 1 / 1024), (time_ax, "time_s", 1.0)):
            shown = [r for r in rows if r.get(key) is not None]
            ax.plot([r["n"] for r in shown], [r[key] * scale for r in shown], color=colour, label=impl)
            for r in shown:
                ax.plot(r["n"], r[key] * scale, "o", color=colour, fillstyle="none" if r.get("predicted") else "full")
    memory_ax.axhline(4.0, color="grey", linestyle=":", label="4 GB target")
    for ax, ylabel in ((memory_ax, "peak extra memory (GiB)"), (time_ax, "forward + backward (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"global texts N (B_local = {HEAD_SHAPES['batch']}, P = 196, E = 512, CPU)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{head} loss, one rank: filled = measured, hollow = predicted")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="comma-separated N")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3, help="repetitions (min time) for N <= --reps-below")
    parser.add_argument("--reps-below", type=int, default=8192)
    parser.add_argument("--tile-size", type=int, default=None, help="force our tile size (default: auto)")
    parser.add_argument("--open-clip-max-n", type=int, default=16384)
    parser.add_argument("--open-clip-max-gb", type=float, default=12.0, help="skip open_clip above this prediction")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "loss_memory.png")
    parser.add_argument("--head", choices=("flair", "filip", "ct_align"), help="measure a fine-grained head instead")
    parser.add_argument("--measure-max-n", type=int, default=16384, help="--head: predict above this N")
    parser.add_argument("--dense-max-n", type=int, default=1 << 40, help="--head: predict dense above this N")
    parser.add_argument("--dense-max-gb", type=float, default=12.0, help="--head: predict dense above this peak")
    parser.add_argument("--batch", type=int, default=HEAD_SHAPES["batch"],
                        help="--head: B_local (smaller than 256 only to time filip's dense path on a CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (the CLIP loss cases; --head is CPU only)")
    parser.add_argument("--child", choices=("ours", "open_clip", "tiled", "dense"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    HEAD_SHAPES["batch"] = args.batch
    if args.head:
        if args.plot == ROOT / "docs" / "img" / "loss_memory.png":
            args.plot = ROOT / "docs" / "img" / f"loss_memory_{args.head}.png"
        if args.child:
            print(json.dumps(run_head_case(args.head, args.child, sizes[0], args.threads, args.tile_size, args.reps)))
            return 0
        return head_sweep(args, sizes)

    if args.child:
        print(json.dumps(run_case(args.child, sizes[0], args.dim, args.threads, args.reps, args.tile_size, args.device)))
        return 0

    results, skipped = [], []
    start = time.perf_counter()
    for num in sizes:
        predicted_gb = DENSE_COPIES * num * num * 4 / 2**30
        impls = ["ours"]
        if num <= args.open_clip_max_n and predicted_gb <= args.open_clip_max_gb:
            impls.append("open_clip")
        else:
            skipped.append({"impl": "open_clip", "n": num, "predicted_gb": round(predicted_gb, 1)})
        for impl in impls:
            results.append(_child(impl, num, args))
            print(f"# {results[-1]}", file=sys.stderr, flush=True)
    try:
        _plot(results, args.plot)
    except ImportError:  # a GPU machine without matplotlib: the numbers are the result
        args.plot = Path("not written (no matplotlib)")
    print(json.dumps({
        "benchmark": "loss_memory",
        "dim": args.dim,
        "threads": args.threads,
        "device": args.device,
        "memory": ("peak RSS above the inputs' baseline" if args.device == "cpu" else "max_memory_allocated above the inputs")
        + ", fresh subprocess per case",
        "results": results,
        "skipped": skipped,
        "targets": _targets(results),
        "plot": str(args.plot.relative_to(ROOT)) if args.plot.is_relative_to(ROOT) else str(args.plot),
        "total_s": round(time.perf_counter() - start, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
