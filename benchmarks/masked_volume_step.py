"""Step time of the volume tower's masked pass (MAE) and of the SimCroP step against the full
pass; one JSON line.

    python benchmarks/masked_volume_step.py [--batch 24] [--steps 10] [--threads 2]
    python benchmarks/masked_volume_step.py --quick     # batch 8, 2 steps, 1 thread: well under a minute

Built from `configs/ct_simcrop.yaml` (32^3 volumes, 8^3 patches = 64 tokens, ViT width 128,
4 layers; masked_volume at mask ratio 0.75: 16 visible patches; masked_report at ratio 0.5 with
the cross-granularity fusion; its other heads are those of ct_lesions / ct_lesions_mae), forward
+ backward, no optimizer step, on random volumes with keys (so masks are drawn as in training):

* `encoder_full_ms` / `encoder_masked_ms`: the tower alone, `forward` against `encode_visible`
  (the compute that falls with the mask ratio);
* `step_full_ms`: the ct_lesions model (ct_contrastive + ct_align, one full pass);
* `step_masked_only_ms`: masked_volume alone (the masked pass only: the model skips the full pass);
* `step_combined_ms`: ct_lesions_mae (both passes, what a step costs when the contrastive heads
  also need the unmasked encoding); `combined_over_full` = step_combined / step_full;
* `step_simcrop_ms`: ct_simcrop (ct_lesions_mae + masked_report through the fusion, on the
  visible patch tokens); `simcrop_over_full` = step_simcrop / step_full (the target is <= 1.6).

The reports and sentences are ct-lesions' own (`lesion_sample`, the source's generator: about 60
tokens a report, as in training; the masked report head's cost grows with the report length).
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

import numpy as np
import torch

from vlp.data_pipelines.sources.ct_lesions import LesionOptions, lesion_sample

ROOT = Path(__file__).resolve().parents[1]


def build(heads: set[str], overrides: list[str]):
    """The ct_simcrop model with only `heads` (ct_lesions is the first two, ct_lesions_mae the first three)."""
    import yaml

    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    tree = yaml.safe_load((ROOT / "configs" / "ct_simcrop.yaml").read_text())
    tree["model"]["heads"] = {name: cfg for name, cfg in tree["model"]["heads"].items() if name in heads}
    tree["evals"] = []
    torch.manual_seed(0)

    def applies(item: str) -> bool:  # a head's override goes only to the models that hold that head
        key = item.split("=", 1)[0].split(".")
        return key[:2] != ["model", "heads"] or len(key) < 3 or key[2] in heads

    overrides = [item for item in overrides if applies(item)]
    return VLPModel(load_config(tree=tree, overrides=overrides).model).train()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="batch 8, 1 warmup + 2 timed steps, 1 thread")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. model.heads.masked_report.decoder_dim=32")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.steps, args.warmup, args.threads = 8, 2, 1, 1
    torch.set_num_threads(args.threads)

    models = {
        "step_full": build({"ct_contrastive", "ct_align"}, args.set),
        "step_masked_only": build({"masked_volume"}, args.set),
        "step_combined": build({"ct_contrastive", "ct_align", "masked_volume"}, args.set),
        "step_simcrop": build({"ct_contrastive", "ct_align", "masked_volume", "masked_report"}, args.set),
    }
    tokenizer = models["step_full"].text.tokenizer()
    roi = models["step_full"].image.config.roi
    generator = torch.Generator().manual_seed(0)
    drawn = [lesion_sample(np.random.default_rng([0, 0, i]), LesionOptions(size=roi[0], spacing=4.0))
             for i in range(args.batch)]
    reports = [sample["report"] for sample in drawn]
    sentences = [sample["sentences"][:6] for sample in drawn]
    batch = {
        "image": torch.randn(args.batch, 1, *roi, generator=generator).clamp(-1, 1),
        "text": tokenizer(reports),
        "sentences": tokenizer([s for row in sentences for s in row + [""] * (6 - len(row))]).view(args.batch, 6, -1),
        "sentence_mask": torch.tensor([[i < len(row) for i in range(6)] for row in sentences]),
        "caption": reports,
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
        "simcrop_over_full": round(median["step_simcrop_ms"] / median["step_full_ms"], 3),
        # The same ratios in this process's CPU time: what other jobs on a shared machine do not
        # inflate (with --threads 1, the compute itself).
        "cpu_encoder_masked_over_full": round(cpu["encoder_masked"] / cpu["encoder_full"], 3),
        "cpu_masked_only_over_full": round(cpu["step_masked_only"] / cpu["step_full"], 3),
        "cpu_combined_over_full": round(cpu["step_combined"] / cpu["step_full"], 3),
        "cpu_simcrop_over_full": round(cpu["step_simcrop"] / cpu["step_full"], 3),
        "cpu_step_full_ms": round(cpu["step_full"], 1), "cpu_step_combined_ms": round(cpu["step_combined"], 1),
        "cpu_step_simcrop_ms": round(cpu["step_simcrop"], 1),
    }))


if __name__ == "__main__":
    main()
