"""Image-text retrieval: R@1/5/10 image->text and text->image, several captions per image.

Captions of a sample come from its `.json` "captions" (a list of strings) or its `.txt`: a JSON
list, or one caption per line (clip_benchmark's retrieval layout). An image->text hit at k: one
of the image's own captions is among the k best-scored texts; text->image: the caption's image is
among the k best-scored images. Scores are the checkpoint's own geometry (`scoring_head`).

Exact and memory-bounded for 100k x 100k: the (N images x M texts) score matrix is never built.
Queries and keys are scored in (chunk x chunk) blocks; each query keeps only its best positive
score and the top `max(recall_at)` scores of its non-positive keys, merged block by block, so
the rank of its best positive (how many non-positives score strictly above it) is exact up to
that depth. Memory: two blocks plus (queries x depth) scores, whatever N and M.

Re-ranking (`rerank_topk`, when the scoring head `scores_with_tokens` and so has `pair_scores`):
each query's top-K keys by global cosine are re-scored with the head's text-conditioned score
and ranked among themselves; keys outside the K rank below all of them (as a token-scoring
head's `pairwise_scores(topk=K)` may do for text queries on a dense matrix). Without
`rerank_topk`, a head that `scores_with_tokens` is given the image tokens in every block:
text-conditioned scores for every pair, exact but costly.

Matryoshka: for a scoring head that trained nested prefixes (`Head.matryoshka_dims`), every
metric is also reported per prefix, `retrieval_i2t_r1@16` ..., as zero-shot's `zeroshot_top1@16`:
the first `dim` features go through the head's own `pairwise_scores`, which re-normalises (or,
for MERU, re-lifts) whatever width it is given. Not for heads that score with tokens (the tokens
have no prefixes), as in zero-shot.

Distributed: every rank embeds its own share of the shards (images and their captions) and the
caption embeddings are all-gathered. Embedding heads also all-gather the image embeddings (N x E)
and each rank ranks its own images (image->text) and its own captions (text->image) against all
keys. Heads that score with tokens never move the image tokens (N x P x E): each rank scores its
own images against all captions (`sharded_token_ranks`, `sharded_reranked_ranks`) and the ranks
exchange per-caption arrays of a text chunk only (a best-positive score and a count, or the
top-K candidates and their re-scores). Hit counts are summed over ranks. No rank waits on rank 0
alone.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import Tensor

from vlp.core.collectives import all_gather_rows, all_reduce_max, all_reduce_sum
from vlp.data_pipelines.errors import DataError
from vlp.models.dual_encoder import scoring_head
from vlp.train.evals.base import EVALUATORS, EvalConfig, EvalContext, EvalExample, Evaluator
from vlp.train.evals.harness import encode_texts_lockstep, zero3_partitioned

# (queries (q,), keys (k,)) index tensors -> (q, k) scores; positive masks take broadcasting
# (q, 1), (1, k) or (q, d) index tensors.
BlockFn = Callable[[Tensor, Tensor], Tensor]


class RetrievalConfig(EvalConfig):
    type: Literal["retrieval"] = "retrieval"
    recall_at: list[int] = Field(default_factory=lambda: [1, 5, 10])
    # Where a sample's captions are: "json" (.json "captions"), "txt" (a JSON list or lines),
    # "auto" (.json "captions" when present, else .txt).
    captions: Literal["auto", "txt", "json"] = "auto"
    # Queries and keys per score block (memory: about 3 * chunk_size^2 floats).
    chunk_size: int = Field(2048, ge=1)
    text_batch_size: int = Field(256, ge=1)
    # Re-score each query's top-K by the text-conditioned score (needs a scoring head that
    # `scores_with_tokens`); must be >= max(recall_at).
    rerank_topk: Optional[int] = Field(None, ge=1)
    prefix: str = "retrieval_"

    @model_validator(mode="after")
    def _depths(self) -> "RetrievalConfig":
        if not self.recall_at or min(self.recall_at) < 1:
            raise ValueError("recall_at: needs positive integers, e.g. [1, 5, 10]")
        if self.rerank_topk is not None and self.rerank_topk < max(self.recall_at):
            raise ValueError(f"rerank_topk={self.rerank_topk} must be >= max(recall_at)={max(self.recall_at)}")
        return self


def sample_captions(caption: str, meta: dict, mode: str, key: str = "?") -> list[str]:
    """The captions of one sample: `.json` "captions", or the `.txt` as a JSON list or lines."""
    if mode in ("auto", "json") and isinstance(meta, dict) and "captions" in meta:
        captions = meta["captions"]
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise DataError(f"retrieval: sample {key}: .json 'captions' must be a list of strings")
    elif mode == "json":
        raise DataError(f"retrieval: sample {key}: .json has no 'captions' list (captions=json)")
    elif caption.lstrip().startswith("["):
        try:
            captions = json.loads(caption)
        except ValueError:
            raise DataError(f"retrieval: sample {key}: .txt starts with '[' but is not a JSON list") from None
        if not isinstance(captions, list):
            raise DataError(f"retrieval: sample {key}: .txt JSON is not a list")
        captions = [str(c) for c in captions]
    else:
        captions = caption.splitlines()
    captions = [c.strip() for c in captions if c.strip()]
    if not captions:
        raise DataError(f"retrieval: sample {key} has no caption")
    return captions


def merge_positive_block(
    best_positive: Tensor, top_negative: Tensor, block: Tensor, is_positive: Tensor, depth: int,
) -> tuple[Tensor, Tensor]:
    """A (q, k) score block merged into each query's running state: its best positive score (q,)
    and its top-`depth` non-positive scores (q, <= depth), -inf where there are none yet."""
    best_positive = torch.maximum(best_positive, block.masked_fill(~is_positive, -torch.inf).amax(dim=1))
    merged = torch.cat([top_negative, block.masked_fill(is_positive, -torch.inf)], dim=1)
    return best_positive, merged.topk(min(depth, merged.shape[1]), dim=1).values


def merge_top_block(top_scores: Tensor, top_keys: Tensor, block: Tensor, keys: Tensor, depth: int) -> tuple[Tensor, Tensor]:
    """Each query's running top-`depth` (scores (q, d), key indices (q, d)) merged with a (q, k)
    block of the keys `keys` (k,)."""
    merged_scores = torch.cat([top_scores, block], dim=1)
    merged_keys = torch.cat([top_keys, keys[None].expand(len(block), -1)], dim=1)
    top_scores, order = merged_scores.topk(min(depth, merged_scores.shape[1]), dim=1)
    return top_scores, merged_keys.gather(1, order)


def candidate_ranks(rescored: Tensor, is_positive: Tensor, depth: int) -> Tensor:
    """Rank of each query's best positive among its re-scored candidates (q, d): how many
    non-positive candidates score strictly above it, or `depth` when none is positive -> (q,)."""
    best_positive = rescored.masked_fill(~is_positive, -torch.inf).amax(dim=1)
    rank = (rescored.masked_fill(is_positive, -torch.inf) > best_positive[:, None]).sum(dim=1)
    return torch.where(is_positive.any(dim=1), rank, torch.full_like(rank, depth))


def positive_ranks(
    scores: BlockFn, positives: BlockFn, queries: Tensor, num_keys: int, depth: int, chunk: int,
) -> Tensor:
    """Rank of each query's best positive key: how many non-positive keys score strictly above
    it, exact up to `depth` (larger ranks are reported as `depth`). queries: (Q,) indices -> (Q,).

    Streams over (chunk x chunk) blocks of `scores(queries, keys)`, keeping the best positive
    score and the top-`depth` non-positive scores of each query."""
    out = []
    for query_chunk in queries.split(chunk):
        best_positive = torch.full((len(query_chunk),), -torch.inf)
        top_negative = torch.full((len(query_chunk), 0), -torch.inf)
        for start in range(0, num_keys, chunk):
            keys = torch.arange(start, min(start + chunk, num_keys))
            block = scores(query_chunk, keys).float().cpu()  # (q, k)
            is_positive = positives(query_chunk[:, None], keys[None, :])  # (q, k)
            best_positive, top_negative = merge_positive_block(best_positive, top_negative, block, is_positive, depth)
        out.append((top_negative > best_positive[:, None]).sum(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def reranked_ranks(
    scores: BlockFn, rescore: Callable[[Tensor, Tensor], Tensor], positives: BlockFn, queries: Tensor,
    num_keys: int, depth: int, chunk: int,
) -> Tensor:
    """Like `positive_ranks`, after re-scoring each query's top-`depth` keys by `scores` with
    `rescore(query_index (Q,), key_index (Q,)) -> (Q,)`: the rank of the best positive among the
    re-scored candidates, or `depth` when no positive is among them."""
    out = []
    for query_chunk in queries.split(chunk):
        top_scores = torch.full((len(query_chunk), 0), -torch.inf)
        top_keys = torch.zeros((len(query_chunk), 0), dtype=torch.long)
        for start in range(0, num_keys, chunk):
            keys = torch.arange(start, min(start + chunk, num_keys))
            block = scores(query_chunk, keys).float().cpu()  # (q, k)
            top_scores, top_keys = merge_top_block(top_scores, top_keys, block, keys, depth)  # (q, depth)
        q, d = top_keys.shape
        flat_queries = query_chunk[:, None].expand(q, d).reshape(-1)
        rescored = rescore(flat_queries, top_keys.reshape(-1)).float().cpu().reshape(q, d)
        out.append(candidate_ranks(rescored, positives(query_chunk[:, None], top_keys), depth))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def sharded_token_ranks(
    head: Any, image: Tensor, image_tokens: Tensor, text: Tensor, owner: Tensor, image_offset: int,
    text_queries: Tensor, depth: int, chunk: int, device: torch.device = torch.device("cpu"),
) -> tuple[Tensor, Tensor]:
    """`positive_ranks` in both directions with text-conditioned scores for every pair, each rank
    holding only its own images: (image->text ranks of this rank's images (n,), text->image ranks
    of `text_queries` (Q,)). Every rank calls it (there are collectives per text chunk).

    image: (n, E) this rank's raw image embeddings, global indices image_offset + [0, n);
    image_tokens: (n, P, E) theirs; text: (M, E) every rank's captions; owner: (M,) the global
    image index of each caption; text_queries: (Q,) global caption indices.

    Each (image chunk x text chunk) block is scored once and serves both directions. Image->text
    needs nothing from other ranks. Text->image: per text, each rank keeps its own images' best
    positive score and top-`depth` non-positive scores; the positive score is max-reduced (one
    rank holds the caption's image), each rank counts its non-positives strictly above it, and
    the counts are summed and clamped: min(depth, sum_r min(depth, c_r)) = min(depth, sum_r c_r),
    the rank `positive_ranks` gives on all images. Exchanged: two (chunk,) arrays per text chunk."""
    num_images, num_texts = image.shape[0], text.shape[0]
    local_owner = owner - image_offset  # (M,) this rank's index of each caption's image (outside [0, n): another rank's)
    i2t_positive = torch.full((num_images,), -torch.inf)
    i2t_negative = torch.full((num_images, depth), -torch.inf)  # -inf never counts as above
    t2i = torch.zeros(num_texts, dtype=torch.long)
    for text_start in range(0, num_texts, chunk):  # the same chunks on every rank: the collectives pair up
        texts = torch.arange(text_start, min(text_start + chunk, num_texts))
        t2i_positive = torch.full((len(texts),), -torch.inf)
        t2i_negative = torch.full((len(texts), depth), -torch.inf)
        for start in range(0, num_images, chunk):
            stop = min(start + chunk, num_images)
            block = head.pairwise_scores(image[start:stop], text[texts],
                                         image_tokens=image_tokens[start:stop]).float().cpu()  # (i, t)
            is_positive = local_owner[texts][None, :] == torch.arange(start, stop)[:, None]  # (i, t)
            i2t_positive[start:stop], i2t_negative[start:stop] = merge_positive_block(
                i2t_positive[start:stop], i2t_negative[start:stop], block, is_positive, depth)
            t2i_positive, t2i_negative = merge_positive_block(t2i_positive, t2i_negative, block.T, is_positive.T, depth)
        # Reduced on the rank's device (NCCL reduces only GPU tensors).
        t2i_positive = all_reduce_max(t2i_positive.to(device)).cpu()
        above = (t2i_negative > t2i_positive[:, None]).sum(dim=1)  # (t,) this rank's images above, <= depth
        t2i[texts] = all_reduce_sum(above.to(device)).cpu().clamp(max=depth)
    i2t = (i2t_negative > i2t_positive[:, None]).sum(dim=1)
    return i2t, t2i[text_queries]


def sharded_reranked_ranks(
    head: Any, image: Tensor, image_tokens: Tensor, text: Tensor, owner: Tensor, image_offset: int,
    text_queries: Tensor, depth: int, chunk: int, device: torch.device = torch.device("cpu"),
) -> tuple[Tensor, Tensor]:
    """`reranked_ranks` in both directions, each rank holding only its own images (arguments as
    in `sharded_token_ranks`; depth: `rerank_topk`). Every rank calls it.

    Image->text needs nothing from other ranks. Text->image, per text chunk: each rank's
    top-`depth` images by global score (scores and global indices; -inf and -1 where the rank
    holds fewer) are all-gathered and merged into each text's top-`depth` over all images; each
    rank re-scores the candidates it holds, the re-scores are max-reduced, and the caption's
    image is ranked among its candidates. Exchanged per text chunk: (world, chunk, depth) scores
    and indices, and one (chunk, depth) array of re-scores."""
    num_images, num_texts = image.shape[0], text.shape[0]

    def global_scores(images: Tensor, texts: Tensor) -> Tensor:  # (i, t), the token head's score without tokens
        return head.pairwise_scores(image[images], text[texts])

    def rescore(images: Tensor, texts: Tensor) -> Tensor:  # this rank's image indices (Q,), caption indices (Q,)
        return head.pair_scores(image_tokens, text, images, texts, image_embed=image)

    i2t = reranked_ranks(global_scores, rescore, lambda images, texts: owner[texts] == images + image_offset,
                         torch.arange(num_images), num_texts, depth, chunk)
    t2i = torch.zeros(num_texts, dtype=torch.long)
    for text_start in range(0, num_texts, chunk):  # the same chunks on every rank: the collectives pair up
        texts = torch.arange(text_start, min(text_start + chunk, num_texts))
        top_scores = torch.full((len(texts), depth), -torch.inf)
        top_images = torch.full((len(texts), depth), -1, dtype=torch.long)  # global indices; -1: none
        for start in range(0, num_images, chunk):
            images = torch.arange(start, min(start + chunk, num_images))
            block = global_scores(images, texts).float().cpu().T  # (t, i)
            top_scores, top_images = merge_top_block(top_scores, top_images, block, images + image_offset, depth)
        # (world * t, depth) -> (t, world * depth) -> each text's top-depth over every rank's images.
        every_score = all_gather_rows(top_scores.to(device)).cpu()
        every_image = all_gather_rows(top_images.to(device)).cpu()
        world_size = every_score.shape[0] // len(texts)
        every_score = every_score.reshape(world_size, len(texts), depth).permute(1, 0, 2).reshape(len(texts), -1)
        every_image = every_image.reshape(world_size, len(texts), depth).permute(1, 0, 2).reshape(len(texts), -1)
        order = every_score.topk(depth, dim=1).indices
        candidates = every_image.gather(1, order)  # (t, depth)
        local = candidates - image_offset
        mine = (local >= 0) & (local < num_images)  # -1 (no candidate) is below any offset
        rescored = torch.full((len(texts), depth), -torch.inf)
        rows, columns = mine.nonzero(as_tuple=True)
        if len(rows):
            rescored[rows, columns] = rescore(local[rows, columns], texts[rows]).float().cpu()
        rescored = all_reduce_max(rescored.to(device)).cpu()  # each candidate re-scored by the rank holding it
        t2i[texts] = candidate_ranks(rescored, owner[texts][:, None] == candidates, depth)
    return i2t, t2i[text_queries]


def recall_counts(ranks: Tensor, ks: list[int]) -> Tensor:
    """(len(ks),) number of queries whose positive rank is below each k."""
    return torch.tensor([float((ranks < k).sum()) for k in ks], dtype=torch.float64)


def retrieval_ranks(
    head: Any, image: Tensor, text: Tensor, owner: Tensor, image_queries: Tensor, text_queries: Tensor,
    depth: int, chunk: int,
) -> tuple[Tensor, Tensor]:
    """(image->text ranks of `image_queries`, text->image ranks of `text_queries`) by an embedding
    head's `pairwise_scores` (heads that score with tokens go through `sharded_*_ranks`, whose
    image tokens stay on their rank).

    image: (N, E) raw image embeddings, every rank's; text: (M, E) raw caption embeddings;
    owner: (M,) the image index of each caption."""
    def i2t_scores(images: Tensor, texts: Tensor) -> Tensor:  # (ni, nt)
        return head.pairwise_scores(image[images], text[texts])

    def t2i_scores(texts: Tensor, images: Tensor) -> Tensor:  # (nt, ni)
        return head.pairwise_scores(image[images], text[texts]).T

    i2t = positive_ranks(i2t_scores, lambda images, texts: owner[texts] == images, image_queries, text.shape[0],
                         depth, chunk)
    t2i = positive_ranks(t2i_scores, lambda texts, images: owner[texts] == images, text_queries, image.shape[0],
                         depth, chunk)
    return i2t, t2i


@EVALUATORS.register_by_type
class Retrieval(Evaluator):
    config_class = RetrievalConfig
    config: RetrievalConfig
    example = EvalExample(source="digits", build=(("shard_size", 200),), options=(("batch_size", 64),))

    def source(self):
        if not self.config.data:
            raise DataError("evals.retrieval: `data` (a shard spec of held-out image-caption shards) is required")
        return super().source()

    def prepare(self, model: Any, context: EvalContext) -> None:
        self.head = scoring_head(model)
        if self.config.rerank_topk is not None and not self.head.scores_with_tokens:
            raise DataError(f"retrieval: rerank_topk needs a head that scores with image tokens "
                            f"(Head.scores_with_tokens); the scoring head is {type(self.head).__name__}")

    def per_batch(self, model: Any, batch: dict) -> dict:
        """Per image: its raw embedding (and tokens, for a head that scores with them), its
        captions and their count."""
        encoded = model.encode_image(batch["image"])
        captions = [sample_captions(caption, meta, self.config.captions, key)
                    for caption, meta, key in zip(batch["caption"], batch["meta"], batch["key"])]
        rows = {"image": encoded["image_embed"].float(), "captions": [c for own in captions for c in own],
                "caption_count": torch.tensor([len(own) for own in captions])}
        if self.head.scores_with_tokens:
            rows["tokens"] = encoded["image_tokens"].float()
        return rows

    def reduce(self, rows: dict, model: Any, context: EvalContext) -> dict[str, float]:
        config, head, device = self.config, self.head, context.device
        embed_dim = model.config.embed_dim
        local_image = rows.get("image", torch.zeros(0, embed_dim, device=device))
        counts_per_image = rows.get("caption_count", torch.zeros(0, dtype=torch.long))
        # Each rank's own captions, a count that may differ between ranks: in lockstep.
        local_text = encode_texts_lockstep(model, rows.get("captions", []), device, zero3_partitioned(model),
                                           config.text_batch_size)
        local_owner = torch.repeat_interleave(torch.arange(len(counts_per_image)), counts_per_image).to(device)

        # Global indices: ranks in order; this rank's images start at image_offset.
        counts = all_gather_rows(torch.tensor([[len(local_image), len(local_text)]], device=device)).cpu()
        image_offset = int(counts[: context.rank, 0].sum())
        text_offset = int(counts[: context.rank, 1].sum())
        text = all_gather_rows(local_text)
        owner = all_gather_rows(local_owner + image_offset).cpu()

        ks = sorted(set(config.recall_at))
        image_queries = torch.arange(image_offset, image_offset + len(local_image))
        text_queries = torch.arange(text_offset, text_offset + len(local_text))
        # {metric suffix: (image->text ranks of this rank's images, text->image ranks of its captions)}
        ranks: dict[str, tuple[Tensor, Tensor]] = {}
        if head.scores_with_tokens:  # the image tokens (N x P x E) stay on their rank
            local_tokens = rows.get("tokens", torch.zeros(0, 1, embed_dim, device=device))
            sharded = sharded_token_ranks if config.rerank_topk is None else sharded_reranked_ranks
            ranks[""] = sharded(head, local_image, local_tokens, text, owner, image_offset, text_queries,
                                depth=config.rerank_topk or max(ks), chunk=config.chunk_size, device=device)
        else:
            image = all_gather_rows(local_image)
            # Matryoshka prefixes: the head's geometry re-normalises (or re-lifts) the width it is given.
            widths = {"": embed_dim, **{f"@{dim}": dim for dim in head.matryoshka_dims()}}
            for suffix, width in widths.items():
                ranks[suffix] = retrieval_ranks(head, image[:, :width], text[:, :width], owner, image_queries,
                                                text_queries, depth=max(ks), chunk=config.chunk_size)
        hits = torch.cat([torch.cat([recall_counts(i2t, ks), recall_counts(t2i, ks)]) for i2t, t2i in ranks.values()])
        hits = all_reduce_sum(hits.to(device)).cpu().reshape(len(ranks), 2, len(ks))  # (widths, direction, k)
        num_images, num_texts = int(counts[:, 0].sum()), int(counts[:, 1].sum())
        results: dict[str, float] = {}
        for suffix, (i2t_hits, t2i_hits) in zip(ranks, hits):
            recalls = {f"i2t_r{k}": float(i2t_hits[i]) / max(1, num_images) for i, k in enumerate(ks)}
            recalls.update({f"t2i_r{k}": float(t2i_hits[i]) / max(1, num_texts) for i, k in enumerate(ks)})
            recalls["mean_recall"] = sum(recalls.values()) / (2 * len(ks))
            results.update({f"{config.prefix}{name}{suffix}": value for name, value in recalls.items()})
        results[f"{config.prefix}images"] = num_images
        results[f"{config.prefix}texts"] = num_texts
        return results
