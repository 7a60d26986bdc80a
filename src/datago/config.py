"""Configuration: frozen dataclasses, validated on construction.

``DatagoConfig.from_dict`` / ``from_json`` accept the reference datago JSON schema
(``source_type``, ``source_config``, ``image_config``, ``limit``,
``samples_buffer_size``) plus datago's own top-level keys (``batch_size``,
``num_threads``, ``seed``, ``drop_last``, ``on_error``).  Unlike the reference,
an unknown key, a wrong type or an impossible value raises ``ConfigError`` naming
the key path (``image_config.min_aspect_ratio``) and, for a misspelt key, the
closest valid one.

Example::

    cfg = DatagoConfig.from_dict({
        "source_type": "file",
        "source_config": {"root_path": "/data/photos", "random_sampling": True},
        "image_config": {"crop_and_resize": True, "default_image_size": 512,
                         "downsampling_ratio": 16, "min_aspect_ratio": 0.5,
                         "max_aspect_ratio": 2.0},
        "batch_size": 32,
    })
"""

from __future__ import annotations

import difflib
import json
import math
import os
import warnings
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Mapping, Optional

from datago.buckets import make_buckets
from datago.errors import ConfigError
from datago.fetch import FetchConfig
from datago.image import DEFAULT_FILTER, DEFAULT_MAX_PIXELS

__all__ = ["BinsSourceConfig", "DatagoConfig", "DBSourceConfig", "FileSourceConfig",
           "ImageConfig", "IndexSourceConfig", "LoaderConfig", "TFRecordSourceConfig",
           "WebDatasetSourceConfig", "ZipSourceConfig"]

# source_type -> its source_config dataclass (filled in below)
SOURCE_CONFIGS: dict = {}

SUPPORTED_SOURCES = ("file", "index", "webdataset", "db", "zip", "tfrecord", "bins")
LATER_SOURCES: tuple = ()
FILTERS = ("triangle", "bicubic", "lanczos", "box")
ON_ERROR = ("skip", "raise")
REMAINDER = ("pad", "drop")
# the ``retries`` and ``max_object_bytes`` keys' defaults: the fetch layer's
DEFAULT_RETRIES = FetchConfig.retries
DEFAULT_MAX_OBJECT_BYTES = FetchConfig.max_object_bytes
ENCODE_FORMATS = ("png", "jpeg")
# keys the reference datago's READMEs still show (Go-era and current) that it
# ignores: accepted at any level with a DeprecationWarning (never a ConfigError);
# key -> what to use instead
LEGACY_IGNORED = {
    "prefetch_buffer_size": "samples_buffer_size bounds the samples in flight",
    "concurrency": "num_threads sets the decode threads",
    "page_size": "only the db source pages",
}


def _fail(path: str, message: str) -> None:
    raise ConfigError(f"{path}: {message}")


def _check_bool(path: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(path, f"must be true or false, got {value!r}")


def _check_int(path: str, value: Any, *, minimum: Optional[int] = None,
               maximum: Optional[int] = None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(path, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        _fail(path, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        _fail(path, f"must be <= {maximum}, got {value}")


def _check_number(path: str, value: Any, *, positive: bool = True) -> None:
    try:
        finite = math.isfinite(value)
    except (TypeError, OverflowError):
        finite = False
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not finite:
        shown = repr(value) if len(repr(value)) < 40 else repr(value)[:37] + "..."
        _fail(path, f"must be a number, got {shown}")
    if positive and value <= 0:
        _fail(path, f"must be > 0, got {value}")


def _check_choice(path: str, value: Any, choices) -> None:
    if value not in choices:
        _fail(path, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_layout(p: str, cfg) -> None:
    """``rank`` / ``world_size`` of a source config (world_size 0 means: detect)."""
    _check_int(f"{p}.rank", cfg.rank, minimum=0, optional=True)
    _check_int(f"{p}.world_size", cfg.world_size, minimum=0, optional=True)
    if cfg.world_size == 0:
        object.__setattr__(cfg, "world_size", None)
    if cfg.rank is not None and cfg.world_size is not None and cfg.rank >= cfg.world_size:
        _fail(f"{p}.rank", f"must be < world_size ({cfg.world_size}), got {cfg.rank}")


def _check_remote(p: str, cfg) -> None:
    """The keys every remote source shares (io_concurrency, timeout_s, retries,
    max_failures, cache_limit_bytes, max_object_bytes)."""
    _check_int(f"{p}.io_concurrency", cfg.io_concurrency, minimum=1, maximum=1024)
    _check_number(f"{p}.timeout_s", cfg.timeout_s)
    _check_int(f"{p}.retries", cfg.retries, minimum=0)
    if cfg.max_failures is not None:
        _check_number(f"{p}.max_failures", cfg.max_failures)
    _check_int(f"{p}.cache_limit_bytes", cfg.cache_limit_bytes, minimum=1, optional=True)
    _check_int(f"{p}.max_object_bytes", cfg.max_object_bytes, minimum=1)


def _check_folder(p: str, cfg, name: str) -> None:
    """An optional folder path (str or PathLike), stored as str."""
    v = getattr(cfg, name)
    if v is None:
        return
    if not isinstance(v, (str, os.PathLike)) or not str(v):
        _fail(f"{p}.{name}", f"must be a folder path, got {v!r}")
    object.__setattr__(cfg, name, os.fspath(v))


@dataclass(frozen=True)
class FileSourceConfig:
    """A local folder of images (reference ``source_type: "file"``)."""

    root_path: str
    """Folder walked recursively (symlinks followed); must exist."""
    random_sampling: bool = False
    """Shuffle the samples, reproducibly from ``seed`` and the epoch (``set_epoch``)."""
    rank: Optional[int] = None
    """This process's rank; None: ``torch.distributed`` if initialised, else ``$RANK``, else 0."""
    world_size: Optional[int] = None
    """Number of ranks; None (or 0, the reference's default): detected like ``rank``."""
    scan_sizes: bool = True
    """Read every image's size from its header up front (cached), so that each epoch
    can be planned: equal batches on every rank, synced buckets, resume.  False:
    streaming mode (batches filled as images arrive; no plan, no resume)."""
    cache_dir: Optional[str] = None
    """Folder of the sizes cache; None: ``$XDG_CACHE_HOME/datago/sizes``
    (``~/.cache/datago/sizes``)."""
    sizes_cache: bool = True
    """Read and write the sizes cache (False: rescan every headers each time)."""

    _section = "source_config"

    def __post_init__(self):
        p = self._section
        if not isinstance(self.root_path, (str, os.PathLike)) or not str(self.root_path):
            _fail(f"{p}.root_path", f"must be a folder path, got {self.root_path!r}")
        if not os.path.isdir(self.root_path):
            _fail(f"{p}.root_path", f"{str(self.root_path)!r} is not an existing folder")
        object.__setattr__(self, "root_path", os.fspath(self.root_path))
        _check_bool(f"{p}.random_sampling", self.random_sampling)
        _check_bool(f"{p}.scan_sizes", self.scan_sizes)
        _check_bool(f"{p}.sizes_cache", self.sizes_cache)
        _check_folder(p, self, "cache_dir")
        _check_layout(p, self)


@dataclass(frozen=True)
class IndexSourceConfig:
    """Samples listed in index files (``source_type: "index"``; see
    ``datago.sources.index``)."""

    index: Any
    """A CSV/TSV/JSONL/Parquet file, a text list of locations, a glob of them, an
    ``http(s)://`` URL, or a list of these."""
    url_column: str = "url"
    """Column of the sample locations (``path`` is taken when there is no ``url``)."""
    width_column: str = "width"
    height_column: str = "height"
    mask_columns: Optional[list] = None
    """Columns holding mask locations; None: a column named ``mask`` if any."""
    image_columns: list = field(default_factory=list)
    """Columns holding additional images."""
    random_sampling: bool = False
    rank: Optional[int] = None
    world_size: Optional[int] = None
    scan_sizes: bool = True
    """Read the sizes the index lacks from the image headers (cached)."""
    cache_dir: Optional[str] = None
    sizes_cache: bool = True
    io_concurrency: int = 64
    """Requests in flight per DataLoader worker for remote locations."""
    timeout_s: float = 30.0
    """Connect/read timeout of one request."""
    retries: int = DEFAULT_RETRIES
    """Retries of a failed request (connect errors, resets, timeouts, truncated
    bodies, 5xx, 429; jittered exponential backoff within a per-location deadline,
    see ``datago.fetch``), for the reads at construction (index files, size scans)
    and the samples after; 0: none.  ``DatagoDataset(config, fetch_retries=N)``
    overrides it."""
    max_failures: Optional[float] = None
    """Failed samples allowed per epoch and worker before the epoch fails: a count
    (>= 1) or a fraction (< 1) of the worker's samples; None: no limit."""
    cache_limit_bytes: Optional[int] = None
    """With it, remote bytes are kept in an LRU disk cache under ``cache_dir``
    (default ``~/.cache/datago``) of at most this size, shared by the node's workers
    and ranks; its hit ratio is in ``stats()["cache"]``."""
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES
    """The largest file or object read whole into memory (1 GiB): a larger one
    fails before its body is read, counted as ``too_large``.  A member read by
    offset from a server that ignores ``Range`` (it sends the whole object) is cut
    from it when the object is at most 16 MiB (or this, if smaller), else it fails
    as ``range_ignored``."""

    _section = "source_config"

    def __post_init__(self):
        p = self._section
        idx = self.index
        items = [idx] if isinstance(idx, (str, os.PathLike)) else idx
        if not isinstance(items, (list, tuple)) or not items or \
                not all(isinstance(i, (str, os.PathLike)) and str(i) for i in items):
            _fail(f"{p}.index", f"must be a file, URL or glob (or a list of them), got {idx!r}")
        object.__setattr__(self, "index", os.fspath(idx) if isinstance(idx, os.PathLike)
                           else (idx if isinstance(idx, str) else [os.fspath(i) for i in idx]))
        for name in ("url_column", "width_column", "height_column"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                _fail(f"{p}.{name}", f"must be a column name, got {v!r}")
        for name in ("mask_columns", "image_columns"):
            v = getattr(self, name)
            if v is None and name == "mask_columns":
                continue
            if not isinstance(v, (list, tuple)) or not all(isinstance(c, str) and c for c in v):
                _fail(f"{p}.{name}", f"must be a list of column names, got {v!r}")
        for name in ("random_sampling", "scan_sizes", "sizes_cache"):
            _check_bool(f"{p}.{name}", getattr(self, name))
        _check_layout(p, self)
        _check_folder(p, self, "cache_dir")
        _check_remote(p, self)


@dataclass(frozen=True)
class WebDatasetSourceConfig:
    """WebDataset tar shards (``source_type: "webdataset"``; see
    ``datago.sources.webdataset``), the reference's keys plus datago's."""

    url: Any
    """Shards: a brace pattern (``shard-{000000..000099}.tar``), a local path or
    glob, an ``http(s)://`` URL, or a list of these."""
    reference_image_type: str = "jpg"
    """Extension of the main image of a sample."""
    random_sampling: bool = False
    concurrent_downloads: int = 0
    """The reference's knob; when > 0 it sets ``io_concurrency`` (unless given)."""
    auth_token: str = field(default="", repr=False)
    """Sent as ``Authorization: Bearer ...``; never logged or shown."""
    rank: Optional[int] = None
    world_size: Optional[int] = None
    index_dir: Optional[str] = None
    """Folder of the shard indexes (``datago index --out``); else next to the shards."""
    cache_dir: Optional[str] = None
    """Where indexes built by streaming a shard are kept (default ``~/.cache/datago``)."""
    streaming: bool = False
    """Read the shards as streams, without indexes: each (rank, worker) streams its
    own shards, no epoch plan (see ``DatagoDataset``: ``steps_per_epoch``)."""
    io_concurrency: Optional[int] = None
    """Requests in flight per DataLoader worker (default 64)."""
    timeout_s: float = 30.0
    retries: int = DEFAULT_RETRIES
    max_failures: Optional[float] = None
    cache_limit_bytes: Optional[int] = None
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES
    """``timeout_s``, ``retries``, ``max_failures``, ``cache_limit_bytes``,
    ``max_object_bytes``: as in ``IndexSourceConfig``."""

    _section = "source_config"

    def __post_init__(self):
        p = self._section
        u = self.url
        items = [u] if isinstance(u, str) else u
        if not isinstance(items, (list, tuple)) or not items or \
                not all(isinstance(i, str) and i for i in items):
            _fail(f"{p}.url", f"must be a shard URL/path/pattern or a list of them, got {u!r}")
        if not isinstance(self.reference_image_type, str) or not self.reference_image_type:
            _fail(f"{p}.reference_image_type", f"must be an extension, got {self.reference_image_type!r}")
        _check_bool(f"{p}.random_sampling", self.random_sampling)
        _check_bool(f"{p}.streaming", self.streaming)
        _check_int(f"{p}.concurrent_downloads", self.concurrent_downloads, minimum=0)
        if not isinstance(self.auth_token, str):
            _fail(f"{p}.auth_token", "must be a string")
        _check_layout(p, self)
        _check_folder(p, self, "index_dir")
        _check_folder(p, self, "cache_dir")
        if self.io_concurrency is None:
            object.__setattr__(self, "io_concurrency",
                               self.concurrent_downloads if self.concurrent_downloads else 64)
        _check_remote(p, self)


def _comma_list(path: str, value: Any) -> str:
    """A filter list of the db source: a comma string or a list of strings, kept as
    the comma string the API takes ("" when empty)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, str) and v and "," not in v for v in value):
            _fail(path, f"must be a comma-separated string or a list of names, got {value!r}")
        return ",".join(value)
    if not isinstance(value, str):
        _fail(path, f"must be a comma-separated string or a list of names, got {value!r}")
    return ",".join(v.strip() for v in value.split(",") if v.strip())


DB_LIST_KEYS = ("sources", "sources_ne", "tags", "tags_all", "tags_ne", "tags_ne_all",
                "has_attributes", "lacks_attributes", "has_masks", "lacks_masks",
                "has_latents", "lacks_latents")


@dataclass(frozen=True)
class DBSourceConfig:
    """A dataroom-style metadata API (``source_type: "db"``; see
    ``datago.sources.db``): the reference's 25 keys plus datago's."""

    sources: Any
    """Sources to select (comma list or list); required, as in the reference."""
    page_size: int = 100
    """Rows per API page (the server caps it; dataroom: 2000)."""
    sources_ne: Any = ""
    require_images: bool = False
    """Reference key, accepted; DatagoDataset always asks for the image URL."""
    require_embeddings: bool = False
    """Also fetch ``coca_embedding`` (float32; ``batch["latents"]["coca_embedding"]``)."""
    tags: Any = ""
    tags_all: Any = ""
    tags_ne: Any = ""
    tags_ne_all: Any = ""
    tags_empty: Optional[bool] = None
    has_attributes: Any = ""
    lacks_attributes: Any = ""
    has_masks: Any = ""
    lacks_masks: Any = ""
    has_latents: Any = ""
    lacks_latents: Any = ""
    min_short_edge: int = 0
    max_short_edge: int = 0
    min_pixel_count: int = 0
    max_pixel_count: int = 0
    """Size bounds; 0 (the default) is not sent, as in the reference."""
    duplicate_state: Optional[int] = None
    """Only rows in this state (sent when > 0: 1 original, 2 duplicate)."""
    attributes: str = ""
    """Attribute filter, e.g. ``"aesthetic_score__gte:0.5,style:photo"``."""
    random_sampling: bool = False
    rank: Optional[int] = None
    world_size: Optional[int] = None
    api_url: Optional[str] = None
    """The API root (``https://host/api/``); default ``$DATAROOM_API_URL``."""
    api_key: Optional[str] = field(default=None, repr=False)
    """The token (``Authorization: Token ...``); default ``$DATAROOM_API_KEY``.
    Never logged, never in a repr or an error."""
    streaming: bool = False
    """Page the API while training instead of listing it first: each (rank,
    worker) reads its own partition (``partitions_count``/``partition``), no epoch
    plan; see ``datago.sources.db``."""
    max_samples: Optional[int] = None
    """Stop listing after this many rows (a quick look at a large selection)."""
    listing_cache: bool = False
    """Keep the listing in ``cache_dir`` and read it from there next time (every
    epoch, every rank on a shared filesystem) instead of paging the API."""
    listing_wait_s: float = 0.0
    """With ``listing_cache``: ranks other than 0 wait this long for rank 0 to
    write the listing (shared filesystem) instead of paging the API themselves."""
    page_prefetch: int = 4
    """Pages fetched ahead of the one being read."""
    scan_sizes: bool = True
    """Read the sizes the API does not give from the image headers."""
    cache_dir: Optional[str] = None
    sizes_cache: bool = True
    io_concurrency: int = 64
    timeout_s: float = 30.0
    retries: int = DEFAULT_RETRIES
    max_failures: Optional[float] = None
    cache_limit_bytes: Optional[int] = None
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES
    """``io_concurrency``, ``timeout_s``, ``retries``, ``max_failures``,
    ``cache_limit_bytes``, ``max_object_bytes``: as in ``IndexSourceConfig``
    (``retries`` covers the listing pages too)."""

    _section = "source_config"

    def __post_init__(self):
        p = self._section
        for name in DB_LIST_KEYS:
            object.__setattr__(self, name, _comma_list(f"{p}.{name}", getattr(self, name)))
        if not self.sources:
            _fail(f"{p}.sources", "must name at least one source")
        _check_int(f"{p}.page_size", self.page_size, minimum=1)
        for name in ("require_images", "require_embeddings", "random_sampling", "streaming",
                     "listing_cache", "scan_sizes", "sizes_cache"):
            _check_bool(f"{p}.{name}", getattr(self, name))
        if self.tags_empty is not None:
            _check_bool(f"{p}.tags_empty", self.tags_empty)
        for name in ("min_short_edge", "max_short_edge", "min_pixel_count", "max_pixel_count"):
            _check_int(f"{p}.{name}", getattr(self, name), minimum=0)
        _check_int(f"{p}.duplicate_state", self.duplicate_state, optional=True)
        if not isinstance(self.attributes, str):
            _fail(f"{p}.attributes", f"must be a filter string like 'name__gte:0.5', "
                  f"got {self.attributes!r}")
        _check_int(f"{p}.max_samples", self.max_samples, minimum=1, optional=True)
        _check_int(f"{p}.page_prefetch", self.page_prefetch, minimum=1, maximum=64)
        if not isinstance(self.listing_wait_s, (int, float)) or isinstance(self.listing_wait_s, bool) \
                or self.listing_wait_s < 0:
            _fail(f"{p}.listing_wait_s", f"must be a number >= 0, got {self.listing_wait_s!r}")
        url = self.api_url if self.api_url is not None else os.environ.get("DATAROOM_API_URL")
        if not url:
            _fail(f"{p}.api_url", "no API URL: set DATAROOM_API_URL (e.g. https://host/api/) "
                  "or source_config.api_url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            from datago.fetch import redact
            _fail(f"{p}.api_url", f"must be an http(s):// URL, got {redact(str(url))!r}")
        object.__setattr__(self, "api_url", url if url.endswith("/") else url + "/")
        key = self.api_key if self.api_key is not None else os.environ.get("DATAROOM_API_KEY")
        if not key:
            _fail(f"{p}.api_key", "no API key: set DATAROOM_API_KEY or source_config.api_key")
        if not isinstance(key, str) or any(c in key for c in "\r\n"):
            _fail(f"{p}.api_key", "must be a single-line string")
        object.__setattr__(self, "api_key", key)
        _check_layout(p, self)
        _check_folder(p, self, "cache_dir")
        _check_remote(p, self)


def _check_urls(p: str, cfg, name: str = "path") -> None:
    """A location key: one path/URL/glob/brace pattern or a non-empty list of them."""
    u = getattr(cfg, name)
    items = [u] if isinstance(u, (str, os.PathLike)) else u
    if not isinstance(items, (list, tuple)) or not items or \
            not all(isinstance(i, (str, os.PathLike)) and str(i) for i in items):
        _fail(f"{p}.{name}", f"must be a path, URL or pattern (or a list of them), got {u!r}")
    object.__setattr__(cfg, name, os.fspath(u) if isinstance(u, os.PathLike)
                       else (u if isinstance(u, str) else [os.fspath(i) for i in u]))


def _check_archive(p: str, cfg) -> None:
    """The keys archive sources (zip, tfrecord, bins) share."""
    _check_urls(p, cfg)
    for name in ("random_sampling", "scan_sizes", "sizes_cache"):
        _check_bool(f"{p}.{name}", getattr(cfg, name))
    _check_layout(p, cfg)
    _check_folder(p, cfg, "cache_dir")
    _check_remote(p, cfg)


@dataclass(frozen=True, kw_only=True)
class _ArchiveKeys:
    """The keys archive sources (zip, tfrecord, bins) share, as in
    ``IndexSourceConfig`` (``scan_sizes`` is moot for bins: their index has every
    size)."""

    random_sampling: bool = False
    rank: Optional[int] = None
    world_size: Optional[int] = None
    scan_sizes: bool = True
    cache_dir: Optional[str] = None
    sizes_cache: bool = True
    io_concurrency: int = 64
    timeout_s: float = 30.0
    retries: int = DEFAULT_RETRIES
    max_failures: Optional[float] = None
    cache_limit_bytes: Optional[int] = None
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES


@dataclass(frozen=True)
class ZipSourceConfig(_ArchiveKeys):
    """ZIP archives (``source_type: "zip"``; see ``datago.sources.zip``)."""

    path: Any
    """ZIP files: paths, globs, brace patterns, ``http(s)://`` or ``s3://`` URLs, or a list."""
    max_member_bytes: int = 1 << 30
    """A member declaring more (inflated) bytes than this is refused and counted."""
    max_ratio: float = 1000.0
    """A member whose declared size is more than this times its compressed size is
    refused and counted (a ZIP bomb)."""

    _section = "source_config"

    def __post_init__(self):
        p = self._section
        _check_archive(p, self)
        _check_int(f"{p}.max_member_bytes", self.max_member_bytes, minimum=1)
        _check_number(f"{p}.max_ratio", self.max_ratio)


@dataclass(frozen=True)
class TFRecordSourceConfig(_ArchiveKeys):
    """TFRecord files of ``tf.train.Example`` (``source_type: "tfrecord"``; see
    ``datago.sources.tfrecord``), read without TensorFlow."""

    path: Any
    """TFRecord files: paths, globs, brace patterns, URLs, or a list."""
    image_key: str = "image/encoded"
    """The feature holding the encoded image."""
    id_key: Optional[str] = None
    """A bytes feature holding the sample id (e.g. ``image/filename``); None (or a
    record without it): ``<file name>:<record index>``."""
    compression: Optional[str] = None
    """None: by extension (``.gz`` is gzip); "gzip" or "none"."""
    index_dir: Optional[str] = None
    """Folder of the record indexes (the ``tfrecord`` package's ``.index`` files
    are accepted); else next to local files, else built and cached in ``cache_dir``."""

    _section = "source_config"

    def __post_init__(self):
        p = self._section
        _check_archive(p, self)
        if not isinstance(self.image_key, str) or not self.image_key:
            _fail(f"{p}.image_key", f"must be a feature name, got {self.image_key!r}")
        if self.id_key is not None and (not isinstance(self.id_key, str) or not self.id_key):
            _fail(f"{p}.id_key", f"must be a feature name or null, got {self.id_key!r}")
        _check_choice(f"{p}.compression", self.compression, (None, "gzip", "none"))
        _check_folder(p, self, "index_dir")


@dataclass(frozen=True)
class BinsSourceConfig(_ArchiveKeys):
    """A dataset written as N bins plus an index (``datago.bins``;
    ``source_type: "bins"``)."""

    path: Any
    """The dataset's folder (local path or ``http(s)://`` URL of it), holding
    ``index.jsonl`` and the bins; its index gives every size, so no header is read."""

    _section = "source_config"

    def __post_init__(self):
        p = self._section
        if isinstance(self.path, (list, tuple)):
            _fail(f"{p}.path", "must be one folder (path or URL) holding index.jsonl and "
                  "the bins, got a list")
        _check_archive(p, self)
        if not self.path.startswith(("http://", "https://", "s3://")) and \
                not os.path.isdir(self.path):
            _fail(f"{p}.path", f"{self.path!r} is not an existing folder")


MIX_EXHAUSTED = ("stop", "cycle")
MAX_MIX_SOURCES = 16


@dataclass(frozen=True)
class MixSourceConfig:
    """Several sources mixed with weights (top-level ``"sources": [{"weight": w,
    "source_type": ..., "source_config": ...}, ...]``; see ``datago.sources.mix``)."""

    sources: tuple
    """((weight, source_type, source config), ...), weights > 0 (normalised)."""
    exhausted: str = "stop"
    """When a source has no samples left for its share: "stop" ends the epoch there
    (the epoch is as long as the scarcest source allows); "cycle" reads it again,
    reshuffled (the epoch is as long as the most plentiful source needs)."""
    random_sampling: bool = True
    rank: Optional[int] = None
    world_size: Optional[int] = None
    scan_sizes: bool = True
    cache_dir: Optional[str] = None
    sizes_cache: bool = True

    _section = ""

    def __post_init__(self):
        if not isinstance(self.sources, (list, tuple)) or not self.sources:
            _fail("sources", "must be a non-empty list of {weight, source_type, source_config}")
        if len(self.sources) > MAX_MIX_SOURCES:
            _fail("sources", f"at most {MAX_MIX_SOURCES} sources, got {len(self.sources)}")
        object.__setattr__(self, "sources", tuple(tuple(x) for x in self.sources))
        _check_choice("exhausted", self.exhausted, MIX_EXHAUSTED)
        layouts = set()
        for k, (weight, stype, src) in enumerate(self.sources):
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                    or not math.isfinite(weight) or weight <= 0:
                _fail(f"sources[{k}].weight", f"must be a number > 0, got {weight!r}")
            if stype == "mix" or not isinstance(src, SOURCE_CONFIGS.get(stype, ())):
                _fail(f"sources[{k}]", f"must hold a source config, got {type(src).__name__}")
            if getattr(src, "streaming", False):
                _fail(f"sources[{k}].source_config.streaming", "a mixed source must list its "
                      "samples (the mix is planned per epoch)")
            if src.rank is not None or src.world_size is not None:
                layouts.add((src.rank, src.world_size))
        if len(layouts) > 1:
            _fail("sources", f"the sources give different rank/world_size: {sorted(layouts)}")
        if layouts:
            rank, world = layouts.pop()
            object.__setattr__(self, "rank", rank)
            object.__setattr__(self, "world_size", world)

    @property
    def io_concurrency(self) -> int:
        return max((getattr(s, "io_concurrency", 0) for _, _, s in self.sources), default=0)

    @property
    def max_failures(self):
        return None


@dataclass(frozen=True)
class ImageConfig:
    """Image processing: aspect-ratio buckets and the output format."""

    crop_and_resize: bool = True
    """Cover-resize and centre-crop every image into its bucket (needed for batches)."""
    default_image_size: int = 512
    """Side of the square bucket; buckets have at most this many pixels squared."""
    downsampling_ratio: int = 16
    """VAE factor / patch size: every bucket side is a multiple of it."""
    min_aspect_ratio: float = 0.5
    """Smallest bucket aspect ratio (width / height)."""
    max_aspect_ratio: float = 2.0
    """Largest bucket aspect ratio (width / height)."""
    pre_encode_images: bool = False
    """DatagoClient only: re-encode processed images (``encode_format``), as the reference."""
    image_to_rgb8: bool = False
    """Accepted for compatibility: datago always delivers 8-bit RGB (alpha composited)."""
    encode_format: str = "png"
    """``"png"`` or ``"jpeg"``, for ``pre_encode_images``."""
    jpeg_quality: int = 92
    """0-100, for ``pre_encode_images`` with JPEG."""
    filter: str = DEFAULT_FILTER
    """Resampling filter: "triangle", "bicubic", "lanczos" or "box" (masks use nearest)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images announcing more pixels are skipped (decompression-bomb guard)."""
    mask_palette: Optional[dict] = None
    """Colour-coded masks to class ids: ``{mask name: [[r, g, b], ...]}``; a mask
    of that name (``"*"``: any mask without its own entry) is read as colours
    and each pixel becomes the index of its colour in the list (uint8 ids for up
    to 256 colours, else int32).  A colour not in the list skips the sample
    (``mask_mismatch``).  Without an entry, RGB masks are kept as 3 channels."""

    _section = "image_config"

    def __post_init__(self):
        p = self._section
        for name in ("crop_and_resize", "pre_encode_images", "image_to_rgb8"):
            _check_bool(f"{p}.{name}", getattr(self, name))
        _check_int(f"{p}.default_image_size", self.default_image_size, minimum=1)
        _check_int(f"{p}.downsampling_ratio", self.downsampling_ratio, minimum=1)
        _check_number(f"{p}.min_aspect_ratio", self.min_aspect_ratio)
        _check_number(f"{p}.max_aspect_ratio", self.max_aspect_ratio)
        if self.min_aspect_ratio > self.max_aspect_ratio:
            _fail(f"{p}.min_aspect_ratio", f"{self.min_aspect_ratio} is larger than "
                  f"max_aspect_ratio {self.max_aspect_ratio}")
        if self.downsampling_ratio > self.default_image_size:
            _fail(f"{p}.downsampling_ratio", f"{self.downsampling_ratio} is larger than "
                  f"default_image_size {self.default_image_size}")
        _check_choice(f"{p}.encode_format", self.encode_format, ENCODE_FORMATS)
        _check_int(f"{p}.jpeg_quality", self.jpeg_quality, minimum=0, maximum=100)
        _check_choice(f"{p}.filter", self.filter, FILTERS)
        _check_int(f"{p}.max_pixels", self.max_pixels, minimum=1)
        if self.mask_palette is not None:
            object.__setattr__(self, "mask_palette",
                               _check_palettes(f"{p}.mask_palette", self.mask_palette))

    @property
    def buckets(self) -> list:
        """The bucket list ``[Bucket(height, width), ...]``, sorted by aspect ratio
        (see ``make_buckets``; the reference datago lists the same sizes as
        ``(width, height)``)."""
        return make_buckets(self.default_image_size, self.downsampling_ratio,
                            self.min_aspect_ratio, self.max_aspect_ratio)


def _check_palettes(path: str, value: Any) -> dict:
    """``{name: [[r, g, b], ...]}`` -> ``{name: ((r, g, b), ...)}``, validated."""
    if not isinstance(value, Mapping):
        _fail(path, f"must be an object {{mask name: [[r, g, b], ...]}}, got {value!r}")
    out = {}
    for name, colours in value.items():
        p = f"{path}.{name}"
        if not isinstance(name, str) or not name:
            _fail(path, f"mask names must be non-empty strings, got {name!r}")
        if isinstance(colours, (str, bytes)) or not isinstance(colours, (list, tuple)) or not colours:
            _fail(p, f"must be a non-empty list of [r, g, b] colours, got {colours!r}")
        seen = {}
        for i, c in enumerate(colours):
            if (not isinstance(c, (list, tuple)) or len(c) != 3
                    or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 255
                           for v in c)):
                _fail(f"{p}[{i}]", f"must be [r, g, b] with integers 0..255, got {c!r}")
            c = tuple(c)
            if c in seen:
                _fail(f"{p}[{i}]", f"colour {list(c)} is already id {seen[c]}")
            seen[c] = i
        out[name] = tuple(seen)
    return out


@dataclass(frozen=True)
class LoaderConfig:
    """How samples are read, decoded, counted and batched."""

    batch_size: Optional[int] = None
    """Samples per batch (one bucket per batch); None: one sample at a time."""
    num_threads: Optional[int] = None
    """Decode threads per DataLoader worker; None: available cores / workers."""
    samples_buffer_size: int = 64
    """Samples being read or decoded at once, per worker (bounds memory)."""
    limit: Optional[int] = None
    """Samples per rank per epoch (all its workers together); None: one full pass."""
    seed: int = 0
    """Seed of the shuffle (with ``random_sampling``)."""
    drop_last: bool = False
    """At the end of an epoch, drop batches that are not full instead of yielding them."""
    on_error: str = "skip"
    """A corrupt or unreadable file: "skip" (count it, warn once per reason) or "raise"."""
    sync_buckets: bool = True
    """Every rank's batch at step t has the same bucket (global batches of
    world_size x batch_size from one bucket).  False: each rank batches its own
    share in its own order (shapes differ across ranks at a step; padding and
    dropping are the same)."""
    remainder: str = "pad"
    """The last, incomplete global batch of each bucket: "pad" (complete it by
    repeating samples of that bucket; every sample appears at least once per
    epoch) or "drop" (leave its samples out this epoch, counted)."""
    prefetch_batches: int = 2
    """Batches being decoded or waiting, per DataLoader worker (bounds memory)."""
    max_open_batches: int = 8
    """Streaming mode (scan_sizes=false): loaded samples wait, undecoded, for their
    bucket's batch to fill; at most this many batches' worth (x batch_size) per
    worker: one more, and the bucket with the most waiting is decoded and yielded
    early (counted as early_flushed)."""
    shared_pool_bytes: int = 256 << 20
    """In a DataLoader worker: bytes of shared-memory batch buffers kept for reuse
    (``datago._shm``); batches beyond it get fresh buffers, freed once the trainer
    drops them (slower: page faults).  0 turns the pool off."""
    steps_per_epoch: Optional[int] = None
    """Streaming modes: every rank yields exactly this many batches per epoch (its
    samples are read again, reshuffled, when they run out first), so no rank waits
    for another at the end of an epoch.  None: one pass over each rank's samples,
    and with more than one rank the number is counted (folder: the listing;
    WebDataset: the shard indexes, built by a first pass when missing) as
    samples // (world_size * batch_size)."""

    _section = ""

    def __post_init__(self):
        p = self._section
        _check_int(f"{p}batch_size", self.batch_size, minimum=1, optional=True)
        _check_int(f"{p}num_threads", self.num_threads, minimum=1, optional=True)
        _check_int(f"{p}samples_buffer_size", self.samples_buffer_size, minimum=1)
        _check_int(f"{p}limit", self.limit, minimum=1, optional=True)
        _check_int(f"{p}seed", self.seed, minimum=0)
        _check_bool(f"{p}drop_last", self.drop_last)
        _check_choice(f"{p}on_error", self.on_error, ON_ERROR)
        _check_bool(f"{p}sync_buckets", self.sync_buckets)
        _check_choice(f"{p}remainder", self.remainder, REMAINDER)
        _check_int(f"{p}prefetch_batches", self.prefetch_batches, minimum=1)
        _check_int(f"{p}max_open_batches", self.max_open_batches, minimum=1)
        _check_int(f"{p}steps_per_epoch", self.steps_per_epoch, minimum=1, optional=True)
        _check_int(f"{p}shared_pool_bytes", self.shared_pool_bytes, minimum=0)


@dataclass(frozen=True)
class DatagoConfig:
    """Everything a DatagoDataset needs; build it directly or with ``from_dict``."""

    source: Any
    """The source's config (``FileSourceConfig``, ``IndexSourceConfig``, ...)."""
    image: Optional[ImageConfig] = field(default_factory=ImageConfig)
    """None: images are delivered at their own size (per-sample mode only)."""
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    source_type: str = "file"

    def __post_init__(self):
        if self.source_type in LATER_SOURCES:
            _fail("source_type", f"{self.source_type!r} is not supported yet "
                  f"(supported: {', '.join(map(repr, SUPPORTED_SOURCES))})")
        if self.source_type != "mix":          # (a mix is built from "sources", not named)
            _check_choice("source_type", self.source_type, SUPPORTED_SOURCES)
        want = SOURCE_CONFIGS[self.source_type]
        if not isinstance(self.source, want):
            _fail("source_config", f"must be a {want.__name__} for source_type "
                  f"{self.source_type!r}, got {type(self.source).__name__}")
        if self.image is not None and not isinstance(self.image, ImageConfig):
            _fail("image_config", f"must be an ImageConfig or None, got {type(self.image).__name__}")
        if not isinstance(self.loader, LoaderConfig):
            _fail("loader", f"must be a LoaderConfig, got {type(self.loader).__name__}")
        if self.loader.batch_size is not None and not self.crop_and_resize:
            _fail("batch_size", "batches need image_config.crop_and_resize = true "
                  "(images of one batch must share a bucket)")

    @property
    def crop_and_resize(self) -> bool:
        return self.image is not None and self.image.crop_and_resize

    @property
    def buckets(self) -> Optional[list]:
        return self.image.buckets if self.crop_and_resize else None

    # ------------------------------------------------------------------ parsing
    @classmethod
    def coerce(cls, config: Any) -> "DatagoConfig":
        """A ``DatagoConfig`` from one, a dict or a JSON string (what every public
        constructor accepts); ``ConfigError`` for anything else."""
        if isinstance(config, cls):
            return config
        if isinstance(config, str):
            return cls.from_json(config)
        if isinstance(config, Mapping):
            return cls.from_dict(config)
        raise ConfigError(f"config must be a DatagoConfig, a dict or a JSON string, "
                          f"got {type(config).__name__}")

    @classmethod
    def from_json(cls, text: str) -> "DatagoConfig":
        """Parse a JSON string (the reference datago's config format)."""
        try:
            d = json.loads(text)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config is not valid JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DatagoConfig":
        """Build from the reference JSON schema plus datago's top-level keys."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"config must be a JSON object / dict, got {type(d).__name__}")
        loader_keys = [f.name for f in fields(LoaderConfig)]
        if "sources" in d:
            return cls._mix_from_dict(d, loader_keys)
        top = ["source_type", "source_config", "image_config"] + loader_keys
        _check_keys("", d, top)
        source_type = d.get("source_type", "file")
        if source_type in LATER_SOURCES:
            _fail("source_type", f"{source_type!r} is not supported yet "
                  f"(supported: {', '.join(map(repr, SUPPORTED_SOURCES))})")
        _check_choice("source_type", source_type, SUPPORTED_SOURCES)
        klass = SOURCE_CONFIGS[source_type]
        required = [f.name for f in fields(klass) if f.default is MISSING
                    and f.default_factory is MISSING]
        if "source_config" not in d:
            _fail("source_config", f"missing (it holds {', '.join(required)})")
        src = _section_dict("source_config", d["source_config"])
        valid = [f.name for f in fields(klass)]
        _check_keys("source_config", src, valid)
        for key in required:
            if key not in src:
                _fail(f"source_config.{key}", "missing")
        source = klass(**{k: v for k, v in src.items() if k in valid})
        image, loader = _image_and_loader(d, loader_keys)
        return cls(source=source, image=image, loader=loader, source_type=source_type)

    @classmethod
    def _mix_from_dict(cls, d: Mapping[str, Any], loader_keys: list) -> "DatagoConfig":
        """``{"sources": [{"weight": w, "source_type": ..., "source_config": ...}, ...],
        "exhausted": ..., "image_config": ..., <loader keys>}``."""
        _check_keys("", d, ["sources", "exhausted", "image_config"] + loader_keys)
        entries = d["sources"]
        if not isinstance(entries, (list, tuple)) or not entries:
            _fail("sources", "must be a non-empty list of {weight, source_type, source_config}")
        subs = []
        for k, e in enumerate(entries):
            e = _section_dict(f"sources[{k}]", e)
            _check_keys(f"sources[{k}]", e, ["weight", "source_type", "source_config"])
            if "weight" not in e:
                _fail(f"sources[{k}].weight", "missing")
            try:
                sub = cls.from_dict({"source_type": e.get("source_type", "file"),
                                     "source_config": e.get("source_config")}
                                    if "source_config" in e else
                                    {"source_type": e.get("source_type", "file")})
            except ConfigError as err:
                raise ConfigError(f"sources[{k}].{err}") from None
            subs.append((e["weight"], sub.source_type, sub.source))
        mix = MixSourceConfig(sources=tuple(subs), exhausted=d.get("exhausted", "stop"))
        image, loader = _image_and_loader(d, loader_keys)
        return cls(source=mix, image=image, loader=loader, source_type="mix")

    def to_dict(self) -> dict:
        """The JSON-schema form (round-trips through ``from_dict``)."""
        if self.source_type == "mix":
            out: dict = {"sources": [
                {"weight": w, "source_type": t,
                 "source_config": {f.name: getattr(c, f.name) for f in fields(type(c))}}
                for w, t, c in self.source.sources], "exhausted": self.source.exhausted}
            out["image_config"] = None if self.image is None else {
                f.name: _plain(getattr(self.image, f.name)) for f in fields(ImageConfig)}
            out.update({f.name: getattr(self.loader, f.name) for f in fields(LoaderConfig)})
            return out
        out = {"source_type": self.source_type,
                     "source_config": {f.name: getattr(self.source, f.name)
                                       for f in fields(type(self.source))}}
        out["image_config"] = None if self.image is None else {
            f.name: _plain(getattr(self.image, f.name)) for f in fields(ImageConfig)}
        out.update({f.name: getattr(self.loader, f.name) for f in fields(LoaderConfig)})
        return out


def _image_and_loader(d: Mapping[str, Any], loader_keys: list) -> tuple:
    image: Optional[ImageConfig] = None
    if d.get("image_config") is not None:
        img = _section_dict("image_config", d["image_config"])
        valid = [f.name for f in fields(ImageConfig)]
        _check_keys("image_config", img, valid)
        image = ImageConfig(**{k: v for k, v in img.items() if k in valid})
    return image, LoaderConfig(**{k: d[k] for k in loader_keys if k in d})


def _plain(value: Any) -> Any:
    """A config value in its JSON form (tuples as lists)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _section_dict(path: str, value: Any) -> dict:
    if not isinstance(value, Mapping):
        _fail(path, f"must be an object, got {type(value).__name__}")
    return dict(value)


def _caller_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` in the function calling this one that
    names the first frame outside the datago package (the user's line, so the
    default filters show a DeprecationWarning raised for ``__main__``)."""
    import sys
    pkg = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(pkg):
        frame, level = frame.f_back, level + 1
    return level


def _check_keys(path: str, d: Mapping[str, Any], valid) -> None:
    prefix = f"{path}." if path else ""
    for key in list(d):
        if key in valid:
            continue
        if key in LEGACY_IGNORED:
            warnings.warn(f"{prefix}{key} is ignored (as by the reference datago; "
                          f"{LEGACY_IGNORED[key]})", DeprecationWarning,
                          stacklevel=_caller_stacklevel())
            continue
        close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
        _fail(f"{prefix}{key}", f"unknown key{hint}")


SOURCE_CONFIGS.update({"file": FileSourceConfig, "index": IndexSourceConfig,
                       "webdataset": WebDatasetSourceConfig, "db": DBSourceConfig,
                       "zip": ZipSourceConfig, "tfrecord": TFRecordSourceConfig,
                       "bins": BinsSourceConfig, "mix": MixSourceConfig})
