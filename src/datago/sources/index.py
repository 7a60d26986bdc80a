"""An index of samples: a CSV, JSONL or Parquet file (or a glob of them), or a
plain text list of paths/URLs, local or remote (``source_type: "index"``).

One row is one sample.  The location column (``url_column``, default ``url``;
a column named ``path`` is taken when there is no ``url``) holds a local path or
an ``http(s)://`` URL; relative paths resolve against the index file's folder
(or URL).  The sample id is the column's value as written.  Optional columns:

* ``width`` / ``height`` (names configurable): the displayed size; when every
  row has both, no header is read before the epoch is planned;
* ``mask`` (or the columns of ``mask_columns``) -- mask locations, keyed by the
  column name; ``image_columns`` -- additional images;
* every other column becomes an attribute of the sample (CSV values are strings,
  JSONL and Parquet keep their types; empty CSV cells are left out).

A text list (any other extension) has one location per line; blank lines and
lines starting with ``#`` are skipped.  Rows without a location are counted
(``skipped["no_location"]``), and so are repeated ids (``skipped["duplicate_id"]``,
the first row wins).  Parquet needs ``pyarrow``.

Memory: index files are read as streams (a Parquet file a row group at a time;
a remote one is spooled to a temporary file first, since Parquet needs to
seek), never whole; ids, locations, attribute JSON and mask/image columns are
kept in byte blobs with offsets (about the size of the index's own text) plus
12 bytes per row (an id hash for finding duplicates, width, height), not as
Python objects per row.
"""

from __future__ import annotations

import contextlib
import csv
import glob as _glob
import io
import json
import os
import tempfile
from array import array
from typing import Any, BinaryIO, Dict, Iterator, List, Optional, Sequence, Union
from urllib.parse import urljoin

import numpy as np
import xxhash

from datago.errors import ConfigError, DatagoError
from datago.fetch import FetchError, Fetcher, is_remote, redact
from datago.sources.base import SampleRef, Source
from datago.sources.sizes import SizesIndex

__all__ = ["IndexSource", "read_rows", "unique_rows"]

TABLE_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")


class _Blob:
    """Strings appended to one bytes blob; ``get(i)`` decodes the i-th."""

    def __init__(self):
        self._buf = bytearray()
        self._off = array("q", [0])

    def add(self, text: str) -> None:
        self._buf += text.encode("utf-8", "surrogatepass")
        self._off.append(len(self._buf))

    def freeze(self) -> None:
        self._buf = bytes(self._buf)

    def get(self, i: int) -> str:
        return self._buf[self._off[i]:self._off[i + 1]].decode("utf-8", "surrogatepass")

    def subset(self, keep: np.ndarray) -> "_Blob":
        """A blob of the strings at the (sorted) indices ``keep``."""
        out = _Blob()
        for i in keep:
            out._buf += self._buf[self._off[int(i)]:self._off[int(i) + 1]]
            out._off.append(len(out._buf))
        out.freeze()
        return out

    def __len__(self) -> int:
        return len(self._off) - 1

    def nbytes(self) -> int:
        return len(self._buf) + 8 * len(self._off)


def _rows_csv(f: BinaryIO, delimiter: str) -> Iterator[Dict[str, Any]]:
    text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
    for row in csv.DictReader(text, delimiter=delimiter):
        yield {k: v for k, v in row.items() if k is not None and v not in (None, "")}


def _rows_jsonl(f: BinaryIO, name: str) -> Iterator[Dict[str, Any]]:
    for n, line in enumerate(f, 1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DatagoError(f"{name}: line {n} is not JSON: {e}") from None
        if not isinstance(row, dict):
            raise DatagoError(f"{name}: line {n} is a JSON {type(row).__name__}, not an object")
        yield row


def _rows_parquet(f: BinaryIO, name: str) -> Iterator[Dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"source_config.index: {name} is Parquet, which needs pyarrow "
                          "(pip install pyarrow)") from None
    pf = pq.ParquetFile(f)
    for group in range(pf.num_row_groups):              # one row group in memory at a time
        for batch in pf.iter_batches(batch_size=65536, row_groups=[group]):
            for row in batch.to_pylist():
                yield {k: v for k, v in row.items() if v is not None}


def _rows_text(f: BinaryIO, column: str) -> Iterator[Dict[str, Any]]:
    for n, raw in enumerate(f):
        line = raw.decode("utf-8-sig" if n == 0 else "utf-8").strip()
        if line and not line.startswith("#"):
            yield {column: line}


def read_rows(f: Union[bytes, BinaryIO], name: str, column: str) -> Iterator[Dict[str, Any]]:
    """Rows of one index file, read as a stream from the binary file ``f`` (or
    bytes); ``name`` decides the format by its extension.  ``DatagoError`` naming
    the file when it cannot be parsed."""
    if isinstance(f, (bytes, bytearray)):
        f = io.BytesIO(f)
    lower = name.lower().split("?")[0]
    if lower.endswith(".csv"):
        rows = _rows_csv(f, ",")
    elif lower.endswith(".tsv"):
        rows = _rows_csv(f, "\t")
    elif lower.endswith((".jsonl", ".ndjson")):
        rows = _rows_jsonl(f, name)
    elif lower.endswith(".parquet"):
        rows = _rows_parquet(f, name)
    else:
        rows = _rows_text(f, column)
    try:
        yield from rows
    except DatagoError:
        raise
    except (UnicodeDecodeError, csv.Error, ValueError, OSError) as e:   # pyarrow's too
        if isinstance(e, FetchError):
            raise
        raise DatagoError(f"{redact(name)}: not a readable index file "
                          f"({type(e).__name__}: {e})") from None


@contextlib.contextmanager
def _open_index(name: str, fetcher: Fetcher):
    """A binary file over an index file: local files directly; remote ones streamed
    (Parquet, which needs to seek, spooled to a temporary file first)."""
    if not is_remote(name):
        try:
            f = open(name, "rb")
        except OSError as e:
            raise DatagoError(f"cannot read index file {name}: {e.strerror or e}") from None
        with f:
            yield f
        return
    if name.lower().split("?")[0].endswith(".parquet"):
        with tempfile.TemporaryFile() as tmp:
            for chunk in fetcher.stream(name, cache=False):
                tmp.write(chunk)
            tmp.seek(0)
            yield tmp
        return
    from datago.sources.webdataset import _Stream
    yield io.BufferedReader(_Stream(fetcher.stream(name, cache=False)), 1 << 20)


def _expand(index) -> List[str]:
    items = [index] if isinstance(index, str) else list(index)
    out: List[str] = []
    for item in items:
        if is_remote(item):
            out.append(item)
        elif any(c in item for c in "*?["):
            hits = sorted(_glob.glob(item))
            if not hits:
                raise ConfigError(f"source_config.index: {item!r} matches no file")
            out.extend(hits)
        else:
            if not os.path.isfile(item):
                raise ConfigError(f"source_config.index: {item!r} is not an existing file")
            out.append(item)
    return out


def _resolve(base: str, loc: str) -> str:
    if is_remote(loc) or os.path.isabs(loc):
        return loc
    if is_remote(base):
        return urljoin(base, loc)
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(base)), loc))


class IndexSource(Source):
    """Samples listed in index files (see the module docstring)."""

    kind = "index"

    def __init__(self, index, *, url_column: str = "url", width_column: str = "width",
                 height_column: str = "height", mask_columns: Optional[Sequence[str]] = None,
                 image_columns: Sequence[str] = (), fetcher: Optional[Fetcher] = None):
        self.files = _expand(index)
        self.root = "|".join(os.path.abspath(f) if not is_remote(f) else f for f in self.files)
        self.fetcher = fetcher or Fetcher()
        self.skipped: Dict[str, int] = {}
        self._ids, self._locs, self._attrs, self._parts = _Blob(), _Blob(), _Blob(), _Blob()
        hashes = array("Q")                  # xxh64 of each id: duplicates found after reading
        width, height = array("i"), array("i")
        url_col = url_column
        mask_cols = mask_columns if mask_columns is not None else ("mask",)
        for name in self.files:
            first = True
            with _open_index(name, self.fetcher) as f:
                for row in read_rows(f, name, url_col):
                    if first:
                        first = False
                        if url_col not in row and url_column == "url" and "path" in row:
                            url_col = "path"
                        elif url_col not in row and not _is_text(name):
                            raise ConfigError(
                                f"source_config.url_column: {name} has no column "
                                f"{url_column!r} (columns: {', '.join(map(str, row))})")
                    loc = row.pop(url_col, None)
                    if loc is None or str(loc) == "":
                        self._count("no_location")
                        continue
                    sid = str(loc)
                    masks = [(c, _resolve(name, str(row.pop(c)))) for c in mask_cols if c in row]
                    images = [(c, _resolve(name, str(row.pop(c)))) for c in image_columns
                              if c in row]
                    w, h = row.pop(width_column, None), row.pop(height_column, None)
                    width.append(_as_int(w))
                    height.append(_as_int(h))
                    hashes.append(xxhash.xxh64_intdigest(sid.encode("utf-8", "surrogatepass")))
                    self._ids.add(sid)
                    resolved = _resolve(name, sid)
                    self._locs.add("" if resolved == sid else resolved)   # URLs: stored once
                    self._attrs.add(json.dumps(row, default=str) if row else "")
                    self._parts.add(json.dumps([masks, images]) if masks or images else "")
        for b in (self._ids, self._locs, self._attrs, self._parts):
            b.freeze()
        self._width = np.frombuffer(width, dtype=np.int32).copy() if len(width) else np.zeros(0, np.int32)
        self._height = np.frombuffer(height, dtype=np.int32).copy() if len(height) else np.zeros(0, np.int32)
        del width, height
        self._drop_duplicates(np.frombuffer(hashes, dtype=np.uint64) if len(hashes)
                              else np.zeros(0, np.uint64))

    def _drop_duplicates(self, hashes: np.ndarray) -> None:
        """Leave out rows whose id came before (the first row wins), counted."""
        keep = unique_rows(hashes, self._ids.get)
        if keep is None:
            return
        self.skipped["duplicate_id"] = self.skipped.get("duplicate_id", 0) + len(hashes) - len(keep)
        for attr in ("_ids", "_locs", "_attrs", "_parts"):
            setattr(self, attr, getattr(self, attr).subset(keep))
        self._width, self._height = self._width[keep], self._height[keep]

    def _count(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def __len__(self) -> int:
        return len(self._ids)

    def sample_id(self, i: int) -> str:
        return self._ids.get(i)

    def main_location(self, i: int) -> str:
        return self._locs.get(i) or self._ids.get(i)

    def ref(self, i: int) -> SampleRef:
        parts = self._parts.get(i)
        masks, images = json.loads(parts) if parts else ((), ())
        masks = tuple(tuple(m) for m in masks)
        images = tuple(tuple(m) for m in images)
        attrs = self._attrs.get(i)
        return SampleRef(self._ids.get(i), self.main_location(i), masks, images, (),
                         json.loads(attrs) if attrs else None)

    def known_sizes(self) -> Optional[SizesIndex]:
        if len(self) and (self._width > 0).all() and (self._height > 0).all():
            return SizesIndex.from_arrays(self._width, self._height)
        return None

    def memory_bytes(self) -> int:
        return (self._ids.nbytes() + self._locs.nbytes() + self._attrs.nbytes()
                + self._parts.nbytes() + self._width.nbytes + self._height.nbytes)


def unique_rows(hashes: np.ndarray, get_id) -> Optional[np.ndarray]:
    """The rows to keep (sorted indices) when some ids repeat, the first row of
    each id winning; None when every id is unique.  Ids are compared by their
    64-bit ``hashes`` first (no set of a million strings), then as strings
    (``get_id(i)``) where hashes collide."""
    order = np.argsort(hashes, kind="stable")
    sh = hashes[order]
    same = np.flatnonzero(sh[1:] == sh[:-1])
    if not len(same):
        return None
    drop = set()
    for start in np.unique(np.searchsorted(sh, sh[same])):
        group = order[start:start + int(np.searchsorted(sh, sh[start], "right") - start)]
        firsts: Dict[str, int] = {}
        for i in sorted(int(x) for x in group):
            sid = get_id(i)
            if sid in firsts:
                drop.add(i)
            else:
                firsts[sid] = i
    if not drop:
        return None
    return np.setdiff1d(np.arange(len(hashes)), np.fromiter(drop, dtype=np.int64))


def _is_text(name: str) -> bool:
    return not name.lower().split("?")[0].endswith(TABLE_EXTENSIONS)


def _as_int(v) -> int:
    try:
        n = int(v)
        return n if n > 0 else 0
    except (TypeError, ValueError):
        return 0
