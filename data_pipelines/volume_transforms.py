"""CT volume preprocessing: the MONAI pipeline from an HU volume to the tensor the volume tower takes.

Axis order. Every volume tensor in `vlp` is MONAI's `(C, H, W, D)` with C = 1: the three spatial
axes are the RAS+ world axes after `Orientationd("RAS")`, so index 0 grows toward the patient's
Right, index 1 toward Anterior, index 2 toward Superior (D is the axial slice axis, last).
Batches are `(B, 1, H, W, D)`. The MONAI ViT in `models/towers/volume.py` takes the same order
(`img_size=(H, W, D)`, `patch_size=(16, 16, 8)`), so a checkpoint's encoder drops into MONAI's
UNETR with no permutation.

Intensities. The last transform maps the HU window `hu_window` (default [-1000, 1000]) linearly
onto [-1, 1] and clips. The pipeline is MONAI dictionary transforms (`EnsureChannelFirstd ->
Orientationd -> Spacingd -> ScaleIntensityRanged -> SpatialPadd -> RandSpatialCropd |
CenterSpatialCropd -> RandFlipd`); reading (and the HU rule) is `vlp.data_pipelines.volume_io`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from vlp.data_pipelines.volume_io import Volume, VolumeError, decode_sample_volume, read_volume

DEFAULT_HU_WINDOW = (-1000.0, 1000.0)


# nibabel's axis-label convention, passed explicitly (MONAI is changing its default).
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def _to_meta(array: np.ndarray, affine: np.ndarray):
    from monai.data import MetaTensor

    return MetaTensor(torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32), affine=torch.as_tensor(affine))


def build_transforms(
    train: bool,
    spacing: Optional[Sequence[float]],
    roi: Sequence[int],
    hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
    flip_prob: float = 0.0,
    keys: Sequence[str] = ("image",),
    label_keys: Sequence[str] = (),
):
    """The MONAI dictionary pipeline on {"image": MetaTensor (H, W, D) HU, [label keys]}.

    spacing None keeps the stored spacing (shards are resampled at build time). Labels (lesion
    masks) follow every spatial transform with nearest-neighbour interpolation.
    """
    import monai.transforms as mt

    all_keys = list(keys) + list(label_keys)
    modes = ["bilinear"] * len(keys) + ["nearest"] * len(label_keys)
    steps: list = [
        mt.EnsureChannelFirstd(all_keys, channel_dim="no_channel"),
        mt.Orientationd(all_keys, axcodes="RAS", labels=_RAS_LABELS),
    ]
    if spacing is not None:
        steps.append(mt.Spacingd(all_keys, pixdim=tuple(float(s) for s in spacing), mode=modes))
    low, high = float(hu_window[0]), float(hu_window[1])
    steps += [
        mt.ScaleIntensityRanged(list(keys), a_min=low, a_max=high, b_min=-1.0, b_max=1.0, clip=True),
        # Pad with air (-1 after windowing) rather than 0 (= mid-window, soft tissue-like).
        mt.SpatialPadd(list(keys), spatial_size=tuple(roi), mode="constant", constant_values=-1.0),
    ]
    if label_keys:
        steps.append(mt.SpatialPadd(list(label_keys), spatial_size=tuple(roi), mode="constant"))
    if train:
        steps.append(mt.RandSpatialCropd(all_keys, roi_size=tuple(roi), random_size=False))
        if flip_prob > 0:
            steps += [mt.RandFlipd(all_keys, prob=flip_prob, spatial_axis=axis) for axis in range(3)]
    else:
        steps.append(mt.CenterSpatialCropd(all_keys, roi_size=tuple(roi)))
    return mt.Compose(steps)


class VolumePreprocess:
    """Picklable sample -> FloatTensor (1, H, W, D) in [-1, 1] (RAS, `spacing`, `roi`).

    Called by the shard loader with the raw sample dict (`wants_sample = True`), or with a path
    (NIfTI, `.npy`, DICOM folder). The MONAI pipeline is built lazily inside each worker.

    train: random crop (and flips when flip_prob > 0) vs centre crop. Flips are off by default:
    a left-right flip makes "right lower lobe" in the paired report false.
    spacing: target voxel spacing in mm (x, y, z); None keeps the stored spacing.
    """

    wants_sample = True

    def __init__(
        self,
        train: bool,
        spacing: Optional[Sequence[float]] = (1.5, 1.5, 3.0),
        roi: Sequence[int] = (224, 224, 112),
        hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
        flip_prob: float = 0.0,
        seed: Optional[int] = None,
    ) -> None:
        if len(roi) != 3 or min(roi) < 1:
            raise ValueError(f"roi must be three positive sizes (H, W, D), got {roi}")
        if hu_window[1] <= hu_window[0]:
            raise ValueError(f"hu_window must be [low, high] with low < high, got {hu_window}")
        self.train = bool(train)
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.roi = tuple(int(r) for r in roi)
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        self.flip_prob = float(flip_prob)
        self.seed = seed
        self._fn = None
        self._fn_masked = None

    def _transform(self, with_mask: bool):
        attr = "_fn_masked" if with_mask else "_fn"
        if getattr(self, attr) is None:
            fn = build_transforms(
                self.train, self.spacing, self.roi, self.hu_window, self.flip_prob,
                label_keys=("mask",) if with_mask else (),
            )
            if self.seed is not None:
                fn.set_random_state(seed=self.seed)
            setattr(self, attr, fn)
        return getattr(self, attr)

    def load(self, item: Any) -> Volume:
        if isinstance(item, dict):
            volume = decode_sample_volume(item)
        elif isinstance(item, Volume):
            volume = item
        else:
            volume = read_volume(item)
        # NaN/inf voxels would poison every patch they touch (and the loss); the loader counts
        # the raised error as a bad sample and moves on.
        if not np.isfinite(volume.array).all():
            bad = int((~np.isfinite(volume.array)).sum())
            raise VolumeError(f"{volume.source}: {bad} non-finite voxels")
        return volume

    def __call__(self, item: Any) -> torch.Tensor:
        volume = self.load(item)
        out = self._transform(False)({"image": _to_meta(volume.array, volume.affine)})
        return out["image"].as_tensor().float()

    def with_mask(self, item: Any, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Volume and a voxel label map on the same grid -> ((1, H, W, D) float, (1, H, W, D) long)."""
        volume = self.load(item)
        if mask.shape != volume.array.shape:
            raise VolumeError(f"{volume.source}: mask shape {mask.shape} != volume shape {volume.array.shape}")
        out = self._transform(True)(
            {"image": _to_meta(volume.array, volume.affine), "mask": _to_meta(mask.astype(np.float32), volume.affine)}
        )
        return out["image"].as_tensor().float(), out["mask"].as_tensor().round().long()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fn"] = state["_fn_masked"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"VolumePreprocess(train={self.train}, spacing={self.spacing}, roi={self.roi}, "
            f"hu_window={self.hu_window}, flip_prob={self.flip_prob})"
        )


def resample_to_spacing(volume: Volume, spacing: Sequence[float]) -> Volume:
    """Orient to RAS and resample to `spacing` (build time, so shards are small): trilinear."""
    import monai.transforms as mt

    fn = mt.Compose(
        [
            mt.EnsureChannelFirstd(["image"], channel_dim="no_channel"),
            mt.Orientationd(["image"], axcodes="RAS", labels=_RAS_LABELS),
            mt.Spacingd(["image"], pixdim=tuple(float(s) for s in spacing), mode="bilinear", padding_mode="border"),
        ]
    )
    out = fn({"image": _to_meta(volume.array, volume.affine)})["image"]
    return Volume(out.as_tensor()[0].numpy(), out.affine.numpy().astype(np.float64), volume.hu, volume.source, volume.extra)

