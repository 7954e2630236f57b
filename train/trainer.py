"""`vlp train`: one run on the DeepSpeed engine, from one CPU process to many GPU nodes.

`train()` reads like the algorithm: set up, resume, then step / log / checkpoint / evaluate
until done or asked to stop. Each part (Checkpointer, MetricsLogger, evaluators, loader) is a
small object of its own.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from vlp.core.collectives import all_reduce_max, barrier
from vlp.core.devices import apply_tf32, current_compute_device
from vlp.core.files import atomic_write
from vlp.core.errors import RunExists  # noqa: F401 (raised here, imported from here)
from vlp.data_pipelines.device_stream import DeviceStream
from vlp.data_pipelines.loader import TrainLoader
from vlp.data_pipelines.gpu_decode import GpuJpegDecode
from vlp.models.dual_encoder import VLPModel
from vlp.train import preemption
from vlp.train.checkpoint import Checkpointer, TrainState, resolve_checkpoint
from vlp.train.checkpoint_io import Reshard
from vlp.train.config import ExperimentConfig, TrainConfig, dump_config
from vlp.train.data import ensure_eval_data, ensure_train_data
from vlp.train.distributed import DistEnv, init_distributed
from vlp.train.engine import Engine
from vlp.train.evals import Evaluator
from vlp.train.frozen import attach_frozen_models
from vlp.train.grad_cache import build_accumulation
from vlp.train.metrics import MetricsLogger, plot_loss_curves
from vlp.train.monitors import BadSampleTally, NonFiniteGuard, StepTelemetry, ThroughputMeter
from vlp.train.schedule import itstime, lr_multiplier


def claim_run_dir(run_dir: Path, resume: str | None, overwrite: bool, is_main: bool) -> None:
    """A fresh run never mixes with an earlier run in the same folder: its checkpoints would be
    taken for this run's (a stale `step_N` at the final step) and its metrics appended to."""
    earlier = [name for name in ("checkpoints", "metrics.jsonl", "results.json") if (run_dir / name).exists()]
    if resume is not None or not earlier:
        return
    if not overwrite:
        raise RunExists(f"{run_dir} already holds a run ({earlier[0]}): --resume latest continues it, "
                        f"--overwrite replaces it, or pick another name=...")
    if is_main:
        import shutil

        shutil.rmtree(run_dir)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def deepspeed_config(config: ExperimentConfig, load_universal: bool = False,
                     device: torch.device | None = None) -> dict[str, Any]:
    """`load_universal`: the resume reads a universal checkpoint (another data-parallel world
    size than it was saved on, `checkpoint_io.Reshard`); DeepSpeed takes that at initialize.
    `device`: the rank's compute device (default: the one `init_distributed` chose), which sets
    the ZeRO defaults that only pay on GPUs."""
    ds, tr = config.deepspeed, config.train
    device = device if device is not None else current_compute_device()
    universal = {"checkpoint": {**ds.extra.get("checkpoint", {}), "load_universal": True}} if load_universal else {}
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage > 0:
        # The reduce-scatter of one bucket overlaps the backward of the next on a side stream;
        # the CPU accelerator has no streams, so there it would only add a second bucket buffer.
        zero["overlap_comm"] = ds.overlap_comm if ds.overlap_comm is not None else device.type == "cuda"
        zero.update({key: getattr(ds, key) for key in ("reduce_bucket_size", "allgather_bucket_size")
                     if getattr(ds, key) is not None})
    zero.update(ds.extra.get("zero_optimization", {}))  # offload and other DeepSpeed-only settings
    reduce_in_fp32: dict[str, Any] = {}
    if ds.fp32_grad_reduce:
        reduce_in_fp32["communication_data_type"] = "fp32"
        if ds.precision == "bf16" and ds.zero_stage == 1:  # DeepSpeed's BF16 optimizer: fp32 accumulators
            reduce_in_fp32["data_types"] = {**ds.extra.get("data_types", {}), "grad_accum_dtype": "fp32"}
    return {
        "train_micro_batch_size_per_gpu": tr.batch_size,
        "gradient_accumulation_steps": ds.grad_accum,
        # fp32 at ZeRO 0: the trainer clips (`clip_gradients`); DeepSpeed's own clip there takes
        # a Python loop of per-parameter norms plus an all-reduce, about 5% of the demo's step.
        "gradient_clipping": 0.0 if trainer_clips(config) else ds.grad_clip,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        **ds.extra,
        "zero_optimization": zero,
        **reduce_in_fp32,
        **universal,
    }


def trainer_clips(config: ExperimentConfig) -> bool:
    """True where the trainer clips gradients itself: fp32 without ZeRO, where DeepSpeed's
    optimizer is the plain torch one and the gradients sit unflattened on the module. Under
    ZeRO or bf16/fp16, DeepSpeed's optimizer wrapper owns the (flat) gradients and clips them."""
    ds = config.deepspeed
    return ds.grad_clip > 0 and ds.zero_stage == 0 and ds.precision == "fp32"


def clip_gradients(engine: Engine, config: ExperimentConfig) -> Optional[torch.Tensor]:
    """Clip at the accumulation boundary (after the all-reduce) with torch's foreach kernels;
    returns the total gradient norm as a 0-dim tensor (no host sync), or None where DeepSpeed clips."""
    if not trainer_clips(config) or not engine.is_gradient_accumulation_boundary():
        return None
    return torch.nn.utils.clip_grad_norm_(engine.module.parameters(), config.deepspeed.grad_clip, foreach=True)


def build_optimizer(model: VLPModel, tr: TrainConfig) -> torch.optim.AdamW:
    """A torch AdamW (no fused_adam JIT build) over the model's parameter groups. The one place
    the learning rate is set: each group's lr is `train.lr` times the group's `lr_scale` (1 unless
    `train.layer_decay`), and the schedule's multiplier scales every group alike.

    Locked parameters (requires_grad false) are in no group: no gradient, no optimizer state,
    under every ZeRO stage."""
    groups = [{**group, "lr": tr.lr * group["lr_scale"]} for group in model.param_groups(tr.weight_decay, tr.layer_decay)]
    return torch.optim.AdamW(groups, betas=tr.betas, eps=tr.eps, fused=tr.fused_adamw)


def build_engine(config: ExperimentConfig, model: VLPModel, load_universal: bool = False) -> Engine:
    """Wrap the model and `build_optimizer`'s AdamW in `deepspeed.initialize`."""
    import deepspeed

    tr = config.train
    optimizer = build_optimizer(model, tr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, tr))
    if config.deepspeed.zero_stage == 3 and any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules()):
        # nn.MultiheadAttention reads out_proj's weight and bias without calling out_proj, so the
        # per-module hooks of ZeRO-3 never gather them ("mat2 must be a matrix" once they are
        # partitioned: weights above DeepSpeed's persistence threshold, in training and eval
        # alike). As leaves, each attention module gathers all its parameters, its children's
        # included, when it runs.
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [torch.nn.MultiheadAttention])
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=deepspeed_config(config, load_universal)
    )
    if tr.channels_last:
        # After initialize: DeepSpeed's parameter broadcast views each parameter as bytes, which
        # needs contiguous memory. `.to` swaps each parameter's data in place, so the optimizer
        # keeps the same tensors (config validation allows this at ZeRO 0 only).
        model.to(memory_format=torch.channels_last)
    if engine.dp_world_size == 1 and config.deepspeed.zero_stage == 0:
        # One data-parallel rank: nothing to all-reduce, but the engine would still flatten every
        # gradient into a bucket and copy it back each step (about 5 of 120 ms on the demo model).
        engine.enable_backward_allreduce = False
    if tr.compile:
        # The towers in place (parameter names and checkpoints unchanged); see TrainConfig.compile.
        model.image.compile()
        model.text.compile()
    return engine


def engine_dtype(config: ExperimentConfig) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config.deepspeed.precision]


def build_model(config: ExperimentConfig) -> VLPModel:
    model = VLPModel(config.model)
    if config.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    # A distill teacher or a compat old model: loaded frozen, kept outside the module tree, so the
    # engine neither partitions nor optimizes it (before build_engine; no-op without such heads).
    attach_frozen_models(model)
    return model


def build_loader(config: ExperimentConfig, model: VLPModel, env: DistEnv) -> TrainLoader:
    from vlp.data_pipelines.loader import build_train_loader

    return build_train_loader(
        config.data,
        preprocess=model.image.preprocess(train=True),
        tokenizer=model.text.tokenizer(),
        batch_size=config.train.batch_size,
        rank=env.rank,
        world_size=env.world_size,
        seed=config.seed,
    )


def build_evaluators(config: ExperimentConfig) -> list[Evaluator]:
    from vlp.train.evals import EVALUATORS

    return [EVALUATORS.get(ev.type)(ev) for ev in config.evals]


def run_evaluators(evaluators: list[Evaluator], engine: Engine, env: DistEnv, run_dir: Path, step: int, final: bool) -> dict:
    from vlp.train.evals import EvalContext

    results: dict[str, float] = {}
    due = [ev for ev in evaluators if final or itstime(step, ev.config.every)]
    if not due:
        return results
    # Eval mode, no autograd and the model's mode restored after are the harness's (evals/harness.py).
    model = engine.module
    context = EvalContext(
        rank=env.rank, world_size=env.world_size, device=env.device, dtype=next(model.parameters()).dtype,
        out_dir=run_dir / "plots" if env.is_main else None, step=step,
    )
    with whole_weights(engine):
        for evaluator in due:
            results.update(evaluator.run(model, context))
    return results


@contextlib.contextmanager
def whole_weights(engine: Engine) -> Iterator[None]:
    """Under ZeRO-3, every weight gathered once on every rank, with the engine's per-module hooks
    lifted, for as long as the evaluators run (DeepSpeed's `unwrap_model_for_generation`).

    Evaluators call towers and heads outside the engine's forward (`encode_image`, a head's
    `patch_map` or `lift_text`), and ZeRO-3's hooks gather a weight only around its own module's
    call: a head's scalars read in `reduce`, or a rank that runs out of eval batches while another
    still calls a head, would fail or hang. The cost is one full copy of the weights per rank
    during evaluation (bf16 ViT-B/16 CLIP: 0.3 GB). The harness's lockstep stays, for the
    collectives the evaluators run themselves."""
    if engine.zero_optimization_stage() != 3:
        yield
        return
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    with unwrap_model_for_generation(engine):
        yield


def train(config: ExperimentConfig, resume: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train one run to `config.train.steps`; returns the final evaluation results.

    `resume`: "latest" or a checkpoint path; `overwrite`: delete an earlier run in the same run
    folder first (without it, a fresh run into a used folder is refused)."""
    preemption.install_handlers()  # first: a USR1 during set-up must not kill the job unsaved
    run_dir = config.run_dir
    # Before init_distributed, so every rank decides alike; the rank as launchers or srun set it.
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    claim_run_dir(run_dir, resume, overwrite, rank == 0)
    env = init_distributed(config.train.dist_timeout_s, config.train.device)
    apply_tf32(config.train.tf32, env.device)
    if config.data.decode == "gpu" and env.device.type != "cuda":
        from vlp.train.config import ConfigError

        # Decoding on the CPU in the main process would only be slower than the workers' PIL path.
        raise ConfigError(f"data.decode: gpu needs a CUDA device (this run trains on {env.device.type}); "
                          f"set data.decode: cpu")
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(config))
    ensure_train_data(config.data, env.is_main)
    ensure_eval_data(config.evals, config.data, env.is_main)
    barrier()

    seed_everything(config.seed)  # same initial weights on every rank
    model = build_model(config)
    if config.train.init_from:
        from vlp.train.init_from import init_from, will_resume

        if not will_resume(run_dir, resume):  # weights only; a checkpoint to resume wins
            init_from(model, config.train.init_from, config.train.init_strict)
    # Before the engine: a ZeRO checkpoint partitioned over another data-parallel world size is
    # converted to DeepSpeed's universal layout, which the engine must be built to read.
    where = resolve_checkpoint(run_dir / "checkpoints", resume) if resume else None
    resharded = Reshard.plan(where, env.world_size, env.rank) if where is not None else None
    telemetry = StepTelemetry(config, model, env)  # counts FLOPs on the model before ZeRO-3 splits it
    engine = build_engine(config, model, load_universal=resharded is not None)
    loader = build_loader(config, model, env)
    checkpointer = Checkpointer(run_dir / "checkpoints", config.train.keep_checkpoints, env.rank, loader=loader)
    evaluators = build_evaluators(config)
    state = TrainState()
    if where is not None:
        checkpointer.load(engine, state, where, universal=resharded.folder if resharded else None)
    else:
        seed_everything(config.seed + 1000 * env.rank)
    metrics = MetricsLogger(run_dir, env.is_main, config.train.steps, start_step=state.step,
                            report_to=tuple(config.logging.report_to), wandb_config=config.logging.wandb,
                            run_config=config.model_dump(mode="json"))
    if resharded is not None:  # resumed on another data-parallel world size: ZeRO re-partitioned
        if env.is_main:
            print(f"[vlp] {resharded.note()['message']}", flush=True)
        metrics.log(state.step, resharded.note())
    if loader.resume_note is not None:  # resumed on another layout: the data order changed
        metrics.log(state.step, loader.resume_note)
    from vlp.data_pipelines.bad_samples import BadSampleMonitor

    bad_samples = BadSampleTally(BadSampleMonitor.from_config(config.data))
    results = run_loop(config, env, engine, loader, state, checkpointer, metrics, evaluators, bad_samples, telemetry)
    metrics.close()
    return results


def run_loop(
    config: ExperimentConfig, env: DistEnv, engine: Any, loader: Any, state: TrainState, checkpointer: Checkpointer,
    metrics: MetricsLogger, evaluators: list, bad_samples: BadSampleTally, telemetry: StepTelemetry,
) -> dict[str, Any]:
    """Step / log / checkpoint / evaluate from `state` to `train.steps`, or until a signal."""
    tr = config.train
    dtype = engine_dtype(config)
    global_batch = tr.batch_size * env.world_size
    # Batches arrive on the device one ahead of the step (a side-stream copy on CUDA); the data
    # position is committed when the loop takes a batch, so checkpoints stay exact.
    decode = GpuJpegDecode(engine.module.image.input_shape()[-1], env.device) if config.data.decode == "gpu" else None
    stream = DeviceStream(loader, state, env.device, dtype, tr.channels_last, lookahead=1,
                          host_stage=bad_samples.take, device_stage=decode)
    throughput = ThroughputMeter()
    # fp16: DeepSpeed's loss scaler skips overflowing steps itself, so the flag is read at log time.
    nonfinite = NonFiniteGuard(tr.max_nonfinite_steps, state, metrics.log, checkpointer.latest_tag,
                               deferred=config.deepspeed.precision == "fp16")
    # Plain: one micro-batch per iteration. Contrastive: the step's grad_accum micro-batches per
    # iteration, the loss over all of them, so a stop signal is only read at a step's end.
    accumulation = build_accumulation(engine, tr.accumulate, env.device, env.is_main)
    results: dict[str, Any] = {}
    stop_reason = None
    while state.step < tr.steps:
        out = accumulation.forward(lambda: throughput.next_batch(stream))
        if nonfinite.skip(out):  # contrastive: the whole accumulated step, known before any backward
            continue
        grad_norm = accumulation.backward_and_step(out, lambda: clip_gradients(engine, config))
        throughput.add(global_batch * accumulation.micro_batches)
        if not engine.is_gradient_accumulation_boundary() and engine.global_steps == state.step:
            continue
        state.step = engine.global_steps
        state.samples_seen += global_batch * config.deepspeed.grad_accum
        nonfinite.stepped()

        log_now = itstime(state.step, tr.log_every, tr.steps)
        checkpoint_now = itstime(state.step, tr.checkpoint_every, tr.steps)
        if log_now or checkpoint_now:
            nonfinite.settle()
        if log_now:
            logged = step_metrics(out, grad_norm, engine, state, throughput, bad_samples)
            logged.update(telemetry.window(throughput))
            metrics.log(state.step, logged)
            throughput.restart()
        if checkpoint_now:
            checkpointer.save(engine, state)
        eval_results = run_evaluators(evaluators, engine, env, config.run_dir, state.step, final=state.step == tr.steps)
        if eval_results:
            metrics.log(state.step, {f"eval/{k}": v for k, v in eval_results.items()})
            results.update(eval_results)
        # Every rank takes the same decision: the strongest signal any rank saw (TERM over USR1).
        # A host sync, so read at log and checkpoint steps only (Slurm's USR1 comes minutes ahead).
        if log_now or checkpoint_now:
            signalled = preemption.reason_from_flag(int(all_reduce_max(preemption.stop_flag())))
            if signalled is not None and state.step < tr.steps:
                stop_reason = signalled
                break
    # The data workers stop here, not at some later garbage collection, and leave the CPU to the
    # final checkpoint and export.
    stream.close()
    loader.close()

    if stop_reason is not None:
        checkpointer.save(engine, state)
        if env.is_main:
            requeued = preemption.requeue() if stop_reason == "USR1" else False
            print(f"[vlp] stopped at step {state.step} on {stop_reason}; checkpoint written"
                  f"{', job requeued' if requeued else ''}", flush=True)
        raise SystemExit(0 if stop_reason == "USR1" else 143)

    if checkpointer.latest_tag() != checkpointer.tag(state.step):
        checkpointer.save(engine, state)
    if env.is_main:
        finish_run(config, engine, results, state)
    barrier()
    return results


def step_metrics(out: dict[str, Any], grad_norm: Optional[torch.Tensor], engine: Engine, state: TrainState,
                 throughput: ThroughputMeter, bad_samples: BadSampleTally) -> dict[str, Any]:
    """One log line: the model's own logging, then the optimizer's and the data's bookkeeping."""
    logged = dict(out["logging"])
    if grad_norm is not None:
        logged["grad_norm"] = float(grad_norm)  # before clipping
    logged.update(lr=engine.get_lr()[0], samples_per_s=throughput.rate(),
                  samples_seen=state.samples_seen, epoch=state.epoch)
    logged.update(bad_samples.flush())
    return logged


def exports_from_checkpoint(config: ExperimentConfig) -> bool:
    """True where the live module is not the weights to export, so `finish_run` exports the final
    checkpoint's fp32 merge (DeepSpeed's zero_to_fp32) instead: under ZeRO-3 each rank holds a
    slice of every weight; under bf16/fp16 with ZeRO 1-2 the module holds the 16-bit copy of the
    fp32 master weights the optimizer updates. (bf16 at ZeRO 0 has no fp32 master: DeepSpeed
    steps the bf16 parameters themselves, so the module is what there is.)"""
    ds = config.deepspeed
    return ds.zero_stage == 3 or (ds.zero_stage > 0 and ds.precision != "fp32")


def finish_run(config: ExperimentConfig, engine: Engine, results: dict, state: TrainState) -> None:
    """Rank 0, after the final checkpoint: loss-curve PNG, exports, results.json (written last,
    atomically, so its presence means the run finished)."""
    run_dir = config.run_dir
    plot_loss_curves(run_dir / "metrics.jsonl", run_dir / "plots" / "loss.png")
    summary = {"name": config.name, "steps": state.step, "samples_seen": state.samples_seen, **results}
    if config.export:
        from vlp.export import export_model
        from vlp.train.weights import load_model

        model = load_model(run_dir)[0] if exports_from_checkpoint(config) else engine.module
        for fmt in config.export:
            export_model(model, config, run_dir / "export" / fmt, fmt, results=results, samples_seen=state.samples_seen)
    atomic_write(run_dir / "results.json", json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                                                       for k, v in summary.items()}, indent=1))
