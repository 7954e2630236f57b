"""FLAIR (text-conditioned pooling) and FILIP (token-wise late interaction) heads.

References are independent of the heads' code: torch's `nn.MultiheadAttention(add_zero_attn=True)`
for the pooling, `F.scaled_dot_product_attention` with an explicit zero key/value, open_clip's
`SigLipLoss` for the K = 1 sigmoid losses, Python loops for FILIP's scores, and a single-process
computation over the global batch for the 2-rank gloo runs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_ranks
from torch.testing import assert_close

from vlp.models.heads import HEADS, HeadInputs
from vlp.models.heads.filip import (
    FilipConfig,
    FilipHead,
    random_token_subset,
    token_similarity,
)
from vlp.models.heads.flair import (
    FlairConfig,
    FlairHead,
    TextConditionedPool,
    all_pairs,
    sampled_pairs,
    zero_slot_attention,
)

E, HEADS_N = 16, 4


def _flair(**overrides) -> FlairHead:
    torch.manual_seed(0)
    head = FlairHead(FlairConfig(num_heads=HEADS_N, **overrides), E)
    with torch.no_grad():  # start away from the SigLIP init so both loss terms matter
        head.logit_scale.fill_(math.log(5.0))
        head.logit_bias.fill_(-1.0)
    return head.double()


def _flair_inputs(batch=3, k=2, patches=5, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    local = {
        "image_embed": torch.randn(batch, E, generator=g, dtype=dtype),
        "image_tokens": torch.randn(batch, patches, E, generator=g, dtype=dtype),
        "sub_text_embed": torch.randn(batch, k, E, generator=g, dtype=dtype),
    }
    return local


def _mha_reference(pool: TextConditionedPool, texts, tokens):
    """The same layer rebuilt from torch's MultiheadAttention with add_zero_attn=True."""
    mha = torch.nn.MultiheadAttention(E, pool.num_heads, batch_first=True, add_zero_attn=True).to(texts.dtype)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([pool.q_proj.weight, pool.k_proj.weight, pool.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]))
        mha.out_proj.weight.copy_(pool.out_proj.weight)
        mha.out_proj.bias.copy_(pool.out_proj.bias)
    return mha(pool.ln_q(texts), pool.ln_k(tokens), pool.ln_v(tokens), need_weights=True, average_attn_weights=False)


# --------------------------------------------------------------------------------------------
# Text-conditioned pooling and its zero slot


def test_pool_matches_torch_multihead_attention_with_zero_attn():
    head = _flair()
    texts, tokens = torch.randn(3, 4, E, dtype=torch.float64), torch.randn(3, 6, E, dtype=torch.float64)
    pooled, weights = head.pool(texts, tokens)
    ref_pooled, ref_weights = _mha_reference(head.pool, texts, tokens)
    assert_close(pooled, ref_pooled)
    assert_close(weights, ref_weights)  # (B, H, T, P + 1), zero slot last


def test_zero_slot_is_a_zero_key_and_zero_value():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    pooled, weights = zero_slot_attention(q, k[:, :, :5], v[:, :, :5])
    # Reference: ordinary softmax attention over the real tokens plus one explicit zero token.
    zeros = torch.zeros(2, 3, 1, 8, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(q, torch.cat([k[:, :, :5], zeros], 2), torch.cat([v[:, :, :5], zeros], 2))
    assert_close(pooled, ref)
    # The slot takes weight (real weights sum below 1) but adds nothing to the pooled vector.
    real = weights[..., :-1]
    assert (real.sum(-1) < 1).all()
    assert_close(pooled, real @ v[:, :, :5])
    assert_close(weights[..., -1], 1 / (1 + torch.einsum("bhtd,bhpd->bhtp", q, k[:, :, :5]).mul(8**-0.5).exp().sum(-1)))


def _math_zero_slot_attention(queries, keys, values, need_weights=True):
    """The explicit-softmax pooling the losses ran before SDPA (kept here as the reference)."""
    logits = torch.einsum("bhtd,bhpd->bhtp", queries, keys) * queries.shape[-1] ** -0.5
    weights = torch.cat([logits, logits.new_zeros(logits.shape[:-1] + (1,))], dim=-1).softmax(dim=-1)
    return torch.einsum("bhtp,bhpd->bhtd", weights[..., :-1], values), weights


def test_sdpa_pooling_equals_the_explicit_softmax_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 5, 8, generator=g)]
    grads = []
    for attention in (zero_slot_attention, _math_zero_slot_attention):
        inputs = [leaf.clone().requires_grad_() for leaf in leaves]
        pooled, weights = attention(*inputs, need_weights=False)
        pooled.sin().sum().backward()
        grads.append((pooled.detach(), *(leaf.grad for leaf in inputs)))
    assert weights is not None  # the reference
    for ours, reference in zip(*grads):
        assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [None, 2])
def test_flair_loss_by_sdpa_equals_the_explicit_softmax_loss(block_size, monkeypatch):
    import vlp.models.heads.flair as flair

    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    results = []
    for attention in (flair.zero_slot_attention, _math_zero_slot_attention):
        monkeypatch.setattr(flair, "zero_slot_attention", attention)
        head = _flair(negatives="all", block_size=block_size).float()
        local = {key: value.float().requires_grad_() for key, value in _flair_inputs(dtype=torch.float32).items()}
        loss = head(HeadInputs(local=local, gathered={}, batch={}))["loss"]
        loss.backward()
        results.append((loss.detach(), *(value.grad for value in local.values()), *(p.grad for p in head.parameters())))
    assert calls  # the head's own path went through SDPA
    for ours, reference in zip(*results):
        assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_a_text_can_put_all_its_weight_on_the_zero_slot():
    head = _flair()
    with torch.no_grad():  # make every real key anti-aligned with every query
        head.pool.q_proj.weight.zero_()
        head.pool.q_proj.bias.fill_(1.0)
        head.pool.k_proj.weight.zero_()
        head.pool.k_proj.bias.fill_(-50.0)
    texts, tokens = torch.randn(2, 3, E, dtype=torch.float64), torch.randn(2, 5, E, dtype=torch.float64)
    pooled, weights = head.pool(texts, tokens)
    assert_close(weights[..., -1], torch.ones_like(weights[..., -1]))
    # Nothing pooled: only the output projection's bias remains.
    assert_close(pooled, head.pool.out_proj.bias.expand_as(pooled))
    assert_close(head.attention_map(tokens, texts[0]), torch.zeros(2, 3, 5, dtype=torch.float64))


def test_attention_map_is_the_head_average_over_patches():
    head = _flair(include_global_token=True)
    tokens, texts, embed = torch.randn(2, 5, E).double(), torch.randn(3, E).double(), torch.randn(2, E).double()
    maps = head.attention_map(tokens, texts, image_embed=embed)
    _, ref_weights = _mha_reference(head.pool, texts[None].expand(2, -1, -1), torch.cat([embed[:, None], tokens], 1))
    assert maps.shape == (2, 3, 5)
    assert_close(maps, ref_weights.mean(1)[..., 1:-1])  # drop the global token and the zero slot


# --------------------------------------------------------------------------------------------
# The B x (K + N - 1) pairing


def test_sampled_pairs_hold_own_captions_and_one_of_every_other_image():
    k, batch, total, first = 3, 2, 5, 2
    negative = torch.randint(k, (batch, total), generator=torch.Generator().manual_seed(0))
    index, labels = sampled_pairs(negative, first, k)
    assert index.shape == labels.shape == (batch, k + total - 1)
    for row in range(batch):
        own = first + row
        owners = (index[row] // k).tolist()
        assert sorted(owners) == sorted([own] * k + [j for j in range(total) if j != own])
        assert ((index[row] // k == own) == (labels[row] > 0)).all()
        for col, j in enumerate(owners[k:], start=k):
            assert index[row, col] % k == negative[row, j]


def _tcs_only(head, local, negatives):
    head.config.negatives = negatives
    head.config.multi_positive = False
    return head(HeadInputs(local=local, gathered={}, batch={}))["loss"]


def test_pairing_logits_are_entries_of_the_full_matrix():
    """Each sampled pair's pooled vector and logit equal the same (image, caption) entry of the
    full B x (N * K) computation: pooling is per pair, so sampling only selects entries."""
    head = _flair()
    local = _flair_inputs(batch=4, k=3)
    texts = local["sub_text_embed"].reshape(12, E)
    full_index, _ = all_pairs(4, 4, 0, 3)
    full_pooled, _ = head.pool(texts[full_index], local["image_tokens"])  # (B, N * K, E)
    negative = torch.randint(3, (4, 4), generator=torch.Generator().manual_seed(3))
    index, _ = sampled_pairs(negative, 0, 3)
    pooled, _ = head.pool(texts[index], local["image_tokens"])
    assert_close(pooled, full_pooled.gather(1, index[..., None].expand(-1, -1, E)))


def test_sampled_loss_averaged_over_choices_equals_full_loss_with_negatives_weighted_1_over_k():
    """E over the negative choice of the sampled TCS loss = the full B x (N * K) TCS loss in which
    each negative image's K captions are weighted 1/K. The loss is a sum over columns and each
    column's choice is uniform and independent, so the expectation is the mean over the K
    constant choices. Losses and gradients both."""
    k, batch = 3, 4
    local = {key: value.requires_grad_() for key, value in _flair_inputs(batch=batch, k=k).items()}
    head = _flair(multi_positive=False)
    texts = local["sub_text_embed"].reshape(batch * k, E)
    scale, bias = head._scale(), head.logit_bias

    sampled = []
    for choice in range(k):
        index, labels = sampled_pairs(torch.full((batch, batch), choice), 0, k)
        pooled, _ = head.pool(texts[index], local["image_tokens"])
        logits = scale * F.cosine_similarity(pooled, texts[index], dim=-1) + bias
        sampled.append(-F.logsigmoid(labels * logits).sum() / batch)
    expected_loss = torch.stack(sampled).mean()

    index, labels = all_pairs(batch, batch, 0, k)
    pooled, _ = head.pool(texts[index], local["image_tokens"])
    logits = scale * F.cosine_similarity(pooled, texts[index], dim=-1) + bias
    weights = torch.where(labels > 0, 1.0, 1.0 / k)
    full_loss = (-F.logsigmoid(labels * logits) * weights).sum() / batch
    assert_close(expected_loss, full_loss)
    grads = torch.autograd.grad(expected_loss, list(local.values()) + [head.logit_scale], allow_unused=True,
                                retain_graph=True)
    full_grads = torch.autograd.grad(full_loss, list(local.values()) + [head.logit_scale], allow_unused=True)
    for got, want in zip(grads, full_grads):
        if want is not None:
            assert_close(got, want)


def test_k1_sampled_equals_all_and_the_sigmoid_losses_match_open_clip():
    from open_clip.loss import SigLipLoss

    head = _flair()
    local = _flair_inputs(batch=4, k=1)
    assert_close(_tcs_only(head, local, "sampled"), _tcs_only(head, local, "all"))
    # K = 1: MPS is SigLIP on the global embeddings (same per-image normalisation).
    head.config.multi_positive, head.config.negatives = True, "all"
    out = head(HeadInputs(local=local, gathered={}, batch={}))
    siglip = SigLipLoss()(F.normalize(local["image_embed"], dim=-1), F.normalize(local["sub_text_embed"][:, 0], dim=-1),
                          head._scale(), head.logit_bias)
    assert_close(out["logging"]["mps"], siglip)
    # ... and TCS is SigLIP's formula on the pooled pairs, pooled by the torch MHA reference.
    texts = local["sub_text_embed"][:, 0]
    pooled, _ = _mha_reference(head.pool, texts[None].expand(4, -1, -1), local["image_tokens"])
    logits = head._scale() * F.cosine_similarity(pooled, texts[None], dim=-1) + head.logit_bias
    labels = 2 * torch.eye(4, dtype=torch.float64) - 1
    assert_close(out["logging"]["tcs"], -F.logsigmoid(labels * logits).sum() / 4)
    assert_close(out["loss"], (out["logging"]["tcs"] + siglip) / 2)


def test_scale_clamped_inside_forward_and_registered():
    assert "flair" in HEADS and "filip" in HEADS
    head = _flair(max_logit_scale=20.0)
    with torch.no_grad():
        head.logit_scale.fill_(10.0)
    assert head.logit_scale.shape == (1,)
    assert_close(head._scale(), torch.tensor([20.0], dtype=torch.float64))
    assert head.logit_scale.item() == 10.0  # the parameter itself is untouched
    with pytest.raises(ValueError, match="num_heads=3 must divide"):
        FlairHead(FlairConfig(num_heads=3), E)


def test_pairwise_scores_full_and_topk_reranking():
    head = _flair()
    g = torch.Generator().manual_seed(5)
    embed, tokens, texts = (torch.randn(6, E, generator=g).double(), torch.randn(6, 5, E, generator=g).double(),
                            torch.randn(4, E, generator=g).double())
    cosine = F.normalize(embed, dim=-1) @ F.normalize(texts, dim=-1).T
    loose = dict(check_dtype=False, atol=1e-5, rtol=1e-5)  # the global path scores in fp32
    assert_close(head.pairwise_scores(embed, texts), cosine, **loose)
    full = head.pairwise_scores(embed, texts, image_tokens=tokens)
    pooled, _ = _mha_reference(head.pool, texts[None].expand(6, -1, -1), tokens)
    assert_close(full, F.cosine_similarity(pooled, texts[None], dim=-1))
    reranked = head.pairwise_scores(embed, texts, image_tokens=tokens, topk=2)
    top = cosine.topk(2, dim=0).indices
    for col in range(4):
        for row in range(6):
            want = full[row, col] if row in top[:, col] else cosine[row, col] - 4
            assert_close(reranked[row, col], want, **loose)


# --------------------------------------------------------------------------------------------
# FILIP


def _naive_filip(image_tokens, text_tokens, text_mask):
    """Python loops over pairs, patches and tokens."""
    n1, n2 = image_tokens.shape[0], text_tokens.shape[0]
    i2t, t2i = torch.zeros(n1, n2, dtype=image_tokens.dtype), torch.zeros(n1, n2, dtype=image_tokens.dtype)
    for i in range(n1):
        for t in range(n2):
            valid = [l for l in range(text_tokens.shape[1]) if text_mask[t, l]]
            sims = [[float(image_tokens[i, p] @ text_tokens[t, l]) for l in valid] for p in range(image_tokens.shape[1])]
            i2t[i, t] = sum(max(row) for row in sims) / len(sims)
            t2i[i, t] = sum(max(sims[p][j] for p in range(len(sims))) for j in range(len(valid))) / len(valid)
    return i2t, t2i


def _filip_inputs(n=4, patches=5, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, length, dtype=torch.bool)
    for t in range(n):
        mask[t, : 2 + t % (length - 1)] = True
    return {
        "image_tokens": torch.randn(n, patches, E, generator=g, dtype=torch.float64),
        "text_tokens": torch.randn(n, length, E, generator=g, dtype=torch.float64),
        "text_mask": mask,
    }


def test_filip_scores_match_loops():
    x = _filip_inputs()
    images, texts = F.normalize(x["image_tokens"], dim=-1), F.normalize(x["text_tokens"], dim=-1)
    i2t, t2i = token_similarity(images, texts, x["text_mask"], chunk=3)
    ref_i2t, ref_t2i = _naive_filip(images, texts, x["text_mask"])
    assert_close(i2t, ref_i2t)
    assert_close(t2i, ref_t2i)


def test_filip_padding_values_change_nothing():
    torch.manual_seed(0)
    head = FilipHead(FilipConfig(), E).double()
    x = _filip_inputs()
    changed = dict(x, text_tokens=x["text_tokens"].clone())
    changed["text_tokens"][~x["text_mask"]] = 1e3 * torch.randn(int((~x["text_mask"]).sum()), E, dtype=torch.float64)
    loss = head(HeadInputs(local=x, gathered={}, batch={}))["loss"]
    assert_close(head(HeadInputs(local=changed, gathered={}, batch={}))["loss"], loss)
    assert_close(head.similarity_map(x["image_tokens"], x["text_tokens"], x["text_mask"]),
                 head.similarity_map(changed["image_tokens"], changed["text_tokens"], x["text_mask"]))
    assert_close(head.token_scores(x["image_tokens"], x["text_tokens"], x["text_mask"]),
                 head.token_scores(x["image_tokens"], changed["text_tokens"], x["text_mask"]))


def test_filip_loss_is_clip_infonce_on_the_late_interaction_scores():
    torch.manual_seed(0)
    head = FilipHead(FilipConfig(), E).double()
    x = _filip_inputs()
    out = head(HeadInputs(local=x, gathered={}, batch={}))
    i2t, t2i = _naive_filip(F.normalize(x["image_tokens"], dim=-1), F.normalize(x["text_tokens"], dim=-1), x["text_mask"])
    scale = 1 / 0.07
    labels = torch.arange(4)
    ref = (F.cross_entropy(scale * i2t, labels) + F.cross_entropy(scale * t2i.T, labels)) / 2
    assert_close(out["loss"], ref)


def test_random_token_subset_keeps_real_tokens_first():
    x = _filip_inputs(length=8)
    tokens, mask = random_token_subset(x["text_tokens"], 3, x["text_mask"])
    assert tokens.shape == (4, 3, E)
    assert mask.sum(1).tolist() == x["text_mask"].sum(1).clamp(max=3).tolist()  # real tokens first
    picked, _ = random_token_subset(x["image_tokens"], 2)
    for b in range(4):
        for p in range(2):
            assert any(torch.equal(picked[b, p], row) for row in x["image_tokens"][b])


# --------------------------------------------------------------------------------------------
# Two ranks on gloo == one process over the global batch


def _global_inputs(name, world, batch):
    torch.manual_seed(42)
    if name == "flair":
        return _flair_inputs(batch=world * batch, k=2, patches=4, seed=7)
    return _filip_inputs(n=world * batch, seed=7)


def _make_objective(name):
    from vlp.models.objective import Objective

    torch.manual_seed(0)
    cfg = FlairConfig(num_heads=HEADS_N) if name == "flair" else FilipConfig()
    return Objective({name: cfg}, E).double()


def _rank_fn(rank, world, name, batch):
    torch.set_default_dtype(torch.float64)
    full = _global_inputs(name, world, batch)
    local = {k: v[rank * batch : (rank + 1) * batch].clone() for k, v in full.items()}
    for v in local.values():
        if v.is_floating_point():
            v.requires_grad_()
    objective = _make_objective(name)
    torch.manual_seed(100 + rank)  # the negative-caption draw of FLAIR
    out = objective(local, {})
    out["loss"].backward()
    head = objective.heads[name]
    # numpy, not tensors: torch's queue shares tensor storage by file descriptor, which dies
    # with the worker process.
    return {
        "loss": out["loss"].detach().numpy(),
        "input_grads": {k: v.grad.numpy() for k, v in local.items() if v.is_floating_point()},
        "param_grads": {n: p.grad.numpy() for n, p in head.named_parameters()},
    }


def _reference(name, world, batch):
    torch.set_default_dtype(torch.float64)
    full = {k: (v.clone().requires_grad_() if v.is_floating_point() else v) for k, v in _global_inputs(name, world, batch).items()}
    objective = _make_objective(name)
    head = objective.heads[name]
    losses, param_grads = [], []
    for rank in range(world):
        local = {k: v[rank * batch : (rank + 1) * batch] for k, v in full.items()}
        gathered = {k: full[k] for k in head.gathered_keys}
        torch.manual_seed(100 + rank)
        if name == "filip":  # the head scores only local images (no image gather): the formula instead
            labels = torch.arange(batch) + rank * batch
            i2t, t2i = token_similarity(F.normalize(full["image_tokens"], dim=-1), F.normalize(full["text_tokens"], dim=-1),
                                        full["text_mask"])
            scale = head.logit_scale.exp()
            own = slice(rank * batch, (rank + 1) * batch)
            loss = (F.cross_entropy(scale * i2t[own], labels) + F.cross_entropy(scale * t2i[:, own].T, labels)) / 2
        else:
            loss = head(HeadInputs(local=local, gathered=gathered, batch={}, rank=rank, world_size=world))["loss"]
        losses.append(loss)
        grads = torch.autograd.grad(loss, list(head.parameters()), retain_graph=True)
        param_grads.append({n: g for (n, _), g in zip(head.named_parameters(), grads)})
    torch.stack(losses).sum().backward()
    return losses, {k: v.grad for k, v in full.items() if v.is_floating_point()}, param_grads


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flair", "filip"])
def test_two_gloo_ranks_equal_single_process_reference(name):
    world, batch = 2, 3
    results = run_ranks(_rank_fn, world, name, batch, timeout=120)
    torch.set_default_dtype(torch.float64)
    try:
        losses, input_grads, param_grads = _reference(name, world, batch)
    finally:
        torch.set_default_dtype(torch.float32)
    for rank, result in enumerate(results):
        # The objective sums head losses in fp32.
        assert_close(torch.from_numpy(result["loss"]), losses[rank].detach().float())
        for key, grad in result["input_grads"].items():
            grad = torch.from_numpy(grad)
            # gather_with_grad sums every rank's gradient into the owner's slice: d(sum_r L_r)/dx.
            assert_close(grad, input_grads[key][rank * batch : (rank + 1) * batch], msg=f"{name} {key} rank {rank}")
        for pname, grad in result["param_grads"].items():
            grad = torch.from_numpy(grad)
            assert_close(grad, param_grads[rank][pname], msg=f"{name} {pname} rank {rank}")
