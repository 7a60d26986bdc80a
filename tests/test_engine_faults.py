"""Faults around the engine (issue 12): a DataLoader worker killed mid-epoch, /dev/shm
too small for a batch, Ctrl-C with workers and threads, a sidecar JSON nested
10,000 deep, a file that disappears between listing and reading.  Each gives a
clear error or is counted, never a hang or a silent end of the epoch."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader as TorchDataLoader

import datago
from datago import DatagoDataset, _engine, _shm
from datago.dataset import DataLoader, WorkerError
from conftest import encode
from test_dataset import config, ids_of, make_tree, planned

TORCH_SHM_FULL = ("unable to allocate shared memory(shm) for file </torch_1_2_3>: "
                  "No space left on device (28)")          # torch 2.x, /dev/shm full


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return root, make_tree(root, n=40, seed=5)


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


# ----------------------------------------------------------------------------- killed worker

@pytest.mark.parametrize("where", ["next", "loop_body"])
def test_killed_worker_names_the_worker_and_its_progress(tree, where):
    """SIGKILL one of two workers mid-epoch: torch's error, plus which worker it was
    and how far it (and the trainer) got -- whether the main thread is waiting in
    next() or busy in the loop body when torch notices (its SIGCHLD handler)."""
    root, _ = tree
    ds = DatagoDataset(config(root, batch_size=2, num_threads=1))
    loader = DataLoader(ds, num_workers=2)
    it = iter(loader)
    steps = [int(next(it)["step"]) for _ in range(3)]
    assert steps == [0, 1, 2]
    victim = it._workers[1].pid
    with pytest.raises(WorkerError) as ei:
        os.kill(victim, signal.SIGKILL)
        if where == "loop_body":
            t0 = time.monotonic()
            while time.monotonic() - t0 < 10:       # "training": torch's handler fires here
                time.sleep(0.01)
        for _ in it:
            pass
    msg = str(ei.value)
    assert isinstance(ei.value, RuntimeError)
    assert f"DataLoader worker (pid {victim}) is killed by signal: Killed" in msg \
        or f"pid(s) {victim}" in msg                                         # torch's words
    assert f"worker 1 of 2 (pid {victim}), epoch 0: it had yielded" in msg
    assert "and was working on step" in msg and f"of steps 0..{len(ds) - 1}" in msg
    assert "the trainer had received" in msg and "out-of-memory killer" in msg
    # worker 1 takes steps 1, 3, 5, ...: it had yielded at least step 1
    done = int(msg.split("it had yielded ")[1].split()[0])
    last = int(msg.split("the last one step ")[1].split(",")[0])
    assert done >= 1 and last == 2 * done - 1
    assert f"was working on step {last + 2} of" in msg
    del it, ei                  # the traceback holds the iterator: shut its workers down now
    gc.collect()
    # the loader is usable again: a fresh epoch with fresh workers
    assert len(list(loader)) == len(ds)


def test_worker_killed_while_its_batch_is_received(tree):
    """The trainer's receive breaks (ConnectionResetError from torch's fd-passing)
    before torch sees the worker dead: still a WorkerError naming it."""
    from datago.dataset import _WatchedIterator

    class Proc:
        def __init__(self, pid, exitcode):
            self.pid, self.exitcode = pid, exitcode

    class Broken:
        _workers = [Proc(1 << 23, None), Proc((1 << 23) + 1, -signal.SIGKILL)]   # > pid_max

        def __next__(self):
            raise ConnectionResetError(104, "Connection reset by peer")

    root, _ = tree
    ds = DatagoDataset(config(root, batch_size=2))
    ds._workers[1, :] = torch.tensor([(1 << 23) + 1, 0, 2, 3, 5])
    it = _WatchedIterator(Broken(), type("L", (), {"dataset": ds})())
    with pytest.raises(WorkerError, match=r"DataLoader worker \(pid 8388609\) is killed by "
                                          r"signal: Killed\. datago: it was worker 1 of 2 "
                                          r"\(pid 8388609\), "
                                          r"epoch 0: it had yielded 2 batch\(es\), the last one "
                                          r"step 3, and was working on step 5") as ei:
        next(it)
    assert isinstance(ei.value.__cause__, ConnectionResetError)
    Broken._workers[1].exitcode = None                  # no dead worker: the error as it was
    it.dead_wait = 0.1
    with pytest.raises(ConnectionResetError):
        next(it)


def test_dataloader_helper_is_torch_dataloader(tree):
    """Nothing else changes: batches, persistent workers, len()."""
    root, _ = tree
    ds = DatagoDataset(config(root, batch_size=4))
    want = planned(ds)
    loader = DataLoader(ds, num_workers=2, persistent_workers=True)
    assert isinstance(loader, TorchDataLoader) and len(loader) == len(ds)
    for _ in range(2):
        got = [(int(b["step"]), tuple(b["bucket"]), b["id"]) for b in loader]
        assert got == want
    assert [b["id"] for b in DataLoader(ds)] == [ids for _, _, ids in want]   # no workers


# ----------------------------------------------------------------------------- /dev/shm full

def _fail_shm(monkeypatch):
    real = torch.UntypedStorage._new_shared

    def new_shared(size, *a, **kw):
        if size >= 100_000:                      # batches fail, small bookkeeping works
            raise RuntimeError(TORCH_SHM_FULL)
        return real(size, *a, **kw)
    monkeypatch.setattr(torch.UntypedStorage, "_new_shared", new_shared)


def test_shm_full_names_the_size_and_the_fix(monkeypatch):
    _fail_shm(monkeypatch)
    monkeypatch.setattr(_shm, "_POOL", None)
    for max_bytes in (None, 0):                  # a pooled segment, an unpooled one
        with pytest.raises(_shm.SharedMemoryError) as ei:
            _shm.alloc((8, 128, 96, 3), max_bytes=max_bytes)
        msg = str(ei.value)
        assert isinstance(ei.value, RuntimeError) and isinstance(ei.value, datago.DatagoError)
        assert "shape (8, 128, 96, 3)" in msg and "MiB) of shared memory" in msg
        assert "--shm-size=" in msg and "smaller batch_size" in msg and "num_workers=0" in msg
        assert "/dev/shm has" in msg and "No space left on device" in msg
        assert ei.value.__cause__ is not None


def test_shm_other_errors_pass_through(monkeypatch):
    def boom(size, *a, **kw):
        raise RuntimeError("something else")
    monkeypatch.setattr(torch.UntypedStorage, "_new_shared", boom)
    monkeypatch.setattr(_shm, "_POOL", None)
    with pytest.raises(RuntimeError, match="^something else$"):
        _shm.alloc((4, 64, 64, 3), max_bytes=0)


def test_shm_full_in_a_worker_reaches_the_trainer(tree, monkeypatch):
    """The worker's batch allocation fails (forked workers inherit the patch): the
    trainer gets the SharedMemoryError, with the size and the fix."""
    if torch.multiprocessing.get_start_method(allow_none=True) not in (None, "fork"):
        pytest.skip("needs forked workers")
    root, _ = tree
    _fail_shm(monkeypatch)
    ds = DatagoDataset(config(root, batch_size=8))
    with pytest.raises(_shm.SharedMemoryError) as ei:
        list(DataLoader(ds, num_workers=1))
    msg = str(ei.value)
    assert "DataLoader worker 0 of 1 could not allocate it" in msg
    assert "bytes" in msg and "--shm-size=" in msg and "num_workers=0" in msg


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /dev/shm"],
                       capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /dev/shm")
def test_shm_really_too_small(tree, tmp_path):
    """A real 512 KiB /dev/shm (a private mount namespace, where permitted): the
    error names the batch's size and the fix."""
    if not _can_unshare():
        pytest.skip("unshare -m / mount not permitted here")
    root, _ = tree
    script = tmp_path / "shm.py"
    script.write_text(textwrap.dedent(f"""
        from datago import DatagoDataset
        from datago.dataset import DataLoader
        cfg = {{"source_config": {{"root_path": {str(root)!r}}},
               "image_config": {{"crop_and_resize": True, "default_image_size": 128,
                                 "downsampling_ratio": 16}},
               "batch_size": 16}}
        for b in DataLoader(DatagoDataset(cfg), num_workers=1):
            pass
    """))
    r = subprocess.run(["unshare", "-m", "sh", "-c",
                        f"mount -t tmpfs -o size=512k tmpfs /dev/shm && "
                        f"exec {sys.executable} {script}"],
                       capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    assert r.returncode != 0
    assert "SharedMemoryError" in r.stderr, r.stderr[-3000:]
    assert "of shared memory" in r.stderr and "--shm-size=" in r.stderr
    assert "/dev/shm has" in r.stderr and "of 0 MiB" in r.stderr   # 512 KiB in all


# ----------------------------------------------------------------------------- Ctrl-C

CTRL_C = """
import signal, sys
# a shell's background job (``cmd &``, nohup) starts with SIGINT ignored, and so
# would this script: Ctrl-C is what is tested, so take Python's handler back
signal.signal(signal.SIGINT, signal.default_int_handler)
from torch.utils.data import DataLoader
from datago import DatagoDataset
root, workers = sys.argv[1], int(sys.argv[2])
cfg = {"source_config": {"root_path": root},
       "image_config": {"crop_and_resize": True, "default_image_size": 128,
                        "downsampling_ratio": 16},
       "batch_size": 2, "num_threads": 2}
ds = DatagoDataset(cfg)
loader = DataLoader(ds, batch_size=None, num_workers=workers,
                    persistent_workers=workers > 0)
for epoch in range(100000):
    ds.set_epoch(epoch)
    it = iter(loader)
    for i, b in enumerate(it):
        if epoch == 0 and i == 0:
            pids = [w.pid for w in getattr(it, "_workers", [])]
            print("READY", *pids, flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or sys.platform == "win32", reason="POSIX")
@pytest.mark.parametrize("workers", [2, 0])
@pytest.mark.parametrize("target", ["process", "group"])
def test_ctrl_c_exits_quickly_without_orphans(tree, tmp_path, workers, target):
    """SIGINT to the trainer (``process``) or to its whole process group, as a
    terminal's Ctrl-C does (``group``), in the middle of an epoch with worker
    processes and decode threads busy: out within a few seconds, no process left."""
    root, _ = tree
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as errf:
        p = subprocess.Popen([sys.executable, "-X", "faulthandler", str(script), str(root),
                              str(workers)], stdout=subprocess.PIPE, stderr=errf, text=True,
                             start_new_session=True)
    try:
        line = p.stdout.readline()
        assert line.startswith("READY"), log.read_text()[-3000:]
        pids = [int(x) for x in line.split()[1:]]
        assert len(pids) == workers
        time.sleep(0.5)                                   # mid-epoch, threads busy
        t0 = time.monotonic()
        sigint = (lambda: os.killpg(p.pid, signal.SIGINT)) if target == "group" else \
            (lambda: os.kill(p.pid, signal.SIGINT))
        sigint()
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            err = log.read_text()
            if "Exception ignored" in err and "KeyboardInterrupt" in err:
                # CPython drops an exception raised inside a finalizer or __del__: a
                # Ctrl-C landing in one (a batch's storage being freed) is lost, as
                # in any Python program; the second one must work
                t0 = time.monotonic()
                sigint()
                p.wait(timeout=15)
            else:
                os.kill(p.pid, signal.SIGABRT)            # faulthandler: every thread's stack
                p.wait(timeout=10)
                alive = [pid for pid in pids if _alive(pid)]
                pytest.fail(f"still running 15 s after SIGINT (workers alive: {alive}); "
                            f"its stacks:\n{log.read_text()[-6000:]}")
        took = time.monotonic() - t0
        err = log.read_text()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert "KeyboardInterrupt" in err, err[-3000:]
    assert p.returncode != 0
    assert took < 30.0, f"took {took:.1f} s to exit after SIGINT"     # exits: no hang
    deadline = time.monotonic() + 2.0
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if _alive(pid)], "orphaned DataLoader workers"


# ----------------------------------------------------------------------------- deep JSON

def _deep_json(depth: int, kind: str) -> str:
    if kind == "array":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


@pytest.fixture
def deep_tree(tmp_path):
    ids = make_tree(tmp_path, n=10, seed=7)
    good = (tmp_path / ids[0]).read_bytes()
    (tmp_path / "deep_a.jpg").write_bytes(good)
    (tmp_path / "deep_a.json").write_text(_deep_json(10_000, "array"))     # RecursionError
    (tmp_path / "deep_o.jpg").write_bytes(good)
    (tmp_path / "deep_o.json").write_text(_deep_json(10_000, "object"))
    (tmp_path / "deep_p.jpg").write_bytes(good)
    (tmp_path / "deep_p.json").write_text(_deep_json(600, "array"))   # parses; cannot be pickled
    (tmp_path / "fine.jpg").write_bytes(good)
    (tmp_path / "fine.json").write_text('{"caption": "ok", "boxes": ' + _deep_json(50, "array")
                                        + "}")
    return tmp_path, ids


DEEP = {"deep_a.jpg", "deep_o.jpg", "deep_p.jpg"}


@pytest.mark.parametrize("mode", ["plan", "stream", "workers"])
def test_deep_sidecar_json_is_bad_attributes(deep_tree, mode):
    root, ids = deep_tree
    source = {"scan_sizes": False} if mode == "stream" else None
    ds = DatagoDataset(config(root, source, batch_size=3))
    it = DataLoader(ds, num_workers=2, timeout=60) if mode == "workers" else ds
    with pytest.warns(RuntimeWarning, match="bad_attributes") if mode != "workers" else \
            _no_check():
        got = list(it)
    flat = ids_of(got)
    assert set(flat) == set(ids) | {"fine.jpg"}                 # the epoch went on
    st = ds.stats()
    if mode == "plan":
        slots = sum(1 for _, _, b in planned(ds) for i in b if i in DEEP)
        assert st["skipped"] == {"bad_attributes": slots} and slots >= 3
    else:
        assert st["skipped"] == {"bad_attributes": 3}
    fine = [a for b in got for i, a in zip(b["id"], b["attributes"]) if i == "fine.jpg"]
    assert fine and fine[0]["caption"] == "ok"


class _no_check:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_merge_attributes_depth_guard():
    from datago.sources.base import SampleRef
    r = SampleRef("x.jpg", "x.jpg")
    for depth, ok in ((_engine.MAX_JSON_DEPTH, True), (_engine.MAX_JSON_DEPTH + 1, False),
                      (10_000, False)):
        for kind in ("array", "object"):
            raw = _deep_json(depth, kind).encode()
            if ok:
                assert _engine.merge_attributes(r, [("n", raw, "x.n.json")])["n"] is not None
            else:
                with pytest.raises(_engine.SampleError) as ei:
                    _engine.merge_attributes(r, [("n", raw, "x.n.json")])
                assert ei.value.reason == "bad_attributes"
    # many brackets side by side are not deep
    wide = ("[" + ",".join(["[1]"] * 5000) + "]").encode()
    assert len(_engine.merge_attributes(r, [("n", wide, "x.n.json")])["n"]) == 5000


# ----------------------------------------------------------------------------- file gone

def test_file_gone_mid_epoch_with_workers(tmp_path):
    """Files removed after the listing -- one before the epoch, one image and
    another sample's mask while the workers are already reading: each counted as
    read_error, the epoch goes on to its last step."""
    ids = make_tree(tmp_path, n=30, seed=11)
    ds0 = DatagoDataset(config(tmp_path, batch_size=2))
    first = {}
    for s, _, b in planned(ds0):
        for i in b:
            first.setdefault(i, s)
    n_steps = len(planned(ds0))
    late = sorted((i for i in ids if first[i] >= n_steps - 4), key=lambda i: first[i])
    gone_late, masked = late[0], late[1]
    mask = tmp_path / f"{masked.rsplit('.', 1)[0]}.mask.png"
    info = datago.read_header((tmp_path / masked).read_bytes())
    mask.write_bytes(encode(np.zeros((info.height, info.width), np.uint8), "PNG"))
    ds = DatagoDataset(config(tmp_path, batch_size=2, num_threads=1, prefetch_batches=1))
    plan = planned(ds)
    assert len(plan) == n_steps
    uses = Counter(i for _, _, b in plan for i in b)
    early = ids[0]
    (tmp_path / early).unlink()                       # gone before the epoch starts
    got = []
    for b in DataLoader(ds, num_workers=2, prefetch_factor=1):
        got.append(b)
        if len(got) == 2:                             # gone while the workers read
            (tmp_path / gone_late).unlink()
            mask.unlink()
    assert [int(b["step"]) for b in got] == list(range(len(plan)))
    assert set(ids_of(got)) == set(ids) - {early, gone_late, masked}
    st = ds.stats()
    assert st["skipped"] == {"read_error": uses[early] + uses[gone_late] + uses[masked]}


def test_deep_attributes_from_a_source_are_bad_attributes(tmp_path):
    """Attributes a source gives itself (an index's JSON column, an API's rows) are
    held to the same depth limit as sidecars: counted, never an epoch-ending error."""
    import json
    from conftest import encode, photo
    from datago import DatagoDataset
    deep = "x"
    for _ in range(600):
        deep = [deep]
    rows = []
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(encode(photo(32, 32, seed=i), "JPEG"))
        rows.append({"url": f"{i}.jpg", "meta": deep if i == 1 else "ok"})
    index = tmp_path / "index.jsonl"
    index.write_text("\n".join(json.dumps(r) for r in rows))
    ds = DatagoDataset({"source_type": "index", "source_config": {"index": str(index)},
                        "image_config": {"crop_and_resize": True, "default_image_size": 32}})
    with pytest.warns(RuntimeWarning, match="bad_attributes"):
        got = [s["id"] for s in ds]
    assert sorted(got) == ["0.jpg", "2.jpg"]
    assert ds.stats()["skipped"] == {"bad_attributes": 1}
