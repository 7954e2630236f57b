"""models/flops.py: the counted tower FLOPs against a ViT's closed form, the training multiplier
of locked towers, the heads' score matrices, and the peak table's matching on device names."""

from __future__ import annotations

import pytest
import torch
from conftest import DEMO_CONFIG

from vlp.models import flops
from vlp.train.config import load_config
from vlp.train.trainer import build_model


def vit_closed_form(image: int, patch: int, width: int, layers: int, embed: int) -> int:
    """Forward FLOPs of an open_clip ViT on one image: per layer 24 n d^2 (qkv 6, out 2, MLP 16)
    + 4 n^2 d (two attention matmuls), n = patches + class token; the patch convolution
    2 n_p (3 p^2) d; the output projection 2 n d E (vlp's tower projects every token: the pooled
    embedding and the "image_tokens" the token-level heads read)."""
    patches = (image // patch) ** 2
    tokens = patches + 1
    per_layer = 24 * tokens * width**2 + 4 * tokens**2 * width
    return layers * per_layer + 2 * patches * 3 * patch**2 * width + 2 * tokens * width * embed


def demo_model(*overrides: str):
    torch.manual_seed(0)
    return build_model(load_config(DEMO_CONFIG, list(overrides)))


def test_counted_vit_forward_equals_the_closed_form():
    model = demo_model()
    image, _ = flops._one_sample(model)
    counted = flops.count_forward_flops(model.image, image)
    assert counted == vit_closed_form(image=32, patch=8, width=128, layers=4, embed=128)


def test_model_flops_are_three_forwards_plus_the_logits():
    model = demo_model()
    image, text = flops._one_sample(model)
    forward = flops.count_forward_flops(model.image, image) + flops.count_forward_flops(model.text, text)
    assert flops.model_flops_per_sample(model, global_batch=1024) == 3 * forward + 3 * 2 * 128 * 1024
    # The head's share grows with the global batch; the towers' does not.
    difference = flops.model_flops_per_sample(model, 2048) - flops.model_flops_per_sample(model, 1024)
    assert difference == 3 * 2 * 128 * 1024


def test_a_locked_tower_counts_its_forward_once():
    model = demo_model("model.image.lock=true")
    assert flops.trainable_share(model.image) == 0.0
    image, text = flops._one_sample(model)
    image_forward = flops.count_forward_flops(model.image, image)
    text_forward = flops.count_forward_flops(model.text, text)
    towers = flops.tower_flops_per_sample(model)
    assert towers == {"image": image_forward, "text": 3 * text_forward}


def test_peak_table_matches_device_names(monkeypatch):
    names = {"NVIDIA H200": 989.4, "NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.0,
             "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA L40S": 362.05, "NVIDIA A10": 125.0, "NVIDIA A10G": None,
             "Some Future GPU": None}
    for name, tflops in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        expected = None if tflops is None else pytest.approx(tflops * 1e12)
        assert flops.peak_flops("cuda:0", torch.bfloat16) == expected, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32 allowed
        assert flops.peak_flops("cuda", torch.float32) == pytest.approx(494.7e12)
        torch.set_float32_matmul_precision("highest")
        assert flops.peak_flops("cuda", torch.float32) == pytest.approx(66.9e12)
    finally:
        torch.set_float32_matmul_precision(precision)


def test_peak_is_none_on_cpu_unless_overridden():
    assert flops.peak_flops("cpu", torch.bfloat16) is None
    assert flops.peak_flops("cpu", torch.float32, override_tflops=2.5) == 2.5e12
