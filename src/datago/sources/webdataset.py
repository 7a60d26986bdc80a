"""WebDataset tar shards (``source_type: "webdataset"``), read by member offset.

    urls = expand_urls("https://host/train/shard-{000000..000099}.tar")
    write_index("data/shard-000000.tar")        # data/shard-000000.tar.idx.json

Samples and members
-------------------
A member's *key* is its path up to the first dot of its file name
(``a/b/cat.01.jpg``: key ``a/b/cat``, extension ``01.jpg``); members sharing a
key form one sample, as in the folder source: ``<key>.<reference_image_type>``
(else the first of jpg, jpeg, png, webp, bmp, gif) is the main image;
``<key>.mask.<img>`` / ``<key>.seg.<img>`` are masks; ``<key>.<name>.<img>``
additional images; ``<key>.json`` is merged into the attributes,
``<key>.txt``/``.cls`` and ``<key>.<name>.txt|json`` become attributes,
``<key>.npy``/``<key>.<name>.npy`` latents (NumPy arrays, ``batch["latents"]``).
The sample id is the key.  Other members are listed in the index but not read.

The index
---------
One small JSON file per shard lists its samples: the key, every member's name,
data offset and size, and the main image's width, height and format (read from
its header while the shard streams by).  With it the epoch plan works over
shards like over a folder (equal batches, synced buckets, resume), and every
member is read by offset: a seek in a local shard, an HTTP ``Range`` request on
a remote one.  ``datago index`` (``write_index``) puts it next to a local shard
as ``<shard>.idx.json``, or into a folder of your choice; the source looks there
(``index_dir``) and next to the shard (``<url>.idx.json``, also over HTTP).  A
shard without an index is streamed once at construction to build it, and the
result is cached in ``cache_dir`` (keyed by the shard URL's hash, never by member
names, so nothing in a tar chooses a path on disk).

An index records its shard's size.  A local shard's index, and an index this
source cached, are checked against the shard's size at construction and rebuilt
when it changed; every member read checks it too (a stat, or the total in the
``Content-Range`` of the reply), so an index published next to a remote shard
that changed fails each sample as ``stale_index`` instead of reading other
bytes at its old offsets.  A shard rewritten to the very same size (tar pads to
10 KiB records) is not detected.

A gzip-compressed shard (``.tar.gz``, ``.tgz``) has no offsets to seek to: read
with an index, it is decompressed once into ``cache_dir`` while its index is
built (the copy takes its decompressed size on disk; it and the index are kept
together and rebuilt together), and its members are read from that copy.
Streamed (``streaming: true``), it is decompressed on the fly.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import io
import json
import os
import re
import tarfile
import threading
import zlib
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import xxhash

from datago.errors import ConfigError, DatagoError, DecodeError
from datago.fetch import FetchError, Fetcher, Inline, Member, is_remote, redact
from datago.sources.base import SampleRef, Source
from datago.sources.filesystem import IMAGE_EXTENSIONS, MASK_NAMES
from datago.sources.sizes import FORMATS, SizesIndex, atomic_write, default_cache_dir

__all__ = ["WebDatasetSource", "assign_shards", "build_index", "expand_urls", "iter_shard",
           "write_index"]

INDEX_SUFFIX = ".idx.json"
INDEX_VERSION = 1
INDEX_THREADS = 16                # shard indexes fetched (or built) at once at construction
_BUILT_LOCK = threading.Lock()
_BRACE = re.compile(r"\{([^{}]*)\}")


def _expand_braces(pattern: str) -> List[str]:
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = r.group(1), r.group(2)
        width = len(a) if a.startswith("0") or len(a) == len(b) else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        options = body.split(",")
    out = []
    for opt in options:
        out.extend(_expand_braces(head + opt + tail))
    return out


def expand_urls(url) -> List[str]:
    """Shard locations: brace patterns (``{000..099}``, ``{a,b}``), local globs, lists."""
    items = [url] if isinstance(url, str) else list(url)
    out: List[str] = []
    for item in items:
        for one in _expand_braces(str(item)):
            if not is_remote(one) and any(c in one for c in "*?["):
                hits = sorted(_glob.glob(one))
                if not hits:
                    raise ConfigError(f"source_config.url: {one!r} matches no file")
                out.extend(hits)
            else:
                out.append(one)
    if not out:
        raise ConfigError("source_config.url: no shard")
    return out


def _split(name: str) -> Tuple[str, str]:
    """(key, extension) of a member name: the key ends at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ext if dot else ""


def _image_ext(ext: str) -> bool:
    return ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def _main_of(exts: Iterable[str], reference: str) -> Optional[str]:
    exts = list(exts)
    if reference in exts:
        return reference
    for e in IMAGE_EXTENSIONS:
        for x in exts:
            if x.lower() == e:
                return x
    candidates = [x for x in exts if _image_ext(x) and x.split(".")[0].lower() not in MASK_NAMES]
    return candidates[0] if candidates else None


class _Stream(io.RawIOBase):
    """A read-only file object over an iterator of byte chunks (a streamed download)."""

    def __init__(self, chunks):
        self._it = iter(chunks)
        self._buf = memoryview(b"")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._pos >= len(self._buf):
            try:
                self._buf = memoryview(next(self._it))
            except StopIteration:
                return 0
            self._pos = 0
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = self._buf[self._pos:self._pos + n]         # one copy, no re-slicing
        self._pos += n
        return n


class _Entry:
    """A member header of a streamed tar: ``name``, ``size``, ``offset`` (of its data
    in the uncompressed tar), ``isfile``; ``read(limit)`` gives its data (the first
    ``limit`` bytes) while the stream is at it."""

    __slots__ = ("name", "size", "offset", "isfile", "_tar")

    def __init__(self, name: str, size: int, offset: int, isfile: bool, tar: "_TarStream"):
        self.name, self.size, self.offset, self.isfile, self._tar = name, size, offset, isfile, tar

    def read(self, limit: Optional[int] = None) -> bytes:
        return self._tar.read_data(self, limit)


_ZERO_BLOCK = bytes(512)
_MAX_META_BYTES = 1 << 20          # a pax header or GNU long name is read whole: bounded
_PAX_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_NO_DATA_TYPES = (tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                  tarfile.BLKTYPE, tarfile.FIFOTYPE)


class _TarStream:
    """The members of a tar read front to back from a file object, each member's
    data read once, straight into its own bytes object.  (``tarfile``'s stream mode
    moves data through a 10 KiB buffer with a join and two slices per read: ~0.35
    ms of CPU per 380 KB sample.)  Headers are parsed by ``tarfile.TarInfo``
    (ustar, GNU, v7; checksums checked); pax extended headers (``path``,
    ``size``) and GNU long names apply to the next member, global pax headers to
    all that follow.  Sparse members are refused.  The archive ends at its first
    zero block; an invalid header, or data ending before that block, is
    ``tarfile.ReadError`` (``tarfile``'s stream mode ends silently at an invalid
    header after the first)."""

    def __init__(self, raw):
        self.raw = raw
        self.pos = 0                         # bytes consumed, in the uncompressed tar
        self._left = 0                       # data + padding of the current member not read
        self._current: Optional[_Entry] = None
        self._global: Dict[str, str] = {}

    def _read(self, n: int) -> bytes:
        data = self.raw.read(n)
        if len(data) != n:
            raise tarfile.ReadError(f"unexpected end of data at byte {self.pos + len(data)} "
                                    f"(wanted {n} more)")
        self.pos += n
        return data

    def _skip(self, n: int) -> None:
        while n > 0:
            got = len(self.raw.read(min(n, 1 << 20)))
            if got == 0:
                raise tarfile.ReadError(f"unexpected end of data at byte {self.pos}")
            self.pos += got
            n -= got

    def read_data(self, entry: _Entry, limit: Optional[int]) -> bytes:
        if entry is not self._current or self.pos != entry.offset:
            raise RuntimeError("a streamed tar member can be read once, while the stream is at it")
        n = entry.size if limit is None else min(limit, entry.size)
        data = self._read(n)
        self._left -= n
        return data

    @staticmethod
    def _pax(data: bytes) -> Dict[str, str]:
        """The records of a pax extended header (``"LEN key=value\\n"``)."""
        out: Dict[str, str] = {}
        pos = 0
        while pos < len(data) and data[pos] != 0:
            sp = data.find(b" ", pos)
            if sp < 0 or not data[pos:sp].isdigit():
                raise tarfile.ReadError("invalid pax header")
            length = int(data[pos:sp])
            rec = data[sp + 1:pos + length]
            if length <= sp - pos or not rec.endswith(b"\n") or b"=" not in rec:
                raise tarfile.ReadError("invalid pax header")
            k, _, v = rec[:-1].partition(b"=")
            out[k.decode("utf-8", "surrogateescape")] = v.decode("utf-8", "surrogateescape")
            pos += length
        return out

    def __iter__(self) -> Iterator[_Entry]:
        local: Dict[str, str] = {}
        while True:
            if self._left:
                self._skip(self._left)
                self._left = 0
            block = self.raw.read(512)
            if not block:
                raise tarfile.ReadError(f"the archive ends at byte {self.pos} without its "
                                        "end marker (truncated?)")
            if len(block) < 512:
                raise tarfile.ReadError(f"unexpected end of data in a header at byte {self.pos}")
            self.pos += 512
            if block == _ZERO_BLOCK:
                return
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            size = info.size
            padded = -(-size // 512) * 512
            if info.type in _PAX_TYPES + (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK) \
                    and size > _MAX_META_BYTES:
                raise tarfile.ReadError(f"a {size}-byte extended header (the limit is "
                                        f"{_MAX_META_BYTES}): not a sane tar")
            if info.type in _PAX_TYPES:
                rec = self._pax(self._read(padded)[:size])
                (self._global if info.type == tarfile.XGLTYPE else local).update(rec)
                continue
            if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
                data = self._read(padded)[:size]
                if info.type == tarfile.GNUTYPE_LONGNAME:
                    local["path"] = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            if info.type == tarfile.GNUTYPE_SPARSE:
                raise tarfile.ReadError(f"member {info.name!r} is a GNU sparse file (not supported)")
            fields = {**self._global, **local}
            local = {}
            name = fields.get("path", info.name)
            if "size" in fields:
                if not fields["size"].isdigit():
                    raise tarfile.ReadError(f"invalid pax size {fields['size']!r}")
                size = int(fields["size"])
                padded = -(-size // 512) * 512
            isfile = info.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
            if info.type in _NO_DATA_TYPES:
                padded = 0                      # (no data, whatever the size field: as tarfile)
            self._left = padded
            self._current = _Entry(name, size, self.pos, isfile, self)
            yield self._current


def _gunzip(chunks) -> Iterator[bytes]:
    """The decompressed pieces of a gzip stream given as chunks (CRC checked)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    for chunk in chunks:
        while chunk:
            out = d.decompress(chunk, 1 << 20)
            if out:
                yield out
            chunk = d.unconsumed_tail
            if d.eof:
                return                                   # (bytes after the gzip member: ignored)
    if not d.eof:
        raise EOFError("compressed shard ends before its end")


def is_gzipped(url: str) -> bool:
    return url.split("?")[0].endswith((".tar.gz", ".tgz"))


def _tee(chunks, write):
    for chunk in chunks:
        write(chunk)
        yield chunk


@contextlib.contextmanager
def _open_stream(url: str, fetcher: Fetcher, cache: bool = False, copy=None,
                 seen: Optional[Callable[[bytes], None]] = None):
    """The shard as a streamed tar (``_TarStream``; the bytes from ``fetcher.stream``:
    local reads, or HTTP/S3 resumed by ``Range`` when the connection breaks);
    ``.tar.gz``/``.tgz`` decompressed.  The stream is read to its end after the
    tar's end marker (record padding), so a ``cache``d stream counts as complete.
    ``copy``: a file the (decompressed) bytes are also written to; ``seen``: called
    with each chunk of the shard as stored (before decompression)."""
    chunks = fetcher.stream(url, cache=cache)
    if seen is not None:
        chunks = _tee(chunks, seen)
    if is_gzipped(url):
        chunks = _gunzip(chunks)
    if copy is not None:
        chunks = _tee(chunks, copy.write)
    raw = io.BufferedReader(_Stream(chunks), 1 << 16)
    yield _TarStream(raw)
    while raw.read(1 << 20):
        pass


def _ignored(key: str, ext: str) -> bool:
    """Members that are no sample's: no extension, hidden files, ``__key__``-style."""
    base = key.rpartition("/")[2]
    return not ext or not base or base.startswith(".") or key.startswith("__")


def iter_shard(url: str, fetcher: Optional[Fetcher] = None,
               counts: Optional[Dict[str, int]] = None) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """``(key, {extension: bytes})`` for each sample of a shard, read as a stream
    (consecutive members sharing a key form a sample, as WebDataset writes them).
    ``counts`` (optional) gets ``ignored_members``, and ``too_large_members``: a
    member is held in memory, so one over the fetcher's ``max_object_bytes`` is
    skipped.  ``FetchError`` when the bytes cannot be had, ``DatagoError`` when
    they are not a tar."""
    fetcher = fetcher or Fetcher()
    limit = fetcher.config.max_object_bytes
    key, parts = None, {}
    try:
        with _open_stream(url, fetcher, cache=True) as tar:
            for info in tar:
                if not info.isfile:
                    continue
                k, ext = _split(info.name)
                why = "ignored_members" if _ignored(k, ext) else \
                    "too_large_members" if info.size > limit else None
                if why is not None:
                    if counts is not None:
                        counts[why] = counts.get(why, 0) + 1
                    continue
                if k != key:
                    if key is not None:
                        yield key, parts
                    key, parts = k, {}
                parts[ext] = info.read()
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise DatagoError(f"{redact(url)}: not a readable tar shard ({e})") from None
    if key is not None:
        yield key, parts


def make_ref(key: str, locs: Dict[str, object], main: str) -> SampleRef:
    """The ``SampleRef`` of a sample from the locations of its members by extension
    (``main``: the main image's extension); the member conventions of the module
    docstring."""
    masks, images, texts, latents = [], [], [], []
    for ext in sorted(e for e in locs if e != main):
        loc = locs[ext]
        low = ext.lower()
        last = low.rsplit(".", 1)[-1]
        middle = ext.rsplit(".", 1)[0] if "." in ext else ""
        if _image_ext(ext):
            if middle.lower() in MASK_NAMES:
                masks.append((middle.lower(), loc))
            else:
                images.append((middle or low, loc))
        elif last in ("json", "txt", "cls"):
            texts.append((middle or ("" if last == "json" else last), loc))
        elif last in ("npy", "safetensors"):
            latents.append((middle or last, loc))
    return SampleRef(key, locs[main], tuple(masks), tuple(images), tuple(texts),
                     latents=tuple(latents))


def assign_shards(sizes: List[int], slots: int, order: Iterable[int]) -> List[List[int]]:
    """Whole shards to ``slots`` readers (rank x worker), balanced by size: the
    largest first (ties in ``order``, e.g. an epoch's shuffle), each to the reader
    with the fewest bytes so far (ties: the lowest slot); each reader's shards then
    in ``order``.  Every shard goes to exactly one reader; needs len(sizes) >= slots
    for every reader to get one."""
    import heapq
    rank_of = {s: i for i, s in enumerate(order)}
    by_size = sorted(rank_of, key=lambda s: (-sizes[s], rank_of[s]))
    heap = [(0, slot) for slot in range(slots)]
    out: List[List[int]] = [[] for _ in range(slots)]
    for s in by_size:
        load, slot = heapq.heappop(heap)
        out[slot].append(s)
        heapq.heappush(heap, (load + max(0, int(sizes[s])), slot))
    return [sorted(x, key=rank_of.__getitem__) for x in out]


def build_index(url: str, fetcher: Optional[Fetcher] = None,
                reference_image_type: str = "jpg", copy_to: Optional[str] = None) -> dict:
    """Stream one shard and return its index (see the module docstring).
    ``copy_to``: the shard's decompressed bytes are also written there (atomically;
    for a gzip-compressed shard, whose members are then read from the copy), and
    the index records their size as ``raw_size``."""
    from datago.image import read_header
    fetcher = fetcher or Fetcher()
    members: Dict[str, Dict[str, List[int]]] = {}
    sizes: Dict[Tuple[str, str], Tuple[int, int, int]] = {}   # (w, h, format) per image
    order: List[str] = []
    ignored = 0

    def size_of(head: bytes) -> Tuple[int, int, int]:
        try:
            info = read_header(head)
        except (DecodeError, ValueError):
            return 0, 0, 0
        h, w = info.display_size
        return w, h, FORMATS.index(info.format) if info.format in FORMATS else len(FORMATS) - 1

    def scan(tar: _TarStream) -> None:
        nonlocal ignored
        for info in tar:
            if not info.isfile:
                continue
            key, ext = _split(info.name)
            if _ignored(key, ext):
                ignored += 1
                continue
            if key not in members:
                members[key] = {}
                order.append(key)
            members[key][ext] = [info.offset, info.size]
            if _image_ext(ext):               # (read now: a shard's heads are not kept)
                sizes[(key, ext)] = size_of(info.read(65536))

    stored = [0]                          # the shard's size as stored

    def seen(chunk: bytes) -> None:
        stored[0] += len(chunk)

    def run(copy=None) -> None:
        with _open_stream(url, fetcher, copy=copy, seen=seen) as tar:
            scan(tar)

    raw_size = None
    try:
        if copy_to is None:
            run()
        else:
            atomic_write(copy_to, run)
            raw_size = os.path.getsize(copy_to)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise DatagoError(f"{redact(url)}: not a readable tar shard ({e})") from None
    except OSError as e:
        if isinstance(e, FetchError):
            raise
        raise FetchError(f"{redact(url)}: {e}", "read_error", redact(url)) from None
    samples = []
    for key in order:
        exts = members[key]
        main = _main_of(exts, reference_image_type)
        w, h, fmt = sizes.get((key, main), (0, 0, 0))
        samples.append({"key": key, "members": exts, "main": main,
                        "width": w, "height": h, "format": fmt})
    idx = {"version": INDEX_VERSION, "shard": os.path.basename(url.split("?")[0]),
           "reference_image_type": reference_image_type, "samples": samples,
           "ignored": ignored, "size": stored[0]}
    if raw_size is not None:
        idx["raw_size"] = raw_size
    return idx


def index_path_for(url: str, index_dir: Optional[str]) -> str:
    name = os.path.basename(url.split("?")[0]) + INDEX_SUFFIX
    if index_dir:
        return os.path.join(index_dir, name)
    return url.split("?")[0] + INDEX_SUFFIX


def write_index(url: str, out_dir: Optional[str] = None, fetcher: Optional[Fetcher] = None,
                reference_image_type: str = "jpg") -> str:
    """Build a shard's index and write it next to a local shard or into ``out_dir``."""
    if is_gzipped(url):
        raise ConfigError(f"{redact(url)} is gzip-compressed: its members cannot be read by "
                          f"offset, so it takes no index file (the source decompresses it into "
                          f"cache_dir and indexes that copy itself)")
    if out_dir is None and is_remote(url):
        raise ConfigError(f"{redact(url)} is remote: give a folder for its index (--out)")
    path = index_path_for(url, out_dir)
    idx = build_index(url, fetcher, reference_image_type)
    _atomic_write(path, json.dumps(idx, separators=(",", ":")).encode())
    return path


def _atomic_write(path: str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


class WebDatasetSource(Source):
    """Samples of tar shards, read by member offset (see the module docstring)."""

    kind = "webdataset"

    def __init__(self, url, *, reference_image_type: str = "jpg", index_dir: Optional[str] = None,
                 cache_dir: Optional[str] = None, fetcher: Optional[Fetcher] = None,
                 streaming: bool = False):
        self.shards = expand_urls(url)
        self.reference_image_type = reference_image_type
        self.fetcher = fetcher or Fetcher()
        self.root = "|".join(self.shards)
        self.skipped: Dict[str, int] = {}
        self.built = 0                       # shard indexes built by streaming (this run)
        self.streaming = streaming
        self._index_dir = index_dir
        self._cache = os.path.join(cache_dir or os.path.dirname(default_cache_dir()), "wds-index")
        self._shard_sizes: Optional[List[int]] = None
        keys, shard_of, parts = [], [], []
        width, height, fmt = [], [], []
        seen = set()
        found = [] if streaming else self._indexes()
        self._locs = [loc for _, loc in found]   # where each shard's members are read
        # and the size that file had when the index was made (-1: an older index)
        self._totals = [int(idx.get("raw_size" if loc != shard else "size", -1))
                        for (idx, loc), shard in zip(found, self.shards)]
        for s, (idx, _) in enumerate(found):
            if idx.get("ignored"):
                self._count("ignored_members", int(idx["ignored"]))
            for smp in idx["samples"]:
                key = smp["key"]
                if smp.get("main") is None:
                    self._count("no_image")
                    continue
                if key in seen:
                    self._count("duplicate_id")
                    continue
                seen.add(key)
                keys.append(key)
                shard_of.append(s)
                parts.append(smp["members"])
                main = smp["main"]
                parts[-1] = dict(parts[-1], __main__=main)
                width.append(int(smp.get("width", 0)))
                height.append(int(smp.get("height", 0)))
                fmt.append(int(smp.get("format", 0)))
        self._keys = keys
        self._shard_of = np.asarray(shard_of, dtype=np.int32)
        self._parts = parts
        self._sizes = SizesIndex(np.asarray(width, dtype=np.int32),
                                 np.asarray(height, dtype=np.int32),
                                 np.asarray(fmt, dtype=np.uint8))

    # ------------------------------------------------------------------ streaming
    def shard_sizes(self, threads: int = 16) -> List[int]:
        """Bytes per shard (a stat, or a one-byte ranged GET), to balance the
        assignment; a shard whose size cannot be had counts as the median."""
        if self._shard_sizes is None:
            from concurrent.futures import ThreadPoolExecutor

            def one(shard):
                try:
                    return self.fetcher.size(shard)
                except (FetchError, OSError):
                    return None
            with ThreadPoolExecutor(max(1, min(threads, len(self.shards)))) as pool:
                got = list(pool.map(one, self.shards))
            known = sorted(g for g in got if g is not None)
            median = known[len(known) // 2] if known else 1
            self._shard_sizes = [median if g is None else g for g in got]
        return self._shard_sizes

    def count_samples(self) -> int:
        """Samples in all shards, from their indexes (built by streaming a shard
        that has none, and cached): the first pass of a streaming epoch."""
        total = 0
        for shard in self.shards:
            idx, _ = self._index(shard, self._index_dir, self._cache, need_copy=False)
            total += sum(1 for smp in idx["samples"] if smp.get("main") is not None)
        return total

    def stream_refs(self, shard: int, counts: Dict[str, int]) -> Iterator[SampleRef]:
        """The samples of shard number ``shard`` as it streams by, their bytes in
        memory (``Inline``); samples without an image are counted in ``counts``."""
        url = self.shards[shard]
        for key, parts in iter_shard(url, self.fetcher, counts):
            main = _main_of(parts, self.reference_image_type)
            if main is None:
                counts["no_image"] = counts.get("no_image", 0) + 1
                continue
            name = key.rsplit("/", 1)[-1]
            locs = {ext: Inline(data, f"{name}.{ext}") for ext, data in parts.items()}
            yield make_ref(key, locs, main)

    def _count(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def _indexes(self) -> List[Tuple[dict, str]]:
        """Every shard's (index, location of its members), in shard order, fetched
        (or built) by up to ``INDEX_THREADS`` threads: a thousand remote shards cost
        a thousand requests, or a thousand shard streams when they have no index."""
        if len(self.shards) <= 1:
            return [self._index(s, self._index_dir, self._cache) for s in self.shards]
        from concurrent.futures import ThreadPoolExecutor
        threads = min(len(self.shards), INDEX_THREADS, self.fetcher.config.io_concurrency)
        with ThreadPoolExecutor(threads, thread_name_prefix="datago-index") as pool:
            return list(pool.map(lambda s: self._index(s, self._index_dir, self._cache),
                                 self.shards))

    def _index(self, shard: str, index_dir: Optional[str], cache: str,
               need_copy: bool = True) -> Tuple[dict, str]:
        """(index, location of the members): the shard itself, or for a gzip-compressed
        one its decompressed copy in the cache (built with the cached index, and used
        only with it: an index made elsewhere does not say which copy it matches).
        ``need_copy=False``: the index alone (the samples are counted, not read)."""
        key = xxhash.xxh64_hexdigest(shard.encode())
        cached = os.path.join(cache, key + INDEX_SUFFIX)
        copy = os.path.join(cache, key + ".tar") if is_gzipped(shard) else None
        candidates = []
        if copy is None:
            if index_dir:
                candidates.append(index_path_for(shard, index_dir))
            candidates.append(index_path_for(shard, None))
        candidates.append(cached)
        for c in candidates:
            data = self.fetcher.read_optional(c)
            if data is None:
                continue
            try:
                idx = json.loads(data)
            except ValueError:
                continue                     # a broken index is rebuilt
            if idx.get("version") != INDEX_VERSION or \
                    idx.get("reference_image_type", "jpg") != self.reference_image_type:
                continue
            if not self._current(idx, shard, c == cached):
                continue                     # made for another version of the shard
            if copy is not None and need_copy and not (
                    os.path.isfile(copy) and os.path.getsize(copy) == idx.get("raw_size")):
                continue
            return idx, copy or shard
        idx = build_index(shard, self.fetcher, self.reference_image_type,
                          copy_to=copy if need_copy else None)
        with _BUILT_LOCK:
            self.built += 1
        try:
            _atomic_write(cached, json.dumps(idx, separators=(",", ":")).encode())
        except OSError:
            pass
        return idx, copy or shard

    def _current(self, idx: dict, shard: str, ours: bool) -> bool:
        """Whether an index that records its shard's size was made for the shard as it
        is now: checked for local shards (a stat), and for a remote one when the
        index is our cached one (one size request; an index published next to
        a remote shard is checked as its members are read)."""
        size = idx.get("size")
        if not isinstance(size, int) or (is_remote(shard) and not ours):
            return True
        try:
            return self.fetcher.size(shard) == size
        except (FetchError, OSError):
            return True                      # (the reads will say what is wrong)

    def __len__(self) -> int:
        return len(self._keys)

    def sample_id(self, i: int) -> str:
        return self._keys[i]

    def _member(self, i: int, ext: str) -> Member:
        off, size = self._parts[i][ext]
        s = self._shard_of[i]
        return Member(self._locs[s], int(off), int(size),
                      f"{self._keys[i].rsplit('/', 1)[-1]}.{ext}", total=self._totals[s])

    def main_location(self, i: int) -> Member:
        return self._member(i, self._parts[i]["__main__"])

    def ref(self, i: int) -> SampleRef:
        exts = self._parts[i]
        locs = {e: self._member(i, e) for e in exts if e != "__main__"}
        return make_ref(self._keys[i], locs, exts["__main__"])

    def remote(self) -> bool:
        return any(is_remote(s) for s in (self.shards if self.streaming else self._locs))

    def known_sizes(self) -> SizesIndex:
        return self._sizes
