"""The GPU path on a real CUDA device (`pytest -m cuda`; benchmarks/gpu_check.sh runs it).

Skipped, with the reason, where torch sees no CUDA device. The CPU suite guards what it can of
the same bugs (tests/test_devices.py: a process group whose backend serves CUDA tensors only);
these run what only a GPU can: NCCL, bf16 ZeRO with CUDA tensors, the SDPA kernels, nvjpeg.

* one NCCL rank with `VLP_FORCE_COLLECTIVES=1`: every collective helper really calls NCCL on one
  rank, so any CPU tensor that reaches a collective (trainer stop flags, monitors, evaluators,
  loader position, checkpoints) raises as it would with 8 ranks;
* a bf16 ZeRO-1 run with evaluation, checkpoint, resume and export (real `vlp train` processes);
* SDPA against the explicit-softmax math on CUDA (3-D ViT blocks and FLAIR pooling);
* `data.decode: gpu` (nvjpeg) against the CPU (PIL) pixels of the same crop boxes.
"""

from __future__ import annotations

import copy
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rerun_from_checkpoint, run_vlp, tiny_config

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is false)"),
]

CUDA_RUN = {"VLP_FORCE_COLLECTIVES": "1", "CUDA_VISIBLE_DEVICES": "0"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits shards: pre-built ones from VLP_DIGITS_DIR (benchmarks/gpu_check.sh ships them;
    the GPU machine has no scikit-learn to build them), else built as conftest builds them."""
    if os.environ.get("VLP_DIGITS_DIR"):
        return Path(os.environ["VLP_DIGITS_DIR"])
    from vlp.data_pipelines.sources import build

    out = tmp_path_factory.mktemp("digits")
    build("digits", out, shard_size=400)
    return out


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_one_nccl_rank_with_collectives_forced_on(tmp_path, digits):
    """Train, log, checkpoint and evaluate on one NCCL rank whose collectives all run."""
    config = tiny_config(tmp_path, digits, train={"device": "cuda", "steps": 4, "checkpoint_every": 2})
    run_vlp("train", config, env=CUDA_RUN)
    run_dir = tmp_path / "runs" / "tiny"
    records = metrics(run_dir)
    assert [r["step"] for r in records if "loss/total" in r] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss/total"]) for r in records if "loss/total" in r)
    results = json.loads((run_dir / "results.json").read_text())
    assert 0.0 <= results["zeroshot_top1"] <= 1.0


def test_bf16_zero1_run_evaluates_checkpoints_resumes_and_exports_the_master_weights(tmp_path, digits):
    from vlp.train.weights import consolidate, read_state_dict

    config = tiny_config(tmp_path, digits, train={"device": "cuda", "steps": 6, "checkpoint_every": 3,
                                                      "keep_checkpoints": 3},
                         deepspeed={"zero_stage": 1, "precision": "bf16"}, export=["safetensors"])
    run_vlp("train", config, env=CUDA_RUN)
    runs = tmp_path / "runs"
    run_dir = runs / "tiny"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert "zeroshot_top1" in json.loads((run_dir / "results.json").read_text())
    master = consolidate(run_dir / "checkpoints", "step_00000006")
    exported, _ = read_state_dict(run_dir / "export" / "safetensors")
    for key, weight in master.items():
        if weight.is_floating_point():  # the fp32 master weights, not the module's bf16 copies
            torch.testing.assert_close(exported[key].float(), weight, rtol=0, atol=0, msg=key)

    # Resume from step 3 in a new process: it reaches step 6 with finite weights close to the
    # uninterrupted run's (GPU kernels are not bitwise reproducible run to run, so not equal).
    resumed = rerun_from_checkpoint(config, runs, "tiny", "step_00000006", "step_00000003")
    again = consolidate(resumed, "step_00000006")
    for key, weight in master.items():
        if weight.is_floating_point():
            assert torch.isfinite(again[key]).all(), key
            torch.testing.assert_close(again[key], weight, rtol=0.05, atol=0.02, msg=key)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
def test_volume_tower_sdpa_equals_the_einsum_path_on_cuda(dtype, tolerance):
    from vlp.models.towers.volume import MonaiViT3D, MonaiViT3DConfig

    torch.manual_seed(0)
    config = MonaiViT3DConfig(roi=(32, 32, 16), patch_size=(8, 8, 4), hidden_size=64, mlp_dim=128, num_layers=2,
                              num_heads=4)
    tower = MonaiViT3D(config, embed_dim=32).cuda().to(dtype).train()
    reference = copy.deepcopy(tower)
    for block in reference.vit.blocks:
        block.attn.use_flash_attention = False
    volumes = torch.randn(4, 1, 32, 32, 16, device="cuda", dtype=dtype)
    outputs = [model(volumes)["image_tokens"] for model in (tower, reference)]
    torch.testing.assert_close(outputs[0].float(), outputs[1].float(), atol=tolerance, rtol=tolerance)
    for model, out in zip((tower, reference), outputs):
        out.float().square().mean().backward()
    for (name, param), ref in zip(tower.named_parameters(), reference.parameters()):
        scale = ref.grad.float().abs().max().clamp_min(1e-6)
        assert (param.grad.float() - ref.grad.float()).abs().max() / scale < 10 * tolerance, name


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
def test_flair_pooling_sdpa_equals_the_explicit_softmax_on_cuda(dtype, tolerance):
    from vlp.models.heads.flair import zero_slot_attention

    generator = torch.Generator(device="cuda").manual_seed(0)
    # B = 4 images, H = 8 heads, T = 96 texts, P = 196 patches, d = 64: flash-eligible shapes.
    shapes = [(4, 8, 96, 64), (4, 8, 196, 64), (4, 8, 196, 64)]
    leaves = [torch.randn(*shape, device="cuda", generator=generator).to(dtype) for shape in shapes]
    grads = []
    for need_weights in (False, True):  # SDPA kernels, then the explicit softmax
        inputs = [leaf.clone().requires_grad_() for leaf in leaves]
        pooled, _ = zero_slot_attention(*inputs, need_weights=need_weights)
        pooled.float().sin().sum().backward()
        grads.append([pooled.detach().float(), *(leaf.grad.float() for leaf in inputs)])
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, atol=tolerance, rtol=tolerance)


def _jpeg_shard(directory) -> str:
    from PIL import Image

    from vlp.data_pipelines.shards import write_shards

    samples = []
    for index in range(32):
        rng = np.random.default_rng(index)
        small = rng.integers(0, 256, size=(8, 10, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((256 + 16 * (index % 5), 240 + 8 * (index % 3)), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        samples.append({"__key__": f"k{index:03d}", "jpg": buffer.getvalue(), "txt": f"sample {index}"})
    write_shards(samples, directory, "photos")
    return str(directory / "photos-000000.tar")


def test_gpu_jpeg_decode_equals_the_cpu_pixels_within_the_documented_bound(tmp_path):
    """`data.decode: gpu` on CUDA (nvjpeg, torch resize) against `decode: cpu` (PIL decode and
    resize), same seeds so the same crop boxes. Bound: nvjpeg vs libjpeg-turbo (docs/input.md,
    mean 1.5 / max 32 levels) plus the resize's rounding (mean 0.2 / max 1)."""
    from vlp.data_pipelines.config import DataConfig
    from vlp.data_pipelines.device_stream import DeviceStream
    from vlp.data_pipelines.gpu_decode import GpuJpegDecode
    from vlp.data_pipelines.image_transforms import ClipImageTransform
    from vlp.data_pipelines.loader import build_train_loader
    from vlp.train.checkpoint import TrainState

    shard = _jpeg_shard(tmp_path)
    size, mean, std = 224, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)

    def first_batches(decode: str, device: str) -> list[dict]:
        config = DataConfig(train=[{"urls": shard}], workers=0, shuffle_buffer=8, decode=decode)
        loader = build_train_loader(config, preprocess=ClipImageTransform(size, True, mean, std),
                                    tokenizer=lambda texts: torch.zeros(len(texts), 4, dtype=torch.long),
                                    batch_size=8, rank=0, world_size=1, seed=3)
        stage = GpuJpegDecode(size, torch.device(device)) if decode == "gpu" else None
        stream = DeviceStream(loader, TrainState(), torch.device(device), torch.float32, device_stage=stage)
        return [next(stream) for _ in range(3)]

    differences = []
    for gpu, cpu in zip(first_batches("gpu", "cuda"), first_batches("cpu", "cpu")):
        assert gpu["key"] == cpu["key"] and gpu["image"].is_cuda and gpu["image"].dtype == torch.uint8
        differences.append((gpu["image"].cpu().int() - cpu["image"].int()).abs().float())
    difference = torch.stack(differences)
    print(f"nvjpeg vs PIL: mean {difference.mean():.3f}, max {difference.max():.0f} levels")
    assert difference.mean() < 1.7 and difference.max() <= 33, (difference.mean(), difference.max())
