"""`vlp`: the command line, the top layer (it imports training and Slurm submission).

Exit codes: 0 success; 2 bad input, a `vlp.core.errors.VlpInputError` (config, paths, data,
registry names), shown as one line; 1 otherwise: a run stopped on purpose or a lost rank (one
line), anything else a bug shown with its traceback, which also lands in the run folder's
`errors.log` where the run folder exists."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import yaml

from vlp.core.config import parse_command_line
from vlp.core.errors import ConfigError, VlpInputError
from vlp.curate import commands as curate_commands
from vlp.train import segment_cli
from vlp.slurm import status, submit

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GRACE_S = 10  # seconds ranks get after SIGTERM before SIGKILL when a sibling rank died


def parse_options(items: list[str]) -> dict:
    """`key=value` pairs (values parsed as YAML scalars) for sources and evaluators."""
    options = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"option {item!r}: expected key=value")
        options[key] = yaml.safe_load(raw)
    return options


# ---------------------------------------------------------------- train
def launch_local_ranks(args: argparse.Namespace) -> int:
    """Start `--nproc` local ranks of this same command; if one fails, stop the others."""
    from vlp.train.distributed import free_port

    port = str(free_port())
    argv = [sys.executable, "-m", "vlp.cli", "train", args.config, *args.overrides]
    if args.resume:
        argv += ["--resume", args.resume]
    if args.overwrite:
        argv += ["--overwrite"]
    procs = []
    for rank in range(args.nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.nproc),
                   LOCAL_WORLD_SIZE=str(args.nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        procs.append(subprocess.Popen(argv, env=env))
    code = 0
    killed_at = None
    try:
        while procs:
            for proc in list(procs):
                ret = proc.poll()
                if ret is None:
                    continue
                procs.remove(proc)
                if ret != 0 and code == 0:
                    # A dead rank leaves the others blocked in a collective: stop them now
                    # (SIGTERM, then SIGKILL after a grace period) instead of waiting for a timeout.
                    code = ret
                    killed_at = time.time()
                    print(f"vlp: a rank exited with code {ret}; stopping the other ranks", file=sys.stderr)
                    for other in procs:
                        other.send_signal(signal.SIGTERM)
            if killed_at is not None and time.time() - killed_at > GRACE_S:
                for other in procs:
                    other.kill()
            time.sleep(0.2)
    except KeyboardInterrupt:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        raise
    return code


def agree_local_rank(local_rank: int | None) -> None:
    """`--local_rank N` (DeepSpeed's launcher appends it) must say what LOCAL_RANK says; where
    the launcher set no LOCAL_RANK, the flag provides it."""
    if local_rank is None:
        return
    env_rank = os.environ.get("LOCAL_RANK")
    if env_rank is not None and env_rank != str(local_rank):
        raise ConfigError(f"--local_rank {local_rank} disagrees with LOCAL_RANK={env_rank} set by the launcher")
    os.environ["LOCAL_RANK"] = str(local_rank)


def cmd_train(args: argparse.Namespace) -> int:
    from vlp.core.devices import compute_device
    from vlp.train.config import check_trainable_here, load_config

    config = load_config(args.config, args.overrides)  # validate before starting anything
    args.run_dir = config.run_dir  # where a crash's traceback is kept (`main`)
    check_trainable_here(config, str(args.config))
    agree_local_rank(args.local_rank)
    if args.nproc > 1 and "RANK" not in os.environ:
        # One rank per GPU under CUDA: refuse here, once, rather than in every rank.
        compute_device(config.train.device, args.nproc - 1, {**os.environ, "LOCAL_WORLD_SIZE": str(args.nproc)},
                       announce=False)
        return launch_local_ranks(args)
    from vlp.train.trainer import train

    results = train(config, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"run_dir": str(config.run_dir), **results}))
    return 0


# ---------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from vlp.train.config import load_config
    from vlp.train.trainer import train

    out = Path(args.out)
    overrides = [f"output_dir={out.parent}", f"name={out.name}", *args.overrides]
    if args.steps:  # a reduced budget keeps the warmup a fifth of the run at most
        overrides += [f"train.steps={args.steps}", f"train.warmup_steps={min(20, args.steps // 5)}"]
    config = load_config(REPO_CONFIGS / "demo.yaml", overrides)
    started = time.time()
    results = train(config, resume=None, overwrite=True)  # the demo replaces its own earlier run
    rows = [("zero-shot top-1 (held-out digits)", results.get("zeroshot_top1")),
            ("zero-shot top-5", results.get("zeroshot_top5")),
            ("mean per-class recall", results.get("zeroshot_mean_per_class_recall")),
            ("training steps", config.train.steps),
            ("wall time (s)", f"{time.time() - started:.0f}"),
            ("run folder", str(config.run_dir))]
    width = max(len(name) for name, _ in rows)
    print("\nvlp demo: CLIP on scikit-learn's real digits, trained on CPU")
    for name, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"  {name:<{width}}  {shown}")
    return 0


# ---------------------------------------------------------------- shards
def cmd_shards_build(args: argparse.Namespace) -> int:
    from vlp.data_pipelines.sources import build

    summary = build(args.source, args.out, **parse_options(args.option))
    print(json.dumps(summary, default=str))
    return 0


def cmd_shards_reinforce(args: argparse.Namespace) -> int:
    from vlp.curate.reinforce import reinforce_shards

    summary = reinforce_shards(args.shards, Path(args.teacher), Path(args.out), batch_size=args.batch_size,
                               workers=args.workers, device=args.device, precision=args.precision)
    print(json.dumps(summary))
    return 0


# ---------------------------------------------------------------- eval / export
def cmd_eval(args: argparse.Namespace) -> int:
    from vlp.core.config import validate
    from vlp.train.evals import EVALUATORS, EvalContext
    from vlp.train.weights import load_model

    evaluator_cls = EVALUATORS.get(args.task)
    options = parse_options(args.option)
    if args.data:
        options["data"] = args.data
    config = validate(evaluator_cls.config_class, {"type": args.task, **options}, "vlp eval --option")
    model, run_config = load_model(Path(args.checkpoint))
    out_dir = Path(args.out).parent if args.out else None
    import torch

    from vlp.core.devices import compute_device, use_compute_device

    # The run's own device decision: --device, else the checkpoint's train.device (auto: CUDA
    # when there is a GPU). The weights stay fp32: evaluation is cheap next to training.
    device = use_compute_device(compute_device(args.device or run_config.train.device, 0))
    model.to(device)
    with torch.no_grad():
        results = evaluator_cls(config).run(model, EvalContext(device=device, out_dir=out_dir))
    line = json.dumps({"task": args.task, "checkpoint": str(args.checkpoint), **results}, default=float)
    print("| metric | value |\n|---|---|")
    for key, value in results.items():
        print(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from vlp.train.weights import export_checkpoint

    out = export_checkpoint(Path(args.checkpoint), Path(args.out), args.format)
    print(json.dumps({"format": args.format, "out": str(out)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlp", description="Vision-language pretraining.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="one training run")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    p.add_argument("--nproc", type=int, default=1, help="start N local ranks")
    p.add_argument("--resume", default=None, help="latest | PATH")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in the same run folder")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help="set by DeepSpeed's launcher; must agree with LOCAL_RANK")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="train and evaluate a small CLIP on digits, on CPU")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=None, help="override the step budget")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("shards", help="write webdataset shards")
    shards_sub = p.add_subparsers(dest="shards_command", required=True)
    b = shards_sub.add_parser("build", help="SOURCE: digits, shapes, folder:DIR, csv:FILE, ct:DIR, ...")
    b.add_argument("source")
    b.add_argument("--out", required=True)
    b.add_argument("--option", "-o", action="append", default=[], help="key=value for the source")
    b.set_defaults(func=cmd_shards_build)
    r = shards_sub.add_parser(
        "reinforce", help="SHARDS again with a frozen teacher's image and caption embeddings in every sample",
        description="Write every good sample of SHARDS into --out (same format, sizes.json) with the embeddings of "
                    "--teacher beside it, for the distill / compat heads' from_shards mode; resumable per shard, "
                    "ranks from RANK/WORLD_SIZE or a Slurm array. docs/distill.md")
    r.add_argument("shards", help="shard spec (brace ranges, '::' lists) or a folder of .tar shards")
    r.add_argument("--teacher", required=True, help="a vlp export, run folder or checkpoint")
    r.add_argument("--out", required=True, help="folder for the new shards (not the input folder)")
    r.add_argument("--batch-size", type=int, default=256)
    r.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding samples")
    r.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    r.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast dtype of the teacher's towers")
    r.set_defaults(func=cmd_shards_reinforce)

    p = sub.add_parser("eval", help="evaluate a checkpoint or export")
    p.add_argument("task", help="zeroshot, linear_probe, alignment, retrieval, grounding, ct, hierarchy")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--option", "-o", action="append", default=[], help="key=value for the evaluator")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default=None,
                   help="default: the run's train.device (auto: CUDA when a GPU is visible)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export a checkpoint for other tools")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--format", required=True)
    p.set_defaults(func=cmd_export)

    sub.add_parser("deepspeed", add_help=False,
                   help="DeepSpeed's launcher in vlp's interpreter: vlp deepspeed [deepspeed args] (used by Slurm jobs)")

    submit.add_parser(sub)
    status.add_parser(sub)
    curate_commands.add_parser(sub)  # vlp embed, vlp curate
    segment_cli.add_parser(sub)  # vlp segment
    return parser


def cmd_deepspeed(argv: list[str]) -> int:
    """DeepSpeed's multi-node launcher (`deepspeed ARGS`) run by this interpreter, so jobs need
    no `deepspeed` script on PATH (`vlp submit --launcher deepspeed` jobs call this)."""
    from deepspeed.launcher.runner import main as deepspeed_main

    return int(deepspeed_main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["deepspeed"]:
        # Every argument goes to DeepSpeed's own parser (argparse's REMAINDER would stop at the
        # first option-like word); listed in `vlp --help` by the stub parser below.
        return cmd_deepspeed(argv[1:])
    parser = build_parser()
    args = parse_command_line(parser, argv)
    try:
        return int(args.func(args) or 0)
    except VlpInputError as error:  # the user's input: one line, no traceback
        print(f"vlp: error: {error}", file=sys.stderr)
        return 2
    except SystemExit:
        raise
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        from vlp.train.monitors import TrainingStopped

        if isinstance(error, TrainingStopped):
            print(f"vlp: stopped: {error}", file=sys.stderr)
            return 1
        from vlp.core.collectives import lost_peer_reason

        reason = lost_peer_reason(error)
        if reason is not None:  # a lost node or rank: one line per surviving rank, not a traceback
            print(f"vlp: error: rank {os.environ.get('RANK', '?')}: {reason}", file=sys.stderr, flush=True)
            return 1
        # A bug (or the machine failing), not bad input: the whole traceback, kept in the run folder too.
        shown = traceback.format_exc()
        print(shown, end="", file=sys.stderr)
        kept = keep_traceback(getattr(args, "run_dir", None), shown)
        where = f"; traceback also in {kept}" if kept else ""
        print(f"vlp: internal error ({type(error).__name__}){where}", file=sys.stderr, flush=True)
        return 1


def keep_traceback(run_dir: Optional[Path], shown: str) -> Optional[Path]:
    """Append `shown` (a traceback) to `run_dir/errors.log`, headed by the time and the rank, when
    the run folder exists; returns that file, or None when there is no run folder to hold it."""
    if run_dir is None or not Path(run_dir).is_dir():
        return None
    log = Path(run_dir) / "errors.log"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        with open(log, "a", encoding="utf-8") as handle:  # ranks append whole entries
            handle.write(f"--- {stamp} rank {os.environ.get('RANK', '0')}\n{shown}")
    except OSError:
        return None
    return log
