"""The one evaluation harness: reading, device, dtype, eval mode, ZeRO-3 lockstep and gathering.

An evaluator says what it computes per batch and how it reduces (`Evaluator.per_batch`,
`Evaluator.reduce`); `evaluate` does the rest:

1. eval mode and `torch.no_grad()` for the whole evaluation, the model's mode restored after;
2. `prepare` (state every batch shares, e.g. class embeddings: the same forwards on every rank);
3. this rank's share of the eval data (`eval_batches`: webdataset shards dealt over ranks, or an
   image-folder tree), each batch's "image" moved to the rank's device and dtype, "text" to its
   device;
4. `per_batch(model, batch)` -> rows (tensors or lists, first dimension the batch's samples or
   pairs), in lockstep under ZeRO-3: there every forward all-gathers the layer's partitioned
   weights, so a rank whose share ran out (or that has none) runs one throwaway forward per tower
   the evaluator's batches use (`Evaluator.towers`) until every rank is done;
5. `reduce(rows, model, context)` with this rank's rows concatenated; `gather_rows` gives every
   rank's rows in rank order, the sums are `all_reduce_sum`'s.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

import torch

from vlp.core.collectives import all_reduce_max, gather_objects

if TYPE_CHECKING:
    from vlp.train.evals.base import EvalContext, Evaluator
    from vlp.train.evals.common import EvalSource

Rows = dict[str, Any]  # name -> a tensor (N, ...) or a list of N items


@contextmanager
def evaluating(model: Any) -> Iterator[None]:
    """Eval mode and no autograd inside; the model's own mode restored after (even on error)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def zero3_partitioned(model: Any) -> bool:
    """True when DeepSpeed ZeRO-3 partitions the weights: then every forward is a collective
    (it all-gathers the layer's weights), so every rank must run the same number of them."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def lockstep(items: Iterable[Any], in_lockstep: bool, idle: Callable[[], Any],
             device: torch.device = torch.device("cpu")) -> Iterator[Any]:
    """`items`, but under ZeRO-3 keep going until every rank is done, calling `idle()` (the
    throwaway forwards of one item) on a rank whose own items ran out, so the ranks' collectives
    pair up. `device`: where the collective's flag lives (the rank's GPU under NCCL)."""
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


def idle_forwards(model: Any, towers: tuple[str, ...], device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    """One throwaway forward of each tower in `towers` ("image": a one-sample input of the tower's
    shape; "text": the empty caption), in that order: what a batch's `per_batch` runs."""
    def idle() -> None:
        for tower in towers:
            if tower == "image":
                model.encode_image(torch.zeros((1, *model.image.input_shape()), device=device, dtype=dtype))
            elif tower == "text":
                model.encode_text(model.text.tokenizer()([""]).to(device))
            else:
                raise ValueError(f"evaluator towers: {tower!r} is not 'image' or 'text'")
    return idle


def encode_texts_lockstep(model: Any, texts: list[str], device: torch.device, in_lockstep: bool,
                          batch_size: int = 256) -> torch.Tensor:
    """Raw text embeddings (N, E) fp32 of this rank's own `texts`, whose batch count may differ
    between ranks (each rank's own captions): in lockstep under ZeRO-3."""
    tokenizer = model.text.tokenizer()
    chunks = (texts[start : start + batch_size] for start in range(0, len(texts), batch_size))
    idle = idle_forwards(model, ("text",), device, torch.float32)
    out = [model.encode_text(tokenizer(chunk).to(device))["text_embed"].float()
           for chunk in lockstep(chunks, in_lockstep, idle, device)]
    return torch.cat(out) if out else torch.zeros(0, model.config.embed_dim, device=device)


def eval_batches(source: "EvalSource", model: Any, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 workers: int = 0, preprocess: Optional[Callable] = None) -> Iterable[dict]:
    """This rank's eval batches of `source` (shards dealt over ranks, or an image-folder tree),
    preprocessed by `preprocess` (default: the image tower's eval preprocess)."""
    preprocess = preprocess or model.image.preprocess(train=False)
    tokenizer = model.text.tokenizer()
    if source.image_folder is not None:
        return source.image_folder.batches(preprocess=preprocess, tokenizer=tokenizer, batch_size=batch_size,
                                           rank=rank, world_size=world_size)
    from vlp.data_pipelines.loader import build_eval_loader

    return build_eval_loader(source.spec, preprocess=preprocess, tokenizer=tokenizer, batch_size=batch_size,
                             rank=rank, world_size=world_size, workers=workers)


def on_device(batch: dict, context: "EvalContext") -> dict:
    """The batch with "image" on the rank's device in its dtype and "text" on the device; the
    rest (labels, keys, captions, meta) stays where the loader put it."""
    moved = dict(batch)
    moved["image"] = batch["image"].to(context.device, context.dtype)
    if isinstance(batch.get("text"), torch.Tensor):
        moved["text"] = batch["text"].to(context.device)
    return moved


def concat_rows(parts: list[Rows]) -> Rows:
    """Per-batch rows -> one Rows: tensors concatenated along dim 0, lists joined."""
    rows: Rows = {}
    for part in parts:
        for name, value in part.items():
            rows.setdefault(name, []).append(value)
    return {name: torch.cat(values) if isinstance(values[0], torch.Tensor) else [x for v in values for x in v]
            for name, values in rows.items()}


def gather_rows(rows: Rows, names: Optional[Iterable[str]] = None) -> Rows:
    """Every rank's rows of `names` (default: all) in rank order, tensors on the CPU. A rank with
    no rows (no batches) sends nothing; every rank must call this."""
    names = list(rows) if names is None else list(names)
    local = {name: rows[name].cpu() if isinstance(rows[name], torch.Tensor) else rows[name]
             for name in names if name in rows}
    parts = gather_objects([local])  # one dict per rank; an idle rank's is {}
    return concat_rows([part for part in parts if part])


def run_batches(per_batch: Callable[[Any, dict], Rows], towers: tuple[str, ...], model: Any,
                batches: Iterable[dict], context: "EvalContext") -> Rows:
    """`per_batch(model, batch)` over `batches` (in lockstep under ZeRO-3, a rank out of batches
    running one throwaway forward of each of `towers`) -> this rank's rows."""
    idle = idle_forwards(model, towers, context.device, context.dtype)
    parts = [per_batch(model, on_device(batch, context))
             for batch in lockstep(batches, zero3_partitioned(model), idle, context.device)]
    return concat_rows(parts)


def evaluate(evaluator: "Evaluator", model: Any, context: "EvalContext") -> dict[str, float]:
    """One evaluation: eval mode, `prepare`, this rank's batches through `per_batch`, `reduce`."""
    model = getattr(model, "module", model)
    with evaluating(model):
        evaluator.prepare(model, context)
        source = evaluator.source()
        rows: Rows = {}
        if source is not None:
            batches = eval_batches(source, model, batch_size=evaluator.config.batch_size, rank=context.rank,
                                   world_size=context.world_size, workers=evaluator.config.workers,
                                   preprocess=evaluator.preprocess(model))
            rows = run_batches(evaluator.per_batch, evaluator.towers, model, batches, context)
        return evaluator.reduce(rows, model, context)
