"""Step time of the volume tower's masked pass (MAE) against the full pass; one JSON line.

    python benchmarks/masked_volume_step.py [--batch 24] [--steps 10] [--threads 2]

Built from `configs/ct_lesions_mae.yaml` (32^3 volumes, 8^3 patches = 64 tokens, ViT width 128,
4 layers; masked_volume at mask ratio 0.75: 16 visible patches), forward + backward, no
optimizer step, on random volumes with keys (so masks are drawn as in training):

* `encoder_full_ms` / `encoder_masked_ms`: the tower alone, `forward` against `encode_visible`
  (the compute that falls with the mask ratio);
* `step_full_ms`: the ct_lesions model (ct_contrastive + ct_align, one full pass);
* `step_masked_only_ms`: masked_volume alone (the masked pass only: the model skips the full pass);
* `step_combined_ms`: ct_lesions_mae (both passes, what a step costs when the contrastive heads
  also need the unmasked encoding); `combined_over_full` = step_combined / step_full.

The text side is the configs' frozen MiniLM with its cache, warmed on the batch's reports first,
so text costs what it costs in training after the first epoch. Variants are timed round-robin
(one step each in turn) so that a shared, noisy machine slows them alike; medians are reported,
in wall time and, as `cpu_*`, in this process's CPU time (robust to other jobs; use --threads 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
REPORT = "A small nodule in the right anterior upper region. No cyst is seen. No pleural effusion. Nodule as described."


def build(heads: set[str]):
    """The ct_lesions_mae model with only `heads` (ct_lesions itself is the first two)."""
    import yaml

    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    tree = yaml.safe_load((ROOT / "configs" / "ct_lesions_mae.yaml").read_text())
    tree["model"]["heads"] = {name: cfg for name, cfg in tree["model"]["heads"].items() if name in heads}
    tree["evals"] = []
    torch.manual_seed(0)
    return VLPModel(load_config(tree=tree).model).train()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    models = {
        "step_full": build({"ct_contrastive", "ct_align"}),
        "step_masked_only": build({"masked_volume"}),
        "step_combined": build({"ct_contrastive", "ct_align", "masked_volume"}),
    }
    tokenizer = models["step_full"].text.tokenizer()
    roi = models["step_full"].image.config.roi
    generator = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(args.batch, 1, *roi, generator=generator).clamp(-1, 1),
        "text": tokenizer([REPORT] * args.batch),
        "sentences": tokenizer([s.strip() + "." for s in REPORT.split(".")[:4]] * args.batch + [""] * (2 * args.batch)
                               ).view(args.batch, 6, -1),
        "sentence_mask": torch.tensor([[True] * 4 + [False] * 2] * args.batch),
        "caption": [REPORT] * args.batch,
        "key": [f"sample{i:03d}" for i in range(args.batch)],
    }
    tower = models["step_combined"].image
    head = models["step_combined"].objective.heads["masked_volume"]
    visible = head.visible_patches(batch, tower.grid)  # (B, K)

    def encoder_full():
        out = tower(batch["image"])
        (out["image_embed"].sum() + out["image_tokens"].sum()).backward()

    def encoder_masked():
        tower.encode_visible(batch["image"], visible)["visible_image_tokens"].sum().backward()

    def step(model):
        return lambda: model(batch)["loss"].backward()

    runs = {"encoder_full": encoder_full, "encoder_masked": encoder_masked,
            **{name: step(model) for name, model in models.items()}}
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu_times: dict[str, list[float]] = {name: [] for name in runs}
    for index in range(args.warmup + args.steps):
        for name, run in runs.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if index >= args.warmup:
                times[name].append(elapsed * 1000)
                cpu_times[name].append(cpu * 1000)
    for model in models.values():
        model.zero_grad(set_to_none=True)
    median = {f"{name}_ms": round(statistics.median(values), 1) for name, values in times.items()}
    cpu = {name: statistics.median(values) for name, values in cpu_times.items()}
    patches = tower.config.grid[0] * tower.config.grid[1] * tower.config.grid[2]
    print(json.dumps({
        "benchmark": "masked_volume_step", "batch": args.batch, "threads": args.threads, "steps": args.steps,
        "mask_ratio": head.config.mask_ratio, "patches": patches, "visible": int(visible.shape[1]), **median,
        "encoder_masked_over_full": round(median["encoder_masked_ms"] / median["encoder_full_ms"], 3),
        "masked_only_over_full": round(median["step_masked_only_ms"] / median["step_full_ms"], 3),
        "combined_over_full": round(median["step_combined_ms"] / median["step_full_ms"], 3),
        # The same ratios in this process's CPU time: what other jobs on a shared machine do not
        # inflate (with --threads 1, the compute itself).
        "cpu_encoder_masked_over_full": round(cpu["encoder_masked"] / cpu["encoder_full"], 3),
        "cpu_masked_only_over_full": round(cpu["step_masked_only"] / cpu["step_full"], 3),
        "cpu_combined_over_full": round(cpu["step_combined"] / cpu["step_full"], 3),
        "cpu_step_full_ms": round(cpu["step_full"], 1), "cpu_step_combined_ms": round(cpu["step_combined"], 1),
    }))


if __name__ == "__main__":
    main()
