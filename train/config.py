"""Experiment configs: one YAML file, validated into typed objects before any work starts.

Each component owns its config class (towers, heads, data, evaluators); this module assembles
them into `ExperimentConfig`, whose tree mirrors the YAML. Component unions are built from the
registries, so a newly registered head or tower is a valid config key with no edit here.

Errors are `ConfigError` (exit code 2 at the CLI) with the dotted key path:
    model.heads.clipp: unknown key. Did you mean "clip"?
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import (
    BaseModel,
    Field,
    create_model,
    field_validator,
    model_validator,
)

from vlp.core.config import Strict, validate
from vlp.core.errors import ConfigError  # noqa: F401 (raised here, imported from here)
from vlp.core.registry import nearest
from vlp.data_pipelines.config import DataConfig
from vlp.data_pipelines.sources import SOURCES
from vlp.export import EXPORTERS
from vlp.models.config import ModelConfig, tagged_union
from vlp.models.heads import HEADS
from vlp.models.objective import beyond_pooled
from vlp.train.evals import EVALUATORS


class TrainConfig(Strict):
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1, description="per-rank micro-batch size")
    lr: float = Field(5e-4, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of lr")
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.2, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(0, ge=0, description="0: only at the end")
    keep_checkpoints: int = Field(2, ge=1)
    grad_checkpointing: bool = False
    max_nonfinite_steps: int = Field(5, ge=1, description="consecutive skipped steps before the run stops")
    # torch's fused AdamW kernel: ~6x faster optimizer steps on CPU than the foreach one
    # (benchmarks/throughput.py); turn off for optimizers DeepSpeed must see as plain.
    fused_adamw: bool = True
    # torch.compile each tower (the FLOPs), not the loss heads: inductor in torch 2.14 drops the
    # gradient of the loss when a head also returns a detached copy of it for logging.
    compile: bool = False
    # Tower parameters and image batches in channels_last (pays for conv towers); ZeRO 0 only,
    # since ZeRO 1-3 keep parameters as views of flat buffers.
    channels_last: bool = False
    dist_timeout_s: float = Field(600, gt=0)
    # Where this rank computes (vlp.core.devices.compute_device): auto is CUDA when torch sees a
    # GPU, else CPU with a log line; cuda without a usable GPU stops with the reason (exit 2).
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # TF32 tensor cores for fp32 matmuls and convolutions on CUDA (ignored on CPU).
    tf32: bool = True
    # The accelerator's dense bf16/fp16 peak in TFLOP/s for the `mfu` metric; None: from the
    # device's name where vlp.models.flops knows it (never on CPU).
    peak_tflops: Optional[float] = Field(None, gt=0)
    # open_clip's --lr-scheduler: cosine (to min_lr_ratio), constant, const-cooldown (constant,
    # then over the last cooldown_steps down to lr_cooldown_end with lr_cooldown_power); all warm up.
    schedule: Literal["cosine", "constant", "const-cooldown"] = "cosine"
    cooldown_steps: int = Field(0, ge=0)
    lr_cooldown_end: float = Field(0.0, ge=0)
    lr_cooldown_power: float = Field(1.0, gt=0)
    # Layer-wise lr decay per tower (open_clip / timm / BEiT): {image: 0.75, text: 0.9}.
    layer_decay: dict[Literal["image", "text"], float] = Field(default_factory=dict)
    # Weights only (fresh optimizer, schedule and step) from a vlp run folder, checkpoint or export
    # (safetensors, open_clip); `--resume` still restores everything and wins over it.
    init_from: Optional[str] = None
    init_strict: bool = True
    # How deepspeed.grad_accum micro-batches make one step (vlp.train.grad_cache, docs/large_batch.md):
    # contrastive: every head's loss over all grad_accum x ranks x batch_size pairs (GradCache:
    # pass 1 caches the pooled embeddings without grad, pass 2 re-runs each micro-batch against
    # the cached rest); plain: DeepSpeed's own, each micro-batch's loss sees its own negatives only.
    accumulate: Literal["contrastive", "plain"] = "contrastive"

    @model_validator(mode="after")
    def _warmup_within_run(self):
        if self.warmup_steps >= self.steps:
            raise ValueError(f"train.warmup_steps={self.warmup_steps} must be below train.steps={self.steps}")
        return self

    @model_validator(mode="after")
    def _schedule_knobs(self):
        if self.schedule == "const-cooldown":
            if not 0 < self.cooldown_steps <= self.steps - self.warmup_steps:
                raise ValueError(f"train.cooldown_steps={self.cooldown_steps} must be in 1..steps - warmup_steps "
                                 f"({self.steps - self.warmup_steps}) for schedule const-cooldown")
            if self.lr_cooldown_end > self.lr:
                raise ValueError(f"train.lr_cooldown_end={self.lr_cooldown_end} is above train.lr={self.lr}")
        elif self.cooldown_steps:
            raise ValueError(f"train.cooldown_steps needs train.schedule: const-cooldown (got {self.schedule})")
        for tower, decay in self.layer_decay.items():
            if not 0 < decay <= 1:
                raise ValueError(f"train.layer_decay.{tower}={decay} must be in (0, 1]")
        return self


class WandbConfig(Strict):
    project: str = "vlp"
    entity: Optional[str] = None
    # None: wandb's own default (WANDB_MODE); "offline" writes runs/NAME/wandb/ for `wandb sync`.
    mode: Optional[Literal["online", "offline", "disabled"]] = None
    tags: list[str] = Field(default_factory=list)


class LoggingConfig(Strict):
    """Where metrics go besides `metrics.jsonl`: TensorBoard (runs/NAME/tensorboard) and Weights &
    Biases (the optional `wandb` extra), as open_clip's `--report-to`."""

    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])
    wandb: WandbConfig = WandbConfig()


class DeepSpeedConfig(Strict):
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    # ZeRO 1/2: overlap the gradient reduce-scatter with the backward on a side stream. None: on
    # under CUDA, off on CPU (the CPU accelerator has no streams, so it would only add a buffer).
    overlap_comm: Optional[bool] = None
    # ZeRO 1/2 bucket sizes in elements (DeepSpeed's default 5e8 each); None: DeepSpeed's.
    reduce_bucket_size: Optional[int] = Field(None, ge=1)
    allgather_bucket_size: Optional[int] = Field(None, ge=1)
    # Reduce gradients across ranks in fp32 under bf16/fp16 (DeepSpeed's communication_data_type;
    # bf16 ZeRO 1 also accumulates them in fp32, its data_types.grad_accum_dtype): twice the bytes
    # on the wire, no bf16 rounding of the summed gradient.
    fp32_grad_reduce: bool = False
    # Passed through to the DeepSpeed config as is (e.g. offload settings); our keys win.
    extra: dict[str, Any] = Field(default_factory=dict)


def check_trainable_here(config: ExperimentConfig, source: str) -> None:
    """What only the machine that trains can judge, checked before anything starts. Not part of
    validation: `vlp submit` from a CPU login node, `vlp export` or `vlp eval` on a laptop must
    accept a config that trains in fp16 on the cluster's GPUs.

    DeepSpeed's CPU accelerator offers fp16 only with oneDNN fp16 kernels (AVX512-FP16 /
    AMX-FP16 CPUs) and otherwise raises "Type fp16 is not supported on your device" once the
    engine is built; this is the same test, with one line naming the key."""
    if config.deepspeed.precision == "fp16" and not _fp16_available():
        raise ConfigError(f"{source}: deepspeed.precision=fp16: DeepSpeed has no fp16 on this CPU (no CUDA device, "
                          "no oneDNN fp16 kernels); use bf16 or fp32")


def _fp16_available() -> bool:
    import torch

    if torch.cuda.is_available():
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# Typed from the registries when this module is imported (they discover their components then).
EvalConfigs = tagged_union(EVALUATORS)
ExportFormat = Literal[tuple(EXPORTERS.names())]


class ExperimentConfig(Strict):
    """One experiment, the tree of the YAML file; `model`, `evals` and `export` are typed from
    the registries, so an unknown tower, head, evaluator or format fails at load."""

    name: str
    seed: int = 0
    output_dir: str = "runs"
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    logging: LoggingConfig = LoggingConfig()
    evals: list[EvalConfigs] = Field(default_factory=list)  # one EVALUATORS config each, tagged by `type`
    export: list[ExportFormat] = Field(default_factory=list)  # EXPORTERS names

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not _NAME.match(value) or ".." in value:
            raise ValueError(f"{value!r} must be letters, digits, '_', '.', '-' (it names the run folder)")
        return value

    @model_validator(mode="after")
    def _zero_knobs_need_zero(self):
        ds = self.deepspeed
        for key in ("overlap_comm", "reduce_bucket_size", "allgather_bucket_size"):
            if getattr(ds, key) is not None and ds.zero_stage not in (1, 2, 3):
                raise ValueError(f"deepspeed.{key} needs deepspeed.zero_stage 1-3 (got {ds.zero_stage})")
        if ds.fp32_grad_reduce and ds.precision == "fp32":
            raise ValueError("deepspeed.fp32_grad_reduce: gradients are already reduced in fp32 under "
                             "deepspeed.precision fp32")
        return self

    @model_validator(mode="after")
    def _channels_last_without_zero(self):
        if self.train.channels_last and self.deepspeed.zero_stage > 0:
            raise ValueError(f"train.channels_last needs deepspeed.zero_stage 0 (got {self.deepspeed.zero_stage}): "
                             "ZeRO keeps parameters as views of flat buffers")
        return self

    @model_validator(mode="after")
    def _heads_have_their_data(self):
        from vlp.models.dual_encoder import EXTRA_TEXT

        heads = self.model.heads_dict()
        needs = {name: HEADS.get(name).needs_for(cfg) for name, cfg in heads.items()}
        sizes = {"sub_text": ("data.sub_captions", self.data.sub_captions, "> 0"),
                 "sentences": ("data.sentences", self.data.sentences, "> 0"),
                 "parent_text": ("data.parent_caption_key", self.data.parent_caption_key, "set")}
        for embed_key, batch_key in EXTRA_TEXT.items():
            field, value, wanted = sizes[batch_key]
            users = [name for name in heads if embed_key in needs[name]]
            if users and not value:
                raise ValueError(f"model.heads.{users[0]} needs {field} {wanted} (it reads batch['{batch_key}'])")
        return self

    @model_validator(mode="after")
    def _heads_can_be_cached(self):
        if self.train.accumulate != "contrastive" or self.deepspeed.grad_accum == 1:
            return self
        for name, keys in beyond_pooled(self.model.heads_dict()).items():
            raise ValueError(f"train.accumulate: contrastive caches pooled embeddings only, and head {name} reads "
                             f"{', '.join(keys)}; set train.accumulate: plain (each micro-batch its own negatives) "
                             f"or deepspeed.grad_accum: 1")
        return self

    @model_validator(mode="after")
    def _known_build_sources(self):
        """`data.build` / `evals[i].build` ("name" or "name:arg") name a registered data source,
        checked at load rather than when the shards turn out to be missing."""
        builds = [("data.build", self.data.build)]
        builds += [(f"evals.{i}.build", getattr(spec, "build", None)) for i, spec in enumerate(self.evals)]
        for where, build in builds:
            name = build.partition(":")[0] if isinstance(build, str) else None
            if name is not None and name not in SOURCES:
                raise ValueError(f"{where}: unknown data source {name!r}; registered: {', '.join(SOURCES.names())}."
                                 f"{nearest(name, SOURCES.names())}")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def experiment_class() -> type[ExperimentConfig]:
    """`ExperimentConfig` (kept for callers of the earlier, lazily built subclass)."""
    return ExperimentConfig


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.0.c` in a tree of dicts and lists, creating missing sections."""
    node: Any = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "(top level)"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {dotted}: {where} has no item {part} (it has {len(node)})")
            key: Any = int(part)
        elif isinstance(node, dict):
            key = part
        else:
            raise ConfigError(f"override {dotted}: {where} is a value, not a section")
        if i == len(parts) - 1:
            node[key] = value
        else:
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}
            node = node[key]


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`train.steps=200` -> ("train.steps", 200); values are parsed as YAML scalars/lists."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$", key):
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({error.__class__.__name__})") from None
        parsed.append((key, value))
    return parsed


class _SafeLoader(yaml.SafeLoader):
    """SafeLoader that also refuses duplicate keys (a silent override is a config bug)."""


def _no_duplicates(loader: _SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_SafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_SafeLoader)  # noqa: S506 (safe subclass)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return tree


def apply_overrides(tree: dict, overrides: list[str] | None) -> dict:
    """Apply `dotted.key=value` overrides to a raw config tree in place (and return it)."""
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    return tree


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, tree: dict | None = None
) -> ExperimentConfig:
    """Read, override and validate an experiment; raises `ConfigError` naming the bad key."""
    source = str(path) if path is not None else "config"
    tree = apply_overrides(read_yaml(path) if tree is None else tree, overrides)
    return validate(ExperimentConfig, tree, source)


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
