"""Typed configs for the data section of an experiment (`data.*`)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceConfig(_Strict):
    """One shard source. `urls` is a webdataset shard spec: brace ranges
    (`shards/{000000..000099}.tar`) and several specs joined with `::`."""

    urls: str
    weight: float = Field(1.0, gt=0)


class DataConfig(_Strict):
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
    # Loader-side sampling of K sub-captions from a long caption (fine-grained heads).
    sub_captions: int = Field(0, ge=0)
    # Loader-side sentence split (`data_pipelines.text.split_sentences`): at most this many
    # sentences per sample as batch["sentences"] (B, S, L) with batch["sentence_mask"] (B, S).
    sentences: int = Field(0, ge=0)
    # Stop the run when more than this fraction of the samples in a window of `bad_window`
    # samples were bad (corrupt image, empty caption, ...).
    max_bad_fraction: float = Field(0.5, ge=0, le=1)
    bad_window: int = Field(1000, ge=1)
    max_image_pixels: int = Field(89_478_485, ge=1)  # PIL's default decompression-bomb limit
