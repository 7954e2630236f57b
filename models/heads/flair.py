"""FLAIR: text-conditioned attention pooling over image tokens, trained with sigmoid losses.

After Xiao et al. 2024, "FLAIR: VLM with Fine-grained Language-informed Image Representations"
(CVPR 2025). A text's global embedding queries the image's patch tokens through one multi-head
attention layer whose keys and values get an extra all-zero slot (torch's `add_zero_attn`), so a
text that matches nothing in the image can put its weight there and pool (almost) nothing. The
result is one image embedding per (image, text) pair, `v(i, t)`.

Two sigmoid losses over the K sub-captions sampled per image (`data.sub_captions`), averaged
as in FLAIR:

* text-conditioned sigmoid (TCS): logit(i, t) = scale * cos(v(i, t), t) + bias, positive when
  t is one of image i's captions. Pooling is per pair, so scoring all B x (N * K) pairs costs
  B * N * K pooled vectors; FLAIR scores a sample of them (`negatives`, below).
* multi-positive sigmoid (MPS): the global image embedding against every caption of the
  global batch, K positives per image: logit = scale * cos(image, t) + bias.

Pairings (`negatives`), with W ranks of B images each and N = W * B:

* "flair" (default, FLAIR's code): every rank samples one caption of each of its images for each
  of its rows, so local image i meets, from every rank r, the K captions of r's image i (its own
  K positives on its own rank) and one sampled caption of each other image of r: FLAIR's
  (B, B + K - 1) text block per rank, passed round the ring; here it is read off the gathered
  captions. B x (N + W (K - 1)) pairs, TCS sum divided by B + K - 1 as FLAIR's code does.
* "sampled": own K captions plus ONE random caption of every other global image,
  B x (K + N - 1) pairs, TCS sum divided by B (SigLIP's per-image convention). On one rank it
  is "flair" times (B + K - 1) / B.
* "all": every caption of the global batch, B x N * K (small batches only), divided by B.

MPS sums over a row's N * K captions and divides by B * K, as FLAIR does. Other ranks' captions
are negatives in both; with `gather_with_grad` the sum of the ranks' losses is the
single-process loss of the global batch, so the averaged DDP gradient is the global one.

Memory: TCS is scored in blocks of text columns (`blockwise_columns` in tiled_tokens.py), so one
rank holds the (B, T) logits plus one block's (B, H, t, P) attention, never all B x T pooled
vectors; `block_size` sets t. Unset, a pairing whose dense intermediate fits the device's budget
(`tiled_tokens.dense_budget_bytes`: half the free memory on CUDA, 1 GiB on CPU) takes the dense
path, a larger one blocks of about 256 MiB.

Zero-shot scoring (`pairwise_scores`) pools every image for every text when given the image
tokens (FLAIR's primary `get_logits`), optionally only for each text's `topk` images by global
cosine; without tokens it falls back to global cosine (FLAIR's `get_logits_as_clip`). Both
stream over (images x texts) blocks of the same byte budget.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from vlp.core.collectives import at_least_fp32, contiguous_grad
from vlp.core.errors import ConfigError
from vlp.models.heads.base import HEADS, Head, HeadConfig, HeadInputs, bounded
from vlp.models.heads.tiled_tokens import DEFAULT_BLOCK_BYTES, auto_block_size, block_plan, blockwise_columns


class FlairConfig(HeadConfig):
    num_heads: int = Field(8, ge=1, description="attention heads of the pooling layer; must divide embed_dim")
    # FLAIR pools over the local (patch) tokens only; True adds the global token as one more key.
    include_global_token: bool = False
    init_logit_scale: float = Field(math.log(10.0), description="log of the initial scale (SigLIP)")
    init_logit_bias: float = -10.0
    max_logit_scale: float = Field(100.0, gt=0, description="upper bound of exp(logit_scale), by `base.bounded`")
    # "flair": FLAIR's per-rank blocks (B x (N + W (K - 1)), TCS / (B + K - 1)); "sampled": own K
    # captions + one random caption of every other image (B x (K + N - 1), TCS / B); "all":
    # every caption of the global batch (B x N * K pooled vectors; small batches only).
    negatives: Literal["flair", "sampled", "all"] = "flair"
    multi_positive: bool = Field(True, description="add FLAIR's multi-positive sigmoid loss (averaged with TCS)")
    # Images pooled per chunk in zero-shot scoring (bounds eval memory, with the byte budget).
    score_chunk: int = Field(64, ge=1)
    block_size: Optional[int] = Field(
        None, ge=1,
        description="text columns per TCS block (an int always tiles); None: dense while it fits the device's "
                    "budget (half the free memory on CUDA, 1 GiB on CPU), else ~256 MiB blocks")


# ---------------------------------------------------------------------------------------------
# Pure functions


def zero_slot_attention(
    queries: Tensor, keys: Tensor, values: Tensor, need_weights: bool = True
) -> tuple[Tensor, Optional[Tensor]]:
    """Scaled dot-product attention with one extra all-zero key/value slot.

    queries: (B, H, T, d); keys, values: (B, H, P, d).
    Returns pooled (B, H, T, d) and weights (B, H, T, P + 1), the last column being the zero
    slot. Its key is zero, so its logit is 0 whatever the query; its value is zero, so the
    pooled vector is `weights[..., :P] @ values` and shrinks toward zero when a text puts its
    weight on the slot (the attention weights over real tokens need not sum to 1).

    need_weights=False (the losses): weights is None and the pooled vectors come from
    `scaled_dot_product_attention` over the keys and values with the zero slot appended, which
    on CUDA never materialises the (B, H, T, P + 1) weights (flash / memory-efficient kernels);
    equal to the explicit softmax within 1e-5 in fp32 (tests/test_flair_filip.py).
    """
    if not need_weights:
        slot = keys.new_zeros(keys.shape[:-2] + (1, keys.shape[-1]))  # (B, H, 1, d)
        pooled = F.scaled_dot_product_attention(
            queries, torch.cat([keys, slot], dim=-2), torch.cat([values, slot.to(values.dtype)], dim=-2))
        return pooled, None
    scale = queries.shape[-1] ** -0.5
    logits = torch.einsum("bhtd,bhpd->bhtp", queries, keys) * scale  # (B, H, T, P)
    zero = logits.new_zeros(logits.shape[:-1] + (1,))
    weights = torch.cat([logits, zero], dim=-1).softmax(dim=-1)  # (B, H, T, P + 1)
    pooled = torch.einsum("bhtp,bhpd->bhtd", weights[..., :-1], values)
    return pooled, weights


def sampled_pairs(
    negative_caption: Tensor, first_image: int, num_captions: int
) -> tuple[Tensor, Tensor]:
    """Caption indices and labels of FLAIR's B x (K + N - 1) pairing.

    negative_caption: (B, N) long in [0, K): which of image j's K captions is image i's
        negative (the entries at i's own column are ignored).
    first_image: global index of this rank's first image (rank * B).
    Returns caption_index (B, K + N - 1) into the flattened (N * K) captions of the global
    batch (own K captions first, then one per other image in global order) and labels
    (B, K + N - 1): +1 for the K own captions, -1 otherwise.
    """
    batch, total = negative_caption.shape
    k = num_captions
    device = negative_caption.device
    rows = torch.arange(batch, device=device)
    own_image = first_image + rows  # (B,)
    own = own_image[:, None] * k + torch.arange(k, device=device)  # (B, K)
    images = torch.arange(total, device=device).expand(batch, total)  # (B, N)
    others = images[images != own_image[:, None]].reshape(batch, total - 1)  # (B, N - 1)
    other_caption = negative_caption.gather(1, others)
    caption_index = torch.cat([own, others * k + other_caption], dim=1)  # (B, K + N - 1)
    labels = torch.full(caption_index.shape, -1.0, device=device)
    labels[:, :k] = 1.0
    return caption_index, labels


def flair_pairs(
    negative_caption: Tensor, rank: int, world_size: int, num_captions: int
) -> tuple[Tensor, Tensor]:
    """Caption indices and labels of FLAIR's own pairing over W ranks of B images.

    negative_caption: (B, N) long in [0, K): for local row i and global image j, which of j's K
        captions row i's block holds (FLAIR's per-rank `random_offsets`; entries at the images
        j = r * B + i, whose K captions all come, are ignored).
    Returns caption_index (B, N + W (K - 1)) into the flattened (N * K) captions, in global image
    order (FLAIR's blocks, sorted as its `downsample_text_features` sorts them, rank by rank),
    and labels: +1 on the K captions of the row's own image, -1 elsewhere.
    """
    batch, total = negative_caption.shape
    k = num_captions
    if total != batch * world_size:
        raise ValueError(f"flair pairing: {total} global images are not {world_size} ranks x {batch}")
    device = negative_caption.device
    rows = torch.arange(batch, device=device)
    images = torch.arange(total, device=device)
    candidates = images[None, :, None] * k + torch.arange(k, device=device)  # (1, N, K)
    same_row = (images[None, :] % batch) == rows[:, None]  # (B, N): image r * B + i, all K come
    keep = same_row[..., None] | (torch.arange(k, device=device) == negative_caption[..., None])  # (B, N, K)
    width = total + world_size * (k - 1)
    caption_index = candidates.expand(batch, -1, -1)[keep].reshape(batch, width)
    own = (caption_index // k) == (rank * batch + rows)[:, None]
    return caption_index, torch.where(own, 1.0, -1.0)


def all_pairs(batch: int, total: int, first_image: int, num_captions: int, device=None) -> tuple[Tensor, Tensor]:
    """Every caption of the global batch for each local image: (B, N * K) indices and labels."""
    caption_index = torch.arange(total * num_captions, device=device).expand(batch, -1)
    owner = caption_index // num_captions  # (B, N * K)
    own = owner == (first_image + torch.arange(batch, device=device))[:, None]
    return caption_index, torch.where(own, 1.0, -1.0)


def sigmoid_pair_loss(logits: Tensor, labels: Tensor, normaliser: float) -> Tensor:
    """sum(-log sigmoid(label * logit)) / normaliser, in fp32."""
    return -F.logsigmoid(labels.to(logits.dtype) * at_least_fp32(logits)).sum() / normaliser


def pooled_logits(
    keys: Tensor, values: Tensor, out_weight: Tensor, out_bias: Tensor, scale: Tensor, bias: Tensor,
    queries: Tensor, texts_normed: Tensor,
) -> Tensor:
    """TCS logits scale * cos(v(i, t), t) + bias of B images against c texts each.

    keys, values: (B, H, P, d) of each image's tokens; out_weight (E, E), out_bias (E,): the
    pooling's output projection; queries: (B, c, E) projected queries of each row's texts;
    texts_normed: (B, c, E) the same texts L2-normalised. Returns (B, c), fp32 where the inputs are.
    """
    batch, columns, width = queries.shape
    heads = keys.shape[1]
    split = queries.reshape(batch, columns, heads, width // heads).transpose(1, 2)  # (B, H, c, d)
    pooled, _ = zero_slot_attention(split, keys, values, need_weights=False)  # (B, H, c, d)
    pooled = F.linear(pooled.transpose(1, 2).reshape(batch, columns, width), out_weight, out_bias)  # (B, c, E)
    cosine = (F.normalize(at_least_fp32(pooled), dim=-1) * at_least_fp32(texts_normed)).sum(-1)
    return scale * cosine + bias


def pooled_bytes_per_column(batch: int, heads: int, patches: int, width: int) -> int:
    """fp32 bytes one text column of `pooled_logits` keeps alive in its backward, about: the
    attention logits and weights (B, H, P + 1) twice over, and a few (B, E) vectors."""
    return 4 * batch * (4 * heads * (patches + 1) + 8 * width)


# ---------------------------------------------------------------------------------------------
# Modules


class TextConditionedPool(nn.Module):
    """Multi-head attention pooling: text queries (B, T, E) over image tokens (B, P, E).

    Layer norms on query, key and value inputs, separate q/k/v projections, an output
    projection, and the zero slot of `zero_slot_attention`.
    """

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ConfigError(f"model.heads.flair.num_heads={num_heads} must divide model.embed_dim={embed_dim}")
        self.num_heads = num_heads
        self.ln_q, self.ln_k, self.ln_v = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def _split(self, x: Tensor) -> Tensor:
        b, n, e = x.shape
        return x.reshape(b, n, self.num_heads, e // self.num_heads).transpose(1, 2)  # (B, H, n, d)

    def keys_values(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Projected keys and values (B, H, P, d) of image tokens (B, P, E); reusable across texts."""
        return self._split(self.k_proj(self.ln_k(tokens))), self._split(self.v_proj(self.ln_v(tokens)))

    def queries(self, texts: Tensor) -> Tensor:
        """Projected queries (B, H, T, d) of text embeddings (B, T, E)."""
        return self._split(self.q_proj(self.ln_q(texts)))

    def pool(
        self, queries: Tensor, keys: Tensor, values: Tensor, need_weights: bool = True
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Pooled image embeddings (B, T, E) and attention weights (B, H, T, P + 1), None
        without `need_weights` (then by SDPA, see `zero_slot_attention`)."""
        pooled, weights = zero_slot_attention(queries, keys, values, need_weights)
        b, h, t, d = pooled.shape
        return self.out_proj(pooled.transpose(1, 2).reshape(b, t, h * d)), weights

    def forward(self, texts: Tensor, tokens: Tensor, need_weights: bool = True) -> tuple[Tensor, Optional[Tensor]]:
        keys, values = self.keys_values(tokens)
        return self.pool(self.queries(texts), keys, values, need_weights)


@HEADS.register("flair")
class FlairHead(Head):
    config_class = FlairConfig
    needs = ("image_embed", "image_tokens", "sub_text_embed")
    gathered_keys = ("sub_text_embed",)
    # Zero-shot scores need the image tokens: evaluators pass `image_tokens=` when this is True.
    scores_with_tokens = True
    # Grounding by the text-conditioned attention over the patches.
    grounds = True
    example_config = {"num_heads": 2, "negatives": "all"}

    def __init__(self, config: FlairConfig, embed_dim: int) -> None:
        super().__init__(config, embed_dim)
        self.pool = TextConditionedPool(embed_dim, config.num_heads)
        self.logit_scale = nn.Parameter(torch.full([1], float(config.init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.full([1], float(config.init_logit_bias)))

    def no_weight_decay(self) -> set[str]:
        return {"logit_scale", "logit_bias"}

    def _scale(self) -> Tensor:
        """exp(logit_scale) at most max_logit_scale, [1] fp32, by the heads' bounded-parameter rule
        (`base.bounded`: an overshoot can come back, any ZeRO stage). `forward` calls it once."""
        return bounded(at_least_fp32(self.logit_scale), high=math.log(self.config.max_logit_scale)).exp()

    def _tokens(self, image_tokens: Tensor, image_embed: Optional[Tensor]) -> Tensor:
        """Keys/values of the pooling: patch tokens (B, P, E), plus the global token if configured."""
        if self.config.include_global_token and image_embed is not None:
            return torch.cat([image_embed[:, None], image_tokens], dim=1)  # (B, 1 + P, E)
        return image_tokens

    def pairing(self, inputs: HeadInputs, batch: int, total: int, k: int, device) -> tuple[Tensor, Tensor, float]:
        """(caption_index (B, T), labels (B, T), TCS normaliser) of the configured pairing.

        The negative draw is `inputs.extras["flair_negative_caption"]` (B, N) when given (tests
        reproduce FLAIR's own draws with it), else uniform per (row, image)."""
        first_image = inputs.rank * batch
        if self.config.negatives == "all":
            caption_index, labels = all_pairs(batch, total, first_image, k, device=device)
            return caption_index, labels, float(batch)
        negative_caption = inputs.extras.get("flair_negative_caption")
        if negative_caption is None:
            negative_caption = torch.randint(k, (batch, total), device=device)
        negative_caption = negative_caption.to(device)
        if self.config.negatives == "sampled":
            caption_index, labels = sampled_pairs(negative_caption, first_image, k)
            return caption_index, labels, float(batch)
        world_size = total // batch
        caption_index, labels = flair_pairs(negative_caption, inputs.rank, world_size, k)
        return caption_index, labels, float(batch + k - 1)

    def block_size(self, batch: int, columns: int, patches: int, device=None) -> int | None:
        """Text columns per TCS block, None for the dense path (`tiled_tokens.block_plan` on the
        device the scores live on)."""
        bytes_per_column = pooled_bytes_per_column(batch, self.pool.num_heads, patches, self.embed_dim)
        return block_plan(columns, bytes_per_column, self.config.block_size, device)

    def forward(self, inputs: HeadInputs) -> dict[str, Any]:
        local = inputs.local
        image_embed, image_tokens = local["image_embed"], local["image_tokens"]
        sub_text = contiguous_grad(inputs.gathered.get("sub_text_embed", local["sub_text_embed"]))  # (N, K, E)
        batch, k = image_tokens.shape[0], sub_text.shape[1]
        total = sub_text.shape[0]
        first_image = inputs.rank * batch
        texts = sub_text.reshape(total * k, -1)  # (N * K, E)
        caption_index, labels, normaliser = self.pairing(inputs, batch, total, k, texts.device)

        # Per-text work once for the N * K captions, not once per pair: the query projection and
        # the normalised text (both row-wise, so indexing them equals projecting indexed rows).
        tokens = self._tokens(image_tokens, image_embed)
        keys, values = self.pool.keys_values(tokens)  # (B, H, P', d)
        queries = self.pool.q_proj(self.pool.ln_q(texts))  # (N * K, E)
        texts_normed = F.normalize(at_least_fp32(texts), dim=-1)
        scale, bias = self._scale(), at_least_fp32(self.logit_bias)
        whole = (keys, values, self.pool.out_proj.weight, self.pool.out_proj.bias, scale, bias)
        block = self.block_size(batch, caption_index.shape[1], tokens.shape[1], keys.device)
        if block is None:  # dense: no recompute
            tcs_logits = pooled_logits(*whole, queries[caption_index], texts_normed[caption_index])
        else:
            tcs_logits = blockwise_columns(pooled_logits, whole, [(queries, caption_index), (texts_normed, caption_index)], block)
        tcs = sigmoid_pair_loss(tcs_logits, labels, normaliser)  # (B, T) logits
        logging: dict[str, Any] = {
            "tcs": tcs.detach(),
            "scale": scale.detach()[0],
            "bias": bias.detach()[0],
            "pos_logit": tcs_logits[labels > 0].mean().detach(),
            "neg_logit": tcs_logits[labels < 0].mean().detach(),
        }
        loss = tcs
        if self.config.multi_positive:
            image = F.normalize(at_least_fp32(image_embed), dim=-1)  # (B, E)
            _, mps_labels = all_pairs(batch, total, first_image, k, device=texts.device)
            mps_logits = scale * image @ texts_normed.T + bias  # (B, N * K)
            mps = sigmoid_pair_loss(mps_logits, mps_labels, batch * k)
            logging["mps"] = mps.detach()
            loss = (tcs + mps) / 2
        return {"loss": loss, "logging": logging}

    # -- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def attention_map(
        self, image_tokens: Tensor, text_embed: Tensor, *, image_embed: Optional[Tensor] = None
    ) -> Tensor:
        """Head-averaged attention of each text (T, E) over each image's patches (B, P) -> (B, T, P).

        Weights on the zero slot (and on the global token, when it is a key) are dropped, so a
        row sums to the text's weight on the patches (<= 1).
        """
        tokens = self._tokens(image_tokens, image_embed)
        keys, values = self.pool.keys_values(tokens)
        texts = text_embed[None].expand(image_tokens.shape[0], -1, -1).to(tokens.dtype)  # (B, T, E)
        _, weights = self.pool.pool(self.pool.queries(texts), keys, values)  # (B, H, T, P' + 1)
        weights = weights.mean(dim=1)[..., :-1]  # (B, T, P')
        return weights[..., tokens.shape[1] - image_tokens.shape[1]:]  # drop the global token

    @torch.no_grad()
    def paired_attention_map(
        self, image_tokens: Tensor, text_embed: Tensor, *, image_embed: Optional[Tensor] = None
    ) -> Tensor:
        """`attention_map` for Q (image, text) pairs: tokens (Q, P, E), texts (Q, E) -> (Q, P)."""
        tokens = self._tokens(image_tokens, image_embed)
        _, weights = self.pool(text_embed[:, None].to(tokens.dtype), tokens)  # (Q, H, 1, P' + 1)
        return weights.mean(dim=1)[:, 0, :-1][:, tokens.shape[1] - image_tokens.shape[1]:]

    def patch_map(self, image: dict[str, Tensor], text: dict[str, Tensor]) -> Tensor:
        """Grounding map: the head-averaged attention of each sentence on its image's patches (Q, P)."""
        return self.paired_attention_map(image["image_tokens"], text["text_embed"], image_embed=image["image_embed"]).float()

    def grounding_scores(self, images: dict[str, Tensor], texts: dict[str, Tensor], topk: Optional[int] = None) -> Tensor:
        """Text-conditioned cosine of every (image, sentence), optionally re-ranking each sentence's
        top-k images by global cosine (`pairwise_scores`) -> (N, M)."""
        return self.pairwise_scores(images["image_embed"], texts["text_embed"], image_tokens=images["image_tokens"], topk=topk)

    @torch.no_grad()
    def text_conditioned_scores(
        self, image_tokens: Tensor, text_embed: Tensor, *, image_embed: Optional[Tensor] = None
    ) -> Tensor:
        """cos(v(i, t), t) for every image (N, P, E) and text (M, E) -> (N, M).

        Streams over blocks of `score_chunk` images x as many texts as DEFAULT_BLOCK_BYTES
        allows, so memory is the (N, M) output plus one block, whatever N and M."""
        num_images, num_texts = image_tokens.shape[0], text_embed.shape[0]
        scores = torch.empty(num_images, num_texts, device=image_tokens.device,
                             dtype=torch.promote_types(image_tokens.dtype, torch.float32))
        if num_texts == 0 or num_images == 0:
            return scores
        texts = text_embed.to(image_tokens.dtype)
        queries = self.pool.q_proj(self.pool.ln_q(texts))  # (M, E), once for all images
        texts_normed = F.normalize(at_least_fp32(texts), dim=-1)
        out = self.pool.out_proj
        scale, bias = scores.new_ones(1), scores.new_zeros(1)  # plain cosine
        chunk = min(self.config.score_chunk, num_images)
        patches = image_tokens.shape[1] + int(self.config.include_global_token and image_embed is not None)
        text_block = auto_block_size(num_texts, pooled_bytes_per_column(chunk, self.pool.num_heads, patches, self.embed_dim))
        for start in range(0, num_images, chunk):
            stop = min(start + chunk, num_images)
            embed = image_embed[start:stop] if image_embed is not None else None
            keys, values = self.pool.keys_values(self._tokens(image_tokens[start:stop], embed))  # (n, H, P', d)
            for t0 in range(0, num_texts, text_block):
                t1 = min(t0 + text_block, num_texts)
                shape = (stop - start, t1 - t0, queries.shape[1])
                scores[start:stop, t0:t1] = pooled_logits(
                    keys, values, out.weight, out.bias, scale, bias,
                    queries[t0:t1].expand(shape), texts_normed[t0:t1].expand(shape)).to(scores.dtype)
        return scores

    @torch.no_grad()
    def pairwise_scores(
        self,
        image_embed: Tensor,
        text_embed: Tensor,
        *,
        image_tokens: Optional[Tensor] = None,
        topk: Optional[int] = None,
    ) -> Tensor:
        """(N, M) scores of images (N, E) [+ tokens (N, P, E)] vs texts (M, E); higher is closer.

        Without `image_tokens`: global cosine. With them: text-conditioned cosine
        cos(v(i, t), t) for every pair. With `topk`: each text's top-k images by global cosine
        are re-scored with the text-conditioned cosine and the rest keep their global cosine
        shifted by -4, so they always rank below the re-ranked ones (both cosines lie in [-1, 1]).
        """
        global_scores = super().pairwise_scores(image_embed, text_embed)
        if image_tokens is None:
            return global_scores
        if topk is None or topk >= image_embed.shape[0]:
            return self.text_conditioned_scores(image_tokens, text_embed, image_embed=image_embed)
        scores = global_scores - 4.0
        top = global_scores.topk(topk, dim=0).indices  # (k, M): each text's candidate images
        image_index = top.T.reshape(-1)  # (M * k,)
        text_index = torch.arange(text_embed.shape[0], device=top.device).repeat_interleave(topk)
        rescored = self.pair_scores(image_tokens, text_embed, image_index, text_index, image_embed=image_embed)
        scores[image_index, text_index] = rescored.to(scores.dtype)
        return scores

    @torch.no_grad()
    def pair_scores(
        self,
        image_tokens: Tensor,
        text_embed: Tensor,
        image_index: Tensor,
        text_index: Tensor,
        *,
        image_embed: Optional[Tensor] = None,
    ) -> Tensor:
        """cos(v(i, t), t) for listed pairs: images (N, P, E), texts (M, E), indices (Q,) -> (Q,).

        Pairs go in chunks whose copied tokens and attention fit DEFAULT_BLOCK_BYTES."""
        patches, width = image_tokens.shape[1] + 1, image_tokens.shape[2]
        per_pair = 4 * (3 * patches * width + 4 * self.pool.num_heads * patches)
        chunk = max(1, DEFAULT_BLOCK_BYTES // per_pair)
        out = [image_tokens.new_zeros(0, dtype=torch.promote_types(image_tokens.dtype, torch.float32))]
        for start in range(0, image_index.shape[0], chunk):
            images, texts = image_index[start : start + chunk], text_index[start : start + chunk]
            embed = image_embed[images] if image_embed is not None else None
            tokens = self._tokens(image_tokens[images], embed)  # (q, P, E)
            query = text_embed[texts][:, None].to(tokens.dtype)  # (q, 1, E)
            pooled, _ = self.pool(query, tokens, need_weights=False)
            cosine = F.normalize(at_least_fp32(pooled[:, 0]), dim=-1) * F.normalize(at_least_fp32(query[:, 0]), dim=-1)
            out.append(cosine.sum(-1))
        return torch.cat(out)
