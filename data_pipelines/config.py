"""Typed configs for the data section of an experiment (`data.*`)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from vlp.core.config import Strict
from vlp.core.errors import ConfigError
from vlp.data_pipelines.decode import PIL_MAX_IMAGE_PIXELS


def refuse_shell_urls(spec: str, where: str = "", hint: str = "set data.allow_pipe_urls: true to allow them") -> str:
    """webdataset runs `pipe:CMD` shard URLs through a shell; a config must opt in to that."""
    if any(part.strip().startswith("pipe:") for part in spec.split("::")):
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}'pipe:' URLs run shell commands; {hint}")
    return spec


class SourceConfig(Strict):
    """One shard source. `urls` is a webdataset shard spec: brace ranges
    (`shards/{000000..000099}.tar`) and several specs joined with `::`."""

    urls: str
    weight: float = Field(1.0, gt=0)


class DataConfig(Strict):
    train: list[SourceConfig] = Field(min_length=1)
    # Offline dataset to build into `build_dir` when the shards named in `train` are absent
    # (`vlp shards build NAME --out build_dir`): "digits", "shapes", "ct-lesions", ...
    build: Optional[str] = None
    build_dir: Optional[str] = None
    build_options: dict = Field(default_factory=dict)
    # "epoch": every sample once per epoch (shards split across ranks and workers);
    # "resampled": shards drawn with replacement, an endless stream (img2dataset-scale data).
    mode: Literal["epoch", "resampled"] = "epoch"
    shuffle_buffer: int = Field(1000, ge=0)
    workers: int = Field(2, ge=0)
    caption_key: str = "txt"
    # A second, more generic caption per sample (e.g. "parent.txt": "a digit" for "a handwritten
    # 7") -> batch["parent_text"] (B, 1, L); the meru head's `parent_weight` puts each sample's
    # image and caption inside its parent's entailment cone.
    parent_caption_key: Optional[str] = None
    # Loader-side sampling of K sub-captions from a long caption (fine-grained heads).
    sub_captions: int = Field(0, ge=0)
    sub_caption_sentences: int = Field(3, ge=1, description="most sentences per sub-caption (FLAIR: 3)")
    # Loader-side sentence split (`data_pipelines.text.split_sentences`): at most this many
    # sentences per sample as batch["sentences"] (B, S, L) with batch["sentence_mask"] (B, S).
    sentences: int = Field(0, ge=0)
    # Stop the run when more than this fraction of the samples in a window of `bad_window`
    # samples were bad (corrupt image, empty caption, ...).
    max_bad_fraction: float = Field(0.5, ge=0, le=1)
    bad_window: int = Field(1000, ge=1)
    # `pipe:` shard URLs (e.g. `pipe:aws s3 cp s3://bucket/{0..9}.tar -`) run a shell command
    # per shard; they are refused unless this is set.
    allow_pipe_urls: bool = False
    max_image_pixels: int = Field(PIL_MAX_IMAGE_PIXELS, ge=1)
    # Where training JPEGs are decoded: "cpu" in the loader workers (PIL), or "gpu": the workers
    # send the bytes and each sample's crop box, the device decodes the batch (nvjpeg via
    # torchvision.io.decode_jpeg), crops and resizes (data_pipelines/gpu_decode.py, docs/input.md).
    decode: Literal["cpu", "gpu"] = "cpu"

    @model_validator(mode="after")
    def _no_shell_unless_allowed(self):
        if not self.allow_pipe_urls:
            for index, source in enumerate(self.train):
                refuse_shell_urls(source.urls, f"data.train.{index}.urls")
        return self
