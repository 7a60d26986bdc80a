"""A dataroom-style metadata API (``source_type: "db"``): a paginated listing of
images, selected by filters, each pointing at its image, masks and latents by URL.

The contract is the one the reference datago's ``db`` source uses (see
``datago serve``, which implements it over your own data):

* ``GET {api_url}images/?fields=...&sources=...&page_size=...&<filters>`` with
  ``Authorization: Token <key>``; the answer is ``{"next": URL | null,
  "results": [{"id": ..., "image_direct_url": ..., "width": ..., "height": ...,
  "attributes": {...}, "tags": [...], "latents": [{"latent_type": ...,
  "file_direct_url": ..., "is_mask": ...}], ...}]}``; ``next`` is followed until
  it is null.
* The query parameters are the reference's, built from the same config keys
  (``query_params``): filters are sent only when set, size bounds only when > 0,
  ``return_latents`` = ``has_latents`` + ``has_masks``, and with more than one
  reader ``partitions_count`` / ``partition``.

Each row becomes a sample: the id is the API's ``id``; the image is
``image_direct_url``; each ``latents[]`` entry is a mask (``is_mask``, decoded
with nearest-neighbour into the image's bucket, ``batch["masks"][latent_type]``),
an additional image (its type contains "image" and not "latent_", into the same
bucket, ``batch["additional_images"][latent_type]``) or a raw latent
(``batch["latents"][latent_type]``: a ``.npy`` file becomes an array, another
format stays bytes).  A ``kind`` field in an entry (``mask``/``image``/``latent``,
as ``datago serve`` sends) overrides the type rule.  ``coca_embedding`` (with
``require_embeddings``) becomes ``batch["latents"]["coca_embedding"]`` (float32);
``tags``, ``source`` and ``duplicate_state`` become ``batch["tags"]``,
``batch["source"]`` and ``batch["duplicate_state"]`` (lists, one per sample);
``attributes`` become ``batch["attributes"]``.

Two ways to read
----------------
**Listing (default).**  The whole selection is paged once, at construction,
into a compact listing (ids, URLs, sizes, attributes: byte blobs, about the size
of the API's JSON), pages fetched ``page_prefetch`` ahead.  With ``width`` and
``height`` in the rows the epoch plan works without touching a pixel: equal
batches and the same bucket at every step on every rank, ``random_sampling`` as
a seeded shuffle, resumable.  Every rank pages the same selection (its order is
the API's, which must be stable: dataroom's cursor order is).  With
``listing_cache`` the listing is written to ``cache_dir`` (a file named by the
query) and read from there by later runs and, on a shared filesystem, by the
other ranks: with ``listing_wait_s`` > 0 ranks other than 0 wait for rank 0's
file instead of paging the API themselves.  Delete the file to list again.

**Streaming (``streaming: true``)**, for selections too large to list: each
(rank, DataLoader worker) pages its own partition of the selection
(``partitions_count`` = ranks x workers, ``partition`` = its number) while it
trains; no plan, so ``steps_per_epoch`` (or ``limit``) sets the batches per
rank and keeps ranks equal.  With ``random_sampling`` it reads
``images/random/``, which answers one page of random rows (``next: null``): it
is asked again and again, rows already read this pass are skipped (counted), and
the pass ends only by ``steps_per_epoch`` / ``limit``.  The open-source
dataroom server does not partition ``images/random/`` (its ranks may read the
same rows; ``datago serve`` does partition it) and caps ``partitions_count`` at
48.

Faults: every page's status and shape are checked.  5xx, 429, resets and
timeouts are retried (``datago.fetch``'s policy); 401/403/404 raise
``FetchError`` naming the URL (never the key); a page that is not JSON, has no
``results`` list, or a row without ``id`` raises ``DBPageError``; so does a
``next`` URL already visited (a repeated cursor).  The listing never ends
silently short.
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings
from array import array
from typing import Dict, Iterator, List, Optional, Tuple
from urllib.parse import urlencode, urlsplit

import numpy as np
import xxhash

from datago._prefetch import prefetched
from datago.errors import DatagoError
from datago.fetch import FetchError, Fetcher, Inline, redact
from datago.sources.base import SampleRef, Source
from datago.sources.index import _Blob, unique_rows
from datago.sources.sizes import SizesIndex

__all__ = ["DBPageError", "DBSource", "query_params"]

BASE_FIELDS = ("id", "source", "attributes", "height", "width", "tags")
LISTING_VERSION = 1
RANDOM_STALE_PAGES = 3          # random pages in a row with nothing new: the pass is stuck


class DBPageError(DatagoError, ValueError):
    """An API page that cannot be read as the contract says (not JSON, no
    ``results`` list, a row without ``id``, a repeated cursor)."""


def query_params(cfg, partitions: Optional[Tuple[int, int]] = None) -> List[Tuple[str, str]]:
    """The query of a ``DBSourceConfig``, as the reference sends it (only what is
    set); ``partitions``: (count, number) when more than one reader shares it."""
    fields = list(BASE_FIELDS) + ["image_direct_url"]   # DatagoDataset always needs it
    if cfg.has_masks or cfg.has_latents:
        fields.append("latents")
    for tag_filter in (cfg.tags, cfg.tags_all, cfg.tags_ne, cfg.tags_ne_all):
        if tag_filter:
            fields.append("tags")
    if cfg.tags_empty is not None:
        fields.append("tags")
    if cfg.require_embeddings:
        fields.append("coca_embedding")
    if cfg.duplicate_state is not None and cfg.duplicate_state >= 0:
        fields.append("duplicate_state")
    p: List[Tuple[str, str]] = [("fields", ",".join(fields)), ("sources", cfg.sources)]
    if cfg.sources_ne:
        p.append(("sources__ne", cfg.sources_ne))
    p.append(("page_size", str(cfg.page_size)))
    for key, name in (("tags", "tags"), ("tags__all", "tags_all"), ("tags__ne", "tags_ne"),
                      ("tags__ne_all", "tags_ne_all")):
        if getattr(cfg, name):
            p.append((key, getattr(cfg, name)))
    if cfg.tags_empty is not None:
        p.append(("tags__empty", "true" if cfg.tags_empty else "false"))
    for name in ("has_attributes", "lacks_attributes", "has_masks", "lacks_masks",
                 "has_latents", "lacks_latents"):
        if getattr(cfg, name):
            p.append((name, getattr(cfg, name)))
    wanted = ",".join(x for x in (cfg.has_latents, cfg.has_masks) if x)
    if wanted:
        p.append(("return_latents", wanted))
    for key, name in (("short_edge__gte", "min_short_edge"), ("short_edge__lte", "max_short_edge"),
                      ("pixel_count__gte", "min_pixel_count"),
                      ("pixel_count__lte", "max_pixel_count")):
        if getattr(cfg, name) > 0:
            p.append((key, str(getattr(cfg, name))))
    if cfg.duplicate_state is not None and cfg.duplicate_state > 0:
        p.append(("duplicate_state", str(cfg.duplicate_state)))
    if cfg.attributes:
        p.append(("attributes", cfg.attributes))
    if partitions is not None and partitions[0] > 1:
        p += [("partitions_count", str(partitions[0])), ("partition", str(partitions[1]))]
    return p


def _origin(url: str) -> tuple:
    p = urlsplit(url)
    return p.scheme, p.hostname, p.port or (443 if p.scheme == "https" else 80)


# ---------------------------------------------------------------------------- pages

class _Pages:
    """The pages of one query, fetched ``prefetch`` ahead in a thread of its own
    (``datago._prefetch``); iterating gives each page's validated ``results`` list;
    fetch errors are raised there, in order.  ``close()`` stops the thread."""

    def __init__(self, fetcher: Fetcher, url: str, api_url: str, key: str, prefetch: int):
        self._fetcher, self._first, self._key = fetcher, url, key
        self._origin = _origin(api_url)
        self._it = prefetched(self._walk(), prefetch, name="datago-db-pages")
        self.pages = 0

    def _headers(self, url: str) -> Dict[str, str]:
        # the key goes to the API's own origin only, never to a host a page points at
        if _origin(url) == self._origin:
            return {"Authorization": f"Token {self._key}", "Accept": "application/json"}
        return {"Accept": "application/json"}

    def _fetch(self, url: str, number: int) -> Tuple[list, Optional[str]]:
        try:
            body = self._fetcher.get(url, self._headers(url))
        except FetchError as e:
            if e.status in (401, 403):
                raise FetchError(f"dataroom API refused page {number} ({redact(url)}): HTTP "
                                 f"{e.status}; check the API key (DATAROOM_API_KEY)", e.reason,
                                 e.url, e.status, e.attempts) from None
            if e.status == 404:
                raise FetchError(f"dataroom API page {number} not found ({redact(url)}): HTTP "
                                 f"404; check the API URL (DATAROOM_API_URL, it ends in /api/)",
                                 e.reason, e.url, e.status, e.attempts) from None
            raise FetchError(f"dataroom API page {number}: {e}", e.reason, e.url, e.status,
                             e.attempts) from None
        return _parse_page(body, url, number)

    def _walk(self) -> Iterator[list]:
        url: Optional[str] = self._first
        seen = set()
        number = 0
        while url is not None:
            if url in seen:
                raise DBPageError(f"dataroom API: page {number + 1} repeats an earlier "
                                  f"page's cursor ({redact(url)}); stopping instead of "
                                  "reading the same rows again")
            seen.add(url)
            number += 1
            results, url = self._fetch(url, number)
            yield results

    def __iter__(self) -> Iterator[list]:
        for results in self._it:
            self.pages += 1
            yield results

    def close(self) -> None:
        self._it.close()


def _parse_page(body: bytes, url: str, number: int) -> Tuple[list, Optional[str]]:
    where = f"dataroom API page {number} ({redact(url)})"
    try:
        page = json.loads(body)
    except ValueError as e:
        raise DBPageError(f"{where} is not JSON: {e}") from None
    if not isinstance(page, dict):
        raise DBPageError(f"{where} is a JSON {type(page).__name__}, not an object")
    if "results" not in page:
        raise DBPageError(f"{where} has no 'results' (keys: {', '.join(map(str, page))[:200]})")
    results = page["results"]
    if not isinstance(results, list):
        raise DBPageError(f"{where}: 'results' is a {type(results).__name__}, not a list")
    for k, row in enumerate(results):
        if not isinstance(row, dict) or row.get("id") in (None, ""):
            raise DBPageError(f"{where}: result {k} has no 'id'")
    nxt = page.get("next")
    if nxt is not None and (not isinstance(nxt, str) or not nxt.startswith(("http://", "https://"))):
        raise DBPageError(f"{where}: 'next' is {type(nxt).__name__} {str(nxt)[:80]!r}, not a URL")
    return results, nxt


# ---------------------------------------------------------------------------- rows

def _kind(entry: dict) -> str:
    kind = entry.get("kind")
    if kind in ("mask", "image", "latent"):
        return kind
    ltype = str(entry.get("latent_type", ""))
    if "image" in ltype and "latent_" not in ltype:
        return "image"                       # the reference checks this first
    return "mask" if entry.get("is_mask") else "latent"


def compact_row(row: dict) -> Optional[dict]:
    """A row reduced to what a sample needs (the listing's line), or None when it
    has no image URL."""
    url = row.get("image_direct_url")
    if not isinstance(url, str) or not url:
        return None
    out: dict = {"id": str(row["id"]), "url": url,
                 "w": _int(row.get("width")), "h": _int(row.get("height"))}
    attrs = row.get("attributes")
    if isinstance(attrs, str):
        try:
            attrs = json.loads(attrs)
        except ValueError:
            attrs = {"attributes": attrs}
    if isinstance(attrs, dict) and attrs:
        out["a"] = attrs
    elif attrs not in (None, {}, ""):
        out["a"] = {"attributes": attrs}
    parts: Dict[str, list] = {}
    for entry in row.get("latents") or ():
        if not isinstance(entry, dict):
            continue
        loc = entry.get("file_direct_url")
        name = entry.get("latent_type")
        if not isinstance(loc, str) or not loc or not isinstance(name, str) or not name:
            continue
        parts.setdefault(_kind(entry), []).append([name, loc])
    if parts:
        out["p"] = parts
    meta: dict = {}
    if isinstance(row.get("tags"), list):
        meta["tags"] = [str(t) for t in row["tags"]]
    if row.get("source") is not None:
        meta["source"] = str(row["source"])
    if "duplicate_state" in row:
        ds = row["duplicate_state"]
        meta["duplicate_state"] = ds if isinstance(ds, int) and not isinstance(ds, bool) else -1
    if meta:
        out["m"] = meta
    emb = row.get("coca_embedding")
    if isinstance(emb, dict):
        emb = emb.get("vector")
    if isinstance(emb, list) and emb:
        out["e"] = emb
    return out


def _int(v) -> int:
    try:
        n = int(v)
        return n if n > 0 else 0
    except (TypeError, ValueError):
        return 0


def _npy(values) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(values, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def make_ref(c: dict) -> SampleRef:
    """The SampleRef of a compact row."""
    parts = c.get("p") or {}
    latents = tuple((n, loc) for n, loc in parts.get("latent", ()))
    if "e" in c:
        latents += (("coca_embedding", Inline(_npy(c["e"]), "coca_embedding.npy")),)
    return SampleRef(c["id"], c["url"],
                     masks=tuple((n, loc) for n, loc in parts.get("mask", ())),
                     images=tuple((n, loc) for n, loc in parts.get("image", ())),
                     attributes=c.get("a"), latents=latents, meta=c.get("m"))


# ---------------------------------------------------------------------------- the source

class DBSource(Source):
    """The rows of a dataroom-style API (see the module docstring)."""

    kind = "db"

    def __init__(self, cfg, fetcher: Optional[Fetcher] = None, *, rank: int = 0):
        self.cfg = cfg
        self.fetcher = fetcher or Fetcher()
        self.skipped: Dict[str, int] = {}
        self.pages = 0
        query = urlencode(query_params(cfg))
        self.query_url = f"{cfg.api_url}images/?{query}"
        key = xxhash.xxh64_hexdigest(f"{self.query_url}|{cfg.max_samples}".encode())
        self.root = f"db:{redact(cfg.api_url)}#{key}"
        self.listing_path: Optional[str] = None
        self._ids, self._urls, self._rows = _Blob(), _Blob(), _Blob()
        self._width = np.zeros(0, np.int32)
        self._height = np.zeros(0, np.int32)
        self.streaming = cfg.streaming
        if cfg.streaming:
            for b in (self._ids, self._urls, self._rows):
                b.freeze()
            return
        if cfg.listing_cache:
            from datago.sources.sizes import default_cache_dir
            folder = cfg.cache_dir or os.path.dirname(default_cache_dir())
            self.listing_path = os.path.join(folder, f"db-listing-{key}.jsonl")
            if rank > 0 and cfg.listing_wait_s > 0:
                self._wait_for(self.listing_path, cfg.listing_wait_s, rank)
            if os.path.isfile(self.listing_path):
                self._load(self._cached_rows(self.listing_path))
                return
        self._load(self._api_rows(), write=self.listing_path)

    # ------------------------------------------------------------------ listing
    def _api_rows(self) -> Iterator[dict]:
        pages = _Pages(self.fetcher, self.query_url, self.cfg.api_url, self.cfg.api_key,
                       self.cfg.page_prefetch)
        try:
            for results in pages:
                self.pages += 1
                for row in results:
                    yield row
        finally:
            pages.close()

    @staticmethod
    def _cached_rows(path: str) -> Iterator[dict]:
        with open(path, "rb") as f:
            head = json.loads(f.readline() or b"{}")
            if head.get("datago_db_listing") != LISTING_VERSION:
                raise DatagoError(f"{path} is not a datago db listing (version "
                                  f"{LISTING_VERSION}); delete it to list again")
            for line in f:
                yield {"_compact": json.loads(line)}

    @staticmethod
    def _wait_for(path: str, wait_s: float, rank: int) -> None:
        t0 = time.monotonic()
        while not os.path.isfile(path) and time.monotonic() - t0 < wait_s:
            time.sleep(0.2)
        if not os.path.isfile(path):
            warnings.warn(f"datago: rank {rank} waited {wait_s:g} s for rank 0's db listing "
                          f"({path}); paging the API itself", RuntimeWarning, stacklevel=3)

    def _load(self, rows: Iterator[dict], write: Optional[str] = None) -> None:
        hashes = array("Q")
        width, height = array("i"), array("i")
        limit = self.cfg.max_samples
        out = tmp = None
        if write:
            os.makedirs(os.path.dirname(write), exist_ok=True)
            tmp = f"{write}.{os.getpid()}.tmp"
            out = open(tmp, "w", encoding="utf-8")
            out.write(json.dumps({"datago_db_listing": LISTING_VERSION,
                                  "query": redact(self.query_url)}) + "\n")
        try:
            for row in rows:
                c = row["_compact"] if "_compact" in row else compact_row(row)
                if c is None:
                    self.skipped["no_image"] = self.skipped.get("no_image", 0) + 1
                    continue
                if out is not None:
                    out.write(json.dumps(c, separators=(",", ":")) + "\n")
                self._ids.add(c["id"])
                self._urls.add(c["url"])
                rest = {k: v for k, v in c.items() if k not in ("id", "url", "w", "h")}
                self._rows.add(json.dumps(rest, separators=(",", ":")) if rest else "")
                width.append(c["w"])
                height.append(c["h"])
                hashes.append(xxhash.xxh64_intdigest(c["id"].encode("utf-8", "surrogatepass")))
                if limit is not None and len(hashes) >= limit:
                    break
            if out is not None:
                out.close()
                os.replace(tmp, write)       # complete: other ranks and runs may read it
                out = None
        finally:
            if out is not None:
                out.close()
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        for b in (self._ids, self._urls, self._rows):
            b.freeze()
        self._width = np.frombuffer(width, np.int32).copy() if len(width) else np.zeros(0, np.int32)
        self._height = np.frombuffer(height, np.int32).copy() if len(height) else np.zeros(0, np.int32)
        keep = unique_rows(np.frombuffer(hashes, np.uint64) if len(hashes)
                           else np.zeros(0, np.uint64), self._ids.get)
        if keep is not None:
            self.skipped["duplicate_id"] = len(hashes) - len(keep)
            self._ids, self._urls, self._rows = (b.subset(keep) for b in
                                                 (self._ids, self._urls, self._rows))
            self._width, self._height = self._width[keep], self._height[keep]

    # ------------------------------------------------------------------ Source
    def __len__(self) -> int:
        return len(self._ids)

    def sample_id(self, i: int) -> str:
        return self._ids.get(i)

    def main_location(self, i: int) -> str:
        return self._urls.get(i)

    def remote(self) -> bool:
        return True

    def ref(self, i: int) -> SampleRef:
        rest = self._rows.get(i)
        c = json.loads(rest) if rest else {}
        c["id"], c["url"] = self._ids.get(i), self._urls.get(i)
        return make_ref(c)

    def known_sizes(self) -> Optional[SizesIndex]:
        if len(self) and (self._width > 0).all() and (self._height > 0).all():
            return SizesIndex.from_arrays(self._width, self._height)
        return None

    def memory_bytes(self) -> int:
        return (self._ids.nbytes() + self._urls.nbytes() + self._rows.nbytes()
                + self._width.nbytes + self._height.nbytes)

    # ------------------------------------------------------------------ streaming
    def stream_refs(self, shard: int, num_shards: int, counts: dict) -> Iterator[SampleRef]:
        """Streaming mode: one pass over partition ``shard`` of ``num_shards`` (the
        whole selection when 1), in the API's order; with ``random_sampling``
        random pages without end (see the module docstring).  ``counts`` gets
        the rows left out, by reason."""
        cfg = self.cfg
        parts = (num_shards, shard) if num_shards > 1 else None
        endpoint = "images/random/" if cfg.random_sampling else "images/"
        url = f"{cfg.api_url}{endpoint}?{urlencode(query_params(cfg, parts))}"
        if not cfg.random_sampling:
            yield from self._page_refs(url, counts, None)
            return
        seen: set = set()
        stale = 0
        while True:
            before = len(seen)
            yield from self._page_refs(url, counts, seen)
            stale = stale + 1 if len(seen) == before else 0
            if stale >= RANDOM_STALE_PAGES:
                raise DatagoError(
                    f"dataroom API: {RANDOM_STALE_PAGES} pages of images/random/ in a row gave "
                    f"only rows already read this pass ({len(seen)} distinct); the selection "
                    "is smaller than steps_per_epoch / limit asks for")

    def _page_refs(self, url: str, counts: dict, seen: Optional[set]) -> Iterator[SampleRef]:
        pages = _Pages(self.fetcher, url, self.cfg.api_url, self.cfg.api_key,
                       self.cfg.page_prefetch)
        try:
            for results in pages:
                counts["pages"] = counts.get("pages", 0) + 1
                for row in results:
                    c = compact_row(row)
                    if c is None:
                        counts["no_image"] = counts.get("no_image", 0) + 1
                        continue
                    if seen is not None:
                        if c["id"] in seen:
                            counts["random_repeat"] = counts.get("random_repeat", 0) + 1
                            continue
                        seen.add(c["id"])
                    yield make_ref(c)
        finally:
            pages.close()
