"""Webdataset shard loaders for training and evaluation.

Training data flows, inside each DataLoader worker:

    shards (split by rank and worker) -> raw samples -> mix of sources (weighted)
        -> shuffle buffer (raw bytes) -> decode + preprocess + tokenize -> batch

Everything random is drawn from RNGs seeded by (seed, epoch, rank, worker role, ...), never
from process state, so the same (seed, epoch, rank, world_size, workers) gives the same batches
in the same order on every run.

Epoch mode. Shards of each source are shuffled by (seed, epoch) and dealt to the
`world_size * workers` reading slots; when a source has fewer shards than slots, every slot
reads all its shards and keeps every `slots`-th sample, so one shard still splits across ranks. Every
rank yields exactly `batches_per_epoch` batches (computed from `sizes.json`, or by counting the
tar members, the same on every rank so collectives never deadlock): a slot whose share is short
cycles its own stream again (reshuffled); the remainder past the count is dropped. Batch `i`
of a rank comes from worker `i % workers` (the DataLoader's round-robin order).

Resampled mode. Each slot draws shards with replacement (seeded), an endless stream.

Position and resume. Each batch carries its slot's state (`vlp.data_pipelines.position`: the
shard and sample it is at, the shuffle buffer by reference (shard, sample index), RNG states,
the augmentation counter); `TrainLoader.state_dict()` holds the last one of each worker role,
and the trainer saves it per rank with the checkpoint. `load_state_dict(every rank's states)`
then `iterate(epoch)`:
  * same layout (world size, workers, batch size, shuffle buffer): the batches an uninterrupted
    run gives next, bit for bit, in both modes. It seeks: only the current shard's tar headers
    are indexed (`tar_reader.ShardIndex`, bodies not read) and the buffered samples re-read by
    reference, so the cost is O(one shard + buffer), whatever the position. A `pipe:`, http or
    compressed shard cannot be entered mid-way: it is read from its own start, never further back.
  * another layout, epoch mode: every sample of the epoch not yet handed out (each old slot's
    buffer, the rest of its shard, its shards not begun) is dealt again to the new slots, one
    contiguous run each, and read once; every rank yields `remaining // (world_size * batch)`
    batches, the remainder under one global batch is dropped (as at every epoch end). With
    several sources, each is dealt the same way and mixing by weight goes on as in an epoch.
  * another layout, resampled mode: fresh streams seeded by (seed, epoch, batches consumed, new
    layout), with the same sampling distribution (shards with replacement, sources by weight);
    no sample-exact continuation.
A changed layout prints one line and sets `resume_note` ({"event": "data_redealt" |
"data_reseeded", ...}), which the trainer writes to metrics.jsonl. A position does not apply to
other data (another shard list or sizes): refused with a DataError.
Without a saved position (a checkpoint from before positions), `iterate(epoch, skip_batches=n)`
reads and discards the first `n` batches' samples using only the cheap checks (no decode), so a
corrupt-but-parseable image in that range shifts the stream by one; the seeking resume has no
such limit.

Random augmentations in `preprocess` (torch, `random`, numpy RNGs) are seeded per raw sample
position, so they are reproducible and identical after a resume too.

Bad samples (corrupt image, decompression bomb, empty or non-UTF-8 caption, missing field,
unreadable or truncated shard) are skipped and counted in each batch's "bad" dict; the trainer
feeds those counts to `BadSampleMonitor`, which stops the run when too many are bad.

The parts, each in its own module: `tar_reader` (raw samples of one tar, and its header index),
`sharding` (shard lists and sizes, the eval deal), `position` (the training deal, shuffle buffer
and slot state as plain data, the re-deal), `datasets` (what each worker reads, in which order), `collate` (decode + preprocess + tokenize + collate), `bad_samples` (skip reasons and the
stop rule), `seeds` (the derived seeds).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset

from vlp.data_pipelines.collate import SamplePipeline
from vlp.data_pipelines.config import DataConfig
from vlp.data_pipelines.datasets import EvalDataset, ShardSource, TrainDataset, shard_counts
from vlp.data_pipelines.decode import PIL_MAX_IMAGE_PIXELS
from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.gpu_decode import check_gpu_decode
from vlp.data_pipelines.position import POSITION_FILE, VERSION, fresh_resampled_slot, redeal, sources_digest
from vlp.data_pipelines.sharding import check_urls, expand_urls, shard_sizes
from vlp.data_pipelines.tar_reader import is_local, local_path

__all__ = ["EvalLoader", "TrainLoader", "build_eval_loader", "build_train_loader"]


class TrainLoader:
    """The training batch stream of one rank, and its position (see the module docstring)."""

    def __init__(self, dataset: TrainDataset) -> None:
        self._dataset = dataset
        self._position: Optional[dict] = None  # consumed so far: {"epoch", "batches", "total", "roles"}
        self._reading: Optional[dict] = None  # after the last batch `iterate` yielded (ahead with `commit`)
        self._restored: Optional[dict] = None  # from load_state_dict, used by the next iterate
        self.resume_note: Optional[dict] = None  # set when a resume changed the data order
        # Whole epochs from the start reuse one DataLoader whose workers persist across epochs.
        self.persistent_workers = True
        self._epoch_value = torch.zeros((), dtype=torch.long).share_memory_()
        self._workers: Optional[DataLoader] = None

    def close(self) -> None:
        """Shut down the workers kept across epochs (a later `iterate` starts new ones)."""
        self._workers = None

    @property
    def batches_per_epoch(self) -> Optional[int]:
        """Batches every rank yields per epoch (equal on all ranks); None in resampled mode."""
        return self._dataset.batches_per_epoch

    @property
    def samples_per_epoch(self) -> int:
        return sum(sum(source.sizes.values()) for source in self._dataset.sources)

    def iterate(self, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
        """Batches of `epoch`. After `load_state_dict`, the first call for the saved epoch continues
        from the saved position (seeking; `skip_batches` is then ignored); otherwise the batches
        after the first `skip_batches` (read and discarded: only for checkpoints without a position)."""
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        restored, self._restored = self._restored, None
        if restored is not None and restored["epoch"] != epoch:
            restored = None
        if restored is not None:
            position = {"epoch": epoch, "batches": restored["batches"], "total": restored["total"],
                        "roles": dict(restored["roles"])}
            starts = {int(role): state for role, state in restored["roles"].items()}
        else:
            position = {"epoch": epoch, "batches": skip_batches, "total": self._dataset.batches_per_epoch,
                        "roles": {}}
            starts = None
        self._position = self._reading = position
        if starts is None and position["batches"] == 0 and self.persistent_workers and self._dataset.workers:
            batches = self._persistent_run(epoch)
        else:  # a resumed or skipping epoch: its own dataset (starts, rotated roles), its own workers
            dataset = replace(self._dataset, epoch=epoch, skip_batches=position["batches"], starts=starts,
                              total=position["total"])
            batches = _run(dataset, dataset.workers)
        for batch in batches:
            role, state = batch.pop("__position__")
            position["roles"][str(role)] = state  # kept as JSON text: parsed only when saved
            position["batches"] += 1
            yield batch

    def _persistent_run(self, epoch: int) -> Iterator[dict]:
        """The batches of a whole `epoch` from workers started once for the run: the epoch reaches
        them through shared memory (`TrainDataset.shared_epoch`), set before `iter()` asks each
        worker to start its next pass. Saves the worker start-up (a fork and the first batch's
        latency, about 70 ms per worker on 2 cores) at every epoch boundary."""
        if self._workers is None:
            dataset = replace(self._dataset, epoch=0, skip_batches=0, starts=None, total=None,
                              shared_epoch=self._epoch_value)
            self._workers = _data_loader(dataset, dataset.workers, persistent=True)
        self._epoch_value.fill_(epoch)
        return _unwrap(iter(self._workers))

    def position(self) -> Optional[dict]:
        """The position after the last batch `iterate` yielded (a copy); `commit` puts it back
        when the batch is consumed later (`DeviceStream` reads batches ahead of the step)."""
        position = self._reading
        return None if position is None else {**position, "roles": dict(position["roles"])}

    def commit(self, position: dict) -> None:
        """Make `position` (from `position()`) the one `state_dict` saves: the batch it was taken
        after is consumed, whatever `iterate` has read since."""
        self._position = position

    def state_dict(self) -> dict:
        """This rank's position: per role, the slot state after the last batch consumed from it
        (shard, sample, shuffle buffer by reference, RNG states); a few KB per role."""
        dataset = self._dataset
        position = self._position or self._restored or {"epoch": 0, "batches": 0, "total": dataset.batches_per_epoch,
                                                        "roles": {}}
        return {
            "version": VERSION, "mode": dataset.mode, "seed": dataset.seed, "rank": dataset.rank,
            "world_size": dataset.world_size, "workers": dataset.workers,
            "batch_size": dataset.pipeline.batch_size, "shuffle_buffer": dataset.shuffle_buffer,
            "sources": self._digest(), "epoch": position["epoch"], "batches": position["batches"],
            "total": position["total"],
            "roles": {role: json.loads(state) if isinstance(state, str) else state
                      for role, state in position["roles"].items()},
        }

    def load_state_dict(self, states: list[dict]) -> None:
        """Continue from every rank's saved position (`states`, in rank order, as `state_dict` made
        them). The same layout (world size, workers, batch size, shuffle buffer) continues bit for
        bit; another one re-deals the rest of the epoch (epoch mode) or starts fresh streams
        (resampled), logs one line and sets `resume_note` for the run's metrics."""
        if not states:
            return
        dataset = self._dataset
        first = states[0]
        if first.get("version") != VERSION:
            raise DataError(f"loader position version {first.get('version')} is not {VERSION}")
        if first["mode"] != dataset.mode or first["sources"] != self._digest():
            raise DataError(
                f"data.train (or data.mode) differs from the checkpoint's: its saved data position does not "
                f"apply (remove the checkpoint's {POSITION_FILE.format(rank='*')} files to resume by "
                f"skipping batches instead)")
        layout = (dataset.world_size, dataset.workers, dataset.pipeline.batch_size, dataset.shuffle_buffer)
        old = (first["world_size"], first["workers"], first["batch_size"], first["shuffle_buffer"])
        if layout == old:
            self._restored = states[dataset.rank]
            return
        what = f"{old[0]} ranks x {old[1]} workers, batch {old[2]}, buffer {old[3]} -> " \
               f"{layout[0]} x {layout[1]}, batch {layout[2]}, buffer {layout[3]}"
        if dataset.mode == "epoch":
            self._restored, note = redeal(states, shard_counts(dataset.sources), seed=dataset.seed,
                                          world_size=dataset.world_size, workers=dataset.workers,
                                          batch_size=dataset.pipeline.batch_size, rank=dataset.rank)
            message = (f"data order changed: resumed on another layout ({what}); the rest of epoch "
                       f"{note['epoch']} ({note['samples_left']} samples) is dealt again, each read once, "
                       f"{note['batches_per_rank']} batches per rank, {note['dropped']} dropped (under one global batch)")
        else:
            consumed = sum(state["batches"] for state in states)
            salt = ("resumed", consumed, dataset.world_size, dataset.workers)
            roles = {str(role): fresh_resampled_slot(len(dataset.sources), dataset.seed, first["epoch"], dataset.rank,
                                                     role, salt, dataset.world_size)
                     for role in range(max(dataset.workers, 1))}
            self._restored = {"epoch": first["epoch"], "batches": 0, "total": None, "roles": roles}
            note = {"event": "data_reseeded", "epoch": first["epoch"], "from_layout": list(old[:2]),
                    "to_layout": list(layout[:2])}
            message = (f"data order changed: resumed on another layout ({what}); resampled mode draws fresh "
                       f"streams seeded by (seed, epoch, batches consumed {consumed}, new layout), same "
                       f"sampling distribution (shards with replacement, by weight), no sample-exact continuation")
        note["message"] = message
        self.resume_note = note
        if dataset.rank == 0:
            print(f"[vlp] {message}", flush=True)

    def _digest(self) -> str:
        sources = self._dataset.sources
        return sources_digest([source.urls for source in sources], shard_counts(sources))


def _data_loader(dataset: IterableDataset, workers: int, persistent: bool = False) -> DataLoader:
    # Pinned host memory lets the trainer's non-blocking copies overlap the GPU's compute.
    return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=persistent,
                      prefetch_factor=2 if workers else None, pin_memory=torch.cuda.is_available())


def _run(dataset: IterableDataset, workers: int) -> Iterator[dict]:
    yield from _unwrap(iter(_data_loader(dataset, workers)) if workers else iter(dataset))


def _unwrap(batches: Iterator[dict]) -> Iterator[dict]:
    for batch in batches:
        if "__error__" in batch:
            raise DataError(batch["__error__"])
        yield batch


def build_train_loader(
    cfg: DataConfig,
    *,
    preprocess: Callable,
    tokenizer: Callable[[list[str]], torch.Tensor],
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    finish_on_device: bool = True,
) -> TrainLoader:
    """The training loader of rank `rank` of `world_size` for `cfg` (see the module docstring).

    `preprocess`: PIL.Image (RGB) -> Tensor of shape (C, H, W), or, when it has
    `wants_sample = True`, the raw sample dict -> tensor (extension -> bytes, e.g. "npy",
    "nii.gz", "txt", plus "__key__" and "__url__" strings); whatever it raises counts the sample
    as "bad_image". With `wants_seed = True` it is called as `preprocess(image, seed)` and draws
    its augmentation from that per-sample seed (otherwise torch, random and numpy are seeded around
    the call). Its outputs are stacked with torch's default_collate. Its `finish_batch(images)`
    (uint8 -> normalised float, `ClipImageTransform`), when it has one, is left to the model
    when `finish_on_device` (the default: the image towers normalise uint8 input on the device,
    4x fewer bytes to copy), else run once per batch in the worker. `tokenizer`: list[str] ->
    LongTensor of shape (N, L). Both must be picklable when `cfg.workers > 0`.
    Raises DataError when a shard is missing or there are fewer samples than one global batch.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_urls(cfg)
    if cfg.decode == "gpu":
        check_gpu_decode(preprocess)
    sources = []
    for source in cfg.train:
        urls = expand_urls(source.urls)
        sizes = dict(zip(urls, shard_sizes(urls))) if cfg.mode == "epoch" else {url: 0 for url in urls}
        sources.append(ShardSource(urls=urls, weight=source.weight, sizes=sizes))
    batches_per_epoch = None
    if cfg.mode == "epoch":
        total = sum(sum(source.sizes.values()) for source in sources)
        batches_per_epoch = total // (world_size * batch_size)
        if batches_per_epoch == 0:
            raise DataError(f"data.train: {total} samples is fewer than one global batch "
                            f"({world_size} ranks x batch size {batch_size})")
    pipeline = SamplePipeline(
        preprocess=preprocess, tokenizer=tokenizer, batch_size=batch_size, caption_key=cfg.caption_key,
        parent_caption_key=cfg.parent_caption_key, max_image_pixels=cfg.max_image_pixels, sub_captions=cfg.sub_captions,
        sub_caption_sentences=cfg.sub_caption_sentences, sentences=cfg.sentences,
        seed=seed, max_bad_fraction=cfg.max_bad_fraction, bad_window=cfg.bad_window,
        finish_on_device=finish_on_device, decode_on_device=cfg.decode == "gpu",
    )
    return TrainLoader(TrainDataset(
        pipeline=pipeline, sources=sources, mode=cfg.mode, shuffle_buffer=cfg.shuffle_buffer, seed=seed,
        rank=rank, world_size=world_size, workers=cfg.workers, batches_per_epoch=batches_per_epoch,
    ))


class EvalLoader:
    """Iterable of eval batches (same dict as training). Ranks get disjoint shares that together
    cover every readable sample once; no shuffle, no padding, the last batch may be short."""

    def __init__(self, dataset: EvalDataset) -> None:
        self._dataset = dataset

    def __iter__(self) -> Iterator[dict]:
        return _run(self._dataset, self._dataset.workers)


def build_eval_loader(
    urls: str,
    *,
    preprocess: Callable,
    tokenizer: Callable[[list[str]], torch.Tensor],
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    caption_key: str = "txt",
    max_image_pixels: int = PIL_MAX_IMAGE_PIXELS,
) -> EvalLoader:
    """An eval loader over the shard spec `urls` (brace ranges, `::` lists). Raises DataError
    naming a missing local shard."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    shard_urls = expand_urls(urls)
    for url in shard_urls:
        if is_local(url) and not os.path.isfile(local_path(url)):
            raise DataError(f"eval shard {url} not found")
    pipeline = SamplePipeline(preprocess=preprocess, tokenizer=tokenizer, batch_size=batch_size,
                              caption_key=caption_key, max_image_pixels=max_image_pixels)
    return EvalLoader(EvalDataset(pipeline=pipeline, urls=shard_urls, rank=rank, world_size=world_size,
                                  workers=workers))
