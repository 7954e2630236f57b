"""`vlp embed SHARDS --model EXPORT_OR_RUN --out DIR`: the image and caption embedding and the
image-text score of every sample, per shard, for `vlp curate`.

Layout of DIR:

    embed.json                    model and shard-list digests (checked on every rerun and by curate)
    shards/{i:06d}-{stem}/        one folder per input shard, renamed into place when complete:
        table.parquet             one row per sample, in tar order: key, shard, offset, status
                                  ("ok" or the bad-sample reason), row (into the arrays, -1 when
                                  bad), score, caption, caption_words, caption_chars, image_sha256
        image.npy, text.npy       (N_ok, E) float16, L2-normalised embeddings
        shard.json                counts: samples, per bad reason, the damage of a truncated tar

Samples are read with vlp's tar reader and decoded and preprocessed exactly as the eval loaders do
(`SamplePipeline` with the image tower's eval transform and the text tower's tokenizer). Scores
are the model's own geometry: the diagonal of the scoring head's `pairwise_scores` (the head
`vlp eval` scores with), cosine for CLIP/SigLIP, negative Lorentz distance for MERU.

Ranks: RANK / WORLD_SIZE from the environment as `vlp train` reads them (torchrun, srun), or a
Slurm array task's index (`rank_and_world`); shard i goes to rank i % WORLD_SIZE, and ranks never talk to each
other. Resume: a shard whose folder exists is skipped, and a shard folder appears whole or not at
all (written under a temporary name, then renamed), so a killed run is rerun as it was. Memory
does not grow with the dataset: the DataLoader's workers read one shard at a time, in step, and
a shard's rows are written and dropped once every worker has finished it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlp.data_pipelines.bad_samples import BadSample
from vlp.data_pipelines.collate import SamplePipeline
from vlp.data_pipelines.decode import allow_pixels
from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.sharding import expand_urls
from vlp.data_pipelines.tar_reader import is_local, local_path, read_samples

MANIFEST = "embed.json"
SHARDS_DIR = "shards"
FORMAT_VERSION = 1


# ------------------------------------------------------------------ identities
def shard_urls(spec: str) -> list[str]:
    """The shard URLs of a spec (brace ranges, `::` lists, or a folder: every `*.tar` in it,
    sorted). Raises DataError naming the first local shard that does not exist."""
    folder = Path(spec)
    if folder.is_dir():
        urls = sorted(str(path) for path in folder.glob("*.tar"))
        if not urls:
            raise DataError(f"{folder}: no .tar shards in this folder")
    else:
        urls = expand_urls(spec)
    for url in urls:
        if is_local(url) and not os.path.isfile(local_path(url)):
            raise DataError(f"shard {url} not found")
    return urls


def shard_names(urls: list[str]) -> list[str]:
    """The per-shard folder names: position in the list and file stem, so two folders' `0.tar`
    do not collide."""
    return [f"{index:06d}-{Path(local_path(url)).name.removesuffix('.tar')}" for index, url in enumerate(urls)]


def shards_digest(urls: list[str]) -> str:
    """SHA-256 of the shard list: each shard's file name and (local) byte size, in order. Moving
    the folder keeps it; another, reordered, grown or rewritten set of shards changes it."""
    digest = hashlib.sha256()
    for url in urls:
        size = os.path.getsize(local_path(url)) if is_local(url) else -1
        digest.update(f"{Path(local_path(url)).name}\t{size}\n".encode())
    return digest.hexdigest()


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes, bytes): the same weights from a run
    folder or from its export give the same digest."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\t{data.dtype}\t{tuple(data.shape)}\n".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def read_manifest(out: Path, name: str = MANIFEST, what: str = "vlp embed") -> Optional[dict]:
    """The manifest `name` of an earlier run of `what` into `out` (None when there is none)."""
    path = Path(out) / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise DataError(f"{path}: not a {what} manifest (unreadable JSON)") from None


def check_manifest(found: dict, wanted: dict, where: Path) -> None:
    """Refuse embeddings of another model or of another set of shards, in one line."""
    if found.get("version") != FORMAT_VERSION:
        raise DataError(f"{where}: embeddings format {found.get('version')!r}, this vlp reads {FORMAT_VERSION}")
    if found["model_digest"] != wanted["model_digest"]:
        raise DataError(f"{where}: embeddings of another model ({found['model']}, digest {found['model_digest'][:12]}), "
                        f"not of {wanted['model']} (digest {wanted['model_digest'][:12]})")
    if "shards_digest" in wanted and found["shards_digest"] != wanted["shards_digest"]:
        raise DataError(f"{where}: embeddings of another set of shards ({len(found['shards'])} shards, digest "
                        f"{found['shards_digest'][:12]}), not of these {len(wanted['shards'])} "
                        f"(digest {wanted['shards_digest'][:12]})")


# ------------------------------------------------------------------ reading (DataLoader workers)
@dataclass
class ShardBatches(IterableDataset):
    """Batches of the shards `todo` [(shard index, url)]: worker w of W decodes samples w, w + W,
    ... of each shard, in shard order, so all workers are on the same shard (the DataLoader takes
    their batches in turn). Each batch: {"shard", "offset" [B], "key", "caption", "sha256",
    "image" (B, C, H, W) or None, "text" (B, L) or None, "bad": [(offset, key, reason, caption)],
    "done": bool, "damage": str or None}; the last batch of each worker for a shard has done=True,
    even when that worker had no sample of it."""

    pipeline: SamplePipeline
    todo: list[tuple[int, str]]

    def __post_init__(self) -> None:
        super().__init__()

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        allow_pixels(self.pipeline.max_image_pixels)
        for shard, url in self.todo:
            items: list[dict] = []
            bad: list[tuple[int, str, str, str]] = []
            damage = None
            for offset, sample in read_samples(url, worker, None, workers):
                if "__bad__" in sample:
                    damage = sample.get("__detail__", "unreadable")
                    continue
                try:
                    image_hash = hashlib.sha256(self.pipeline.image_bytes(sample)).hexdigest()
                    decoded = self.pipeline.decode(sample, 0)
                except BadSample as failure:
                    bad.append((offset, sample["__key__"], failure.reason, _caption_text(sample)))
                    continue
                items.append({**decoded, "offset": offset, "sha256": image_hash})
                if len(items) == self.pipeline.batch_size:
                    yield self._batch(shard, items, bad, False, None)
                    items, bad = [], []
            yield self._batch(shard, items, bad, True, damage)

    def _batch(self, shard: int, items: list[dict], bad: list, done: bool, damage: Optional[str]) -> dict:
        batch = {"shard": shard, "offset": [item["offset"] for item in items], "key": [item["key"] for item in items],
                 "caption": [item["caption"] for item in items], "sha256": [item["sha256"] for item in items],
                 "image": None, "text": None, "bad": bad, "done": done, "damage": damage}
        if items:
            collated = self.pipeline.collate(items, Counter(), set(), 0)
            batch["image"], batch["text"] = collated["image"], collated["text"]
        return batch


def _caption_text(sample: dict) -> str:
    data = sample.get("txt")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return ""
    return bytes(data).decode("utf-8", "replace").strip()


# ------------------------------------------------------------------ one shard's rows
@dataclass
class ShardRows:
    """What has come back for one shard so far, from how many workers."""

    url: str
    name: str
    workers_done: int = 0
    damage: Optional[str] = None
    rows: list[dict] = field(default_factory=list)
    image: list[np.ndarray] = field(default_factory=list)
    text: list[np.ndarray] = field(default_factory=list)

    def add(self, batch: dict, image: Optional[np.ndarray], text: Optional[np.ndarray], scores: list[float]) -> None:
        start = sum(len(part) for part in self.image)
        for index, offset in enumerate(batch["offset"]):
            caption = batch["caption"][index]
            self.rows.append({"key": batch["key"][index], "offset": offset, "status": "ok", "row": start + index,
                              "score": scores[index], "caption": caption, "sha256": batch["sha256"][index]})
        for offset, key, reason, caption in batch["bad"]:
            self.rows.append({"key": key, "offset": offset, "status": reason, "row": -1, "score": float("nan"),
                              "caption": caption, "sha256": ""})
        if image is not None:
            self.image.append(image)
            self.text.append(text)
        self.damage = self.damage or batch["damage"]

    def write(self, shards_dir: Path, embed_dim: int) -> dict:
        """Write the shard's folder atomically (temporary folder, then rename); returns shard.json."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = sorted(self.rows, key=lambda row: row["offset"])
        image = np.concatenate(self.image) if self.image else np.zeros((0, embed_dim), np.float16)
        text = np.concatenate(self.text) if self.text else np.zeros((0, embed_dim), np.float16)
        order = [row["row"] for row in rows if row["row"] >= 0]  # tar order of the embedded samples
        image, text = image[order], text[order]
        renumbered = iter(range(len(order)))
        for row in rows:
            if row["row"] >= 0:
                row["row"] = next(renumbered)
        table = pa.table({
            "key": pa.array([row["key"] for row in rows], pa.string()),
            "shard": pa.array([self.url] * len(rows), pa.string()),
            "offset": pa.array([row["offset"] for row in rows], pa.int64()),
            "status": pa.array([row["status"] for row in rows], pa.string()),
            "row": pa.array([row["row"] for row in rows], pa.int64()),
            "score": pa.array([row["score"] for row in rows], pa.float32()),
            "caption": pa.array([row["caption"] for row in rows], pa.string()),
            "caption_words": pa.array([len(row["caption"].split()) for row in rows], pa.int32()),
            "caption_chars": pa.array([len(row["caption"]) for row in rows], pa.int32()),
            "image_sha256": pa.array([row["sha256"] for row in rows], pa.string()),
        })
        counts = Counter(row["status"] for row in rows)
        summary = {"url": self.url, "samples": len(rows), "embedded": counts.pop("ok", 0),
                   "bad": dict(sorted(counts.items())), "damage": self.damage}
        if self.damage is not None:
            summary["bad"]["bad_shard"] = 1
        final = shards_dir / self.name
        tmp = shards_dir / f".{self.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        pq.write_table(table, tmp / "table.parquet")
        np.save(tmp / "image.npy", image)
        np.save(tmp / "text.npy", text)
        (tmp / "shard.json").write_text(json.dumps(summary, indent=1) + "\n")
        try:
            os.replace(tmp, final)  # a directory rename: the shard's outputs appear together
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp)  # another process (an overlapping run) completed this shard first
        return summary


# ------------------------------------------------------------------ the command
def shard_loader(model: torch.nn.Module, todo: list[tuple[int, str]], batch_size: int, workers: int,
                 compute: torch.device) -> DataLoader:
    """Batches of the (index, url) shards in `todo`, decoded and tokenized for `model`'s eval view
    in `workers` processes; a batch never spans two shards (ShardBatches)."""
    pipeline = SamplePipeline(preprocess=model.image.preprocess(train=False), tokenizer=model.text.tokenizer(),
                              batch_size=batch_size)
    return DataLoader(ShardBatches(pipeline, todo), batch_size=None, num_workers=workers,
                      prefetch_factor=2 if workers else None, pin_memory=compute.type == "cuda")


def rank_and_world(environ: Optional[dict] = None) -> tuple[int, int, int]:
    """(rank, local rank, world size) as `vlp train` reads them (RANK / LOCAL_RANK / WORLD_SIZE,
    else Slurm's SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS). A Slurm array task, where no launcher
    set RANK, is rank (array index - first index) * SLURM_NTASKS + SLURM_PROCID of
    SLURM_ARRAY_TASK_COUNT * SLURM_NTASKS: ranks never talk, so array tasks can split the shards."""
    env = os.environ if environ is None else environ
    if "RANK" not in env and "SLURM_ARRAY_TASK_ID" in env:
        index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        tasks, task = int(env.get("SLURM_NTASKS", 1)), int(env.get("SLURM_PROCID", 0))
        return index * tasks + task, int(env.get("SLURM_LOCALID", 0)), int(env.get("SLURM_ARRAY_TASK_COUNT", 1)) * tasks
    # Read, never written: `fill_env` would leave RANK / MASTER_PORT in this process's environment
    # for every later subprocess (ranks of embed never talk, so no rendezvous is needed).
    if "RANK" in env:
        rank = int(env["RANK"])
        return rank, int(env.get("LOCAL_RANK", rank)), int(env.get("WORLD_SIZE", 1))
    if "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env.get("SLURM_NTASKS", 1))
    return 0, 0, 1


def embed_shards(spec: str, model_path: Path, out: Path, *, batch_size: int = 256, workers: int = 2,
                 device: str = "auto", precision: str = "fp32", rank: Optional[int] = None,
                 world_size: Optional[int] = None, show_progress: bool = True) -> dict:
    """Embed this rank's shards of `spec` into `out`; returns the summary printed by `vlp embed`."""
    from vlp.core.devices import compute_device, use_compute_device
    from vlp.models.dual_encoder import scoring_head
    from vlp.train.weights import load_model

    local_rank = 0
    if rank is None or world_size is None:
        rank, local_rank, world_size = rank_and_world()
    urls = shard_urls(spec)
    out = Path(out)
    model, _ = load_model(Path(model_path))
    wanted = {"version": FORMAT_VERSION, "model": str(model_path), "model_digest": model_digest(model),
              "shards": [local_path(url) if is_local(url) else url for url in urls], "shards_digest": shards_digest(urls),
              "embed_dim": int(model.config.embed_dim), "scoring_head": type(scoring_head(model)).__name__,
              "embeddings": "L2-normalised float16"}
    found = read_manifest(out)
    if found is not None:
        check_manifest(found, wanted, out)
    else:
        (out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        tmp = out / f".{MANIFEST}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(wanted, indent=1) + "\n")
        os.replace(tmp, out / MANIFEST)  # every rank writes the same content; the last rename wins
    names = shard_names(urls)
    mine = [(index, url) for index, url in enumerate(urls) if index % world_size == rank]
    todo = [(index, url) for index, url in mine if not (out / SHARDS_DIR / names[index]).is_dir()]

    compute = use_compute_device(compute_device(device, local_rank, announce=False))
    model.to(compute)
    head = scoring_head(model)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    loader = shard_loader(model, todo, batch_size, workers, compute)
    readers = max(workers, 1)
    pending: dict[int, ShardRows] = {}
    totals: Counter = Counter()
    bad: Counter = Counter()
    started = time.perf_counter()
    bar = progress_bar(todo, show_progress)
    with torch.no_grad():
        for batch in loader:
            shard = batch["shard"]
            if shard not in pending:
                pending[shard] = ShardRows(urls[shard], names[shard])
            rows = pending[shard]
            image = text = None
            scores: list[float] = []
            if batch["image"] is not None:
                with torch.autocast(compute.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    images = batch["image"].to(compute, non_blocking=True)
                    image_embed = model.encode_image(images)["image_embed"].float()  # (B, E)
                    text_embed = model.encode_text(batch["text"].to(compute, non_blocking=True))["text_embed"].float()
                # (B, B) is cheap next to the towers, and keeps every head's own geometry.
                scores = head.pairwise_scores(image_embed, text_embed).diagonal().float().cpu().tolist()
                image = torch.nn.functional.normalize(image_embed, dim=-1).half().cpu().numpy()
                text = torch.nn.functional.normalize(text_embed, dim=-1).half().cpu().numpy()
            rows.add(batch, image, text, scores)
            if bar is not None:
                bar.update(len(batch["offset"]) + len(batch["bad"]))
            if batch["done"]:
                rows.workers_done += 1
                if rows.workers_done == readers:
                    summary = rows.write(out / SHARDS_DIR, int(model.config.embed_dim))
                    totals.update(samples=summary["samples"], embedded=summary["embedded"], shards_done=1)
                    bad.update(summary["bad"])
                    del pending[shard]
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - started
    return {"rank": rank, "world_size": world_size, "out": str(out), "shards": len(mine),
            "shards_done": totals["shards_done"], "shards_skipped": len(mine) - len(todo),
            "samples": totals["samples"], "embedded": totals["embedded"], "bad": dict(sorted(bad.items())),
            "seconds": round(elapsed, 3), "samples_per_s": round(totals["samples"] / elapsed, 1) if elapsed else None}


def progress_bar(todo: list[tuple[int, str]], show: bool, desc: str = "vlp embed") -> Any:
    """A progress bar over the samples of the (index, url) shards still to do (None: not shown)."""
    if not show or not todo:
        return None
    from vlp.data_pipelines.shards import progress
    from vlp.data_pipelines.sharding import shard_sizes

    try:
        total = sum(shard_sizes([url for _, url in todo]))
    except Exception:  # noqa: BLE001 - a damaged shard cannot be counted: a bar without a total
        total = None
    return progress(None, total=total, unit="sample", desc=desc)
