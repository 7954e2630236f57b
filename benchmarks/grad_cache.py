"""Peak memory and step time of cached accumulation (`train.accumulate: contrastive`) against
plain accumulation, the dense batch and open_clip's `--accum-freq`, on one model, CPU, fp32.

For each k (micro-batches per step) and each way of taking a step of k x b samples:

  cached     vlp's GradCache through the trainer's engine and `grad_cache.CachedAccumulation`
             (at k = 1 there is nothing to cache: the plain step, which is the dense batch)
  plain      DeepSpeed's accumulation, k micro-batches of b (each loss over b pairs only)
  dense      one micro-batch of k x b, no accumulation (what cached must equal)
  open_clip  open_clip_train.train.train_one_epoch itself, with args.accum_freq = k, its ClipLoss
             and a torch AdamW, on the same towers and logit scale (`OpenClipView`)

Each case runs in a fresh subprocess. Memory is the peak resident set of the timed steps above
the resident set before them (`loss_memory._reset_peak`, VmHWM), after one warm-up step, so the
weights, the optimizer state and the pre-built inputs are not counted; activations, gradients and
the cached embeddings are. Time is the median over the timed steps (2 by default). Targets: cached
peak within 1.2x of plain's (one micro-batch's activations) plus the cached embeddings and their
gradients; cached time within 1.4x of plain's.

    python benchmarks/grad_cache.py            # k = 1, 4, 16 on the default model (several minutes; run it alone)
    python benchmarks/grad_cache.py --quick    # a tiny model, k = 4 only, under a minute

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

MODES = ("cached", "plain", "dense", "open_clip")
# (image width, layers, text width, layers, embed_dim, image size, micro-batch b)
MODELS = {"default": (192, 4, 192, 4, 192, 64, 16), "quick": (32, 1, 32, 1, 32, 32, 8)}


def experiment_tree(model: str, k: int, mode: str) -> dict:
    import yaml

    image_width, image_layers, text_width, text_layers, embed_dim, image_size, micro = MODELS[model]
    tree = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    tree.update(name="grad_cache_bench", evals=[], export=[])
    tree["data"] = {"train": [{"urls": "unused-{000..001}.tar"}], "workers": 0}
    tree["model"]["embed_dim"] = embed_dim
    tree["model"]["image"].update(width=image_width, layers=image_layers, head_width=32, image_size=image_size,
                                  patch_size=8)
    tree["model"]["text"].update(width=text_width, layers=text_layers, heads=4, context_length=32)
    dense = mode == "dense"
    tree["train"].update(steps=1000, warmup_steps=0, batch_size=k * micro if dense else micro, fused_adamw=True,
                         accumulate="contrastive" if mode == "cached" else "plain")
    tree["deepspeed"] = {"zero_stage": 0, "precision": "fp32", "grad_clip": 1.0, "grad_accum": 1 if dense else k}
    return tree


def synthetic_batches(tokenizer, count: int, size: int, image_size: int) -> list[dict]:
    import torch

    generator = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(size, 3, image_size, image_size, generator=generator),
             "text": tokenizer([f"a photo of the digit {i % 10} number {i}" for i in range(size)])}
            for _ in range(count)]


class OpenClipView:
    """Our towers and clip head seen as open_clip's CLIP: `forward(images, texts)` returns
    {"image_features", "text_features", "logit_scale"} and the module holds `logit_scale` (which
    train_one_epoch clamps in place)."""

    @staticmethod
    def build(model):
        import torch.nn.functional as F
        from torch import nn

        class View(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model
                self.logit_scale = model.objective.heads["clip"].logit_scale

            def forward(self, images, texts):
                return {"image_features": F.normalize(self.model.image(images)["image_embed"], dim=-1),
                        "text_features": F.normalize(self.model.text(texts)["text_embed"], dim=-1),
                        "logit_scale": self.logit_scale.exp()}

        return View()


def run_case(model_name: str, k: int, mode: str, steps: int) -> dict:
    """One case in this process: build, reset the peak, one warm-up step and `steps` timed ones."""
    import os

    import torch
    import torch.distributed as dist
    from loss_memory import _peak_kib, _reset_peak

    from vlp.train.config import load_config
    from vlp.train.grad_cache import build_accumulation
    from vlp.train.trainer import build_engine, build_model, build_optimizer, clip_gradients

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("BENCH_PORT", "29561"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    config = load_config(tree=experiment_tree(model_name, k, mode))
    micro = MODELS[model_name][-1]
    torch.manual_seed(0)
    model = build_model(config)
    size = config.train.batch_size
    per_step = 1 if mode == "dense" else k
    batches = synthetic_batches(model.text.tokenizer(), per_step * (steps + 1), size, MODELS[model_name][5])
    times: list[float] = []

    if mode == "open_clip":
        from open_clip.loss import ClipLoss
        from open_clip_train.train import train_one_epoch

        view = OpenClipView.build(model).train()
        optimizer = build_optimizer(model, config.train)
        args = SimpleNamespace(device="cpu", precision="fp32", accum_freq=k, distill=False, skip_scheduler=True,
                               grad_clip_norm=config.deepspeed.grad_clip, horovod=False, log_every_n_steps=10**9,
                               batch_size=micro, world_size=1, rank=0, local_rank=0, wandb=False)

        def epoch(parts) -> None:
            data = {"train": SimpleNamespace(set_epoch=lambda epoch: None, dataloader=_Loader(parts, micro))}
            train_one_epoch(view, data, ClipLoss(), 0, optimizer, None, None, None, args)

        pairs = [(batch["image"], batch["text"]) for batch in batches]
        epoch(pairs[:k])  # warm-up step
        _reset_peak()
        base = _peak_kib()[0]
        for step in range(1, steps + 1):
            started = time.perf_counter()
            epoch(pairs[step * k:(step + 1) * k])
            times.append(time.perf_counter() - started)
    else:
        engine = build_engine(config, model)
        accumulation = build_accumulation(engine, config.train.accumulate, torch.device("cpu"), is_main=False)
        stream = iter(batches)

        iterations = engine.gradient_accumulation_steps() // accumulation.micro_batches  # plain: k, cached: 1

        def step() -> None:
            for _ in range(iterations):
                out = accumulation.forward(lambda: next(stream))
                accumulation.backward_and_step(out, lambda: clip_gradients(engine, config))

        step()  # warm-up step
        _reset_peak()
        base = _peak_kib()[0]
        for _ in range(steps):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        assert engine.global_steps == steps + 1, engine.global_steps
    peak = _peak_kib()[0]
    embed = config.model.embed_dim
    # Cached: the two embeddings of the k - 1 cached micro-batches (fp32 here), the leaves'
    # gradients and their fp32 copies split per micro-batch: three copies.
    cached_mb = 2 * (k - 1) * micro * embed * 4 * 3 / 2**20 if mode == "cached" and k > 1 else 0.0
    return {"mode": mode, "k": k, "micro_batch": micro, "step_s": statistics.median(times),
            "peak_extra_mb": (peak - base) / 1024, "cached_embeddings_mb": cached_mb}


class _Loader:
    """What train_one_epoch reads of open_clip's DataInfo.dataloader: iteration over (images,
    texts), num_batches, num_samples."""

    def __init__(self, pairs: list, micro: int) -> None:
        self.pairs, self.num_batches, self.num_samples = pairs, len(pairs), len(pairs) * micro

    def __iter__(self):
        return iter(self.pairs)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, k = 4, 2 timed steps")
    parser.add_argument("--ks", default=None, help="comma-separated k (default 1,4,16; quick 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 2)")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "K", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    model_name = "quick" if args.quick else "default"
    steps = args.steps or 2
    if args.child:
        name, k, mode = args.child
        print(json.dumps(run_case(name, int(k), mode, steps)))
        return

    import os

    ks = [int(k) for k in (args.ks or ("4" if args.quick else "1,4,16")).split(",")]
    cases = []
    for k in ks:
        for mode in MODES:
            if k == 1 and mode != "cached":
                continue  # at k = 1 every way is the dense step of b
            env = dict(os.environ, BENCH_PORT=str(free_port()))
            child = [sys.executable, __file__, "--child", model_name, str(k), mode, "--steps", str(steps)]
            proc = subprocess.run(child, capture_output=True, text=True, env=env, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(f"case k={k} {mode} failed:\n{proc.stderr[-3000:]}")
            cases.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    by = {(case["k"], case["mode"]): case for case in cases}
    summary = {}
    for k in ks:
        if k == 1:
            continue
        cached, plain = by[(k, "cached")], by[(k, "plain")]
        memory_budget = 1.2 * (plain["peak_extra_mb"] + cached["cached_embeddings_mb"])
        summary[f"k{k}"] = {
            "time_vs_plain": cached["step_s"] / plain["step_s"],
            "time_vs_dense": cached["step_s"] / by[(k, "dense")]["step_s"],
            "time_vs_open_clip": cached["step_s"] / by[(k, "open_clip")]["step_s"],
            "memory_vs_plain": cached["peak_extra_mb"] / max(plain["peak_extra_mb"], 1e-9),
            "memory_vs_dense": cached["peak_extra_mb"] / max(by[(k, "dense")]["peak_extra_mb"], 1e-9),
            "memory_vs_open_clip": cached["peak_extra_mb"] / max(by[(k, "open_clip")]["peak_extra_mb"], 1e-9),
            "memory_target_met": cached["peak_extra_mb"] <= memory_budget,
            "time_target_met": cached["step_s"] <= 1.4 * plain["step_s"],
        }
    print(json.dumps({"benchmark": "grad_cache", "model": model_name, "model_shape": MODELS[model_name],
                      "steps": steps, "cases": cases, "summary": summary}))


if __name__ == "__main__":
    main()
