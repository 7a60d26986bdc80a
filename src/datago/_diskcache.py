"""An on-disk LRU cache of remote bytes, shared by every worker and rank of a node.

Entries are files named by the xxh64 of the location (URL and byte range), never
by anything inside the data, in 256 sub-folders: ``<dir>/objects/ab/abcdef....bin``.
A write goes to a temporary file and is renamed into place, so a reader sees a
whole entry or none; a hit touches the entry's mtime, which is the LRU clock.
When the entries written by this process push the folder past ``limit_bytes``
(checked every ``limit_bytes / 16`` bytes written), the oldest entries are
deleted until it is under 90% of the limit.  Processes evict independently; an
entry that vanishes between the lookup and the read is a miss.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

import xxhash

from datago.sources.sizes import atomic_write

__all__ = ["DiskCache"]


class DiskCache:
    def __init__(self, folder: str, limit_bytes: int):
        self.folder = os.path.join(folder, "objects")
        self.limit = int(limit_bytes)
        self.hits = 0
        self.misses = 0
        self._written = 0
        self._lock = threading.Lock()
        self.on_lookup = None           # callback(hit: bool), e.g. the dataset's counters
        os.makedirs(self.folder, exist_ok=True)

    def __repr__(self) -> str:
        return f"DiskCache({self.folder!r}, limit_bytes={self.limit})"

    def __getstate__(self):
        # sent to spawned DataLoader workers: counters and the callback stay here
        state = self.__dict__.copy()
        state.update(_lock=None, on_lookup=None, hits=0, misses=0, _written=0)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _path(self, key: str) -> str:
        h = xxhash.xxh64_hexdigest(key.encode("utf-8", "surrogatepass"))
        return os.path.join(self.folder, h[:2], h + ".bin")

    def get(self, key: str) -> Optional[bytes]:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
            os.utime(path)
        except OSError:
            with self._lock:
                self.misses += 1
            if self.on_lookup is not None:
                self.on_lookup(False)
            return None
        with self._lock:
            self.hits += 1
        if self.on_lookup is not None:
            self.on_lookup(True)
        return data

    def _lookup(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1
        if self.on_lookup is not None:
            self.on_lookup(hit)

    def open(self, key: str):
        """The entry as an open binary file (a hit), or None (a miss)."""
        path = self._path(key)
        try:
            f = open(path, "rb")
            os.utime(path)
        except OSError:
            self._lookup(False)
            return None
        self._lookup(True)
        return f

    def writer(self, key: str) -> "_Writer":
        """``with cache.writer(key) as w: w.write(chunk)...``: the entry appears when
        the block ends without an exception, and only if it stayed within the
        limit; a failed disk write stops caching, never the caller."""
        return _Writer(self, key)

    def _account(self, n: int) -> None:
        with self._lock:
            self._written += n
            due = self._written >= max(1, self.limit // 16)
            if due:
                self._written = 0
        if due:
            self.evict()

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.limit:
            return
        try:
            atomic_write(self._path(key), lambda f: f.write(data))
        except OSError:
            return                                  # a full or read-only disk: no caching
        self._account(len(data))

    def size(self) -> int:
        total = 0
        for entry in self._entries():
            total += entry[2]
        return total

    def _entries(self):
        for sub in os.scandir(self.folder):
            if not sub.is_dir():
                continue
            for e in os.scandir(sub.path):
                if e.name.endswith(".bin"):
                    try:
                        st = e.stat()
                    except OSError:
                        continue
                    yield st.st_mtime, e.path, st.st_size

    def evict(self) -> int:
        """Delete the least recently used entries until under 90% of the limit."""
        entries = sorted(self._entries())
        total = sum(e[2] for e in entries)
        removed = 0
        target = self.limit * 0.9
        for _, path, size in entries:
            if total <= target:
                break
            try:
                os.unlink(path)
            except OSError:
                continue
            total -= size
            removed += 1
        return removed

    def hit_ratio(self) -> Optional[float]:
        n = self.hits + self.misses
        return self.hits / n if n else None



class _Writer:
    """A streamed cache entry (see ``DiskCache.writer``)."""

    def __init__(self, cache: DiskCache, key: str):
        self.cache, self.path = cache, cache._path(key)
        self.n = 0
        self._f = None
        self._tmp = None
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._tmp = f"{self.path}.{os.getpid()}.{threading.get_ident()}.tmp"
            self._f = open(self._tmp, "wb")
        except OSError:
            self._f = None

    def __enter__(self) -> "_Writer":
        return self

    def write(self, data: bytes) -> None:
        if self._f is None:
            return
        self.n += len(data)
        try:
            if self.n > self.cache.limit:
                raise OSError("larger than the cache")
            self._f.write(data)
        except OSError:
            self._drop()

    def _drop(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
            try:
                os.unlink(self._tmp)
            except OSError:
                pass

    def __exit__(self, exc_type, *_) -> None:
        if self._f is None:
            return
        if exc_type is not None:
            self._drop()
            return
        try:
            self._f.close()
            self._f = None
            os.replace(self._tmp, self.path)
        except OSError:
            self._drop()
            return
        self.cache._account(self.n)
