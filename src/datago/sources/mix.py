"""Several sources mixed with weights (top-level ``"sources": [...]``).

    {"sources": [{"weight": 0.7, "source_type": "file", "source_config": {...}},
                 {"weight": 0.3, "source_type": "webdataset", "source_config": {...}}],
     "exhausted": "stop", "image_config": {...}, "batch_size": 32}

The sources are listed (each with its own fetcher: its headers, cache, timeouts)
and concatenated; a sample's parts are routed back to its source's fetcher.  Each
epoch draws a multiset of samples (``mix_items``), a pure function of (sizes of
the sources, weights, seed, epoch, policy), so every rank draws the same one,
and the epoch plan then batches it like any listing: each global batch from one
bucket, the same on every rank, resumable.  Source k contributes
``round(T * w_k)`` samples, where T is the epoch's length:

* ``"exhausted": "stop"`` -- T is the most the scarcest source allows
  (``min_k n_k / w_k``): every sample of it once, a seeded subset of the others;
* ``"exhausted": "cycle"`` -- T is what the most plentiful source needs
  (``max_k n_k / w_k``): every sample of it once, the others read again,
  reshuffled, as often as their share needs.

Within a bucket the samples are ordered by a seeded hash, so a batch draws from
the sources in proportion to their share of that bucket.  ``batch["source_index"]``
(int64, one per sample) says where each sample came from, and
``stats()["sources"]`` counts the samples delivered per source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from datago.fetch import FetchError, Fetcher
from datago.sources.base import SampleRef, Source
from datago.sources.sizes import SizesIndex

__all__ = ["MixedSource", "Routed", "RoutedFetcher", "mix_counts", "mix_items"]


@dataclass(frozen=True)
class Routed:
    """A location of source ``k`` (read by that source's fetcher)."""
    k: int
    loc: Any

    @property
    def name(self) -> str:
        inner = self.loc
        return str(getattr(inner, "name", None) or getattr(inner, "url", inner))

    def __str__(self) -> str:
        return str(self.loc)


class RoutedFetcher:
    """The fetch layer of a mix: each location goes to its source's fetcher."""

    def __init__(self, fetchers: Sequence[Fetcher]):
        self.fetchers = list(fetchers)
        self.cache = None                  # per-source caches stay with their fetchers

    def read(self, loc, cache: bool = True) -> bytes:
        if isinstance(loc, Routed):
            return self.fetchers[loc.k].read(loc.loc, cache)
        raise FetchError(f"{loc}: a location outside the mix's sources", "read_error", str(loc))

    def head(self, loc, whole: bool = False, nbytes: int = 65536) -> bytes:
        return self.fetchers[loc.k].head(loc.loc, whole, nbytes)

    def close(self) -> None:
        for f in self.fetchers:
            f.close()

    @property
    def retried(self) -> dict:
        out: dict = {}
        for f in self.fetchers:
            for k, v in f.retried.items():
                out[k] = out.get(k, 0) + v
        return out


def _route(k: int, pairs) -> tuple:
    return tuple((name, Routed(k, loc)) for name, loc in pairs)


class MixedSource(Source):
    """The concatenated listing of several sources (see the module docstring)."""

    kind = "mix"

    def __init__(self, sources: Sequence[Source], weights: Sequence[float],
                 sizes: Sequence[Optional[SizesIndex]]):
        self.sources = list(sources)
        total = float(sum(weights))
        self.weights = np.array([w / total for w in weights], dtype=np.float64)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])
        self.root = "mix:" + "|".join(s.root for s in self.sources)
        self.skipped = {}
        for k, s in enumerate(self.sources):
            for reason, v in getattr(s, "skipped", {}).items():
                self.skipped[f"{k}:{reason}"] = v
        self._sizes = sizes

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> Tuple[int, int]:
        """(source number, index in that source) of mix index ``i``."""
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return k, i - int(self.offsets[k])

    def source_of(self) -> np.ndarray:
        """Source number of every mix index."""
        return np.repeat(np.arange(len(self.sources)), np.diff(self.offsets))

    def sample_id(self, i: int) -> str:
        k, j = self.locate(i)
        return self.sources[k].sample_id(j)

    def ids(self):
        for s in self.sources:
            yield from s.ids()

    def hash_keys(self):
        """What the stable id hashes are made of: ids may repeat across sources."""
        for k, s in enumerate(self.sources):
            for sid in s.ids():
                yield f"{k}/{sid}"

    def main_location(self, i: int):
        k, j = self.locate(i)
        return Routed(k, self.sources[k].main_location(j))

    def ref(self, i: int) -> SampleRef:
        k, j = self.locate(i)
        r = self.sources[k].ref(j)
        return SampleRef(r.id, Routed(k, r.path), _route(k, r.masks), _route(k, r.images),
                         _route(k, r.texts), r.attributes, _route(k, r.latents),
                         {**(r.meta or {}), "source_index": k})

    def remote(self) -> bool:
        return any(s.kind != "file" and s.remote() for s in self.sources)

    def known_sizes(self) -> Optional[SizesIndex]:
        if any(z is None for z in self._sizes):
            return None
        return SizesIndex(np.concatenate([z.width for z in self._sizes]).astype(np.int32),
                          np.concatenate([z.height for z in self._sizes]).astype(np.int32),
                          np.concatenate([z.format for z in self._sizes]).astype(np.uint8))


def mix_counts(available: Sequence[int], weights: Sequence[float], exhausted: str) -> List[int]:
    """Samples each source contributes to an epoch (see the module docstring)."""
    n = np.asarray(available, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    if (n == 0).any() and exhausted == "stop":
        return [0] * len(n)
    live = n > 0
    if not live.any():
        return [0] * len(n)
    ratio = n[live] / w[live]
    total = ratio.min() if exhausted == "stop" else ratio.max()
    counts = np.floor(total * w + 0.5).astype(np.int64)
    if exhausted == "stop":
        counts = np.minimum(counts, n.astype(np.int64))
    counts[~live] = 0
    return counts.tolist()


def mix_items(groups: Sequence[np.ndarray], weights: Sequence[float], exhausted: str,
              seed: int, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
    """An epoch's draw: (items, repeat number of each) where ``groups[k]`` holds
    the items (listing indices) of source k; deterministic per (seed, epoch)."""
    counts = mix_counts([len(g) for g in groups], weights, exhausted)
    items, reps = [], []
    for k, (g, c) in enumerate(zip(groups, counts)):
        if c == 0:
            continue
        rng = np.random.default_rng([int(seed), int(epoch), k, 0x3A1])
        cycles = -(-c // len(g))
        order = np.concatenate([g[rng.permutation(len(g))] for _ in range(cycles)])[:c]
        items.append(order)
        reps.append(np.arange(c, dtype=np.int64) // len(g))
    if not items:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(items).astype(np.int64), np.concatenate(reps)


def build(config, make_source) -> Tuple[RoutedFetcher, MixedSource]:
    """(fetcher, source) of a mix config; ``make_source(sub_config)`` builds one
    source; sizes come from each source or its header scan (its own cache)."""
    from datago.config import DatagoConfig
    from datago.sharding import shard_hash
    from datago.sources.sizes import scan_source
    fetchers, sources, sizes = [], [], []
    for weight, stype, sub in config.source.sources:
        cfg = DatagoConfig(source=sub, image=config.image, loader=config.loader,
                           source_type=stype)
        fetcher, src = make_source(cfg)
        known = src.known_sizes()
        if known is None and getattr(sub, "scan_sizes", True) and len(src):
            hashes = np.fromiter((shard_hash(i) for i in src.ids()), dtype=np.uint64,
                                 count=len(src))
            known = scan_source(src, fetcher, hashes, cache_dir=getattr(sub, "cache_dir", None),
                                use_cache=getattr(sub, "sizes_cache", True),
                                threads=getattr(sub, "io_concurrency", None))
        elif known is None and not len(src):
            known = SizesIndex.from_arrays(np.zeros(0), np.zeros(0))
        fetchers.append(fetcher)
        sources.append(src)
        sizes.append(known)
    weights = [w for w, _, _ in config.source.sources]
    return RoutedFetcher(fetchers), MixedSource(sources, weights, sizes)

