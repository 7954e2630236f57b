"""Model FLOPs per training sample and the peak FLOP/s of the device, for model FLOPs utilisation.

    mfu = model_flops_per_sample(model, global_batch) * samples_per_second / peak_flops(device, dtype)

Model FLOPs (PaLM's "MFU"): the FLOPs the model needs, whatever the implementation spends (no
recompute from activation checkpointing, no tiled-loss recompute), 2 FLOPs per multiply-add.

* Towers: counted, not modelled. `torch.utils.flop_counter.FlopCounterMode` runs one sample's
  forward through each tower once at build time and counts what it knows:
  matmuls, linear layers, convolutions and attention (SDPA's two matmuls, 4 n^2 d per layer),
  which for a transformer is all but the norms, softmax and activations (under 1% at ViT-B).
  Any architecture the registry holds is counted alike (in training mode, the path training runs); `tests/test_flops.py` checks the count
  against the closed form of an open_clip ViT, 24 n d^2 + 4 n^2 d per layer + patch embedding.
* Training: forward + backward = 3 x forward for a tower that trains (the backward computes the
  gradients of both the inputs and the weights, 2 x forward); a locked tower runs forward only.
  A partly locked tower (open_clip's `lock_unlocked_groups`) counts 1 + 2 f times its forward,
  f its trainable share of the parameters (matmul FLOPs follow the parameter count in a
  transformer; the locked bottom layers need no backward at all, nothing below them trains).
* Heads: each head's score matrix, by the head's own `flops_per_sample(global_batch)` when it has
  one, else one (B_local, N) matrix of E-dim dot products: 2 E N forward per sample (CLIP's
  logits; both directions read the same matrix), 3x for the backward.

Not counted: extra text groups per sample (FLAIR's K sub-captions, report sentences) unless
passed as `extra_texts_per_sample`; the masked pass of MAE-style heads (a K / P share of the
image forward, benchmarks/masked_volume_step.py); the optimizer; data movement.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Dense (no 2:4 sparsity) peak TFLOPS from NVIDIA's datasheets, per precision of the matmul inputs:
# "bf16" (and fp16) on tensor cores, "tf32" (fp32 matmuls with TF32 allowed), "fp32" (CUDA cores,
# TF32 off). Datasheets print the sparse figure with an asterisk; these are half of it.
# Matched against `torch.cuda.get_device_name` in order, so specific names come before families.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM: the H100 SXM's GH100 compute
    ("H100 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # "H100 80GB HBM3", the SXM part
    ("H800", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),  # SXM and PCIe alike
    ("A800", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    ("L40", {"bf16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    ("A40", {"bf16": 149.7, "tf32": 74.8, "fp32": 37.4}),
    ("L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10G", {}),  # AWS's part: no NVIDIA datasheet figures, so no MFU rather than the A10's
    ("A10", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("V100-SXM", {"fp16": 125.0, "fp32": 15.7}),  # Volta: fp16 tensor cores, no bf16, no TF32
    ("V100", {"fp16": 112.0, "fp32": 14.0}),  # PCIe
)


def _tf32_allowed() -> bool:
    """Whether fp32 CUDA matmuls may run as TF32. torch raises on the global getter once its
    per-backend API (`torch.backends.cuda.matmul.fp32_precision`) has been used, so ask that then."""
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:
        return torch.backends.cuda.matmul.fp32_precision == "tf32"


def _precision(dtype: torch.dtype) -> str:
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16" if dtype == torch.bfloat16 else "fp16"
    if dtype == torch.float32:
        return "tf32" if _tf32_allowed() else "fp32"
    raise ValueError(f"peak_flops: no peak for dtype {dtype}")


def peak_flops(device: torch.device | str, dtype: torch.dtype, override_tflops: float | None = None) -> float | None:
    """Dense peak FLOP/s (not TFLOPS) of `device` for matmuls in `dtype`, None when unknown.

    override_tflops (a config value, TFLOPS) wins over the table. CPUs and GPUs the table does
    not hold give None (MFU is then left out rather than guessed). fp32 reads TF32's peak while
    `torch.get_float32_matmul_precision()` allows TF32, the CUDA cores' otherwise; fp16 on a GPU
    without an fp16 entry takes its bf16 figure (same tensor-core rate on Ampere and later)."""
    if override_tflops is not None:
        return float(override_tflops) * 1e12
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    precision = _precision(dtype)
    for pattern, peaks in PEAK_TFLOPS:
        if pattern in name:
            tflops = peaks.get(precision) or (peaks.get("bf16") if precision == "fp16" else None)
            return None if tflops is None else tflops * 1e12
    return None


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


# The counter knows SDPA's CUDA kernels (flash, memory-efficient, cuDNN) but not the CPU's, so
# on a CPU it would count a transformer without its attention matmuls. Same formula: 4 n^2 d.
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def count_forward_flops(module: nn.Module, *inputs: Any) -> int:
    """FLOPs of `module(*inputs)` by `FlopCounterMode` (matmuls, convolutions, attention), on the
    training path: training mode with autograd on. In eval under `no_grad` (or with every
    parameter frozen) `nn.MultiheadAttention` takes its fused inference kernel, whose attention
    matmuls the counter does not see; the graph built here is one sample's and is dropped."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = module.training
    module.train()
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    try:
        with torch.enable_grad(), counter:
            module(*inputs)
    finally:
        module.train(was_training)
    return counter.get_total_flops()


def trainable_share(module: nn.Module) -> float:
    """Fraction of `module`'s parameter elements that require grad (0 for a locked tower)."""
    total = trainable = 0
    for param in module.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable / total if total else 0.0


def training_flops(forward_flops: float, module: nn.Module) -> float:
    """forward x (1 + 2 x trainable share): 3x for a trained module, 1x for a locked one."""
    return forward_flops * (1.0 + 2.0 * trainable_share(module))


def _one_sample(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-sample image (1, *input_shape) and caption (1, L) on the model's device."""
    param = next(model.parameters())
    image = torch.zeros(1, *model.image.input_shape(), device=param.device, dtype=param.dtype)
    text = model.text.tokenizer()(["a photo of a cat"]).to(param.device)  # (1, L)
    return image, text


def tower_flops_per_sample(model: nn.Module, extra_texts_per_sample: int = 0) -> dict[str, float]:
    """Training FLOPs per sample of each tower: {"image": ..., "text": ...}.

    The text tower runs once per caption plus `extra_texts_per_sample` times (FLAIR's K
    sub-captions). The image forward is skipped where the model never runs the full pass."""
    image, text = _one_sample(model)
    flops = {"text": training_flops(count_forward_flops(model.text, text), model.text) * (1 + extra_texts_per_sample)}
    if getattr(model, "needs_full_image", True):
        flops["image"] = training_flops(count_forward_flops(model.image, image), model.image)
    return flops


def head_flops_per_sample(model: nn.Module, global_batch: int) -> float:
    """Training FLOPs per sample of the heads' score matrices (see the module docstring)."""
    total = 0.0
    for head in model.objective.heads.values():
        custom = getattr(head, "flops_per_sample", None)
        if custom is not None:
            total += float(custom(global_batch))
        else:
            total += 3.0 * 2.0 * head.embed_dim * global_batch
    return total


def model_flops_per_sample(model: nn.Module, global_batch: int, *, extra_texts_per_sample: int = 0) -> float:
    """Forward + backward model FLOPs of one training sample at global batch `global_batch`.

    model: a `VLPModel` (towers `image`, `text`; heads under `objective.heads`), before ZeRO-3
    partitions its parameters (the towers run one real sample). Counted once at build time: a
    ViT-B/16 CLIP's one-sample forward costs well under a second on a CPU."""
    towers = tower_flops_per_sample(model, extra_texts_per_sample)
    return sum(towers.values()) + head_flops_per_sample(model, global_batch)
