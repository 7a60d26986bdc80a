"""Which samples belong to this process: one formula, one small detector object.

The rule
--------
A sample belongs to exactly one (rank, DataLoader worker)::

    xxhash.xxh64_intdigest(sample_id.encode("utf-8"), seed=HASH_SEED)
        % (world_size * num_workers) == rank * num_workers + worker_id

Worked example: ``world_size = 2``, ``num_workers = 3`` gives 6 shards.  For the
sample id ``"cats/0001.jpg"`` the hash is 5104570406301491659, and
5104570406301491659 % 6 == 1, so it belongs to rank 0 (1 // 3), worker 1 (1 % 3).
Every id lands in one shard, so the shards are disjoint and their union is the
dataset, whatever the listing order; the hash is stable across machines,
Python versions and runs (unlike ``hash()``).

Where the numbers come from
---------------------------
``rank``/``world_size``: the config if given, else ``torch.distributed`` when it is
initialised, else the ``RANK``/``WORLD_SIZE`` environment variables (torchrun),
else ``SLURM_PROCID``/``SLURM_NTASKS`` (srun), else 0 / 1.  ``DatagoDataset``
looks them up in the trainer process -- at construction, ``set_epoch`` and when
its workers are started -- because a spawned DataLoader worker has no process
group (and may have no ``RANK``).
``worker_id``/``num_workers``: ``torch.utils.data.get_worker_info()`` (0 / 1 in the
main process).  ``ShardDetector`` does this; tests (and unusual launchers) pass
their own callable returning a ``ShardInfo`` instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import xxhash

from datago.errors import ConfigError

__all__ = ["HASH_SEED", "ShardDetector", "ShardInfo", "local_world_size", "shard_hash"]

HASH_SEED = 0xDA7A60
"""Seed of the sample-id hash.  Changing it reassigns every sample: never do."""


def shard_hash(sample_id: str) -> int:
    """The stable 64-bit hash of a sample id used for sharding."""
    return xxhash.xxh64_intdigest(sample_id.encode("utf-8"), seed=HASH_SEED)


@dataclass(frozen=True)
class ShardInfo:
    """Position of one DataLoader worker of one rank among all of them."""

    rank: int = 0
    world_size: int = 1
    worker_id: int = 0
    num_workers: int = 1

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank must be in [0, world_size), got rank={self.rank}, "
                              f"world_size={self.world_size}")
        if self.num_workers < 1 or not 0 <= self.worker_id < self.num_workers:
            raise ConfigError(f"worker_id must be in [0, num_workers), got worker_id="
                              f"{self.worker_id}, num_workers={self.num_workers}")

    @property
    def num_shards(self) -> int:
        return self.world_size * self.num_workers

    @property
    def shard(self) -> int:
        return self.rank * self.num_workers + self.worker_id

    def owns(self, sample_id: str) -> bool:
        return shard_hash(sample_id) % self.num_shards == self.shard


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


class ShardDetector:
    """Finds rank, world size, worker id and worker count (see the module docstring).

    ``rank``/``world_size`` given here (from the config) win over detection.
    Calling the detector returns a ``ShardInfo`` for the current process.
    """

    def __init__(self, rank: Optional[int] = None, world_size: Optional[int] = None):
        self.rank = rank
        self.world_size = world_size

    def resolve(self) -> tuple:
        """(rank, world_size, source), source one of "config", "torch.distributed",
        "env", "slurm", "default"."""
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size, "config"
        rank = world = None
        source = "default"
        try:
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized():
                rank, world = dist.get_rank(), dist.get_world_size()
                source = "torch.distributed"
        except ImportError:         # pragma: no cover - torch is a dependency
            pass
        if rank is None and _env_int("WORLD_SIZE") is not None:
            rank, world, source = _env_int("RANK"), _env_int("WORLD_SIZE"), "env"
        if rank is None and _env_int("SLURM_NTASKS") is not None:
            rank, world, source = _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS"), "slurm"
        if rank is None and world is None and _env_int("RANK") is not None:
            rank, source = _env_int("RANK"), "env"
        rank = self.rank if self.rank is not None else (rank or 0)
        world = self.world_size if self.world_size is not None else (world or 1)
        if self.rank is not None or self.world_size is not None:
            source = "config" if source == "default" else source
        if not 0 <= rank < world:
            raise ConfigError(f"rank {rank} is not in [0, world_size={world}) "
                              f"(from {source})")
        return rank, world, source

    def distributed(self) -> tuple:
        rank, world, _ = self.resolve()
        return rank, world

    @staticmethod
    def worker() -> tuple:
        try:
            from torch.utils.data import get_worker_info
        except ImportError:         # pragma: no cover
            return 0, 1
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def __call__(self) -> ShardInfo:
        rank, world = self.distributed()
        worker_id, num_workers = self.worker()
        return ShardInfo(rank, world, worker_id, num_workers)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:        # pragma: no cover - not Linux
        return os.cpu_count() or 1


def local_world_size() -> Optional[int]:
    """Ranks on this node: ``LOCAL_WORLD_SIZE`` (torchrun), else
    ``SLURM_NTASKS_PER_NODE`` when it is a plain number; None when unknown."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None

