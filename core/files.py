"""Writing files and folders atomically: a reader (another rank, a requeued job, `vlp status`, a
resume after a crash) sees the old version or the whole new one, never a part."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional


def atomic_write(path: Path | str, data: str | bytes, mode: Optional[int] = None) -> Path:
    """Write `data` (text as UTF-8, or bytes) to `path` through a temporary file in the same
    folder (so `os.replace` stays on one file system and is atomic); `mode`: its permission bits.
    The temporary name is unique per call, so two processes writing one path never share it."""
    path = Path(path)
    # A name of its own (pid + random) opened with "x": created 0666 minus the umask, like open().
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as out:
            out.write(data.encode("utf-8") if isinstance(data, str) else data)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_folder(path: Path | str) -> Iterator[Path]:
    """Fill the yielded temporary folder (beside `path`); on success it replaces `path` (an
    existing folder there is removed first), on any error it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

