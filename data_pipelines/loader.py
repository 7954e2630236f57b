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

Resume. `iterate(epoch, skip_batches=n)` gives the batches a fresh `iterate(epoch)` gives after
its first `n`: each worker skips its share of raw samples after the shuffle buffer, before
decoding, using only the cheap checks (caption bytes present, UTF-8 and non-empty; image header
parsed and its size checked). Limitation: an image whose header parses but whose body is corrupt,
or a `wants_sample` preprocess that fails, inside the skipped range, is counted as good while
skipping, so the resumed stream is shifted by one sample per such image. Resume needs the same
`workers` as the run it resumes.

Random augmentations in `preprocess` (torch, `random`, numpy RNGs) are seeded per raw sample
position, so they are reproducible and identical after a resume too.

Bad samples (corrupt image, decompression bomb, empty or non-UTF-8 caption, missing field,
unreadable or truncated shard) are skipped and counted in each batch's "bad" dict; the trainer
feeds those counts to `BadSampleMonitor`, which stops the run when too many are bad.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import mmap
import os
import random
import re
import tarfile
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from vlp.data_pipelines.config import DataConfig
from vlp.data_pipelines.decode import (
    IMAGE_EXTENSIONS,
    allow_pixels,
    decode_image,
    peek_image,
)
from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.text import caption_sentences, sample_sub_captions

__all__ = [
    "BAD_REASONS", "BadSampleMonitor", "EvalLoader", "TrainLoader", "build_eval_loader", "build_train_loader",
    "check_urls", "expand_urls", "shard_sizes",
]

BAD_REASONS = ("bad_image", "image_too_large", "empty_caption", "bad_caption", "bad_shard", "missing_field")
# webdataset's grouping rule: the key is the member path up to the first "." of its file name.
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


# --------------------------------------------------------------------------------------------
# Shard lists
# --------------------------------------------------------------------------------------------


def expand_urls(spec: str) -> list[str]:
    """Shard URLs of a spec: brace ranges (`s/{000000..000009}.tar`) and `::`-joined lists."""
    from webdataset.shardlists import expand_urls as wds_expand

    urls = wds_expand(spec)
    if not urls:
        raise DataError(f"shard spec {spec!r} names no shard")
    return list(urls)


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def check_urls(cfg: DataConfig) -> None:
    """Fail before training starts, with one line naming the path, when a local shard is missing."""
    for index, source in enumerate(cfg.train):
        for url in expand_urls(source.urls):
            if is_local(url) and not os.path.isfile(local_path(url)):
                raise DataError(f"data.train[{index}].urls: shard {url} not found")


def shard_sizes(urls: list[str]) -> list[int]:
    """Samples per shard: from the `sizes.json` beside each shard, else by counting tar members."""
    tables: dict[str, dict] = {}
    sizes = []
    for url in urls:
        count = None
        if is_local(url):
            path = Path(local_path(url))
            folder = str(path.parent)
            if folder not in tables:
                try:
                    tables[folder] = json.loads((path.parent / "sizes.json").read_text())
                except (OSError, ValueError):
                    tables[folder] = {}
            count = tables[folder].get(path.name)
        sizes.append(int(count) if count is not None else _count_samples(url))
    return sizes


def _count_samples(url: str) -> int:
    return sum(1 for sample in _read_shard(url) if "__bad__" not in sample)


def _read_shard(url: str) -> Iterator[dict]:
    """Raw samples of one tar: {"__key__", "__url__", ext: bytes, ...}.

    An unreadable or truncated tar ends with one marker {"__bad__": "bad_shard", "__url__"},
    after the samples read before the damage (the sample being read when it hit is dropped).
    """
    current: Optional[dict] = None
    try:
        for name, data in _tar_members(url):
            match = _MEMBER_NAME.match(name)
            if match is None:
                continue
            key, ext = match.groups()
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            current[ext.lower()] = data
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        yield {"__bad__": "bad_shard", "__url__": url, "__detail__": f"{type(error).__name__}: {error}"}
        return
    if current is not None:
        yield current


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")


def _tar_members(url: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files in a tar, in order. A local uncompressed tar is parsed
    straight from a memory map (tarfile's header parsing costs ~0.1 ms a member, a tenth of a
    small image's decode); anything else goes through webdataset's gopen and tarfile."""
    if is_local(url):
        path = local_path(url)
        with open(path, "rb") as handle:
            head = handle.read(6)
            if len(head) >= 6 and not head.startswith(_COMPRESSED_MAGIC):
                with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
                    yield from _mapped_members(view, path)
                return
    from webdataset.gopen import gopen

    with gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if member.isfile():
                yield member.name, tar.extractfile(member).read()


def _mapped_members(view: mmap.mmap, path: str) -> Iterator[tuple[str, bytes]]:
    """Parse ustar/GNU/pax tar headers from `view` (POSIX.1-2001 layout); raises tarfile.ReadError
    on a bad checksum or a truncated member."""
    offset, size = 0, len(view)
    long_name: Optional[str] = None
    while offset + 512 <= size:
        header = view[offset:offset + 512]
        if header == _ZERO_BLOCK:
            return  # end-of-archive marker
        stored = header[148:156].strip(b"\0 ")
        if not stored or int(stored, 8) != sum(header) - sum(header[148:156]) + 8 * 32:
            raise tarfile.ReadError(f"{path}: bad tar header checksum at byte {offset}")
        length = _tar_number(header[124:136])
        kind = header[156:157]
        start, end = offset + 512, offset + 512 + length
        if end > size:
            raise tarfile.ReadError(f"{path}: truncated member at byte {offset}")
        offset = start + (length + 511) // 512 * 512
        if kind == b"L":  # GNU long name of the next member
            long_name = view[start:end].rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if kind == b"x":  # pax extended header: its "path" names the next member
            long_name = _pax_path(view[start:end]) or long_name
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, global pax headers
            long_name = None
            continue
        name = long_name
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:262] == b"ustar" and header[345] != 0:
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                name = f"{prefix}/{name}"
        long_name = None
        yield name, view[start:end]
    if offset < size:
        raise tarfile.ReadError(f"{path}: truncated header at byte {offset}")
    # Ending on a member boundary without the end-of-archive blocks: truncated (tarfile's stream
    # mode, which webdataset uses, says so too).
    raise tarfile.ReadError(f"{path}: no end-of-archive marker (truncated?)")


_ZERO_BLOCK = bytes(512)


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes over 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


def _pax_path(records: bytes) -> Optional[str]:
    while records:
        length_text, _, rest = records.partition(b" ")
        length = int(length_text)
        record, records = records[len(length_text) + 1:length], records[length:]
        key, _, value = record.rstrip(b"\n").partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
    return None


@dataclass(frozen=True)
class _Share:
    """What one reading slot reads: the samples of `urls` (read in this order, counted across
    them) whose running index is `remainder` mod `modulo`."""

    urls: tuple[str, ...]
    modulo: int = 1
    remainder: int = 0

    def count(self, sizes: dict[str, int]) -> int:
        total = sum(sizes[url] for url in self.urls)
        return max(0, (total - self.remainder + self.modulo - 1) // self.modulo)

    def reordered(self, rng: random.Random) -> "_Share":
        urls = list(self.urls)
        rng.shuffle(urls)
        return _Share(tuple(urls), self.modulo, self.remainder)


def _slot_share(urls: list[str], slot: int, slots: int) -> _Share:
    """Slot `slot` of `slots`: whole shards when there are at least as many shards as slots;
    else every slot reads all shards and keeps every `slots`-th sample, so shares stay balanced
    (one shard still splits across two ranks). Slots are disjoint and cover every sample."""
    if len(urls) >= slots:
        return _Share(tuple(urls[slot::slots]))
    return _Share(tuple(urls), slots, slot)


def _read_share(share: _Share) -> Iterator[dict]:
    index = 0
    for url in share.urls:
        for sample in _read_shard(url):
            if "__bad__" not in sample:
                keep = index % share.modulo == share.remainder
                index += 1
                if not keep:
                    continue
            yield sample


def _shuffled(items: Iterable[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """A shuffle buffer of `size` samples (webdataset's); markers pass straight through."""
    if size <= 1:
        yield from items
        return
    buffer: list[dict] = []
    for item in items:
        if "__bad__" in item:
            yield item
        elif len(buffer) < size:
            buffer.append(item)
        else:
            index = rng.randrange(size)
            yield buffer[index]
            buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


def _seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, stable across processes and Python runs (unlike hash())."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# --------------------------------------------------------------------------------------------
# Sample decoding and batching (runs in the DataLoader workers)
# --------------------------------------------------------------------------------------------


class _BadSample(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


@dataclass
class _Pipeline:
    """Decode + preprocess + tokenize + collate; picklable, shared by the train and eval loaders."""

    preprocess: Callable
    tokenizer: Callable[[list[str]], torch.Tensor]
    batch_size: int
    caption_key: str = "txt"
    parent_caption_key: Optional[str] = None
    max_image_pixels: int = 89_478_485
    sub_captions: int = 0
    sub_caption_sentences: int = 3
    sentences: int = 0
    seed: int = 0
    max_bad_fraction: float = 1.0
    bad_window: int = 1000

    @property
    def wants_sample(self) -> bool:
        return bool(getattr(self.preprocess, "wants_sample", False))

    def caption(self, sample: dict, key: Optional[str] = None) -> str:
        data = sample.get(key or self.caption_key)
        if data is None:
            raise _BadSample("missing_field")
        try:
            caption = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise _BadSample("bad_caption") from None
        if not caption:
            raise _BadSample("empty_caption")
        return caption

    def image_bytes(self, sample: dict) -> bytes:
        for ext in IMAGE_EXTENSIONS:
            if ext in sample:
                return sample[ext]
        raise _BadSample("missing_field")

    def looks_good(self, sample: dict) -> bool:
        """The cheap checks used while skipping batches on resume (no image decode)."""
        try:
            self.caption(sample)
            if self.parent_caption_key:
                self.caption(sample, self.parent_caption_key)
            if not self.wants_sample:
                peek_image(self.image_bytes(sample), self.max_image_pixels)
        except _BadSample:
            return False
        except Exception:  # noqa: BLE001 - PIL raises many types on a bad header
            return False
        return True

    def decode(self, sample: dict, rng_seed: int) -> dict:
        caption = self.caption(sample)
        parent = self.caption(sample, self.parent_caption_key) if self.parent_caption_key else None
        if getattr(self.preprocess, "wants_seed", False):
            # It draws its augmentation from the seed it is handed: no global RNG to reseed.
            image = self._image(sample, lambda image_or_sample: self.preprocess(image_or_sample, rng_seed))
        else:
            with _seeded(rng_seed):
                image = self._image(sample, self.preprocess)
        label = -1
        if "cls" in sample:
            try:
                label = int(sample["cls"].decode("utf-8").strip())
            except ValueError:
                raise _BadSample("missing_field") from None
        meta: dict = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except ValueError:
                meta = {}
        return {"image": image, "caption": caption, "label": label, "key": sample["__key__"], "meta": meta,
                "url": sample.get("__url__", ""), "parent": parent}

    def _image(self, sample: dict, preprocess: Callable) -> Any:
        if self.wants_sample:
            try:
                return preprocess(sample)
            except Exception:  # noqa: BLE001 - any failure of a user preprocess is a bad sample
                raise _BadSample("bad_image") from None
        data = self.image_bytes(sample)
        try:
            pil = decode_image(data, self.max_image_pixels)
        except Image.DecompressionBombError:
            raise _BadSample("image_too_large") from None
        except Exception:  # noqa: BLE001
            raise _BadSample("bad_image") from None
        try:
            return preprocess(pil)
        except Exception:  # noqa: BLE001
            raise _BadSample("bad_image") from None

    def finish_images(self, images: Any) -> Any:
        """The preprocess's batch step (e.g. normalising uint8 images in one op), if it has one."""
        finish = getattr(self.preprocess, "finish_batch", None)
        return finish(images) if finish is not None else images

    def collate(self, items: list[dict], bad: Counter, bad_shards: set[str], epoch: int) -> dict:
        captions = [item["caption"] for item in items]
        batch = {
            "image": self.finish_images(default_collate([item["image"] for item in items])),
            "text": self.tokenizer(captions),
            "label": torch.tensor([item["label"] for item in items], dtype=torch.long),
            "key": [item["key"] for item in items],
            "caption": captions,
            "meta": [item["meta"] for item in items],
            "bad": {reason: bad.get(reason, 0) for reason in BAD_REASONS},
            "bad_shards": sorted(bad_shards),
        }
        if self.parent_caption_key:
            batch["parent_caption"] = [item["parent"] for item in items]
            batch["parent_text"] = self.tokenizer(batch["parent_caption"])[:, None]  # (B, 1, L)
        if self.sub_captions:
            draws = [
                sample_sub_captions(caption, self.sub_captions, random.Random(_seed("sub", self.seed, epoch, key)),
                                    self.sub_caption_sentences)
                for caption, key in zip(captions, batch["key"])
            ]
            tokens = self.tokenizer([text for sample in draws for text in sample])  # (B*K, L)
            batch["sub_text"] = tokens.view(len(items), self.sub_captions, -1)  # (B, K, L)
        if self.sentences:
            flat, mask = [], []
            for caption in captions:
                sentences = (caption_sentences(caption) or [caption])[: self.sentences]
                mask.append([True] * len(sentences) + [False] * (self.sentences - len(sentences)))
                flat.extend(sentences + [""] * (self.sentences - len(sentences)))
            tokens = self.tokenizer(flat)  # (B*S, L)
            batch["sentences"] = tokens.view(len(items), self.sentences, -1)  # (B, S, L)
            batch["sentence_mask"] = torch.tensor(mask, dtype=torch.bool)
        return batch

    def batches(self, stream: Iterator[dict], count: Optional[int], epoch: int, seed_base: int,
                position: int = 0) -> Iterator[dict]:
        """`count` batches (endless when None) from a raw sample stream.

        `position` is the index in the stream of its first sample (after a resume skip); each
        sample's augmentation seed is derived from its position.
        """
        produced = 0
        while count is None or produced < count:
            items: list[dict] = []
            bad: Counter = Counter()
            bad_shards: set[str] = set()
            bad_run = 0  # consecutive bad samples: a stream that only yields bad ones never ends
            while len(items) < self.batch_size:
                sample = next(stream)
                if "__error__" in sample:  # the stream cannot go on: hand the message to the main process
                    yield sample
                    return
                if "__bad__" in sample:
                    bad[sample["__bad__"]] += 1
                    bad_shards.add(sample["__url__"])
                    continue
                position += 1
                try:
                    items.append(self.decode(sample, _seed(seed_base, position)))
                    bad_run = 0
                except _BadSample as failure:
                    bad[failure.reason] += 1
                    bad_shards.add(sample.get("__url__", ""))
                    bad_run += 1
                    # Over the bad-fraction rule (or, with the rule off, 100 windows of nothing
                    # but bad samples): the trainer would never get a batch to judge, so stop here.
                    if bad_run >= self.bad_window * (1 if self.max_bad_fraction < 1 else 100):
                        yield _error(f"{bad_run} bad samples in a row ({_reasons(bad)}) in shards {', '.join(sorted(bad_shards))}")
                        return
            yield self.collate(items, bad, bad_shards, epoch)
            produced += 1


def _reasons(bad: Counter) -> str:
    return ", ".join(f"{reason}={count}" for reason, count in sorted(bad.items()) if count)


def _error(message: str) -> dict:
    return {"__error__": message}


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch, random and numpy for one sample's preprocess. In the main process
    (workers=0) the previous RNG states are put back, so the trainer's RNGs are not disturbed."""
    in_main = get_worker_info() is None
    if in_main:
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    # The CPU generator only: torch.manual_seed also queues lazy CUDA seeding, which captures a
    # stack trace each call (~ms per sample); augmentations in a data worker run on the CPU.
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        if in_main:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


# --------------------------------------------------------------------------------------------
# Training loader
# --------------------------------------------------------------------------------------------


@dataclass
class _Source:
    urls: list[str]
    weight: float
    sizes: dict[str, int]


@dataclass
class _TrainDataset(IterableDataset):
    pipeline: _Pipeline
    sources: list[_Source]
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
        info = get_worker_info()
        worker = info.id if info is not None else 0
        allow_pixels(self.pipeline.max_image_pixels)
        workers = max(self.workers, 1)
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
        seed_base = _seed("augment", self.seed, self.epoch, self.rank, self.world_size, role)
        yield from self.pipeline.batches(stream, count, self.epoch, seed_base, position)

    def _mixed(self, slot: int, slots: int, role: int) -> Iterator[dict]:
        streams = [self._source_stream(index, source, slot, slots, role) for index, source in enumerate(self.sources)]
        if len(streams) == 1:
            yield from streams[0]
            return
        rng = random.Random(_seed("mix", self.seed, self.epoch, self.rank, role))
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

    def _source_stream(self, index: int, source: _Source, slot: int, slots: int, role: int) -> Iterator[dict]:
        if self.mode == "resampled":
            rng = random.Random(_seed("resample", self.seed, self.epoch, self.rank, role, index))
            shards = (rng.choice(source.urls) for _ in itertools.count())
            samples = (sample for url in shards for sample in _read_shard(url))
            yield from _shuffled(samples, self.shuffle_buffer, rng)
            return
        order = list(source.urls)
        random.Random(_seed("shards", self.seed, self.epoch, index)).shuffle(order)  # same on every rank
        share = _slot_share(order, slot, slots)
        if share.count(source.sizes) == 0:
            yield _error(f"rank {self.rank} worker {role} has no samples of {source.urls[0]}...: "
                         f"fewer samples than world_size x workers ({slots})")
            return
        for cycle in itertools.count():
            rng = random.Random(_seed("buffer", self.seed, self.epoch, self.rank, role, index, cycle))
            if cycle:  # padding a short share: read it again in another order
                share = share.reordered(rng)
            good = 0
            for sample in _shuffled(_read_share(share), self.shuffle_buffer, rng):
                good += "__bad__" not in sample
                yield sample
            if good == 0:
                yield _error(f"no readable sample in shards {', '.join(share.urls)}")
                return


class TrainLoader:
    """The training batch stream of one rank. See the module docstring for the guarantees."""

    def __init__(self, dataset: _TrainDataset) -> None:
        self._dataset = dataset

    @property
    def batches_per_epoch(self) -> Optional[int]:
        """Batches every rank yields per epoch (equal on all ranks); None in resampled mode."""
        return self._dataset.batches_per_epoch

    @property
    def samples_per_epoch(self) -> int:
        return sum(sum(source.sizes.values()) for source in self._dataset.sources)

    def iterate(self, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
        """Batches of `epoch`, starting after the first `skip_batches` (resume)."""
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        dataset = _TrainDataset(**{**self._dataset.__dict__, "epoch": epoch, "skip_batches": skip_batches})
        yield from _run(dataset, dataset.workers)


def _run(dataset: IterableDataset, workers: int) -> Iterator[dict]:
    # Pinned host memory lets the trainer's non-blocking copies overlap the GPU's compute.
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False,
                        prefetch_factor=2 if workers else None, pin_memory=torch.cuda.is_available())
    yield from _unwrap(iter(loader) if workers else iter(dataset))


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
) -> TrainLoader:
    """The training loader of rank `rank` of `world_size` for `cfg` (see the module docstring).

    `preprocess`: PIL.Image (RGB) -> Tensor of shape (C, H, W), or, when it has
    `wants_sample = True`, the raw sample dict -> tensor (extension -> bytes, e.g. "npy",
    "nii.gz", "txt", plus "__key__" and "__url__" strings); whatever it raises counts the sample
    as "bad_image". With `wants_seed = True` it is called as `preprocess(image, seed)` and draws
    its augmentation from that per-sample seed (otherwise torch, random and numpy are seeded around
    the call). Its outputs are stacked with torch's default_collate, then passed through its
    `finish_batch(images)` when it has one (e.g. uint8 -> normalised float, once per batch). `tokenizer`: list[str] ->
    LongTensor of shape (N, L). Both must be picklable when `cfg.workers > 0`.
    Raises DataError when a shard is missing or there are fewer samples than one global batch.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_urls(cfg)
    sources = []
    for source in cfg.train:
        urls = expand_urls(source.urls)
        sizes = dict(zip(urls, shard_sizes(urls))) if cfg.mode == "epoch" else {url: 0 for url in urls}
        sources.append(_Source(urls=urls, weight=source.weight, sizes=sizes))
    batches_per_epoch = None
    if cfg.mode == "epoch":
        total = sum(sum(source.sizes.values()) for source in sources)
        batches_per_epoch = total // (world_size * batch_size)
        if batches_per_epoch == 0:
            raise DataError(f"data.train: {total} samples is fewer than one global batch "
                            f"({world_size} ranks x batch size {batch_size})")
    pipeline = _Pipeline(
        preprocess=preprocess, tokenizer=tokenizer, batch_size=batch_size, caption_key=cfg.caption_key,
        parent_caption_key=cfg.parent_caption_key, max_image_pixels=cfg.max_image_pixels, sub_captions=cfg.sub_captions,
        sub_caption_sentences=cfg.sub_caption_sentences, sentences=cfg.sentences,
        seed=seed, max_bad_fraction=cfg.max_bad_fraction, bad_window=cfg.bad_window,
    )
    return TrainLoader(_TrainDataset(
        pipeline=pipeline, sources=sources, mode=cfg.mode, shuffle_buffer=cfg.shuffle_buffer, seed=seed,
        rank=rank, world_size=world_size, workers=cfg.workers, batches_per_epoch=batches_per_epoch,
    ))


# --------------------------------------------------------------------------------------------
# Evaluation loader
# --------------------------------------------------------------------------------------------


@dataclass
class _EvalDataset(IterableDataset):
    pipeline: _Pipeline
    urls: list[str]
    rank: int
    world_size: int
    workers: int

    def __post_init__(self) -> None:
        super().__init__()

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        allow_pixels(self.pipeline.max_image_pixels)
        workers = max(self.workers, 1)
        stream = _read_share(_slot_share(self.urls, self.rank * workers + worker, self.world_size * workers))
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
                items.append(self.pipeline.decode(sample, _seed("eval", sample["__key__"])))
            except _BadSample as failure:
                bad[failure.reason] += 1
                bad_shards.add(sample["__url__"])
                continue
            if len(items) == self.pipeline.batch_size:
                yield self.pipeline.collate(items, bad, bad_shards, 0)
                items, bad, bad_shards = [], Counter(), set()
        if items:
            yield self.pipeline.collate(items, bad, bad_shards, 0)


class EvalLoader:
    """Iterable of eval batches (same dict as training). Ranks get disjoint shares that together
    cover every readable sample once; no shuffle, no padding, the last batch may be short."""

    def __init__(self, dataset: _EvalDataset) -> None:
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
    max_image_pixels: int = 89_478_485,
) -> EvalLoader:
    """An eval loader over the shard spec `urls` (brace ranges, `::` lists). Raises DataError
    naming a missing local shard."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    shard_urls = expand_urls(urls)
    for url in shard_urls:
        if is_local(url) and not os.path.isfile(local_path(url)):
            raise DataError(f"eval shard {url} not found")
    pipeline = _Pipeline(preprocess=preprocess, tokenizer=tokenizer, batch_size=batch_size,
                         caption_key=caption_key, max_image_pixels=max_image_pixels)
    return EvalLoader(_EvalDataset(pipeline=pipeline, urls=shard_urls, rank=rank, world_size=world_size,
                                   workers=workers))


# --------------------------------------------------------------------------------------------
# Bad-sample rule
# --------------------------------------------------------------------------------------------


@dataclass
class BadSampleMonitor:
    """Stops the run when more than `max_fraction` of the last `window` samples were bad.

    Call `update(batch["bad"], len(batch["key"]), batch["bad_shards"])` with every batch (on
    every rank). Judged per whole batch: the window holds the most recent batches whose samples
    (good + bad) add up to at least `window`.
    """

    max_fraction: float
    window: int
    _entries: deque = field(default_factory=deque, init=False, repr=False)
    _good: int = field(default=0, init=False)
    _bad: Counter = field(default_factory=Counter, init=False, repr=False)

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "BadSampleMonitor":
        return cls(max_fraction=cfg.max_bad_fraction, window=cfg.bad_window)

    def update(self, bad: dict[str, int], batch_size: int, bad_shards: Iterable[str] = ()) -> None:
        """Add one batch: `bad` reason -> count skipped before it, `batch_size` good samples.
        Raises DataError naming the reasons and shards when the bad fraction is over the limit."""
        bad = Counter({reason: count for reason, count in bad.items() if count})
        self._entries.append((batch_size, bad, list(bad_shards)))
        self._good += batch_size
        self._bad.update(bad)
        while len(self._entries) > 1 and self._total() - self._entry_total(self._entries[0]) >= self.window:
            old_good, old_bad, _ = self._entries.popleft()
            self._good -= old_good
            self._bad.subtract(old_bad)
        bad_count = sum(self._bad.values())
        # Judge a full window; or earlier, when the bad samples alone already exceed the limit.
        if (self._total() >= self.window and bad_count > self.max_fraction * self._total()) or (
            bad_count > self.max_fraction * self.window
        ):
            shards = sorted({shard for _, _, entry_shards in self._entries for shard in entry_shards})
            raise DataError(
                f"{bad_count} of the last {self._total()} samples were bad ({_reasons(self._bad)}), over "
                f"data.max_bad_fraction={self.max_fraction}; shards: {', '.join(shards) or 'unknown'}"
            )

    def _total(self) -> int:
        return self._good + sum(self._bad.values())

    @staticmethod
    def _entry_total(entry: tuple) -> int:
        return entry[0] + sum(entry[1].values())
