"""Tiled (column-blocked, recompute in backward) flair / filip / ct_align equal their dense path,
FLAIR's pairing equals a reference written after FLAIR's own loss code, and filip / ct_align,
which keep the patch tokens on their rank, equal the former all-gathered formula on 1-3 ranks.

Dense here is the same head with `block_size` unset, which at these sizes is the unblocked
autograd computation (`block_plan` returns None; asserted below); fp32 throughout, tolerance 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_ranks
from torch.testing import assert_close

from vlp.models.heads import HeadInputs, tiled_tokens
from vlp.models.heads.ct_align import CtAlignConfig, CtAlignHead
from vlp.models.heads.filip import FilipConfig, FilipHead
from vlp.models.heads.flair import FlairConfig, FlairHead, flair_pairs
from vlp.models.heads.tiled_tokens import DENSE_BUDGET_BYTES, auto_block_size, block_plan, blockwise_columns

E = 16
TOL = dict(atol=1e-5, rtol=1e-5)
DENSE = None  # auto: dense at these sizes


def test_blockwise_columns_equals_dense_with_repeated_indices():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 4, generator=g, requires_grad=True)
    source = torch.randn(5, 4, generator=g, requires_grad=True)
    index = torch.tensor([[0, 1, 1, 4, 2, 0, 3], [4, 4, 0, 1, 2, 3, 3], [2, 2, 2, 0, 1, 1, 0]])  # (3, 7)

    def column_fn(rows, texts):  # rows (3, E), texts (3, c, E) -> (3, c)
        return torch.tanh((rows[:, None] * texts).sum(-1)) ** 2

    weights = torch.randn(3, 7, generator=g)
    dense = column_fn(rows, source[index])
    grads = torch.autograd.grad((dense * weights).sum(), [rows, source])
    for block in (1, 2, 3, 7):
        tiled = blockwise_columns(column_fn, (rows,), [(source, index)], block)
        assert_close(tiled, dense)
        assert_close(torch.autograd.grad((tiled * weights).sum(), [rows, source]), grads)
    assert auto_block_size(100, 10, budget=250) == 25 and auto_block_size(10, 10, budget=10**6) == 10


def _head_and_inputs(name: str, block: int | None, batch: int = 4, world: int = 1, rank: int = 0, seed: int = 0):
    """A head with `block_size` and one rank's inputs (local slices of a seeded global batch)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(seed)
    total = batch * world
    if name == "flair":
        head = FlairHead(FlairConfig(num_heads=2, block_size=block), E)
        with torch.no_grad():
            head.logit_scale.fill_(math.log(5.0))
            head.logit_bias.fill_(-1.0)
        full = {"image_embed": torch.randn(total, E, generator=g), "image_tokens": torch.randn(total, 5, E, generator=g),
                "sub_text_embed": torch.randn(total, 3, E, generator=g)}
    elif name == "filip":
        head = FilipHead(FilipConfig(block_size=block), E)
        lengths = torch.randint(1, 7, (total,), generator=g)
        full = {"image_tokens": torch.randn(total, 5, E, generator=g), "text_tokens": torch.randn(total, 6, E, generator=g),
                "text_mask": torch.arange(6)[None] < lengths[:, None]}
    else:
        head = CtAlignHead(CtAlignConfig(block_size=block, exclude_normal=False, topk=2), E)
        full = {"image_tokens": torch.randn(total, 6, E, generator=g), "sentence_embed": torch.randn(total, 2, E, generator=g)}
    gathered_keys = head.gathered_keys
    batch_data = {"sentence_mask": torch.ones(batch, 2, dtype=torch.bool)} if name == "ct_align" else {}
    negative = torch.randint(3, (total, total), generator=g)[rank * batch : (rank + 1) * batch]
    return head, full, gathered_keys, batch_data, negative


def _loss_and_grads(name, block, batch=4, world=1, rank=0):
    head, full, gathered_keys, batch_data, negative = _head_and_inputs(name, block, batch, world, rank)
    from vlp.core.collectives import gather_with_grad

    local = {k: v[rank * batch : (rank + 1) * batch].clone() for k, v in full.items()}
    for value in local.values():
        if value.is_floating_point():
            value.requires_grad_()
    gathered = {k: gather_with_grad(local[k]) if local[k].is_floating_point() else torch.cat([full[k]]) for k in gathered_keys}
    inputs = HeadInputs(local=local, gathered=gathered, batch=batch_data, rank=rank, world_size=world,
                        extras={"flair_negative_caption": negative})
    loss = head(inputs)["loss"]
    loss.backward()
    return {"loss": loss.detach(),
            **{f"input.{k}": v.grad for k, v in local.items() if v.is_floating_point()},
            **{f"param.{n}": p.grad for n, p in head.named_parameters() if p.grad is not None}}


@pytest.mark.parametrize("name", ["flair", "filip", "ct_align"])
@pytest.mark.parametrize("block", [1, 3])
def test_tiled_equals_dense_on_one_rank(name, block):
    dense, tiled = _loss_and_grads(name, DENSE), _loss_and_grads(name, block)
    assert dense.keys() == tiled.keys() and len(dense) > 2
    for key in dense:
        assert_close(tiled[key], dense[key], **TOL, msg=f"{name} {key}")


def test_block_plan_is_dense_while_the_dense_intermediate_fits_the_budget():
    assert block_plan(1000, DENSE_BUDGET_BYTES // 1000) is None  # the whole dense computation fits
    # Beyond the budget: blocks of DEFAULT_BLOCK_BYTES, so at least 4 of them.
    block = block_plan(1000, DENSE_BUDGET_BYTES // 1000 + 1)
    assert block == tiled_tokens.DEFAULT_BLOCK_BYTES // (DENSE_BUDGET_BYTES // 1000 + 1) and 1000 / block >= 4
    assert block_plan(10, tiled_tokens.DEFAULT_BLOCK_BYTES + 1) == 1  # a column larger than a block
    # An explicit block size always tiles, even one larger than the columns.
    assert block_plan(10, 1, block_size=3) == 3 and block_plan(10, 1, block_size=50) == 50


def _fake_cuda_memory(monkeypatch, free: int, reserved: int = 0, allocated: int = 0) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)


def test_cuda_budget_follows_the_free_memory(monkeypatch):
    _fake_cuda_memory(monkeypatch, free=40 * 2**30, reserved=6 * 2**30, allocated=2 * 2**30)
    budget = tiled_tokens.dense_budget_bytes("cuda:0")
    assert budget == int(tiled_tokens.DENSE_FREE_FRACTION * 44 * 2**30)  # free + the cache's unused 4 GiB
    # 8 GiB of dense intermediate: tiled under the CPU budget, dense on this GPU.
    assert block_plan(1024, 8 * 2**20) is not None and block_plan(1024, 8 * 2**20, device="cpu") is not None
    assert block_plan(1024, 8 * 2**20, device=torch.device("cuda", 0)) is None
    # A GPU nearly full (256 MiB free): tiles what the CPU budget would have run dense.
    _fake_cuda_memory(monkeypatch, free=256 * 2**20)
    assert block_plan(1000, DENSE_BUDGET_BYTES // 1000) is None  # CPU: as before
    block = block_plan(1000, DENSE_BUDGET_BYTES // 1000, device="cuda")
    assert block == tiled_tokens.DEFAULT_BLOCK_BYTES // (DENSE_BUDGET_BYTES // 1000)
    assert block_plan(1000, DENSE_BUDGET_BYTES // 1000, block_size=7, device="cuda") == 7  # the config wins


def test_flair_asks_for_the_budget_of_its_scores_device(monkeypatch):
    """The head passes its tensors' device; on CPU the fixed budget answers whatever CUDA reports."""
    devices = []
    budget = tiled_tokens.dense_budget_bytes
    monkeypatch.setattr(tiled_tokens, "dense_budget_bytes", lambda device=None: devices.append(device) or budget(device))
    _fake_cuda_memory(monkeypatch, free=0)  # would tile everything if CPU asked CUDA
    calls = _spy_blockwise(monkeypatch)
    _loss_and_grads("flair", None)
    assert devices and all(torch.device(device).type == "cpu" for device in devices) and calls == []


def _spy_blockwise(monkeypatch) -> list[int]:
    """Record the block size of every `blockwise_columns` call the heads make."""
    import vlp.models.heads.ct_align as ct_align
    import vlp.models.heads.filip as filip
    import vlp.models.heads.flair as flair

    calls: list[int] = []

    def spy(column_fn, whole, columns, block_size):
        calls.append(block_size)
        return blockwise_columns(column_fn, whole, columns, block_size)

    for module in (flair, filip, ct_align):
        monkeypatch.setattr(module, "blockwise_columns", spy)
    return calls


@pytest.mark.parametrize("name", ["flair", "filip", "ct_align"])
def test_auto_block_size_is_dense_for_small_inputs_and_tiles_beyond_the_budget(name, monkeypatch):
    calls = _spy_blockwise(monkeypatch)
    dense = _loss_and_grads(name, None)
    assert calls == [], f"{name}: small inputs with block_size unset were tiled"
    _loss_and_grads(name, 50)  # an explicit block size tiles even when one block holds every column
    assert calls == [50]
    calls.clear()
    monkeypatch.setattr(tiled_tokens, "DENSE_BUDGET_BYTES", 0)  # now any dense intermediate is too large
    tiled = _loss_and_grads(name, None)
    assert calls and all(block >= 1 for block in calls)
    for key in dense:
        assert_close(tiled[key], dense[key], **TOL, msg=f"{name} {key}")


def _rank_tiled_and_dense(rank, world, name):
    return {"dense": _loss_and_grads(name, DENSE, batch=3, world=world, rank=rank),
            "tiled": _loss_and_grads(name, 2, batch=3, world=world, rank=rank)}


@pytest.mark.slow
def test_tiled_equals_dense_on_two_gloo_ranks():
    for name in ("flair", "filip", "ct_align"):
        for rank, result in enumerate(run_ranks(_rank_tiled_and_dense, 2, name, timeout=180)):
            for key, dense in result["dense"].items():
                assert_close(result["tiled"][key], dense, **TOL, msg=f"{name} rank {rank} {key}")


# --------------------------------------------------------------------------------------------
# FLAIR's pairing, after the structure of FLAIR's loss code (src/flair/loss.py): each rank
# samples a (B, B + K - 1) caption block per row (`downsample_text_features`), scores it against
# its images with `/ (B + K - 1)`, then receives every other rank's block round the ring and
# scores it as negatives only, with the same normaliser.


def _downsample(texts, offsets):
    """texts (B, K, E), offsets (B, B - 1) -> (B, B + K - 1, E): row i's own K captions and one
    caption (offset) of every other image, in image order."""
    batch, k, _ = texts.shape
    rows = []
    for i in range(batch):
        picked = []
        others = iter(offsets[i].tolist())
        for j in range(batch):
            picked.extend(texts[j].unbind(0) if j == i else [texts[j, next(others)]])
        rows.append(torch.stack(picked))
    return torch.stack(rows)


def _reference_tcs(head, image_tokens, block, negative_only):
    """FLAIR's `_loss_with_attn_pool` TCS term for one text block (B, B + K - 1, E)."""
    batch, width = block.shape[:2]
    k = width - batch + 1
    pooled, _ = head.pool(block, image_tokens)  # (B, B + K - 1, E)
    logits = head._scale() * F.cosine_similarity(pooled, block, dim=-1) + head.logit_bias
    labels = -torch.ones(batch, width)
    if not negative_only:
        for i in range(batch):
            labels[i, i : i + k] = 1.0
    return -F.logsigmoid(labels * logits).sum() / width


def _reference_rank_loss(head, image_tokens, blocks, rank):
    """Rank `rank`'s TCS loss: its own block, then every other rank's block as negatives."""
    return sum(_reference_tcs(head, image_tokens, block, negative_only=r != rank) for r, block in enumerate(blocks))


def _offsets_to_choice(offsets_per_rank, batch):
    """Per-rank FLAIR offsets [(B, B - 1)] -> the head's (B, N) negative_caption of any rank."""
    choice = torch.zeros(batch, batch * len(offsets_per_rank), dtype=torch.long)
    for r, offsets in enumerate(offsets_per_rank):
        for i in range(batch):
            others = [j for j in range(batch) if j != i]
            choice[i, [r * batch + j for j in others]] = offsets[i]
    return choice


def _flair_fixture(world, batch=3, k=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    total = world * batch
    full = {"image_embed": torch.randn(total, E, generator=g), "image_tokens": torch.randn(total, 4, E, generator=g),
            "sub_text_embed": torch.randn(total, k, E, generator=g)}
    offsets = [torch.randint(k, (batch, batch - 1), generator=g) for _ in range(world)]
    return full, offsets


def _flair_head(block=None):
    torch.manual_seed(0)
    head = FlairHead(FlairConfig(num_heads=2, multi_positive=False, block_size=block), E)
    with torch.no_grad():
        head.logit_scale.fill_(math.log(5.0))
        head.logit_bias.fill_(-1.0)
    return head


def _reference_all_ranks(world, batch=3):
    full, offsets = _flair_fixture(world, batch)
    full = {key: value.clone().requires_grad_() for key, value in full.items()}
    head = _flair_head()
    texts = full["sub_text_embed"]
    blocks = [_downsample(texts[r * batch : (r + 1) * batch], offsets[r]) for r in range(world)]
    losses = [_reference_rank_loss(head, full["image_tokens"][r * batch : (r + 1) * batch], blocks, r) for r in range(world)]
    torch.stack(losses).sum().backward()
    return losses, {key: value.grad for key, value in full.items()}, offsets


def test_flair_pairs_hold_each_ranks_block():
    # Two ranks of 2 images, K = 3: row 0 of rank 1 meets rank 0's image 0 (all K captions),
    # one caption of rank 0's image 1, its own K, and one of rank 1's image 1.
    choice = torch.tensor([[0, 2, 0, 1], [1, 0, 2, 0]])
    index, labels = flair_pairs(choice, rank=1, world_size=2, num_captions=3)
    assert index.shape == (2, 4 + 2 * 2)
    assert index[0].tolist() == [0, 1, 2, 3 * 1 + 2, 6, 7, 8, 3 * 3 + 1]
    assert labels[0].tolist() == [-1, -1, -1, -1, 1, 1, 1, -1]
    assert labels.sum(1).tolist() == [3 - 5, 3 - 5]


@pytest.mark.parametrize("block", [None, 2])
def test_flair_default_equals_flair_reference_on_one_rank(block):
    losses, grads, offsets = _reference_all_ranks(world=1)
    full, _ = _flair_fixture(1)
    local = {key: value.clone().requires_grad_() for key, value in full.items()}
    head = _flair_head(block)
    assert head.config.negatives == "flair"
    out = head(HeadInputs(local=local, gathered={}, batch={}, extras={"flair_negative_caption": _offsets_to_choice(offsets, 3)}))
    out["loss"].backward()
    assert_close(out["loss"], losses[0], **TOL)
    for key in ("image_tokens", "sub_text_embed"):
        assert_close(local[key].grad, grads[key], **TOL, msg=key)


def _rank_flair(rank, world, block):
    from vlp.core.collectives import gather_with_grad

    batch = 3
    full, offsets = _flair_fixture(world, batch)
    local = {key: value[rank * batch : (rank + 1) * batch].clone().requires_grad_() for key, value in full.items()}
    head = _flair_head(block)
    inputs = HeadInputs(local=local, gathered={"sub_text_embed": gather_with_grad(local["sub_text_embed"])}, batch={},
                        rank=rank, world_size=world, extras={"flair_negative_caption": _offsets_to_choice(offsets, batch)})
    loss = head(inputs)["loss"]
    loss.backward()
    return {"loss": loss.detach(), "grads": {key: value.grad for key, value in local.items()}}


@pytest.mark.slow
@pytest.mark.parametrize("block", [None, 2])
def test_flair_default_equals_flair_reference_on_two_gloo_ranks(block):
    """The ring pass of FLAIR's code (every rank's sampled block reaches every rank) equals the
    head reading the same blocks off the gathered captions: each rank's loss, and the gradients
    of the summed losses on each rank's inputs."""
    world, batch = 2, 3
    results = run_ranks(_rank_flair, world, block, timeout=180)
    losses, grads, _ = _reference_all_ranks(world, batch)
    for rank, result in enumerate(results):
        assert_close(result["loss"], losses[rank].detach(), **TOL)
        for key in ("image_tokens", "sub_text_embed"):
            assert_close(result["grads"][key], grads[key][rank * batch : (rank + 1) * batch], **TOL, msg=f"{key} rank {rank}")


def test_flair_sampled_option_keeps_the_previous_normaliser():
    """One rank: the pairings select the same pairs; "flair" divides by B + K - 1, "sampled" by B."""
    full, offsets = _flair_fixture(1)
    extras = {"flair_negative_caption": _offsets_to_choice(offsets, 3)}
    out = {}
    for negatives in ("flair", "sampled"):
        head = _flair_head()
        head.config.negatives = negatives
        out[negatives] = head(HeadInputs(local=dict(full), gathered={}, batch={}, extras=extras))["loss"]
    assert_close(out["sampled"], out["flair"] * (3 + 2 - 1) / 3, **TOL)


def test_bounded_eval_scores_match_unchunked():
    """FLAIR's text-conditioned scores and FILIP's s' stream over (images x texts) blocks; a
    one-block budget gives the same numbers."""
    from vlp.models.heads.filip import bounded_text_to_image, token_similarity

    g = torch.Generator().manual_seed(4)
    images, texts = F.normalize(torch.randn(7, 5, E, generator=g), dim=-1), F.normalize(torch.randn(9, 6, E, generator=g), dim=-1)
    mask = torch.arange(6)[None] < torch.randint(1, 7, (9,), generator=g)[:, None]
    _, want = token_similarity(images, texts, mask)
    for budget in (1, 3 * 4 * 30 * 3, 1 << 30):
        assert_close(bounded_text_to_image(images, texts, mask, budget=budget), want, **TOL)
    head = _flair_head()
    head.config.score_chunk = 2
    tokens, text = torch.randn(5, 4, E, generator=g), torch.randn(3, E, generator=g)
    pooled, _ = head.pool(text[None].expand(5, -1, -1), tokens)
    assert_close(head.text_conditioned_scores(tokens, text), F.cosine_similarity(pooled, text[None], dim=-1), **TOL)


# --------------------------------------------------------------------------------------------
# filip and ct_align keep each rank's patch tokens local and gather only the texts/sentences; the
# softmax over images/volumes combines the ranks' per-column log-sum-exps (global_logsumexp).
# Reference: one process holding the global batch, each rank's loss by the former formula
# (image and text tokens of every rank, open_clip's local_loss), the gradients of their sum on
# the inputs and of each rank's own loss on the head's parameters.


def test_global_logsumexp_is_logsumexp_on_one_process_gradcheck():
    from vlp.models.heads.tiled_tokens import global_logsumexp

    g = torch.Generator().manual_seed(1)
    scores = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    exclude = torch.zeros(4, 5, dtype=torch.bool)
    exclude[0, 1] = exclude[2, 3] = exclude[3, 3] = True
    lse, best = global_logsumexp(scores, scale, exclude)
    logits = (scale * scores).masked_fill(exclude, float("-inf"))
    assert_close(lse, logits.logsumexp(0))
    assert_close(best, logits.amax(0))
    weights = torch.randn(5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: global_logsumexp(a, b, exclude)[0] @ weights, (scores, scale))


def test_filip_and_ct_align_gather_no_patch_tokens():
    assert "image_tokens" not in FilipHead.gathered_keys and "image_tokens" not in CtAlignHead.gathered_keys
    assert FilipHead.gathered_keys == ("text_tokens", "text_mask")
    assert CtAlignHead.gathered_keys == ("sentence_embed",)


def _global_batch(name: str, world: int, batch: int, seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    total = world * batch
    if name == "filip":
        lengths = torch.randint(1, 7, (total,), generator=g)
        return {"image_tokens": torch.randn(total, 5, E, generator=g), "text_tokens": torch.randn(total, 6, E, generator=g),
                "text_mask": torch.arange(6)[None] < lengths[:, None]}
    sentences = torch.randn(total, 3, E, generator=g)
    mask = torch.rand(total, 3, generator=g) < 0.7
    mask[:, 0] = True
    # A duplicate finding across ranks (volume 0 sentence 1 == the last volume's sentence 0,
    # cosine 1 >= dedup_threshold): each is removed from the other's negatives.
    sentences[total - 1, 0] = 2.0 * sentences[0, 1]
    mask[0, 1] = True
    if world == 3:
        mask[batch : 2 * batch] = False  # the middle rank has no sentence to align
    return {"image_tokens": torch.randn(total, 6, E, generator=g), "sentence_embed": sentences, "sentence_mask": mask}


def _local_head(name: str, block: int | None):
    torch.manual_seed(0)
    if name == "filip":
        head = FilipHead(FilipConfig(block_size=block), E)
        with torch.no_grad():
            head.logit_scale.fill_(math.log(7.0))
        return head
    return CtAlignHead(CtAlignConfig(block_size=block, exclude_normal=False, topk=2, dedup_threshold=0.98), E)


def _rank_local_scheme(rank: int, world: int, name: str, block: int, batch: int) -> dict:
    from vlp.core.collectives import gather_with_grad

    full = _global_batch(name, world, batch)
    local = {k: v[rank * batch : (rank + 1) * batch].clone() for k, v in full.items()}
    leaves = {k: v.requires_grad_() for k, v in local.items() if v.is_floating_point() and k != "sentence_mask"}
    head = _local_head(name, block)
    gathered = {k: gather_with_grad(local[k]) if local[k].is_floating_point() else full[k] for k in head.gathered_keys}
    batch_data = {"sentence_mask": local["sentence_mask"]} if name == "ct_align" else {}
    loss = head(HeadInputs(local=local, gathered=gathered, batch=batch_data, rank=rank, world_size=world))["loss"]
    loss.backward()
    return {"loss": loss.detach(), **{f"input.{k}": v.grad for k, v in leaves.items()},
            **{f"param.{n}": p.grad for n, p in head.named_parameters()}}


def _reference_local_scheme(name: str, world: int, batch: int) -> list[dict]:
    """Every rank's loss in one process by the former formula; input grads of their sum."""
    from vlp.models.heads.ct_align import alignment_loss, cross_region_scores
    from vlp.models.heads.filip import token_similarity

    full = _global_batch(name, world, batch)
    leaves = {k: v.clone().requires_grad_() for k, v in full.items() if v.is_floating_point() and k != "sentence_mask"}
    head = _local_head(name, DENSE)
    losses, param_grads = [], []
    if name == "filip":
        scale = head.logit_scale.exp()
        images, texts = F.normalize(leaves["image_tokens"], dim=-1), F.normalize(leaves["text_tokens"], dim=-1)
        i2t, t2i = token_similarity(images, texts, full["text_mask"])  # (N images, N texts) each
        for rank in range(world):
            own = slice(rank * batch, (rank + 1) * batch)
            labels = torch.arange(batch) + rank * batch
            losses.append((F.cross_entropy(scale * i2t[own], labels) + F.cross_entropy(scale * t2i[:, own].T, labels)) / 2)
    else:
        mask = full["sentence_mask"]
        sentences = F.normalize(leaves["sentence_embed"], dim=-1)  # (N, S, E)
        total_valid = int(mask.sum())
        for rank in range(world):
            rows = mask.nonzero()
            rows = rows[(rows[:, 0] >= rank * batch) & (rows[:, 0] < (rank + 1) * batch)]
            queries, owners = sentences[rows[:, 0], rows[:, 1]], rows[:, 0]
            same = torch.einsum("me,nse->mns", queries.detach(), sentences.detach()) >= 0.98
            exclude = (same & mask[None]).any(-1)  # (m, N)
            similarity = cross_region_scores(queries, leaves["image_tokens"], "topk", 2, 0.1, block_size=DENSE)
            loss, _ = alignment_loss(similarity, owners, head.scale(), exclude=exclude,
                                     normaliser=total_valid / world)
            losses.append(loss)
    for loss in losses:
        grads = torch.autograd.grad(loss, list(head.parameters()), retain_graph=True)
        param_grads.append({f"param.{n}": g for (n, _), g in zip(head.named_parameters(), grads)})
    torch.stack(losses).sum().backward()
    return [{"loss": loss.detach(), **param_grads[rank],
             **{f"input.{k}": v.grad[rank * batch : (rank + 1) * batch] for k, v in leaves.items()}}
            for rank, loss in enumerate(losses)]


def _assert_ranks_equal_reference(name, world, results, batch):
    want = _reference_local_scheme(name, world, batch)
    for rank, (got, ref) in enumerate(zip(results, want)):
        assert got.keys() == ref.keys()
        for key in ref:
            assert_close(got[key], ref[key], **TOL, msg=f"{name} rank {rank}/{world} {key}")


@pytest.mark.parametrize("name", ["filip", "ct_align"])
@pytest.mark.parametrize("block", [2, DENSE])
def test_local_images_equal_reference_on_one_rank(name, block):
    _assert_ranks_equal_reference(name, 1, [_rank_local_scheme(0, 1, name, block, 5)], 5)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.nightly)])
def test_local_images_equal_reference_on_gloo_ranks(world):
    """Tiled and dense, filip and ct_align, on 2 and 3 real ranks (on 3 the middle rank aligns
    no sentence and still takes part in every collective)."""
    for name in ("filip", "ct_align"):
        for block in (2, DENSE):
            results = run_ranks(_rank_local_scheme, world, name, block, 3, timeout=180)
            _assert_ranks_equal_reference(name, world, results, 3)
