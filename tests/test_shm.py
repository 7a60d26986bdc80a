"""Recycled shared-memory batch buffers (datago._shm): a segment is reused only when
nothing in the worker and nothing in the receiving process uses it any more."""

import gc
import multiprocessing as mp

import pytest
import torch
from torch.utils.data import DataLoader

from datago import DatagoDataset, _shm
from test_dataset import config, make_tree


@pytest.fixture
def pool(monkeypatch):
    p = _shm.Pool(limit=4)
    monkeypatch.setattr(_shm, "_POOL", p)
    _shm._install_reducer()
    return p


def test_size_classes():
    for n in [1, 4096, 4097, 5000, 123_456, 25_165_824, 100_000_000, 2**40 + 1]:
        c = _shm._size_class(n)
        assert n <= c <= max(4096, n * 1.125)
        assert _shm._size_class(c) == c


def test_reused_only_when_no_view_is_left(pool):
    a, how = pool.take((4, 8, 8, 3), zero=False)
    assert how == "created"
    a.fill_(7)
    view = a[1:3].permute(0, 3, 1, 2)
    del a
    b, how = pool.take((4, 8, 8, 3), zero=False)
    assert how == "created"                      # the view still holds the first one
    del view, b
    gc.collect()
    c, how = pool.take((4, 8, 8, 3), zero=True)
    assert how == "reused" and int(c.sum()) == 0


def test_a_segment_sent_away_waits_for_the_receiver(pool):
    a, _ = pool.take((2, 16, 16, 3), zero=False)
    seg = pool.lookup(a)
    assert pool.flags[seg.index] == _shm.WORKER
    fn, args = _shm._reduce(a)                   # what ForkingPickler does when it sends a
    assert pool.flags[seg.index] == _shm.SENT
    del a
    gc.collect()
    assert pool.take((2, 16, 16, 3), zero=False)[1] == "created"     # not back yet
    assert fn is _shm._rebuild
    # the receiving side maps the segment anew (here: a stand-in storage, since in
    # one process torch hands back the sender's own storage)
    received = _shm._rebuild(lambda: torch.zeros(2, 16, 16, 3), (), *args[2:])
    view = received[0].permute(2, 0, 1)
    del received
    gc.collect()
    assert pool.flags[seg.index] == _shm.SENT    # a view of it is still alive there
    del view
    gc.collect()
    assert pool.flags[seg.index] == _shm.FREE
    assert pool.take((2, 16, 16, 3), zero=False)[1] == "reused"


def test_misfits_make_room_and_the_limit_holds(pool):
    held = [pool.take((1024, 1024), zero=False)[0] for _ in range(4)]
    t, how = pool.take((1024, 1024), zero=False)
    assert how == "unpooled" and pool.lookup(t) is None
    del held[0]
    gc.collect()
    small, how = pool.take((64, 64), zero=False)  # the free 1 MiB one is too big: replaced
    assert how == "created"
    assert sum(s is not None for s in pool._slots) == 4
    assert sorted(s.size for s in pool._slots) == [4096] + [1 << 20] * 3


def test_tensors_not_from_the_pool_keep_torchs_reduction(pool):
    fn, _ = _shm._reduce(torch.zeros(3))
    assert fn is not _shm._rebuild


def _sender(q, done):
    p = _shm.pool()
    for i in range(6):
        t, how = _shm.alloc((4, 1000), zero=False)
        t.fill_(i)
        q.put((i, how, t))
        del t
        done.wait(30)
        done.clear()
    q.put(None)


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_across_processes(ctx):
    """A child process sends pooled tensors through a torch queue: a segment comes
    back once the parent drops it, never while the parent holds it."""
    mpc = torch.multiprocessing.get_context(ctx)
    q, done = mpc.Queue(), mpc.Event()
    proc = mpc.Process(target=_sender, args=(q, done))
    proc.start()
    try:
        got, kept = [], None
        while (item := q.get(timeout=60)) is not None:
            i, how, t = item
            assert int(t.min()) == int(t.max()) == i
            got.append(how)
            if i == 1:
                kept = t                     # held: its segment must not be reused
            del t, item
            gc.collect()
            done.set()
        # 1 reuses 0's segment; 1 is kept, so 2 needs a new one, which 3-5 reuse
        assert got == ["created", "reused", "created", "reused", "reused", "reused"]
        assert int(kept.min()) == int(kept.max()) == 1
    finally:
        proc.join(30)
    assert proc.exitcode == 0


def test_dataloader_batches_stay_intact(tmp_path):
    """Through a DataLoader: batches kept whole, kept as a view, or dropped at once
    all hold exactly what the in-process iteration yields; dropped ones are reused."""
    make_tree(tmp_path, n=40)
    cfg = config(tmp_path, batch_size=4, prefetch_batches=1)
    expect = {tuple(b["id"]): b["image"].clone() for b in DatagoDataset(cfg)}
    ds = DatagoDataset(cfg)
    views, copies = [], []
    for k, b in enumerate(DataLoader(ds, batch_size=None, num_workers=2)):
        key = tuple(b["id"])
        if k % 3 == 0:
            views.append((key, b["image"][1:]))          # only a view of it stays alive
        else:
            copies.append((key, b["image"].clone()))
        del b
    assert len(views) + len(copies) == len(expect)
    for key, v in views:
        assert torch.equal(v, expect[key][1:])
    for key, c in copies:
        assert torch.equal(c, expect[key])
    sb = ds.stats()["shared_buffers"]
    assert sb["reused"] > 0 and sb["unpooled"] == 0
    assert sb["reused"] + sb["created"] == len(expect)


def test_the_byte_bound_holds(pool):
    pool.max_bytes = 3 << 20
    held = [pool.take((1 << 20,), zero=False) for _ in range(4)]
    assert [h for _, h in held] == ["created"] * 3 + ["unpooled"]
    assert sum(s.size for s in pool._slots if s is not None) == 3 << 20
    del held
    gc.collect()
    assert pool.take((1 << 20,), zero=False)[1] == "reused"
    pool.max_bytes = 0                                  # off: nothing new is kept
    assert pool.take((2 << 20,), zero=False)[1] == "unpooled"
