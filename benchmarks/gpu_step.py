"""GPU training-step efficiency of a ViT-B/16 CLIP in bf16 through vlp's own engine path.

Model FLOPs utilisation (MFU) with FLOPs counted analytically (printed with the formula),
tokens/s and peak memory, with and without `torch.compile`. Needs a CUDA GPU; prints one JSON
line per mode and a summary line last.

    python benchmarks/gpu_step.py [--batch 256] [--steps 30] [--peak-tflops 989]

FLOPs per sample (2 FLOPs per multiply-add; training = 3 x forward):
  transformer layer over n tokens of width d with MLP ratio 4: 24 n d^2 + 4 n^2 d
  image: 12 layers, n = 197 (196 patches + cls), d = 768, plus patch embedding 2 n_p (3 p^2) d
  text: 12 layers, n = 77, d = 512 (the causal mask is not discounted)
  projections 2 (768 + 512) E, logits 2 x 2 B E per sample (both directions)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def layer_flops(n: int, d: int) -> float:
    return 24 * n * d * d + 4 * n * n * d


def clip_flops_per_sample(batch: int, embed: int = 512) -> float:
    image = 12 * layer_flops(197, 768) + 2 * 196 * (3 * 16 * 16) * 768
    text = 12 * layer_flops(77, 512)
    heads = 2 * (768 + 512) * embed + 4 * batch * embed
    return 3 * (image + text + heads)


def run(mode_compile: bool, batch: int, steps: int, peak: float) -> dict:
    from vlp.train.config import load_config
    from vlp.train.distributed import init_distributed
    from vlp.train.trainer import build_engine, build_model

    init_distributed()
    config = load_config(ROOT / "configs" / "clip_vit_b16.yaml",
                         [f"train.batch_size={batch}", f"train.compile={str(mode_compile).lower()}", "train.warmup_steps=0"])
    torch.manual_seed(0)
    engine = build_engine(config, build_model(config))
    device = torch.device("cuda")
    images = torch.randn(batch, 3, 224, 224, device=device, dtype=torch.bfloat16)
    text = torch.randint(1, 49407, (batch, 77), device=device)
    batch_dict = {"image": images, "text": text}
    torch.cuda.reset_peak_memory_stats()
    timings = []
    for step in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = engine(batch_dict)
        engine.backward(out["loss"])
        engine.step()
        torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    steady = sorted(timings[max(3, steps // 3):])  # drop warm-up / compile steps
    step_s = steady[len(steady) // 2]
    flops = clip_flops_per_sample(batch) * batch
    return {
        "compile": mode_compile,
        "batch": batch,
        "step_s": round(step_s, 4),
        "samples_per_s": round(batch / step_s, 1),
        "image_tokens_per_s": round(batch * 197 / step_s),
        "text_tokens_per_s": round(batch * 77 / step_s),
        "tflops_per_s": round(flops / step_s / 1e12, 1),
        "mfu": round(flops / step_s / (peak * 1e12), 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    parser.add_argument("--mode", choices=["eager", "compile", "both"], default="both")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu_step", "error": "no CUDA GPU on this machine"}))
        sys.exit(0)
    if args.mode == "both":  # each mode in a fresh process: compile caches and memory stay apart
        import subprocess

        rows = []
        for mode in ("eager", "compile"):
            proc = subprocess.run([sys.executable, __file__, "--mode", mode, "--batch", str(args.batch),
                                   "--steps", str(args.steps), "--peak-tflops", str(args.peak_tflops)],
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]))
        print(json.dumps({"benchmark": "gpu_step", "gpu": torch.cuda.get_device_name(), "peak_tflops": args.peak_tflops,
                          "flops_formula": "3 x (12(24 n d^2 + 4 n^2 d) image n=197 d=768 + patch embed + 12(...) text n=77 d=512 + heads)",
                          "eager": rows[0], "compile": rows[1],
                          "compile_speedup": round(rows[1]["samples_per_s"] / rows[0]["samples_per_s"], 3)}))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    print(json.dumps(run(args.mode == "compile", args.batch, args.steps, args.peak_tflops)))


if __name__ == "__main__":
    main()
