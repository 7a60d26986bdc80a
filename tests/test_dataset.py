"""DatagoDataset: sharding, batches, epochs, limits, failures, DataLoader integration."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import datago
from datago import DatagoDataset
from datago.sharding import ShardInfo, shard_hash
from conftest import encode, photo

SIZE = dict(default_image_size=128, downsampling_ratio=16, min_aspect_ratio=0.5,
            max_aspect_ratio=2.0)
BUCKETS = datago.make_buckets(128, 16, 0.5, 2.0)


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


def config(root, **loader):
    d = {"source_type": "file", "source_config": {"root_path": str(root)},
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


# ----------------------------------------------------------------------------- sharding

def test_docstring_worked_example():
    h = shard_hash("cats/0001.jpg")
    assert h == 5104570406301491659
    assert h % 6 == 1
    info = ShardInfo(rank=0, world_size=2, worker_id=1, num_workers=3)
    assert info.owns("cats/0001.jpg")


@pytest.mark.parametrize("world", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("workers", [0, 1, 3])
def test_shards_partition_the_dataset(tree, world, workers):
    root, ids = tree
    ds = DatagoDataset(config(root, batch_size=4))
    n_workers = max(workers, 1)          # num_workers=0: the main process is worker 0 of 1
    seen = []
    for rank in range(world):
        for worker in range(n_workers):
            idx = ds.shard_indices(ShardInfo(rank, world, worker, n_workers))
            seen.extend(ds.listing.sample_id(int(i)) for i in idx)
    assert sorted(seen) == ids                     # union is the dataset, nothing twice
    assert len(seen) == len(set(seen))


def test_iteration_yields_exactly_the_shard(tree):
    root, ids = tree
    got = []
    for rank in range(3):
        for worker in range(2):
            info = ShardInfo(rank, 3, worker, 2)
            ds = DatagoDataset(config(root, batch_size=5), detector=lambda info=info: info)
            mine = ids_of(ds)
            assert sorted(mine) == sorted(i for i in ids if info.owns(i))
            got.extend(mine)
    assert sorted(got) == ids


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_dataloader_workers_cover_the_dataset_once(tree, num_workers):
    root, ids = tree
    ds = DatagoDataset(config(root, batch_size=6))
    got = ids_of(DataLoader(ds, batch_size=None, num_workers=num_workers))
    assert sorted(got) == ids
    st = ds.stats()
    assert st["samples"] == len(ids) and st["skipped_total"] == 0


def test_rank_from_environment(tree, monkeypatch):
    root, ids = tree
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = DatagoDataset(config(root, batch_size=8))
    got = ids_of(ds)
    assert sorted(got) == sorted(i for i in ids if ShardInfo(1, 2).owns(i))
    # the config wins over the environment
    c = config(root, batch_size=8)
    c["source_config"].update(rank=0, world_size=2)
    got0 = ids_of(DatagoDataset(c))
    assert sorted(got0 + got) == ids


_DIST_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    import torch.multiprocessing as mp

    def run(rank, root, init, out):
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
        from datago import DatagoDataset
        cfg = {"source_config": {"root_path": root},
               "image_config": {"crop_and_resize": True, "default_image_size": 128,
                                "downsampling_ratio": 16},
               "batch_size": 4}
        ids = [i for b in DatagoDataset(cfg) for i in b["id"]]
        gathered = [None, None]
        dist.all_gather_object(gathered, ids)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
        dist.destroy_process_group()

    if __name__ == "__main__":
        root, init, out = sys.argv[1:4]
        mp.spawn(run, args=(root, init, out), nprocs=2, join=True)
""")


def test_torch_distributed_gloo_two_processes(tree, tmp_path):
    root, ids = tree
    script = tmp_path / "dist.py"
    script.write_text(_DIST_SCRIPT)
    out = tmp_path / "out.json"
    init = f"file://{tmp_path / 'rendezvous'}"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    subprocess.run([sys.executable, str(script), str(root), init, str(out)], check=True,
                   timeout=240, env=env)
    per_rank = json.loads(out.read_text())
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == ids
    for rank in (0, 1):
        assert sorted(per_rank[rank]) == sorted(i for i in ids if ShardInfo(rank, 2).owns(i))


# ----------------------------------------------------------------------------- batches

def test_batches_have_bucket_shapes_and_exact_pixels(tree):
    root, ids = tree
    ds = DatagoDataset(config(root, batch_size=4))
    n = 0
    for b in ds:
        h, w = b["bucket"]
        assert (w, h) in BUCKETS
        k = len(b["id"])
        assert 1 <= k <= 4
        assert b["image"].shape == (k, 3, h, w) and b["image"].dtype == torch.uint8
        assert b["original_size"].shape == (k, 2) and b["crop_coords"].shape == (k, 2)
        for j, sid in enumerate(b["id"]):
            data = (root / sid).read_bytes()
            ref = datago.decode_to_bucket(data, BUCKETS)
            assert ref.bucket == (w, h)
            assert np.array_equal(b["image"][j].permute(1, 2, 0).numpy(), ref.image)
            assert tuple(b["original_size"][j].tolist()) == ref.original_size
            assert tuple(b["crop_coords"][j].tolist()) == ref.crop_coords
            n += 1
    assert n == len(ids)


def test_full_batches_while_the_epoch_runs(tree):
    root, ids = tree
    sizes = [len(b["id"]) for b in DatagoDataset(config(root, batch_size=3))]
    # partial batches only at the end of the epoch, one per bucket at most
    first_partial = next((i for i, s in enumerate(sizes) if s < 3), len(sizes))
    assert all(s < 3 for s in sizes[first_partial:])
    assert sum(sizes) == len(ids)


def test_drop_last_drops_and_counts(tree):
    root, ids = tree
    ds = DatagoDataset(config(root, batch_size=5, drop_last=True))
    sizes = [len(b["id"]) for b in ds]
    assert all(s == 5 for s in sizes)
    st = ds.stats()
    assert st["samples"] + st["dropped_last"] == len(ids)
    assert st["dropped_last"] > 0


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
                                          bucket=(w, h), mask=True)
            assert np.array_equal(m[0].numpy(), ref.image[:, :, 0])
        else:
            assert not m.any()
        d = b["additional_images"]["depth"][j]
        assert d.shape == (3, h, w)
        ref = datago.decode_to_bucket((tmp_path / f"s{i}.depth.png").read_bytes(), bucket=(w, h))
        assert np.array_equal(d.permute(1, 2, 0).numpy(), ref.image)


# ----------------------------------------------------------------------------- order, limit

def test_order_is_deterministic_and_reshuffled_per_epoch(tree):
    root, ids = tree
    c = config(root, batch_size=4, seed=7)
    c["source_config"]["random_sampling"] = True
    a, b = DatagoDataset(c), DatagoDataset(c)
    e0 = ids_of(a)
    assert ids_of(b) == e0 and sorted(e0) == ids
    a.set_epoch(1)
    e1 = ids_of(a)
    assert sorted(e1) == ids and e1 != e0
    a.set_epoch(0)
    assert ids_of(a) == e0
    c["seed"] = 8
    assert ids_of(DatagoDataset(c)) != e0


def test_sequential_order_without_random_sampling(tree):
    root, ids = tree
    items = ids_of(DatagoDataset(config(root)))
    assert items == ids


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
    root, ids = tree
    for world in (1, 2):
        total = 0
        for rank in range(world):
            c = config(root, batch_size=4, limit=13)
            c["source_config"].update(rank=rank, world_size=world)
            ds = DatagoDataset(c)
            got = ids_of(DataLoader(ds, batch_size=None, num_workers=num_workers))
            assert len(got) == 13 and len(set(got)) == 13
            total += len(got)
        assert total == 13 * world


# ----------------------------------------------------------------------------- failures

@pytest.fixture
def bad_tree(tmp_path):
    ids = make_tree(tmp_path, n=12, seed=3)
    good = (tmp_path / ids[0]).read_bytes()
    (tmp_path / "bad_truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "bad_empty.png").write_bytes(b"")
    (tmp_path / "bad_text.jpg").write_bytes(b"this is not an image")
    (tmp_path / "bad_json.jpg").write_bytes(good)
    (tmp_path / "bad_json.json").write_text("{not json")
    return tmp_path, ids


def test_bad_files_are_counted_not_fatal(bad_tree):
    root, ids = bad_tree
    ds = DatagoDataset(config(root, batch_size=4))
    with pytest.warns(RuntimeWarning, match="skipping"):
        got = ids_of(ds)
    assert sorted(got) == ids
    st = ds.stats()
    assert st["skipped"] == {"decode_error": 3, "bad_attributes": 1}
    assert st["samples"] == len(ids)


def test_drop_last_with_bad_files_accounts_for_every_file(bad_tree):
    root, ids = bad_tree
    ds = DatagoDataset(config(root, batch_size=5, drop_last=True))
    with pytest.warns(RuntimeWarning, match="skipping"):
        got = ids_of(ds)
    st = ds.stats()
    n_files = len(ids) + 4  # the good ones plus bad_truncated/bad_empty/bad_text/bad_json
    assert len(got) == st["samples"]
    assert st["samples"] + st["dropped_last"] + sum(st["skipped"].values()) == n_files
    assert st["skipped"] == {"decode_error": 3, "bad_attributes": 1}


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


def test_file_gone_after_listing_is_a_read_error(tmp_path):
    ids = make_tree(tmp_path, n=5)
    ds = DatagoDataset(config(tmp_path, batch_size=2))
    (tmp_path / ids[2]).unlink()                  # vanishes between listing and reading
    with pytest.warns(RuntimeWarning, match="read_error"):
        got = ids_of(ds)
    assert sorted(got) == sorted(ids[:2] + ids[3:])
    assert ds.stats()["skipped"] == {"read_error": 1}


# ----------------------------------------------------------------------------- DataLoader

def test_persistent_workers_follow_set_epoch(tree):
    root, ids = tree
    c = config(root, batch_size=4, seed=3)
    c["source_config"]["random_sampling"] = True
    ds = DatagoDataset(c)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    epochs = []
    for e in range(3):
        ds.set_epoch(e)
        epochs.append(ids_of(loader))
    for e in epochs:
        assert sorted(e) == ids
    assert epochs[0] != epochs[1] != epochs[2]
    fresh = DatagoDataset(c)
    fresh.set_epoch(1)
    got = ids_of(DataLoader(fresh, batch_size=None, num_workers=2))
    assert sorted(got) == sorted(epochs[1])     # worker interleaving may differ; the set does not
    del loader


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
                                            bucket=(w, h), mask=True).image
                d = datago.decode_to_bucket((tmp_path / f"{key}.depth.png").read_bytes(),
                                            bucket=(w, h)).image
                assert np.array_equal(b["masks"]["mask"][j, 0].numpy(), m[:, :, 0])
                assert np.array_equal(b["additional_images"]["depth"][j].permute(1, 2, 0).numpy(), d)
