"""`vlp shards reinforce SHARDS --teacher EXPORT --out DIR`: the shards again, each sample with a
frozen teacher's embeddings of itself beside it, so that distillation (`distill` head with
`teacher: {from_shards: true}`) or compatibility training (`compat` with `old: {from_shards: true}`)
pays no teacher forward per step (MobileCLIP's "reinforced" datasets, Vasu et al. 2024).

Layout of DIR:

    reinforce.json      the teacher and shard-list digests (checked on every rerun), width, scale
    sizes.json          samples per written shard (the img2dataset / open_clip convention)
    <name>.tar          one per input shard, same file name: every member of every good sample,
                        byte for byte, plus teacher_image.npy and teacher_text.npy ((E,) float16,
                        L2-normalised) and teacher.json ({"logit_scale": ...})

The teacher sees each image through its own eval transform (resize and centre crop) and each
caption through its tokenizer, as `vlp embed` does. Training's random crop (scale 0.9-1.0) then
shows the student a slightly different view than the teacher embedded; MobileCLIP stores several
augmentations per image to close that gap, which this writer does not. Samples `vlp embed` would
count as bad (undecodable image, empty caption) are left out of the new shards, so every sample
of a reinforced batch carries embeddings; the summary counts them.

Ranks, resume and atomicity are `vlp embed`'s (`curate/embed.py`): shard i goes to rank
i % WORLD_SIZE (RANK / WORLD_SIZE, srun, or a Slurm array task), a shard whose tar exists in DIR
is skipped, and a tar appears whole or not at all (written under a temporary name, then renamed).
`sizes.json` is updated under a file lock after each shard, so ranks finishing together do not
lose each other's counts.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import tarfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from vlp.core.errors import DataError
from vlp.core.files import atomic_write
from vlp.curate.embed import (FORMAT_VERSION, check_manifest, model_digest, progress_bar, rank_and_world,
                              read_manifest, shard_loader, shard_urls, shards_digest)
from vlp.data_pipelines.collate import TEACHER_IMAGE_MEMBER, TEACHER_META_MEMBER, TEACHER_TEXT_MEMBER
from vlp.data_pipelines.tar_reader import is_local, local_path, read_samples

MANIFEST = "reinforce.json"
SIZES = "sizes.json"


def output_names(urls: list[str]) -> list[str]:
    """The output tar of each input shard: its own file name, or `{i:06d}-{name}` when two input
    folders hold the same file name."""
    names = [Path(local_path(url)).name for url in urls]
    if len(set(names)) != len(names):
        names = [f"{index:06d}-{name}" for index, name in enumerate(names)]
    return names


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def teacher_members(image: np.ndarray, text: np.ndarray, logit_scale: float) -> dict[str, bytes]:
    """The tar members one sample gains: (E,) float16 embeddings and the teacher's logit scale."""
    return {TEACHER_IMAGE_MEMBER: npy_bytes(image.astype(np.float16)),
            TEACHER_TEXT_MEMBER: npy_bytes(text.astype(np.float16)),
            TEACHER_META_MEMBER: json.dumps({"logit_scale": logit_scale}).encode()}


def write_reinforced_shard(url: str, final: Path, embeddings: dict[int, tuple[np.ndarray, np.ndarray]],
                           logit_scale: float) -> int:
    """Copy every sample of `url` that has embeddings (by offset in the tar) into `final` with its
    teacher members, atomically; returns the samples written."""
    tmp = final.parent / f".{final.name}.tmp{os.getpid()}"
    written = 0
    try:
        with tarfile.open(tmp, "w") as tar:
            for offset, sample in read_samples(url):
                if offset not in embeddings:
                    continue  # a bad sample, or the marker of a damaged tar's end
                members = {ext: bytes(data) for ext, data in sample.items() if not ext.startswith("__")}
                members.update(teacher_members(*embeddings[offset], logit_scale))
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
                written += 1
        if written != len(embeddings):
            raise DataError(f"{url}: {len(embeddings) - written} embedded samples are no longer in the shard "
                            "(it changed while being read)")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return written


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created when absent) for the ranks of one run."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record_size(out: Path, name: str, count: int) -> None:
    """Add one shard's count to `out/sizes.json` (read, update, atomic rewrite, under a lock)."""
    with locked(out / f".{SIZES}.lock"):
        path = out / SIZES
        sizes = json.loads(path.read_text()) if path.is_file() else {}
        sizes[name] = count
        atomic_write(path, json.dumps(sizes, indent=1, sort_keys=True))


def reinforce_shards(spec: str, teacher: Path, out: Path, *, batch_size: int = 256, workers: int = 2,
                     device: str = "auto", precision: str = "fp32", rank: Optional[int] = None,
                     world_size: Optional[int] = None, show_progress: bool = True) -> dict:
    """Write this rank's shards of `spec` with `teacher`'s embeddings into `out`; returns the
    summary `vlp shards reinforce` prints."""
    from vlp.core.devices import compute_device, use_compute_device
    from vlp.models.teacher import FrozenModel
    from vlp.train.frozen import load_frozen_export, logit_scale_of

    local_rank = 0
    if rank is None or world_size is None:
        rank, local_rank, world_size = rank_and_world()
    urls = shard_urls(spec)
    out = Path(out)
    inputs = {Path(local_path(url)).resolve().parent for url in urls if is_local(url)}
    if out.resolve() in inputs:
        raise DataError(f"--out {out}: holds the input shards; vlp shards reinforce writes new shards elsewhere")
    model = load_frozen_export(teacher, "--teacher")
    frozen = FrozenModel(model, "--teacher", logit_scale_of(model, "--teacher"))
    wanted = {"version": FORMAT_VERSION, "model": str(teacher), "model_digest": model_digest(model),
              "shards": [local_path(url) if is_local(url) else url for url in urls], "shards_digest": shards_digest(urls),
              "embed_dim": frozen.embed_dim, "logit_scale": frozen.logit_scale,
              "embeddings": "L2-normalised float16, teacher eval transform"}
    found = read_manifest(out, MANIFEST, "vlp shards reinforce")
    if found is not None:
        check_manifest(found, wanted, out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / MANIFEST, json.dumps(wanted, indent=1) + "\n")  # every rank writes the same content
    names = output_names(urls)
    mine = [(index, url) for index, url in enumerate(urls) if index % world_size == rank]
    todo = [(index, url) for index, url in mine if not (out / names[index]).is_file()]

    compute = use_compute_device(compute_device(device, local_rank, announce=False))
    model.to(compute)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    loader = shard_loader(model, todo, batch_size, workers, compute)
    readers = max(workers, 1)
    pending: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    done_readers: Counter = Counter()
    bad: Counter = Counter()
    totals: Counter = Counter()
    started = time.perf_counter()
    bar = progress_bar(todo, show_progress, "vlp shards reinforce")
    with torch.no_grad():
        for batch in loader:
            shard = batch["shard"]
            rows = pending.setdefault(shard, {})
            if batch["image"] is not None:
                with torch.autocast(compute.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    image = model.encode_image(batch["image"].to(compute, non_blocking=True))["image_embed"]
                    text = model.encode_text(batch["text"].to(compute, non_blocking=True))["text_embed"]
                image = torch.nn.functional.normalize(image.float(), dim=-1).half().cpu().numpy()  # (B, E)
                text = torch.nn.functional.normalize(text.float(), dim=-1).half().cpu().numpy()
                rows.update({offset: (image[i], text[i]) for i, offset in enumerate(batch["offset"])})
            bad.update(reason for _, _, reason, _ in batch["bad"])
            if batch["damage"] is not None:
                bad["bad_shard"] += 1
            if bar is not None:
                bar.update(len(batch["offset"]) + len(batch["bad"]))
            if batch["done"]:
                done_readers[shard] += 1
                if done_readers[shard] == readers:
                    written = write_reinforced_shard(urls[shard], out / names[shard], pending.pop(shard),
                                                     frozen.logit_scale)
                    record_size(out, names[shard], written)
                    totals.update(samples=written, shards_done=1)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - started
    return {"rank": rank, "world_size": world_size, "out": str(out), "shards": len(mine),
            "shards_done": totals["shards_done"], "shards_skipped": len(mine) - len(todo),
            "samples": totals["samples"], "left_out": dict(sorted(bad.items())), "embed_dim": frozen.embed_dim,
            "logit_scale": round(frozen.logit_scale, 4), "seconds": round(elapsed, 3),
            "samples_per_s": round(totals["samples"] / elapsed, 1) if elapsed else None}
