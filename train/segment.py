"""`vlp segment CONFIG`: lesion segmentation with MONAI's UNETR on a vlp 3-D ViT (SimCroP's
segmentation protocol, docs/ct.md "Segmentation").

One run fine-tunes `monai.networks.nets.UNETR` on the lesion masks of CT shards (`.mask.npy`, the
voxels of lesion i hold i + 1; the `.json` "lesions" say each one's kind) and reports the Dice of
every lesion class on held-out shards (`monai.metrics.DiceMetric`). `model.variant` says where
the UNETR's ViT starts:

* `pretrained`: the encoder's weights (a `vlp export --format monai` folder, or any vlp run,
  checkpoint or export with a `monai_vit3d` tower), everything trains;
* `frozen`: the same weights, the ViT locked (only the UNETR's convolutional decoder trains);
* `scratch`: the same architecture, randomly initialised.
Everything else (data, steps, batches, decoder, seed) is the same, so the three differ only in the
encoder's start. `--seeds 0 1 2` runs every variant for every seed and prints the spread.

UNETR and vlp's towers: MONAI's UNETR builds its ViT with 16^3 patches and 12 layers and takes the
hidden states of blocks 3, 6 and 9 as skips. A tower of that shape goes into MONAI's UNETR as it
is. Any other (the ct-lesions towers: 8^3 patches, 4 layers) goes into `TowerUNETR`, MONAI's UNETR
whose ViT is the tower's, whose skips are the blocks at a quarter, half and three quarters of the
depth (3, 6, 9 of 12, as MONAI's), and whose last up-sampling follows the patch edge (MONAI's
decoder doubles the grid four times for 16; for an 8 edge the last doubling becomes a 1x step).

Data are read into memory once (a segmentation recipe here is a few hundred volumes of 32^3):
the tower's own eval preprocessing (`VolumePreprocess.with_mask`: HU window, spacing, crop) on
volume and mask alike, then lesion instances -> class indices (background 0, `data.classes` in
order from 1). A sample without a mask, or whose mask holds a lesion its `.json` does not list or
of a kind outside `data.classes`, is a `DataError` naming the shard and the sample key (exit 2).
"""

from __future__ import annotations

import io
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from vlp.core.config import Strict, validate
from vlp.core.errors import ConfigError, DataError, InputNotFound, RunExists
from vlp.data_pipelines.sharding import expand_urls
from vlp.data_pipelines.sources.ct_lesions import LESION_KINDS
from vlp.data_pipelines.tar_reader import read_shard
from vlp.models.towers.volume import MonaiViT3DConfig
from vlp.train.config import apply_overrides, read_yaml

MONAI_CONFIG = "monai_vit_config.json"
MONAI_WEIGHTS = "monai_vit.safetensors"
MODEL_CARD = "model_card.json"


# ------------------------------------------------------------------------------ config
class SegmentDataConfig(Strict):
    train: str = Field(description="shard spec of the training volumes (with .mask.npy)")
    test: str = Field(description="shard spec of the held-out volumes")
    train_size: Optional[int] = Field(None, ge=1, description="the first N training samples (None: all)")
    test_size: Optional[int] = Field(None, ge=1, description="the first N held-out samples (None: all)")
    classes: list[str] = Field(default_factory=lambda: list(LESION_KINDS), min_length=1,
                               description="lesion kinds (.json lesions[].kind), label 1.. in this order")
    build: Optional[str] = Field(None, description="a source (e.g. ct-lesions) built into build_dir when shards are absent")
    build_dir: Optional[str] = None
    build_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _distinct(self) -> "SegmentDataConfig":
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"data.classes {self.classes}: a class is listed twice")
        return self


class SegmentModelConfig(Strict):
    encoder: str = Field(description="a `vlp export --format monai` folder, or a vlp run / checkpoint / export "
                                     "with a monai_vit3d tower: the ViT (and, for scratch, its shape)")
    variant: Literal["pretrained", "frozen", "scratch"] = "pretrained"
    feature_size: int = Field(4, ge=2, description="UNETR's convolutional width (MONAI's default 16; with 8^3 "
                                                   "patches its deep skips run at full resolution)")
    norm_name: Literal["instance", "batch"] = "instance"


class SegmentTrainConfig(Strict):
    steps: int = Field(120, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    warmup_steps: int = Field(10, ge=0)
    log_every: int = Field(20, ge=1)
    eval_batch_size: int = Field(8, ge=1)
    threads: Optional[int] = Field(None, ge=1, description="torch CPU threads (None: torch's default)")


class SegmentConfig(Strict):
    name: str
    seed: int = 0
    output_dir: str = "runs"
    data: SegmentDataConfig
    model: SegmentModelConfig
    train: SegmentTrainConfig = SegmentTrainConfig()

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def load_segment_config(path: str | Path, overrides: list[str] | None = None) -> SegmentConfig:
    """Read, override (`dotted.key=value`) and validate; `ConfigError` naming the bad key."""
    if not Path(path).is_file():
        raise InputNotFound(f"segmentation config {path} does not exist")
    return validate(SegmentConfig, apply_overrides(read_yaml(path), overrides), str(path))


# ------------------------------------------------------------------------------ encoder
class Encoder:
    """The pretrained ViT: MONAI's `ViT(**vit_args)` arguments, its weights (MONAI's names) and the
    tower config (preprocessing: roi, spacing, HU window)."""

    def __init__(self, vit_args: dict, state: dict[str, torch.Tensor], image: MonaiViT3DConfig) -> None:
        self.vit_args, self.state, self.image = vit_args, state, image


def read_encoder(path: Path, scratch_dir: Path) -> Encoder:
    """A monai export folder as it is; any other vlp run, checkpoint or export is first exported to
    monai in `scratch_dir` (the run folder keeps what it trained from)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise InputNotFound(f"model.encoder: {path} does not exist")
    if not (path / MONAI_CONFIG).is_file():
        from vlp.train.weights import export_checkpoint

        path = export_checkpoint(path, scratch_dir, "monai")
    card = path / MODEL_CARD
    if not card.is_file():
        raise InputNotFound(f"model.encoder: {path} has {MONAI_CONFIG} but no {MODEL_CARD} (write it with vlp export)")
    image_tree = json.loads(card.read_text())["config"]["model"]["image"]
    image = validate(MonaiViT3DConfig, image_tree, f"{card} config.model.image")
    meta = json.loads((path / MONAI_CONFIG).read_text())
    return Encoder(meta["vit_args"], load_file(str(path / MONAI_WEIGHTS)), image)


# ------------------------------------------------------------------------------ model
def skip_blocks(num_layers: int) -> tuple[int, int, int]:
    """The ViT blocks whose outputs UNETR's three skips take: a quarter, half and three quarters of
    the depth (MONAI's 3, 6, 9 of 12)."""
    return tuple(min(num_layers - 1, num_layers * k // 4) for k in (1, 2, 3))


class TowerUNETR(nn.Module):
    """MONAI's UNETR around any MONAI ViT whose patch edges are 8 or 16 (any depth); see the
    module docstring. Built as a `monai.networks.nets.UNETR`, then its ViT, grid, skips and last
    up-sampling replaced, so the convolutional blocks are MONAI's own."""

    def __init__(self, vit_args: dict, out_channels: int, feature_size: int, norm_name: str) -> None:
        super().__init__()
        from monai.networks.blocks.unetr_block import UnetrUpBlock
        from monai.networks.nets import UNETR, ViT

        patch = tuple(int(p) for p in vit_args["patch_size"])
        if any(p not in (8, 16) for p in patch):
            raise ConfigError(f"model.encoder: patch_size {list(patch)}: UNETR's decoder up-samples x8 then "
                              "x(patch / 8), so each patch edge must be 8 or 16")
        img_size = tuple(int(n) for n in vit_args["img_size"])
        # The UNETR is built at a 16^3 placeholder size: its convolutional blocks do not depend on
        # the image size; its ViT and grid (the parts that do) are replaced right below.
        self.unetr = UNETR(in_channels=1, out_channels=out_channels, img_size=(16, 16, 16), feature_size=feature_size,
                           hidden_size=vit_args["hidden_size"], mlp_dim=vit_args["mlp_dim"],
                           num_heads=vit_args["num_heads"], proj_type="conv", norm_name=norm_name,
                           qkv_bias=vit_args.get("qkv_bias", False))
        self.unetr.vit = ViT(**vit_args)
        self.unetr.patch_size = patch
        self.unetr.feat_size = tuple(n // p for n, p in zip(img_size, patch))
        self.unetr.proj_view_shape = list(self.unetr.feat_size) + [vit_args["hidden_size"]]
        if patch != (16, 16, 16):  # four doublings make 16; an 8 edge takes a 1x step in the last one
            self.unetr.decoder2 = UnetrUpBlock(spatial_dims=3, in_channels=feature_size * 2, out_channels=feature_size,
                                               kernel_size=3, upsample_kernel_size=tuple(p // 8 for p in patch),
                                               norm_name=norm_name, res_block=True)
        self.skips = skip_blocks(int(vit_args["num_layers"]))

    @property
    def vit(self) -> nn.Module:
        return self.unetr.vit

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """volumes (B, 1, H, W, D) -> logits (B, classes + 1, H, W, D): MONAI's UNETR.forward with
        the skip blocks of this depth."""
        net = self.unetr
        x, hidden = net.vit(volumes)  # (B, N, W_h), [(B, N, W_h)] per block
        enc1 = net.encoder1(volumes)
        enc2 = net.encoder2(net.proj_feat(hidden[self.skips[0]]))
        enc3 = net.encoder3(net.proj_feat(hidden[self.skips[1]]))
        enc4 = net.encoder4(net.proj_feat(hidden[self.skips[2]]))
        dec3 = net.decoder5(net.proj_feat(x), enc4)
        dec2 = net.decoder4(dec3, enc3)
        dec1 = net.decoder3(dec2, enc2)
        return net.out(net.decoder2(dec1, enc1))


def build_unetr(encoder: Encoder, classes: int, config: SegmentModelConfig) -> tuple[nn.Module, nn.Module]:
    """(the segmentation network, its ViT) for `config.variant`: MONAI's UNETR itself for a
    16^3-patch 12-layer ViT, `TowerUNETR` otherwise; weights loaded (strict) unless scratch."""
    from monai.networks.nets import UNETR

    args = encoder.vit_args
    if tuple(args["patch_size"]) == (16, 16, 16) and int(args["num_layers"]) == 12:
        net = UNETR(in_channels=1, out_channels=classes + 1, img_size=tuple(args["img_size"]),
                    feature_size=config.feature_size, hidden_size=args["hidden_size"], mlp_dim=args["mlp_dim"],
                    num_heads=args["num_heads"], proj_type="conv", norm_name=config.norm_name,
                    qkv_bias=args.get("qkv_bias", False))
        vit = net.vit
    else:
        net = TowerUNETR(args, classes + 1, config.feature_size, config.norm_name)
        vit = net.vit
    if config.variant != "scratch":
        vit.load_state_dict(encoder.state, strict=True)
    if config.variant == "frozen":
        vit.requires_grad_(False)
    return net, vit


# ------------------------------------------------------------------------------ data
def lesion_labels(mask: np.ndarray, meta: dict, classes: list[str], where: str) -> np.ndarray:
    """Instance mask (lesion i -> i + 1, 0 background) -> class labels (0 background, classes[k]
    -> k + 1), from the `.json` lesions' `mask_value` and `kind`. `where` names the sample."""
    index = {kind: k + 1 for k, kind in enumerate(classes)}
    values = {int(lesion["mask_value"]): lesion.get("kind") for lesion in meta.get("lesions", [])}
    labels = np.zeros(mask.shape, dtype=np.int64)
    for value in np.unique(mask):
        value = int(value)
        if value == 0:
            continue
        if value not in values:
            raise DataError(f"{where}: mask value {value} but its .json lists {len(values)} lesion(s) "
                            f"(mask values {sorted(values)})")
        kind = values[value]
        if kind not in index:
            raise DataError(f"{where}: lesion kind {kind!r} (mask value {value}) is not in data.classes {classes}")
        labels[mask == value] = index[kind]
    return labels


def read_split(spec: str, limit: Optional[int], preprocess: Any, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first `limit` samples of `spec` -> (volumes (N, 1, H, W, D) float, labels (N, 1, H, W, D)
    long, keys), through the tower's eval preprocessing."""
    volumes, labels, keys = [], [], []
    for url in expand_urls(spec):
        if not Path(url).is_file():
            raise InputNotFound(f"shard {url} does not exist")
        for sample in read_shard(url):
            if "__bad__" in sample:
                raise DataError(f"{url}: unreadable shard ({sample.get('__detail__', 'bad tar')})")
            where = f"{url}: sample {sample['__key__']}"
            if "mask.npy" not in sample:
                raise DataError(f"{where} has no mask.npy (segmentation needs each sample's lesion mask)")
            meta = json.loads(sample["json"]) if "json" in sample else {}
            mask = np.load(io.BytesIO(sample["mask.npy"]), allow_pickle=False)
            volume, instance = preprocess.with_mask(sample, mask)  # (1, H, W, D) each, same grid
            volumes.append(volume)
            labels.append(torch.from_numpy(lesion_labels(instance.numpy(), meta, classes, where)))
            keys.append(sample["__key__"])
            if limit is not None and len(keys) >= limit:
                return torch.stack(volumes), torch.stack(labels), keys
    if not keys:
        raise DataError(f"shard spec {spec!r} holds no samples")
    return torch.stack(volumes), torch.stack(labels), keys


# ------------------------------------------------------------------------------ metrics
def dice_per_class(logits: torch.Tensor, labels: torch.Tensor, classes: int, metric: Any = None) -> Any:
    """Accumulate one batch into a `monai.metrics.DiceMetric` (made here when None) and return it.

    logits (B, classes + 1, H, W, D); labels (B, 1, H, W, D) long. Background is left out; a volume
    without a class in its labels adds nothing to that class (MONAI's `ignore_empty`)."""
    from monai.metrics import DiceMetric

    if metric is None:
        metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    one_hot = nn.functional.one_hot
    prediction = one_hot(logits.argmax(dim=1), classes + 1).permute(0, 4, 1, 2, 3)  # (B, C + 1, H, W, D)
    truth = one_hot(labels[:, 0], classes + 1).permute(0, 4, 1, 2, 3)
    metric(y_pred=prediction, y=truth)
    return metric


@torch.no_grad()
def evaluate(net: nn.Module, volumes: torch.Tensor, labels: torch.Tensor, classes: list[str], batch_size: int) -> dict[str, float]:
    """Dice of every class over the held-out volumes and their mean over the classes seen there:
    {"dice/<class>": ..., "dice_mean": ...}; a class absent from every held-out mask is NaN and
    left out of the mean."""
    was_training = net.training
    net.eval()
    metric = None
    for start in range(0, len(volumes), batch_size):
        metric = dice_per_class(net(volumes[start:start + batch_size]), labels[start:start + batch_size],
                                len(classes), metric)
    per_class = metric.aggregate().cpu().tolist()  # (classes,)
    net.train(was_training)
    results = {f"dice/{name}": float(value) for name, value in zip(classes, per_class)}
    seen = [value for value in per_class if math.isfinite(value)]
    results["dice_mean"] = float(np.mean(seen)) if seen else float("nan")
    return results


def save_slice_png(path: Path, volume: torch.Tensor, truth: torch.Tensor, prediction: torch.Tensor) -> None:
    """The axial slice with the most lesion voxels: the volume, the true labels, the prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = int((truth[0] > 0).sum(dim=(0, 1)).argmax())  # D is the axial axis
    panels = [("volume", volume[0, :, :, depth], "gray"), ("true labels", truth[0, :, :, depth], "tab10"),
              ("prediction", prediction[:, :, depth], "tab10")]
    figure, axes = plt.subplots(1, 3, figsize=(9, 3))
    for axis, (title, image, cmap) in zip(axes, panels):
        axis.imshow(image.T.numpy(), cmap=cmap, origin="lower", vmin=None if cmap == "gray" else 0,
                    vmax=None if cmap == "gray" else 9, interpolation="nearest")
        axis.set_title(title)
        axis.axis("off")
    figure.suptitle(f"axial slice {depth}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ------------------------------------------------------------------------------ run
def ensure_data(config: SegmentConfig) -> None:
    """Build the shards from `data.build` where they are missing (as `vlp train` does)."""
    from vlp.train.data import ensure_built

    data = config.data
    for spec in (data.train, data.test):
        ensure_built(spec, data.build, data.build_dir, data.build_options, is_main=True)


def segment(config: SegmentConfig, overwrite: bool = False) -> dict[str, Any]:
    """One fine-tune and evaluation; writes `results.json`, `metrics.jsonl`, `config.yaml` and
    `plots/prediction.png` into the run folder and returns the results."""
    import yaml
    from monai.losses import DiceCELoss

    from vlp.train.metrics import MetricsLogger

    run_dir = config.run_dir
    if (run_dir / "results.json").exists() and not overwrite:
        raise RunExists(f"{run_dir} already holds a segmentation run: pass --overwrite to replace it")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    started = time.time()
    ensure_data(config)
    encoder = read_encoder(Path(config.model.encoder), run_dir / "encoder")
    from vlp.data_pipelines.volume_transforms import VolumePreprocess

    image = encoder.image
    preprocess = VolumePreprocess(False, spacing=image.spacing, roi=image.roi, hu_window=image.hu_window)
    classes = list(config.data.classes)
    train_volumes, train_labels, _ = read_split(config.data.train, config.data.train_size, preprocess, classes)
    test_volumes, test_labels, test_keys = read_split(config.data.test, config.data.test_size, preprocess, classes)

    torch.manual_seed(config.seed)  # the decoder's (and, for scratch, the ViT's) initial weights
    net, vit = build_unetr(encoder, len(classes), config.model)
    params = [p for p in net.parameters() if p.requires_grad]
    t = config.train
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)

    def lr_factor(step: int) -> float:  # linear warmup, then cosine to 0
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    # Dice over the whole batch, lesion classes only (nnU-Net's batch Dice): a lesion fills well
    # under 1% of a volume and most volumes lack most classes, so a per-volume Dice of an absent
    # class is ~1 whatever the net does, and with the background in it the loss is mostly solved
    # by predicting background (Dice near 0 on every lesion class after 120 steps, measured).
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    order = torch.Generator().manual_seed(config.seed)
    logger = MetricsLogger(run_dir, True, t.steps, report_to=())
    net.train()
    if config.model.variant == "frozen":
        vit.eval()  # no dropout in a locked encoder
    permutation, cursor = torch.randperm(len(train_volumes), generator=order), 0
    for step in range(1, t.steps + 1):
        if cursor + t.batch_size > len(permutation):  # a new epoch: a new order
            permutation, cursor = torch.randperm(len(train_volumes), generator=order), 0
        rows = permutation[cursor:cursor + t.batch_size]
        cursor += t.batch_size
        loss = loss_fn(net(train_volumes[rows]), train_labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % t.log_every == 0 or step == t.steps:
            logger.log(step, {"loss": float(loss.detach()), "lr": schedule.get_last_lr()[0]})
    logger.close()

    results = evaluate(net, test_volumes, test_labels, classes, t.eval_batch_size)
    results.update(variant=config.model.variant, seed=config.seed, steps=t.steps, train_samples=len(train_volumes),
                   test_samples=len(test_volumes), trainable_params=sum(p.numel() for p in params),
                   wall_s=round(time.time() - started, 1))
    with torch.no_grad():
        net.eval()
        best = int((test_labels > 0).flatten(1).sum(1).argmax())  # the held-out volume with most lesion voxels
        prediction = net(test_volumes[best:best + 1]).argmax(dim=1)[0]
    (run_dir / "plots").mkdir(exist_ok=True)
    save_slice_png(run_dir / "plots" / "prediction.png", test_volumes[best], test_labels[best], prediction)
    results["plot_sample"] = test_keys[best]
    (run_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def compare(config: SegmentConfig, seeds: list[int], variants: list[str], overwrite: bool) -> dict[str, Any]:
    """Every variant for every seed (one after another), each in `<name>_<variant>_s<seed>`:
    {"variants": {variant: {"values", "mean", "stdev"}}, "pretrained_minus_scratch": ...} on dice_mean."""
    table: dict[str, dict] = {}
    for variant in variants:
        values = []
        for seed in seeds:
            tree = config.model_dump()
            tree.update(seed=seed, name=f"{config.name}_{variant}_s{seed}")
            tree["model"]["variant"] = variant
            run = validate(SegmentConfig, tree, f"{config.name} ({variant}, seed {seed})")
            values.append(segment(run, overwrite=overwrite)["dice_mean"])
        table[variant] = {"values": [round(v, 4) for v in values], "mean": round(statistics.mean(values), 4),
                          "stdev": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}
    summary: dict[str, Any] = {"metric": "dice_mean", "seeds": seeds, "variants": table}
    if "pretrained" in table and "scratch" in table:
        summary["pretrained_minus_scratch"] = round(table["pretrained"]["mean"] - table["scratch"]["mean"], 4)
        summary["largest_stdev"] = max(table[v]["stdev"] for v in ("pretrained", "scratch"))
    return summary
