"""Where a training step's time goes: vlp's DeepSpeed engine vs a bare loop, same model, in memory.

No data loading: both arms run the demo model (configs/demo.yaml) on one fixed in-memory batch,
one process, and time forward, backward and optimizer step separately (median ms over the steps
after a warm-up). `throughput.py` measures the whole pipeline; this isolates the engine's share.

    python benchmarks/engine_step.py --steps 40 [train.compile=true | train.channels_last=true ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# One rank without a launcher: DeepSpeed reads these instead of probing MPI.
for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
    os.environ.setdefault(key, value)
os.environ.setdefault("MASTER_PORT", "29541")

import torch  # noqa: E402

from vlp.models.dual_encoder import VLPModel  # noqa: E402
from vlp.train.config import load_config  # noqa: E402
from vlp.train.trainer import build_engine, build_optimizer, clip_gradients  # noqa: E402

WARMUP = 5


def median_ms(times: list[float]) -> float:
    return round(1000 * statistics.median(times[WARMUP:]), 1)


def time_steps(forward, backward, step, steps: int) -> dict[str, float]:
    parts: dict[str, list[float]] = {"forward": [], "backward": [], "step": []}
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = forward()
        t1 = time.perf_counter()
        backward(loss)
        t2 = time.perf_counter()
        step()
        t3 = time.perf_counter()
        parts["forward"].append(t1 - t0)
        parts["backward"].append(t2 - t1)
        parts["step"].append(t3 - t2)
    out = {f"{k}_ms": median_ms(v) for k, v in parts.items()}
    out["total_ms"] = round(sum(out.values()), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for the engine arm's config, e.g. "
                        "train.compile=true or train.channels_last=true (the bare arm stays eager)")
    args = parser.parse_args()
    config = load_config(ROOT / "configs" / "demo.yaml")
    engine_config = load_config(ROOT / "configs" / "demo.yaml", args.overrides)
    tr, b = config.train, config.train.batch_size
    batch = {"image": torch.randn(b, 3, config.model.image.image_size, config.model.image.image_size),
             "text": torch.randint(1, 49000, (b, config.model.text.context_length))}

    torch.manual_seed(0)
    model = VLPModel(config.model)
    opt = build_optimizer(model, tr)

    def bare_backward(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()

    def bare_step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.deepspeed.grad_clip)
        opt.step()

    bare = time_steps(lambda: model(batch)["loss"], bare_backward, bare_step, args.steps)

    torch.manual_seed(0)
    engine = build_engine(engine_config, VLPModel(engine_config.model))


    def engine_step() -> None:  # the trainer's own step: its clip (fp32, ZeRO 0), then DeepSpeed's step
        clip_gradients(engine, engine_config)
        engine.step()

    eng = time_steps(lambda: engine(batch)["loss"], engine.backward, engine_step, args.steps)

    print(json.dumps({"benchmark": "engine_step", "model": "configs/demo.yaml, batch 64, fp32, CPU",
                      "threads": torch.get_num_threads(), "steps": args.steps, "engine_overrides": args.overrides,
                      "bare": bare, "engine": eng,
                      "engine_over_bare": round(eng["total_ms"] / bare["total_ms"], 3)}))


if __name__ == "__main__":
    main()
