"""The epoch plan (datago.plan): pure arrays in, pure arrays out -- no IO."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from datago.plan import EpochPlan, mix_keys, plan_epoch, replan, resume_plan


def skewed(n, num_buckets, mix, seed=0):
    """Synthetic hashes and bucket labels.  mix: "uniform", "one90" (one bucket holds
    90%), "tiny" (most buckets smaller than a global batch)."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2 ** 63, n, dtype=np.uint64)
    if mix == "uniform":
        b = rng.integers(0, num_buckets, n)
    elif mix == "one90":
        b = np.where(rng.uniform(size=n) < 0.9, 3, rng.integers(0, num_buckets, n))
    else:
        p = np.array([0.6] + [0.4 / (num_buckets - 1)] * (num_buckets - 1))
        b = rng.choice(num_buckets, n, p=p)
    return hashes, b.astype(np.int64)


def worker_steps(plan: EpochPlan, num_workers: int, start: int = 0):
    """The steps each DataLoader worker takes (as DatagoDataset splits them)."""
    n = max(num_workers, 1)
    return [list(range(start + w, plan.num_steps, n)) for w in range(n)]


def check_plan(plan: EpochPlan, bucket_of, n, world, batch, remainder, sync, limit=None):
    S = plan.num_steps
    assert plan.samples.shape == (S, world, batch)
    valid = plan.valid()
    # every slot of a batch holds samples of that batch's bucket
    for t in range(S):
        for r in range(world):
            k = plan.count[t]
            assert (bucket_of[plan.samples[t, r, :k]] == plan.bucket[t, r]).all()
    if sync:
        assert (plan.bucket == plan.bucket[:, :1]).all()        # one bucket per step
    used = plan.samples[valid]
    pads = plan.padded[valid]
    real = used[~pads]
    assert len(np.unique(real)) == len(real)                     # non-pad slots: distinct
    if limit is None:
        if remainder == "pad":
            assert set(used.tolist()) == set(range(n))           # everything at least once
            assert len(real) == n
        else:
            assert not pads.any()
            assert len(real) + int(plan.dropped.sum()) == n      # drop: counted exactly
    else:
        per_rank = valid[:, 0].sum()
        assert per_rank == min(limit, S * batch) or S == 0
    # repeats are exactly the padded slots
    c = Counter(used.tolist())
    assert sum(v - 1 for v in c.values()) == int(pads.sum())


@pytest.mark.parametrize("world", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("num_workers", [0, 1, 3])
@pytest.mark.parametrize("remainder", ["pad", "drop"])
@pytest.mark.parametrize("mix", ["uniform", "one90", "tiny"])
@pytest.mark.parametrize("sync", [True, False])
def test_property_equal_steps_synced_buckets_complete(world, num_workers, remainder, mix, sync):
    n, nb, batch = 700, 9, 4
    hashes, b = skewed(n, nb, mix, seed=world * 7 + num_workers)
    if not sync and remainder == "pad" and world > n:
        pytest.skip("fewer samples than ranks")
    plan = plan_epoch(hashes, b, num_buckets=nb, seed=3, epoch=1, world_size=world,
                      batch_size=batch, remainder=remainder, sync_buckets=sync)
    check_plan(plan, b, n, world, batch, remainder, sync)
    # workers split the steps of a rank: disjoint, complete, balanced within one
    split = worker_steps(plan, num_workers)
    flat = sorted(t for s in split for t in s)
    assert flat == list(range(plan.num_steps))
    assert max(map(len, split)) - min(map(len, split)) <= 1
    # every rank has exactly the same number of batches (a rank is a column)
    for r in range(world):
        assert len(plan.rank(r)[0]) == plan.num_steps


def test_pad_repeats_within_the_bucket_and_counts(tmp_path):
    hashes, b = skewed(11, 2, "uniform")
    b = np.array([0] * 7 + [1] * 4)
    plan = plan_epoch(hashes, b, world_size=2, batch_size=2, remainder="pad")
    assert plan.num_steps == 3                         # A: ceil(7/4) = 2, B: 1
    assert sorted(plan.bucket[:, 0].tolist()) == [0, 0, 1]
    assert plan.num_padded() == 1
    drop = plan_epoch(hashes, b, world_size=2, batch_size=2, remainder="drop")
    assert drop.num_steps == 2 and int(drop.dropped.sum()) == 3 and drop.num_padded() == 0


def test_tiny_bucket_padded_to_a_whole_global_batch():
    hashes, _ = skewed(5, 1, "uniform")
    b = np.array([0, 0, 0, 0, 1])                      # bucket 1 has one sample
    plan = plan_epoch(hashes, b, world_size=8, batch_size=4, remainder="pad")
    ones = plan.samples[plan.bucket[:, 0] == 1]
    assert ones.size == 32 and set(ones.ravel().tolist()) == {4}
    assert plan_epoch(hashes, b, world_size=8, batch_size=4, remainder="drop").num_steps == 0


def test_deterministic_and_reshuffled_per_epoch():
    hashes, b = skewed(500, 6, "uniform")
    kw = dict(num_buckets=6, seed=1, world_size=4, batch_size=8)
    a = plan_epoch(hashes, b, epoch=0, **kw)
    assert np.array_equal(a.samples, plan_epoch(hashes, b, epoch=0, **kw).samples)
    c = plan_epoch(hashes, b, epoch=1, **kw)
    assert not np.array_equal(a.samples, c.samples)
    assert not np.array_equal(a.samples, plan_epoch(hashes, b, epoch=0, **{**kw, "seed": 2}).samples)


def test_batches_are_runs_of_the_seeded_hash_order():
    """Within a bucket, global batches are consecutive runs of the samples ordered by
    the seeded id hash (not by listing position): membership follows the ids."""
    hashes, _ = skewed(300, 1, "uniform")
    b = np.zeros(300, dtype=np.int64)
    plan = plan_epoch(hashes, b, world_size=3, batch_size=4, seed=5, epoch=2,
                      remainder="drop")
    rank_of = np.argsort(np.argsort(mix_keys(hashes, 5, 2), kind="stable"), kind="stable")
    for t in range(plan.num_steps):
        pos = np.sort(rank_of[plan.samples[t].ravel()])
        assert (np.diff(pos) == 1).all() and pos[0] % 12 == 0


def test_no_shuffle_keeps_listing_order_per_sample():
    hashes, _ = skewed(50, 1, "uniform")
    plan = plan_epoch(hashes, np.zeros(50, dtype=np.int64), world_size=1, batch_size=1,
                      shuffle=False)
    assert plan.samples[:, 0, 0].tolist() == list(range(50))


@pytest.mark.parametrize("limit", [1, 5, 8, 13, 10_000])
@pytest.mark.parametrize("world", [1, 3])
def test_limit_is_exact_per_rank(limit, world):
    hashes, b = skewed(200, 5, "uniform")
    plan = plan_epoch(hashes, b, world_size=world, batch_size=4, limit=limit)
    full = plan_epoch(hashes, b, world_size=world, batch_size=4)
    per_rank = int(plan.valid()[:, 0].sum())
    assert per_rank == min(limit, full.num_steps * 4)
    # the cut plan is a prefix of the full one
    assert np.array_equal(plan.samples[:-1], full.samples[:plan.num_steps - 1])


def test_mix_keys_is_a_seeded_bijection_like_shuffle():
    h = np.arange(1000, dtype=np.uint64)
    k1, k2 = mix_keys(h, 1, 0), mix_keys(h, 1, 1)
    assert len(np.unique(k1)) == 1000 and not np.array_equal(np.argsort(k1), np.argsort(k2))
    assert np.array_equal(k1, mix_keys(h, 1, 0))


@pytest.mark.parametrize("old,new", [(4, 3), (2, 3), (3, 1), (1, 8)])
@pytest.mark.parametrize("remainder", ["pad", "drop"])
@pytest.mark.parametrize("sync", [True, False])
def test_elastic_replan_loses_and_repeats_nothing(old, new, remainder, sync):
    n, nb, batch = 400, 7, 4
    hashes, b = skewed(n, nb, "one90", seed=old * 10 + new)
    kw = dict(num_buckets=nb, seed=2, epoch=3, remainder=remainder, sync_buckets=sync)
    plan = plan_epoch(hashes, b, world_size=old, batch_size=batch, **kw)
    for k in (0, 1, plan.num_steps // 2, plan.num_steps):
        consumed = set(plan.samples[:k].ravel().tolist())
        new_plan = replan(plan, k, new, hashes, b, **kw)
        assert new_plan.offset == k
        valid = new_plan.valid()
        got = new_plan.samples[valid]
        real = got[~new_plan.padded[valid]]
        rest = set(plan.samples.ravel().tolist()) - consumed
        if remainder == "pad":
            assert sorted(real.tolist()) == sorted(rest)          # each exactly once
            assert set(got.tolist()) == rest                       # pads repeat the rest only
        else:
            assert len(set(real.tolist())) == len(real)
            assert set(real.tolist()) | set() <= rest
            assert len(real) + int(new_plan.dropped.sum()) == len(rest)
        if sync:
            assert (new_plan.bucket == new_plan.bucket[:, :1]).all()
        # the rest of the old plan is what rest() says
        assert set(plan.rest(k).tolist()) == rest


def test_resume_plan_replays_a_chain_of_layouts():
    hashes, b = skewed(300, 4, "uniform")
    kw = dict(num_buckets=4, seed=1, epoch=0, batch_size=4)
    p4 = plan_epoch(hashes, b, world_size=4, **kw)
    p3 = replan(p4, 2, 3, hashes, b, num_buckets=4, seed=1, epoch=0)
    p2 = replan(p3, 5, 2, hashes, b, num_buckets=4, seed=1, epoch=0)
    chained = resume_plan([(4, 2), (3, 5)], 2, hashes, b, **kw)
    assert chained.offset == 5 and np.array_equal(chained.samples, p2.samples)


def test_rest_rejects_steps_outside_the_plan():
    hashes, b = skewed(50, 2, "uniform")
    plan = plan_epoch(hashes, b, world_size=2, batch_size=4)
    with pytest.raises(ValueError, match="outside this plan"):
        plan.rest(plan.num_steps + 1)


def test_bad_arguments():
    h = np.zeros(3, dtype=np.uint64)
    b = np.zeros(3, dtype=np.int64)
    with pytest.raises(ValueError, match="world_size"):
        plan_epoch(h, b, world_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        plan_epoch(h, b, batch_size=0)
    with pytest.raises(ValueError, match="remainder"):
        plan_epoch(h, b, remainder="wrap")
    with pytest.raises(ValueError, match="one length"):
        plan_epoch(h, b[:2])
