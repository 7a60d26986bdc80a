"""DatagoDataset: images (a folder, or an index of local files and URLs) to
bucket-batched tensors for PyTorch, the same number of batches on every rank, the
same bucket at every step, resumable.

    ds = DatagoDataset(config)                      # DatagoConfig, dict or JSON string
    loader = DataLoader(ds, num_workers=2, batch_size=None, pin_memory=True)
    for epoch in range(10):
        ds.set_epoch(epoch)
        for batch in loader:
            batch["image"]          # uint8 (B, 3, H, W), channels-last storage
            batch["id"]             # list of B sample ids
            batch["step"]           # global step of this batch in the epoch (same on every rank)
            batch["original_size"]  # int64 (B, 2): (height, width) of each source image
            batch["crop_coords"]    # int64 (B, 2): (top, left) of the crop (SDXL conditioning)
            batch["bucket"]         # datago.Bucket(height, width) == batch["image"].shape[-2:]
            batch["attributes"]     # list of B dicts (from .json / .txt sidecars)
            batch["masks"]          # {name: uint8 (B, 1, H, W)}, nearest-neighbour resized
            batch["additional_images"]  # {name: uint8 (B, 3, H, W)}
            batch["present"]        # {"mask/<name>" or "image/<name>": bool (B,)}, when any
            batch["latents"]        # {name: (B, ...) tensor} from .npy parts; a list
                                    # (None where missing) when shapes or dtypes differ

Give DataLoader ``batch_size=None``: the dataset batches (one bucket per batch)
and decodes straight into the batch tensors, so there is no collate copy.  With
``batch_size`` unset in the config, items are single samples (the same keys,
without the batch dimension).

Which samples, in which order
-----------------------------
At construction the width and height of every image are read from its header
(a parallel scan, cached on disk; see ``datago.sources.sizes``), so each sample's
bucket is known before any pixel is decoded.  Each epoch is then planned by
``datago.plan.plan_epoch``: global steps of ``world_size * batch_size`` samples of
one bucket, rank ``r`` taking its slice, the remainder of every bucket padded or
dropped (``remainder``).  Every rank computes the same plan alone, so every rank
yields the same number of batches with the same bucket at every step.  DataLoader
worker ``w`` of ``N`` takes the rank's steps ``w, w + N, ...``, which is the
order in which DataLoader collects them.  ``len(ds)`` is the number of batches
this rank yields in the current epoch.

Resuming: ``ds.state_dict()`` / ``ds.load_state_dict(state)`` (a few integers and
a fingerprint of the data and config); see ``load_state_dict``.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import warnings
import weakref
from typing import Callable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import xxhash
from torch.utils.data import IterableDataset

from datago._engine import COUNTERS, Engine, Job, PlanEngine, Stats, summarize
from datago.buckets import Bucket, nearest_bucket
from datago.config import DatagoConfig
from datago.errors import ConfigError, DatagoError, WorkerError
from datago._prefetch import prefetched as _prefetched
from datago.plan import EpochPlan, plan_epoch, resume_plan
from datago.sharding import (ShardDetector, ShardInfo, available_cpus, local_world_size,
                             shard_hash)
from datago.fetch import redact
from datago.sources import make_source
from datago.sources.webdataset import assign_shards
from datago.sources.sizes import SizesIndex, scan_source

__all__ = ["DataLoader", "DatagoDataset", "DatagoMapDataset", "StateError", "WorkerError",
           "default_num_threads"]

STREAMING_MODES = ("stream", "shards", "pages")   # no epoch plan: steps_per_epoch
MAX_WORKER_ROWS = 64          # stats rows; worker ids beyond share rows (sums stay right)
MAX_LAYOUTS = 16              # elastic re-plans remembered within one epoch
STATE_VERSION = 1


class StateError(DatagoError, ValueError):
    """A resume state that does not fit this dataset (other data, config or epoch)."""


def default_num_threads(num_workers: int) -> int:
    """Decode threads per DataLoader worker: the CPUs available to this rank (its
    affinity, divided among the ranks of the node when ``LOCAL_WORLD_SIZE`` is
    set) divided among the rank's workers."""
    cpus = available_cpus()
    local = local_world_size()
    if local and local > 1 and cpus >= (os.cpu_count() or cpus):
        # only a node-wide affinity is shared out: a launcher that pinned each rank
        # to its own cores already did it
        cpus = max(1, cpus // local)
    return max(1, cpus // max(1, num_workers))


def _bucket_indices(height: np.ndarray, width: np.ndarray, buckets: list,
                    valid: np.ndarray) -> np.ndarray:
    """Bucket index per sample (-1 where not valid); ``nearest_bucket`` once per
    distinct size."""
    out = np.full(len(width), -1, dtype=np.int64)
    if not valid.any():
        return out
    key = (height[valid].astype(np.int64) << 32) | width[valid].astype(np.int64)
    uniq, inv = np.unique(key, return_inverse=True)
    index = {b: i for i, b in enumerate(buckets)}
    per = np.array([index[nearest_bucket(int(k >> 32), int(k & 0xFFFFFFFF), buckets)]
                    for k in uniq], dtype=np.int64)
    out[valid] = per[inv.reshape(-1)]
    return out


def _fetch_retries(value: Optional[int]) -> Optional[int]:
    """The ``fetch_retries`` argument of DatagoDataset and DatagoMapDataset, checked:
    None (each source's ``retries`` key) or an integer >= 0 (overriding it)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 0):
        raise ConfigError(f"fetch_retries: must be an integer >= 0, got {value!r}")
    return value


class DatagoDataset(IterableDataset):
    """Iterable dataset over a source of images (a folder, an index); see the
    module docstring.

    ``detector``: a callable returning a ``ShardInfo`` (rank, world size, worker id,
    worker count) for the calling process; default ``ShardDetector`` from the
    config and the environment.  Tests inject fixed values through it.
    ``fetch_retries``: retries of a failed request of a remote source
    (``datago.fetch``'s policy), from the reads at construction (index files,
    shard indexes, listing pages, size scans) on; it overrides the config's
    ``source_config.retries`` (every source's, in a mix).  None: the config's
    (default 5).  ``DatagoClient`` sets it from ``DATAGO_MAX_RETRIES``.
    """

    def __init__(self, config: Union[DatagoConfig, dict, str], *,
                 detector: Optional[Callable[[], ShardInfo]] = None,
                 fetch_retries: Optional[int] = None):
        super().__init__()
        self.config = DatagoConfig.coerce(config)
        src = self.config.source
        loader = self.config.loader
        self.fetcher, self.listing = make_source(self.config,
                                                 retries=_fetch_retries(fetch_retries))
        n = len(self.listing)
        # stable id hashes: shard membership, shuffle keys, the sizes cache key
        self._hashes = np.fromiter((shard_hash(i) for i in self.listing.hash_keys()),
                                   dtype=np.uint64, count=n)
        self._detector = detector
        self._auto = ShardDetector(src.rank, src.world_size)
        self._dist: Optional[Tuple[int, int]] = None      # (rank, world) resolved in the trainer
        # epoch, resume point and stats live in shared memory: DataLoader workers
        # (forked or spawned, persistent or not) see set_epoch()/load_state_dict()
        # and report their counters
        # [0] epoch, [1] resume step, [2] resume epoch (-1: none), [3] number of
        # earlier layouts, [4:-1] their (world_size, step) pairs, [-1] generation of
        # the resume point (each process applies one generation once)
        # [-2] set once DataLoader workers have iterated
        self._shared = torch.zeros(6 + 2 * MAX_LAYOUTS, dtype=torch.int64).share_memory_()
        self._shared[2] = -1
        self._seen_gen = 0
        self._worker_resume: Optional[dict] = None         # a worker's own state (StatefulDataLoader)
        self._stats = torch.zeros((MAX_WORKER_ROWS, len(COUNTERS)),
                                  dtype=torch.float64).share_memory_()
        # per DataLoader worker, for the trainer's error when one dies (DataLoader
        # below): pid, epoch, batches yielded in this iteration, last step, next step
        self._workers = torch.full((MAX_WORKER_ROWS, 5), -1, dtype=torch.int64).share_memory_()
        self._worker_row: Optional[torch.Tensor] = None
        self.buckets = self.config.buckets
        self.sizes: Optional[SizesIndex] = None
        # remote bytes get IO threads and are scanned through the fetch layer
        self._remote = self.listing.kind != "file" and self.listing.remote()
        self.mode = "stream"
        self._total: Optional[int] = None                  # streaming: samples, when counted
        if getattr(src, "streaming", False) and self.config.source_type == "db":
            self.mode = "pages"                            # API pages read while training
            include = np.zeros(0, dtype=bool)
            self._bucket_of = np.zeros(0, dtype=np.int64)
            if src.random_sampling and loader.steps_per_epoch is None and loader.limit is None:
                raise ConfigError("source_config.random_sampling: with streaming: true the db "
                                  "source reads images/random/, which has no end: set "
                                  "steps_per_epoch or limit")
        elif getattr(src, "streaming", False):
            self.mode = "shards"                           # WebDataset shards as streams
            include = np.zeros(0, dtype=bool)
            self._bucket_of = np.zeros(0, dtype=np.int64)
            self.listing.shard_sizes(src.io_concurrency)
        elif loader.batch_size is None:
            self.mode = "samples"
            include = np.ones(n, dtype=bool)
            self._bucket_of = np.zeros(n, dtype=np.int64)
        elif (known := self.listing.known_sizes()) is not None or src.scan_sizes:
            self.mode = "plan"
            if known is not None:
                self.sizes = known
            else:
                self.sizes = scan_source(self.listing, self.fetcher, self._hashes,
                                         cache_dir=src.cache_dir, use_cache=src.sizes_cache,
                                         threads=getattr(src, "io_concurrency", None),
                                         remote=self._remote)
            include = self.sizes.readable
            self._bucket_of = _bucket_indices(self.sizes.height, self.sizes.width,
                                              self.buckets, include)
        else:
            include = np.ones(n, dtype=bool)
            self._bucket_of = np.zeros(n, dtype=np.int64)
        self._items = np.flatnonzero(include)
        self._mix_cache: Optional[tuple] = None
        self._plan_cache: Optional[Tuple[tuple, EpochPlan]] = None
        self._progress: Optional[dict] = None              # worker-side position (state_dict)
        self._resolve(confident_only=True)
        if self.mode in STREAMING_MODES and self._dist is not None and self._dist[1] > 1:
            self._stream_steps(ShardInfo(0, self._dist[1], 0, 1))   # count in the trainer

    # ------------------------------------------------------------------ layout
    def _resolve(self, confident_only: bool = False) -> None:
        """Rank and world size, looked up in the trainer process (before workers exist:
        a spawned worker has no process group).  ``confident_only``: keep the result
        only when it came from the config, torch.distributed, or the environment."""
        if self._detector is not None:
            return
        rank, world, source = self._auto.resolve()
        if source != "default" or not confident_only:
            self._dist = (rank, world)

    def _info(self) -> ShardInfo:
        if self._detector is not None:
            return self._detector()
        worker_id, num_workers = ShardDetector.worker()
        if _in_worker() and self._dist is not None:
            rank, world = self._dist                       # resolved in the trainer
        else:
            rank, world, _ = self._auto.resolve()           # a forked worker inherits it all
            if not _in_worker():
                self._dist = (rank, world)
        return ShardInfo(rank, world, worker_id, num_workers)

    def __getstate__(self):
        # pickled for spawn/forkserver workers: resolve the rank here, in the trainer
        if not _in_worker():
            self._resolve()
        state = self.__dict__.copy()
        state["_plan_cache"] = None
        return state

    # ------------------------------------------------------------------ public
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next iteration (its shuffle and plan).  Selecting
        another epoch than a loaded state's clears its resume point."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        if int(epoch) != int(self._shared[0]):
            self._shared[2] = -1
            self._shared[3] = 0
        self._shared[0] = int(epoch)
        if not _in_worker():
            self._resolve(confident_only=True)

    @property
    def epoch(self) -> int:
        return int(self._shared[0])

    def stats(self) -> dict:
        """Counters summed over this process's workers: samples and batches yielded,
        bytes read, samples skipped by reason, samples repeated (``padded``) and
        dropped (``dropped_remainder``) by the remainder policy, samples dropped by
        ``drop_last`` (streaming mode), seconds spent reading, decoding (thread
        time) and waiting (consumer); plus the listing and the sizes index."""
        out = summarize(self._stats)
        out["listing"] = {"samples": len(self.listing), "skipped": dict(self.listing.skipped)}
        if self.config.source_type == "mix":
            per = self._stats.sum(dim=0).tolist()
            first = COUNTERS.index("source_0")
            out["sources"] = [int(per[first + k]) for k in range(len(self.listing.sources))]
        if self.sizes is not None:
            out["index"] = {"samples": len(self.sizes), "unreadable": self.sizes.unreadable,
                            "scanned": self.sizes.scanned, "cached": self.sizes.cached,
                            "seconds": self.sizes.seconds}
        return out

    def reset_stats(self) -> None:
        self._stats.zero_()

    # ------------------------------------------------------------------ plan
    def _layouts(self) -> List[Tuple[int, int]]:
        k = int(self._shared[3])
        return [(int(self._shared[4 + 2 * i]), int(self._shared[5 + 2 * i])) for i in range(k)]

    def _resuming(self, epoch: int) -> bool:
        """Whether this process's next iteration of ``epoch`` starts at a loaded state."""
        return int(self._shared[2]) == epoch and int(self._shared[-1]) != self._seen_gen

    def _start(self, epoch: int) -> int:
        return int(self._shared[1]) if self._resuming(epoch) else 0

    def plan(self, epoch: Optional[int] = None, world_size: Optional[int] = None,
             layouts: Optional[tuple] = None) -> EpochPlan:
        """The plan of an epoch (default: the current one) for ``world_size`` ranks
        (default: this job's), after the elastic re-plans of a loaded state."""
        epoch = self.epoch if epoch is None else int(epoch)
        if world_size is None:
            world_size = self._info().world_size
        if layouts is None:
            layouts = tuple(self._layouts()) if self._resuming(epoch) else ()
        layouts = tuple(tuple(x) for x in layouts)
        key = (epoch, int(world_size), layouts)
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1]
        loader = self.config.loader
        batch = loader.batch_size or 1
        nb = len(self.buckets) if (self.buckets and self.mode == "plan") else 1
        items, hashes = self._epoch_items(epoch)
        bucket_of = self._bucket_of[items]
        kw = dict(num_buckets=nb, seed=loader.seed, epoch=epoch, batch_size=batch,
                  remainder=loader.remainder, sync_buckets=loader.sync_buckets,
                  shuffle=self.config.source.random_sampling, limit=loader.limit)
        if layouts:
            p = resume_plan(list(layouts), int(world_size), hashes, bucket_of, **kw)
        else:
            p = plan_epoch(hashes, bucket_of, world_size=int(world_size), **kw)
        self._plan_cache = (key, p)
        return p

    def _epoch_items(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """(listing indices, their id hashes) the epoch plans: the readable samples,
        or for a mix the epoch's draw (``datago.sources.mix``; a sample drawn again
        gets a hash of its own, so its copies are spread like other samples)."""
        if self.config.source_type != "mix":
            return self._items, self._hashes[self._items]
        if self._mix_cache is not None and self._mix_cache[0] == epoch:
            return self._mix_cache[1]
        from datago.sources.mix import mix_items
        of = self.listing.source_of()[self._items]
        groups = [self._items[of == k] for k in range(len(self.listing.sources))]
        src = self.config.source
        items, reps = mix_items(groups, self.listing.weights, src.exhausted,
                               self.config.loader.seed, epoch)
        hashes = self._hashes[items] ^ (reps.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        self._mix_cache = (epoch, (items, hashes))
        return items, hashes

    def __len__(self) -> int:
        """Steps of the current epoch for this rank: batches (samples, without
        ``batch_size``), counted like ``batch["step"]`` -- a resumed epoch keeps its
        length and yields the steps from the resume point on (as trainers that
        restore their own batch counter expect)."""
        info = self._info()
        if self.mode in STREAMING_MODES:
            steps = self._stream_steps(info)
            if steps is None:
                raise TypeError("a streaming DatagoDataset on one rank without "
                                "steps_per_epoch makes one pass: its length is not known "
                                "in advance")
            return steps
        p = self.plan(world_size=info.world_size)
        return p.offset + p.num_steps

    # ------------------------------------------------------------------ state
    def _fingerprint(self) -> dict:
        loader = self.config.loader
        items = self._items
        return {
            "samples": len(items),
            "ids": xxhash.xxh64_hexdigest(self._hashes[items].tobytes()),
            # the bucket list as (width, height) pairs, as it was written before
            # buckets became (height, width): states saved by older builds still match
            "buckets": xxhash.xxh64_hexdigest(
                self._bucket_of[items].astype(np.int32).tobytes()
                + repr(self.buckets and [(w, h) for h, w in self.buckets]).encode()),
            "batch_size": loader.batch_size,
            "seed": loader.seed,
            "remainder": loader.remainder,
            "sync_buckets": loader.sync_buckets,
            "random_sampling": self.config.source.random_sampling,
            "limit": loader.limit,
            **({"mix": repr([(w, t) for w, t, _ in self.config.source.sources])
                       + self.config.source.exhausted}
               if self.config.source_type == "mix" else {}),
        }

    def state_dict(self) -> dict:
        """Where the iteration stands: ``{"epoch", "step", "world_size", "layouts",
        "fingerprint", ...}`` -- ``step`` is the next global step to yield.

        Inside an iteration (the main process with ``num_workers=0``, or a worker,
        which is where torchdata's ``StatefulDataLoader`` asks) it is exact.  In the
        main process of a DataLoader with workers the dataset cannot see which
        prefetched batches the trainer consumed: use ``StatefulDataLoader``, the
        Lightning ``DatagoDataModule``, or save ``ds.state_for(batch["step"] + 1)``
        after the last batch consumed (this method then raises ``StateError``
        saying so).
        """
        if self.mode in STREAMING_MODES:
            raise StateError("a streaming DatagoDataset (scan_sizes=false, or WebDataset "
                             "or db streaming=true) cannot be resumed")
        info = self._info()
        prog = self._progress
        if prog is None and not _in_worker() and int(self._shared[-2]):
            raise StateError(
                "this epoch ran in DataLoader workers, and the dataset cannot see which of "
                "their prefetched batches the trainer consumed: use torchdata's "
                "StatefulDataLoader (its state_dict() holds this dataset's), DatagoDataModule, "
                "or save ds.state_for(batch['step'] + 1) after the last batch consumed")
        if prog is not None and prog["epoch"] == self.epoch:
            state = dict(prog)
            state["layouts"] = [list(x) for x in prog["layouts"]]
        else:
            epoch = self.epoch
            state = {"epoch": epoch, "step": self._start(epoch), "world_size": info.world_size,
                     "layouts": [list(x) for x in self._layouts()] if self._resuming(epoch) else []}
        state["fingerprint"] = self._fingerprint()
        state["version"] = STATE_VERSION
        return state

    def state_for(self, step: int, epoch: Optional[int] = None) -> dict:
        """The state that resumes at global step ``step`` of ``epoch`` (default: the
        current one), e.g. ``ds.state_for(batch["step"] + 1)`` after the last batch
        the trainer consumed."""
        epoch = self.epoch if epoch is None else int(epoch)
        info = self._info()
        layouts = [list(x) for x in self._layouts()] if int(self._shared[2]) == epoch else []
        return {"epoch": epoch, "step": int(step), "world_size": info.world_size,
                "layouts": layouts, "fingerprint": self._fingerprint(), "version": STATE_VERSION}

    def load_state_dict(self, state: dict) -> None:
        """Make the next iteration yield steps ``k, k + 1, ...`` of epoch ``e`` exactly
        as an uninterrupted run would: ``state`` is ``{"epoch": e, "step": k}``, or a
        full ``state_dict()``.

        A state saved with another ``world_size`` re-plans the rest of the epoch
        over this job's ranks: the samples still to come are exactly those the
        old run had not consumed (plus padding under ``remainder="pad"``).  Another
        worker count needs nothing (workers only split a rank's steps).  A state
        whose fingerprint differs (other files, sizes or plan settings) raises
        ``StateError`` naming what changed.
        """
        if self.mode in STREAMING_MODES:
            raise StateError("a streaming DatagoDataset (scan_sizes=false, or WebDataset "
                             "or db streaming=true) cannot be resumed")
        if not isinstance(state, dict):
            raise StateError(f"state must be a dict, got {type(state).__name__}")
        for key in ("epoch", "step"):
            v = state.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise StateError(f"state[{key!r}] must be a non-negative integer, got {v!r}")
        fp = state.get("fingerprint")
        if fp is not None:
            mine = self._fingerprint()
            diff = [f"{k} ({fp.get(k)!r} -> {mine.get(k)!r})" for k in mine if fp.get(k) != mine.get(k)]
            if diff:
                raise StateError("the saved state does not fit this dataset: "
                                 + ", ".join(diff) + "; resume with the same files and "
                                 "plan settings (or load {'epoch': e, 'step': 0})")
        epoch, step = int(state["epoch"]), int(state["step"])
        info = self._info()
        try:
            layouts = [(int(w), int(k)) for w, k in state.get("layouts", [])]
            saved_world = int(state.get("world_size", info.world_size))
        except (TypeError, ValueError):
            raise StateError(f"state['layouts'] / state['world_size'] malformed: "
                             f"{state.get('layouts')!r}, {state.get('world_size')!r}") from None
        stride = state.get("num_workers")
        if saved_world != info.world_size:
            layouts.append((saved_world, step))
        if len(layouts) > MAX_LAYOUTS:
            raise StateError(f"more than {MAX_LAYOUTS} world-size changes within one epoch")
        p = self.plan(epoch, info.world_size, tuple(layouts))
        if not p.offset <= step <= p.offset + p.num_steps:
            raise StateError(f"state step {step} is outside epoch {epoch}, which has steps "
                             f"{p.offset}..{p.offset + p.num_steps - 1}")
        if _in_worker() and state.get("worker_id") is not None:
            # torchdata's StatefulDataLoader restores each worker with its own state
            wid, nw = ShardDetector.worker()
            if (state.get("worker_id"), stride) == (wid, nw) and saved_world == info.world_size:
                self._worker_resume = {"epoch": epoch, "step": step, "layouts": tuple(layouts)}
                self._shared[0] = epoch
                return
        self._shared[0] = epoch
        self._shared[1] = step
        self._shared[2] = epoch
        self._shared[3] = len(layouts)
        for i, (w, k) in enumerate(layouts):
            self._shared[4 + 2 * i] = w
            self._shared[5 + 2 * i] = k
        self._shared[-1] += 1

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict]:
        info = self._info()
        loader = self.config.loader
        num_threads = loader.num_threads or default_num_threads(info.num_workers)
        stats = Stats(self._stats[info.worker_id % MAX_WORKER_ROWS])
        self._worker_row = None
        if _in_worker():
            self._worker_row = self._workers[info.worker_id % MAX_WORKER_ROWS]
            self._worker_row.copy_(torch.tensor([os.getpid(), self.epoch, 0, -1, -1]))
        if self.fetcher.cache is not None:
            self.fetcher.cache.on_lookup = lambda hit: stats.add("cache_hits" if hit else
                                                                 "cache_misses")
        if self.mode in STREAMING_MODES:
            return self._stream(info, num_threads, stats)
        epoch = self.epoch
        wres, self._worker_resume = self._worker_resume, None
        if wres is not None and wres["epoch"] == epoch:
            # this worker's own position (StatefulDataLoader): its next step, stride N
            layouts, start, first_of_worker = wres["layouts"], wres["step"], wres["step"]
        else:
            layouts = tuple(self._layouts()) if self._resuming(epoch) else ()
            start = self._start(epoch)
            first_of_worker = start + info.worker_id
        self._seen_gen = int(self._shared[-1])
        if _in_worker():
            self._shared[-2] = 1
        p = self.plan(epoch, info.world_size, layouts)
        steps = range(first_of_worker - p.offset, p.num_steps, info.num_workers)
        if self._worker_row is not None:
            self._worker_row[4] = first_of_worker
        self._progress = {"epoch": epoch, "step": p.offset + steps.start,
                          "world_size": info.world_size, "layouts": layouts,
                          "worker_id": info.worker_id if _in_worker() else None,
                          "num_workers": info.num_workers if _in_worker() else None}
        if info.worker_id == 0 and start == p.offset:
            d = int(p.dropped[info.rank])
            if d:
                stats.add("dropped_remainder", d)
        items = self._epoch_items(epoch)[0]
        if self.mode == "samples":
            return self._samples(p, info, steps, num_threads, stats, items)
        return self._batches(p, info, steps, num_threads, stats, items)

    def _io_threads(self) -> int:
        """IO threads per worker: ``io_concurrency`` for remote sources, else none
        (local files are read by the decode threads)."""
        return getattr(self.config.source, "io_concurrency", 0) if self._remote else 0

    def _track(self, step: int, stride: int) -> None:
        """After yielding ``step``: this process's next step (for state_dict)."""
        if self._progress is not None:
            self._progress["step"] = step + stride
        self._note_worker(step, stride)

    def _note_worker(self, step: Optional[int], stride: int) -> None:
        """A DataLoader worker yields a batch: its progress, for the trainer's error
        message should the worker die (``DataLoader``)."""
        row = self._worker_row
        if row is None:
            return
        if step is None:
            row[2] += 1
        else:               # one copy: a kill cannot land between the count and the step
            row[2:5].copy_(torch.tensor([int(row[2]) + 1, step, step + stride]))

    def _batches(self, p: EpochPlan, info: ShardInfo, steps: range, num_threads: int,
                 stats: Stats, items: np.ndarray) -> Iterator[dict]:
        bucket, samples, padded = p.rank(info.rank)
        listing = self.listing

        def jobs():
            for t in steps:
                k = int(p.count[t])
                refs = [listing.ref(int(items[i])) for i in samples[t, :k]]
                yield Job(p.offset + t, self.buckets[int(bucket[t])], refs, padded[t, :k].tolist())

        engine = PlanEngine(jobs(), image_cfg=self.config.image, num_threads=num_threads,
                            prefetch_batches=self.config.loader.prefetch_batches,
                            pool_bytes=self.config.loader.shared_pool_bytes,
                            on_error=self.config.loader.on_error, stats=stats,
                            read=self.fetcher.read, io_threads=self._io_threads(),
                            max_failures=getattr(self.config.source, "max_failures", None),
                            expected=int(sum(int(p.count[t]) for t in steps)))
        for out in engine:
            self._track(out["step"], info.num_workers)
            if "source_index" in out:
                for k in out["source_index"]:
                    stats.add(f"source_{k}")
                out["source_index"] = torch.tensor(out["source_index"], dtype=torch.int64)
            yield out

    def _samples(self, p: EpochPlan, info: ShardInfo, steps: range, num_threads: int,
                 stats: Stats, items: np.ndarray) -> Iterator[dict]:
        _, samples, padded = p.rank(info.rank)
        listing = self.listing

        def refs():
            for t in steps:
                if padded[t, 0]:
                    stats.add("padded")
                yield p.offset + t, listing.ref(int(items[int(samples[t, 0])]))

        loader = self.config.loader
        engine = Engine(refs(), image_cfg=self.config.image, buckets=self.buckets,
                        batch_size=None, drop_last=loader.drop_last,
                        num_threads=max(num_threads, self._io_threads()),
                        buffer=max(loader.samples_buffer_size, self._io_threads()),
                        on_error=loader.on_error, stats=stats, steps=True,
                        read=self.fetcher.read,
                        max_failures=getattr(self.config.source, "max_failures", None))
        for out in engine:
            self._track(out["step"], info.num_workers)
            if "source_index" in out:
                stats.add(f"source_{out['source_index']}")
            yield out

    # ------------------------------------------------------------------ streaming
    def shard_indices(self, info: ShardInfo, epoch: Optional[int] = None,
                      cycle: int = 0) -> np.ndarray:
        """Streaming mode: listing indices a (rank, worker) reads in one epoch, in
        reading order (membership by id hash, see ``datago.sharding``); ``cycle``:
        the pass over them (``steps_per_epoch`` reads them again, reshuffled)."""
        n = len(self.listing)
        loader = self.config.loader
        epoch = self.epoch if epoch is None else epoch
        if self.config.source.random_sampling:
            seed = [loader.seed, epoch] + ([cycle] if cycle else [])
            order = np.random.default_rng(seed).permutation(n)
        else:
            order = np.arange(n)
        shard = (self._hashes % np.uint64(info.num_shards)).astype(np.int64)
        ordered = shard[order]
        of_rank = order[ordered // info.num_workers == info.rank]
        if loader.limit is not None:
            of_rank = of_rank[:loader.limit]
        return of_rank[shard[of_rank] % info.num_workers == info.worker_id]

    def _stream_steps(self, info: ShardInfo) -> Optional[int]:
        """Streaming modes: batches each rank yields per epoch (None: one pass)."""
        loader = self.config.loader
        if loader.steps_per_epoch is not None:
            return loader.steps_per_epoch
        if info.world_size == 1:
            return None
        if loader.limit is not None and self.mode in ("pages", "shards"):
            return max(1, loader.limit // (loader.batch_size or 1))
        if self.mode == "pages":
            raise ConfigError("steps_per_epoch: the streaming db source on "
                              f"{info.world_size} ranks cannot count its rows in advance; set "
                              "steps_per_epoch (batches per rank per epoch) or limit")
        if self._total is None:
            self._total = (self.listing.count_samples() if self.mode == "shards"
                           else len(self.listing))
        return max(1, self._total // (info.world_size * (loader.batch_size or 1)))

    def shard_assignment(self, info: ShardInfo, epoch: Optional[int] = None,
                         cycle: int = 0) -> Tuple[List[int], bool]:
        """WebDataset streaming: (the shards a (rank, worker) streams, in order;
        whether it keeps only the samples whose id hashes to it).  Whole shards,
        balanced by size, when there are at least as many as ranks x workers; else
        every reader streams every shard and filters.  The assignment is the
        epoch's; a later ``cycle`` (``steps_per_epoch``) reshuffles its order."""
        loader = self.config.loader
        epoch = self.epoch if epoch is None else epoch
        n = len(self.listing.shards)
        shuffle = self.config.source.random_sampling
        order = (np.random.default_rng([loader.seed, epoch]).permutation(n).tolist()
                 if shuffle else list(range(n)))
        filtered = n < info.num_shards
        if not filtered:         # the epoch's assignment; later passes only reorder it
            order = assign_shards(self.listing.shard_sizes(), info.num_shards, order)[info.shard]
        if shuffle and cycle:
            order = [order[i] for i in
                     np.random.default_rng([loader.seed, epoch, cycle]).permutation(len(order))]
        return order, filtered

    def _stream_refs(self, info: ShardInfo, cycle: int, stats: Stats,
                     on_error: str, halt=None) -> Iterator:
        """One pass over this reader's samples (SampleRefs).  ``halt`` (an Event):
        set when the pass was stopped by its consumer; no further shard is opened,
        and the failure of the one being read is not this pass's."""
        if self.mode == "pages":
            yield from self._page_refs(info, stats)
            return
        if self.mode == "stream":
            for i in self.shard_indices(info, cycle=cycle):
                yield self.listing.ref(int(i))
            return
        shards, filtered = self.shard_assignment(info, cycle=cycle)
        if filtered and cycle == 0 and info.shard == 0:
            warnings.warn(f"datago: {len(self.listing.shards)} shards for {info.world_size} "
                          f"rank(s) x {info.num_workers} worker(s): every worker streams every "
                          f"shard ({sum(self.listing.shard_sizes()) / 1e6:.0f} MB) and keeps "
                          f"the samples whose id hashes to it (1/{info.num_shards}); use at "
                          f"least {info.num_shards} shards to download each once",
                          RuntimeWarning, stacklevel=2)
        quota = self._limit_quota(info)
        counts: dict = {}
        n = 0
        for s in shards:
            if halt is not None and halt.is_set():
                return
            try:
                for ref in self.listing.stream_refs(s, counts):
                    if filtered and shard_hash(ref.id) % info.num_shards != info.shard:
                        continue
                    if quota is not None and n >= quota:
                        return
                    n += 1
                    yield ref
            except DatagoError as e:                 # FetchError included
                if halt is not None and halt.is_set():
                    return
                stats.add("shards_failed")
                if on_error == "raise":
                    raise
                warnings.warn(f"datago: shard {s} failed, the rest of it is not read this "
                              f"pass (counted in stats()['streaming']): {e}", RuntimeWarning,
                              stacklevel=2)
            finally:
                for key, v in counts.items():
                    stats.add(f"stream_{key}", v)
                counts.clear()

    def _limit_quota(self, info: ShardInfo) -> Optional[int]:
        """Streamed shards and db pages: this worker's share of ``limit`` (samples per
        rank per pass, its workers together), or None.  A worker whose shards hold
        fewer samples than its share does not make up for another's."""
        limit = self.config.loader.limit
        if limit is None:
            return None
        return limit // info.num_workers + (info.worker_id < limit % info.num_workers)

    def _page_refs(self, info: ShardInfo, stats: Stats) -> Iterator:
        """db streaming: this reader's partition of the selection (its share of
        ``limit``, when set); API failures are raised, never a silent end."""
        quota = self._limit_quota(info)
        counts: dict = {}
        n = 0
        try:
            for ref in self.listing.stream_refs(info.shard, info.num_shards, counts):
                if quota is not None and n >= quota:
                    return
                n += 1
                yield ref
        finally:
            for key, v in counts.items():
                stats.add(f"stream_{key}", v)

    def _stream(self, info: ShardInfo, num_threads: int, stats: Stats) -> Iterator[dict]:
        loader = self.config.loader
        steps = self._stream_steps(info)           # None only on a single rank
        quota = None if steps is None else len(range(info.worker_id, steps, info.num_workers))
        engine: Optional[Engine] = None
        halt = threading.Event()                   # the consumer stopped this pass

        def refs():
            cycle = 0
            while True:
                n, failed = 0, engine.failures
                for ref in self._stream_refs(info, cycle, stats, loader.on_error, halt):
                    n += 1
                    yield ref
                if quota is None:
                    return
                if n == 0 or engine.failures - failed >= n:
                    raise DatagoError(
                        f"rank {info.rank} worker {info.worker_id}: a whole pass over its "
                        f"samples gave {'none' if n == 0 else 'only failures'}, so it cannot "
                        f"yield steps_per_epoch={steps} batches (check the source, or use "
                        f"fewer ranks/workers than {'samples' if n == 0 else 'failures'})")
                cycle += 1

        if self.mode == "shards":
            # the bytes arrive with the refs (a shard read as a stream, in a thread of
            # its own so the network and the tar parsing overlap the decodes)
            source, threads, buffer = _prefetched(refs(), loader.samples_buffer_size), \
                num_threads, loader.samples_buffer_size
        else:
            source, threads, buffer = refs(), max(num_threads, self._io_threads()), \
                max(loader.samples_buffer_size, self._io_threads())
        engine = Engine(source, image_cfg=self.config.image, buckets=self.buckets,
                        batch_size=loader.batch_size, drop_last=loader.drop_last,
                        num_threads=threads, buffer=buffer,
                        on_error=loader.on_error, stats=stats,
                        max_open=loader.max_open_batches, prefetch=loader.prefetch_batches,
                        pool_bytes=loader.shared_pool_bytes,
                        read=self.fetcher.read,
                        max_failures=getattr(self.config.source, "max_failures", None))
        it = iter(engine)
        if quota is None:
            try:
                for out in it:
                    self._note_worker(None, info.num_workers)
                    yield out
            finally:
                halt.set()
                it.close()
                getattr(source, "close", lambda: None)()
            return
        try:
            for k in range(quota):
                out = next(it, None)
                if out is None:                      # pragma: no cover - refs() never ends
                    raise DatagoError(f"the stream ended after {k} of {quota} batches")
                out["step"] = info.worker_id + k * info.num_workers
                self._note_worker(out["step"], info.num_workers)
                yield out
        finally:
            halt.set()
            it.close()
            getattr(source, "close", lambda: None)()

    def __repr__(self) -> str:
        c = self.config
        where = (getattr(c.source, "root_path", None) or getattr(c.source, "index", None)
                 or getattr(c.source, "url", None) or getattr(c.source, "path", None)
                 or redact(getattr(c.source, "api_url", "") or "")
                 or f"{len(getattr(c.source, 'sources', ()))} sources")
        return (f"DatagoDataset({c.source_type}={str(where)!r}, samples={len(self.listing)}, "
                f"buckets={len(self.buckets) if self.buckets else None}, "
                f"batch_size={c.loader.batch_size}, mode={self.mode!r})")


class DatagoMapDataset(torch.utils.data.Dataset):
    """Random access over any source that lists its samples (map-style):
    ``len(ds)`` samples, ``ds[i]`` the same dict an unbatched ``DatagoDataset``
    yields for that sample (image in its bucket, masks, additional images,
    attributes, latents; no ``step``), read by a blocking fetch through the
    source's fetch layer (and its disk cache, ``cache_limit_bytes``).

        ds = DatagoMapDataset(config)
        loader = DataLoader(ds, batch_size=None, sampler=RandomSampler(ds), num_workers=4)

    Samples come at the size of their own bucket, so a ``batch_size`` in the
    DataLoader needs a sampler that batches indices of one bucket
    (``ds.bucket_of(i)`` gives it from the sizes, read once, lazily).  A sample
    that cannot be read or decoded raises ``SampleError`` naming it and the
    reason (a map-style dataset has no way to skip an index).  ``i`` is the
    source's listing index (``ds.sample_id(i)``); negative indices count from the
    end.  ``fetch_retries``: as ``DatagoDataset``'s (it overrides the config's
    ``retries``, for the reads at construction, the size scan and the samples).
    """

    def __init__(self, config: Union[DatagoConfig, dict, str], *,
                 fetch_retries: Optional[int] = None):
        self.config = DatagoConfig.coerce(config)
        fetch_retries = _fetch_retries(fetch_retries)
        if self.config.loader.batch_size is not None:
            raise ConfigError("batch_size: DatagoMapDataset returns single samples; batch "
                              "them with a DataLoader and a bucket-aware batch sampler")
        if getattr(self.config.source, "streaming", False):
            raise ConfigError("source_config.streaming: a streamed source has no random "
                              "access; DatagoMapDataset needs a source that lists its samples")
        self.fetcher, self.listing = make_source(self.config, retries=fetch_retries)
        self.buckets = self.config.buckets
        self._engine: Optional[Engine] = None
        self._pid = None
        self._sizes: Optional[SizesIndex] = None
        self._stats = torch.zeros(len(COUNTERS), dtype=torch.float64)

    def __len__(self) -> int:
        return len(self.listing)

    def sample_id(self, i: int) -> str:
        return self.listing.sample_id(self._index(i))

    def _index(self, i) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"DatagoMapDataset indices are integers, got {type(i).__name__}")
        n = len(self.listing)
        j = int(i) + n if i < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"index {i} out of range for {n} samples")
        return j

    def _worker_engine(self) -> Engine:
        pid = os.getpid()
        if self._engine is None or self._pid != pid:      # one per process (forked workers)
            self._engine = Engine((), image_cfg=self.config.image, buckets=self.buckets,
                                  batch_size=None, drop_last=False, num_threads=1, buffer=1,
                                  on_error="raise", stats=Stats(self._stats),
                                  read=self.fetcher.read, max_failures=None)
            self._pid = pid
        return self._engine

    def __getitem__(self, i) -> dict:
        return self._worker_engine()._one(self.listing.ref(self._index(i)))

    def bucket_of(self, i: int) -> Optional[Bucket]:
        """The ``Bucket(height, width)`` of sample ``i`` from its header (the sizes of all
        samples are read once, on first use, cached like DatagoDataset's); None
        when unreadable or without buckets."""
        if not self.buckets:
            return None
        j = self._index(i)
        if self._sizes is None:
            known = self.listing.known_sizes()
            if known is None:
                src = self.config.source
                hashes = np.fromiter((shard_hash(k) for k in self.listing.hash_keys()),
                                     dtype=np.uint64, count=len(self.listing))
                known = scan_source(self.listing, self.fetcher, hashes,
                                    cache_dir=getattr(src, "cache_dir", None),
                                    use_cache=getattr(src, "sizes_cache", True))
            self._sizes = known
        h, w = int(self._sizes.height[j]), int(self._sizes.width[j])
        if w <= 0 or h <= 0:
            return None
        return nearest_bucket(h, w, self.buckets)

    def stats(self) -> dict:
        """This process's counters (samples, bytes, seconds reading and decoding)."""
        return summarize(self._stats.reshape(1, -1))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_engine"] = None
        state["_pid"] = None
        return state

    def __repr__(self) -> str:
        return f"DatagoMapDataset({self.config.source_type}, samples={len(self)})"


_WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)")
_SIGNAL_HINTS = {
    "Killed": "SIGKILL is most often the kernel's out-of-memory killer (see `dmesg`): each "
              "worker holds num_threads decodes and prefetch_batches batches, so lower those, "
              "the batch or bucket size, or num_workers",
    "Bus error": "a bus error in a worker usually means /dev/shm is full: give the container "
                 "more shared memory (docker run --shm-size=...), use smaller batches or "
                 "num_workers=0",
    "Segmentation fault": "a crash in native code: please report it with the ids of the "
                          "samples of that worker's next step",
}


class DataLoader(torch.utils.data.DataLoader):
    """``torch.utils.data.DataLoader`` with ``batch_size=None`` by default (a
    ``DatagoDataset`` batches by itself), whose error when a worker dies says which
    worker of how many it was and how far it had got::

        loader = datago.dataset.DataLoader(ds, num_workers=4, pin_memory=True)

    torch reports a dead worker by its pid only (``DataLoader worker (pid 4242) is
    killed by signal: Killed.``); this raises ``WorkerError`` (a ``RuntimeError``)
    with that message plus the worker's index, the epoch, the batches it had
    yielded and the step it was working on, the steps the trainer had received,
    and the usual cause of the signal.  The error is raised wherever torch raises
    it: from ``next()``, or from its SIGCHLD handler while the loop body runs.
    Everything else is torch's DataLoader, unchanged.
    """

    def __init__(self, dataset, batch_size=None, *args, **kwargs):
        super().__init__(dataset, batch_size, *args, **kwargs)

    def _get_iterator(self):
        it = super()._get_iterator()
        if self.num_workers > 0 and isinstance(self.dataset, DatagoDataset):
            return _WatchedIterator(it, self)
        return it


class _WatchedIterator:
    """torch's multi-process iterator, forwarding everything; a dead worker's
    ``RuntimeError`` becomes a ``WorkerError`` that names it."""

    def __init__(self, it, loader: DataLoader):
        self._it = it
        self._loader = loader
        self._received = 0
        self._last_step: Optional[int] = None
        # a pid reported dead earlier may belong to one of these new workers now
        _REPORTED.difference_update(w.pid for w in getattr(it, "_workers", None) or [])
        _watch(self)

    def __iter__(self):
        return self

    def __len__(self):
        return len(self._it)

    def __getattr__(self, name):
        if name == "_it":                       # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self._it, name)

    def _reset(self, loader, first_iter: bool = False) -> None:
        self._received, self._last_step = 0, None          # persistent workers: a new epoch
        self._it._reset(loader, first_iter)

    def __next__(self):
        try:
            out = next(self._it)
        except (RuntimeError, OSError, EOFError) as e:
            if isinstance(e, WorkerError):
                raise
            err = self.explain(e) if isinstance(e, RuntimeError) else None
            if err is None:
                # a worker killed while the trainer received its batch can surface as
                # a broken connection (torch's check still saw it alive)
                err = self._dead_worker()
            if err is None:
                raise
            raise err from e
        self._received += 1
        step = out.get("step") if isinstance(out, dict) else None
        if step is not None:
            self._last_step = int(step)
        return out

    dead_wait = 2.0             # seconds to wait for a worker being killed to be seen dead

    def _dead_worker(self) -> Optional[WorkerError]:
        """A WorkerError for a worker that has died (waiting up to ``dead_wait``
        seconds for one that is being killed), else None."""
        workers = getattr(self._it, "_workers", None) or []
        deadline = time.monotonic() + self.dead_wait
        while True:
            for proc in workers:
                code = proc.exitcode
                if code is not None and code != 0:
                    what = (f"is killed by signal: {signal.strsignal(-code) or -code}."
                            if code < 0 else f"exited unexpectedly with exit code {code}.")
                    return self.explain(RuntimeError(f"DataLoader worker (pid {proc.pid}) {what}"))
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def explain(self, exc: BaseException) -> Optional[WorkerError]:
        """A ``WorkerError`` for torch's dead-worker error ``exc`` when the worker is
        one of this iterator's (else None)."""
        cause = exc.__cause__
        if isinstance(cause, WorkerError):              # raised by the SIGCHLD handler below
            return WorkerError(str(cause))
        # torch's "exited unexpectedly" wraps the handler's "is killed by signal"
        torch_msg = str(cause) if isinstance(cause, RuntimeError) and \
            _WORKER_DIED.search(str(cause)) else str(exc)
        pids = _pids(torch_msg) or _pids(str(exc))
        workers = getattr(self._it, "_workers", None) or []
        ids = [w for w, proc in enumerate(workers) if proc.pid in pids]
        if not ids:
            return None
        _REPORTED.update(pids)
        ds: DatagoDataset = self._loader.dataset
        n = len(workers)
        try:
            total = f" of steps 0..{len(ds) - 1}"
        except Exception:                              # noqa: BLE001 - streaming: unknown
            total = ""
        parts = []
        for w in ids:
            pid, epoch, done, last, nxt = ds._workers[w % MAX_WORKER_ROWS].tolist()
            text = f"it was worker {w} of {n} (pid {workers[w].pid})"
            if pid == workers[w].pid:
                text += f", epoch {epoch}: it had yielded {done} batch(es)"
                if last >= 0:
                    text += f", the last one step {last}"
                if nxt >= 0:
                    text += f", and was working on step {nxt}{total}"
            else:
                text += ": it died before starting its epoch"
            parts.append(text)
        got = f"the trainer had received {self._received} batch(es) of this epoch"
        if self._last_step is not None:
            got += f", up to step {self._last_step}"
        parts.append(got)
        hints = [hint for sig, hint in _SIGNAL_HINTS.items() if f"signal: {sig}" in torch_msg]
        return WorkerError(f"{torch_msg.strip()} datago: {'; '.join(parts)}."
                           + "".join(f" {h}." for h in hints))


_WATCHED: "weakref.WeakSet[_WatchedIterator]" = weakref.WeakSet()
_SIGCHLD_WRAPPED = False
_REPORTED: set = set()          # pids of dead workers already reported (a WorkerError)


def _pids(text) -> set:
    """The pids in torch's dead-worker message (``text`` or an exception)."""
    m = _WORKER_DIED.search(str(text))
    return {int(x) for x in m.group(1).replace(",", " ").split()} if m else set()


def _watch(it: _WatchedIterator) -> None:
    """Register ``it``; wrap torch's SIGCHLD handler once (main thread only), so that
    its dead-worker error, raised wherever the main thread is, names the worker."""
    global _SIGCHLD_WRAPPED
    _WATCHED.add(it)
    if _SIGCHLD_WRAPPED or not hasattr(signal, "SIGCHLD") or \
            threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGCHLD)
    if not callable(previous):                  # torch installed none: nothing to explain
        return

    def handler(signum, frame):
        try:
            previous(signum, frame)
        except RuntimeError as e:
            pids = _pids(e)
            if pids and pids <= _REPORTED:
                # torch raises again at every SIGCHLD until the dead worker is
                # reaped -- possibly inside the handling of the first error (an
                # except or finally block, a checkpoint being saved): once is enough
                return
            for w in list(_WATCHED):
                err = w.explain(e)
                if err is not None:
                    raise err from e
            raise

    signal.signal(signal.SIGCHLD, handler)
    _SIGCHLD_WRAPPED = True


def _in_worker() -> bool:
    from torch.utils.data import get_worker_info
    return get_worker_info() is not None
