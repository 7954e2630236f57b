"""The train and eval datasets: which raw samples each DataLoader worker reads, in which order.

Each is an `IterableDataset` run by `vlp.data_pipelines.loader` (whose docstring states the
guarantees: determinism, the rank and worker split, padding to `batches_per_epoch`, resume); a
worker hands its raw samples to the `SamplePipeline` that decodes and batches them.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Optional

from torch.utils.data import IterableDataset, get_worker_info

from vlp.data_pipelines.bad_samples import BadSample
from vlp.data_pipelines.collate import SamplePipeline, error_marker
from vlp.data_pipelines.decode import allow_pixels
from vlp.data_pipelines.seeds import stable_seed
from vlp.data_pipelines.sharding import read_share, shuffled, slot_share
from vlp.data_pipelines.tar_reader import read_shard


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


@dataclass
class TrainDataset(IterableDataset):
    """The batches of one rank in `epoch` after its first `skip_batches`; each DataLoader worker
    yields the batches of its role (see `vlp.data_pipelines.loader` for the guarantees)."""

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

    def __post_init__(self) -> None:
        super().__init__()

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _this_worker(self.pipeline, self.workers)
        # The DataLoader asks worker 0 first; after skipping n batches, the batch that comes
        # next belongs to role n % workers, so worker w plays role (w + n) % workers.
        role = (worker + self.skip_batches) % workers
        skipped = max(0, (self.skip_batches - role + workers - 1) // workers)  # my batches among the first n
        count = None
        if self.batches_per_epoch is not None:
            count = self.batches_per_epoch // workers + (role < self.batches_per_epoch % workers) - skipped
            if count <= 0:
                return
        slot = self.rank * workers + role
        slots = self.world_size * workers
        stream = self._mixed(slot, slots, role)
        position = 0
        to_skip = skipped * self.pipeline.batch_size
        while to_skip > 0:
            sample = next(stream)
            if "__error__" in sample:
                yield sample
                return
            if "__bad__" in sample:
                continue
            position += 1
            to_skip -= self.pipeline.looks_good(sample)
        seed_base = stable_seed("augment", self.seed, self.epoch, self.rank, self.world_size, role)
        yield from self.pipeline.batches(stream, count, self.epoch, seed_base, position)

    def _mixed(self, slot: int, slots: int, role: int) -> Iterator[dict]:
        streams = [self._source_stream(index, source, slot, slots, role) for index, source in enumerate(self.sources)]
        if len(streams) == 1:
            yield from streams[0]
            return
        rng = random.Random(stable_seed("mix", self.seed, self.epoch, self.rank, role))
        weights = [source.weight for source in self.sources]
        choices = range(len(streams))
        while True:
            # A marker does not count as a draw, so the mix proportions are of good samples.
            stream = streams[rng.choices(choices, weights)[0]]
            sample = next(stream)
            while "__bad__" in sample:
                yield sample
                sample = next(stream)
            yield sample
            if "__error__" in sample:
                return

    def _source_stream(self, index: int, source: ShardSource, slot: int, slots: int, role: int) -> Iterator[dict]:
        if self.mode == "resampled":
            rng = random.Random(stable_seed("resample", self.seed, self.epoch, self.rank, role, index))
            shards = (rng.choice(source.urls) for _ in itertools.count())
            samples = (sample for url in shards for sample in read_shard(url))
            yield from shuffled(samples, self.shuffle_buffer, rng)
            return
        order = list(source.urls)
        random.Random(stable_seed("shards", self.seed, self.epoch, index)).shuffle(order)  # same on every rank
        share = slot_share(order, slot, slots)
        if share.count(source.sizes) == 0:
            yield error_marker(f"rank {self.rank} worker {role} has no samples of {source.urls[0]}...: "
                               f"fewer samples than world_size x workers ({slots})")
            return
        for cycle in itertools.count():
            rng = random.Random(stable_seed("buffer", self.seed, self.epoch, self.rank, role, index, cycle))
            if cycle:  # padding a short share: read it again in another order
                share = share.reordered(rng)
            good = 0
            for sample in shuffled(read_share(share), self.shuffle_buffer, rng):
                good += "__bad__" not in sample
                yield sample
            if good == 0:
                yield error_marker(f"no readable sample in shards {', '.join(share.urls)}")
                return


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

