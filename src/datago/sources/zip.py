"""ZIP archives (``source_type: "zip"``), read member by member, never extracted.

    {"source_type": "zip", "source_config": {"path": "data/train-{00..07}.zip"}}

``path`` is one archive or several: a local path, a glob, a brace pattern (as
``datago.sources.webdataset.expand_urls`` expands them), an ``http(s)://`` or
``s3://`` URL, or a list of these.

Samples
-------
Member paths follow the folder source's conventions (``datago.sources.filesystem``,
whose pattern logic is reused as is): the *key* of a member is its path up to
the first dot of its file name; ``<key>.<ext>`` is the main image,
``<key>.mask.png`` / ``.seg.png`` masks, ``<key>.<name>.<img>`` additional
images, ``<key>.json`` / ``.txt`` / ``<key>.<name>.txt|json`` attributes,
``<key>.npy`` / ``<key>.<name>.npy`` latents.  Hidden members (a path component
starting with a dot, ``.`` and ``..`` excepted), members without an extension and
other extensions are counted as the folder source counts them.

The sample id is the main image's member path (``dir/x.jpg``), also with several
archives (as a WebDataset key carries no shard name): a sample whose id an earlier
archive already gave is left out and counted (``duplicate_sample``; the first
archive wins).  Samples are listed archive by archive (in the order given, globs
sorted), and within an archive in the folder source's order (byte order of the
path components, depth first).

Member names are ids and nothing else: ``../x.jpg``, ``/etc/x.jpg`` or
``a\\b.jpg`` are kept verbatim as ids and never become filesystem paths --
nothing is ever extracted; members are read as byte ranges of the archive.

Reading
-------
The End Of Central Directory record is found in the last 64 KiB + 42 bytes of
the archive (one ranged read of a remote archive, after a one-byte one for its
size), ZIP64 included (the EOCD64 locator and record; zip64 extra fields for
sizes and offsets), then the central directory is read with one more ranged
read (none when it lies in the tail already) and parsed.  Bytes prepended to
the archive (a self-extractor stub) are allowed for, as ``zipfile`` does.

A member's data starts after its *local* header, whose extra field often differs
from the central one (zip64 sizes, timestamps), so the local headers are read
once at construction: the 30 fixed bytes and the name of each (the signature,
name and method are checked against the central directory), headers less than
4 KiB apart in one read (a sample's sidecars and the next image share one).
Local archives: plain reads of an open file (10,000 members: milliseconds).
Remote archives: ranged reads on ``io_concurrency`` threads, and the result is
cached in ``<cache_dir>/zip-index/`` keyed by the URL, the archive's size and a
hash of its central directory, so the next construction (another rank, the
next run) makes three requests.  Each member is then a ``datago.fetch.Member``:
the byte range of its data; deflate members (method 8) carry
``codec="deflate"`` and are inflated in memory to exactly their declared size
(more is refused before it is produced: ``bad_member``; less is
``truncated``).  A remote member costs one ranged request.

Refused members (``source.skipped``, never read)
-------------------------------------------------
``encrypted`` (flag bit 0), ``unsupported_method`` (anything but stored and
deflate: bzip2, lzma, zstd...), ``too_large_member`` (a declared size above
``max_member_bytes``), ``zip_bomb`` (declared size more than ``max_ratio`` times
the compressed size), ``bad_member`` (a local header that does not match the
central directory, data outside the archive, a stored member whose sizes
differ), ``overlapping_member`` (a member whose bytes overlap another's: the
overlapping-files bomb), ``duplicate_member`` (a name seen before in the same
archive: the first wins).  Directories are skipped.  A sample whose main image
was refused takes another of its images as main, or is counted as orphan
sidecars.  Pixel bombs are stopped by the decoder's ``max_pixels``.  Every
member's content is checked against its directory's CRC-32 when read
(``crc_mismatch``, libdeflate's CRC: ~45 us per 400 KB).

``known_sizes()`` is None: image sizes come from the dataset's header scan
(``fetcher.head`` on the members, which inflates a deflate member whole), cached
by the dataset under a key that includes each archive's size and central
directory hash.
"""

from __future__ import annotations

import os
import struct
from array import array
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import numpy as np
import xxhash

from datago.errors import DatagoError
from datago.fetch import Fetcher, Inline, Member, is_remote, redact
from datago.sources.base import SampleRef, Source
from datago.sources.filesystem import Pattern, _pattern
from datago.sources.sizes import atomic_write, default_cache_dir
from datago.sources.webdataset import expand_urls

__all__ = ["ZipSource", "read_central_directory"]

_EOCD = b"PK\x05\x06"
_EOCD64 = b"PK\x06\x06"
_LOC64 = b"PK\x06\x07"
_CEN = b"PK\x01\x02"
_LOCAL = b"PK\x03\x04"

_S_EOCD = struct.Struct("<4s4H2LH")          # 22 bytes
_S_LOC64 = struct.Struct("<4sLQL")           # 20
_S_EOCD64 = struct.Struct("<4sQ2H2L4Q")      # 56
_S_CEN = struct.Struct("<4s6H3L5HLL")        # 46
_S_LOCAL = struct.Struct("<4s5H3L2H")        # 30
_S_EXTRA = struct.Struct("<2H")

_TAIL = 65535 + _S_EOCD.size + _S_LOC64.size     # the longest comment, EOCD, zip64 locator
_GROUP_GAP = 4 << 10                             # local headers this close share a read
_GROUP_SPAN = 1 << 20                            # ... up to this many bytes per read
_U32, _U16 = 0xFFFFFFFF, 0xFFFF
_CACHE_VERSION = 1

# One central directory entry: (name, name bytes, flags, method, compressed size,
# uncompressed size, local header offset (archive-relative, before the prefix shift),
# CRC-32 of the content)
Entry = Tuple[str, bytes, int, int, int, int, int, int]


def _bad(url: str, why: str) -> DatagoError:
    return DatagoError(f"{redact(url)}: not a readable ZIP archive ({why})")


def _zip64_extra(extra: bytes, usize: int, csize: int, lho: int, disk: int):
    """Sizes and offset from a zip64 extra field (id 1): only the fields whose
    central value is the 0xFFFFFFFF (0xFFFF for the disk) sentinel are there, in
    this order."""
    p = 0
    while p + 4 <= len(extra):
        tag, n = _S_EXTRA.unpack_from(extra, p)
        data = extra[p + 4:p + 4 + n]
        p += 4 + n
        if tag != 1:
            continue
        q = 0
        vals = []
        for cur, width in ((usize, 8), (csize, 8), (lho, 8), (disk, 4)):
            if cur == (_U32 if width == 8 else _U16):
                if q + width > len(data):
                    raise ValueError("a short zip64 extra field")
                vals.append(int.from_bytes(data[q:q + width], "little"))
                q += width
            else:
                vals.append(cur)
        return tuple(vals)
    if _U32 in (usize, csize, lho):
        raise ValueError("a 0xFFFFFFFF size or offset without a zip64 extra field")
    return usize, csize, lho, disk


def read_central_directory(url: str, fetcher: Optional[Fetcher] = None):
    """``(entries, base, cd_start, size, cd_hash)`` of the archive at ``url``:
    its central directory entries (``Entry`` tuples, in directory order), the
    number of bytes prepended to the archive (add it to the local header
    offsets), where the central directory starts, the archive's size and a hash
    of the directory's bytes.  ``DatagoError`` naming the archive when it is no
    readable ZIP archive, ``FetchError`` when its bytes cannot be had."""
    fetcher = fetcher or Fetcher()
    size = fetcher.size(url)

    def read(off: int, n: int) -> bytes:
        if n <= 0:
            return b""
        return fetcher.read(Member(url, off, n), cache=False)

    if size < _S_EOCD.size:
        raise _bad(url, f"{size} bytes, no end of central directory record")
    tail_off = max(0, size - _TAIL)
    tail = read(tail_off, size - tail_off)
    found, loose = -1, -1
    j = len(tail)
    while True:
        j = tail.rfind(_EOCD, 0, j)
        if j < 0:
            break
        if j + _S_EOCD.size > len(tail):
            continue
        comment = _S_EOCD.unpack_from(tail, j)[7]
        if j + _S_EOCD.size + comment == len(tail):
            found = j
            break
        if loose < 0 and j + _S_EOCD.size + comment <= len(tail):
            loose = j
    if found < 0:
        found = loose
    if found < 0:
        raise _bad(url, "no end of central directory record: truncated or not a ZIP file")
    eocd = tail_off + found
    _, disk, cd_disk, _, total, cd_size, cd_off, _ = _S_EOCD.unpack_from(tail, found)
    cd_end = eocd
    # ZIP64: a locator right before the EOCD record points at the EOCD64 record
    loc = eocd - _S_LOC64.size
    if loc >= 0:
        head = tail[loc - tail_off:found] if loc >= tail_off else read(loc, _S_LOC64.size)
        if head[:4] == _LOC64:
            _, disk64, rec_off, ndisks = _S_LOC64.unpack(head)
            rec_at = loc - _S_EOCD64.size              # where it is unless bytes were prepended
            rec = b""
            if rec_at >= 0:
                rec = tail[rec_at - tail_off:loc - tail_off] if rec_at >= tail_off \
                    else read(rec_at, _S_EOCD64.size)
            if rec[:4] != _EOCD64:                    # a record with extensible data
                rec_at = rec_off
                if rec_at + _S_EOCD64.size > size:
                    raise _bad(url, "the zip64 end of central directory record is outside the file")
                rec = read(rec_at, _S_EOCD64.size)
            if rec[:4] != _EOCD64:
                raise _bad(url, "no zip64 end of central directory record where its locator points")
            (_, _, _, _, disk, cd_disk, _, total, cd_size, cd_off) = _S_EOCD64.unpack(rec)
            if ndisks > 1 or disk64:
                raise _bad(url, "a multi-disk (spanned) archive")
            cd_end = rec_at
    if disk or cd_disk:
        raise _bad(url, "a multi-disk (spanned) archive")
    cd_start = cd_end - cd_size
    base = cd_start - cd_off
    if cd_start < 0 or base < 0:
        raise _bad(url, "the central directory lies outside the file (truncated?)")
    cd = tail[cd_start - tail_off:cd_end - tail_off] if cd_start >= tail_off \
        else read(cd_start, cd_size)
    entries: List[Entry] = []
    p = 0
    unpack = _S_CEN.unpack_from
    n_cd = len(cd)
    while p < n_cd:
        if p + 46 > n_cd or cd[p:p + 4] != _CEN:
            raise _bad(url, f"corrupt central directory at entry {len(entries)}")
        (_, _, _, flags, method, _, _, crc, csize, usize, nlen, elen, clen, disk_start, _, _,
         lho) = unpack(cd, p)
        q = p + 46
        raw = cd[q:q + nlen]
        extra = cd[q + nlen:q + nlen + elen]
        p = q + nlen + elen + clen
        if p > n_cd:
            raise _bad(url, f"corrupt central directory at entry {len(entries)}")
        if _U32 in (usize, csize, lho) or disk_start == _U16:
            try:
                usize, csize, lho, disk_start = _zip64_extra(extra, usize, csize, lho, disk_start)
            except ValueError as e:
                raise _bad(url, f"entry {len(entries)}: {e}") from None
        name = raw.decode("utf-8", "surrogateescape") if flags & 0x800 else raw.decode("cp437")
        entries.append((name, raw, flags, method, csize, usize, lho, crc))
    if len(entries) % 65536 != total % 65536:            # (some writers wrap the count)
        raise _bad(url, f"the central directory has {len(entries)} entries, its end record "
                        f"says {total}")
    return entries, base, cd_start, size, xxhash.xxh64_hexdigest(cd)


class ZipSource(Source):
    """Samples of ZIP archives, read by member offset (see the module docstring)."""

    kind = "zip"

    def __init__(self, config, fetcher: Optional[Fetcher] = None):
        if isinstance(config, (str, os.PathLike, list, tuple)):
            from datago.config import ZipSourceConfig
            config = ZipSourceConfig(config)
        path = getattr(config, "path", None)
        if path is None:
            path = getattr(config, "url")
        self.fetcher = fetcher or Fetcher()
        self.max_member_bytes = int(config.max_member_bytes)
        self.max_ratio = float(config.max_ratio)
        self._cache = os.path.join(getattr(config, "cache_dir", None)
                                   or os.path.dirname(default_cache_dir()), "zip-index")
        self.skipped: Dict[str, int] = {}
        urls: List[str] = []
        for u in expand_urls(path):
            u = u if is_remote(u) else os.path.abspath(u)
            if u in urls:
                self._count("duplicate_archive")
                continue
            urls.append(u)
        self.archives = urls
        self._seen_ids: set = set()            # xxh64 of the ids listed so far
        self._blob = bytearray()
        self._key_off = array("q", [0])
        self._arch = array("i")
        self._pidx = array("i")
        self._first = array("q")
        self._off = array("q")
        self._csize = array("q")
        self._usize = array("q")
        self._method = array("b")
        self._crc = array("L")
        self._patterns: List[Pattern] = []
        self._pattern_ids: Dict[Pattern, int] = {}
        roots = []
        for a, (entries, ok, data_off, counts, root) in enumerate(self._scans(urls)):
            for reason, n in counts.items():
                self._count(reason, n)
            self._add(a, entries, ok, data_off)
            roots.append(root)
        self.root = "|".join(roots)
        self._keys = bytes(self._blob)
        del self._blob

    def _count(self, reason: str, n: int = 1) -> None:
        if n:
            self.skipped[reason] = self.skipped.get(reason, 0) + n

    # ------------------------------------------------------------------ listing
    def _scans(self, urls: List[str]):
        """``_scan`` of each archive, in order; remote ones read side by side (a
        few ahead of the one being added, so that memory stays bounded)."""
        if len(urls) < 2 or not self.remote():
            for u in urls:
                yield self._scan(u)
            return
        ahead = min(len(urls), 8)
        with ThreadPoolExecutor(ahead) as pool:
            futures = [pool.submit(self._scan, u) for u in urls[:ahead]]
            for k in range(len(urls)):
                if k + ahead < len(urls):
                    futures.append(pool.submit(self._scan, urls[k + ahead]))
                yield futures[k].result()
                futures[k] = None

    def _scan(self, url: str):
        """``(entries, ok, data_off, counts, root)`` of one archive: its central
        directory, the entries kept (directory order), their data offsets, the
        refused ones by reason, and what the sizes cache is keyed by."""
        entries, base, cd_start, size, cd_hash = read_central_directory(url, self.fetcher)
        counts: Dict[str, int] = {}

        def count(reason: str, n: int = 1) -> None:
            if n:
                counts[reason] = counts.get(reason, 0) + n

        keep: List[int] = []
        seen = set()
        for k, (name, _, flags, method, csize, usize, lho, _) in enumerate(entries):
            if name.endswith("/"):
                continue                                    # a directory
            if name in seen:
                count("duplicate_member")
                continue
            seen.add(name)
            folder, _, fname = name.rpartition("/")
            if fname.startswith(".") or any(c.startswith(".") and c not in (".", "..")
                                            for c in folder.split("/")):
                count("hidden")
                continue
            if not fname.partition(".")[2]:
                count("no_extension")
                continue
            if flags & 1:
                count("encrypted")
            elif method not in (0, 8):
                count("unsupported_method")
            elif usize > self.max_member_bytes or csize > self.max_member_bytes:
                count("too_large_member")
            elif method == 8 and usize > self.max_ratio * csize:
                count("zip_bomb")
            elif method == 0 and usize != csize:
                count("bad_member")
            elif base + lho + 30 + len(entries[k][1]) > cd_start:
                count("bad_member")
            else:
                keep.append(k)
        data_off = self._data_offsets(url, entries, keep, base, size, cd_hash)
        # bounds, then overlaps (in archive order): a member's bytes are its own
        good = []
        for k in keep:
            d = data_off[k]
            if d < 0 or d + entries[k][4] > cd_start:
                count("bad_member")
            else:
                good.append(k)
        good.sort(key=lambda k: entries[k][6])
        end = 0
        ok = []
        for k in good:
            if base + entries[k][6] < end:
                count("overlapping_member")
                continue
            end = data_off[k] + entries[k][4]
            ok.append(k)
        ok.sort()                                           # directory order
        return entries, ok, data_off, counts, f"{url}#{size}:{cd_hash}"

    def _add(self, a: int, entries: List[Entry], ok: List[int], data_off: Dict[int, int]) -> None:
        """Append archive ``a``'s samples: its members grouped by key with the
        folder source's pattern logic, in the folder source's order."""
        count = self._count
        groups: Dict[str, Dict[str, int]] = {}
        for k in ok:
            name = entries[k][0]
            folder, slash, fname = name.rpartition("/")
            stem, _, rest = fname.partition(".")
            groups.setdefault(f"{folder}{slash}{stem}", {})[rest] = k
        cache: Dict[Tuple[str, ...], Tuple[Optional[Pattern], int]] = {}
        samples = []
        for key, files in groups.items():
            files_t = tuple(sorted(files))
            hit = cache.get(files_t)
            if hit is None:
                hit = cache[files_t] = _pattern(files_t)
            pat, ignored = hit
            count("other_extension", ignored)
            if pat is None:
                count("orphan_sidecars", len(files) - ignored)
                continue
            pid = self._pattern_ids.get(pat)
            if pid is None:
                pid = self._pattern_ids[pat] = len(self._patterns)
                self._patterns.append(pat)
            main, parts = pat
            members = [files[main]] + [files[suffix] for _, _, suffix in parts]
            sid = f"{key}.{main}"
            order = tuple(c.encode("utf-8", "surrogateescape") for c in sid.split("/"))
            samples.append((order, key, pid, members))
        samples.sort(key=lambda s: s[0])
        for _, key, pid, members in samples:
            h = xxhash.xxh64_intdigest(f"{key}.{self._patterns[pid][0]}".encode(
                "utf-8", "surrogateescape"))
            if h in self._seen_ids:
                count("duplicate_sample")
                continue
            self._seen_ids.add(h)
            self._blob += key.encode("utf-8", "surrogateescape")
            self._key_off.append(len(self._blob))
            self._arch.append(a)
            self._pidx.append(pid)
            self._first.append(len(self._off))
            for k in members:
                e = entries[k]
                self._off.append(data_off[k])
                self._csize.append(e[4])
                self._usize.append(e[5])
                self._method.append(e[3])
                self._crc.append(e[7])

    def _data_offsets(self, url: str, entries: List[Entry], keep: List[int], base: int,
                      size: int, cd_hash: str) -> Dict[int, int]:
        """Absolute data offset of each kept entry (-1: a bad local header), from the
        local headers (see the module docstring); cached for remote archives."""
        remote = is_remote(url)
        cached: Optional[np.ndarray] = None
        cache_path = None
        if remote:
            key = xxhash.xxh64_hexdigest(f"{_CACHE_VERSION}\0{url}\0{size}\0{cd_hash}".encode())
            cache_path = os.path.join(self._cache, f"{key}.npy")
            try:
                cached = np.load(cache_path, allow_pickle=False)
                if cached.shape != (len(entries),) or cached.dtype != np.int64:
                    cached = None
            except (OSError, ValueError):
                cached = None
        out: Dict[int, int] = {}
        todo = []
        for k in keep:
            if cached is not None and cached[k] != 0:      # 0: not resolved yet
                out[k] = int(cached[k])
            else:
                todo.append(k)
        if not todo:
            return out
        todo.sort(key=lambda k: entries[k][6])
        groups: List[List[int]] = []
        for k in todo:
            lho, nlen = base + entries[k][6], len(entries[k][1])
            if groups:
                g = groups[-1]
                start = base + entries[g[0]][6]
                prev_end = base + entries[g[-1]][6] + 30 + len(entries[g[-1]][1])
                if lho - prev_end <= _GROUP_GAP and lho + 30 + nlen - start <= _GROUP_SPAN:
                    g.append(k)
                    continue
            groups.append([k])

        def span(g: List[int]) -> Tuple[int, int]:
            start = base + entries[g[0]][6]
            end = max(base + entries[k][6] + 30 + len(entries[k][1]) for k in g)
            return start, end - start

        def parse(g: List[int], data: bytes, start: int) -> None:
            for k in g:
                name, raw, _, method, _, _, lho, _ = entries[k]
                p = base + lho - start
                head = data[p:p + 30 + len(raw)]
                if len(head) < 30:
                    out[k] = -1
                    continue
                sig, _, _, lmethod, _, _, _, _, _, lnlen, lelen = _S_LOCAL.unpack_from(head)
                if sig != _LOCAL or lmethod != method or lnlen != len(raw) or \
                        head[30:30 + lnlen] != raw:
                    out[k] = -1
                    continue
                out[k] = base + lho + 30 + lnlen + lelen

        if remote:
            def one(g):
                start, n = span(g)
                return g, start, self.fetcher.read(Member(url, start, n), cache=False)
            workers = max(1, min(len(groups), self.fetcher.config.io_concurrency))
            if workers == 1:
                results = map(one, groups)
                for g, start, data in results:
                    parse(g, data, start)
            else:
                with ThreadPoolExecutor(workers) as pool:
                    for g, start, data in pool.map(one, groups):
                        parse(g, data, start)
        else:
            try:
                with open(url, "rb") as f:
                    for g in groups:
                        start, n = span(g)
                        f.seek(start)
                        parse(g, f.read(n), start)
            except OSError as e:
                from datago.fetch import FetchError
                raise FetchError(f"cannot read {url}: {e.strerror or e}", "read_error",
                                 url) from None
        if cache_path is not None:
            arr = cached.copy() if cached is not None else np.zeros(len(entries), dtype=np.int64)
            for k in todo:
                arr[k] = out[k]
            try:
                atomic_write(cache_path, lambda f: np.save(f, arr, allow_pickle=False))
            except OSError:
                pass                                       # only costs the reads next time
        return out

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self._pidx)

    def _index(self, i: int) -> int:
        n = len(self._pidx)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples")
        return i + n if i < 0 else i

    def key(self, i: int) -> str:
        """The sample's key (its main image's member path up to the first dot of the
        file name)."""
        i = self._index(i)
        o = self._key_off
        return self._keys[o[i]:o[i + 1]].decode("utf-8", "surrogateescape")

    def sample_id(self, i: int) -> str:
        i = self._index(i)
        return f"{self.key(i)}.{self._patterns[self._pidx[i]][0]}"

    def _loc(self, i: int, j: int, name: str):
        m = self._first[i] + j
        csize, usize = self._csize[m], self._usize[m]
        if csize == 0 or usize == 0:
            return Inline(b"", name)                       # an empty member (no range to read)
        deflate = self._method[m] == 8
        return Member(self.archives[self._arch[i]], self._off[m], csize, name,
                      "deflate" if deflate else "", usize if deflate else 0, self._crc[m])

    def main_location(self, i: int):
        i = self._index(i)
        main = self._patterns[self._pidx[i]][0]
        return self._loc(i, 0, f"{self.key(i).rpartition('/')[2]}.{main}")

    def ref(self, i: int) -> SampleRef:
        i = self._index(i)
        key = self.key(i)
        base = key.rpartition("/")[2]
        main, parts = self._patterns[self._pidx[i]]
        groups: Dict[str, list] = {"mask": [], "image": [], "text": [], "latent": []}
        for j, (kind, name, suffix) in enumerate(parts, 1):
            groups[kind].append((name, self._loc(i, j, f"{base}.{suffix}")))
        return SampleRef(self.sample_id(i), self._loc(i, 0, f"{base}.{main}"),
                         tuple(groups["mask"]), tuple(groups["image"]), tuple(groups["text"]),
                         latents=tuple(groups["latent"]))

    def remote(self) -> bool:
        return any(is_remote(u) for u in self.archives)

    def known_sizes(self):
        return None
