"""Split bins (``source_type: "bins"``): a folder written by ``datago.bins`` (its
docstring has the format), local or over HTTP(S).

    src = BinsSource("/data/photos-bins")          # or (BinsSourceConfig, Fetcher)
    len(src), src[17]                              # raw sample: bytes, attributes, size
    for i in src.binwise_order(shuffle=True, seed=epoch): ...

The index is read once, as a stream, and checked (header, completion marker,
sample count, XXH64, and for a local folder the size of every bin): a folder
whose write was interrupted, or that is not a bins dataset, raises ``BinsError``
saying so.  Each part of a sample is then a ``Member`` (bin, offset, length),
read by a seek locally or an HTTP ``Range`` request remotely, and the sizes the
index holds plan the epoch without reading any image header.

Memory: ids and attribute JSON in byte blobs with offsets, the part layouts
shared between samples that have the same ones (kind, name, extension), and per
sample its bin, offset, size, layout and part lengths in arrays -- about the
index's own size, not a Python object per sample.  Repeated ids are left out
(the first wins) and counted (``skipped["duplicate_id"]``).
"""

from __future__ import annotations

import io
import itertools
import json
import os
from array import array
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import xxhash

from datago.bins import INDEX_NAME, KINDS, PART, BinsError, read_index_header
from datago.fetch import FetchError, Fetcher, Member, is_remote, redact
from datago.sources.base import SampleRef, Source
from datago.sources.index import _Blob, unique_rows
from datago.sources.sizes import SizesIndex

__all__ = ["BinsSource"]


def _stem(sid: str) -> str:
    """The file name stem of an id (a part's name: its extension tells the format)."""
    base = sid.rsplit("/", 1)[-1]
    return base.split(".", 1)[0] or base


def _join(root: str, name: str) -> str:
    return f"{root}/{name}" if is_remote(root) else os.path.join(root, name)


class BinsSource(Source):
    """The samples of a bins folder (see the module docstring).  ``cfg``: a
    ``BinsSourceConfig`` or the folder's path/URL."""

    kind = "bins"

    def __init__(self, cfg, fetcher: Optional[Fetcher] = None):
        path = cfg if isinstance(cfg, (str, os.PathLike)) else cfg.path
        path = os.fspath(path)
        self.root = path.rstrip("/") if is_remote(path) else os.path.abspath(path)
        self.fetcher = fetcher or Fetcher()
        self.skipped: Dict[str, int] = {}
        self._ids, self._attrs = _Blob(), _Blob()
        self._layouts: List[Tuple[Tuple[str, str, str], ...]] = []
        layout_ids: Dict[tuple, int] = {}
        bins, offsets, layouts = array("i"), array("q"), array("i")
        lengths, starts = array("q"), array("q", [0])
        width, height = array("i"), array("i")
        hashes = array("Q")
        where = redact(_join(self.root, INDEX_NAME))
        marker = None
        hasher = xxhash.xxh64()
        head = None
        with self._open_index() as f:
            for n, raw in enumerate(f, 1):
                if marker is not None:
                    raise BinsError(f"{where}: line {n} follows the completion marker")
                if not raw.endswith(b"\n"):
                    raise BinsError(f"{where}: line {n} is cut short: the index is truncated")
                if n == 1:
                    head = read_index_header(raw, where)
                    hasher.update(raw)
                    splits = head["splits"]
                    continue
                try:
                    rec = json.loads(raw)
                except ValueError as e:
                    raise BinsError(f"{where}: line {n} is not JSON ({e})") from None
                if isinstance(rec, dict) and rec.get("complete") is True:
                    marker = rec
                    continue
                hasher.update(raw)
                try:
                    sid, b, off = rec["id"], int(rec["bin"]), int(rec["offset"])
                    parts = rec["parts"]
                    layout = tuple((str(k), str(nm), str(e)) for k, nm, e, _ in parts)
                    lens = [int(p[3]) for p in parts]
                    w, h = int(rec.get("width") or 0), int(rec.get("height") or 0)
                    attrs = rec.get("attributes")
                    ok = (isinstance(sid, str) and sid and 0 <= b < splits and off >= 0
                          and layout and layout[0][0] == "main"
                          and all(k in KINDS for k, _, _ in layout) and min(lens) >= 0
                          and (attrs is None or isinstance(attrs, dict)))
                except (KeyError, TypeError, ValueError, IndexError):
                    ok = False
                if not ok:
                    raise BinsError(f"{where}: line {n} is not a sample record "
                                    "(id, bin, offset, parts, width, height)")
                lid = layout_ids.get(layout)
                if lid is None:
                    lid = layout_ids[layout] = len(self._layouts)
                    self._layouts.append(layout)
                self._ids.add(sid)
                self._attrs.add(json.dumps(attrs) if attrs else "")
                bins.append(b)
                offsets.append(off)
                layouts.append(lid)
                lengths.extend(lens)
                starts.append(len(lengths))
                width.append(max(w, 0))
                height.append(max(h, 0))
                hashes.append(xxhash.xxh64_intdigest(sid.encode("utf-8", "surrogatepass")))
        if head is None:
            raise BinsError(f"{where}: the index is empty")
        if marker is None:
            raise BinsError(f"{where}: no completion marker: the write of this dataset did "
                            "not finish (re-run it; datago.bins.write(..., resume=True) or "
                            "datago convert --resume continues it)")
        count = len(bins)
        if marker.get("samples") != count or marker.get("xxh64") != hasher.hexdigest():
            raise BinsError(f"{where}: the completion marker does not match the index "
                            f"({marker.get('samples')} samples and checksum "
                            f"{marker.get('xxh64')} recorded, {count} and "
                            f"{hasher.hexdigest()} found): the index is damaged")
        sizes = marker.get("bin_bytes")
        if not isinstance(sizes, list) or len(sizes) != splits:
            raise BinsError(f"{where}: the completion marker has no size for every bin")
        self.splits = splits
        self.bin_urls = [_join(self.root, name) for name in head["bins"]]
        self.bin_bytes = [int(s) for s in sizes]
        if not is_remote(self.root):
            for url, size in zip(self.bin_urls, self.bin_bytes):
                try:
                    have = os.path.getsize(url)
                except OSError:
                    raise BinsError(f"{url}: missing; the bins dataset is incomplete") from None
                if have != size:
                    raise BinsError(f"{url}: {have} bytes, the index records {size}: the "
                                    "bin was changed or truncated after the write")
        for b in (self._ids, self._attrs):
            b.freeze()
        self._bin = np.frombuffer(bins, dtype=np.int32).copy()
        self._offset = np.frombuffer(offsets, dtype=np.int64).copy()
        self._layout = np.frombuffer(layouts, dtype=np.int32).copy()
        self._lengths = np.frombuffer(lengths, dtype=np.int64).copy()
        self._start = np.frombuffer(starts, dtype=np.int64).copy()
        self._width = np.frombuffer(width, dtype=np.int32).copy()
        self._height = np.frombuffer(height, dtype=np.int32).copy()
        del bins, offsets, layouts, lengths, starts, width, height
        if count:
            self._drop_duplicates(np.frombuffer(hashes, dtype=np.uint64))

    # ------------------------------------------------------------------ index
    def _open_index(self):
        path = _join(self.root, INDEX_NAME)
        if is_remote(path):
            from datago.sources.webdataset import _Stream
            chunks = self.fetcher.stream(path, cache=False)     # streamed, never whole
            try:
                first = next(chunks, b"")
            except FetchError as e:
                if e.reason == "http_4xx":
                    raise BinsError(f"{redact(path)}: not found (HTTP {e.status}): no complete "
                                    "bins dataset there (an interrupted write leaves only "
                                    f"{INDEX_NAME}{PART})") from None
                raise
            return io.BufferedReader(_Stream(itertools.chain([first], chunks)), 1 << 20)
        if not os.path.isdir(self.root):
            raise BinsError(f"{self.root}: not an existing folder")
        try:
            return open(path, "rb")
        except FileNotFoundError:
            if os.path.exists(path + PART):
                raise BinsError(f"{self.root}: an interrupted bins write ({INDEX_NAME}{PART} "
                                f"and no {INDEX_NAME}): not a complete dataset; re-run the write "
                                "(datago.bins.write(..., resume=True) or datago convert "
                                "--resume continues it)") from None
            raise BinsError(f"{self.root}: no {INDEX_NAME}: not a datago bins dataset") from None
        except OSError as e:
            raise BinsError(f"cannot read {path}: {e.strerror or e}") from None

    def _drop_duplicates(self, hashes: np.ndarray) -> None:
        keep = unique_rows(hashes, self._ids.get)
        if keep is None:
            return
        self.skipped["duplicate_id"] = self.skipped.get("duplicate_id", 0) + len(hashes) - len(keep)
        self._ids, self._attrs = self._ids.subset(keep), self._attrs.subset(keep)
        counts = np.diff(self._start)[keep]
        idx = np.concatenate([np.arange(self._start[i], self._start[i + 1]) for i in keep]) \
            if len(keep) else np.zeros(0, np.int64)
        self._lengths = self._lengths[idx]
        self._start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        for name in ("_bin", "_offset", "_layout", "_width", "_height"):
            setattr(self, name, getattr(self, name)[keep])

    # ------------------------------------------------------------------ Source
    def __len__(self) -> int:
        return len(self._bin)

    def _index(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples")
        return i + n if i < 0 else i

    def sample_id(self, i: int) -> str:
        return self._ids.get(self._index(i))

    def _parts(self, i: int) -> Iterator[Tuple[str, str, str, int, int]]:
        """(kind, name, ext, offset, length) of sample ``i``'s parts."""
        off = int(self._offset[i])
        lens = self._lengths[self._start[i]:self._start[i + 1]]
        for (kind, name, ext), n in zip(self._layouts[self._layout[i]], lens):
            yield kind, name, ext, off, int(n)
            off += int(n)

    def ref(self, i: int) -> SampleRef:
        i = self._index(i)
        sid = self._ids.get(i)
        url = self.bin_urls[self._bin[i]]
        base = _stem(sid)
        groups: Dict[str, list] = {"main": [], "mask": [], "image": [], "latent": []}
        for kind, name, ext, off, n in self._parts(i):
            fname = f"{base}.{ext}" if kind == "main" else f"{base}.{name}.{ext}"
            groups[kind].append((name, Member(url, off, n, fname)))
        attrs = self._attrs.get(i)
        return SampleRef(sid, groups["main"][0][1], tuple(groups["mask"]),
                         tuple(groups["image"]), (), json.loads(attrs) if attrs else None,
                         latents=tuple(groups["latent"]))

    def main_location(self, i: int) -> Member:
        i = self._index(i)
        kind, name, ext, off, n = next(self._parts(i))
        return Member(self.bin_urls[self._bin[i]], off, n, f"{_stem(self._ids.get(i))}.{ext}")

    def remote(self) -> bool:
        return is_remote(self.root)

    def known_sizes(self) -> SizesIndex:
        """Sizes from the index (samples whose header could not be read at write
        time have 0 x 0: unreadable, left out of the plan)."""
        return SizesIndex.from_arrays(self._width, self._height)

    def memory_bytes(self) -> int:
        return (self._ids.nbytes() + self._attrs.nbytes() + self._bin.nbytes
                + self._offset.nbytes + self._layout.nbytes + self._lengths.nbytes
                + self._start.nbytes + self._width.nbytes + self._height.nbytes)

    # ------------------------------------------------------------------ random access
    def __getitem__(self, i: int) -> dict:
        """Sample ``i`` as ``datago.bins`` takes it: ``{"id", "image", "ext",
        "masks", "images", "latents", "attributes", "width", "height"}`` (bytes as
        stored; one read of the sample's contiguous span)."""
        i = self._index(i)
        parts = list(self._parts(i))
        start = parts[0][3]
        total = sum(p[4] for p in parts)
        span = self.fetcher.read(Member(self.bin_urls[self._bin[i]], start, total,
                                        _stem(self._ids.get(i))))
        out: dict = {"id": self._ids.get(i), "masks": {}, "images": {}, "latents": {}}
        for kind, name, ext, off, n in parts:
            data = span[off - start:off - start + n]
            if kind == "main":
                out["image"], out["ext"] = data, ext
            else:
                out[{"mask": "masks", "image": "images", "latent": "latents"}[kind]][name] = data
        attrs = self._attrs.get(i)
        out["attributes"] = json.loads(attrs) if attrs else {}
        out["width"], out["height"] = int(self._width[i]), int(self._height[i])
        return out

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def bin_of(self, i: int) -> int:
        return int(self._bin[self._index(i)])

    def binwise_order(self, shuffle: bool = False, seed: int = 0) -> np.ndarray:
        """Sample indices bin after bin (splitdataloader's ``iterate_binwise``):
        without ``shuffle`` bins in order and each bin's samples in storage order
        (sequential reads); with it, the bins in a random order and each bin's
        samples shuffled, reproducibly from ``seed`` (e.g. seed * 1000 + epoch)."""
        rng = np.random.default_rng(seed) if shuffle else None
        bins = np.arange(self.splits)
        if rng is not None:
            rng.shuffle(bins)
        by_bin = np.lexsort((self._offset, self._bin))        # bin, then offset
        bounds = np.searchsorted(self._bin[by_bin], np.arange(self.splits + 1))
        out = []
        for b in bins:
            part = by_bin[bounds[b]:bounds[b + 1]]
            if rng is not None:
                part = part.copy()
                rng.shuffle(part)
            out.append(part)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def iter_binwise(self, shuffle: bool = False, seed: int = 0) -> Iterator[dict]:
        """The samples (as ``self[i]``) in ``binwise_order(shuffle, seed)``."""
        for i in self.binwise_order(shuffle, seed):
            yield self[int(i)]
