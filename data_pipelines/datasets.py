"""The train and eval datasets: which raw samples each DataLoader worker reads, in which order.

Each is an `IterableDataset` run by `vlp.data_pipelines.loader` (whose docstring states the
guarantees: determinism, the rank and worker split, padding to `batches_per_epoch`, resume); a
worker hands its raw samples to the `SamplePipeline` that decodes and batches them.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch.utils.data import IterableDataset, get_worker_info

from vlp.data_pipelines.bad_samples import BadSample
from vlp.data_pipelines.collate import SamplePipeline, error_marker
from vlp.data_pipelines.decode import allow_pixels
from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.position import (SlotStream, fresh_resampled_slot, fresh_slot, piece_count,
                                         role_batches, slot_state)
from vlp.data_pipelines.seeds import stable_seed
from vlp.data_pipelines.sharding import read_share, slot_share


def _this_worker(pipeline: SamplePipeline, workers: int) -> tuple[int, int]:
    """(this DataLoader worker's id, the worker count >= 1), after raising PIL's process-wide pixel
    limit to the pipeline's in this process (the worker's, or the main one when workers=0)."""
    info = get_worker_info()
    worker = info.id if info is not None else 0
    allow_pixels(pipeline.max_image_pixels)
    return worker, max(workers, 1)


@dataclass
class ShardSource:
    """One `data.train` entry: its shard URLs, mixing weight and samples per shard (0s in
    resampled mode, where nothing is counted)."""

    urls: list[str]
    weight: float
    sizes: dict[str, int]


def shard_counts(sources: list[ShardSource]) -> list[list[int]]:
    """Samples per shard of each source, in its `urls` order: the table the deal
    (`vlp.data_pipelines.position`) and the position digest read."""
    return [[source.sizes[url] for url in source.urls] for source in sources]


@dataclass
class TrainDataset(IterableDataset):
    """The batches of one rank in `epoch`; each DataLoader worker yields the batches of its role
    (see `vlp.data_pipelines.loader` for the guarantees).

    Where to start: `starts` (role -> slot state, `vlp.data_pipelines.position`) for the roles
    that have a saved position, the others from the start of their share; `skip_batches` is the
    rank's batches already consumed (the roles rotate by it), and, without `starts` (a
    checkpoint from before positions were saved), those batches are read and discarded.
    `total`: the rank's batches in this epoch (segment), default `batches_per_epoch`.
    Each batch carries "__position__": (role, JSON of the role's slot state after it).
    `shared_epoch`: a shared-memory 0-dim long tensor the loader sets before each epoch, read at
    the start of every `__iter__` in place of `epoch` (persistent workers keep the dataset
    object they were started with, so the epoch has to reach them this way).
    """

    pipeline: SamplePipeline
    sources: list[ShardSource]
    mode: str
    shuffle_buffer: int
    seed: int
    rank: int
    world_size: int
    workers: int
    batches_per_epoch: Optional[int]
    epoch: int = 0
    skip_batches: int = 0
    starts: Optional[dict[int, dict]] = None
    total: Optional[int] = None
    shared_epoch: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        super().__init__()

    def initial_state(self, role: int) -> dict:
        """A role's slot state before it read anything this epoch."""
        if self.mode == "resampled":
            return fresh_resampled_slot(len(self.sources), self.seed, self.epoch, self.rank, role,
                                        world_size=self.world_size)
        return fresh_slot(shard_counts(self.sources), self.seed, self.epoch, self.rank, self.world_size, self.workers, role)

    def __iter__(self) -> Iterator[dict]:
        if self.shared_epoch is not None:
            self.epoch = int(self.shared_epoch)  # this worker's own copy of the dataset
        worker, workers = _this_worker(self.pipeline, self.workers)
        # The DataLoader asks worker 0 first; after n batches, the batch that comes next belongs
        # to role n % workers, so worker w plays role (w + n) % workers.
        role = (worker + self.skip_batches) % workers
        total = self.total if self.total is not None else self.batches_per_epoch
        legacy_skip = self.starts is None and self.skip_batches > 0
        start = (self.starts or {}).get(role) or self.initial_state(role)
        produced = start["produced"]
        if legacy_skip:
            produced = max(0, (self.skip_batches - role + workers - 1) // workers)  # my batches among the first n
        count = None
        if total is not None:
            count = role_batches(total, workers, role) - produced
            if count <= 0:
                return
        if self.mode == "epoch" and self.starts is None:
            sizes = shard_counts(self.sources)
            for index, (source, state) in enumerate(zip(self.sources, start["sources"])):
                if sum(piece_count(piece, sizes[index]) for piece in state["pieces"]) == 0:
                    yield error_marker(f"rank {self.rank} worker {role} has no samples of {source.urls[0]}...: "
                                       f"fewer samples than world_size x workers ({self.world_size * workers})")
                    return
        try:
            stream = SlotStream([source.urls for source in self.sources], [source.weight for source in self.sources],
                                self.shuffle_buffer, start, self.mode == "resampled")
        except DataError as error:
            yield error_marker(str(error))
            return
        position = start["position"]
        to_skip = produced * self.pipeline.batch_size if legacy_skip else 0
        while to_skip > 0:
            sample = next(stream)
            if "__error__" in sample:
                yield sample
                return
            if "__bad__" in sample:
                continue
            position += 1
            to_skip -= self.pipeline.looks_good(sample)

        def snapshot(position: int, batches: int) -> tuple[int, str]:
            state = slot_state(role, start["augment"], produced=produced + batches, position=position,
                               **stream.state())
            return role, json.dumps(state, separators=(",", ":"))

        yield from self.pipeline.batches(stream, count, self.epoch, start["augment"], position, snapshot)


@dataclass
class EvalDataset(IterableDataset):
    """The eval batches of one rank: its share of the shards, in order, no shuffle."""

    pipeline: SamplePipeline
    urls: list[str]
    rank: int
    world_size: int
    workers: int

    def __post_init__(self) -> None:
        super().__init__()

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _this_worker(self.pipeline, self.workers)
        stream = read_share(slot_share(self.urls, self.rank * workers + worker, self.world_size * workers))
        items: list[dict] = []
        bad: Counter = Counter()
        bad_shards: set[str] = set()
        for sample in stream:
            if "__bad__" in sample:
                bad[sample["__bad__"]] += 1
                bad_shards.add(sample["__url__"])
                continue
            try:
                # Eval preprocess is deterministic; the seed only keeps a random one reproducible.
                items.append(self.pipeline.decode(sample, stable_seed("eval", sample["__key__"])))
            except BadSample as failure:
                bad[failure.reason] += 1
                bad_shards.add(sample["__url__"])
                continue
            if len(items) == self.pipeline.batch_size:
                yield self.pipeline.collate(items, bad, bad_shards, 0)
                items, bad, bad_shards = [], Counter(), set()
        if items:
            yield self.pipeline.collate(items, bad, bad_shards, 0)

