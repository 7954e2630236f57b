"""`vlp shards build folder:DIR`: a folder of images with same-stem caption sidecars.

`DIR/a/cat.jpg` + `DIR/a/cat.txt` (+ optional `DIR/a/cat.json`) become one sample
`{key}.jpg`, `{key}.txt`, `{key}.json` (img2dataset convention); the folder is walked
recursively in sorted order, so keys are stable across runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from vlp.data_pipelines.decode import IMAGE_SUFFIXES, image_member
from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.shards import progress, write_shards
from vlp.data_pipelines.sources.base import SOURCES


@SOURCES.register("folder")
def build(out_dir: Path, arg: str | None, *, shard_size: int = 1000, prefix: str = "folder") -> dict:
    """Options: `shard_size` (samples per tar), `prefix` (shard file name prefix)."""
    if not arg:
        raise DataError("source 'folder' needs a directory: folder:DIR")
    root = Path(arg)
    if not root.is_dir():
        raise DataError(f"folder source: {root} is not a directory")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise DataError(f"folder source: no {'/'.join(IMAGE_SUFFIXES)} images under {root}")
    samples = _samples(root, images)
    paths = write_shards(progress(samples, total=len(images), desc=f"folder {root}", unit="img"), out_dir, prefix, shard_size)
    return {"source": "folder", "root": str(root), "counts": {"train": len(images)}, "shards": [str(p) for p in paths]}


def _samples(root: Path, images: list[Path]) -> Iterator[dict[str, Any]]:
    for index, path in enumerate(images):
        caption_path = path.with_suffix(".txt")
        if not caption_path.is_file():
            raise DataError(f"folder source: {path} has no caption file {caption_path.name}")
        try:
            caption = caption_path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise DataError(f"folder source: {caption_path} is not UTF-8 text") from None
        if not caption:
            raise DataError(f"folder source: {caption_path} is empty")
        meta: dict[str, Any] = {}
        json_path = path.with_suffix(".json")
        if json_path.is_file():
            try:
                meta = json.loads(json_path.read_text(encoding="utf-8"))
            except ValueError as error:
                raise DataError(f"folder source: {json_path} is not valid JSON ({error})") from None
            if not isinstance(meta, dict):
                raise DataError(f"folder source: {json_path} must hold a JSON object")
        ext, data, width, height = image_member(path)
        key = f"{index:09d}"
        meta = {**meta, "key": key, "caption": caption, "width": width, "height": height,
                "source_path": str(path.relative_to(root))}
        yield {"__key__": key, ext: data, "txt": caption, "json": meta}
