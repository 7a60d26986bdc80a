"""``datago serve``: a read-only, dataroom-compatible metadata API and file server.

It serves the samples of a local folder (or of any datago source that lists its
samples: an ``index``, ``webdataset`` shards with indexes) the way a dataroom
server does, so that a dataroom client (``DATAROOM_API_URL=http://HOST:P/api/``)
reads them over HTTP::

    datago serve /data/photos --host 127.0.0.1 --port 8000 --token SECRET
    datago serve --config index.json --source photos

At start-up everything a page needs is computed once: the listing, every image's
displayed size (header scan, cached on disk like the data loader's), every
sample's attributes (sidecars merged exactly as the data loader does), tags and
part names.  A page then costs the rows it scans, not the size of the set.
Samples whose image header cannot be read or whose sidecars cannot be parsed are
left out (one line on stderr says how many).

Endpoints
---------
``GET /api/images/`` (also without the trailing slash)
    ``{"next": URL|null, "previous": null, "results": [image, ...]}``, ordered by
    sample id.  ``next`` is the request's own URL (scheme and host as the client
    sent them) with the same parameters and ``cursor=<opaque>``; it is null when
    the scan reached the end.  A page may come back short (even empty) with a
    ``next`` when the filters matched nothing further in the rows it scanned.
``GET /api/images/random/``
    ``page_size`` samples drawn at random, without replacement, among those that
    match the same filters; ``next`` is always null.  Unlike the reference server
    (random image-hash prefixes, partitions ignored), the draw is uniform over
    all matches and **honours** ``partitions_count``/``partition``, so ranks
    never overlap.
``GET /files/{i}/{part}/{basename}``
    The bytes of one file (see *Files*).

Only GET and HEAD are allowed (405 otherwise); unknown paths give 404.  Errors
are JSON ``{"detail": "..."}``.

Auth
----
With a token (``--token`` or ``$DATAGO_SERVE_TOKEN``) the API needs the header
``Authorization: Token <t>`` (``Bearer <t>`` also works); otherwise 401.  File
URLs carry a signature instead (below), since dataroom clients fetch them
without the header.  Without a token everything is open.

Query parameters (``/api/images/`` and ``/api/images/random/``)
-------------------------------------------------------------
* ``page_size``: default 100, clamped to [1, ``--page-size-max``] (2000).
* ``cursor``: from ``next``; a malformed one gives 400.
* ``fields``: comma list of the fields below (``id`` is always there; unknown
  names ignored); absent: all of them.
* ``return_latents``: comma list of latent types kept in ``latents``; absent: all.
* ``sources`` / ``sources__ne``: the source name is / is not in the list.
* ``tags`` (has any of), ``tags__all`` (has all of), ``tags__ne`` (has none of),
  ``tags__ne_all`` (does not have all of), ``tags__empty`` (``true``/``false``).
* ``has_attributes`` / ``lacks_attributes``: has all / none of these attribute
  names; ``has_masks`` / ``lacks_masks``: mask names; ``has_latents`` /
  ``lacks_latents``: latent types of any kind (masks, additional images, arrays).
* ``short_edge__gte``, ``short_edge__lte``, ``pixel_count__gte``,
  ``pixel_count__lte``: numbers.
* ``duplicate_state``: an integer, equal to the attribute ``duplicate_state``.
* ``attributes``: ``name[__cmp]:value,...`` with cmp in ``eq`` (default), ``ne``,
  ``lt``, ``lte``, ``gt``, ``gte``, ``prefix``.  Values compare as numbers when
  both sides are numbers, else as strings (booleans as ``true``/``false``); a
  list-valued attribute matches when any element does; ``ne`` also matches a
  sample without the attribute.  An unknown cmp gives 400.
* ``partitions_count`` and ``partition`` (together; 0 <= partition < count):
  keeps the samples with ``xxhash.xxh64_intdigest(id.encode()) % count ==
  partition``, a stable split for any count >= 1.

All filters combine (AND).  A malformed value gives 400.

Image object
------------
``id`` (the sample id: the image's path relative to the folder), ``source``,
``image_direct_url``, ``width``, ``height`` (displayed size, EXIF orientation
applied), ``short_edge``, ``pixel_count``, ``aspect_ratio`` (width / height),
``tags`` (the ``tags`` attribute when it is a list of strings, else ``[]``),
``attributes`` (what the data loader gives: ``<key>.json`` merged, ``txt``,
named sidecars), ``duplicate_state`` (the attribute when an integer, else null),
``image_hash`` (``"sha256:<hex>"`` of the image bytes, computed when first
asked for), ``coca_embedding`` (null), ``latents``: one
``{"latent_type", "file_direct_url", "is_mask", "kind"}`` per mask
(kind ``mask``, ``is_mask`` true), additional image (kind ``image``) and
``.npy`` array (kind ``latent``).

Files
-----
``image_direct_url`` and ``file_direct_url`` are
``http://HOST:P/files/{i}/{part}/{basename}``: ``i`` is the sample's index in
the listing, ``part`` is ``image`` (the main image), ``mask/<name>``,
``image/<name>`` or ``latent/<name>``, and ``basename`` the file's own name (so
the URL ends in its extension).  With a token the URL ends in ``?s=<sig>``, the
first 32 hex digits of HMAC-SHA256(token, ``"{i}/{part}"``); a missing or wrong
signature gives 403.  Files support ``Range`` (one range: 206, or 416) and carry
an ``ETag``.  Parts inside tar shards or behind URLs are read through the
source's fetcher.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import mimetypes
import os
import socket
import stat
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import numpy as np
import xxhash

__all__ = ["Catalog", "build_catalog", "make_app", "serve", "FIELDS"]

FIELDS = ("id", "source", "image_direct_url", "width", "height", "short_edge",
          "pixel_count", "aspect_ratio", "tags", "attributes", "duplicate_state",
          "image_hash", "coca_embedding", "latents")
DEFAULT_PAGE_SIZE = 100
CMPS = ("eq", "ne", "lt", "lte", "gt", "gte", "prefix")
_KINDS = ("mask", "image", "latent")
_EMPTY: frozenset = frozenset()


class BadRequest(ValueError):
    """A query parameter that cannot be used (400)."""


# ---------------------------------------------------------------------------
# the catalog: everything a page needs, computed at start-up
# ---------------------------------------------------------------------------

def _basename(loc: Any) -> str:
    from datago.fetch import Member
    if isinstance(loc, Member):
        name = loc.name or urlsplit(loc.url).path
    else:
        name = getattr(loc, "name", None) or str(loc)
        if "://" in name:
            name = urlsplit(name).path
    return name.replace("\\", "/").rsplit("/", 1)[-1] or "file"


def _is_local_path(loc: Any) -> bool:
    return isinstance(loc, (str, os.PathLike)) and "://" not in str(loc)


class Catalog:
    """Per-sample metadata of a source in compact arrays, in id order ("positions").

    ``lidx[p]`` is the listing index of the sample at position ``p`` (what file
    URLs name); ``pos_of`` maps a listing index back (-1: not served).
    """

    def __init__(self, source, fetcher, name: str, ids: List[str], lidx: np.ndarray,
                 width: np.ndarray, height: np.ndarray, attrs: List[dict],
                 part_ids: np.ndarray, patterns: List[tuple], left_out: Dict[str, int]):
        self.source, self.fetcher, self.name = source, fetcher, name
        self.ids = ids
        self.lidx = lidx
        self.n = len(ids)
        self.pos_of = np.full(len(source), -1, dtype=np.int64)
        self.pos_of[lidx] = np.arange(self.n, dtype=np.int64)
        self.width = width.astype(np.int64)
        self.height = height.astype(np.int64)
        self.short_edge = np.minimum(self.width, self.height)
        self.pixel_count = self.width * self.height
        self.attrs = attrs
        self.hash = np.fromiter((xxhash.xxh64_intdigest(s.encode()) for s in ids),
                                dtype=np.uint64, count=self.n)
        dup = np.zeros(self.n, dtype=np.int64)
        dup_ok = np.zeros(self.n, dtype=bool)
        tags: List[tuple] = []
        tagsets: List[frozenset] = []
        for p, a in enumerate(attrs):
            d = a.get("duplicate_state")
            if isinstance(d, int) and not isinstance(d, bool) and -2**63 <= d < 2**63:
                dup[p], dup_ok[p] = d, True
            t = a.get("tags")
            if isinstance(t, list) and t and all(isinstance(x, str) for x in t):
                tags.append(tuple(t))
                tagsets.append(frozenset(t))
            else:
                tags.append(())
                tagsets.append(_EMPTY)
        self.dup, self.dup_ok = dup, dup_ok
        self.tags, self.tagsets = tags, tagsets
        self.part_ids = part_ids                      # position -> pattern id
        self.patterns = patterns                      # ((kind, name), ...) in ref order
        self.mask_names = [frozenset(n for k, n in pat if k == "mask") for pat in patterns]
        self.part_names = [frozenset(n for _, n in pat) for pat in patterns]
        self.left_out = left_out
        self._hashes: Dict[int, str] = {}
        self._hash_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="datago-serve-hash")

    # -------------------------------------------------------------- parts
    def part_location(self, i: int, part: Tuple[str, str]) -> Any:
        """Location of part ``("image", "")`` (main), ``(kind, name)`` of sample ``i``
        (listing index); None when it has no such part."""
        ref = self.source.ref(i)
        kind, name = part
        if kind == "image" and name == "":
            return ref.path
        for n, loc in {"mask": ref.masks, "image": ref.images, "latent": ref.latents}[kind]:
            if n == name:
                return loc
        return None

    # -------------------------------------------------------------- hashes
    def image_hashes(self, positions: Sequence[int]) -> Dict[int, Optional[str]]:
        """``"sha256:<hex>"`` of the main images at ``positions`` (memoised)."""
        out: Dict[int, Optional[str]] = {}
        todo = []
        for p in positions:
            h = self._hashes.get(p)
            if h is None:
                todo.append(p)
            else:
                out[p] = h

        def one(p: int) -> Optional[str]:
            try:
                data = self.fetcher.read(self.source.main_location(int(self.lidx[p])))
            except OSError:
                return None
            return "sha256:" + hashlib.sha256(data).hexdigest()

        results = self._pool.map(one, todo) if len(todo) > 1 else map(one, todo)
        for p, h in zip(todo, results):
            out[p] = h
            if h is not None:
                with self._hash_lock:
                    self._hashes[p] = h
        return out


def build_catalog(source, fetcher, name: str, *, cache_dir: Optional[str] = None,
                  sizes_cache: bool = True, threads: Optional[int] = None) -> Catalog:
    """Scan sizes, load attributes (a thread pool) and index part names."""
    from datago._engine import SampleError, merge_attributes
    from datago.sharding import shard_hash
    from datago.sources.sizes import scan_source

    n = len(source)
    ids = [source.sample_id(i) for i in range(n)]
    left_out: Dict[str, int] = {}

    def count(reason: str) -> None:
        left_out[reason] = left_out.get(reason, 0) + 1

    sizes = source.known_sizes() if n else None
    if sizes is None:
        hashes = np.fromiter((shard_hash(s) for s in ids), dtype=np.uint64, count=n)
        sizes = scan_source(source, fetcher, hashes, cache_dir=cache_dir,
                            use_cache=sizes_cache, threads=threads)
    readable = np.asarray(sizes.width > 0) & np.asarray(sizes.height > 0)

    attrs: List[Optional[dict]] = [None] * n
    pattern_ids: Dict[tuple, int] = {}
    part_of = np.zeros(n, dtype=np.int32)
    bad = np.zeros(n, dtype=bool)
    lock = threading.Lock()

    def work(chunk: range) -> None:
        for i in chunk:
            ref = source.ref(i)
            pat = tuple([("mask", nm) for nm, _ in ref.masks]
                        + [("image", nm) for nm, _ in ref.images]
                        + [("latent", nm) for nm, _ in ref.latents])
            pid = pattern_ids.get(pat)
            if pid is None:
                with lock:
                    pid = pattern_ids.setdefault(pat, len(pattern_ids))
            part_of[i] = pid
            if not readable[i]:
                continue
            try:
                texts = [(nm, fetcher.read(loc), loc) for nm, loc in ref.texts]
                attrs[i] = merge_attributes(ref, texts)     # the data loader's own merge
            except (SampleError, OSError):
                bad[i] = True

    if threads is None:
        threads = min(32, 4 * (os.cpu_count() or 1))
    chunks = [range(a, min(n, a + 256)) for a in range(0, n, 256)]
    if len(chunks) > 1:
        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="datago-serve-load") as pool:
            list(pool.map(work, chunks))
    else:
        for c in chunks:
            work(c)

    served = []
    for i in range(n):
        if not readable[i]:
            count("unreadable_image")
        elif bad[i]:
            count("bad_attributes")
        else:
            try:
                ids[i].encode()
            except UnicodeEncodeError:
                count("undecodable_id")
                continue
            served.append(i)
    served.sort(key=ids.__getitem__)
    lidx = np.asarray(served, dtype=np.int64)
    patterns = [None] * len(pattern_ids)
    for pat, pid in pattern_ids.items():
        patterns[pid] = pat
    return Catalog(source, fetcher, name, [ids[i] for i in served], lidx,
                   np.asarray(sizes.width)[lidx], np.asarray(sizes.height)[lidx],
                   [attrs[i] for i in served], part_of[lidx], patterns, left_out)


# ---------------------------------------------------------------------------
# queries
# ---------------------------------------------------------------------------

def _csv(value: Optional[str]) -> Optional[List[str]]:
    if value is None:
        return None
    items = [v for v in value.split(",") if v != ""]
    return items or None


def _int_param(name: str, value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise BadRequest(f"{name}: expected an integer, got {value!r}") from None


def _num_param(name: str, value: str) -> float:
    try:
        x = float(value.strip())
    except ValueError:
        x = math.nan
    if not math.isfinite(x):
        raise BadRequest(f"{name}: expected a number, got {value!r}")
    return x


def _as_number(v: Any):
    """A finite int/float for numbers and numeric strings, else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, str):
        s = v.strip()
        try:
            return int(s)
        except ValueError:
            pass
        try:
            x = float(s)
        except ValueError:
            return None
        return x if math.isfinite(x) else None
    return None


def _as_text(v: Any) -> Optional[str]:
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return json.dumps(v)
    return None


def _compare(v: Any, cmp: str, arg: str, arg_num) -> bool:
    """Whether one attribute value satisfies ``cmp arg`` (eq, lt, lte, gt, gte, prefix)."""
    if isinstance(v, list):
        return any(_compare(x, cmp, arg, arg_num) for x in v)
    if cmp == "prefix":
        t = _as_text(v)
        return t is not None and t.startswith(arg)
    num = _as_number(v) if arg_num is not None else None
    if num is not None:
        a, b = num, arg_num
    else:
        a, b = _as_text(v), arg
        if a is None:
            return False
    if cmp == "eq":
        return a == b
    if cmp == "lt":
        return a < b
    if cmp == "lte":
        return a <= b
    if cmp == "gt":
        return a > b
    return a >= b


def _attribute_filter(value: str) -> List[Callable[[dict], bool]]:
    preds = []
    for item in value.split(","):
        if item == "":
            continue
        name, sep, arg = item.partition(":")
        if not sep or not name:
            raise BadRequest(f"attributes: expected name[__cmp]:value, got {item!r}")
        cmp = "eq"
        if "__" in name:
            base, _, c = name.rpartition("__")
            if c not in CMPS or not base:
                raise BadRequest(f"attributes: unknown comparison {c!r} in {item!r} "
                                 f"(one of {', '.join(CMPS)})")
            name, cmp = base, c
        arg_num = _as_number(arg)
        if cmp == "ne":
            preds.append(lambda a, n=name, s=arg, x=arg_num:
                         n not in a or not _compare(a[n], "eq", s, x))
        else:
            preds.append(lambda a, n=name, c=cmp, s=arg, x=arg_num:
                         n in a and _compare(a[n], c, s, x))
    return preds


class Query:
    """The filters of one request: vectorised conditions on a slice of positions
    and Python predicates on single positions."""

    def __init__(self, cat: Catalog, params):
        self.cat = cat
        self.empty = False
        self.vec: List[Callable[[int, int], np.ndarray]] = []
        self.py: List[Callable[[int], bool]] = []
        get = params.get

        srcs = _csv(get("sources"))
        if srcs is not None and cat.name not in srcs:
            self.empty = True
        srcs_ne = _csv(get("sources__ne"))
        if srcs_ne is not None and cat.name in srcs_ne:
            self.empty = True

        tagsets = cat.tagsets
        t = _csv(get("tags"))
        if t is not None:
            s = frozenset(t)
            self.py.append(lambda p: not tagsets[p].isdisjoint(s))
        t = _csv(get("tags__all"))
        if t is not None:
            s = frozenset(t)
            self.py.append(lambda p: s <= tagsets[p])
        t = _csv(get("tags__ne"))
        if t is not None:
            s = frozenset(t)
            self.py.append(lambda p: tagsets[p].isdisjoint(s))
        t = _csv(get("tags__ne_all"))
        if t is not None:
            s = frozenset(t)
            self.py.append(lambda p: not s <= tagsets[p])
        te = get("tags__empty")
        if te not in (None, ""):
            v = te.strip().lower()
            if v not in ("true", "false", "1", "0"):
                raise BadRequest(f"tags__empty: expected true or false, got {te!r}")
            want_empty = v in ("true", "1")
            self.py.append(lambda p: (not tagsets[p]) == want_empty)

        attrs = cat.attrs
        a = _csv(get("has_attributes"))
        if a is not None:
            names = tuple(a)
            self.py.append(lambda p: all(k in attrs[p] for k in names))
        a = _csv(get("lacks_attributes"))
        if a is not None:
            names = tuple(a)
            self.py.append(lambda p: not any(k in attrs[p] for k in names))

        self._parts(get("has_masks"), cat.mask_names, True)
        self._parts(get("lacks_masks"), cat.mask_names, False)
        self._parts(get("has_latents"), cat.part_names, True)
        self._parts(get("lacks_latents"), cat.part_names, False)

        for key, arr, op in (("short_edge__gte", cat.short_edge, np.greater_equal),
                             ("short_edge__lte", cat.short_edge, np.less_equal),
                             ("pixel_count__gte", cat.pixel_count, np.greater_equal),
                             ("pixel_count__lte", cat.pixel_count, np.less_equal)):
            v = get(key)
            if v not in (None, ""):
                x = _num_param(key, v)
                self.vec.append(lambda a, b, arr=arr, op=op, x=x: op(arr[a:b], x))

        d = get("duplicate_state")
        if d not in (None, ""):
            x = _int_param("duplicate_state", d)
            dup, ok = cat.dup, cat.dup_ok
            self.vec.append(lambda a, b: ok[a:b] & (dup[a:b] == x))

        af = get("attributes")
        if af not in (None, ""):
            for pred in _attribute_filter(af):
                self.py.append(lambda p, pred=pred: pred(attrs[p]))

        count, part = get("partitions_count"), get("partition")
        if (count in (None, "")) != (part in (None, "")):
            raise BadRequest("partitions_count and partition go together")
        if count not in (None, ""):
            c = _int_param("partitions_count", count)
            k = _int_param("partition", part)
            if c < 1:
                raise BadRequest(f"partitions_count must be at least 1, got {c}")
            if not 0 <= k < c:
                raise BadRequest(f"partition must be in [0, {c}), got {k}")
            if c > 1:
                h, cu, ku = cat.hash, np.uint64(c), np.uint64(k)
                self.vec.append(lambda a, b: (h[a:b] % cu) == ku)

    def _parts(self, value: Optional[str], sets: List[frozenset], has: bool) -> None:
        names = _csv(value)
        if names is None:
            return
        want = frozenset(names)
        ok = np.fromiter(((want <= s) if has else s.isdisjoint(want) for s in sets),
                         dtype=bool, count=len(sets))
        if not len(ok):
            return
        pid = self.cat.part_ids
        self.vec.append(lambda a, b: ok[pid[a:b]])

    def _vector(self, a: int, b: int) -> np.ndarray:
        m = self.vec[0](a, b)
        for f in self.vec[1:]:
            m = m & f(a, b)
        return np.flatnonzero(m) + a

    def scan(self, start: int, limit: int) -> Tuple[List[int], int]:
        """Up to ``limit`` matching positions from ``start``, and where to go on."""
        n = self.cat.n
        if self.empty:
            return [], n
        out: List[int] = []
        py = self.py
        pos = start
        chunk = max(256, 2 * limit)
        while pos < n:
            end = min(n, pos + chunk)
            cand = self._vector(pos, end).tolist() if self.vec else range(pos, end)
            for p in cand:
                if all(f(p) for f in py):
                    out.append(p)
                    if len(out) == limit:
                        return out, p + 1
            pos = end
            chunk = min(4 * chunk, 1 << 18)
        return out, n

    def sample(self, k: int) -> List[int]:
        """``k`` matching positions drawn at random without replacement."""
        n = self.cat.n
        if self.empty or n == 0:
            return []
        cand = self._vector(0, n) if self.vec else np.arange(n)
        rng = np.random.default_rng()
        if not self.py:
            return rng.choice(cand, size=min(k, len(cand)), replace=False).tolist()
        out: List[int] = []
        for p in rng.permutation(cand).tolist():
            if all(f(p) for f in self.py):
                out.append(p)
                if len(out) == k:
                    break
        return out


# ---------------------------------------------------------------------------
# the app
# ---------------------------------------------------------------------------

def _encode_cursor(pos: int) -> str:
    return base64.urlsafe_b64encode(f"dg1:{pos}".encode()).decode().rstrip("=")


def _decode_cursor(value: str, n: int) -> int:
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode("ascii")
        tag, _, num = raw.partition(":")
        if tag != "dg1" or not num.isdigit():
            raise ValueError
        pos = int(num)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("invalid cursor") from None
    if pos > n:
        raise BadRequest("invalid cursor")
    return pos


def _sanitize(v: Any) -> Any:
    """Non-finite floats as null (strict JSON)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _sanitize(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_sanitize(x) for x in v]
    return v


def _json_bytes(obj: Any) -> bytes:
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:
        text = json.dumps(_sanitize(obj), ensure_ascii=False, allow_nan=False,
                          separators=(",", ":"))
    return text.encode("utf-8", "surrogatepass")


def _parse_range(value: Optional[str], size: int) -> Optional[Tuple[int, int]]:
    """(start, end exclusive) of a single ``bytes=`` range; None: ignore the header
    (absent, malformed, several ranges); raises IndexError when unsatisfiable."""
    if not value:
        return None
    unit, _, spec = value.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    a, sep, b = spec.strip().partition("-")
    a, b = a.strip(), b.strip()
    if not sep or (a == "" and b == "") or not (a.isdigit() or a == "") \
            or not (b.isdigit() or b == ""):
        return None
    if a == "":
        k = int(b)
        if k == 0 or size == 0:
            raise IndexError
        return max(0, size - k), size
    start = int(a)
    end = size - 1 if b == "" else min(int(b), size - 1)
    if b != "" and int(b) < start:
        return None
    if start >= size:
        raise IndexError
    return start, end + 1


def make_app(cat: Catalog, *, token: Optional[str] = None, page_size_max: int = 2000):
    """The starlette app serving ``cat`` (see the module docstring)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, Response
    from starlette.routing import Route

    token_b = token.encode() if token else None
    page_size_max = max(1, int(page_size_max))

    def error(status: int, detail: str, headers: Optional[dict] = None) -> Response:
        return Response(_json_bytes({"detail": detail}), status_code=status,
                        media_type="application/json", headers=headers)

    def authorized(request: Request) -> Optional[Response]:
        if token_b is None:
            return None
        header = request.headers.get("authorization")
        if not header:
            return error(401, "Authentication credentials were not provided.",
                         {"WWW-Authenticate": "Token"})
        scheme, _, given = header.strip().partition(" ")
        if scheme.lower() not in ("token", "bearer") or \
                not hmac.compare_digest(given.strip().encode("utf-8", "replace"), token_b):
            return error(401, "Invalid token.", {"WWW-Authenticate": "Token"})
        return None

    def signature(i: int, part: str) -> str:
        return hmac.new(token_b, f"{i}/{part}".encode("utf-8", "surrogatepass"),
                        hashlib.sha256).hexdigest()[:32]

    def file_url(base: str, i: int, kind: str, name: str, loc: Any) -> str:
        part = "image" if kind == "image" and name == "" else f"{kind}/{name}"
        quoted = "image" if part == "image" else f"{kind}/{quote(name, safe='')}"
        url = f"{base}/files/{i}/{quoted}/{quote(_basename(loc), safe='')}"
        return url + f"?s={signature(i, part)}" if token_b is not None else url

    def page_params(request: Request) -> Tuple[int, Optional[set], Optional[set]]:
        q = request.query_params
        ps = q.get("page_size")
        size = DEFAULT_PAGE_SIZE if ps in (None, "") else _int_param("page_size", ps)
        size = min(max(size, 1), page_size_max)
        f = _csv(q.get("fields"))
        fields = None if f is None else set(f) | {"id"}
        rl = _csv(q.get("return_latents"))
        return size, fields, (None if rl is None else set(rl))

    def results(request: Request, positions: List[int], fields: Optional[set],
                keep_latents: Optional[set]) -> List[dict]:
        want = (lambda f: True) if fields is None else fields.__contains__
        base = str(request.base_url).rstrip("/")
        hashes = cat.image_hashes(positions) if want("image_hash") else {}
        out = []
        for p in positions:
            i = int(cat.lidx[p])
            w, h = int(cat.width[p]), int(cat.height[p])
            r: Dict[str, Any] = {"id": cat.ids[p]}
            if want("source"):
                r["source"] = cat.name
            ref = cat.source.ref(i) if want("image_direct_url") or want("latents") else None
            if want("image_direct_url"):
                r["image_direct_url"] = file_url(base, i, "image", "", ref.path)
            if want("width"):
                r["width"] = w
            if want("height"):
                r["height"] = h
            if want("short_edge"):
                r["short_edge"] = min(w, h)
            if want("pixel_count"):
                r["pixel_count"] = w * h
            if want("aspect_ratio"):
                r["aspect_ratio"] = w / h
            if want("tags"):
                r["tags"] = list(cat.tags[p])
            if want("attributes"):
                r["attributes"] = cat.attrs[p]
            if want("duplicate_state"):
                r["duplicate_state"] = int(cat.dup[p]) if cat.dup_ok[p] else None
            if want("image_hash"):
                r["image_hash"] = hashes.get(p)
            if want("coca_embedding"):
                r["coca_embedding"] = None
            if want("latents"):
                lat = []
                for kind, group in (("mask", ref.masks), ("image", ref.images),
                                    ("latent", ref.latents)):
                    for name, loc in group:
                        if keep_latents is None or name in keep_latents:
                            lat.append({"latent_type": name,
                                        "file_direct_url": file_url(base, i, kind, name, loc),
                                        "is_mask": kind == "mask", "kind": kind})
                r["latents"] = lat
            out.append(r)
        return out

    def page(body: dict) -> Response:
        return Response(_json_bytes(body), media_type="application/json")

    def images(request: Request) -> Response:
        denied = authorized(request)
        if denied is not None:
            return denied
        try:
            size, fields, keep = page_params(request)
            c = request.query_params.get("cursor")
            start = 0 if c in (None, "") else _decode_cursor(c, cat.n)
            positions, nxt = Query(cat, request.query_params).scan(start, size)
        except BadRequest as e:
            return error(400, str(e))
        next_url = (str(request.url.include_query_params(cursor=_encode_cursor(nxt)))
                    if nxt < cat.n else None)
        return page({"next": next_url, "previous": None,
                     "results": results(request, positions, fields, keep)})

    def random_images(request: Request) -> Response:
        denied = authorized(request)
        if denied is not None:
            return denied
        try:
            size, fields, keep = page_params(request)
            positions = Query(cat, request.query_params).sample(size)
        except BadRequest as e:
            return error(400, str(e))
        return page({"next": None, "previous": None,
                     "results": results(request, positions, fields, keep)})

    not_found = "Not found."
    SMALL_FILE = 64 << 20
    FAST_FILE = 4 << 20

    class _Refused(Exception):
        def __init__(self, status: int, detail: str):
            self.status, self.detail = status, detail

    def locate(raw: str, given: str) -> Tuple[Any, str]:
        """(location, content type) of a ``/files/...`` path (raw, undecoded) whose
        signature is ``given``; ``_Refused`` with the status otherwise."""
        at = raw.find("/files/")
        segs = [unquote(s, errors="surrogateescape") for s in raw[at + 7:].split("/")]
        if len(segs) == 3 and segs[1] == "image":
            kind, name = "image", ""
        elif len(segs) == 4 and segs[1] in _KINDS and segs[2] != "":
            kind, name = segs[1], segs[2]
        else:
            raise _Refused(404, not_found)
        if not segs[0].isdigit() or not segs[0].isascii():
            raise _Refused(404, not_found)
        i = int(segs[0])
        if token_b is not None:
            part = "image" if name == "" else f"{kind}/{name}"
            if not hmac.compare_digest(given.encode("utf-8", "replace"),
                                       signature(i, part).encode()):
                raise _Refused(403, "Missing or invalid signature.")
        if i >= len(cat.pos_of) or cat.pos_of[i] < 0:
            raise _Refused(404, not_found)
        loc = cat.part_location(i, (kind, name))
        if loc is None or _basename(loc) != segs[-1]:
            raise _Refused(404, not_found)
        return loc, mimetypes.guess_type(segs[-1])[0] or "application/octet-stream"

    async def files(request: Request) -> Response:
        raw = request.scope.get("raw_path") or quote(request.url.path).encode()
        raw = raw.split(b"?", 1)[0].decode("latin-1")
        try:
            loc, ctype = locate(raw, request.query_params.get("s", ""))
        except _Refused as e:
            return error(e.status, e.detail)
        if _is_local_path(loc):
            return await run_in_threadpool(local, request, os.fspath(loc), ctype)
        return await run_in_threadpool(fetched, request, loc, ctype)

    def fast_file(scope) -> Optional[Tuple[list, bytes]]:
        """A plain GET of a small local file, answered without starlette (its
        routing, request and response objects and a threadpool hop cost ~0.5 ms of
        CPU per image; this ~0.1 ms): (headers, body), or None to let the app
        answer (errors, ranges, conditional requests, big or remote files)."""
        for k, _ in scope["headers"]:
            if k in (b"range", b"if-none-match", b"if-range"):
                return None
        raw = (scope.get("raw_path") or b"").split(b"?", 1)[0].decode("latin-1")
        given = ""
        for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
            if key == "s":
                given = value
        try:
            loc, ctype = locate(raw, given)
        except _Refused:
            return None
        if not _is_local_path(loc):
            return None
        path = os.fspath(loc)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode) or st.st_size > FAST_FILE:
                    return None
                body = f.read()              # (page cache: ~30 us for an image)
        except OSError:
            return None
        headers = [(b"content-type", ctype.encode("latin-1")),
                   (b"content-length", str(len(body)).encode()),
                   (b"accept-ranges", b"bytes"),
                   (b"etag", f'"{st.st_mtime_ns:x}-{st.st_size:x}"'.encode())]
        return headers, body

    def local(request: Request, path: str, ctype: str) -> Response:
        """A local file in one threadpool call: read whole (up to SMALL_FILE) and
        sent as one body -- starlette's FileResponse hops threads per 64 KiB chunk,
        ~4 ms of CPU per image; it still streams the big files."""
        try:
            st = os.stat(path)
        except OSError:
            return error(404, not_found)
        if not stat.S_ISREG(st.st_mode):
            return error(404, not_found)
        if st.st_size > SMALL_FILE:
            return FileResponse(path, media_type=ctype, stat_result=st)
        etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'

        def read(a: int, b: int) -> bytes:
            with open(path, "rb") as f:
                f.seek(a)
                return f.read(b - a)

        try:
            return ranged(request, st.st_size, etag, read, ctype)
        except OSError:
            return error(404, not_found)

    def fetched(request: Request, loc: Any, ctype: str) -> Response:
        from datago.fetch import FetchError, Member
        try:
            if isinstance(loc, Member) and not loc.codec:     # a byte range: read only the slice
                etag = '"' + xxhash.xxh64_hexdigest(
                    f"{loc.url}|{loc.offset}|{loc.size}".encode("utf-8", "surrogatepass")) + '"'

                def read(a: int, b: int) -> bytes:
                    if a == 0 and b == loc.size:         # the whole member: its CRC checked
                        return cat.fetcher.read(loc)
                    return cat.fetcher.read(Member(loc.url, loc.offset + a, b - a, loc.name))
                return ranged(request, loc.size, etag, read, ctype)
            data = cat.fetcher.read(loc)
            return ranged(request, len(data), '"' + xxhash.xxh64_hexdigest(data) + '"',
                          lambda a, b: data[a:b], ctype)
        except FetchError as e:
            return error(502, f"cannot read the file: {e}")

    def ranged(request: Request, size: int, etag: str, read, ctype: str) -> Response:
        """A GET of ``size`` bytes with ETag, If-None-Match, If-Range and one Range
        (``read(a, b)`` gives bytes a..b-1); several ranges get the whole body."""
        headers = {"accept-ranges": "bytes", "etag": etag}
        inm = request.headers.get("if-none-match")
        if inm and (inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")]):
            return Response(status_code=304, headers=headers)
        try:
            rng = _parse_range(request.headers.get("range"), size)
        except IndexError:
            headers["content-range"] = f"bytes */{size}"
            return Response(status_code=416, headers=headers)
        if_range = request.headers.get("if-range")
        if rng is not None and if_range and if_range.strip() != etag:
            rng = None
        a, b = rng if rng is not None else (0, size)
        body = read(a, b) if b > a else b""
        if rng is not None:
            headers["content-range"] = f"bytes {a}-{b - 1}/{size}"
            return Response(body, status_code=206, media_type=ctype, headers=headers)
        return Response(body, media_type=ctype, headers=headers)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        detail = {404: not_found,
                  405: f'Method "{request.method}" not allowed.'}.get(exc.status_code,
                                                                     str(exc.detail))
        return error(exc.status_code, detail, dict(exc.headers or {}))

    async def server_error(request: Request, exc: Exception) -> Response:
        return error(500, "Internal server error.")

    routes = [Route("/api/images/", images, methods=["GET", "HEAD"]),
              Route("/api/images", images, methods=["GET", "HEAD"]),
              Route("/api/images/random/", random_images, methods=["GET", "HEAD"]),
              Route("/api/images/random", random_images, methods=["GET", "HEAD"]),
              Route("/files/{rest:path}", files, methods=["GET", "HEAD"])]
    inner = Starlette(routes=routes, exception_handlers={HTTPException: http_error,
                                                          Exception: server_error})

    async def app(scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "GET" and \
                scope["path"].startswith("/files/"):
            answer = fast_file(scope)
            if answer is not None:
                headers, body = answer
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await inner(scope, receive, send)

    app.starlette = inner
    return app


# ---------------------------------------------------------------------------
# runner
# ---------------------------------------------------------------------------

def open_source(root: Optional[str] = None, config: Optional[str] = None):
    """(fetcher, source, default name, cache_dir, sizes_cache) of a folder or a
    config file.  Raises ConfigError / OSError."""
    from datago.errors import ConfigError
    if config is not None:
        from datago.config import DatagoConfig
        from datago.sources import make_source
        with open(config, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except ValueError as e:
                raise ConfigError(f"{config}: not JSON: {e}") from None
        cfg = DatagoConfig.from_dict(d)
        if cfg.source_type == "db":
            raise ConfigError("source_type 'db' cannot be served (it is itself an API)")
        if getattr(cfg.source, "streaming", False):
            raise ConfigError("a streaming webdataset source lists no samples; "
                              "index its shards (datago index) and serve without streaming")
        fetcher, source = make_source(cfg)
        name = os.path.splitext(os.path.basename(config))[0]
        return (fetcher, source, name, getattr(cfg.source, "cache_dir", None),
                getattr(cfg.source, "sizes_cache", True))
    from datago.fetch import Fetcher
    from datago.sources.filesystem import FileListing
    source = FileListing(root)
    name = os.path.basename(os.path.abspath(root).rstrip(os.sep)) or "root"
    return Fetcher(), source, name, None, True


def _bind(host: str, port: int) -> socket.socket:
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP,
                              flags=socket.AI_PASSIVE)
    family, _, _, _, addr = info[0]
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only then
    # (without it every keep-alive response waits ~40 ms for a delayed ACK)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(root: Optional[str] = None, *, config: Optional[str] = None,
          host: str = "127.0.0.1", port: int = 8000, token: Optional[str] = None,
          source: Optional[str] = None, page_size_max: int = 2000,
          cache_dir: Optional[str] = None) -> int:
    """Run the server until interrupted (SIGINT/SIGTERM); the exit code."""
    try:
        import starlette  # noqa: F401  (checked here: make_app imports it)
        import uvicorn
    except ImportError as e:
        print(f"datago serve: {e}; install the extra: pip install 'datago[serve]'",
              file=sys.stderr)
        return 2
    from datago.errors import DatagoError
    if (root is None) == (config is None):
        print("datago serve: give a folder or --config FILE.json (one of them)", file=sys.stderr)
        return 2
    if not token:
        token = os.environ.get("DATAGO_SERVE_TOKEN") or None
    try:
        fetcher, src, name, cfg_cache, sizes_cache = open_source(root, config)
        cat = build_catalog(src, fetcher, source or name, cache_dir=cache_dir or cfg_cache,
                            sizes_cache=sizes_cache)
    except (DatagoError, OSError) as e:
        print(f"datago serve: {e}", file=sys.stderr)
        return 2
    if cat.left_out:
        print("datago serve: left out " + ", ".join(f"{v} {k.replace('_', ' ')}"
                                                   for k, v in sorted(cat.left_out.items())),
              file=sys.stderr)
    if token is None:
        print("datago serve: warning: no token (--token or $DATAGO_SERVE_TOKEN): "
              "the API and the files are open to anyone who can reach them", file=sys.stderr)
    app = make_app(cat, token=token, page_size_max=page_size_max)
    try:
        sock = _bind(host, port)
    except OSError as e:
        print(f"datago serve: cannot listen on {host}:{port}: {e}", file=sys.stderr)
        return 2
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"datago serve: http://{shown}:{bound}/api/ ({cat.n} samples, source {cat.name})",
          flush=True)
    sys.stderr.flush()
    # Idle connections close after uvicorn's 5 s.  75 s (nginx's default) made the
    # reference datago's db client 4x slower against this server, spinning at 1.2
    # cores (bench_db: 13 vs 57 img/s); datago's fetcher re-sends a request that
    # races an idle close on a fresh connection, so it needs no longer keep-alive.
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           lifespan="off", server_header=False,
                                           timeout_graceful_shutdown=5, timeout_keep_alive=5))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        cat._pool.shutdown(wait=False)
    return 0
