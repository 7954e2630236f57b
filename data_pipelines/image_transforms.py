"""open_clip's image transform, cut down to what a data worker has to do per sample.

`ClipImageTransform(size, train, mean, std)` computes what `open_clip.transform.image_transform`
does (train: `RandomResizedCrop(size, scale=(0.9, 1.0), ratio=(3/4, 4/3))`, bicubic with
antialias; eval: shortest side to `size`, bicubic, then a centre crop), with the same PIL
resampling calls, so a given crop gives the same pixels. What it avoids is the per-sample torch
work around them, which on small images costs more than the resampling itself (measured on the
32 px demo shards: 1.3 ms of 2.2 ms per sample went to torchvision's `get_params`, `ToTensor` and
`Normalize`):

- the crop box is drawn with Python's `random.Random(seed)` from the sample's own seed (the
  loader passes it), not from torch's global generator, so the loader need not reseed three
  global RNGs per sample;
- each sample becomes a uint8 tensor (a view of the PIL buffer, no float pass);
- `finish_batch` converts and normalises the stacked (B, C, H, W) batch in one vectorised op
  (`normalize_pixels`).

The training loader calls `transform(image, seed)` per sample and sends the stacked uint8 batch
as it is: the image tower normalises it on the device (`normalize_pixels` in its forward, 4x
fewer bytes over PCIe than float32). The eval loaders call `transform.finish_batch(images)` once
per batch (see `wants_seed` / `finish_batch` in `data_pipelines.loader`). Called as
`transform(image)` it returns the normalised float (C, H, W) tensor open_clip's transform
returns, for code that preprocesses one image at a time.
"""

from __future__ import annotations

import math
import random
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF


class ClipImageTransform:
    """PIL image -> uint8 (C, H, W) per sample; `finish_batch`: uint8 (B, C, H, W) -> normalised float."""

    wants_seed = True

    def __init__(
        self,
        size: int,
        train: bool,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        self.size, self.train = int(size), bool(train)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.scale, self.ratio = tuple(scale), tuple(ratio)

    def __call__(self, image: Image.Image, seed: Optional[int] = None) -> torch.Tensor:
        pixels = self.resample(image, seed)
        if seed is None:  # one image at a time: finish it here
            return self.finish_batch(pixels[None])[0]
        return pixels

    def resample(self, image: Image.Image, seed: Optional[int]) -> torch.Tensor:
        """The geometric part: uint8 tensor of shape (C, size, size)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.train:
            top, left, height, width = self.crop_box(image.width, image.height, random.Random(seed))
            image = image.crop((left, top, left + width, top + height))
            if image.size != (self.size, self.size):
                image = image.resize((self.size, self.size), Image.BICUBIC)
        else:
            # torchvision's own PIL functions: the output size and crop offsets match open_clip's
            # eval transform exactly (rounding of the long side, odd-size centring).
            image = TF.resize(image, self.size, interpolation=InterpolationMode.BICUBIC)
            image = TF.center_crop(image, [self.size, self.size])
        array = np.asarray(image)  # (H, W, 3) uint8, read-only view of the PIL buffer
        return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W); the copy makes it writable

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(top, left, height, width): torchvision's `RandomResizedCrop.get_params`, drawn from `rng`."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        # Fallback (as torchvision): the whole image, aspect ratio clamped into `ratio`, centred.
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def finish_batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32 (B, C, H, W), `(x / 255 - mean) / std` as torchvision's."""
        return normalize_pixels(images, torch.tensor(self.mean), torch.tensor(self.std))

    def __repr__(self) -> str:
        kind = f"train, scale={self.scale}, ratio={self.ratio}" if self.train else "eval"
        return f"ClipImageTransform(size={self.size}, {kind})"


def normalize_pixels(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                     dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """uint8 (B, C, H, W) -> `(x / 255 - mean) / std`, computed in float32 and then cast to `dtype`.

    `mean`, `std`: float32 (C,) on the images' device. The same float32 ops in the same order on
    every device, so the worker (eval loaders) and the image tower (training batches, on the
    device) give the same numbers, and a bf16 model gets exactly the bf16 rounding of them.
    The memory format is kept (a channels_last batch stays channels_last)."""
    shape = (1, -1) + (1,) * (images.ndim - 2)
    pixels = images.float().div_(255.0).sub_(mean.view(shape)).div_(std.view(shape))
    return pixels if dtype is None or dtype == torch.float32 else pixels.to(dtype)
