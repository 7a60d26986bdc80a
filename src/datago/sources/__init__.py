"""Sample sources (one module per kind of storage) and ``make_source``, which builds
the one a config names with the fetcher its locations are read through."""

from __future__ import annotations

import os

from datago.sources.filesystem import FileListing, SampleRef

__all__ = ["FileListing", "SampleRef", "make_source"]


def _fetcher(src, headers=None, retries=None):
    """The fetch layer of a remote-capable source config (its IO, timeout, retries,
    disk-cache and object-size keys; ``retries``: when not None, instead of the
    config's)."""
    from datago.fetch import FetchConfig, Fetcher
    kw = {}
    if src.cache_limit_bytes:
        from datago.sources.sizes import default_cache_dir
        kw.update(cache_dir=src.cache_dir or os.path.dirname(default_cache_dir()),
                  cache_limit_bytes=src.cache_limit_bytes)
    return Fetcher(FetchConfig(io_concurrency=src.io_concurrency, timeout_s=src.timeout_s,
                               retries=src.retries if retries is None else retries,
                               max_object_bytes=src.max_object_bytes,
                               headers=headers or {}, **kw))


def make_source(config, *, retries=None):
    """``(fetcher, source)`` for a ``DatagoConfig``'s source_type (no torch needed:
    ``datago serve`` and ``datago convert`` use it too).  ``retries``: of a failed
    remote request (``FetchConfig.retries``), for the reads building the source
    (index files, shard indexes, listing pages) and those after; None: each
    source config's ``retries`` key (a mix: each source's own; a folder: the
    fetch layer's default), else it overrides them."""
    from datago.fetch import FetchConfig, Fetcher
    src = config.source
    kind = config.source_type
    if kind == "file":
        return Fetcher(None if retries is None else FetchConfig(retries=retries)), \
            FileListing(src.root_path)
    if kind == "mix":
        from datago.sources.mix import build
        return build(config, lambda sub: make_source(sub, retries=retries))
    if kind == "webdataset":
        from datago.sources.webdataset import WebDatasetSource
        fetcher = _fetcher(src, {"Authorization": f"Bearer {src.auth_token}"}
                           if src.auth_token else None, retries)
        return fetcher, WebDatasetSource(src.url, reference_image_type=src.reference_image_type,
                                         index_dir=src.index_dir, cache_dir=src.cache_dir,
                                         fetcher=fetcher, streaming=src.streaming)
    fetcher = _fetcher(src, retries=retries)
    if kind == "index":
        from datago.sources.index import IndexSource
        return fetcher, IndexSource(src.index, url_column=src.url_column,
                                    width_column=src.width_column,
                                    height_column=src.height_column,
                                    mask_columns=src.mask_columns,
                                    image_columns=src.image_columns, fetcher=fetcher)
    if kind == "db":
        from datago.sharding import ShardDetector
        from datago.sources.db import DBSource
        rank = src.rank if src.rank is not None else \
            ShardDetector(src.rank, src.world_size).resolve()[0]
        return fetcher, DBSource(src, fetcher, rank=rank)
    if kind == "zip":
        from datago.sources.zip import ZipSource as Archive
    elif kind == "tfrecord":
        from datago.sources.tfrecord import TFRecordSource as Archive
    elif kind == "bins":
        from datago.sources.bins import BinsSource as Archive
    else:
        raise ValueError(f"no source for source_type {kind!r}")
    return fetcher, Archive(src, fetcher)
