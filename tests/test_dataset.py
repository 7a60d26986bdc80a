"""DatagoDataset: the epoch plan (batches, ranks, workers, order, limits), streaming
mode (hash shards), failures, DataLoader integration."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import datago
from datago import DatagoDataset, DatagoMapDataset
from datago.sharding import ShardInfo, shard_hash
from conftest import encode, photo

SIZE = dict(default_image_size=128, downsampling_ratio=16, min_aspect_ratio=0.5,
            max_aspect_ratio=2.0)
BUCKETS = datago.make_buckets(128, 16, 0.5, 2.0)
STREAM = {"scan_sizes": False}      # source_config extras: streaming mode (no sizes scan)


def make_tree(root, n=48, seed=0):
    """n images under nested folders: mixed sizes, aspect ratios, JPEG and PNG."""
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(n):
        w = int(rng.integers(40, 260))
        h = int(w / np.exp(rng.uniform(np.log(0.45), np.log(2.2))))
        sub = root / f"part{i % 3}" / f"g{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        arr = photo(w, max(h, 8), seed=i)
        if i % 5 == 0:
            name, data = f"img{i:03d}.png", encode(arr, "PNG")
        else:
            name, data = f"img{i:03d}.jpg", encode(arr, "JPEG", quality=90)
        (sub / name).write_bytes(data)
        ids.append(f"part{i % 3}/g{i % 2}/{name}")
    return sorted(ids)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    ids = make_tree(root)
    return root, ids


def config(root, source=None, **loader):
    """A config dict; ``source``: extra source_config keys (``STREAM``, rank, ...)."""
    d = {"source_type": "file", "source_config": {"root_path": str(root), **(source or {})},
         "image_config": {"crop_and_resize": True, **SIZE}}
    d.update(loader)
    return d


def fixed(rank=0, world=1, worker=0, workers=1):
    return lambda: ShardInfo(rank, world, worker, workers)


def ids_of(items):
    out = []
    for item in items:
        out.extend(item["id"] if isinstance(item["id"], list) else [item["id"]])
    return out


def record(batches):
    """[(step, (height, width), ids)] of the batches an iteration yields."""
    return [(int(b["step"]), tuple(int(x) for x in b["bucket"]), list(b["id"]))
            for b in batches]


def planned(ds, rank=0, world=1, epoch=None):
    """What the plan gives ``rank`` of ``world``: [(step, (height, width), ids)]."""
    p = ds.plan(epoch, world)
    bucket, samples, _ = p.rank(rank)
    out = []
    for t in range(p.num_steps):
        h, w = ds.buckets[int(bucket[t])]
        ids = [ds.listing.sample_id(int(ds._items[i])) for i in samples[t, :int(p.count[t])]]
        out.append((p.offset + t, (h, w), ids))
    return out


def check_covered_once_plus_pads(got, ids, padded):
    """Every id at least once; the repeats are exactly the padding."""
    assert set(got) == set(ids)
    assert len(got) == len(set(got)) + padded


# ----------------------------------------------------------------------------- ranks, workers

def test_docstring_worked_example():
    h = shard_hash("cats/0001.jpg")
    assert h == 5104570406301491659
    assert h % 6 == 1
    info = ShardInfo(rank=0, world_size=2, worker_id=1, num_workers=3)
    assert info.owns("cats/0001.jpg")


@pytest.mark.parametrize("world", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("workers", [0, 1, 3])
def test_shards_partition_the_dataset(tree, world, workers):
    """Streaming mode: the hash shards of (rank, worker) partition the listing."""
    root, ids = tree
    ds = DatagoDataset(config(root, STREAM, batch_size=4))
    n_workers = max(workers, 1)          # num_workers=0: the main process is worker 0 of 1
    seen = []
    for rank in range(world):
        for worker in range(n_workers):
            idx = ds.shard_indices(ShardInfo(rank, world, worker, n_workers))
            seen.extend(ds.listing.sample_id(int(i)) for i in idx)
    assert sorted(seen) == ids                     # union is the dataset, nothing twice
    assert len(seen) == len(set(seen))


def test_iteration_yields_exactly_the_shard(tree):
    """Streaming mode: each (rank, worker) yields its hash shard, nothing else."""
    root, ids = tree
    got = []
    for rank in range(3):
        for worker in range(2):
            info = ShardInfo(rank, 3, worker, 2)
            ds = DatagoDataset(config(root, STREAM, batch_size=5), detector=lambda info=info: info)
            ds._stream_steps = lambda info: None        # one pass (as on a single rank)
            mine = ids_of(ds)
            assert sorted(mine) == sorted(i for i in ids if info.owns(i))
            got.extend(mine)
    assert sorted(got) == ids


@pytest.mark.parametrize("world", [1, 3])
def test_ranks_and_workers_split_the_plan(tree, world):
    """Plan mode: worker w of N yields its rank's steps w, w + N, ...; every rank
    yields the same number of full batches, with the same bucket at every step."""
    root, ids = tree
    workers, bs = 2, 5
    per_rank, got, padded = [], [], 0
    for rank in range(world):
        steps = []
        for worker in range(workers):
            ds = DatagoDataset(config(root, batch_size=bs),
                               detector=fixed(rank, world, worker, workers))
            mine = record(ds)
            assert [s for s, _, _ in mine] == list(range(worker, len(ds), workers))
            steps.extend(mine)
            padded += ds.stats()["padded"]
            assert ds.stats()["skipped_total"] == 0
        steps.sort()
        assert steps == planned(ds, rank, world)       # exactly the rank's slice of the plan
        assert all(len(b) == bs for _, _, b in steps)
        per_rank.append(steps)
        got.extend(i for _, _, b in steps for i in b)
    p = ds.plan(0, world)
    assert len({len(r) for r in per_rank}) == 1 and len(per_rank[0]) == p.num_steps
    for t in range(p.num_steps):                       # one bucket per global step
        assert len({r[t][1] for r in per_rank}) == 1
    assert padded == p.num_padded() > 0
    check_covered_once_plus_pads(got, ids, padded)


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_dataloader_workers_cover_the_dataset_once(tree, num_workers):
    """Every id at least once per epoch; the repeats are the remainder padding; the
    DataLoader yields the steps in order whatever the worker count."""
    root, ids = tree
    ds = DatagoDataset(config(root, batch_size=6))
    got = record(DataLoader(ds, batch_size=None, num_workers=num_workers))
    assert got == planned(ds)
    assert [s for s, _, _ in got] == list(range(len(ds)))
    assert all(len(b) == 6 for _, _, b in got)
    st = ds.stats()
    flat = [i for _, _, b in got for i in b]
    assert st["padded"] == ds.plan().num_padded() > 0
    check_covered_once_plus_pads(flat, ids, st["padded"])
    assert st["samples"] == len(flat) and st["batches"] == len(got)
    assert st["skipped_total"] == 0 and st["dropped_remainder"] == 0


def test_rank_from_environment(tree, monkeypatch):
    root, ids = tree
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = DatagoDataset(config(root, batch_size=8))
    got = record(ds)
    assert got == planned(ds, 1, 2) and len(got) == len(ds)
    # the config wins over the environment
    ds0 = DatagoDataset(config(root, {"rank": 0, "world_size": 2}, batch_size=8))
    got0 = record(ds0)
    assert got0 == planned(ds0, 0, 2) and len(got0) == len(got)
    assert [b for _, b, _ in got0] == [b for _, b, _ in got]
    flat = [i for _, _, b in got0 + got for i in b]
    check_covered_once_plus_pads(flat, ids, ds.stats()["padded"] + ds0.stats()["padded"])
    # streaming mode reads the same environment: rank 1's hash shard, and as many
    # batches as every other rank (samples // (world_size * batch_size))
    sds = DatagoDataset(config(root, STREAM, batch_size=8))
    streamed = list(sds)
    assert len(streamed) == len(sds) == len(ids) // 16
    assert [int(b["step"]) for b in streamed] == list(range(len(ids) // 16))
    assert {i for b in streamed for i in b["id"]} <= {i for i in ids if ShardInfo(1, 2).owns(i)}


_DIST_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    import torch.multiprocessing as mp

    def run(rank, cfg, init, out):
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
        from datago import DatagoDataset
        ds = DatagoDataset(json.loads(cfg))
        batches = [(int(b["step"]), list(b["bucket"]), list(b["id"])) for b in ds]
        mine = {"len": len(ds), "batches": batches, "padded": ds.stats()["padded"]}
        gathered = [None, None]
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
        dist.destroy_process_group()

    if __name__ == "__main__":
        cfg, init, out = sys.argv[1:4]
        mp.spawn(run, args=(cfg, init, out), nprocs=2, join=True)
""")


def test_torch_distributed_gloo_two_processes(tree, tmp_path):
    root, ids = tree
    script = tmp_path / "dist.py"
    script.write_text(_DIST_SCRIPT)
    out = tmp_path / "out.json"
    init = f"file://{tmp_path / 'rendezvous'}"
    cfg = {"source_config": {"root_path": str(root)},
           "image_config": {"crop_and_resize": True, "default_image_size": 128,
                            "downsampling_ratio": 16},
           "batch_size": 4}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    subprocess.run([sys.executable, str(script), json.dumps(cfg), init, str(out)], check=True,
                   timeout=240, env=env)
    per_rank = json.loads(out.read_text())
    runs = [[(s, tuple(b), i) for s, b, i in r["batches"]] for r in per_rank]
    n = len(runs[0])
    assert n > 0 and len(runs[1]) == n == per_rank[0]["len"] == per_rank[1]["len"]
    for r in runs:
        assert [s for s, _, _ in r] == list(range(n))
        assert all(len(i) == 4 for _, _, i in r)
    assert [b for _, b, _ in runs[0]] == [b for _, b, _ in runs[1]]   # same bucket per step
    flat = [i for r in runs for _, _, b in r for i in b]
    check_covered_once_plus_pads(flat, ids, per_rank[0]["padded"] + per_rank[1]["padded"])
    # each rank found its rank and world size in torch.distributed (no RANK variable)
    ref = DatagoDataset(cfg, detector=fixed(0, 2))
    assert runs[0] == planned(ref, 0, 2) and runs[1] == planned(ref, 1, 2)


# ----------------------------------------------------------------------------- batches

def test_batches_have_bucket_shapes_and_exact_pixels(tree):
    root, ids = tree
    ds = DatagoDataset(config(root, batch_size=4))
    got = []
    for b in ds:
        h, w = b["bucket"]
        assert (h, w) in BUCKETS
        assert type(b["bucket"]) is datago.Bucket and b["bucket"] == b["image"].shape[-2:]
        assert len(b["id"]) == 4                       # plan mode: every batch full
        assert b["image"].shape == (4, 3, h, w) and b["image"].dtype == torch.uint8
        assert b["original_size"].shape == (4, 2) and b["crop_coords"].shape == (4, 2)
        for j, sid in enumerate(b["id"]):
            data = (root / sid).read_bytes()
            ref = datago.decode_to_bucket(data, BUCKETS)
            assert ref.bucket == (h, w)                # the plan put it in its own bucket
            assert np.array_equal(b["image"][j].permute(1, 2, 0).numpy(), ref.image)
            assert tuple(b["original_size"][j].tolist()) == ref.original_size
            assert tuple(b["crop_coords"][j].tolist()) == ref.crop_coords
            got.append(sid)
    check_covered_once_plus_pads(got, ids, ds.stats()["padded"])


def test_full_batches_while_the_epoch_runs(tree):
    root, ids = tree
    # plan mode: every batch full (the remainder of each bucket is padded)
    ds = DatagoDataset(config(root, batch_size=3))
    sizes = [len(b["id"]) for b in ds]
    assert sizes == [3] * len(ds)
    assert sum(sizes) == len(ids) + ds.stats()["padded"]
    # streaming mode: partial batches only at the end of the epoch, one per bucket at most
    sizes = [len(b["id"]) for b in DatagoDataset(config(root, STREAM, batch_size=3))]
    first_partial = next((i for i, s in enumerate(sizes) if s < 3), len(sizes))
    assert all(s < 3 for s in sizes[first_partial:])
    assert len(sizes) - first_partial <= len(BUCKETS)
    assert sum(sizes) == len(ids)


def test_drop_last_drops_and_counts(tree):
    """Streaming mode: drop_last drops each bucket's partial batch and counts it."""
    root, ids = tree
    ds = DatagoDataset(config(root, STREAM, batch_size=5, drop_last=True))
    sizes = [len(b["id"]) for b in ds]
    assert all(s == 5 for s in sizes)
    st = ds.stats()
    assert st["samples"] + st["dropped_last"] == len(ids)
    assert st["dropped_last"] > 0
    with pytest.raises(TypeError, match="one pass"):
        len(ds)                                     # unknown in advance


def test_max_open_batches_flushes_early(tree):
    """Streaming mode: loaded samples wait for their bucket's batch to fill, at most
    max_open_batches x batch_size of them (10 here); one more, and the bucket with
    the most waiting is decoded early as a partial batch, counted."""
    root, ids = tree
    ds = DatagoDataset(config(root, STREAM, batch_size=5, max_open_batches=2))
    batches = list(ds)
    assert sorted(ids_of(batches)) == ids
    sizes = [len(b["id"]) for b in batches]
    partial = sum(n < 5 for n in sizes)
    flushed = ds.stats()["early_flushed"]
    # + the buckets still waiting at the end: at most 10 samples
    assert flushed > 0 and flushed <= partial <= flushed + 10
    assert max(sizes) <= 5 and all(b["image"].shape[0] == len(b["id"]) for b in batches)
    ds = DatagoDataset(config(root, STREAM, batch_size=5, max_open_batches=len(BUCKETS)))
    assert sorted(ids_of(ds)) == ids and ds.stats()["early_flushed"] == 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_remainder_drop_drops_and_counts(tree, num_workers):
    """Plan mode, remainder="drop": full batches of distinct samples, each bucket's
    leftovers counted once per rank (by its worker 0), nothing padded."""
    root, ids = tree
    world, got, dropped = 2, [], 0
    per_rank = []
    for rank in range(world):
        ds = DatagoDataset(config(root, {"rank": rank, "world_size": world}, batch_size=5,
                                  remainder="drop"))
        mine = record(DataLoader(ds, batch_size=None, num_workers=num_workers))
        assert mine == planned(ds, rank, world)
        assert all(len(b) == 5 for _, _, b in mine)
        st = ds.stats()
        assert st["padded"] == 0 and st["dropped_remainder"] == int(ds.plan().dropped[rank])
        dropped += st["dropped_remainder"]
        per_rank.append(mine)
        got.extend(i for _, _, b in mine for i in b)
    assert [b for _, b, _ in per_rank[0]] == [b for _, b, _ in per_rank[1]]
    assert len(got) == len(set(got)) and set(got) <= set(ids)
    assert dropped > 0 and len(got) + dropped == len(ids)


def test_single_samples_without_batch_size(tree):
    root, ids = tree
    items = list(DatagoDataset(config(root)))
    assert sorted(i["id"] for i in items) == ids
    for it in items[:5]:
        h, w = it["bucket"]
        assert it["image"].shape == (3, h, w)
        ref = datago.decode_to_bucket((root / it["id"]).read_bytes(), BUCKETS)
        assert np.array_equal(it["image"].permute(1, 2, 0).numpy(), ref.image)


def test_no_crop_gives_original_sizes(tree):
    root, ids = tree
    c = config(root)
    c["image_config"] = None
    items = list(DatagoDataset(c))
    assert sorted(i["id"] for i in items) == ids
    for it in items[:5]:
        arr = datago.decode((root / it["id"]).read_bytes())
        assert np.array_equal(it["image"].permute(1, 2, 0).numpy(), arr)


def test_sidecars_in_batches(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(6):
        arr = photo(120, 90, seed=i)
        (tmp_path / f"s{i}.jpg").write_bytes(encode(arr, "JPEG"))
        (tmp_path / f"s{i}.json").write_text(json.dumps({"caption": f"cap {i}", "score": i / 10}))
        (tmp_path / f"s{i}.txt").write_text(f"text {i}")
        if i % 2 == 0:
            labels = rng.choice(np.array([0, 3, 9], np.uint8), size=(90, 120))
            (tmp_path / f"s{i}.mask.png").write_bytes(encode(labels, "PNG"))
        (tmp_path / f"s{i}.depth.png").write_bytes(encode(arr[:, :, 0], "PNG"))
    ds = DatagoDataset(config(tmp_path, batch_size=6))
    (b,) = list(ds)
    h, w = b["bucket"]
    assert sorted(b["id"]) == [f"s{i}.jpg" for i in range(6)]
    for j, sid in enumerate(b["id"]):
        i = int(sid[1])
        assert b["attributes"][j] == {"caption": f"cap {i}", "score": i / 10, "txt": f"text {i}"}
        m = b["masks"]["mask"][j]
        assert m.shape == (1, h, w)
        assert bool(b["present"]["mask/mask"][j]) == (i % 2 == 0)
        if i % 2 == 0:
            assert set(np.unique(m.numpy())) <= {0, 3, 9}
            ref = datago.decode_to_bucket((tmp_path / f"s{i}.mask.png").read_bytes(),
                                          bucket=(h, w), mask=True)
            assert np.array_equal(m[0].numpy(), ref.image[:, :, 0])
        else:
            assert not m.any()
        d = b["additional_images"]["depth"][j]
        assert d.shape == (3, h, w)
        ref = datago.decode_to_bucket((tmp_path / f"s{i}.depth.png").read_bytes(), bucket=(h, w))
        assert np.array_equal(d.permute(1, 2, 0).numpy(), ref.image)


# ----------------------------------------------------------------------------- order, limit

def test_order_is_deterministic_and_reshuffled_per_epoch(tree):
    root, ids = tree
    c = config(root, {"random_sampling": True}, batch_size=4, seed=7)
    a, b = DatagoDataset(c), DatagoDataset(c)
    e0 = record(a)
    assert record(b) == e0 and e0 == planned(a, epoch=0)
    flat = [i for _, _, x in e0 for i in x]
    check_covered_once_plus_pads(flat, ids, a.stats()["padded"])
    a.set_epoch(1)
    e1 = record(a)
    assert e1 == planned(a, epoch=1)
    assert {i for _, _, x in e1 for i in x} == set(ids)
    assert [x for _, _, x in e1] != [x for _, _, x in e0]
    assert [s for s, _, _ in e1] == [s for s, _, _ in e0] == list(range(len(e0)))
    a.set_epoch(0)
    assert record(a) == e0
    c["seed"] = 8
    assert [x for _, _, x in record(DatagoDataset(c))] != [x for _, _, x in e0]


def test_sequential_order_without_random_sampling(tree):
    root, ids = tree
    # single samples: the listing order, one step each
    ds = DatagoDataset(config(root))
    items = list(ds)
    assert [i["id"] for i in items] == ids
    assert [i["step"] for i in items] == list(range(len(ids))) and len(ds) == len(ids)
    # batches: each bucket's samples in listing order, the steps ordered by the
    # smallest listing position of their own samples (the padding, which repeats a
    # bucket's first samples, does not count)
    ds = DatagoDataset(config(root, batch_size=4))
    got = record(ds)
    assert got == planned(ds) and got == record(DatagoDataset(config(root, batch_size=4)))
    _, _, padded = ds.plan().rank(0)
    pos = {sid: k for k, sid in enumerate(ids)}
    first = [min(pos[i] for i, p in zip(b, padded[t]) if not p) for t, (_, _, b) in enumerate(got)]
    assert first == sorted(first)
    by_bucket = {}
    for _, bucket, b in got:
        by_bucket.setdefault(bucket, []).append(b)
    for bucket, steps in by_bucket.items():
        flat = [i for b in sorted(steps, key=lambda b: pos[b[0]]) for i in b]
        distinct = sorted(set(flat), key=pos.get)
        # listing order, completed by repeating the bucket's first samples
        assert flat == (distinct * len(flat))[:len(flat)], bucket

def test_threads_do_not_change_the_result(tree):
    root, ids = tree
    runs = []
    for threads in (1, 4):
        c = config(root, batch_size=4, num_threads=threads, samples_buffer_size=5)
        runs.append([(b["id"], b["image"].clone()) for b in DatagoDataset(c)])
    assert [r[0] for r in runs[0]] == [r[0] for r in runs[1]]
    for (_, x), (_, y) in zip(*runs):
        assert torch.equal(x, y)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_limit_is_exact_per_rank(tree, num_workers):
    """``limit`` samples per rank, pads included: the first steps of the plan, the
    last one cut, the same number of batches on every rank."""
    root, ids = tree
    for world in (1, 2):
        buckets = []
        for rank in range(world):
            c = config(root, {"rank": rank, "world_size": world}, batch_size=4, limit=13)
            ds = DatagoDataset(c)
            got = record(DataLoader(ds, batch_size=None, num_workers=num_workers))
            assert [len(b) for _, _, b in got] == [4, 4, 4, 1] and len(ds) == 4
            assert got == planned(ds, rank, world)
            full = DatagoDataset(config(root, {"rank": rank, "world_size": world}, batch_size=4))
            head = planned(full, rank, world)[:4]
            assert got[:3] == head[:3] and got[3][2] == head[3][2][:1]
            st = ds.stats()
            assert st["samples"] == 13 and st["padded"] == ds.plan().num_padded(rank)
            buckets.append([b for _, b, _ in got])
        assert all(b == buckets[0] for b in buckets)


# ----------------------------------------------------------------------------- failures

@pytest.fixture
def bad_tree(tmp_path):
    ids = make_tree(tmp_path, n=12, seed=3)
    good = (tmp_path / ids[0]).read_bytes()
    (tmp_path / "bad_truncated.jpg").write_bytes(good[: len(good) // 2])   # header fine, data cut
    (tmp_path / "bad_empty.png").write_bytes(b"")                           # no header
    (tmp_path / "bad_text.jpg").write_bytes(b"this is not an image")        # no header
    (tmp_path / "bad_json.jpg").write_bytes(good)
    (tmp_path / "bad_json.json").write_text("{not json")
    return tmp_path, ids


FAILS_LATE = {"bad_truncated.jpg": "decode_error", "bad_json.jpg": "bad_attributes"}


def test_bad_files_are_counted_not_fatal(bad_tree):
    """Unreadable headers are left out of the plan at construction; files that fail
    later (pixels, sidecars) are skipped and counted, their batch one shorter."""
    root, ids = bad_tree
    ds = DatagoDataset(config(root, batch_size=4))
    assert ds.stats()["index"]["unreadable"] == 2
    plan = planned(ds)
    slots = [i for _, _, b in plan for i in b]
    assert set(slots) == set(ids) | set(FAILS_LATE)          # bad_empty, bad_text never planned
    with pytest.warns(RuntimeWarning, match="skipping"):
        got = record(ds)
    assert len(got) == len(plan)
    for (s, bucket, b), (ps, pbucket, pb) in zip(got, plan):
        assert (s, bucket) == (ps, pbucket)
        assert b == [i for i in pb if i not in FAILS_LATE]   # the failed slots closed up
    expected = Counter(FAILS_LATE[i] for i in slots if i in FAILS_LATE)
    assert expected["decode_error"] >= 1 and expected["bad_attributes"] >= 1
    st = ds.stats()
    assert st["skipped"] == dict(expected)
    flat = [i for _, _, b in got for i in b]
    assert set(flat) == set(ids) and st["samples"] == len(flat)
    assert len(flat) + st["skipped_total"] == 4 * len(plan)


def test_drop_last_with_bad_files_accounts_for_every_file(bad_tree):
    root, ids = bad_tree
    n_files = len(ids) + 4  # the good ones plus bad_truncated/bad_empty/bad_text/bad_json
    # streaming mode: every file read; drop_last
    ds = DatagoDataset(config(root, STREAM, batch_size=5, drop_last=True))
    with pytest.warns(RuntimeWarning, match="skipping"):
        got = ids_of(ds)
    st = ds.stats()
    assert len(got) == st["samples"]
    assert st["samples"] + st["dropped_last"] + sum(st["skipped"].values()) == n_files
    # the two files without a readable header fail as they are loaded; the truncated
    # one fails at decode, unless it waits in a bucket whose partial batch is dropped
    # (never decoded, counted as dropped)
    assert set(st["skipped"]) == {"decode_error", "bad_attributes"}
    assert st["skipped"]["bad_attributes"] == 1 and 2 <= st["skipped"]["decode_error"] <= 3
    # plan mode, remainder="drop": unreadable at the scan, dropped, skipped or yielded
    ds = DatagoDataset(config(root, batch_size=5, remainder="drop"))
    with pytest.warns(RuntimeWarning, match="skipping"):
        got = ids_of(ds)
    st = ds.stats()
    assert len(got) == len(set(got)) == st["samples"] and st["padded"] == 0
    assert st["index"]["unreadable"] == 2 and st["dropped_remainder"] > 0
    assert set(st["skipped"]) <= {"decode_error", "bad_attributes"}
    assert (st["index"]["unreadable"] + st["dropped_remainder"] + st["skipped_total"]
            + st["samples"]) == n_files


def test_on_error_raise_names_the_sample(bad_tree):
    root, _ = bad_tree
    ds = DatagoDataset(config(root, batch_size=4, on_error="raise"))
    with pytest.raises(datago.DatagoError, match=r"bad_\w+\.(jpg|png)"):
        list(ds)


def test_on_error_raise_crosses_dataloader_workers(bad_tree):
    root, _ = bad_tree
    ds = DatagoDataset(config(root, batch_size=4, on_error="raise"))
    with pytest.raises(datago.DatagoError, match=r"bad_\w+\.(jpg|png)"):
        list(DataLoader(ds, batch_size=None, num_workers=1))


@pytest.mark.parametrize("source", [None, STREAM], ids=["plan", "stream"])
def test_file_gone_after_listing_is_a_read_error(tmp_path, source):
    ids = make_tree(tmp_path, n=5)
    ds = DatagoDataset(config(tmp_path, source, batch_size=2))
    plan = planned(ds) if source is None else None
    gone = ids[2]
    (tmp_path / gone).unlink()                    # vanishes between listing and reading
    with pytest.warns(RuntimeWarning, match="read_error"):
        got = list(ds)
    flat = ids_of(got)
    assert set(flat) == set(ids) - {gone}
    if plan is None:
        assert sorted(flat) == sorted(ids[:2] + ids[3:])
        assert ds.stats()["skipped"] == {"read_error": 1}
    else:
        assert record(got) == [(s, k, [i for i in b if i != gone]) for s, k, b in plan]
        n_gone = sum(b.count(gone) for _, _, b in plan)
        assert n_gone >= 1 and ds.stats()["skipped"] == {"read_error": n_gone}


# ----------------------------------------------------------------------------- DataLoader

def test_persistent_workers_follow_set_epoch(tree):
    root, ids = tree
    c = config(root, {"random_sampling": True}, batch_size=4, seed=3)
    ds = DatagoDataset(c)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    epochs = []
    for e in range(3):
        ds.set_epoch(e)
        epochs.append(record(loader))
        assert epochs[-1] == planned(ds, epoch=e)       # this epoch's plan, steps in order
    for e in epochs:
        assert {i for _, _, b in e for i in b} == set(ids)
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    fresh = DatagoDataset(c)
    fresh.set_epoch(1)
    assert record(DataLoader(fresh, batch_size=None, num_workers=2)) == epochs[1]
    del loader


def test_batch_bucket_is_the_image_height_width(tree):
    """``batch["bucket"]`` is a ``datago.Bucket(height, width)`` equal to the image
    tensor's last two dimensions (N, 3, H, W), in plan and streaming mode, for single
    samples, and after DataLoader workers pickled it."""
    root, _ = tree
    seen = set()
    for source, batch_size, workers in [(None, 4, 0), (STREAM, 4, 0), (None, None, 0),
                                        (None, 4, 1)]:
        ds = DatagoDataset(config(root, source, batch_size=batch_size))
        for b in DataLoader(ds, batch_size=None, num_workers=workers):
            bucket = b["bucket"]
            assert type(bucket) is datago.Bucket, type(bucket)
            assert bucket == tuple(b["image"].shape[-2:])
            assert (bucket.height, bucket.width) == tuple(b["image"].shape[-2:])
            assert bucket in BUCKETS
            seen.add(bucket)
    assert any(b.height > b.width for b in seen) and any(b.width > b.height for b in seen)


def test_map_dataset_bucket_of(tree):
    root, ids = tree
    ds = DatagoMapDataset(config(root))
    for i in range(6):
        b = ds.bucket_of(i)
        assert type(b) is datago.Bucket
        assert b == tuple(ds[i]["image"].shape[-2:]) == ds[i]["bucket"]


def test_pin_memory(tree):
    root, ids = tree
    ds = DatagoDataset(config(root, batch_size=8))
    b = next(iter(DataLoader(ds, batch_size=None, num_workers=1, pin_memory=True)))
    if torch.cuda.is_available():
        assert b["image"].is_pinned()
    assert b["image"].dtype == torch.uint8 and len(b["id"]) == b["image"].shape[0]


def test_breaking_out_leaves_no_threads(tree):
    root, _ = tree
    before = {t.ident for t in threading.enumerate()}
    ds = DatagoDataset(config(root, batch_size=2, num_threads=3))
    it = iter(ds)
    next(it)
    del it
    gc.collect()
    after = [t for t in threading.enumerate() if t.ident not in before]
    assert not [t for t in after if t.name.startswith("datago")]


def test_interpreter_exit_with_live_workers_does_not_hang(tree, tmp_path):
    root, _ = tree
    script = tmp_path / "exit.py"
    script.write_text(textwrap.dedent(f"""
        from torch.utils.data import DataLoader
        from datago import DatagoDataset
        cfg = {{"source_config": {{"root_path": {str(root)!r}}},
               "image_config": {{"default_image_size": 128, "downsampling_ratio": 16}},
               "batch_size": 2, "samples_buffer_size": 4}}
        loader = DataLoader(DatagoDataset(cfg), batch_size=None, num_workers=2,
                            persistent_workers=True)
        it = iter(loader)
        next(it)
        print("got one batch")
        # exit with the iterator, its workers and their threads still alive
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "got one batch" in r.stdout


def test_config_forms_and_repr(tree):
    root, _ = tree
    c = config(root, batch_size=4)
    for form in (c, json.dumps(c), datago.DatagoConfig.from_dict(c)):
        ds = DatagoDataset(form)
        assert ds.config.loader.batch_size == 4
    assert "batch_size=4" in repr(ds)
    with pytest.raises(datago.ConfigError, match="batch_sise.*did you mean 'batch_size'"):
        DatagoDataset({**c, "batch_sise": 3})
    with pytest.raises(ValueError, match="epoch"):
        ds.set_epoch(-1)


def test_sidecars_under_many_threads(tmp_path):
    """Masks and additional images of concurrently decoded samples all land in place."""
    for i in range(32):
        arr = photo(96 + i, 80, seed=100 + i)
        (tmp_path / f"t{i:02d}.jpg").write_bytes(encode(arr, "JPEG"))
        (tmp_path / f"t{i:02d}.mask.png").write_bytes(encode(((arr[:, :, 0] > 128) * 5).astype(np.uint8), "PNG"))
        (tmp_path / f"t{i:02d}.depth.png").write_bytes(encode(arr[:, :, 1], "PNG"))
    ds = DatagoDataset(config(tmp_path, batch_size=8, num_threads=8, samples_buffer_size=32))
    for _ in range(3):
        for b in ds:
            h, w = b["bucket"]
            assert b["present"]["mask/mask"].all() and b["present"]["image/depth"].all()
            for j, sid in enumerate(b["id"]):
                key = sid[:-4]
                m = datago.decode_to_bucket((tmp_path / f"{key}.mask.png").read_bytes(),
                                            bucket=(h, w), mask=True).image
                d = datago.decode_to_bucket((tmp_path / f"{key}.depth.png").read_bytes(),
                                            bucket=(h, w)).image
                assert np.array_equal(b["masks"]["mask"][j, 0].numpy(), m[:, :, 0])
                assert np.array_equal(b["additional_images"]["depth"][j].permute(1, 2, 0).numpy(), d)
