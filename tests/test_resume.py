"""Resume: batch["step"], state_dict / load_state_dict, StatefulDataLoader, elastic
re-planning over another world size or worker count, fingerprints."""

from __future__ import annotations

import random

import pytest
from torch.utils.data import DataLoader

from datago import DatagoDataset
from datago.dataset import StateError
from datago.sharding import ShardInfo
from test_dataset import make_tree

SIZE = dict(default_image_size=64, downsampling_ratio=16, min_aspect_ratio=0.5,
            max_aspect_ratio=2.0)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    ids = make_tree(root, n=40)
    return root, ids


def cfg(root, **kw):
    d = {"source_config": {"root_path": str(root), "random_sampling": True},
         "image_config": {"crop_and_resize": True, **SIZE}, "batch_size": 3, "seed": 4}
    d.update(kw)
    return d


def run(ds, num_workers=0, stop=None):
    """[(step, bucket, ids)] of one epoch, optionally only the first ``stop`` batches."""
    out = []
    loader = DataLoader(ds, batch_size=None, num_workers=num_workers)
    for b in loader:
        out.append((b["step"], tuple(b["bucket"]), tuple(b["id"])))
        if stop is not None and len(out) == stop:
            break
    return out


def ranked(root, rank, world, worker=0, workers=1, **kw):
    return DatagoDataset(cfg(root, **kw), detector=lambda: ShardInfo(rank, world, worker, workers))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_steps_number_the_epoch(tree, num_workers):
    root, _ = tree
    ds = DatagoDataset(cfg(root))
    ds.set_epoch(2)
    got = run(ds, num_workers)
    assert [s for s, _, _ in got] == list(range(len(got))) and len(got) == len(ds)


@pytest.mark.parametrize("num_workers", [0, 2, 3])
def test_resume_at_random_steps_equals_the_uninterrupted_run(tree, num_workers):
    root, _ = tree
    ds = DatagoDataset(cfg(root))
    ds.set_epoch(1)
    full = run(ds)
    rng = random.Random(num_workers)
    for k in sorted({0, 1, len(full) - 1, len(full)} | {rng.randrange(len(full)) for _ in range(3)}):
        again = DatagoDataset(cfg(root))
        again.load_state_dict({"epoch": 1, "step": k})
        assert len(again) == len(full)                 # the epoch's length, as steps count
        assert run(again, num_workers) == full[k:], k


def test_state_dict_mid_epoch_without_workers(tree):
    root, _ = tree
    ds = DatagoDataset(cfg(root))
    ds.set_epoch(3)
    full = run(ds)
    part = DatagoDataset(cfg(root))
    part.set_epoch(3)
    it = iter(part)
    first = [next(it) for _ in range(4)]
    state = part.state_dict()
    assert state["epoch"] == 3 and state["step"] == 4 and state["world_size"] == 1
    assert [b["step"] for b in first] == [0, 1, 2, 3]
    fresh = DatagoDataset(cfg(root))
    fresh.load_state_dict(state)
    assert run(fresh) == full[4:]


def test_resume_applies_once_then_epochs_start_at_zero(tree):
    root, _ = tree
    ds = DatagoDataset(cfg(root))
    ds.load_state_dict({"epoch": 0, "step": 5})
    rest = run(ds)
    assert rest[0][0] == 5
    assert run(ds)[0][0] == 0                        # the next pass is a whole epoch
    ds.load_state_dict({"epoch": 0, "step": 5})
    ds.set_epoch(1)                                  # another epoch: the resume point is gone
    assert run(ds)[0][0] == 0


def test_main_process_state_after_worker_iteration_says_how(tree):
    root, _ = tree
    ds = DatagoDataset(cfg(root))
    run(ds, num_workers=2, stop=3)
    with pytest.raises(StateError, match="StatefulDataLoader"):
        ds.state_dict()
    assert ds.state_for(3)["step"] == 3


@pytest.mark.parametrize("num_workers", [0, 2, 3])
def test_stateful_dataloader(tree, num_workers):
    sdl = pytest.importorskip("torchdata.stateful_dataloader")
    root, _ = tree
    ds = DatagoDataset(cfg(root))
    full = run(ds)
    loader = sdl.StatefulDataLoader(DatagoDataset(cfg(root)), batch_size=None,
                                    num_workers=num_workers)
    got = []
    for b in loader:
        got.append((b["step"], tuple(b["bucket"]), tuple(b["id"])))
        if len(got) == 5:
            break
    state = loader.state_dict()
    del loader
    resumed = sdl.StatefulDataLoader(DatagoDataset(cfg(root)), batch_size=None,
                                     num_workers=num_workers)
    resumed.load_state_dict(state)
    rest = [(b["step"], tuple(b["bucket"]), tuple(b["id"])) for b in resumed]
    assert got + rest == full
    # the next epoch is a whole one again
    assert [b["step"] for b in resumed][:1] == [0]


def test_other_worker_count_resumes_identically(tree):
    """2 -> 3 workers: workers only split a rank's steps, so nothing changes."""
    root, _ = tree
    full = run(DatagoDataset(cfg(root)), num_workers=2)
    state = DatagoDataset(cfg(root)).state_for(7)
    ds = DatagoDataset(cfg(root))
    ds.load_state_dict(state)
    assert run(ds, num_workers=3) == full[7:]


@pytest.mark.parametrize("old,new", [(4, 3), (2, 3), (3, 1)])
@pytest.mark.parametrize("remainder", ["pad", "drop"])
def test_elastic_world_size_loses_and_repeats_nothing(tree, old, new, remainder):
    root, ids = tree
    olds = [ranked(root, r, old, remainder=remainder) for r in range(old)]
    runs = [run(d) for d in olds]
    assert len({len(r) for r in runs}) == 1
    k = len(runs[0]) // 2
    consumed = [i for r in runs for _, _, b in r[:k] for i in b]
    planned = {i for r in runs for _, _, b in r for i in b}
    state = olds[0].state_for(k)
    assert state["world_size"] == old
    news = [ranked(root, r, new, remainder=remainder) for r in range(new)]
    rest_runs = []
    for d in news:
        d.load_state_dict(state)
        rest_runs.append(run(d))
    assert len({len(r) for r in rest_runs}) == 1                 # equal batches
    for step_rows in zip(*rest_runs):                            # synced buckets, numbered on
        assert len({row[1] for row in step_rows}) == 1
        assert len({row[0] for row in step_rows}) == 1
    assert rest_runs[0][0][0] == k if rest_runs[0] else True
    delivered = [i for r in rest_runs for _, _, b in r for i in b]
    padded = sum(d.stats()["padded"] for d in news)
    rest = planned - set(consumed)
    assert set(delivered).isdisjoint(consumed)                   # nothing repeated
    if remainder == "pad":
        assert set(delivered) == rest                            # nothing lost
        assert len(delivered) - padded == len(rest)
    else:
        assert padded == 0 and len(delivered) == len(set(delivered))
        assert set(delivered) <= rest
    # and a state saved after the re-plan resumes within it
    if rest_runs[0]:
        later = news[0].state_for(k + 1)
        again = ranked(root, 0, new, remainder=remainder)
        again.load_state_dict(later)
        assert run(again) == rest_runs[0][1:]


def test_fingerprint_names_what_changed(tree, tmp_path):
    root, _ = tree
    state = DatagoDataset(cfg(root)).state_for(2)
    with pytest.raises(StateError, match=r"batch_size \(3 -> 4\)"):
        DatagoDataset(cfg(root, batch_size=4)).load_state_dict(state)
    with pytest.raises(StateError, match=r"seed \(4 -> 5\)"):
        DatagoDataset(cfg(root, seed=5)).load_state_dict(state)
    other = tmp_path / "other"
    make_tree(other, n=41)
    with pytest.raises(StateError, match=r"samples \(40 -> 41\)"):
        DatagoDataset(cfg(other)).load_state_dict(state)


@pytest.mark.parametrize("state,match", [
    ({"epoch": 0}, "step"),
    ({"epoch": -1, "step": 0}, "epoch"),
    ({"epoch": 0, "step": 1.5}, "step"),
    ({"epoch": 0, "step": 10_000}, "outside epoch 0"),
    ("epoch 0", "must be a dict"),
])
def test_bad_states(tree, state, match):
    root, _ = tree
    with pytest.raises(StateError, match=match):
        DatagoDataset(cfg(root)).load_state_dict(state)


def test_default_threads_share_the_node_among_local_ranks(monkeypatch):
    from datago import dataset
    monkeypatch.setattr(dataset, "available_cpus", lambda: 16)
    monkeypatch.setattr(dataset.os, "cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    assert dataset.default_num_threads(2) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")                  # 4 ranks on this node
    assert dataset.default_num_threads(2) == 2 and dataset.default_num_threads(0) == 4
    # a launcher that already pinned this rank to 4 of the 16 cores: not divided again
    monkeypatch.setattr(dataset, "available_cpus", lambda: 4)
    assert dataset.default_num_threads(1) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")                 # more ranks than cores
    monkeypatch.setattr(dataset, "available_cpus", lambda: 16)
    assert dataset.default_num_threads(1) == 1


def test_slurm_environment_gives_the_rank(tree, monkeypatch):
    root, _ = tree
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "3")
    ds = DatagoDataset(cfg(root))
    expect = ranked(root, 2, 3)
    assert run(ds) == run(expect)
    assert ds.state_for(0)["world_size"] == 3
