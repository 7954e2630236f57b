"""Raw webdataset samples from one tar shard, local or remote.

A sample is the dict {"__key__", "__url__", ext: bytes, ...} of the tar members that share a key
(webdataset's grouping rule). A shard that cannot be read to its end yields one marker
{"__bad__": "bad_shard", "__url__", "__detail__"} after the samples read before the damage, so
the loaders count it as bad instead of failing the run.
"""

from __future__ import annotations

import mmap
import re
import tarfile
from typing import Iterator, Optional

# webdataset's grouping rule: the key is the member path up to the first "." of its file name.
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")
_ZERO_BLOCK = bytes(512)


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def read_shard(url: str) -> Iterator[dict]:
    """Raw samples of one tar: {"__key__", "__url__", ext: bytes, ...}.

    An unreadable or truncated tar ends with one marker {"__bad__": "bad_shard", "__url__"},
    after the samples read before the damage (the sample being read when it hit is dropped).
    """
    current: Optional[dict] = None
    try:
        for name, data in _tar_members(url):
            match = _MEMBER_NAME.match(name)
            if match is None:
                continue
            key, ext = match.groups()
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            current[ext.lower()] = data
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        yield {"__bad__": "bad_shard", "__url__": url, "__detail__": f"{type(error).__name__}: {error}"}
        return
    if current is not None:
        yield current


def _tar_members(url: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files in a tar, in order. A local uncompressed tar is parsed
    straight from a memory map (tarfile's header parsing costs ~0.1 ms a member, a tenth of a
    small image's decode); anything else goes through webdataset's gopen and tarfile."""
    if is_local(url):
        path = local_path(url)
        with open(path, "rb") as handle:
            head = handle.read(6)
            if len(head) >= 6 and not head.startswith(_COMPRESSED_MAGIC):
                with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
                    yield from _mapped_members(view, path)
                return
    from webdataset.gopen import gopen

    with gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if member.isfile():
                yield member.name, tar.extractfile(member).read()


def _mapped_members(view: mmap.mmap, path: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files in the tar mapped at `view`; raises tarfile.ReadError on
    a bad checksum or a truncated member (see `_mapped_headers`)."""
    for name, start, end in _mapped_headers(view, path):
        yield name, view[start:end]


def _mapped_headers(view: mmap.mmap, path: str) -> Iterator[tuple[str, int, int]]:
    """Parse ustar/GNU/pax tar headers from `view` (POSIX.1-2001 layout): (name, body start, body
    end) of each regular file, bodies skipped. Raises tarfile.ReadError on a bad checksum or a
    truncated member."""
    offset, size = 0, len(view)
    long_name: Optional[str] = None
    while offset + 512 <= size:
        header = view[offset:offset + 512]
        if header == _ZERO_BLOCK:
            return  # end-of-archive marker
        stored = header[148:156].strip(b"\0 ")
        if not stored or int(stored, 8) != sum(header) - sum(header[148:156]) + 8 * 32:
            raise tarfile.ReadError(f"{path}: bad tar header checksum at byte {offset}")
        length = _tar_number(header[124:136])
        kind = header[156:157]
        start, end = offset + 512, offset + 512 + length
        if end > size:
            raise tarfile.ReadError(f"{path}: truncated member at byte {offset}")
        offset = start + (length + 511) // 512 * 512
        if kind == b"L":  # GNU long name of the next member
            long_name = view[start:end].rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if kind == b"x":  # pax extended header: its "path" names the next member
            long_name = _pax_path(view[start:end]) or long_name
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, global pax headers
            long_name = None
            continue
        name = long_name
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:262] == b"ustar" and header[345] != 0:
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                name = f"{prefix}/{name}"
        long_name = None
        yield name, start, end
    if offset < size:
        raise tarfile.ReadError(f"{path}: truncated header at byte {offset}")
    # Ending on a member boundary without the end-of-archive blocks: truncated (tarfile's stream
    # mode, which webdataset uses, says so too).
    raise tarfile.ReadError(f"{path}: no end-of-archive marker (truncated?)")


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes over 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


def _pax_path(records: bytes) -> Optional[str]:
    while records:
        length_text, _, rest = records.partition(b" ")
        length = int(length_text)
        record, records = records[len(length_text) + 1:length], records[length:]
        key, _, value = record.rstrip(b"\n").partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
    return None


def seekable(url: str) -> bool:
    """True for a local uncompressed tar, which `read_samples` can enter at any sample."""
    if not is_local(url):
        return False
    try:
        with open(local_path(url), "rb") as handle:
            head = handle.read(6)
    except OSError:
        return False
    return len(head) >= 6 and not head.startswith(_COMPRESSED_MAGIC)


class ShardIndex:
    """Where each sample of one local uncompressed tar lies, from its headers alone (bodies are
    never read: about a microsecond per member), so a reader can start at any sample.

    Samples are counted as `read_shard` counts them (its grouping by key, its long-name, checksum
    and truncation handling); `damage` is the bad-shard detail when the tar is damaged, in which
    case `samples` holds those before the damage (the one being read when it hit is dropped).
    Use as a context manager: the tar stays memory-mapped while it is open.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples: list[tuple[str, list[tuple[str, int, int]]]] = []  # (key, [(ext, start, end)])
        self.damage: Optional[str] = None
        self._handle = open(local_path(url), "rb")
        try:
            self._view = mmap.mmap(self._handle.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as error:  # an empty file cannot be mapped
            self._view = None
            self.damage = f"{type(error).__name__}: {error}"
            return
        try:
            for name, start, end in _mapped_headers(self._view, local_path(url)):
                match = _MEMBER_NAME.match(name)
                if match is None:
                    continue
                key, ext = match.groups()
                if not self.samples or self.samples[-1][0] != key:
                    self.samples.append((key, []))
                self.samples[-1][1].append((ext.lower(), start, end))
        except (tarfile.TarError, ValueError) as error:
            self.damage = f"{type(error).__name__}: {error}"
            self.samples = self.samples[:-1]

    def __len__(self) -> int:
        return len(self.samples)

    def sample(self, index: int) -> dict:
        key, members = self.samples[index]
        sample = {"__key__": key, "__url__": self.url}
        for ext, start, end in members:
            sample[ext] = self._view[start:end]
        return sample

    def close(self) -> None:
        if self._view is not None:
            self._view.close()
        self._handle.close()

    def __enter__(self) -> "ShardIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_samples(url: str, start: int = 0, stop: Optional[int] = None, step: int = 1) -> Iterator[tuple[int, dict]]:
    """(index, raw sample) for samples `start, start + step, ...` below `stop` of one tar, indexed
    as `read_shard` counts them; when the range runs into a damaged tar's end, (-1, its bad-shard
    marker) last.

    A local uncompressed tar is entered at `start` through its `ShardIndex`; any other URL
    (`pipe:`, http, compressed) is streamed from its start and the samples before `start` are
    dropped, which still reads no further back than this one shard.
    """
    if seekable(url):
        try:
            index = ShardIndex(url)
        except OSError as error:
            yield -1, {"__bad__": "bad_shard", "__url__": url, "__detail__": f"{type(error).__name__}: {error}"}
            return
        with index:
            end = len(index) if stop is None else min(stop, len(index))
            for position in range(start, end, step):
                yield position, index.sample(position)
            if index.damage is not None and (stop is None or stop > len(index)):
                yield -1, {"__bad__": "bad_shard", "__url__": url, "__detail__": index.damage}
        return
    position = 0
    for sample in read_shard(url):
        if "__bad__" in sample:
            yield -1, sample
            return
        if stop is not None and position >= stop:
            return
        if position >= start and (position - start) % step == 0:
            yield position, sample
        position += 1


def read_picked(url: str, indices: list[int]) -> dict[int, dict]:
    """The raw samples of one tar at `indices` (sample index -> sample); any the tar no longer
    holds are left out. One header index (local) or one stream up to the last index (remote)."""
    wanted = set(indices)
    if not wanted:
        return {}
    if seekable(url):
        try:
            with ShardIndex(url) as index:
                return {position: index.sample(position) for position in sorted(wanted) if position < len(index)}
        except OSError:
            return {}
    return {position: sample for position, sample in read_samples(url, 0, max(wanted) + 1)
            if position in wanted}
