"""uint8 pixels to the device, normalised by the image tower: the same numbers as the worker's
float path (`ClipImageTransform.finish_batch`), in fp32 and in the bf16 a bf16 engine computes in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlp.data_pipelines.image_transforms import ClipImageTransform
from vlp.models.towers import IMAGE_TOWERS

TINY_OPEN_CLIP = "local-dir:" + str(Path(__file__).parent / "data" / "tiny_open_clip")
SMALL = {
    "open_clip_vit": dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16,
                          mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)),
    "timm": dict(model_name="vit_tiny_patch16_224", image_size=32, kwargs={"patch_size": 8, "depth": 1}),
    "open_clip": dict(name=TINY_OPEN_CLIP),
}


def tower_and_stats(name: str):
    cls = IMAGE_TOWERS.get(name)
    tower = cls(cls.config_class(type=name, **SMALL[name]), 16).eval()
    if name == "open_clip":
        return tower, tower.model.preprocess_cfg["mean"], tower.model.preprocess_cfg["std"]
    return tower, tower.config.mean, tower.config.std


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uint8_input_equals_the_worker_normalised_input(name, dtype):
    tower, mean, std = tower_and_stats(name)
    tower.to(dtype)
    pixels = torch.randint(0, 256, (3, *tower.input_shape()), dtype=torch.uint8)
    worker = ClipImageTransform(tower.input_shape()[-1], False, mean, std).finish_batch(pixels).to(dtype)
    with torch.no_grad():
        ours, theirs = tower(pixels), tower(worker)
    for key in ("image_embed", "image_tokens"):
        assert ours[key].dtype == dtype
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalised_pixels_are_bitwise_the_old_path_and_keep_channels_last(dtype):
    from vlp.models.towers.image import model_input

    tower, mean, std = tower_and_stats("open_clip_vit")
    tower.to(dtype)
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    expected = ClipImageTransform(32, True, mean, std).finish_batch(pixels.contiguous()).to(dtype)
    normalised = model_input(tower, pixels, mean, std)
    assert normalised.dtype == dtype and normalised.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(normalised, expected)
    already = torch.randn(2, 3, 32, 32)
    assert model_input(tower, already, mean, std) is already  # float input is taken as normalised


def test_training_loader_sends_uint8_the_eval_path_floats(tmp_path):
    """The same training batch through the old path (normalised in the worker) and the new one
    (uint8 out of the loader, `finish_batch` as the tower would do it) are equal."""
    from test_device_stream import jpeg, tokenizer

    from vlp.data_pipelines.config import DataConfig
    from vlp.data_pipelines.loader import build_train_loader
    from vlp.data_pipelines.shards import write_shards

    write_shards([{"__key__": f"k{i}", "jpg": jpeg(i), "txt": f"s {i}"} for i in range(8)], tmp_path, "a")
    cfg = DataConfig(train=[{"urls": str(tmp_path / "a-000000.tar")}], workers=0, shuffle_buffer=4)
    transform = ClipImageTransform(16, True, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    batches = {}
    for on_device in (True, False):
        loader = build_train_loader(cfg, preprocess=transform, tokenizer=tokenizer, batch_size=4, rank=0,
                                    world_size=1, seed=0, finish_on_device=on_device)
        batches[on_device] = next(loader.iterate(0))["image"]
    assert batches[True].dtype == torch.uint8 and batches[False].dtype == torch.float32
    assert torch.equal(transform.finish_batch(batches[True]), batches[False])
