"""FILIP: token-wise late interaction, contrastive over the gathered batch.

After Yao et al. 2021, "FILIP: Fine-grained Interactive Language-Image Pre-Training". With
L2-normalised patch tokens x_p (P of them) and valid text tokens y_l (n_t of them):

    image -> text  s(i, t)  = (1 / P)   * sum_p max_l <x_p, y_l>
    text -> image  s'(i, t) = (1 / n_t) * sum_l max_p <x_p, y_l>

Padding never enters: a padded token is neither a candidate of the max nor a term of the mean
(`text_mask`). The loss is CLIP's symmetric InfoNCE with `s` for the image->text direction and
`s'` for text->image, over this rank's images/texts against every rank's texts/images (open_clip's
`local_loss` with `gather_with_grad`), averaged over the two directions.

Distributed scheme: the patch tokens stay on their rank. Only the text tokens and masks are
gathered (`gathered_keys`; N x L x E, with L = 32 about a sixth of the N x P x E patch tokens at
P = 196), and each rank scores its own B images against the N global texts, both scores from the
one (B, c, P, L) similarity block. Image -> text is a softmax over the texts in a local row.
Text -> image is a softmax over the images of every rank: each rank contributes the per-text
log-sum-exp of its (B, N) block (`global_logsumexp`, tiled_tokens.py: an all-gather of (2, N) in
forward, an all-reduce of (2, N) in backward), so no rank needs another rank's patch tokens,
forward or backward. The loss of each rank and the gradients are those of the former scheme
(open_clip's `local_loss` over gathered image and text tokens), see tests/test_tiled_tokens.py.

Memory: the (B, N) scores are computed in blocks of global text columns with recompute in
backward (`blockwise_columns`), so one rank holds one (B, c, P, L) block of similarities at a
time (`block_size`; unset: dense while the whole intermediate fits in 1 GiB, else blocks of about
256 MiB); the text blocks are normalised inside the block, so the N x L x E tokens are not
copied, only their gradient is kept. `max_image_tokens` / `max_text_tokens` score a random subset of patches /
valid text tokens per sample during training (FILIP keeps all tokens but reduces the
embedding width; a token subset is the cheaper lever here).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from vlp.core.collectives import at_least_fp32, contiguous_grad, gather_no_grad, gather_with_grad, is_distributed
from vlp.models.heads.base import HEADS, Head, HeadConfig, HeadInputs, bounded
from vlp.models.heads.tiled_tokens import DEFAULT_BLOCK_BYTES, block_plan, blockwise_columns, global_logsumexp


class FilipConfig(HeadConfig):
    init_logit_scale: float = Field(math.log(1 / 0.07), description="log of the initial inverse temperature")
    max_logit_scale: float = Field(100.0, gt=0, description="upper bound of exp(logit_scale), by `base.bounded`")
    # Random token subsets per sample during training (None: all tokens).
    max_image_tokens: Optional[int] = Field(None, ge=1)
    max_text_tokens: Optional[int] = Field(None, ge=1)
    # Images scored per chunk in `token_scores` (bounds the (chunk, N, P, L) similarity block).
    chunk: int = Field(16, ge=1)
    block_size: Optional[int] = Field(
        None, ge=1,
        description="global columns per loss block (an int always tiles); None: dense up to 1 GiB, else ~256 MiB blocks")


def token_similarity(
    image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor, *, chunk: int = 16
) -> tuple[Tensor, Tensor]:
    """FILIP's two late-interaction scores for every image-text pair.

    image_tokens: (N1, P, E) and text_tokens: (N2, L, E), both L2-normalised; text_mask:
    (N2, L) bool, True on real tokens (each text needs at least one).
    Returns (image_to_text (N1, N2), text_to_image (N1, N2)).
    """
    mask = text_mask.bool()
    counts = mask.sum(dim=1).clamp(min=1).to(image_tokens.dtype)  # (N2,)
    lowest = torch.finfo(image_tokens.dtype).min
    i2t, t2i = [], []
    for start in range(0, image_tokens.shape[0], chunk):
        sim = torch.einsum("ipe,tle->itpl", image_tokens[start : start + chunk], text_tokens)  # (n, N2, P, L)
        best_text = sim.masked_fill(~mask[None, :, None, :], lowest).amax(dim=3)  # (n, N2, P)
        i2t.append(best_text.mean(dim=2))
        best_patch = sim.amax(dim=2).masked_fill(~mask[None], 0.0)  # (n, N2, L)
        t2i.append(best_patch.sum(dim=2) / counts[None])
    return torch.cat(i2t), torch.cat(t2i)


def text_to_image_scores(text_tokens: Tensor, text_mask: Tensor, image_tokens: Tensor) -> Tensor:
    """s'(i, t) = mean_l max_p <x_p, y_l>, transposed: texts (n2, L, E), mask (n2, L), images
    (n1, P, E) -> (n2, n1)."""
    mask = text_mask.bool()
    counts = mask.sum(dim=1).clamp(min=1).to(image_tokens.dtype)  # (n2,)
    sim = torch.einsum("tle,ipe->tilp", text_tokens, image_tokens)  # (n2, n1, L, P)
    best_patch = sim.amax(dim=3).masked_fill(~mask[:, None, :], 0.0)  # (n2, n1, L)
    return best_patch.sum(dim=2) / counts[:, None]


def late_interaction_scores(image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
    """Both late-interaction scores from one similarity block: images (n1, P, E) normalised,
    texts (n2, L, E) raw (normalised here, so a block of gathered tokens is never copied
    whole), mask (n2, L) -> (2, n1, n2): [s(i, t), s'(i, t)]."""
    mask = text_mask.bool()
    texts = F.normalize(text_tokens, dim=-1)
    counts = mask.sum(dim=1).clamp(min=1).to(image_tokens.dtype)  # (n2,)
    sim = torch.einsum("ipe,tle->itpl", image_tokens, texts)  # (n1, n2, P, L)
    best_text = sim.masked_fill(~mask[None, :, None, :], torch.finfo(sim.dtype).min).amax(dim=3)  # (n1, n2, P)
    best_patch = sim.amax(dim=2).masked_fill(~mask[None], 0.0)  # (n1, n2, L)
    return torch.stack([best_text.mean(dim=2), best_patch.sum(dim=2) / counts[None]])


def late_interaction_bytes_per_column(rows: int, patches: int, length: int) -> int:
    """fp32 bytes one text column of `late_interaction_scores` keeps alive in its backward,
    about: the (rows, P, L) similarities, the masked copy and the two maxes' gradients."""
    return 4 * 5 * rows * patches * length


def random_token_index(shape: tuple[int, int], count: int, mask: Optional[Tensor] = None,
                       device: Optional[torch.device] = None) -> Tensor:
    """`count` random token positions per sample of a (B, T) layout -> (B, count) long (valid
    ones first when `mask` (B, T) is given)."""
    order = torch.rand(shape, device=device)
    if mask is not None:
        order = order + (~mask.bool()).to(order.dtype) * 2.0  # padding sorts after every real token
    return order.argsort(dim=1)[:, :count]


def take_tokens(tokens: Tensor, keep: Tensor) -> Tensor:
    """tokens (B, T, ...) at positions keep (B, count) -> (B, count, ...)."""
    return tokens.gather(1, keep.reshape(*keep.shape, *[1] * (tokens.dim() - 2)).expand(-1, -1, *tokens.shape[2:]))


def random_token_subset(tokens: Tensor, count: int, mask: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Keep `count` random tokens per sample of (B, T, E) (valid ones first when `mask` (B, T) is given)."""
    if count >= tokens.shape[1]:
        return tokens, mask
    keep = random_token_index(tokens.shape[:2], count, mask, tokens.device)  # (B, count)
    return take_tokens(tokens, keep), (take_tokens(mask, keep) if mask is not None else None)


def filip_loss(
    image_tokens: Tensor,
    all_text_tokens: Tensor,
    all_text_mask: Tensor,
    first: int,
    scale: Tensor,
    block_size: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE of this rank's B pairs against the global N, scored from local images.

    image_tokens: (B, P, E) this rank's, L2-normalised, fp32; all_text_tokens (N, L, E) and
    all_text_mask (N, L): every rank's texts in rank order (gathered with gradient; the tokens
    need not be normalised). Local pair b is global index `first + b`; scale: [1].
    Image -> text: local rows, a softmax over the N texts. Text -> image for this rank's B texts:
    a softmax over the images of every rank, through `global_logsumexp`; every rank must call
    this together. The (2, B, N) scores are built in blocks of `block_size` text columns with
    recompute in backward (None: `tiled_tokens.block_plan` picks dense or the block size).
    Returns (loss, i2t accuracy).
    """
    batch, patches = image_tokens.shape[:2]
    total, length = all_text_tokens.shape[:2]
    local = torch.arange(batch, device=image_tokens.device)
    labels = first + local
    block_size = block_plan(total, late_interaction_bytes_per_column(batch, patches, length), block_size,
                            device=image_tokens.device)
    if block_size is None:
        scores = late_interaction_scores(image_tokens, all_text_tokens, all_text_mask)  # (2, B, N)
    else:
        columns = torch.arange(total, device=image_tokens.device)
        scores = blockwise_columns(late_interaction_scores, (image_tokens,),
                                   [(all_text_tokens, columns), (all_text_mask, columns)], block_size)
    i2t, t2i = scores[0], scores[1]  # (B images, N texts): s(i, t), s'(i, t)
    loss_i2t = F.cross_entropy(scale * i2t, labels)
    lse, _ = global_logsumexp(t2i, scale)  # (N,) over the images of every rank
    positive = scale * t2i[local, labels]  # (B,) each local text with its own image
    # `0 * lse.sum()`: every rank back-propagates through the collective, whatever its texts.
    loss_t2i = (lse[labels] - positive).mean() + 0.0 * lse.sum()
    accuracy = (i2t.detach().argmax(dim=1) == labels).float().mean()
    return (loss_i2t + loss_t2i) / 2, accuracy


def bounded_text_to_image(image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor,
                          budget: int = DEFAULT_BLOCK_BYTES) -> Tensor:
    """s'(i, t) of every image (N, P, E) and text (M, L, E), normalised, -> (N, M), streaming
    over (images x texts) blocks of about `budget` bytes of similarities."""
    num_images, patches = image_tokens.shape[:2]
    num_texts, length = text_tokens.shape[:2]
    out = torch.empty(num_images, num_texts, device=image_tokens.device, dtype=image_tokens.dtype)
    per_pair = 3 * 4 * patches * length
    text_block = max(1, min(num_texts, budget // per_pair))
    image_block = max(1, budget // (per_pair * text_block))
    for t0 in range(0, num_texts, text_block):
        texts, mask = text_tokens[t0 : t0 + text_block], text_mask[t0 : t0 + text_block]
        for i0 in range(0, num_images, image_block):
            out[i0 : i0 + image_block, t0 : t0 + text_block] = text_to_image_scores(
                texts, mask, image_tokens[i0 : i0 + image_block]).T
    return out


@HEADS.register("filip")
class FilipHead(Head):
    config_class = FilipConfig
    needs = ("image_tokens", "text_tokens", "text_mask")
    # Texts only: the patch tokens stay on their rank (see the module docstring).
    gathered_keys = ("text_tokens", "text_mask")
    # Late interaction needs text tokens, which zero-shot class embeddings (prompt averages) do
    # not have: zero-shot and retrieval score FILIP by global cosine; grounding uses the tokens.
    grounds = True

    def __init__(self, config: FilipConfig, embed_dim: int) -> None:
        super().__init__(config, embed_dim)
        self.logit_scale = nn.Parameter(torch.full([1], float(config.init_logit_scale)))

    def no_weight_decay(self) -> set[str]:
        return {"logit_scale"}

    def scale(self) -> Tensor:
        """exp(logit_scale) at most max_logit_scale, [1] fp32, by the heads' bounded-parameter rule
        (`base.bounded`: an overshoot can come back, any ZeRO stage). `forward` calls it once."""
        return bounded(at_least_fp32(self.logit_scale), high=math.log(self.config.max_logit_scale)).exp()

    def _subset_texts(self, all_texts: Tensor, all_mask: Tensor, first: int, batch: int) -> tuple[Tensor, Tensor]:
        """The gathered texts (N, L, E), (N, L), each cut to `max_text_tokens` random valid tokens
        in training. Every rank must score a text through the same tokens (their log-sum-exps
        are combined), so each rank draws for its own texts and the draws are gathered."""
        count = self.config.max_text_tokens
        if not (self.training and count and count < all_texts.shape[1]):
            return all_texts, all_mask
        if is_distributed():
            keep = gather_no_grad(random_token_index((batch, all_mask.shape[1]), count, all_mask[first : first + batch],
                                                     all_mask.device))  # (N, count)
        else:
            keep = random_token_index(tuple(all_mask.shape), count, all_mask, all_mask.device)
        return take_tokens(all_texts, keep), take_tokens(all_mask, keep)

    def forward(self, inputs: HeadInputs) -> dict[str, Any]:
        local, gathered = inputs.local, inputs.gathered
        image_tokens = local["image_tokens"]  # (B, P, E): this rank's, never gathered
        batch = image_tokens.shape[0]
        first = inputs.rank * batch
        if self.training and self.config.max_image_tokens:
            image_tokens, _ = random_token_subset(image_tokens, self.config.max_image_tokens)
        images = F.normalize(at_least_fp32(image_tokens), dim=-1)
        # (N, L, E) and (N, L) in rank order; gathered here when the caller did not.
        all_texts = gathered["text_tokens"] if "text_tokens" in gathered else gather_with_grad(local["text_tokens"])
        all_mask = gathered["text_mask"] if "text_mask" in gathered else gather_no_grad(local["text_mask"].to(torch.uint8))
        all_texts, all_mask = self._subset_texts(at_least_fp32(contiguous_grad(all_texts)), all_mask.bool(), first, batch)
        scale = self.scale()
        loss, accuracy = filip_loss(images, all_texts, all_mask, first, scale, block_size=self.config.block_size)
        return {"loss": loss, "logging": {"scale": scale.detach()[0], "i2t_acc": accuracy.detach()}}

    # -- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def similarity_map(self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
        """Per patch, the best cosine over the paired text's valid tokens: (B, P, E), (B, L, E), (B, L) -> (B, P)."""
        sim = torch.einsum("bpe,ble->bpl", F.normalize(at_least_fp32(image_tokens), dim=-1),
                           F.normalize(at_least_fp32(text_tokens), dim=-1))
        return sim.masked_fill(~text_mask.bool()[:, None, :], float("-inf")).amax(dim=2)

    def patch_map(self, image: dict[str, Tensor], text: dict[str, Tensor]) -> Tensor:
        """Grounding map: per patch, the best cosine over the sentence's valid tokens (Q, P)."""
        return self.similarity_map(image["image_tokens"], text["text_tokens"], text["text_mask"]).float()

    @torch.no_grad()
    def grounding_scores(self, images: dict[str, Tensor], texts: dict[str, Tensor], topk: Optional[int] = None) -> Tensor:
        """Text -> image late-interaction score s'(i, t) of every (image, sentence) -> (N, M);
        `topk` is not used (every pair is scored exactly)."""
        return bounded_text_to_image(F.normalize(images["image_tokens"].float(), dim=-1),
                                     F.normalize(texts["text_tokens"].float(), dim=-1), texts["text_mask"])

    @torch.no_grad()
    def token_scores(self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
        """Text -> image late-interaction score s'(i, t) for all images (N, P, E) x texts (M, L, E) -> (N, M)."""
        return bounded_text_to_image(F.normalize(at_least_fp32(image_tokens), dim=-1),
                                     F.normalize(at_least_fp32(text_tokens), dim=-1), text_mask)
