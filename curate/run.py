"""`vlp curate SHARDS --embeddings DIR --out DIR [--config curate.yaml]`: new shards holding the
samples that pass the configured filters, with a report and a manifest of what was dropped.

Reads the pool from `vlp embed`'s folder (refused, in one line, when it belongs to another set
of shards or is incomplete), chains the filters in `config.REASONS` order (`filters.py`), and
writes into OUT, which must not hold the input shards (nothing is modified in place):

    {shard}.tar        the kept samples of each input shard, their members byte for byte, in order
                       (written under a temporary name, then renamed; a shard with none is left out)
    sizes.json         samples per written shard (the img2dataset / open_clip convention)
    manifest.parquet   every dropped sample: key, shard, offset, reason, score, duplicate_of
    report.json        per reason: dropped and fraction; kept fraction; the config and digests
    scores.png         score histograms: all embedded samples, the kept ones, and each reason's

Samples vlp embed could not use (no image, no caption, a corrupt image, a damaged shard) are
counted under their embed reason (`empty_caption`, `missing_field`, `bad_image`, ...).
Memory: the pool's columns and image embeddings (N x E float16, plus a float32 copy for faiss
while deduplicating) are held at once, which the whole-dataset dedup needs.
"""

from __future__ import annotations

import json
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from vlp.curate import filters
from vlp.curate.config import REASONS, CurateConfig, load_curate_config
from vlp.curate.embed import SHARDS_DIR, check_manifest, read_manifest, shard_names, shard_urls, shards_digest
from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.shards import atomic_write_text
from vlp.data_pipelines.tar_reader import local_path, read_samples


@dataclass
class Pool:
    """Every sample of the embedded shards, in (shard, offset) order. Columns (N,): key, shard
    (index into `urls`), offset, status ("ok" or the embed's bad reason), score (NaN when bad),
    caption, image_sha256; image (N, E) float16 (zeros where not embedded)."""

    urls: list[str]
    key: list[str]
    shard: np.ndarray
    offset: np.ndarray
    status: np.ndarray
    score: np.ndarray
    caption: list[str]
    image_sha256: np.ndarray
    image: np.ndarray
    shard_bad: dict[int, str]

    @property
    def embedded(self) -> np.ndarray:
        return self.status == "ok"


def read_pool(embeddings: Path, urls: list[str], manifest: dict) -> Pool:
    """Load the per-shard tables and image arrays; DataError naming a missing shard folder."""
    import pyarrow.parquet as pq

    names = shard_names(urls)
    keys, shards, offsets, statuses, scores, captions, hashes, images = [], [], [], [], [], [], [], []
    shard_bad: dict[int, str] = {}
    dim = int(manifest["embed_dim"])
    for index, name in enumerate(names):
        folder = embeddings / SHARDS_DIR / name
        if not folder.is_dir():
            raise DataError(f"{embeddings}: no embeddings of shard {urls[index]} ({folder.name}): "
                            "vlp embed has not finished; rerun it to complete the folder")
        table = pq.read_table(folder / "table.parquet").to_pydict()
        stored = np.load(folder / "image.npy")
        rows = np.asarray(table["row"], np.int64)
        image = np.zeros((len(rows), dim), np.float16)
        image[rows >= 0] = stored[rows[rows >= 0]]
        summary = json.loads((folder / "shard.json").read_text())
        if summary.get("damage"):
            shard_bad[index] = summary["damage"]
        keys += table["key"]
        shards.append(np.full(len(rows), index, np.int64))
        offsets.append(np.asarray(table["offset"], np.int64))
        statuses += table["status"]
        scores.append(np.asarray(table["score"], np.float32))
        captions += table["caption"]
        hashes += table["image_sha256"]
        images.append(image)
    return Pool(urls=urls, key=keys, shard=np.concatenate(shards) if shards else np.zeros(0, np.int64),
                offset=np.concatenate(offsets) if offsets else np.zeros(0, np.int64),
                status=np.asarray(statuses, dtype=object), score=np.concatenate(scores) if scores else np.zeros(0, np.float32),
                caption=captions, image_sha256=np.asarray(hashes, dtype=object),
                image=np.concatenate(images) if images else np.zeros((0, dim), np.float16), shard_bad=shard_bad)


def read_target(target: str, pool_manifest: dict) -> np.ndarray:
    """The image embeddings (T, E) of an image filter's target set: a vlp embed folder of the same model."""
    folder = Path(target)
    found = read_manifest(folder)
    if found is None:
        raise DataError(f"curate.image_filter.target: {folder}: not a vlp embed folder (no embed.json)")
    check_manifest(found, {"model": pool_manifest["model"], "model_digest": pool_manifest["model_digest"]}, folder)
    parts = [np.load(path / "image.npy") for path in sorted((folder / SHARDS_DIR).iterdir()) if path.is_dir()
             and not path.name.startswith(".")]
    target_image = np.concatenate(parts) if parts else np.zeros((0, int(found["embed_dim"])), np.float16)
    if not len(target_image):
        raise DataError(f"curate.image_filter.target: {folder}: holds no embedded sample")
    return target_image


@dataclass
class Decision:
    """What the filters decided: reason (N,) ("" kept), duplicate_of (N,) index or -1, and per
    filter extras for the report."""

    reason: np.ndarray
    duplicate_of: np.ndarray
    extras: dict


def decide(pool: Pool, config: CurateConfig, base: Path, target: Optional[np.ndarray] = None) -> Decision:
    """Chain the filters over the pool (see `config` for the order)."""
    count = len(pool.key)
    reason = np.where(pool.embedded, "", pool.status).astype(object)
    duplicate_of = np.full(count, -1, np.int64)
    extras: dict = {}

    def apply(name: str, drops: np.ndarray) -> None:
        reason[drops & (reason == "")] = name

    def alive() -> np.ndarray:
        return reason == ""

    if config.caption is not None:
        for name, drops in filters.caption_drops(pool.caption, alive(), config.caption, base).items():
            apply(name, drops)
    if config.score is not None:
        apply("low_score", filters.score_drops(pool.score, pool.embedded, alive(), config.score))
    if config.image_filter is not None:
        apply("image_filter", filters.image_filter_drops(pool.image, alive(), target, config.image_filter))
    if config.dedup is not None:
        if config.dedup.exact:
            drops, of = filters.exact_duplicate_drops(pool.image_sha256, alive())
            apply("duplicate_exact", drops)
            duplicate_of[drops] = of[drops]
        if config.dedup.threshold is not None:
            drops, of = filters.near_duplicate_drops(pool.image, alive(), config.dedup)
            apply("duplicate_near", drops)
            duplicate_of[drops] = of[drops]
    if config.balance is not None:
        drops, counts = filters.balance_drops(pool.caption, pool.key, alive(), config.balance, base)
        apply("balance", drops)
        extras["balance_matches"] = counts
    return Decision(reason=reason, duplicate_of=duplicate_of, extras=extras)


# ------------------------------------------------------------------ writing
def write_kept_shards(pool: Pool, keep: np.ndarray, out: Path) -> dict[str, int]:
    """One output tar per input shard with kept samples, members copied byte for byte; returns
    {file name: samples} (also written to sizes.json)."""
    names = [Path(local_path(url)).name for url in pool.urls]
    if len(set(names)) != len(names):  # the same file name in two folders: number them
        names = [f"{name}.tar" for name in shard_names(pool.urls)]
    sizes: dict[str, int] = {}
    for index, url in enumerate(pool.urls):
        wanted = set(pool.offset[(pool.shard == index) & keep].tolist())
        if not wanted:
            continue
        final = out / names[index]
        tmp = out / f".{names[index]}.tmp{os.getpid()}"
        written = 0
        with tarfile.open(tmp, "w") as tar:
            for offset, sample in read_samples(url):
                if offset not in wanted:
                    continue
                for ext, data in sample.items():
                    if ext.startswith("__"):
                        continue
                    data = bytes(data)
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, _reader(data))
                written += 1
        if written != len(wanted):
            tmp.unlink(missing_ok=True)
            raise DataError(f"{url}: {len(wanted) - written} kept samples are no longer in the shard "
                            "(it changed after vlp embed)")
        os.replace(tmp, final)
        sizes[final.name] = written
    atomic_write_text(out / "sizes.json", json.dumps(sizes, indent=1, sort_keys=True))
    return sizes


def _reader(data: bytes):
    import io

    return io.BytesIO(data)


def write_manifest(pool: Pool, decision: Decision, out: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dropped = np.flatnonzero(decision.reason != "")
    of = decision.duplicate_of[dropped]
    table = pa.table({
        "key": pa.array([pool.key[i] for i in dropped], pa.string()),
        "shard": pa.array([pool.urls[pool.shard[i]] for i in dropped], pa.string()),
        "offset": pa.array(pool.offset[dropped], pa.int64()),
        "reason": pa.array(decision.reason[dropped].tolist(), pa.string()),
        "score": pa.array(pool.score[dropped], pa.float32()),
        "duplicate_of": pa.array([pool.key[j] if j >= 0 else "" for j in of], pa.string()),
    })
    tmp = out / f".manifest.parquet.tmp{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, out / "manifest.parquet")
    return len(dropped)


def plot_scores(pool: Pool, decision: Decision, out_png: Path) -> Optional[Path]:
    """Histograms of the image-text score: all embedded samples, the kept ones, each drop reason."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    scores = pool.score[pool.embedded]
    if not len(scores):
        return None
    bins = np.linspace(float(scores.min()), float(scores.max()) + 1e-6, 41)
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.hist(scores, bins=bins, histtype="step", color="black", label=f"all ({len(scores)})")
    kept = pool.score[decision.reason == ""]
    axis.hist(kept, bins=bins, alpha=0.5, label=f"kept ({len(kept)})")
    for name in REASONS:
        part = pool.score[(decision.reason == name) & pool.embedded]
        if len(part):
            axis.hist(part, bins=bins, histtype="step", label=f"{name} ({len(part)})")
    axis.set_xlabel("image-text score (model's own geometry)")
    axis.set_ylabel("samples")
    axis.legend(fontsize=8)
    figure.tight_layout()
    tmp = out_png.with_name(f".{out_png.name}.tmp{os.getpid()}.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    os.replace(tmp, out_png)
    return out_png


def curate(spec: str, embeddings: Path, out: Path, config_path: Optional[str] = None, overwrite: bool = False) -> dict:
    """The whole `vlp curate` run; returns the report."""
    config, base = load_curate_config(config_path)
    urls = shard_urls(spec)
    embeddings, out = Path(embeddings), Path(out)
    manifest = read_manifest(embeddings)
    if manifest is None:
        raise DataError(f"{embeddings}: not a vlp embed folder (no embed.json)")
    check_manifest(manifest, {"model": manifest["model"], "model_digest": manifest["model_digest"],
                              "shards": urls, "shards_digest": shards_digest(urls)}, embeddings)
    inputs = {Path(local_path(url)).resolve().parent for url in urls}
    if out.resolve() in inputs:
        raise DataError(f"--out {out}: holds the input shards; vlp curate writes new shards elsewhere")
    if (out / "report.json").exists() and not overwrite:
        raise DataError(f"--out {out}: holds an earlier vlp curate run (report.json); pass --overwrite")
    target = read_target(config.image_filter.target, manifest) if config.image_filter is not None else None

    started = time.perf_counter()
    pool = read_pool(embeddings, urls, manifest)
    decision = decide(pool, config, base, target)
    decided = time.perf_counter() - started
    if out.exists() and overwrite:
        for old in list(out.glob("*.tar")) + [out / "sizes.json", out / "manifest.parquet", out / "report.json"]:
            old.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    keep = decision.reason == ""
    sizes = write_kept_shards(pool, keep, out)
    write_manifest(pool, decision, out)
    total = len(pool.key)
    counts = Counter(decision.reason[~keep].tolist())
    report = {
        "samples": total, "kept": int(keep.sum()), "kept_fraction": round(float(keep.mean()), 6) if total else 0.0,
        "dropped": {reason: {"count": count, "fraction": round(count / total, 6)} for reason, count in sorted(counts.items())},
        "bad_shards": {pool.urls[index]: detail for index, detail in pool.shard_bad.items()},
        "shards_written": len(sizes), "out": str(out),
        "embeddings": str(embeddings), "model": manifest["model"], "model_digest": manifest["model_digest"],
        "shards_digest": manifest["shards_digest"], "config": config.model_dump(mode="json"),
        "filter_seconds": round(decided, 3), **decision.extras,
    }
    plot = plot_scores(pool, decision, out / "scores.png")
    report["plots"] = [plot.name] if plot is not None else []
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    return report
