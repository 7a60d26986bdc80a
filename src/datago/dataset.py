"""DatagoDataset: a folder of images to sharded, bucket-batched tensors for PyTorch.

    ds = DatagoDataset(config)                      # DatagoConfig, dict or JSON string
    loader = DataLoader(ds, num_workers=2, batch_size=None, pin_memory=True)
    for epoch in range(10):
        ds.set_epoch(epoch)
        for batch in loader:
            batch["image"]          # uint8 (B, 3, H, W), channels-last storage
            batch["id"]             # list of B sample ids
            batch["original_size"]  # int64 (B, 2): (height, width) of each source image
            batch["crop_coords"]    # int64 (B, 2): (top, left) of the crop (SDXL conditioning)
            batch["bucket"]         # (H, W)
            batch["attributes"]     # list of B dicts (from .json / .txt sidecars)
            batch["masks"]          # {name: uint8 (B, 1, H, W)}, nearest-neighbour resized
            batch["additional_images"]  # {name: uint8 (B, 3, H, W)}
            batch["present"]        # {"mask/<name>" or "image/<name>": bool (B,)}, when any

Give DataLoader ``batch_size=None``: the dataset batches (one bucket per batch)
and decodes straight into the batch tensors, so there is no collate copy.  With
``batch_size`` unset in the config, items are single samples (the same keys,
without the batch dimension).

Which samples, in which order
-----------------------------
Each sample belongs to one (rank, worker) by a stable hash of its id (see
``datago.sharding``).  Without ``random_sampling`` a worker reads its samples in
listing order; with it, the order is a permutation drawn from ``(seed, epoch)``:
the same on every run and every rank, different for every epoch (``set_epoch``).
``limit`` is per rank: the rank's samples are taken in that order and the first
``limit`` are split among its workers, so ``limit=100`` yields exactly 100 samples
per rank per epoch (fewer only if the rank's shard is smaller, or if files fail
and are skipped, or ``drop_last`` drops a partial batch -- all counted in
``stats()``).
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch
from torch.utils.data import IterableDataset

from datago._engine import COUNTERS, Engine, Stats, summarize
from datago.config import DatagoConfig
from datago.errors import ConfigError
from datago.sharding import ShardDetector, ShardInfo, shard_hash
from datago.sources.filesystem import FileListing

__all__ = ["DatagoDataset", "default_num_threads"]

MAX_WORKER_ROWS = 64          # stats rows; worker ids beyond share rows (sums stay right)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:        # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_num_threads(num_workers: int) -> int:
    """Decode threads per DataLoader worker: the job's CPUs divided among the workers."""
    return max(1, available_cpus() // max(1, num_workers))


def _as_config(config) -> DatagoConfig:
    if isinstance(config, DatagoConfig):
        return config
    if isinstance(config, str):
        return DatagoConfig.from_json(config)
    if isinstance(config, dict):
        return DatagoConfig.from_dict(config)
    raise ConfigError(f"config must be a DatagoConfig, a dict or a JSON string, "
                      f"got {type(config).__name__}")


class DatagoDataset(IterableDataset):
    """Iterable dataset over a folder of images; see the module docstring.

    ``detector``: a callable returning a ``ShardInfo`` (rank, world size, worker id,
    worker count) for the calling process; default ``ShardDetector`` from the
    config and the environment.  Tests inject fixed values through it.
    """

    def __init__(self, config: Union[DatagoConfig, dict, str], *,
                 detector: Optional[Callable[[], ShardInfo]] = None):
        super().__init__()
        self.config = _as_config(config)
        src = self.config.source
        self.listing = FileListing(src.root_path)
        # shard hashes of every sample, computed once (and shared with the workers)
        self._hashes = np.fromiter((shard_hash(i) for i in self.listing.ids()),
                                   dtype=np.uint64, count=len(self.listing))
        self._detector = detector or ShardDetector(src.rank, src.world_size)
        # epoch and stats live in shared memory: DataLoader workers (forked or
        # spawned, persistent or not) see set_epoch() and report their counters
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._stats = torch.zeros((MAX_WORKER_ROWS, len(COUNTERS)),
                                  dtype=torch.float64).share_memory_()
        self.buckets = self.config.buckets

    # ------------------------------------------------------------------ public
    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of the next iteration (with ``random_sampling``)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def stats(self) -> dict:
        """Counters summed over this process's workers: samples and batches yielded,
        bytes read, samples skipped by reason, samples dropped by ``drop_last``, and
        seconds spent reading, decoding (thread time) and waiting (consumer)."""
        out = summarize(self._stats)
        out["listing"] = {"samples": len(self.listing), "skipped": dict(self.listing.skipped)}
        return out

    def reset_stats(self) -> None:
        self._stats.zero_()

    def shard_indices(self, info: ShardInfo, epoch: Optional[int] = None) -> np.ndarray:
        """Listing indices a (rank, worker) reads in one epoch, in reading order."""
        n = len(self.listing)
        loader = self.config.loader
        epoch = self.epoch if epoch is None else epoch
        if self.config.source.random_sampling:
            order = np.random.default_rng([loader.seed, epoch]).permutation(n)
        else:
            order = np.arange(n)
        shard = (self._hashes % np.uint64(info.num_shards)).astype(np.int64)
        ordered = shard[order]
        of_rank = order[ordered // info.num_workers == info.rank]
        if loader.limit is not None:
            of_rank = of_rank[:loader.limit]
        return of_rank[shard[of_rank] % info.num_workers == info.worker_id]

    def __iter__(self) -> Iterator[dict]:
        info = self._detector()
        loader = self.config.loader
        indices = self.shard_indices(info)
        num_threads = loader.num_threads or default_num_threads(info.num_workers)
        stats = Stats(self._stats[info.worker_id % MAX_WORKER_ROWS])
        refs = (self.listing.ref(int(i)) for i in indices)
        engine = Engine(refs, image_cfg=self.config.image, buckets=self.buckets,
                        batch_size=loader.batch_size, drop_last=loader.drop_last,
                        num_threads=num_threads, buffer=loader.samples_buffer_size,
                        on_error=loader.on_error, stats=stats)
        return iter(engine)

    def __repr__(self) -> str:
        c = self.config
        return (f"DatagoDataset(root={str(c.source.root_path)!r}, samples={len(self.listing)}, "
                f"buckets={len(self.buckets) if self.buckets else None}, "
                f"batch_size={c.loader.batch_size})")
