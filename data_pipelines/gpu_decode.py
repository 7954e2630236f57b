"""`data.decode: gpu`: JPEGs decoded on the device, in one batched `torchvision.io.decode_jpeg`.

In the worker (`plan_jpeg`), a JPEG sample is not decoded: its header is read (format, size,
the pixel limit) and its crop box drawn from the sample's own seed exactly as
`ClipImageTransform.resample` draws it (`crop_box` on `random.Random(seed)`), so the stream stays
deterministic and resumable. Other images (PNG, CMYK JPEG) are decoded in the worker as with
`decode: cpu`. A batch then carries (`collate_planned`):

    "jpeg":  list of B uint8 1-D tensors, the raw bytes (empty for a sample decoded in the worker)
    "crop":  B tuples (top, left, height, width) of each JPEG's crop (zeros otherwise); a list,
             not a tensor, so it stays on the host and reading it costs no device sync
    "image": uint8 (K, C, S, S), the K samples decoded in the worker, in batch order

and `GpuJpegDecode(size, device)` (the `DeviceStream`'s `device_stage`) decodes the JPEGs on the
device, crops, resizes to S x S (bicubic, antialiased, as PIL's `Image.BICUBIC` resize) and puts
every sample in place: "image" uint8 (B, C, S, S). The JPEG bytes stay on the host (nvjpeg reads
them there). The pixels differ from PIL's by the decoders' IDCT / upsampling and the resize's
rounding (docs/input.md gives the measured difference).
"""

from __future__ import annotations

import io
import random
from typing import Any, Optional

import torch
import torch.nn.functional as F
from PIL import Image

from vlp.data_pipelines.decode import check_pixels
from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.image_transforms import ClipImageTransform

JPEG_EXTENSIONS = ("jpg", "jpeg")


def check_gpu_decode(preprocess: Any, where: str = "data.decode") -> None:
    """GPU decode replaces the training transform's decode + crop + resize: only the towers'
    `ClipImageTransform` in train mode says what those are."""
    if not (isinstance(preprocess, ClipImageTransform) and preprocess.train):
        raise DataError(f"{where}: gpu needs an image tower with vlp's training transform (open_clip_vit, timm); "
                        f"this one preprocesses with {type(preprocess).__name__}: set {where}: cpu")


def plan_jpeg(sample: dict, transform: ClipImageTransform, seed: int, max_pixels: int) -> Optional[dict]:
    """{"jpeg": uint8 (N,) bytes, "crop": (top, left, height, width)} for a JPEG the device can
    decode (RGB or grayscale), or None (decode it in the worker). Raises what PIL raises on a bad
    header and `Image.DecompressionBombError` over `max_pixels`, like `decode_image`."""
    ext = next((ext for ext in JPEG_EXTENSIONS if ext in sample), None)
    if ext is None:
        return None
    data = sample[ext]
    with Image.open(io.BytesIO(data)) as image:
        check_pixels(image, max_pixels)
        if image.format != "JPEG" or image.mode not in ("RGB", "L"):
            return None
        width, height = image.size
    box = transform.crop_box(width, height, random.Random(seed))
    return {"jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8), "crop": box}


def collate_planned(images: list) -> dict[str, Any]:
    """Per-sample results (a `plan_jpeg` dict, or a worker-decoded uint8 (C, S, S)) -> the batch
    fields "jpeg", "crop", "image" (see the module docstring)."""
    empty = torch.empty(0, dtype=torch.uint8)
    decoded = [image for image in images if torch.is_tensor(image)]
    return {
        "jpeg": [image["jpeg"] if isinstance(image, dict) else empty for image in images],
        "crop": [tuple(image["crop"]) if isinstance(image, dict) else (0, 0, 0, 0) for image in images],
        "image": torch.stack(decoded) if decoded else torch.empty(0, dtype=torch.uint8),
    }


class GpuJpegDecode:
    """device_stage: batch with "jpeg" / "crop" / "image" (K, C, S, S) -> "image" uint8 (B, C, S, S)
    on `device`. Runs on any device (on CPU through torchvision's CPU decoder: that is how tests
    and docs/input.md compare it with PIL); a training run with `decode: gpu` needs CUDA."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size, self.device = int(size), torch.device(device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from torchvision.io import ImageReadMode, decode_jpeg

        jpegs, crops = batch.pop("jpeg"), batch.pop("crop")
        on_device = [index for index, data in enumerate(jpegs) if data.numel()]
        worker_decoded = batch["image"].to(self.device)  # (K, C, S, S)
        try:
            decoded = decode_jpeg([jpegs[index] for index in on_device], mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as error:
            raise DataError(f"data.decode: gpu could not decode a JPEG of batch {batch.get('key', [])[:4]}... "
                            f"({error}); its header was readable, its body is not (decode: cpu skips such samples)") from None
        images = torch.empty((len(jpegs), 3, self.size, self.size), dtype=torch.uint8, device=self.device)
        worker_slots = [index for index in range(len(jpegs)) if not jpegs[index].numel()]
        if worker_slots:
            images[worker_slots] = worker_decoded
        for index, pixels in zip(on_device, decoded):
            top, left, height, width = crops[index]
            images[index] = self.resize(pixels[:, top:top + height, left:left + width])
        batch["image"] = images
        return batch

    def resize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (C, h, w) -> uint8 (C, S, S): bicubic with antialias (PIL's filter, a = -0.5),
        rounded and clamped as PIL stores 8-bit results."""
        if pixels.shape[-2:] == (self.size, self.size):
            return pixels
        resized = F.interpolate(pixels[None].float(), size=(self.size, self.size), mode="bicubic",
                                antialias=True, align_corners=False)[0]
        return resized.round_().clamp_(0, 255).to(torch.uint8)
