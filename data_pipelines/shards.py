"""Writing webdataset tar shards in the img2dataset convention, atomically.

A sample is a dict: "__key__" (str) plus one entry per file extension, e.g. "jpg"/"png" (bytes),
"txt" (str), "json" (dict), "cls" (int), "npy" (bytes). Each shard is written to a temporary
name and renamed when complete, so a crash never leaves a truncated `.tar` under a real name;
`sizes.json` (shard file name -> sample count, the img2dataset/open_clip convention) is rewritten
atomically too.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Any, Iterable

from vlp.core.errors import DataError
from vlp.core.files import atomic_write


def _encode(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (int, float)):
        return str(value).encode("utf-8")
    if isinstance(value, (dict, list)):
        return json.dumps(value).encode("utf-8")
    raise TypeError(f"cannot encode {type(value).__name__} into a shard member")


atomic_write_text = atomic_write  # the old name, still imported by curate/


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | Path,
    prefix: str,
    max_count: int = 1000,
) -> list[Path]:
    """Write `samples` into `out_dir/{prefix}-{000000}.tar ...`; returns the shard paths.

    Updates `out_dir/sizes.json` with the count of every shard written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes_path = out_dir / "sizes.json"
    sizes = json.loads(sizes_path.read_text()) if sizes_path.exists() else {}
    paths: list[Path] = []
    tar = None
    count = 0
    tmp_path = final_path = None

    def close() -> None:
        nonlocal tar
        if tar is None:
            return
        tar.close()
        os.replace(tmp_path, final_path)
        sizes[final_path.name] = count
        paths.append(final_path)
        tar = None

    now = time.time()
    try:
        for sample in samples:
            if tar is None or count >= max_count:
                close()
                final_path = out_dir / f"{prefix}-{len(paths):06d}.tar"
                tmp_path = out_dir / f".{final_path.name}.tmp"
                tar = tarfile.open(tmp_path, "w")
                count = 0
            key = str(sample["__key__"])
            if "/" in key or "." in key or not key:
                raise DataError(f"sample key {key!r} must be non-empty, without '/' or '.'")
            for ext, value in sample.items():
                if ext.startswith("__"):
                    continue
                data = _encode(value)
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), now, 0o644
                tar.addfile(info, io.BytesIO(data))
            count += 1
        close()
    except BaseException:
        # The samples failed mid-shard (bad input, Ctrl-C): drop the partial shard, and still
        # record the shards already completed so sizes.json matches the tars on disk.
        if tar is not None:
            tar.close()
            tmp_path.unlink(missing_ok=True)
        raise
    finally:
        atomic_write(sizes_path, json.dumps(sizes, indent=1, sort_keys=True))
    return paths


def progress(iterable, **kwargs):
    """tqdm on stderr: a live bar on a terminal, a line every 10 s in logs (CI, Slurm)."""
    import sys

    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(iterable, mininterval=0.1 if tty else 10.0, dynamic_ncols=tty, ascii=not tty, **kwargs)
