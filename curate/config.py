"""The `curate:` section: which filters `vlp curate` applies, validated like every vlp config.

Every filter is off unless its section is present. Filters run in a fixed order, each on the
samples the earlier ones kept, and a dropped sample is recorded under the first reason that
dropped it (`REASONS`):

    bad samples (found by vlp embed) -> caption -> score -> image_filter -> dedup -> balance

so a duplicate whose caption is junk is dropped for its caption, and the copy kept by dedup is
one that passed everything else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from vlp.core.config import Strict, validate
from vlp.core.errors import ConfigError

# Drop reasons a filter writes into the manifest, in the order the filters run.
REASONS = ("caption_length", "caption_language", "caption_blocklist", "low_score", "image_filter",
           "duplicate_exact", "duplicate_near", "balance")


class ScoreFilter(Strict):
    """DataComp's CLIP-score filter on the image-text score `vlp embed` stored (the model's own
    geometry: cosine for CLIP/SigLIP heads). Exactly one of `min` (keep score >= min) and
    `top_fraction` (keep the best fraction of every embedded sample of the pool, ties by
    (shard, offset))."""

    min: Optional[float] = None
    top_fraction: Optional[float] = Field(default=None, gt=0, le=1)

    @model_validator(mode="after")
    def _one(self) -> "ScoreFilter":
        if (self.min is None) == (self.top_fraction is None):
            raise ValueError("curate.score: set exactly one of min and top_fraction")
        return self


class DedupFilter(Strict):
    """Duplicate removal over the whole dataset. `exact`: identical image bytes (SHA-256 stored
    by vlp embed). `threshold`: near duplicates, image embeddings whose cosine similarity is at
    least this (None: exact only). Which copy stays is deterministic: samples are visited in
    (shard, offset) order and one is kept unless a sample already kept is its duplicate.
    `index`: faiss index for the neighbour search; `auto` is exact (flat) up to 200,000 samples
    and an inverted file (IVF, sqrt(N) lists, `nprobe` probed) above, where flat search is
    quadratic."""

    exact: bool = True
    threshold: Optional[float] = Field(default=0.95, gt=0, le=1)
    index: Literal["auto", "flat", "ivf"] = "auto"
    nprobe: int = Field(default=16, ge=1)


class CaptionFilter(Strict):
    """Caption rules. Words are whitespace-separated. `languages`: ISO 639-1 codes a caption's
    detected language (py3langid, offline) must be among, with at least `min_language_probability`
    (short captions get low probabilities: keep this low). `blocklist`: case-insensitive
    substrings, given inline or as a file (one per line)."""

    min_words: int = Field(default=0, ge=0)
    max_words: Optional[int] = Field(default=None, ge=1)
    min_chars: int = Field(default=0, ge=0)
    max_chars: Optional[int] = Field(default=None, ge=1)
    languages: Optional[list[str]] = None
    min_language_probability: float = Field(default=0.0, ge=0, le=1)
    blocklist: Union[list[str], str, None] = None

    def blocked_words(self, base: Path) -> list[str]:
        return _word_list(self.blocklist, base, "curate.caption.blocklist")


class BalanceFilter(Strict):
    """MetaCLIP's balancing: each caption is matched (case-insensitive substrings) against a
    metadata list; a sample that matches no entry is dropped, each entry selects at most
    `per_entry` of its matching samples (drawn by a hash of `seed` and the sample key, so the
    choice does not depend on the order or the world size), and a sample is kept when any of its
    entries selects it, so tail entries keep all their samples."""

    metadata: Union[list[str], str]
    per_entry: int = Field(ge=1)
    seed: int = 0

    def entries(self, base: Path) -> list[str]:
        return _word_list(self.metadata, base, "curate.balance.metadata")


class ImageFilter(Strict):
    """DataComp's image-based filter: k-means (faiss) over the pool's image embeddings into
    `clusters` clusters; each image embedding of the target set (an embeddings folder written by
    `vlp embed` with the same model) picks its nearest centroid; pool samples whose centroid was
    picked are kept."""

    target: str
    clusters: int = Field(ge=1)
    iterations: int = Field(default=20, ge=1)
    seed: int = 0


class CurateConfig(Strict):
    """The filters of one `vlp curate` run (the `curate:` section of its YAML)."""

    caption: Optional[CaptionFilter] = None
    score: Optional[ScoreFilter] = None
    image_filter: Optional[ImageFilter] = None
    dedup: Optional[DedupFilter] = None
    balance: Optional[BalanceFilter] = None


class CurateFile(Strict):
    """A curate YAML: one `curate:` section (so it can sit beside other sections in a file the
    user keeps, and the errors read `curate.score.min`)."""

    curate: CurateConfig = CurateConfig()


def _word_list(value: Union[list[str], str, None], base: Path, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        path = Path(value) if Path(value).is_absolute() else base / value
        if not path.is_file():
            raise ConfigError(f"{key}: {path}: no such file")
        value = path.read_text(encoding="utf-8").splitlines()
    words = [word.strip() for word in value if word.strip()]
    return words


def load_curate_config(path: Optional[str | Path]) -> tuple[CurateConfig, Path]:
    """(the validated section, the folder relative file names in it are read from). No path: no
    filters but the bad samples. Raises ConfigError naming the file and dotted key path."""
    from vlp.train.config import read_yaml

    if path is None:
        return CurateConfig(), Path(".")
    return validate(CurateFile, read_yaml(path), str(path)).curate, Path(path).parent
