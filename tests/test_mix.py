"""Random access (DatagoMapDataset) and weighted mixing of several sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datago import ConfigError, DatagoDataset
from datago.dataset import DatagoMapDataset
from datago.config import DatagoConfig
from datago.sharding import ShardInfo
from datago.sources.mix import mix_counts, mix_items
from test_dataset import make_tree

IMAGE = {"crop_and_resize": True, "default_image_size": 64, "downsampling_ratio": 16}


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    a = tmp_path_factory.mktemp("mix_a")
    b = tmp_path_factory.mktemp("mix_b")
    return (a, make_tree(a, n=40, seed=1)), (b, make_tree(b, n=12, seed=2))


def folder(root, **kw):
    return {"source_config": {"root_path": str(root)}, "image_config": IMAGE, **kw}


def mix(trees, weights=(0.7, 0.3), **kw):
    return {"sources": [{"weight": w, "source_type": "file",
                         "source_config": {"root_path": str(root)}}
                        for w, (root, _) in zip(weights, trees)],
            "image_config": IMAGE, **kw}


# ---------------------------------------------------------------------------- random access

def test_map_dataset_equals_the_iterable_for_the_same_id(trees):
    (root, ids), _ = trees
    m = DatagoMapDataset(folder(root))
    assert len(m) == len(ids)
    it = {s["id"]: s for s in DatagoDataset(folder(root))}
    for i in (0, 7, len(m) - 1, -1):
        got = m[i]
        want = it[m.sample_id(i)]
        assert got["id"] == want["id"]
        assert torch.equal(got["image"], want["image"])
        assert tuple(got["bucket"]) == tuple(want["bucket"])
        assert torch.equal(got["original_size"], want["original_size"])
        assert m.bucket_of(i) == tuple(want["bucket"])
    with pytest.raises(IndexError):
        m[len(m)]
    with pytest.raises(TypeError):
        m["0"]


def test_map_dataset_with_a_sampler_and_workers(trees):
    from torch.utils.data import DataLoader, RandomSampler
    (root, ids), _ = trees
    m = DatagoMapDataset(folder(root))
    got = [s["id"] for s in DataLoader(m, batch_size=None, num_workers=2,
                                       sampler=RandomSampler(m, generator=torch.Generator().manual_seed(0)))]
    assert sorted(got) == sorted(ids) and got != sorted(ids)


def test_map_dataset_refuses_batches_and_names_bad_samples(trees, tmp_path):
    (root, _), _ = trees
    with pytest.raises(ConfigError, match="batch_size"):
        DatagoMapDataset(folder(root, batch_size=4))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    m = DatagoMapDataset(folder(tmp_path))
    from datago._engine import SampleError
    with pytest.raises(SampleError, match="'bad.jpg': decode_error"):
        m[0]


# ---------------------------------------------------------------------------- mixing

@pytest.mark.parametrize("exhausted", ["stop", "cycle"])
def test_mix_proportions_over_10k_draws(exhausted):
    groups = [np.arange(0, 6000), np.arange(6000, 10000), np.arange(10000, 12500)]
    weights = [0.5, 0.3, 0.2]
    items, reps = mix_items(groups, weights, exhausted, seed=4, epoch=0)
    counts = [int(((items >= g[0]) & (items <= g[-1])).sum()) for g in groups]
    total = sum(counts)
    assert total >= 10000
    for c, w in zip(counts, weights):
        assert abs(c / total - w) < 0.002                    # exact up to rounding
    if exhausted == "stop":        # the scarcest source (relative to its weight) is read once
        assert counts == mix_counts([6000, 4000, 2500], weights, "stop") == [6000, 3600, 2400]
        assert reps.max() == 0 and len(set(items.tolist())) == total
    else:                          # the most plentiful is read once, the others cycled
        assert counts == [6667, 4000, 2667]
        assert reps.max() == 1
    again, _ = mix_items(groups, weights, exhausted, seed=4, epoch=0)
    other, _ = mix_items(groups, weights, exhausted, seed=4, epoch=1)
    assert np.array_equal(items, again) and not np.array_equal(items, other)
    # within a contiguous window (what batches take after the plan's shuffle), the
    # proportions hold within binomial bounds
    rng = np.random.default_rng(0)
    window = rng.permutation(items)[:2000]
    share = ((window >= 6000) & (window < 10000)).mean()
    assert abs(share - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 2000)


def test_mix_through_the_dataset_is_the_same_on_every_rank(trees):
    (ra, ia), (rb, ib) = trees
    runs = []
    for rank in range(2):
        ds = DatagoDataset(mix(trees, batch_size=4, seed=1),
                           detector=lambda r=rank: ShardInfo(r, 2, 0, 1))
        runs.append([(b["step"], tuple(b["bucket"]), b["id"], b["source_index"].tolist())
                     for b in ds])
        stats = ds.stats()
        assert sum(stats["sources"]) == stats["samples"]
    assert len(runs[0]) == len(runs[1])
    for (s0, b0, _, _), (s1, b1, _, _) in zip(*runs):
        assert (s0, b0) == (s1, b1)
    got = [(k, i) for run in runs for _, _, ids, ks in run for i, k in zip(ids, ks)]
    from_a = {i for k, i in got if k == 0}
    from_b = {i for k, i in got if k == 1}
    assert from_a <= set(ia) and from_b <= set(ib)
    assert from_b == set(ib)                    # "stop": the scarce source is read whole
    # 0.7/0.3 of a mix limited by b (12 / 0.3 = 40 samples): 28 from a, 12 from b
    assert len(from_a) == 28


def test_mix_cycle_restarts_the_scarce_source(trees):
    (_, ia), (_, ib) = trees
    ds = DatagoDataset(mix(trees, weights=(0.5, 0.5), batch_size=4, exhausted="cycle",
                           remainder="drop"))
    ks = [k for b in ds for k in b["source_index"].tolist()]
    assert ks.count(1) > len(ib)               # b read more than once
    assert abs(ks.count(0) - ks.count(1)) <= 8


def test_mix_resumes_mid_epoch(trees):
    full = [(b["step"], b["id"]) for b in DatagoDataset(mix(trees, batch_size=4))]
    ds = DatagoDataset(mix(trees, batch_size=4))
    ds.load_state_dict({"epoch": 0, "step": 3})
    rest = [(b["step"], b["id"]) for b in ds]
    assert rest == full[3:]


def test_mix_config_errors(trees):
    with pytest.raises(ConfigError, match=r"sources\[1\].weight: must be a number > 0"):
        DatagoConfig.from_dict(mix(trees, weights=(1, 0)))
    with pytest.raises(ConfigError, match=r"sources\[0\].source_config.root_pat"):
        DatagoConfig.from_dict({"sources": [{"weight": 1, "source_config": {"root_pat": "x"}}]})
    with pytest.raises(ConfigError, match="exhausted: must be one of 'stop', 'cycle'"):
        DatagoConfig.from_dict(mix(trees, exhausted="wrap"))
    cfg = DatagoConfig.from_dict(mix(trees))
    assert DatagoConfig.from_dict(cfg.to_dict()) == cfg
