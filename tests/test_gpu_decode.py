"""`data.decode: gpu`: the worker plans (bytes + the seed's crop box), the device stage decodes.

On CPU the same code runs with torchvision's CPU JPEG decoder, so the plan, the crop boxes, the
PNG fallback and the difference from PIL's pixels are checked here; the CUDA test (skipped
without a GPU) checks the nvjpeg path against the CPU one."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.data_pipelines.config import DataConfig
from vlp.data_pipelines.device_stream import DeviceStream
from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.gpu_decode import GpuJpegDecode
from vlp.data_pipelines.image_transforms import ClipImageTransform
from vlp.data_pipelines.loader import build_train_loader
from vlp.data_pipelines.shards import write_shards
from vlp.train.checkpoint import TrainState

SIZE = 32
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def tokenizer(texts: list[str]) -> torch.Tensor:
    return torch.zeros(len(texts), 4, dtype=torch.long)


def photo(index: int, fmt: str) -> bytes:
    """A smooth natural-ish image (upsampled noise), sizes varying per sample; grayscale every 7th."""
    rng = np.random.default_rng(index)
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((60 + index % 13, 45 + index % 7), Image.BICUBIC)
    if index % 7 == 3:
        image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_decode")
    samples = []
    for index in range(24):
        ext, fmt = ("png", "PNG") if index % 5 == 4 else ("jpg", "JPEG")
        samples.append({"__key__": f"k{index:03d}", ext: photo(index, fmt), "txt": f"sample {index}"})
    write_shards(samples, out, "mixed")
    return str(out / "mixed-000000.tar")


def batches(shard: str, decode: str, device: str = "cpu", count: int = 3) -> list[dict]:
    cfg = DataConfig(train=[{"urls": shard}], workers=0, shuffle_buffer=8, decode=decode)
    loader = build_train_loader(cfg, preprocess=ClipImageTransform(SIZE, True, MEAN, STD), tokenizer=tokenizer,
                                batch_size=8, rank=0, world_size=1, seed=5)
    stage = GpuJpegDecode(SIZE, torch.device(device)) if decode == "gpu" else None
    stream = DeviceStream(loader, TrainState(), torch.device(device), torch.float32, device_stage=stage)
    return [next(stream) for _ in range(count)]


def test_device_decode_is_the_cpu_batch_within_decoder_rounding(shard):
    cpu, planned = batches(shard, "cpu"), batches(shard, "gpu")
    differences = []
    for ours, theirs in zip(planned, cpu):
        assert ours["key"] == theirs["key"] and "jpeg" not in ours and "crop" not in ours
        assert ours["image"].dtype == torch.uint8 and ours["image"].shape == theirs["image"].shape == (8, 3, SIZE, SIZE)
        for key, mine, reference in zip(ours["key"], ours["image"], theirs["image"]):
            if int(key[1:]) % 5 == 4:  # PNG: decoded in the worker either way
                assert torch.equal(mine, reference)
            else:
                differences.append((mine.int() - reference.int()).abs())
    difference = torch.stack(differences).float()
    # Same crop box (drawn from the sample's seed) and the same libjpeg-turbo: only the resize's
    # float arithmetic and rounding differ, measured 0.2 mean, 1 max level (docs/input.md).
    assert difference.mean() < 0.5 and difference.max() <= 2, (difference.mean(), difference.max())


def test_a_wrong_crop_would_be_caught(shard):
    """The check above can fail: another seed's crop boxes are far from the CPU pixels."""
    cpu = batches(shard, "cpu", count=1)[0]
    cfg = DataConfig(train=[{"urls": shard}], workers=0, shuffle_buffer=8, decode="gpu")
    loader = build_train_loader(cfg, preprocess=ClipImageTransform(SIZE, True, MEAN, STD), tokenizer=tokenizer,
                                batch_size=8, rank=0, world_size=1, seed=5)
    batch = next(loader.iterate(0))
    batch["crop"] = [(0, 0, 40, 40) if data.numel() else box for data, box in zip(batch["jpeg"], batch["crop"])]
    image = GpuJpegDecode(SIZE, torch.device("cpu"))(batch)["image"]
    jpeg = [index for index, key in enumerate(cpu["key"]) if int(key[1:]) % 5 != 4]
    assert (image[jpeg].float() - cpu["image"][jpeg].float()).abs().mean() > 5


def test_gpu_decode_needs_the_training_transform(shard):
    cfg = DataConfig(train=[{"urls": shard}], decode="gpu")
    with pytest.raises(DataError, match="data.decode: gpu needs an image tower"):
        build_train_loader(cfg, preprocess=ClipImageTransform(SIZE, False, MEAN, STD), tokenizer=tokenizer,
                           batch_size=8, rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="decode"):
        DataConfig(train=[{"urls": shard}], decode="nvjpeg")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg)")
def test_nvjpeg_decode_equals_cpu_decode_within_rounding(shard):
    cuda, cpu = batches(shard, "gpu", "cuda"), batches(shard, "gpu", "cpu")
    for ours, theirs in zip(cuda, cpu):
        assert ours["key"] == theirs["key"] and ours["image"].is_cuda
        difference = (ours["image"].cpu().int() - theirs["image"].int()).abs().float()
        # nvjpeg's IDCT and chroma upsampling are not libjpeg-turbo's: a looser bound, not yet
        # measured on a GPU (benchmarks/gpu_check.sh reports it).
        assert difference.mean() < 1.5 and difference.max() <= 32, (difference.mean(), difference.max())
