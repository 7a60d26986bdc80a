"""The epoch plan: which samples form which batch, on which rank, at which step.

One pure, deterministic function of a few arrays and integers -- nothing is read,
nothing is communicated -- so every rank of a job computes the same plan alone::

    plan = plan_epoch(hashes, bucket_of, num_buckets=27, seed=0, epoch=3,
                      world_size=8, batch_size=16, remainder="pad")
    plan.num_steps                     # the same for every rank
    plan.bucket[t, r]                  # bucket index of rank r's batch at step t
    plan.samples[t, r, :plan.count[t]] # its sample indices

A *global step* has ``world_size * batch_size`` slots.  With ``sync_buckets``
(the default for more than one rank) all of them come from one bucket and rank
``r`` takes slots ``[r * B, (r + 1) * B)``: the same bucket on every rank at every
step, so no rank waits for another's larger images.

How a plan is built (``sync_buckets=True``)
-------------------------------------------
1. Samples are grouped by bucket; within a bucket they are ordered by a seeded
   mix of their id hash (``seed``, ``epoch``) -- a shuffle that does not depend on
   the listing order, so adding files does not reshuffle the others.  Without
   ``shuffle`` the listing order is kept.
2. A bucket of ``n`` samples gives ``ceil(n / G)`` global steps with
   ``remainder="pad"`` (the last one completed by repeating the bucket's first
   samples of this epoch's order; every sample appears at least once) or
   ``floor(n / G)`` with ``remainder="drop"`` (the leftovers are dropped and
   counted), ``G = world_size * batch_size``.
3. The steps of all buckets are interleaved by a seeded permutation (``seed``,
   ``epoch``); without ``shuffle`` they are ordered by the smallest listing
   position among their own (not padding) samples: one bucket per batch,
   otherwise close to listing order.

Worked example: 11 samples, buckets ``A A A A A A A B B B B``, world size 2,
batch size 2 (G = 4), ``pad``: bucket A gives 2 steps (8 slots for 7 samples:
one repeat), B gives 1 step.  After interleaving, say ``[A0, B0, A1]``::

    step 0: bucket A   rank 0: a3 a0   rank 1: a6 a2
    step 1: bucket B   rank 0: b1 b3   rank 1: b0 b2
    step 2: bucket A   rank 0: a5 a1   rank 1: a4 a3'   (a3' is the repeat)

With ``drop`` the plan is ``[A0, B0]`` and a1, a4, a5 are dropped this epoch
(a different three next epoch).

Without ``sync_buckets`` each bucket's samples are dealt round-robin to the
ranks, each rank forms its own batches of ``batch_size`` in its own seeded order,
and the ranks' step counts are equalised: ``pad`` repeats a rank's first batches
up to the longest rank, ``drop`` cuts every rank to the shortest.  It pads or
drops exactly as much as the synced plan (a bucket of n samples gives
``ceil(ceil(n / W) / B) = ceil(n / (W * B))`` batches per rank either way); what
it gives up is the same shape on every rank at a step.

``limit`` (samples per rank) keeps the first ``ceil(limit / batch_size)`` steps;
the last is cut so that every rank yields exactly ``limit`` samples.

Resuming
--------
``plan.rest(k)`` is what was not yet consumed when steps ``0..k-1`` were done: the
set of distinct samples planned this epoch minus those seen at steps before ``k``.
``replan(plan, k, world_size)`` plans exactly that set over a new layout
(elastic resume); a same-layout resume just starts at step ``k``.  DataLoader
workers only split a rank's steps (worker ``w`` of ``N`` takes ``w, w + N, ...``),
so the plan never depends on the worker count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["EpochPlan", "REMAINDER", "mix_keys", "plan_epoch", "replan", "resume_plan"]

REMAINDER = ("pad", "drop")

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def _salt(*values: int) -> int:
    s = 0x243F6A8885A308D3
    for v in values:
        s = ((s ^ (int(v) & _MASK)) * _GOLDEN + 0x632BE59BD9B4E019) & _MASK
        s ^= s >> 29
    return s


def mix_keys(hashes: np.ndarray, *salt: int) -> np.ndarray:
    """A seeded 64-bit shuffle key per id hash (splitmix64 of ``hash ^ salt``)."""
    z = hashes.astype(np.uint64, copy=True)
    z ^= np.uint64(_salt(*salt))
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


@dataclass(frozen=True)
class EpochPlan:
    """The steps of one epoch for every rank.

    ``bucket``: int32 (S, W), bucket index of each rank's batch at each step;
    ``samples``: int64 (S, W, B), sample indices; only the first ``count[t]`` of
    each row are used (``count`` is ``batch_size`` except at a ``limit`` cut);
    ``padded``: bool (S, W, B), slots that repeat a sample (remainder policy);
    ``dropped``: int64 (W,), samples the remainder policy left out, attributed to
    ranks (the sum is the epoch's total); ``offset``: the absolute step number of
    row 0 (non-zero after an elastic re-plan).
    """

    bucket: np.ndarray
    samples: np.ndarray
    padded: np.ndarray
    count: np.ndarray
    dropped: np.ndarray
    offset: int = 0

    @property
    def num_steps(self) -> int:
        return int(self.bucket.shape[0])

    @property
    def world_size(self) -> int:
        return int(self.bucket.shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.samples.shape[2])

    def valid(self) -> np.ndarray:
        """bool (S, W, B): slots in use (all but those cut by ``limit``)."""
        v = np.arange(self.batch_size)[None, None, :] < self.count[:, None, None]
        return np.broadcast_to(v, self.samples.shape)

    def rank(self, r: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bucket (S,), samples (S, B), padded (S, B)) of rank ``r``."""
        return self.bucket[:, r], self.samples[:, r], self.padded[:, r]

    def rest(self, step: int) -> np.ndarray:
        """Sorted distinct sample indices planned this epoch and not seen before ``step``
        (an absolute step number)."""
        k = int(step) - self.offset
        if not 0 <= k <= self.num_steps:
            raise ValueError(f"step {step} is outside this plan (steps {self.offset}.."
                             f"{self.offset + self.num_steps})")
        valid = self.valid()
        planned = np.unique(self.samples[valid])
        seen = np.unique(self.samples[:k][valid[:k]])
        return np.setdiff1d(planned, seen, assume_unique=True)

    def num_padded(self, r: Optional[int] = None) -> int:
        p = self.padded & self.valid()
        return int(p.sum() if r is None else p[:, r].sum())


def _check(world_size: int, batch_size: int, remainder: str) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if remainder not in REMAINDER:
        raise ValueError(f"remainder must be one of {REMAINDER}, got {remainder!r}")


def _grouped(items: np.ndarray, bucket_of: np.ndarray, keys: Optional[np.ndarray],
             num_buckets: int) -> Tuple[np.ndarray, np.ndarray]:
    """``items`` ordered by (bucket, key, index) and the start offset of each bucket."""
    b = bucket_of[items]
    if keys is None:
        order = np.lexsort((items, b))
    else:
        order = np.lexsort((items, keys[items], b))
    grouped = items[order]
    counts = np.bincount(b, minlength=num_buckets)
    starts = np.zeros(num_buckets + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    return grouped, starts


def _fill(seg: np.ndarray, n_batches: int, size: int):
    """``n_batches * size`` slots from ``seg``: cyclic repeats as padding, the rest dropped."""
    n = n_batches * size
    if n == 0:
        return seg[:0], np.zeros(0, dtype=bool), len(seg)
    filled = np.resize(seg, n)
    padded = np.arange(n) >= len(seg)
    return filled, padded, max(0, len(seg) - n)


def _step_order(samples: np.ndarray, padded: np.ndarray,
                salt: Optional[Tuple[int, ...]]) -> np.ndarray:
    """Order of the steps: a seeded permutation, or (``salt`` None) by the smallest
    listing index among each step's own (not padding) samples, i.e. roughly the
    listing order."""
    if salt is not None:
        return np.random.default_rng(salt).permutation(len(samples))
    if len(samples) == 0:
        return np.zeros(0, dtype=np.int64)
    flat = samples.reshape(len(samples), -1)
    own = np.where(padded.reshape(len(samples), -1), np.iinfo(np.int64).max, flat)
    return np.argsort(own.min(axis=1), kind="stable")


def _plan(items: np.ndarray, bucket_of: np.ndarray, keys: Optional[np.ndarray], *,
          num_buckets: int, world_size: int, batch_size: int, remainder: str,
          sync_buckets: bool, order_salt: Optional[Tuple[int, ...]]) -> EpochPlan:
    W, B = world_size, batch_size
    grouped, starts = _grouped(items, bucket_of, keys, num_buckets)
    pad = remainder == "pad"
    if sync_buckets:
        G = W * B
        rows, flags, labels = [], [], []
        dropped = np.zeros(W, dtype=np.int64)
        for b in range(num_buckets):
            seg = grouped[starts[b]:starts[b + 1]]
            if len(seg) == 0:
                continue
            steps = -(-len(seg) // G) if pad else len(seg) // G
            filled, padded, lost = _fill(seg, steps, G)
            if lost:                              # deal the dropped ones to ranks for the count
                dropped += np.bincount(np.arange(lost) % W, minlength=W)
            rows.append(filled.reshape(steps, W, B))
            flags.append(padded.reshape(steps, W, B))
            labels.append(np.full(steps, b, dtype=np.int32))
        if rows:
            samples = np.concatenate(rows)
            padded = np.concatenate(flags)
            label = np.concatenate(labels)
        else:
            samples = np.zeros((0, W, B), dtype=np.int64)
            padded = np.zeros((0, W, B), dtype=bool)
            label = np.zeros(0, dtype=np.int32)
        perm = _step_order(samples, padded, order_salt)
        bucket = np.repeat(label[perm][:, None], W, axis=1)
        return EpochPlan(bucket, samples[perm], padded[perm],
                         np.full(len(label), B, dtype=np.int32), dropped)

    # per-rank batches: deal each bucket round-robin, batch per rank, equalise
    per_rank: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    dropped = np.zeros(W, dtype=np.int64)
    for r in range(W):
        rows, flags, labels = [], [], []
        for b in range(num_buckets):
            seg = grouped[starts[b] + r:starts[b + 1]:W]
            if len(seg) == 0:
                continue
            steps = -(-len(seg) // B) if pad else len(seg) // B
            filled, padded, lost = _fill(seg, steps, B)
            dropped[r] += lost
            if steps:
                rows.append(filled.reshape(steps, B))
                flags.append(padded.reshape(steps, B))
                labels.append(np.full(steps, b, dtype=np.int32))
        if rows:
            s, p, lab = np.concatenate(rows), np.concatenate(flags), np.concatenate(labels)
        else:
            s = np.zeros((0, B), dtype=np.int64)
            p = np.zeros((0, B), dtype=bool)
            lab = np.zeros(0, dtype=np.int32)
        perm = _step_order(s, p, None if order_salt is None else order_salt + (r,))
        per_rank.append((s[perm], p[perm], lab[perm]))
    lengths = [len(lab) for _, _, lab in per_rank]
    S = max(lengths) if pad else min(lengths)
    samples = np.zeros((S, W, B), dtype=np.int64)
    padded = np.zeros((S, W, B), dtype=bool)
    bucket = np.zeros((S, W), dtype=np.int32)
    for r, (s, p, lab) in enumerate(per_rank):
        n = len(lab)
        if n >= S:
            dropped[r] += int((~p[S:]).sum())
            samples[:, r], padded[:, r], bucket[:, r] = s[:S], p[:S], lab[:S]
        elif n == 0:
            raise ValueError(f"rank {r} has no sample to pad with: fewer samples than ranks "
                             f"(use sync_buckets or remainder='drop')")
        else:                                     # repeat the rank's first batches
            idx = np.resize(np.arange(n), S)
            samples[:, r], bucket[:, r] = s[idx], lab[idx]
            padded[:, r] = p[idx]
            padded[n:, r] = True
    return EpochPlan(bucket, samples, padded, np.full(S, B, dtype=np.int32), dropped)


def _apply_limit(plan: EpochPlan, limit: Optional[int]) -> EpochPlan:
    if limit is None:
        return plan
    B = plan.batch_size
    steps = -(-int(limit) // B)
    if steps >= plan.num_steps and not (steps == plan.num_steps and limit % B):
        return plan
    steps = min(steps, plan.num_steps)
    count = plan.count[:steps].copy()
    if steps and steps * B > limit:
        count[-1] = limit - (steps - 1) * B
    return EpochPlan(plan.bucket[:steps], plan.samples[:steps], plan.padded[:steps],
                     count, plan.dropped, plan.offset)


def plan_epoch(hashes: np.ndarray, bucket_of: np.ndarray, *, num_buckets: Optional[int] = None,
               seed: int = 0, epoch: int = 0, world_size: int = 1, batch_size: int = 1,
               remainder: str = "pad", sync_buckets: bool = True, shuffle: bool = True,
               limit: Optional[int] = None) -> EpochPlan:
    """Plan one epoch (see the module docstring).

    ``hashes``: uint64 (N,) stable id hashes (``datago.sharding.shard_hash``), in
    listing order; ``bucket_of``: int (N,) bucket index of each sample (all zeros
    when batches need no bucket); ``limit``: samples per rank.
    """
    _check(world_size, batch_size, remainder)
    hashes = np.asarray(hashes, dtype=np.uint64)
    bucket_of = np.asarray(bucket_of, dtype=np.int64)
    if hashes.shape != bucket_of.shape or hashes.ndim != 1:
        raise ValueError(f"hashes and bucket_of must be 1-D of one length, got "
                         f"{hashes.shape} and {bucket_of.shape}")
    nb = int(bucket_of.max()) + 1 if len(bucket_of) else 0
    num_buckets = nb if num_buckets is None else max(int(num_buckets), nb)
    keys = mix_keys(hashes, seed, epoch) if shuffle else None
    salt = (int(seed), int(epoch), 0x57E9) if shuffle else None
    plan = _plan(np.arange(len(hashes), dtype=np.int64), bucket_of, keys,
                 num_buckets=num_buckets, world_size=world_size, batch_size=batch_size,
                 remainder=remainder, sync_buckets=sync_buckets, order_salt=salt)
    return _apply_limit(plan, limit)


def replan(plan: EpochPlan, step: int, world_size: int, hashes: np.ndarray,
           bucket_of: np.ndarray, *, num_buckets: Optional[int] = None, seed: int = 0,
           epoch: int = 0, remainder: str = "pad", sync_buckets: bool = True,
           shuffle: bool = True) -> EpochPlan:
    """Plan what ``plan`` had not consumed before absolute step ``step`` over
    ``world_size`` ranks (same batch size).  The new plan's row 0 is step ``step``."""
    _check(world_size, plan.batch_size, remainder)
    hashes = np.asarray(hashes, dtype=np.uint64)
    bucket_of = np.asarray(bucket_of, dtype=np.int64)
    nb = int(bucket_of.max()) + 1 if len(bucket_of) else 0
    num_buckets = nb if num_buckets is None else max(int(num_buckets), nb)
    rest = plan.rest(step)
    keys = mix_keys(hashes, seed, epoch) if shuffle else None
    salt = (int(seed), int(epoch), int(step), int(world_size), 0x2E9A) if shuffle else None
    new = _plan(rest, bucket_of, keys, num_buckets=num_buckets, world_size=world_size,
                batch_size=plan.batch_size, remainder=remainder, sync_buckets=sync_buckets,
                order_salt=salt)
    return EpochPlan(new.bucket, new.samples, new.padded, new.count, new.dropped, int(step))


def resume_plan(layouts: Sequence[Tuple[int, int]], world_size: int, hashes: np.ndarray,
                bucket_of: np.ndarray, *, num_buckets: Optional[int] = None, seed: int = 0,
                epoch: int = 0, batch_size: int = 1, remainder: str = "pad",
                sync_buckets: bool = True, shuffle: bool = True,
                limit: Optional[int] = None) -> EpochPlan:
    """The plan of an epoch that ran on other layouts before: ``layouts`` lists
    ``(world_size, stopped_at_step)`` of each earlier layout, oldest first; the
    last layout continues with ``world_size`` ranks from its stop step on."""
    kw = dict(num_buckets=num_buckets, seed=seed, epoch=epoch, remainder=remainder,
              sync_buckets=sync_buckets, shuffle=shuffle)
    sizes = [int(w) for w, _ in layouts] + [int(world_size)]
    plan = plan_epoch(hashes, bucket_of, world_size=sizes[0], batch_size=batch_size,
                      limit=limit, **kw)
    for (_, stop), nxt in zip(layouts, sizes[1:]):
        plan = replan(plan, int(stop), nxt, hashes, bucket_of, **kw)
    return plan
