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

The harness sits below the evaluator contract (`base.py`), which imports it: it knows an
evaluator only as the `Evaluation` it is handed, and owns the types every evaluator shares
(`EvalContext`, `Rows`, `EvalSource`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol

import torch

from vlp.core.collectives import all_reduce_max, gather_objects
from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.image_folder import ImageFolder, split_root
from vlp.data_pipelines.sharding import expand_urls

Rows = dict[str, Any]  # name -> a tensor (N, ...) or a list of N items


@dataclass
class EvalContext:
    """Where one evaluation runs: this rank of `world_size`, its device and the eval dtype of
    image inputs, where evaluators put PNGs (None: no files) and the training step."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    out_dir: Optional[Path] = None
    step: int = 0


def resolve_shard_spec(spec: str, split: str = "test") -> str:
    """A shard spec as given, or for a folder: clip_benchmark's webdataset layout
    (`DIR/{split}/nshards.txt` + `DIR/{split}/{0..n-1}.tar`), else every `*.tar` in it."""
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


@dataclass
class EvalSource:
    """Where an evaluator's samples come from: webdataset shards (a spec, a folder of `*.tar`,
    clip_benchmark's `DIR/{split}/nshards.txt` layout) or an image-folder tree (one folder per
    class, `data_pipelines/image_folder.py`).

    folders: where `classnames.txt` / `zeroshot_classification_templates.txt` may lie (beside
    the shards and one level up, or the tree's root and its parent); classnames: the tree's
    class folders (None for shards: labels are the shards' `.cls`)."""

    spec: str
    image_folder: Optional[ImageFolder] = None
    folders: tuple[Path, ...] = ()

    @property
    def classnames(self) -> Optional[list[str]]:
        return self.image_folder.classnames if self.image_folder is not None else None


def resolve_eval_source(spec: str, split: str = "test") -> EvalSource:
    """`spec` as an image-folder tree (`spec/split/<class>/` or `spec/<class>/`) when it is one,
    else as shards (`resolve_shard_spec`)."""
    root = split_root(spec, split) if Path(spec).is_dir() else None
    if root is not None:
        return EvalSource(spec=str(root), image_folder=ImageFolder.read(root), folders=(root, root.parent))
    shards = resolve_shard_spec(spec, split)
    shard_folder = Path(expand_urls(shards)[0]).parent
    return EvalSource(spec=shards, folders=(shard_folder, shard_folder.parent))


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


def eval_batches(source: EvalSource, model: Any, *, batch_size: int, rank: int = 0, world_size: int = 1,
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


def on_device(batch: dict, context: EvalContext) -> dict:
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
                batches: Iterable[dict], context: EvalContext) -> Rows:
    """`per_batch(model, batch)` over `batches` (in lockstep under ZeRO-3, a rank out of batches
    running one throwaway forward of each of `towers`) -> this rank's rows."""
    idle = idle_forwards(model, towers, context.device, context.dtype)
    parts = [per_batch(model, on_device(batch, context))
             for batch in lockstep(batches, zero3_partitioned(model), idle, context.device)]
    return concat_rows(parts)


class Evaluation(Protocol):
    """What `evaluate` asks of an evaluator (`base.Evaluator` is the one in vlp): its batch size and
    loader workers, the towers one `per_batch` runs, and the steps of `Evaluator`'s docstring."""

    towers: tuple[str, ...]
    config: Any  # an EvalConfig: batch_size, workers

    def source(self) -> Optional[EvalSource]: ...
    def preprocess(self, model: Any) -> Callable: ...
    def prepare(self, model: Any, context: EvalContext) -> None: ...
    def per_batch(self, model: Any, batch: dict) -> Rows: ...
    def reduce(self, rows: Rows, model: Any, context: EvalContext) -> dict[str, float]: ...


def evaluate(evaluator: Evaluation, model: Any, context: EvalContext) -> dict[str, float]:
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
