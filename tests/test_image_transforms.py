"""`ClipImageTransform` against open_clip's own transform, and the tokenizers' memo."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from vlp.data_pipelines.image_transforms import ClipImageTransform
from vlp.models.towers.text import HFTokenizer, OpenClipTokenizer, minilm_path

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _photo(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR).convert(mode)


@pytest.mark.parametrize("size,mode", [((50, 40), "RGB"), ((31, 77), "RGB"), ((32, 32), "L"), ((224, 300), "RGB")])
def test_eval_transform_equals_open_clip(size, mode):
    image = _photo(*size, mode=mode)
    ours = ClipImageTransform(32, train=False, mean=MEAN, std=STD)
    reference = image_transform(32, is_train=False, mean=MEAN, std=STD)
    expected = reference(image)
    torch.testing.assert_close(ours(image), expected, rtol=0, atol=1e-6)
    # The loader's two-step path: uint8 per sample, normalised once per batch.
    pixels = ours(image, 123)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32)
    torch.testing.assert_close(ours.finish_batch(torch.stack([pixels, pixels]))[1], expected, rtol=0, atol=1e-6)


def test_train_transform_is_open_clips_crop_with_its_own_draw():
    """For the box it draws, the pixels are torchvision's resized_crop + ToTensor + Normalize."""
    image = _photo(60, 45, seed=1)
    ours = ClipImageTransform(32, train=True, mean=MEAN, std=STD)
    for seed in range(20):
        top, left, height, width = ours.crop_box(60, 45, random.Random(seed))
        expected = TF.normalize(TF.to_tensor(TF.resized_crop(image, top, left, height, width, [32, 32],
                                                             InterpolationMode.BICUBIC)), MEAN, STD)
        torch.testing.assert_close(ours.finish_batch(ours(image, seed)[None])[0], expected, rtol=0, atol=1e-6)


def test_train_crop_boxes_follow_random_resized_crop():
    ours = ClipImageTransform(32, train=True, mean=MEAN, std=STD, scale=(0.5, 1.0))
    areas, seen = [], set()
    for seed in range(400):
        top, left, height, width = ours.crop_box(80, 60, random.Random(seed))
        assert 0 <= top and top + height <= 60 and 0 <= left and left + width <= 80
        ratio = width / height
        assert 3 / 4 - 0.05 <= ratio <= 4 / 3 + 0.05
        areas.append(width * height / (80 * 60))
        seen.add((top, left, height, width))
    assert min(areas) >= 0.49 and max(areas) <= 1.0 and np.mean(areas) > 0.6
    assert len(seen) > 300  # a real draw, not one box
    # The same seed gives the same crop; the fallback of a strip keeps the ratio in range.
    assert ours.crop_box(80, 60, random.Random(5)) == ours.crop_box(80, 60, random.Random(5))
    top, left, height, width = ours.crop_box(400, 10, random.Random(0))
    assert height == 10 and width == round(10 * 4 / 3) and left == (400 - width) // 2


def test_transform_pickles_and_repeats():
    ours = ClipImageTransform(16, train=True, mean=MEAN, std=STD)
    clone = pickle.loads(pickle.dumps(ours))
    image = _photo(40, 40)
    assert torch.equal(ours(image, 7), clone(image, 7))
    assert not torch.equal(ours(image, 7), ours(image, 8))


@pytest.mark.parametrize("make", [lambda: OpenClipTokenizer(16), lambda: HFTokenizer(minilm_path(), 16)],
                         ids=["open_clip", "hf"])
def test_memo_tokenizer_rows_equal_the_unmemoised_tokenizer(make):
    texts = ["a handwritten seven", "No pleural effusion.", "a handwritten seven", "", "the digit 3 " * 10]
    memo, plain = make(), make()
    plain.memo_size = 0
    first = memo(texts)
    assert torch.equal(first, plain(texts))
    first[0].fill_(-1)  # the caller owns its batch: writing into it leaves the memo alone
    assert torch.equal(memo(texts[::-1]), plain(texts[::-1]))
    assert memo([]).shape == (0, 16)
    # Bounded: least recently used texts go first.
    memo.memo_size = 2
    memo(["x one", "x two", "x three"])
    assert list(memo._memo) == ["x two", "x three"]
    clone = pickle.loads(pickle.dumps(memo))
    assert clone._tok is None and not clone._memo and torch.equal(clone(texts), plain(texts))
