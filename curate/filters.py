"""The filters of `vlp curate`, as functions over the pool's columns (numpy arrays, one entry per
sample, in (shard, offset) order). Each takes `alive` (N,) bool, the samples the earlier filters
kept, and returns a bool mask of the samples it drops (a subset of `alive`); `vlp curate`
(`run.py`) chains them in the order `config.REASONS` gives.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
import numpy as np

from vlp.curate.config import BalanceFilter, CaptionFilter, DedupFilter, ImageFilter, ScoreFilter
from vlp.data_pipelines.errors import DataError

FLAT_LIMIT = 200_000  # `dedup.index: auto` searches exactly (flat) up to this many samples


# ------------------------------------------------------------------ captions
def caption_drops(captions: list[str], alive: np.ndarray, config: CaptionFilter, base: Path) -> dict[str, np.ndarray]:
    """{"caption_length", "caption_language", "caption_blocklist": (N,) bool}, each a subset of
    `alive` and of the samples no earlier rule in this order dropped."""
    n = len(captions)
    alive = alive.copy()
    words = np.array([len(caption.split()) for caption in captions], dtype=np.int64)
    chars = np.array([len(caption) for caption in captions], dtype=np.int64)
    too_short = (words < config.min_words) | (chars < config.min_chars)
    too_long = np.zeros(n, bool)
    if config.max_words is not None:
        too_long |= words > config.max_words
    if config.max_chars is not None:
        too_long |= chars > config.max_chars
    length = alive & (too_short | too_long)
    alive &= ~length

    language = np.zeros(n, bool)
    if config.languages:
        identify = language_identifier()
        wanted = {code.lower() for code in config.languages}
        for index in np.flatnonzero(alive):
            code, probability = identify.classify(captions[index])
            language[index] = code not in wanted or probability < config.min_language_probability
    alive &= ~language

    blocked = np.zeros(n, bool)
    words_blocked = [word.lower() for word in config.blocked_words(base)]
    if words_blocked:
        automaton = substring_automaton(words_blocked)
        for index in np.flatnonzero(alive):
            blocked[index] = next(automaton.iter(captions[index].lower()), None) is not None
    return {"caption_length": length, "caption_language": language, "caption_blocklist": blocked}


def language_identifier():
    """py3langid's model (shipped in its wheel, nothing downloaded), probabilities normalised."""
    from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_modelpath(Path(MODEL_DIR) / MODEL_FILE, norm_probs=True)


def substring_automaton(entries: list[str]):
    """An Aho-Corasick automaton (pyahocorasick) over lower-cased `entries`; `iter(text)` yields
    (end index, entry index) for every occurrence of every entry in `text`."""
    import ahocorasick

    automaton = ahocorasick.Automaton()
    for index, entry in enumerate(entries):
        automaton.add_word(entry.lower(), index)
    automaton.make_automaton()
    return automaton


# ------------------------------------------------------------------ scores
def score_drops(scores: np.ndarray, embedded: np.ndarray, alive: np.ndarray, config: ScoreFilter) -> np.ndarray:
    """Drop the alive samples under `min`, or outside the best `top_fraction` of all embedded
    samples of the pool (DataComp takes the fraction of the pool; ties go to the earlier sample)."""
    if config.min is not None:
        return alive & ~(scores >= config.min)
    candidates = np.flatnonzero(embedded)
    count = math.ceil(config.top_fraction * len(candidates))
    order = candidates[np.argsort(-scores[candidates], kind="stable")]  # best first, earlier first on ties
    best = np.zeros(len(scores), bool)
    best[order[:count]] = True
    return alive & ~best


# ------------------------------------------------------------------ image-based filtering
def image_filter_drops(image: np.ndarray, alive: np.ndarray, target: np.ndarray, config: ImageFilter) -> np.ndarray:
    """k-means (faiss) over the alive samples' image embeddings (N, E); a target embedding (T, E)
    picks its nearest centroid; alive samples of unpicked clusters are dropped."""
    import faiss

    rows = np.flatnonzero(alive)
    if config.clusters > len(rows):
        raise DataError(f"curate.image_filter.clusters: {config.clusters} clusters for {len(rows)} samples")
    pool = np.ascontiguousarray(image[rows], dtype=np.float32)
    kmeans = faiss.Kmeans(pool.shape[1], config.clusters, niter=config.iterations, seed=config.seed,
                          spherical=True, verbose=False)
    kmeans.train(pool)
    _, picked = kmeans.index.search(np.ascontiguousarray(target, dtype=np.float32), 1)  # (T, 1)
    _, assigned = kmeans.index.search(pool, 1)  # (n, 1)
    keep = np.isin(assigned[:, 0], np.unique(picked[:, 0]))
    drops = np.zeros(len(alive), bool)
    drops[rows[~keep]] = True
    return drops


# ------------------------------------------------------------------ duplicates
def exact_duplicate_drops(hashes: np.ndarray, alive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(drops, duplicate_of): an alive sample whose image bytes an earlier alive sample has is
    dropped; duplicate_of[i] is the kept copy's index (-1 where not dropped)."""
    first: dict[str, int] = {}
    drops = np.zeros(len(alive), bool)
    duplicate_of = np.full(len(alive), -1, np.int64)
    for index in np.flatnonzero(alive):
        kept = first.setdefault(hashes[index], index)
        if kept != index:
            drops[index], duplicate_of[index] = True, kept
    return drops, duplicate_of


def near_duplicate_drops(image: np.ndarray, alive: np.ndarray, config: DedupFilter,
                         query_block: int = 16_384) -> tuple[np.ndarray, np.ndarray]:
    """(drops, duplicate_of) for near duplicates: cosine similarity of the L2-normalised image
    embeddings (N, E) at least `config.threshold`. Visited in (shard, offset) order, a sample is
    kept unless an earlier kept sample is its duplicate (so a chain a~b~c with a !~ c keeps a and
    c); duplicate_of[i] is the earliest kept duplicate. Neighbours come from a faiss range search
    in blocks of `query_block` queries, so memory holds the vectors, the index and the pairs found."""
    import faiss

    rows = np.flatnonzero(alive)
    drops = np.zeros(len(alive), bool)
    duplicate_of = np.full(len(alive), -1, np.int64)
    if len(rows) < 2:
        return drops, duplicate_of
    vectors = np.ascontiguousarray(image[rows], dtype=np.float32)
    faiss.normalize_L2(vectors)  # stored as float16: re-normalise in float32
    index = build_index(vectors, config)
    radius = float(config.threshold) - 1e-6  # faiss keeps similarities strictly above the radius
    earlier: list[np.ndarray] = []  # per sample (position among `rows`), its neighbours before it
    bar = None
    if len(rows) > query_block:  # minutes to hours at 10^6 and more on a few cores: show it
        from vlp.data_pipelines.shards import progress

        bar = progress(None, total=len(rows), unit="query", desc="vlp curate: near duplicates")
    for start in range(0, len(rows), query_block):
        lims, _, found = index.range_search(vectors[start:start + query_block], radius)
        if bar is not None:
            bar.update(len(lims) - 1)
        for offset in range(len(lims) - 1):
            position = start + offset
            neighbours = found[lims[offset]:lims[offset + 1]]
            earlier.append(np.sort(neighbours[neighbours < position]))
    if bar is not None:
        bar.close()
    kept = np.zeros(len(rows), bool)
    for position, neighbours in enumerate(earlier):
        kept_neighbours = neighbours[kept[neighbours]] if len(neighbours) else neighbours
        if len(kept_neighbours):
            drops[rows[position]] = True
            duplicate_of[rows[position]] = rows[kept_neighbours[0]]
        else:
            kept[position] = True
    return drops, duplicate_of


def build_index(vectors: np.ndarray, config: DedupFilter):
    """A faiss inner-product index over `vectors` (N, E) float32: flat (exact) or IVF."""
    import faiss

    count, dim = vectors.shape
    kind = config.index if config.index != "auto" else ("flat" if count <= FLAT_LIMIT else "ivf")
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        lists = max(1, min(int(math.sqrt(count)), count // 39))  # faiss wants >= 39 points per list
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = vectors[np.random.default_rng(0).choice(count, min(count, lists * 256), replace=False)]
        index.train(sample)
        index.nprobe = min(config.nprobe, lists)
    index.add(vectors)
    return index


# ------------------------------------------------------------------ MetaCLIP balancing
def balance_drops(captions: list[str], keys: list[str], alive: np.ndarray, config: BalanceFilter,
                  base: Path) -> tuple[np.ndarray, dict[str, int]]:
    """(drops, matches per entry): alive samples that match no metadata entry, or whose entries
    all selected others (each entry selects at most `per_entry` of its matches, the ones with the
    lowest draw `hash(seed, key)`)."""
    entries = config.entries(base)
    if not entries:
        raise DataError("curate.balance.metadata: the metadata list is empty")
    automaton = substring_automaton(entries)
    matches: list[list[int]] = [[] for _ in entries]
    for index in np.flatnonzero(alive):
        for entry in {entry for _, entry in automaton.iter(captions[index].lower())}:
            matches[entry].append(index)
    kept = np.zeros(len(alive), bool)
    for samples in matches:
        if len(samples) > config.per_entry:
            samples = sorted(samples, key=lambda index: (sample_draw(config.seed, keys[index]), index))
        kept[samples[:config.per_entry]] = True
    counts = {entry: len(samples) for entry, samples in zip(entries, matches)}
    return alive & ~kept, counts


def sample_draw(seed: int, key: str) -> int:
    """A uniform 64-bit draw per (seed, sample key): the same on any machine, in any order."""
    return int.from_bytes(hashlib.sha256(f"{seed}\t{key}".encode()).digest()[:8], "big")

