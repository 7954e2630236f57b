"""The training loader's position as plain data: what each reading slot has read, so a resume
seeks there instead of reading and discarding every sample before it.

A reading slot (one rank x worker role) reads, per source, a list of *pieces*: `[shard index,
start, stop, step]` names the samples `start, start + step, ...` below `stop` of one shard
(`stop` -1: to the shard's end), sample indices counted as `tar_reader.read_shard` counts them.
A slot's whole state after each batch is:

    {"role", "produced" (its batches since the epoch (segment) began), "position" (raw samples
     taken, the augmentation-seed counter), "augment" (the augmentation seed base),
     "mix" (mixing RNG state or None), "pending" (the source drawn for the next sample),
     "sources": [per source: {"seed" (RNG seed prefix), "cycle", "pieces", "piece" (the one being
       read), "next" (next sample index in its shard), "good" (samples read this cycle),
       "buffer" ([shard index, sample index] per buffered sample: by reference, not bytes),
       "draining" (input done, buffer being emptied), "rng" (random.Random.getstate())}]}

Resampled mode is the same with one piece at a time, drawn by the source's RNG.

`SlotStream` reads from such a state; `redeal` turns the states of every slot of one layout
into states for another (the rest of the epoch, each sample once).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Optional

from vlp.core.files import atomic_write
from vlp.data_pipelines.collate import error_marker
from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.seeds import stable_seed
from vlp.data_pipelines.tar_reader import read_picked, read_samples

VERSION = 1
POSITION_FILE = "loader_rank{rank}.json"


def rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def rng_from(state: list) -> random.Random:
    rng = random.Random()
    rng.setstate((state[0], tuple(state[1]), state[2]))
    return rng


def piece_count(piece: list[int], sizes: list[int]) -> int:
    shard, start, stop, step = piece
    return len(range(start, sizes[shard] if stop < 0 else stop, step))


def sources_digest(urls: list[list[str]], sizes: list[list[int]]) -> str:
    """A short fingerprint of the shard lists (and counts): a position only applies to the same data."""
    return hashlib.blake2b(json.dumps([urls, sizes]).encode(), digest_size=8).hexdigest()


# --------------------------------------------------------------------------------------------
# The initial state of a slot
# --------------------------------------------------------------------------------------------


def epoch_pieces(sizes: list[int], seed: int, epoch: int, index: int, slot: int, slots: int) -> list[list[int]]:
    """Slot `slot` of `slots` in epoch mode: shards shuffled by (seed, epoch, source) alike on every
    rank, then whole shards dealt round-robin when there are at least as many shards as slots;
    else every slot reads all shards and keeps every `slots`-th sample (counted across the shard
    list, so one shard still splits across ranks). Slots are disjoint and cover every sample."""
    order = list(range(len(sizes)))
    random.Random(stable_seed("shards", seed, epoch, index)).shuffle(order)
    if len(order) >= slots:
        return [[shard, 0, -1, 1] for shard in order[slot::slots]]
    pieces, offset = [], 0
    for shard in order:
        pieces.append([shard, (slot - offset) % slots, -1, slots])
        offset += sizes[shard]
    return pieces


def source_state(seed_prefix: str, pieces: list[list[int]], cycle: int = 0, rng: Optional[random.Random] = None, *,
                 piece: int = 0, next_sample: Optional[int] = None, good: int = 0, buffer: tuple = (),
                 draining: bool = False) -> dict:
    """One source's state in a slot (the schema in the module docstring), the one place it is
    written. The defaults are a source before it read anything: its RNG from (`seed_prefix`,
    `cycle`), reading from the first piece's start. `buffer`: (shard index, sample index) refs."""
    rng = rng if rng is not None else random.Random(stable_seed(seed_prefix, cycle))
    if next_sample is None:
        next_sample = pieces[0][1] if pieces else 0
    return {"seed": seed_prefix, "cycle": cycle, "pieces": pieces, "piece": piece, "next": next_sample,
            "good": good, "buffer": [list(ref) for ref in buffer], "draining": draining, "rng": rng_state(rng)}


def slot_state(role: int, augment: int, sources: list[dict], mix: Optional[list] = None, pending: Optional[int] = None,
               produced: int = 0, position: int = 0) -> dict:
    """One slot's whole state (the schema in the module docstring), the one place it is written;
    the defaults are a slot before it read anything. `mix`: the mixing RNG's state (`mix_state`)."""
    return {"role": role, "produced": produced, "position": position, "augment": augment, "mix": mix,
            "pending": pending, "sources": sources}


def mix_state(mix_seed: int, sources: list[dict]) -> Optional[list]:
    """A fresh mixing RNG's state; None for one source (nothing to mix)."""
    return rng_state(random.Random(mix_seed)) if len(sources) > 1 else None


# --------------------------------------------------------------------------------------------
# Reading from a state
# --------------------------------------------------------------------------------------------


class SourceCursor:
    """One source's raw samples for one slot, through its shuffle buffer (webdataset's rule: fill
    to `buffer_size`, then each new sample replaces a random one that is yielded; at the end the
    rest in random order). Bad-shard markers pass straight through. `state()` is its position."""

    def __init__(self, urls: list[str], buffer_size: int, state: dict, resampled: bool) -> None:
        self.urls = urls
        self.buffer_size = buffer_size
        self.resampled = resampled
        self.seed = state["seed"]
        self.cycle = state["cycle"]
        self.pieces = [list(piece) for piece in state["pieces"]]
        self.piece = state["piece"]
        self.next = state["next"]
        self.good = state["good"]
        self.draining = state["draining"]
        self.rng = rng_from(state["rng"])
        self.buffer = self._fetch(state["buffer"])  # [((shard, index), sample)]
        self._reader = None

    def _fetch(self, refs: list[list[int]]) -> list[tuple[tuple[int, int], dict]]:
        """Re-read buffered samples by reference: one header index (or stream) per shard."""
        wanted: dict[int, list[int]] = defaultdict(list)
        for shard, index in refs:
            wanted[shard].append(index)
        found = {shard: read_picked(self.urls[shard], indices) for shard, indices in wanted.items()}
        buffer = []
        for shard, index in refs:
            sample = found[shard].get(index)
            if sample is None:
                raise DataError(f"{self.urls[shard]} no longer holds sample {index}, which the checkpoint's "
                                f"shuffle buffer refers to: the shard changed since the checkpoint")
            buffer.append(((shard, index), sample))
        return buffer

    def state(self) -> dict:
        return source_state(self.seed, self.pieces, self.cycle, self.rng, piece=self.piece, next_sample=self.next,
                            good=self.good, buffer=tuple(ref for ref, _ in self.buffer), draining=self.draining)

    def __next__(self) -> dict:
        while True:
            if self.draining:
                if self.buffer:
                    return self.buffer.pop()[1]
                if self.good == 0:
                    urls = sorted({self.urls[piece[0]] for piece in self.pieces})
                    return error_marker(f"no readable sample in shards {', '.join(urls)}")
                self._next_cycle()
                continue
            item = self._read()
            if item is None:  # this cycle's input is done: the rest of the buffer, shuffled
                self.rng.shuffle(self.buffer)
                self.buffer.reverse()  # popped from the end, so yielded in shuffled order
                self.draining = True
                continue
            if isinstance(item, dict):  # a bad-shard marker
                return item
            if self.buffer_size <= 1:
                return item[1]
            if len(self.buffer) < self.buffer_size:
                self.buffer.append(item)
                continue
            index = self.rng.randrange(self.buffer_size)
            out = self.buffer[index]
            self.buffer[index] = item
            return out[1]

    def _next_cycle(self) -> None:
        """Padding a short share: read it again in another order, from a fresh RNG."""
        self.cycle += 1
        self.rng = random.Random(stable_seed(self.seed, self.cycle))
        self.rng.shuffle(self.pieces)
        self.piece, self.good, self.draining = 0, 0, False
        self.next = self.pieces[0][1] if self.pieces else 0

    def _read(self):
        """The next ((shard, index), sample) of the input, a bad-shard marker, or None when done."""
        while True:
            if self._reader is None:
                if self.resampled and self.piece >= len(self.pieces):
                    self.pieces, self.piece, self.next = [[self.rng.choice(range(len(self.urls))), 0, -1, 1]], 0, 0
                if self.piece >= len(self.pieces):
                    return None
                shard, _, stop, step = self.pieces[self.piece]
                self._reader = read_samples(self.urls[shard], self.next, None if stop < 0 else stop, step)
            got = next(self._reader, None)
            if got is None or got[0] < 0:  # the piece is done (a damaged shard ends it with a marker)
                self._reader = None
                self.piece += 1
                self.next = self.pieces[self.piece][1] if self.piece < len(self.pieces) else 0
                if got is None:
                    continue
                return got[1]
            index, sample = got
            shard, _, _, step = self.pieces[self.piece]
            self.next = index + step
            self.good += 1
            return (shard, index), sample


class SlotStream:
    """The raw samples of one slot: its sources mixed by weight (a marker is not a draw, so the
    proportions are of good samples)."""

    def __init__(self, sources: list[list[str]], weights: list[float], buffer_size: int, state: dict,
                 resampled: bool) -> None:
        self.cursors = [SourceCursor(urls, buffer_size, source, resampled)
                        for urls, source in zip(sources, state["sources"])]
        self.weights = weights
        self.mix = rng_from(state["mix"]) if state["mix"] is not None else None
        self.pending = state["pending"]

    def __next__(self) -> dict:
        if self.mix is None:
            return next(self.cursors[0])
        if self.pending is None:
            self.pending = self.mix.choices(range(len(self.cursors)), self.weights)[0]
        sample = next(self.cursors[self.pending])
        if "__bad__" not in sample:
            self.pending = None
        return sample

    def __iter__(self):
        return self

    def state(self) -> dict:
        return {"mix": rng_state(self.mix) if self.mix is not None else None, "pending": self.pending,
                "sources": [cursor.state() for cursor in self.cursors]}


# --------------------------------------------------------------------------------------------
# Another layout: the rest of the epoch dealt again
# --------------------------------------------------------------------------------------------


def remaining_pieces(state: dict, sizes: list[int]) -> list[list[int]]:
    """What one source of one slot has not yet handed out this epoch: its buffer, the rest of the
    shard it is in, its shards not yet begun. Nothing once it cycles (everything was read once)."""
    if state["cycle"] > 0:
        return []
    rest = [[shard, index, index + 1, 1] for shard, index in state["buffer"]]
    for position in range(state["piece"], len(state["pieces"])):
        shard, start, stop, step = state["pieces"][position]
        stop = sizes[shard] if stop < 0 else stop
        first = state["next"] if position == state["piece"] else start
        if first < stop:
            rest.append([shard, first, stop, step])
    return rest


def take(pieces: list[list[int]], sizes: list[int], begin: int, end: int) -> list[list[int]]:
    """Samples `begin` to `end` (counted along `pieces`), as pieces."""
    out, offset = [], 0
    for shard, start, stop, step in pieces:
        stop = sizes[shard] if stop < 0 else stop
        count = len(range(start, stop, step))
        lo, hi = max(begin - offset, 0), min(end - offset, count)
        if lo < hi:
            out.append([shard, start + lo * step, start + hi * step, step])
        offset += count
        if offset >= end:
            break
    return out


def role_batches(total: int, workers: int, role: int) -> int:
    """Batches of role `role` among a rank's `total` (the DataLoader takes them round-robin)."""
    return total // workers + (role < total % workers)


def redeal(old: list[dict], sizes: list[list[int]], *, seed: int, world_size: int, workers: int,
           batch_size: int, rank: int) -> tuple[dict, dict]:
    """Epoch mode: the states of rank `rank` of a new layout that read every not-yet-consumed
    sample of the epoch (every old slot's buffer, rest of its shard, shards not begun) once.

    Per source, the old slots' remaining pieces, in old slot order, are cut into one contiguous
    run per new slot, sized in proportion to the batches that slot yields; every new rank yields
    `total = remaining // (world_size * batch_size)` batches, and what is under one global batch
    is dropped, as at every epoch end. Returns (this rank's position, a note for the logs).
    """
    epoch = old[0]["epoch"]
    consumed = sum(state["batches"] for state in old)
    remaining = [[] for _ in sizes]
    for state in sorted(old, key=lambda state: state["rank"]):
        workers_then = max(state["workers"], 1)
        for role in range(workers_then):
            slot = state["roles"].get(str(role))
            if slot is None:  # a role that had not handed out a batch yet: its whole share
                slot = fresh_slot(sizes, seed, epoch, state["rank"], state["world_size"], state["workers"], role)
            for index, source in enumerate(slot["sources"]):
                remaining[index].extend(remaining_pieces(source, sizes[index]))
    counts = [sum(piece_count(piece, source_sizes) for piece in pieces)
              for pieces, source_sizes in zip(remaining, sizes)]
    slots_per_rank = max(workers, 1)
    total = sum(counts) // (world_size * batch_size)
    needs = [role_batches(total, slots_per_rank, role) for role in range(slots_per_rank)] * world_size
    roles = {}
    for role in range(slots_per_rank):
        slot = rank * slots_per_rank + role
        before, upto = sum(needs[:slot]), sum(needs[:slot + 1])
        sources = []
        for index, pieces in enumerate(remaining):
            prefix = f"redeal/{seed}/{epoch}/{consumed}/{world_size}/{workers}/{rank}/{role}/{index}"
            grand = max(sum(needs), 1)
            run = take(pieces, sizes[index], counts[index] * before // grand, counts[index] * upto // grand)
            if run:
                sources.append(source_state(prefix, run))
            else:  # nothing of this source left for this slot: pad from its share of the whole epoch
                padding = epoch_pieces(sizes[index], seed, epoch, index, slot, world_size * slots_per_rank)
                sources.append(source_state(prefix, padding, cycle=1))
        augment = stable_seed("augment-redeal", seed, epoch, consumed, world_size, workers, rank, role)
        mix = mix_state(stable_seed("mix-redeal", seed, epoch, consumed, rank, role), sources)
        roles[str(role)] = slot_state(role, augment, sources, mix)
    note = {"event": "data_redealt", "epoch": epoch, "from_layout": [old[0]["world_size"], old[0]["workers"]],
            "to_layout": [world_size, workers], "samples_left": sum(counts),
            "batches_per_rank": total, "dropped": sum(counts) - total * world_size * batch_size}
    return {"epoch": epoch, "batches": 0, "total": total, "roles": roles}, note


def fresh_slot(sizes: list[list[int]], seed: int, epoch: int, rank: int, world_size: int, workers: int,
               role: int) -> dict:
    """The epoch-mode state of a slot before it read anything (the deal of `epoch_pieces`)."""
    slots_per_rank = max(workers, 1)
    slot = rank * slots_per_rank + role
    sources = [source_state(f"buffer/{seed}/{epoch}/{rank}/{role}/{index}",
                            epoch_pieces(source_sizes, seed, epoch, index, slot, world_size * slots_per_rank))
               for index, source_sizes in enumerate(sizes)]
    return slot_state(role, stable_seed("augment", seed, epoch, rank, world_size, role), sources,
                      mix_state(stable_seed("mix", seed, epoch, rank, role), sources))


def fresh_resampled_slot(sources: int, seed: int, epoch: int, rank: int, role: int, salt: tuple = (),
                         world_size: int = 0) -> dict:
    """The resampled-mode state of a slot before it read anything; `salt` (resume point and new
    layout) seeds fresh streams after a resume on another layout."""
    states = []
    for index in range(sources):
        rng = random.Random(stable_seed("resample", seed, epoch, rank, role, index, *salt))
        states.append(source_state("", [], rng=rng))
    return slot_state(role, stable_seed("augment", seed, epoch, rank, world_size, role, *salt), states,
                      mix_state(stable_seed("mix", seed, epoch, rank, role, *salt), states))


# --------------------------------------------------------------------------------------------
# Files: one per rank beside the checkpoint's per-rank RNG files
# --------------------------------------------------------------------------------------------


def write_position(folder: Path, rank: int, position: dict) -> None:
    atomic_write(Path(folder) / POSITION_FILE.format(rank=rank), json.dumps(position, separators=(",", ":")))


def read_positions(folder: Path) -> list[dict]:
    """Every rank's saved position in a checkpoint folder, in rank order ([] when it has none:
    a checkpoint from before positions were saved)."""
    found = {}
    for path in Path(folder).glob(POSITION_FILE.format(rank="*")):
        state = json.loads(path.read_text())
        found[int(state["rank"])] = state
    if found and sorted(found) != list(range(found[min(found)]["world_size"])):
        raise DataError(f"{folder}: loader positions of ranks {sorted(found)} only, "
                        f"of {found[min(found)]['world_size']}: the checkpoint is incomplete")
    return [found[rank] for rank in sorted(found)]
