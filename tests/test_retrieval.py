"""Retrieval with the image tokens left on their rank (token heads) and per-prefix metrics
(Matryoshka): both against the all-in-one-process ranking (`token_retrieval_ranks` on whole tensors,
what the evaluator computed before it stopped gathering image tokens), on 1 and 2 gloo ranks."""

import pytest
import torch
import yaml
from conftest import tiny_config
from dist_utils import run_ranks
from test_eval import dense_ranks, encoded_shards, random_retrieval_set, token_retrieval_ranks, write_caption_shards

from vlp.train.evals import EVALUATORS, EvalContext
from vlp.train.evals.retrieval import (
    RetrievalConfig,
    retrieval_ranks,
    sharded_reranked_ranks,
    sharded_token_ranks,
)

NUM_IMAGES, NUM_TEXTS = 12, 30
# (image split, caption split) between two ranks: uneven, and a rank holding nothing.
SPLITS = [(5, 13), (0, 0), (NUM_IMAGES, NUM_TEXTS)]
# (depth or rerank_topk, chunk): depth below and above the number of images, chunks of 1 and more.
SETTINGS = [(5, 4), (20, 1), (NUM_TEXTS, 7)]


def flair_head_and_set():
    from vlp.models.heads.flair import FlairConfig, FlairHead

    torch.manual_seed(0)
    head = FlairHead(FlairConfig(num_heads=2), 16).eval()
    image, text, owner = random_retrieval_set(num_images=NUM_IMAGES, num_texts=NUM_TEXTS, seed=3)
    tokens = torch.randn(NUM_IMAGES, 5, 16, generator=torch.Generator().manual_seed(4))
    return head, image, tokens, text, owner


def sharded(rank, world_size, image_split, text_split):
    """Every setting's (i2t, t2i) ranks of this rank's images and captions, both sharded paths."""
    head, image, tokens, text, owner = flair_head_and_set()
    image_bounds, text_bounds = [0, image_split, NUM_IMAGES], [0, text_split, NUM_TEXTS]
    if world_size == 1:
        image_bounds, text_bounds = [0, NUM_IMAGES], [0, NUM_TEXTS]
    first, last = image_bounds[rank], image_bounds[rank + 1]
    text_queries = torch.arange(text_bounds[rank], text_bounds[rank + 1])
    out = {}
    for depth, chunk in SETTINGS:
        for name, ranks_fn in (("tokens", sharded_token_ranks), ("rerank", sharded_reranked_ranks)):
            out[name, depth, chunk] = ranks_fn(head, image[first:last], tokens[first:last], text, owner, first,
                                               text_queries, depth=depth, chunk=chunk)
    return out


def _sharded_on_rank(rank, world_size, splits):
    return [sharded(rank, world_size, *split) for split in splits]


@pytest.mark.slow  # 2 gloo ranks
def test_sharded_token_ranks_equal_all_gathered_ranks():
    head, image, tokens, text, owner = flair_head_and_set()
    want = {}
    for depth, chunk in SETTINGS:
        everything = (head, image, text, owner, torch.arange(NUM_IMAGES), torch.arange(NUM_TEXTS))
        want["tokens", depth, chunk] = token_retrieval_ranks(*everything, depth=depth, chunk=chunk, image_tokens=tokens)
        want["rerank", depth, chunk] = token_retrieval_ranks(*everything, depth=depth, chunk=chunk, image_tokens=tokens,
                                                             rerank_topk=depth)
    # The reference itself can fail: text-conditioned scores for every pair, ranked densely.
    full = head.text_conditioned_scores(tokens, text, image_embed=image)
    positive = owner[None, :] == torch.arange(NUM_IMAGES)[:, None]
    torch.testing.assert_close(want["tokens", NUM_TEXTS, 7][1], dense_ranks(full.T, positive.T), rtol=0, atol=0)

    one = sharded(0, 1, NUM_IMAGES, NUM_TEXTS)  # no process group: the collectives are no-ops
    two = run_ranks(_sharded_on_rank, 2, SPLITS)
    for got in [[one]] + [[two[0][s], two[1][s]] for s in range(len(SPLITS))]:
        for key, (want_i2t, want_t2i) in want.items():
            i2t = torch.cat([ranks[key][0] for ranks in got])
            t2i = torch.cat([ranks[key][1] for ranks in got])
            torch.testing.assert_close(i2t, want_i2t, rtol=0, atol=0, msg=lambda m: f"{key} i2t: {m}")
            torch.testing.assert_close(t2i, want_t2i, rtol=0, atol=0, msg=lambda m: f"{key} t2i: {m}")


# ----------------------------------------------------------------------------- evaluator
def model_tree(tmp_path, digits_dir, heads: dict) -> dict:
    tree = yaml.safe_load(tiny_config(tmp_path, digits_dir).read_text())
    tree["model"]["heads"] = heads
    if "flair" in heads:
        tree["data"]["sub_captions"] = 2
    return tree


def build_model(tree, state=None):
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    torch.manual_seed(0)
    model = VLPModel(load_config(tree=tree).model)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def recalls(i2t, t2i, suffix=""):
    out = {f"retrieval_i2t_r{k}{suffix}": float((i2t < k).double().mean()) for k in (1, 5, 10)}
    out.update({f"retrieval_t2i_r{k}{suffix}": float((t2i < k).double().mean()) for k in (1, 5, 10)})
    return out


EVAL_CONFIGS = {"tokens": {}, "rerank": {"rerank_topk": 10}}


def _evaluate_on_rank(rank, world_size, runs):
    results = []
    for tree, state, spec, configs in runs:
        model = build_model(tree, state)
        results.append({name: EVALUATORS.get("retrieval")(RetrievalConfig(data=spec, batch_size=4, chunk_size=5, **extra))
                        .run(model, EvalContext(rank=rank, world_size=world_size)) for name, extra in configs.items()})
    return results


@pytest.mark.slow  # 2 gloo ranks
def test_token_and_matryoshka_evaluator_on_one_and_two_ranks(tmp_path, digits_dir):
    write_caption_shards(tmp_path / "ret")
    spec = str(tmp_path / "ret" / "ret-{000000..000002}.tar")
    flair_tree = model_tree(tmp_path, digits_dir, {"flair": {"num_heads": 2}})
    flair = build_model(flair_tree)
    mrl_tree = model_tree(tmp_path, digits_dir, {"clip": {"matryoshka": {"dims": [8, 16, 32]}}})
    mrl = build_model(mrl_tree)

    # References: everything in one process, scored as the evaluator did with gathered image tokens.
    image, tokens, text, owner = encoded_shards(flair, tmp_path / "ret")
    everything = (flair.objective.heads.flair, image, text, owner, torch.arange(len(image)), torch.arange(len(text)))
    want = {"tokens": recalls(*token_retrieval_ranks(*everything, depth=10, chunk=5, image_tokens=tokens)),
            "rerank": recalls(*token_retrieval_ranks(*everything, depth=10, chunk=5, image_tokens=tokens,
                                                      rerank_topk=10))}
    image, _, text, owner = encoded_shards(mrl, tmp_path / "ret")
    want["matryoshka"] = {}
    for suffix, width in (("", 32), ("@8", 8), ("@16", 16), ("@32", 32)):
        # A prefix is re-normalised at its own width (not a slice of the full-width cosine).
        scores = (torch.nn.functional.normalize(image[:, :width], dim=-1)
                  @ torch.nn.functional.normalize(text[:, :width], dim=-1).T)
        positive = owner[None, :] == torch.arange(len(image))[:, None]
        want["matryoshka"].update(recalls(dense_ranks(scores, positive), dense_ranks(scores.T, positive.T), suffix))

    runs = [(flair_tree, flair.state_dict(), spec, EVAL_CONFIGS), (mrl_tree, mrl.state_dict(), spec, {"matryoshka": {}})]
    one = _evaluate_on_rank(0, 1, runs)
    got_one = {**one[0], **one[1]}
    mrl_one = got_one["matryoshka"]
    for suffix in ("@8", "@16", "@32"):
        assert f"retrieval_mean_recall{suffix}" in mrl_one and f"retrieval_images{suffix}" not in mrl_one
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r10", "mean_recall"):  # the full width is the plain metric
        assert mrl_one[f"retrieval_{key}@32"] == mrl_one[f"retrieval_{key}"], key
    assert not any("@" in key for key in got_one["tokens"])  # FLAIR scores with tokens: no prefixes

    for got in [got_one] + [{**result[0], **result[1]} for result in run_ranks(_evaluate_on_rank, 2, runs)]:
        for name, expected in want.items():
            assert got[name]["retrieval_images"] == 23 and got[name]["retrieval_texts"] == 45
            for key, value in expected.items():
                assert got[name][key] == pytest.approx(value, abs=1e-9), (name, key)
            for key, value in got_one[name].items():
                assert got[name][key] == pytest.approx(value, abs=1e-9), (name, key)
