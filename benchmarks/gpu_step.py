"""vlp's training step against open_clip's own, same model shapes, GPU, batch and precision.

Four children, each in a fresh process (compile caches and allocator state stay apart):

* vlp eager / vlp compile: `configs/clip_vit_b16.yaml` (open_clip's ViT-B-16 shapes) through
  vlp's own path: `build_model`, `build_engine` (DeepSpeed, bf16, ZeRO 1, AdamW, grad clip 1.0),
  batches fed as `run_loop` feeds them (a `DeviceStream`, one batch copied ahead on a side stream,
  the compute dtype, `train.channels_last`), `engine(batch)`, `engine.backward`, `clip_gradients`,
  `engine.step`; compile is the config's `train.compile` (the towers compiled in place).
* open_clip eager / open_clip compile: `open_clip.CLIP` built from the same shapes (for ViT-B/16
  this is open_clip's `ViT-B-16`), fp32 weights under `torch.autocast(bfloat16)` (open_clip's
  `--precision amp_bf16`), `ClipLoss`, torch AdamW, grad clip 1.0 (`--grad-clip-norm 1.0`);
  compile is `torch.compile(model)` (open_clip's `--torchcompile`).

Both see the same random batch (images (B, 3, H, W) fp32, token ids (B, L)), so the input
pipeline is not measured (benchmarks/loader.py is): open_clip's lives on the device; vlp's sits in
pinned host memory and its DeviceStream copies it over again for every step, as in training, where
that copy overlaps the step in flight.
Step time: the median of the steps after the first third (warm-up and compilation excluded),
each bracketed by `torch.cuda.synchronize`. MFU: `models/flops.model_flops_per_sample` (towers
counted by FlopCounterMode, 3x forward, plus the logits) over `models/flops.peak_flops`.

    python benchmarks/gpu_step.py                                  # H200 etc.: ViT-B/16, B = 256
    python benchmarks/gpu_step.py --device cpu --quick             # smoke test: demo model, eager

Prints one JSON line: samples/s of each, vlp / open_clip per mode, MFU, peak memory. A child
that fails has its traceback echoed to stderr and its last line in the JSON ("error").
"""

from __future__ import annotations

import os

# Before torch is imported anywhere in this process: OpenMP reads it once, at load.
os.environ.setdefault("OMP_NUM_THREADS", "4")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODES = ("vlp-eager", "open_clip-eager", "vlp-compile", "open_clip-compile")


def experiment(args: argparse.Namespace, compile_towers: bool):
    from vlp.train.config import load_config

    overrides = [f"train.batch_size={args.batch}", f"train.compile={str(compile_towers).lower()}",
                 "train.warmup_steps=0", f"deepspeed.precision={args.precision}", "deepspeed.grad_clip=1.0"]
    return load_config(Path(args.config), overrides)


def open_clip_model(model_config):
    """open_clip's CLIP with the shapes of vlp's `model` section (open_clip_vit + open_clip_text)."""
    import open_clip

    image, text = model_config.image, model_config.text
    return open_clip.CLIP(
        embed_dim=model_config.embed_dim,
        vision_cfg={"image_size": image.image_size, "patch_size": image.patch_size, "width": image.width,
                    "layers": image.layers, "head_width": image.head_width},
        text_cfg={"context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width,
                  "heads": text.heads, "layers": text.layers},
        output_dict=True,
    )


def random_batch(config, batch: int, device) -> dict:
    import torch

    generator = torch.Generator(device=device).manual_seed(0)
    image = config.model.image
    text = config.model.text
    return {
        "image": torch.randn(batch, 3, image.image_size, image.image_size, device=device, generator=generator),
        "text": torch.randint(1, text.vocab_size - 1, (batch, text.context_length), device=device, generator=generator),
    }


class RepeatLoader:
    """The one host batch, endlessly, behind the `TrainLoader.iterate` interface DeviceStream reads."""

    def __init__(self, batch: dict) -> None:
        self.batch = batch

    def iterate(self, epoch: int, skip_batches: int = 0):
        while True:
            yield self.batch


def timed_steps(step, steps: int, device) -> float:
    """Median seconds of `step()` over the steps after the first third."""
    import torch

    timings = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    steady = sorted(timings[max(1, steps // 3):])
    return steady[len(steady) // 2]


def run_child(mode: str, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from vlp.models.flops import model_flops_per_sample, peak_flops

    library, kind = mode.split("-")
    compiled = kind == "compile"
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul, as vlp's train.tf32 default
    config = experiment(args, compiled and library == "vlp")
    batch = random_batch(config, args.batch, device)
    torch.manual_seed(0)

    if library == "vlp":
        from vlp.train.distributed import init_distributed
        from vlp.data_pipelines.device_stream import DeviceStream
        from vlp.train.checkpoint import TrainState
        from vlp.train.trainer import build_engine, build_model, clip_gradients, engine_dtype

        init_distributed()
        model = build_model(config)
        flops = model_flops_per_sample(model, args.batch)
        engine = build_engine(config, model)
        # The batch on the host (pinned on CUDA, as the DataLoader's pinning thread leaves it), fed
        # as run_loop feeds batches: copied one ahead, cast to the compute dtype, channels_last.
        host_batch = {key: value.cpu() for key, value in batch.items()}
        if device.type == "cuda":
            host_batch = {key: value.pin_memory() for key, value in host_batch.items()}
        stream = DeviceStream(RepeatLoader(host_batch), TrainState(), device, engine_dtype(config),
                              config.train.channels_last, lookahead=1)

        def step() -> None:
            out = engine(next(stream))
            engine.backward(out["loss"])
            clip_gradients(engine, config)
            engine.step()
    else:
        from open_clip.loss import ClipLoss

        from vlp.train.trainer import build_model

        flops = model_flops_per_sample(build_model(config), args.batch)  # the same shapes
        model = open_clip_model(config.model).to(device)
        tr = config.train
        optimizer = torch.optim.AdamW(model.parameters(), lr=tr.lr, betas=tr.betas, eps=tr.eps, weight_decay=tr.weight_decay)
        loss_fn = ClipLoss()
        forward = torch.compile(model) if compiled else model
        autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = forward(batch["image"], batch["text"])
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_s = timed_steps(step, args.steps, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    peak = peak_flops(device, dtype, args.peak_tflops)
    achieved = flops * args.batch / step_s
    return {
        "mode": mode,
        "step_s": round(step_s, 4),
        "samples_per_s": round(args.batch / step_s, 1),
        "tflops_per_s": round(achieved / 1e12, 3),
        "mfu": None if peak is None else round(achieved / peak, 4),
        "flops_per_sample": flops,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }


def spawn(mode: str, args: argparse.Namespace) -> dict:
    """One child; its stderr (a traceback included) is echoed, never swallowed."""
    command = [sys.executable, __file__, "--child", mode, "--device", args.device, "--batch", str(args.batch),
               "--steps", str(args.steps), "--config", str(args.config), "--precision", args.precision]
    if args.peak_tflops is not None:
        command += ["--peak-tflops", str(args.peak_tflops)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=args.child_timeout)
    except subprocess.TimeoutExpired as timeout:
        sys.stderr.write((timeout.stderr or b"").decode() if isinstance(timeout.stderr, bytes) else (timeout.stderr or ""))
        return {"mode": mode, "error": f"timed out after {args.child_timeout} s"}
    sys.stderr.write(done.stderr)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"mode": mode, "error": f"exit {done.returncode}: {last}"}
    return json.loads(lines[-1])


def ratio(rows: dict, kind: str) -> float | None:
    ours, theirs = rows.get(f"vlp-{kind}", {}), rows.get(f"open_clip-{kind}", {})
    if "samples_per_s" not in ours or "samples_per_s" not in theirs:
        return None
    return round(ours["samples_per_s"] / theirs["samples_per_s"], 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:i or cpu")
    parser.add_argument("--config", default=str(ROOT / "configs" / "clip_vit_b16.yaml"))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override models/flops' table")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--child-timeout", type=float, default=240.0, help="seconds per child")
    parser.add_argument("--quick", action="store_true", help="the demo model, batch 16, 6 steps, eager only")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.config, args.batch, args.steps = str(ROOT / "configs" / "demo.yaml"), 16, 6
        args.modes = "vlp-eager,open_clip-eager"
    if args.child:
        print(json.dumps(run_child(args.child, args)))
        return 0

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu_step", "error": "no CUDA device here (use --device cpu --quick)"}))
        return 2
    modes = [mode for mode in args.modes.split(",") if mode]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    start = time.perf_counter()
    rows = {}
    for mode in modes:
        rows[mode] = spawn(mode, args)
        print(f"# {json.dumps(rows[mode])}", file=sys.stderr, flush=True)
    ratios = {kind: ratio(rows, kind) for kind in ("eager", "compile")}
    best_vlp = max((row.get("mfu") or 0.0 for mode, row in rows.items() if mode.startswith("vlp")), default=0.0)
    print(json.dumps({
        "benchmark": "gpu_step",
        "device": torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu",
        "config": Path(args.config).name,
        "batch": args.batch,
        "precision": args.precision,
        "steps": args.steps,
        "results": rows,
        "vlp_over_open_clip": ratios,
        "targets": {
            "vlp_at_least_open_clip": None if all(r is None for r in ratios.values())
            else all(r >= 1.0 for r in ratios.values() if r is not None),
            "mfu_at_least_0.40": best_vlp >= 0.40 if best_vlp else None,
        },
        "total_s": round(time.perf_counter() - start, 1),
    }))
    return 0 if all("error" not in row for row in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
