"""`vlp shards build csv:FILE` / `tsv:FILE`: a table of (image path, caption) rows.

Column names follow open_clip's CSV loader (`filepath`, `title`); `image`/`caption` are taken
when those are absent, and options `image_col`/`caption_col` name others. Relative image paths
are resolved against the table's folder. Other columns are kept in `{key}.json`.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterator, Optional

from vlp.data_pipelines.decode import image_member
from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.shards import progress, write_shards
from vlp.data_pipelines.sources.base import SOURCES

_IMAGE_COLUMNS = ("filepath", "image")
_CAPTION_COLUMNS = ("title", "caption")


@SOURCES.register("csv")
def build_csv(out_dir: Path, arg: str | None, **options: Any) -> dict:
    """Options: `image_col`, `caption_col`, `shard_size`, `prefix`, `delimiter` (default ",")."""
    return _build("csv", out_dir, arg, **{"delimiter": ",", **options})


@SOURCES.register("tsv")
def build_tsv(out_dir: Path, arg: str | None, **options: Any) -> dict:
    """Options: `image_col`, `caption_col`, `shard_size`, `prefix`, `delimiter` (default tab)."""
    return _build("tsv", out_dir, arg, **{"delimiter": "\t", **options})


def _build(
    name: str,
    out_dir: Path,
    arg: Optional[str],
    *,
    delimiter: str,
    image_col: Optional[str] = None,
    caption_col: Optional[str] = None,
    shard_size: int = 1000,
    prefix: Optional[str] = None,
) -> dict:
    if not arg:
        raise DataError(f"source {name!r} needs a file: {name}:FILE")
    table = Path(arg)
    if not table.is_file():
        raise DataError(f"{name} source: {table} not found")
    with open(table, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        columns = list(reader.fieldnames or [])
        image_col = _column(table, columns, image_col, _IMAGE_COLUMNS, "image_col")
        caption_col = _column(table, columns, caption_col, _CAPTION_COLUMNS, "caption_col")
        rows = list(reader)
    samples = _samples(table, rows, image_col, caption_col)
    paths = write_shards(progress(samples, total=len(rows), desc=f"{name} {table.name}", unit="row"),
                         out_dir, prefix or name, shard_size)
    return {"source": name, "table": str(table), "counts": {"train": len(rows)}, "shards": [str(p) for p in paths]}


def _column(table: Path, columns: list[str], chosen: Optional[str], defaults: tuple[str, ...], option: str) -> str:
    if chosen is not None:
        if chosen not in columns:
            raise DataError(f"{table}: no column {chosen!r} ({option}); columns are {columns}")
        return chosen
    for name in defaults:
        if name in columns:
            return name
    raise DataError(f"{table}: none of the columns {list(defaults)} found (set {option}); columns are {columns}")


def _samples(table: Path, rows: list[dict], image_col: str, caption_col: str) -> Iterator[dict[str, Any]]:
    for index, row in enumerate(rows):
        where = f"{table} row {index + 1}"  # 1-based data row, the header not counted
        image_path = Path((row.get(image_col) or "").strip())
        if not image_path.parts:
            raise DataError(f"{where}: empty {image_col!r}")
        if not image_path.is_absolute():
            image_path = table.parent / image_path
        if not image_path.is_file():
            raise DataError(f"{where}: image file {image_path} not found")
        caption = (row.get(caption_col) or "").strip()
        if not caption:
            raise DataError(f"{where}: empty caption in column {caption_col!r}")
        try:
            ext, data, width, height = image_member(image_path)
        except DataError as error:
            raise DataError(f"{where}: {error}") from None
        key = f"{index:09d}"
        meta = {column: value for column, value in row.items() if column not in (image_col, caption_col) and column}
        meta.update(key=key, caption=caption, width=width, height=height, source_path=str(row[image_col]))
        yield {"__key__": key, ext: data, "txt": caption, "json": meta}
