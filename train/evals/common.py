"""Helpers shared by evaluators: the scoring head, batched class embeddings, rank reductions."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch

from vlp.core.collectives import all_reduce_max


def scoring_head(model: Any) -> Any:
    """The head whose geometry scores zero-shot and retrieval: the first (in config order) that
    declares `scores_embeddings` (cosine by default, a head's own geometry where it overrides
    `pairwise_scores`)."""
    for head in model.objective.heads.values():
        if head.scores_embeddings:
            return head
    return next(iter(model.objective.heads.values()))


def patch_cosine(patch_tokens: torch.Tensor, sentences: torch.Tensor) -> torch.Tensor:
    """Cosine of each sentence (Q, E) with every patch token (Q, P, E) of its own image -> (Q, P), fp32.

    The head-free pointing baseline: grounding's `patch` method and the CT evaluator's pointing."""
    patches = torch.nn.functional.normalize(patch_tokens.float(), dim=-1)
    return torch.einsum("qpe,qe->qp", patches, torch.nn.functional.normalize(sentences.float(), dim=-1))


def encode_texts(model: Any, texts: list[str], device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Raw text embeddings (N, E) of `texts`, in batches, fp32."""
    tokenizer = model.text.tokenizer()
    out = []
    for start in range(0, len(texts), batch_size):
        ids = tokenizer(texts[start : start + batch_size]).to(device)
        out.append(model.encode_text(ids)["text_embed"].float())
    return torch.cat(out) if out else torch.zeros(0, model.objective.heads[next(iter(model.objective.heads))].embed_dim)


def class_embeddings(
    model: Any, classnames: list[str], templates: list[str], device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """(C, E) class embeddings: every template for every class, encoded in batches of prompts
    (not one class at a time), then averaged by the scoring head's own rule."""
    prompts = [t.replace("{c}", name) if "{c}" in t else t.format(name) for name in classnames for t in templates]
    embeds = encode_texts(model, prompts, device, batch_size)  # (C*T, E)
    embeds = embeds.reshape(len(classnames), len(templates), -1)  # (C, T, E)
    return scoring_head(model).prompt_ensemble(embeds)


def zero3_partitioned(model: Any) -> bool:
    """True when DeepSpeed ZeRO-3 partitions the weights: then every forward is a collective
    (it all-gathers the layer's weights), so every rank must run the same number of them."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def lockstep(items: Iterable[Any], in_lockstep: bool, idle: Callable[[], Any],
             device: torch.device = torch.device("cpu")) -> Iterator[Any]:
    """`items`, but under ZeRO-3 keep going until every rank is done, calling `idle()` (one
    throwaway forward) on a rank whose own items ran out, so the ranks' collectives pair up.
    `device`: where the collective's flag lives (the rank's GPU under NCCL)."""
    iterator = iter(items)
    while True:
        item = next(iterator, None)
        if in_lockstep:
            busy = all_reduce_max(torch.tensor([item is not None], dtype=torch.long, device=device))
            if not busy.item():
                return
            if item is None:
                idle()
                continue
        elif item is None:
            return
        yield item


def idle_image_forward(model: Any, device: torch.device, dtype: torch.dtype) -> Callable[[], Any]:
    """A one-sample image forward of the tower's input shape (for `lockstep`)."""
    shape = (1, *model.image.input_shape())
    return lambda: model.encode_image(torch.zeros(shape, device=device, dtype=dtype))


def encode_texts_lockstep(model: Any, texts: list[str], device: torch.device, in_lockstep: bool,
                          batch_size: int = 256) -> torch.Tensor:
    """`encode_texts` whose batch count may differ between ranks (each rank's own captions)."""
    tokenizer = model.text.tokenizer()
    chunks = (texts[start : start + batch_size] for start in range(0, len(texts), batch_size))
    idle = lambda: model.encode_text(tokenizer([""]).to(device))  # noqa: E731
    out = [model.encode_text(tokenizer(chunk).to(device))["text_embed"].float()
           for chunk in lockstep(chunks, in_lockstep, idle, device)]
    return torch.cat(out) if out else torch.zeros(0, model.config.embed_dim, device=device)


def resolve_shard_spec(spec: str, split: str = "test") -> str:
    """A shard spec as given, or for a folder: clip_benchmark's webdataset layout
    (`DIR/{split}/nshards.txt` + `DIR/{split}/{0..n-1}.tar`), else every `*.tar` in it."""
    from pathlib import Path

    from vlp.data_pipelines.errors import DataError

    folder = Path(spec)
    if not folder.is_dir():
        return spec
    nshards = folder / split / "nshards.txt"
    if nshards.is_file():
        count = int(nshards.read_text().strip())
        return str(folder / split / f"{{0..{count - 1}}}.tar") if count > 1 else str(folder / split / "0.tar")
    tars = sorted(str(path) for path in folder.glob("*.tar"))
    if not tars:
        raise DataError(f"{folder}: no {split}/nshards.txt (clip_benchmark layout) and no .tar shards")
    return "::".join(tars)
