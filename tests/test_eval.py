"""Zero-shot and retrieval evaluators: exact chunked ranking against dense references, caption
parsing, clip_benchmark's file formats, and 2-rank gloo runs equal to one rank."""

import io
import json

import numpy as np
import pytest
import torch
from conftest import read_tar, tiny_config
from dist_utils import run_ranks
from PIL import Image

from vlp.core.errors import ConfigError
from vlp.models.heads.base import Head, HeadConfig
from vlp.train.evals import EVALUATORS, EvalContext
from vlp.train.evals.retrieval import (
    RetrievalConfig,
    positive_ranks,
    reranked_ranks,
    retrieval_ranks,
    sample_captions,
)
from vlp.train.evals.zeroshot import ZeroShotConfig, resolve_names


# ----------------------------------------------------------------------------- references
def dense_ranks(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Rank (0-based) of each row's best positive in the row's full descending sort."""
    order = scores.argsort(dim=1, descending=True)  # (Q, K)
    sorted_positive = positive.gather(1, order)
    return sorted_positive.float().argmax(dim=1)  # first positive position


def token_retrieval_ranks(head, image, text, owner, image_queries, text_queries, depth, chunk, image_tokens,
                          rerank_topk=None):
    """The one-process reference for heads that score with tokens (the evaluator's
    `sharded_*_ranks` keep each rank's tokens on it): every input whole; text-conditioned scores
    for every pair, or (rerank_topk) each query's top-K by the global score re-scored."""
    def block(images, texts):  # (ni, nt)
        if rerank_topk is None:
            return head.pairwise_scores(image[images], text[texts], image_tokens=image_tokens[images])
        return head.pairwise_scores(image[images], text[texts])  # the head's scores without tokens

    def i2t_positive(images, texts):
        return owner[texts] == images

    def t2i_positive(texts, images):
        return owner[texts] == images

    if rerank_topk is None:
        return (positive_ranks(block, i2t_positive, image_queries, text.shape[0], depth, chunk),
                positive_ranks(lambda t, i: block(i, t).T, t2i_positive, text_queries, image.shape[0], depth, chunk))

    def rescore(images, texts):
        return head.pair_scores(image_tokens, text, images, texts, image_embed=image)

    return (reranked_ranks(block, rescore, i2t_positive, image_queries, text.shape[0], rerank_topk, chunk),
            reranked_ranks(lambda t, i: block(i, t).T, lambda t, i: rescore(i, t), t2i_positive, text_queries,
                           image.shape[0], rerank_topk, chunk))


def random_retrieval_set(num_images=37, num_texts=90, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(num_images, dim, generator=gen)
    text = torch.randn(num_texts, dim, generator=gen)
    owner = torch.cat([torch.arange(num_images), torch.randint(num_images, (num_texts - num_images,), generator=gen)])
    owner = owner[torch.randperm(num_texts, generator=gen)]
    return image, text, owner


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_ranks_equal_dense_ranking(chunk):
    image, text, owner = random_retrieval_set()
    head = Head(HeadConfig(), 16)
    dense = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    positive = owner[None, :] == torch.arange(len(image))[:, None]  # (N, M)
    want_i2t, want_t2i = dense_ranks(dense, positive), dense_ranks(dense.T, positive.T)
    depth = 10
    i2t, t2i = retrieval_ranks(head, image, text, owner, torch.arange(len(image)), torch.arange(len(text)),
                               depth=depth, chunk=chunk)
    torch.testing.assert_close(i2t, want_i2t.clamp(max=depth), rtol=0, atol=0)
    torch.testing.assert_close(t2i, want_t2i.clamp(max=depth), rtol=0, atol=0)
    # Recall@k from the chunked ranks equals top-k membership on the dense matrix.
    top5 = dense.topk(5, dim=1).indices
    assert float((i2t < 5).float().mean()) == float(positive.gather(1, top5).any(dim=1).float().mean())


def test_meru_ranks_by_lorentzian_scores():
    from vlp.models.heads.meru import MeruConfig, MeruHead

    image, text, owner = random_retrieval_set(seed=1)
    head = MeruHead(MeruConfig(), 16)
    dense = head.pairwise_scores(image, text)
    positive = owner[None, :] == torch.arange(len(image))[:, None]
    i2t, t2i = retrieval_ranks(head, image, text, owner, torch.arange(len(image)), torch.arange(len(text)),
                               depth=10, chunk=8)
    torch.testing.assert_close(i2t, dense_ranks(dense, positive).clamp(max=10), rtol=0, atol=0)
    torch.testing.assert_close(t2i, dense_ranks(dense.T, positive.T).clamp(max=10), rtol=0, atol=0)


def test_flair_rerank_matches_flair_dense_topk():
    from vlp.models.heads.flair import FlairConfig, FlairHead

    torch.manual_seed(0)
    image, text, owner = random_retrieval_set(num_images=12, num_texts=30, seed=2)
    tokens = torch.randn(12, 5, 16)
    head = FlairHead(FlairConfig(num_heads=2), 16).eval()
    positive = owner[None, :] == torch.arange(12)[:, None]
    k = 6
    # FLAIR's own dense re-ranking (text queries): its top-k by global cosine, re-scored.
    dense = head.pairwise_scores(image, text, image_tokens=tokens, topk=k)  # (N, M)
    want_t2i = dense_ranks(dense.T, positive.T).clamp(max=k)
    i2t, t2i = token_retrieval_ranks(head, image, text, owner, torch.arange(12), torch.arange(30), depth=5, chunk=4,
                                     image_tokens=tokens, rerank_topk=k)
    torch.testing.assert_close(t2i, want_t2i, rtol=0, atol=0)
    # Re-ranking everything = text-conditioned scores for every pair.
    full = head.text_conditioned_scores(tokens, text)
    i2t_all, t2i_all = token_retrieval_ranks(head, image, text, owner, torch.arange(12), torch.arange(30), depth=30,
                                             chunk=5, image_tokens=tokens, rerank_topk=30)
    torch.testing.assert_close(i2t_all, dense_ranks(full, positive), rtol=0, atol=0)
    torch.testing.assert_close(t2i_all, dense_ranks(full.T, positive.T), rtol=0, atol=0)
    # Without re-ranking a token-scoring head gets the tokens in every block.
    i2t_tc, _ = token_retrieval_ranks(head, image, text, owner, torch.arange(12), torch.arange(30), depth=30,
                                      chunk=5, image_tokens=tokens)
    torch.testing.assert_close(i2t_tc, dense_ranks(full, positive), rtol=0, atol=0)


def test_caption_sources():
    assert sample_captions('["a cat", "a dog "]', {}, "auto") == ["a cat", "a dog"]
    assert sample_captions("a cat\n\na dog", {}, "auto") == ["a cat", "a dog"]
    assert sample_captions("ignored", {"captions": ["x", "y"]}, "auto") == ["x", "y"]
    assert sample_captions("a cat\na dog", {"captions": ["x"]}, "txt") == ["a cat", "a dog"]
    with pytest.raises(ValueError, match="sample k1: .json has no 'captions'"):
        sample_captions("a cat", {}, "json", "k1")
    with pytest.raises(ValueError, match="not a JSON list"):
        sample_captions("[oops", {}, "auto", "k2")
    with pytest.raises(ValueError, match=r"rerank_topk=3 must be >= max\(recall_at\)=10"):
        RetrievalConfig(data="x.tar", rerank_topk=3)


# ----------------------------------------------------------------------------- on shards
def write_caption_shards(out_dir, count=23):
    """Tiny retrieval shards: random 32 px images, 1-3 captions each, all three caption layouts."""
    from vlp.data_pipelines.shards import write_shards

    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
        captions = [f"picture {i} variant {j}" for j in range(1 + i % 3)]
        sample = {"__key__": f"{i:04d}", "png": buffer.getvalue(), "json": {"index": i}}
        if i % 3 == 0:
            sample["txt"] = json.dumps(captions)
        elif i % 3 == 1:
            sample["txt"] = "\n".join(captions)
        else:
            sample["txt"] = captions[0]
            sample["json"]["captions"] = captions
        samples.append(sample)
    return write_shards(samples, out_dir, "ret", max_count=8)


def tiny_model(tmp_path, digits_dir):
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    torch.manual_seed(0)
    config = load_config(tiny_config(tmp_path, digits_dir))
    return VLPModel(config.model).eval()


def dense_retrieval_reference(model, shard_dir):
    """R@k from one dense matrix of directly encoded images and captions."""
    preprocess, tokenizer = model.image.preprocess(train=False), model.text.tokenizer()
    images, captions, owner = [], [], []
    for shard in sorted(shard_dir.glob("ret-*.tar")):
        members = read_tar(shard)
        for key in sorted(members):
            sample = members[key]
            meta = json.loads(sample["json"])
            own = meta.get("captions") or (json.loads(sample["txt"]) if sample["txt"].startswith(b"[")
                                           else sample["txt"].decode().splitlines())
            owner += [len(images)] * len(own)
            captions += own
            images.append(preprocess(Image.open(io.BytesIO(sample["png"])).convert("RGB")))
    with torch.no_grad():
        image = model.encode_image(torch.stack(images))["image_embed"]
        text = model.encode_text(tokenizer(captions))["text_embed"]
    scores = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    positive = torch.tensor(owner)[None, :] == torch.arange(len(images))[:, None]
    i2t, t2i = dense_ranks(scores, positive), dense_ranks(scores.T, positive.T)
    out = {f"retrieval_i2t_r{k}": float((i2t < k).double().mean()) for k in (1, 5, 10)}
    out.update({f"retrieval_t2i_r{k}": float((t2i < k).double().mean()) for k in (1, 5, 10)})
    return out, len(images), len(captions)


def _retrieval_on_rank(rank, world_size, model_state, config_path, spec):
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    config = load_config(config_path)
    model = VLPModel(config.model)
    model.load_state_dict(model_state)
    evaluator = EVALUATORS.get("retrieval")(RetrievalConfig(data=spec, batch_size=4, chunk_size=5))
    return evaluator.run(model.eval(), EvalContext(rank=rank, world_size=world_size))


@pytest.mark.slow  # 2 gloo ranks
def test_retrieval_evaluator_matches_dense_and_two_ranks(tmp_path, digits_dir):
    model = tiny_model(tmp_path, digits_dir)
    write_caption_shards(tmp_path / "ret")
    spec = str(tmp_path / "ret" / "ret-{000000..000002}.tar")
    want, num_images, num_texts = dense_retrieval_reference(model, tmp_path / "ret")
    config = RetrievalConfig(data=spec, batch_size=4, chunk_size=5)
    got = EVALUATORS.get("retrieval")(config).run(model, EvalContext())
    assert got["retrieval_images"] == num_images == 23 and got["retrieval_texts"] == num_texts == 45
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    # Two gloo ranks, each embedding its share, give the same numbers.
    results = run_ranks(_retrieval_on_rank, 2, model.state_dict(), tmp_path / "tiny.yaml", spec)
    for result in results:
        for key, value in got.items():
            assert result[key] == pytest.approx(value, abs=1e-9), key


# ----------------------------------------------------------------------------- zero-shot
def test_clip_benchmark_name_files(tmp_path, digits_dir):
    import clip_benchmark.datasets as cb

    folder = __import__("pathlib").Path(cb.__file__).parent
    config = ZeroShotConfig(data=str(digits_dir / "digits-test-000000.tar"),
                            classnames=str(folder / "en_classnames.json"),
                            templates=str(folder / "en_zeroshot_classification_templates.json"), dataset="mnist")
    classnames, templates = resolve_names(config)
    assert classnames[:2] == json.loads((folder / "en_classnames.json").read_text())["mnist"][:2]
    assert templates == json.loads((folder / "en_zeroshot_classification_templates.json").read_text())["mnist"]
    assert class_embeddings_prompt(templates[0], "7") == 'a photo of the number: "7".'

    # Beside the shards, and in clip_benchmark's wds layout (metadata one folder above test/).
    config = ZeroShotConfig(data=str(digits_dir / "digits-test-000000.tar"))
    assert resolve_names(config)[0][0] == "zero"
    wds = clip_benchmark_layout(digits_dir, tmp_path / "wds")
    for data in (wds / "test" / "0.tar", wds):  # a shard, or the clip_benchmark folder itself
        names, templates = resolve_names(ZeroShotConfig(data=str(data)))
        assert names[0] == "zero" and templates[0] == "a photo of the number {c}."
    from vlp.train.evals.harness import resolve_shard_spec

    assert resolve_shard_spec(str(wds)) == str(wds / "test" / "0.tar")
    with pytest.raises(ConfigError, match="needs `dataset`"):
        resolve_names(ZeroShotConfig(data=config.data, classnames=str(folder / "en_classnames.json")))


def class_embeddings_prompt(template, name):
    """The prompt `class_embeddings` builds (clip_benchmark: template.format(c=name))."""
    return template.replace("{c}", name) if "{c}" in template else template.format(name)


def clip_benchmark_layout(digits_dir, out=None):
    """The clip_benchmark layout that `vlp shards build digits` writes beside the shards."""
    root = digits_dir / "clip_benchmark"
    assert (root / "test" / "nshards.txt").read_text().strip() == str(len(list(digits_dir.glob("digits-test-*.tar"))))
    return root


def _zeroshot_on_rank(rank, world_size, model_state, config_path, spec):
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    config = load_config(config_path)
    model = VLPModel(config.model)
    model.load_state_dict(model_state)
    evaluator = EVALUATORS.get("zeroshot")(ZeroShotConfig(data=spec, batch_size=50))
    return evaluator.run(model.eval(), EvalContext(rank=rank, world_size=world_size))


@pytest.mark.slow  # 2 gloo ranks
def test_zeroshot_two_ranks_equal_one(tmp_path, digits_dir):
    model = tiny_model(tmp_path, digits_dir)
    spec = str(digits_dir / "digits-test-000000.tar")
    one = EVALUATORS.get("zeroshot")(ZeroShotConfig(data=spec, batch_size=50)).run(model, EvalContext())
    assert one["zeroshot_samples"] == 359
    two = run_ranks(_zeroshot_on_rank, 2, model.state_dict(), tmp_path / "tiny.yaml", spec)
    for result in two:
        for key, value in one.items():
            assert result[key] == pytest.approx(value, abs=1e-9), key


def test_flair_checkpoint_retrieval_reranks_through_the_evaluator(tmp_path, digits_dir):
    """A FLAIR model end to end: the evaluator's text->image R@k with `rerank_topk` equal those of
    `FlairHead.pairwise_scores(topk=K)` on directly encoded images (tokens) and captions."""
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    tree = __import__("yaml").safe_load(tiny_config(tmp_path, digits_dir).read_text())
    tree["model"]["heads"] = {"flair": {"num_heads": 2}}
    tree["data"]["sub_captions"] = 2
    torch.manual_seed(0)
    model = VLPModel(load_config(tree=tree).model).eval()
    write_caption_shards(tmp_path / "ret")
    spec = str(tmp_path / "ret" / "ret-{000000..000002}.tar")
    got = EVALUATORS.get("retrieval")(RetrievalConfig(data=spec, batch_size=4, chunk_size=5, rerank_topk=10)).run(
        model, EvalContext())
    # Dense reference: FLAIR's own re-ranked score matrix.
    image_embed, image_tokens, text, owner = encoded_shards(model, tmp_path / "ret")
    with torch.no_grad():
        dense = model.objective.heads.flair.pairwise_scores(image_embed, text, image_tokens=image_tokens, topk=10)
    positive = owner[None, :] == torch.arange(len(image_embed))[:, None]
    t2i = dense_ranks(dense.T, positive.T)
    for k in (1, 5, 10):
        assert got[f"retrieval_t2i_r{k}"] == pytest.approx(float((t2i < k).double().mean()), abs=1e-9), k


def encoded_shards(model, shard_dir):
    """Image embeddings (N, E), tokens (N, P, E), caption embeddings (M, E) and owners (M,) of
    every sample, encoded in one batch (the evaluator's order: shards and keys sorted)."""
    import io
    import json

    from conftest import read_tar
    from PIL import Image

    from vlp.train.evals.retrieval import sample_captions

    preprocess, tokenizer = model.image.preprocess(train=False), model.text.tokenizer()
    images, captions, owner = [], [], []
    for shard in sorted(shard_dir.glob("ret-*.tar")):
        members = read_tar(shard)
        for key in sorted(members):
            own = sample_captions(members[key]["txt"].decode(), json.loads(members[key]["json"]), "auto")
            owner += [len(images)] * len(own)
            captions += own
            images.append(preprocess(Image.open(io.BytesIO(members[key]["png"])).convert("RGB")))
    with torch.no_grad():
        encoded = model.encode_image(torch.stack(images))
        text = model.encode_text(tokenizer(captions))["text_embed"]
    return encoded["image_embed"], encoded.get("image_tokens"), text, torch.tensor(owner)
