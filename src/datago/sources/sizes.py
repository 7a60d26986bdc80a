"""The sizes index: width, height (after EXIF orientation) and format of every
sample's main image, which is what the epoch plan needs to put samples into
buckets before reading any pixels.

Sources that know sizes (an index file, an API that returns them) fill a
``SizesIndex`` directly.  Local files are scanned: each file's header (the first
64 KiB, the whole file when the header runs longer) is parsed by a thread pool
(``read_header`` releases the GIL), and the result is cached on disk so that the
next run only rescans what changed.

The cache
---------
One file per root folder, ``<cache_dir>/sizes-<xxh64 of the absolute root>.npz``,
with one row per file: the id hash, size in bytes, modification time (ns), width,
height and format code.  A file is rescanned when it is new or its size or mtime
changed; rows of removed files are dropped on the next save.  Files whose header
cannot be read are cached too (format code 0), so a corrupt file is not rescanned
every run -- and still counted every run.  Writes are atomic (a temporary file
renamed over the old one) and serialised by an ``flock`` on a lock file, so the
ranks of a node that start together scan once: the first takes the lock and
scans, the others then find everything in the cache.  A missing or unwritable
cache folder only costs the rescan (with one warning); a cache file that cannot
be parsed is ignored and rewritten.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import xxhash

from datago.errors import DecodeError

__all__ = ["FORMATS", "HEAD_BYTES", "SizesIndex", "default_cache_dir", "scan_files",
           "scan_source"]

FORMATS = ("", "jpeg", "png", "webp", "bmp", "gif", "tiff")
"""Format codes of the index; code 0 marks a file whose header could not be read."""

HEAD_BYTES = 65536
_CACHE_VERSION = 1
_CHUNK = 256


@dataclass
class SizesIndex:
    """Per sample (listing order): display width/height and a format code (0: unreadable)."""

    width: np.ndarray       # int32 (N,)
    height: np.ndarray      # int32 (N,)
    format: np.ndarray      # uint8 (N,)
    scanned: int = 0        # headers parsed by this build (cache misses)
    cached: int = 0         # rows taken from the cache
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.width)

    @property
    def readable(self) -> np.ndarray:
        return self.format > 0

    @property
    def unreadable(self) -> int:
        return int((self.format == 0).sum())

    @classmethod
    def from_arrays(cls, width, height, fmt=None) -> "SizesIndex":
        w = np.asarray(width, dtype=np.int32)
        h = np.asarray(height, dtype=np.int32)
        f = (np.where((w > 0) & (h > 0), 1, 0) if fmt is None else np.asarray(fmt)).astype(np.uint8)
        return cls(w, h, f)


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "datago", "sizes")


def _format_code(name: str) -> int:
    name = name.lower()
    return FORMATS.index(name) if name in FORMATS else len(FORMATS) - 1


def local_head(path: str, whole: bool = False) -> bytes:
    """The first HEAD_BYTES of a local file (all of it with ``whole``)."""
    with open(path, "rb") as f:
        return f.read() if whole else f.read(HEAD_BYTES)


def _header(path, head: Callable = local_head):
    """(height, width, format code) after orientation; (0, 0, 0) when unreadable."""
    from datago.image import read_header
    try:
        data = head(path)
        try:
            info = read_header(data)
        except DecodeError:
            if len(data) < HEAD_BYTES:
                raise
            info = read_header(head(path, whole=True))   # a header longer than 64 KiB
        h, w = info.display_size
        if w <= 0 or h <= 0:
            return 0, 0, 0
        return h, w, _format_code(info.format)
    except (OSError, DecodeError, ValueError):          # FetchError is an OSError
        return 0, 0, 0


def _stat_all(paths: Sequence, local: bool = True):
    size = np.zeros(len(paths), dtype=np.int64)
    mtime = np.zeros(len(paths), dtype=np.int64)
    if not local:                   # remote objects: keyed by their URL (id hash) alone
        return size, mtime
    for i, p in enumerate(paths):
        try:
            st = os.stat(p)
        except OSError:
            size[i] = -1
            continue
        size[i] = st.st_size
        mtime[i] = st.st_mtime_ns
    return size, mtime


@contextmanager
def _locked(path: Optional[str]):
    """An exclusive flock on ``path`` (None or an unusable path: no lock)."""
    fd = None
    if path is not None:
        try:
            import fcntl
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except (OSError, ImportError):
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)                # closing releases the lock


def _load_cache(path: str) -> Optional[Dict[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != _CACHE_VERSION:
                return None
            d = {k: z[k] for k in ("hash", "size", "mtime", "width", "height", "format")}
    except FileNotFoundError:
        return None
    except Exception as e:          # truncated, foreign or corrupt file: rebuild it
        warnings.warn(f"datago: ignoring unreadable sizes cache {path} ({e}); rescanning",
                      RuntimeWarning, stacklevel=4)
        return None
    n = len(d["hash"])
    if any(len(v) != n for v in d.values()):
        return None
    order = np.argsort(d["hash"], kind="stable")
    return {k: v[order] for k, v in d.items()}


def atomic_write(path: str, write: Callable) -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename it over
    ``path``: readers see the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".datago-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _save_cache(path: str, arrays: Dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda f: np.savez(f, version=np.int64(_CACHE_VERSION), **arrays))


def scan_files(root: str, paths: Sequence[str], hashes: np.ndarray, *,
               cache_dir: Optional[str] = None, use_cache: bool = True,
               threads: Optional[int] = None, progress: Optional[bool] = None,
               on_scanned: Optional[Callable[[int], None]] = None,
               head: Optional[Callable] = None) -> SizesIndex:
    """Sizes of ``paths`` (absolute, listing order; ``hashes`` their id hashes).

    ``cache_dir``: folder of the cache (default ``default_cache_dir()``);
    ``use_cache=False`` neither reads nor writes it.  ``progress``: a progress bar
    on stderr (default: when stderr is a terminal and there is much to scan).
    ``head(location, whole=False)``: reads the first ``HEAD_BYTES`` (or all) of a
    location; given for remote sources, whose rows are then cached by id alone
    (no size or mtime to compare).
    """
    t0 = time.perf_counter()
    n = len(paths)
    hashes = np.asarray(hashes, dtype=np.uint64)
    if len(hashes) != n:
        raise ValueError(f"{len(hashes)} hashes for {n} paths")
    cache_path = lock_path = None
    if use_cache:
        folder = cache_dir or default_cache_dir()
        key = xxhash.xxh64_hexdigest(os.path.abspath(root).encode("utf-8", "surrogateescape"))
        try:
            os.makedirs(folder, exist_ok=True)
            if not os.access(folder, os.W_OK):
                raise PermissionError(f"{folder} is not writable")
            cache_path = os.path.join(folder, f"sizes-{key}.npz")
            lock_path = cache_path + ".lock"
        except OSError as e:
            warnings.warn(f"datago: the sizes cache is off ({e}); headers are rescanned "
                          "every run (set source_config.cache_dir to a writable folder)",
                          RuntimeWarning, stacklevel=3)
    with _locked(lock_path):
        size, mtime = _stat_all(paths, local=head is None)
        width = np.zeros(n, dtype=np.int32)
        height = np.zeros(n, dtype=np.int32)
        fmt = np.zeros(n, dtype=np.uint8)
        hit = np.zeros(n, dtype=bool)
        cache = _load_cache(cache_path) if cache_path else None
        if cache is not None and len(cache["hash"]):
            pos = np.searchsorted(cache["hash"], hashes)
            pos = np.minimum(pos, len(cache["hash"]) - 1)
            hit = ((cache["hash"][pos] == hashes) & (cache["size"][pos] == size)
                   & (cache["mtime"][pos] == mtime) & (size >= 0))
            width[hit] = cache["width"][pos[hit]]
            height[hit] = cache["height"][pos[hit]]
            fmt[hit] = cache["format"][pos[hit]]
        todo = np.flatnonzero(~hit & (size >= 0))
        if len(todo):
            _scan(paths, todo, width, height, fmt, threads, progress, on_scanned,
                  head or local_head)
        if cache_path is not None and (len(todo) or cache is None or len(cache["hash"]) != n
                                       or not hit.all()):
            try:
                _save_cache(cache_path, {"hash": hashes, "size": size, "mtime": mtime,
                                         "width": width, "height": height, "format": fmt})
            except OSError as e:
                warnings.warn(f"datago: could not write the sizes cache {cache_path}: {e}",
                              RuntimeWarning, stacklevel=3)
    return SizesIndex(width, height, fmt, scanned=len(todo), cached=int(hit.sum()),
                      seconds=time.perf_counter() - t0)


def _scan(paths, todo, width, height, fmt, threads, progress, on_scanned, head) -> None:
    from datago._progress import Progress
    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:      # pragma: no cover - not Linux
            threads = os.cpu_count() or 1
        threads = min(32, max(4, 2 * threads))        # IO waits overlap the parsing
    if progress is None:
        progress = sys.stderr.isatty() and len(todo) >= 5000
    bar = Progress(len(todo), unit="headers") if progress else None

    def work(chunk):
        for i in chunk:
            height[i], width[i], fmt[i] = _header(paths[i], head)
        return len(chunk)

    chunks = [todo[i:i + _CHUNK] for i in range(0, len(todo), _CHUNK)]
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="datago-scan") as pool:
        for k in pool.map(work, chunks):
            if bar is not None:
                bar.update(k)
            if on_scanned is not None:
                on_scanned(k)
    if bar is not None:
        bar.close()


def scan_source(source, fetcher, hashes: np.ndarray, *, cache_dir: Optional[str] = None,
                use_cache: bool = True, threads: Optional[int] = None,
                remote: Optional[bool] = None) -> SizesIndex:
    """``scan_files`` over a source's main images (the dataset, each source of a mix,
    and ``datago serve`` read sizes this way).  Plain local files are stat'ed and
    read directly (cached by size and mtime); URLs and archive members (zip,
    tfrecord, bins, webdataset) go through ``fetcher.head`` with ``threads``
    readers.  ``remote``: ``source.remote()`` when the caller knows it already (it
    walks every location; only an index source needs it)."""
    if source.kind == "file":
        fetched = False
    elif source.kind == "index":
        fetched = source.remote() if remote is None else remote
    else:
        fetched = True
    return scan_files(source.root, [source.main_location(i) for i in range(len(source))],
                      hashes, cache_dir=cache_dir, use_cache=use_cache,
                      head=fetcher.head if fetched else None,
                      threads=threads if fetched else None)
