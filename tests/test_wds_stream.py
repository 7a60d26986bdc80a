"""WebDataset shards read as streams (``streaming: true``): whole shards per
(rank, worker) balanced by size, the hash-filter fallback, ``steps_per_epoch``,
and broken streams resumed by Range."""

from __future__ import annotations

import io
import tarfile
import warnings

import numpy as np
import pytest
from torch.utils.data import DataLoader

from datago import DatagoDataset, DatagoError
from datago.fetch import FetchConfig, FetchError, Fetcher
from datago.sharding import ShardInfo
from datago.sources.webdataset import assign_shards, iter_shard
from servers import FaultServer, Nginx
from test_webdataset import by_key, make_folder, make_shards, wds_cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("wds_stream")
    samples = make_folder(base / "folder", n=40)
    pattern = make_shards(base / "shards", samples, n_shards=8)
    return base, samples, pattern


def stream_cfg(url, **kw):
    src = {"streaming": True}
    src.update(kw.pop("source", {}))
    return wds_cfg(url, source=src, **kw)


def fixed(rank, world, worker=0, workers=1):
    return lambda: ShardInfo(rank, world, worker, workers)


# ----------------------------------------------------------------------------- assignment

@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("workers", range(0, 4))
def test_assignment_is_disjoint_complete_and_balanced(world, workers):
    rng = np.random.default_rng(world * 10 + workers)
    n = 40
    sizes = rng.integers(1, 1000, n).tolist()
    slots = world * max(1, workers)
    order = rng.permutation(n).tolist()
    out = assign_shards(sizes, slots, order)
    flat = [s for x in out for s in x]
    assert sorted(flat) == list(range(n))                  # each shard exactly once
    assert all(out) and len(out) == slots                   # every reader gets one
    loads = [sum(sizes[s] for s in x) for x in out]
    assert max(loads) - min(loads) <= max(sizes)            # greedy bound
    for x in out:                                           # each reader's shards in `order`
        assert x == sorted(x, key=order.index)


def test_every_reader_gets_its_own_shards(data):
    base, samples, pattern = data
    for world, workers in [(1, 1), (2, 2), (3, 1), (4, 2)]:
        seen = []
        for r in range(world):
            for w in range(workers):
                ds = DatagoDataset(stream_cfg(pattern), detector=fixed(r, world, w, workers))
                shards, filtered = ds.shard_assignment(ShardInfo(r, world, w, workers))
                assert not filtered
                seen += shards
        assert sorted(seen) == list(range(8))


# ----------------------------------------------------------------------------- samples

def test_one_rank_streams_what_the_folder_source_gives(data):
    base, samples, pattern = data
    folder = {"source_config": {"root_path": str(base / "folder"), "scan_sizes": False},
              "image_config": wds_cfg("x")["image_config"], "batch_size": 3, "seed": 2}
    want = by_key(DatagoDataset(folder), strip_ext=True)
    ds = DatagoDataset(stream_cfg(pattern))
    assert ds.mode == "shards" and ds.listing.built == 0
    got = by_key(ds)
    assert set(got) == {k for k, _ in samples} == set(want)
    for key in got:
        assert got[key][1:] == want[key][1:], key           # pixels, crop, attributes, masks
    assert ds.stats()["streaming"]["shards_failed"] == 0


def test_ranks_and_workers_split_the_samples_exactly(data):
    base, samples, pattern = data
    ids = []
    for r in range(2):
        ds = DatagoDataset(stream_cfg(pattern, source={"rank": r, "world_size": 2},
                                      steps_per_epoch=None, drop_last=False))
        ds._stream_steps = lambda info: None               # one pass: every sample once
        for b in DataLoader(ds, batch_size=None, num_workers=2):
            ids += b["id"]
    assert sorted(ids) == sorted(k for k, _ in samples)


def test_fewer_shards_than_readers_filters_by_hash_and_warns(data, tmp_path):
    base, samples, _ = data
    one = make_shards(tmp_path / "s", samples, n_shards=2)
    ids = []
    for r in range(3):
        ds = DatagoDataset(stream_cfg(one), detector=fixed(r, 3))
        ds._stream_steps = lambda info: None
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            ids += [i for b in ds for i in b["id"]]
        msg = " ".join(str(x.message) for x in w)
        if r == 0:
            assert "2 shards for 3 rank(s) x 1 worker(s): every worker streams every shard" in msg
    assert sorted(ids) == sorted(k for k, _ in samples)


@pytest.mark.parametrize("steps", [2, 9])
def test_steps_per_epoch_is_exact_on_every_rank(data, steps):
    """Each rank yields exactly steps_per_epoch batches, numbered 0..steps-1, reading
    its shards again (reshuffled) when they run out first."""
    _, samples, pattern = data
    for r in range(4):
        ds = DatagoDataset(stream_cfg(pattern, steps_per_epoch=steps, batch_size=4,
                                      source={"random_sampling": True, "rank": r,
                                              "world_size": 4}))
        assert len(ds) == steps
        got = list(DataLoader(ds, batch_size=None, num_workers=2))
        assert [int(b["step"]) for b in got] == list(range(steps))
        assert all(len(b["id"]) == 4 for b in got)
        mine = {i for b in got for i in b["id"]}
        shards = [s for w in range(2) for s in ds.shard_assignment(ShardInfo(r, 4, w, 2))[0]]
        of_rank = {k for s in shards for k, _ in samples[s::8]}
        assert len(of_rank) == 10
        # 10 samples per rank (in several buckets, so even 2 steps may need a second
        # pass to fill a bucket); 9 steps of 4 read all of them, some again
        assert mine <= of_rank and (steps == 2 or mine == of_rank)


def test_steps_default_to_samples_over_ranks_with_an_index_pass(data, tmp_path):
    base, samples, pattern = data
    ds = DatagoDataset(stream_cfg(pattern, batch_size=4,
                                  source={"cache_dir": str(tmp_path / "c")}),
                       detector=fixed(1, 2))
    assert len(ds) == 40 // (2 * 4)
    assert ds.listing.built == 8                      # the counting pass built the indexes
    assert len(list(ds)) == 5


def test_a_source_without_samples_for_a_rank_raises_instead_of_spinning(tmp_path):
    samples = make_folder(tmp_path / "f", n=2)
    pattern = make_shards(tmp_path / "s", samples, n_shards=1)
    ds = DatagoDataset(stream_cfg(pattern, steps_per_epoch=3, batch_size=1),
                       detector=fixed(0, 1))
    got = list(ds)                                    # 2 samples, 3 steps: a second pass
    assert len(got) == 3
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w") as tar:
        info = tarfile.TarInfo("readme.md")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    ds = DatagoDataset(stream_cfg(str(empty), steps_per_epoch=3, batch_size=1))
    with pytest.raises(DatagoError, match="a whole pass over its samples gave none"):
        list(ds)
    assert ds.stats()["streaming"]["no_image"] >= 1


# ----------------------------------------------------------------------------- faults

def test_broken_streams_resume_by_range(data):
    base, samples, _ = data
    with FaultServer(base / "shards") as srv:
        url = f"{srv.url}/shard-{{000..007}}.tar"
        ds = DatagoDataset(stream_cfg(url, source={"timeout_s": 1.0}))   # probes sizes
        for s, kind in [(1, "reset"), (2, "truncate"), (3, "stall_body"), (4, "503")]:
            srv.add_fault(f"/shard-{s:03d}.tar", kind, times=1, fraction=0.6, stall_s=3)
        ids = [i for b in ds for i in b["id"]]
        assert sorted(ids) == sorted(k for k, _ in samples)        # all, exactly once
        assert ds.stats()["streaming"]["shards_failed"] == 0
        # (the one-byte ranges are the size probes of the assignment)
        ranged = [r for r in srv.log if r.range and r.range != "bytes=0-0" and r.path in
                  ("/shard-001.tar", "/shard-002.tar", "/shard-003.tar")]
        assert {r.path for r in ranged} == {"/shard-001.tar", "/shard-002.tar", "/shard-003.tar"}
        assert all(r.range.startswith("bytes=") and r.range.endswith("-") and
                   int(r.range[6:-1]) > 0 for r in ranged)
        assert not [f for f in srv.pending_faults() if f.remaining]


def test_a_stopped_stream_opens_no_further_shard(data):
    """A pass stopped by its consumer while its reader waits inside a shard: the
    reader ends once that read fails; it opens no further shard, and that
    shard's failure is not counted or reported for the stopped pass."""
    import threading
    base, _, _ = data
    with FaultServer(base / "shards") as srv:
        url = f"{srv.url}/shard-{{000..007}}.tar"
        ds = DatagoDataset(stream_cfg(url, batch_size=None, samples_buffer_size=2,
                                      source={"timeout_s": 1.0, "retries": 0}))
        for s in range(8):                            # each sends 60%, then stalls
            srv.add_fault(f"/shard-{s:03d}.tar", "stall_body", times=None, fraction=0.6,
                          stall_s=3)
        before = {t.ident for t in threading.enumerate()}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            it = iter(ds)
            next(it)                                  # the reader now waits in a stall
            readers = [t for t in threading.enumerate()
                       if t.ident not in before and t.name == "datago-stream"]
            it.close()
            for t in readers:
                t.join(15)
            assert readers and not any(t.is_alive() for t in readers)
        gets = [r.path for r in srv.log if r.range != "bytes=0-0"]
        assert len(gets) == 1, gets                   # no further shard was opened
        assert ds.stats()["streaming"]["shards_failed"] == 0
        assert not [w for w in caught if "failed" in str(w.message)]


def test_per_sample_streaming_yields_before_the_next_network_read(data):
    """Read sample by sample, a ready sample is yielded without first filling the
    buffer of refs (``samples_buffer_size``, 64): a stream that stalls after its
    first samples still gives them at once (the bound, 8 s, is a hang guard: the
    stall lasts 10 s, and the samples decode in milliseconds)."""
    from conftest import bounded
    base, samples, _ = data
    with FaultServer(base / "shards") as srv:
        url = f"{srv.url}/shard-{{000..007}}.tar"
        ds = DatagoDataset(stream_cfg(url, batch_size=None, source={"timeout_s": 30.0}))
        for s in range(8):                            # each sends 60%, then stalls
            srv.add_fault(f"/shard-{s:03d}.tar", "stall_body", times=None, fraction=0.6,
                          stall_s=10)
        it = iter(ds)
        first = bounded(lambda: next(it), 8.0, "the first sample of a stalled stream")
        assert first["id"] in {k for k, _ in samples}
        it.close()


def test_batched_streaming_yields_a_closed_batch_before_the_next_network_read(data):
    """The same in batches: a batch that is complete is yielded while the stream
    stalls, not held until the next ref arrives (batch_size 1: every sample closes
    its batch; before, the engine first topped up its buffer of refs)."""
    from conftest import bounded
    base, samples, _ = data
    with FaultServer(base / "shards") as srv:
        url = f"{srv.url}/shard-{{000..007}}.tar"
        ds = DatagoDataset(stream_cfg(url, batch_size=1, source={"timeout_s": 30.0}))
        for s in range(8):                            # each sends 60%, then stalls
            srv.add_fault(f"/shard-{s:03d}.tar", "stall_body", times=None, fraction=0.6,
                          stall_s=10)
        it = iter(ds)
        first = bounded(lambda: next(it), 8.0, "the first batch of a stalled stream")
        assert first["id"][0] in {k for k, _ in samples}
        it.close()


def test_stream_equals_the_file_after_resumes(data):
    base, _, _ = data
    path = base / "shards" / "shard-005.tar"
    with FaultServer(base / "shards") as srv:
        srv.add_fault("/shard-005.tar", "reset", times=3, fraction=0.3)
        f = Fetcher(FetchConfig(backoff_s=0.01))
        assert b"".join(f.stream(f"{srv.url}/shard-005.tar", chunk_size=4096)) == path.read_bytes()
        assert f.retried.get("resumed", 0) >= 2
        assert f.size(f"{srv.url}/shard-005.tar") == path.stat().st_size


def test_a_dead_shard_is_counted_or_raised(data):
    base, samples, _ = data
    with FaultServer(base / "shards") as srv:
        url = f"{srv.url}/shard-{{000..007}}.tar"
        srv.add_fault("/shard-006.tar", "404", times=None)
        ds = DatagoDataset(stream_cfg(url))           # its size probe fails too: the median
        with pytest.warns(RuntimeWarning, match=r"shard 6 failed.*HTTP 404"):
            ids = [i for b in ds for i in b["id"]]
        assert sorted(ids) == sorted(k for j, (k, _) in enumerate(samples) if j % 8 != 6)
        assert ds.stats()["streaming"]["shards_failed"] == 1
        with pytest.raises(FetchError, match="HTTP 404"):
            list(DatagoDataset(stream_cfg(url, on_error="raise")))


def test_the_retries_key_holds_for_streamed_shards(data):
    """``source_config.retries`` of a WebDataset: a shard failing twice is read with
    two retries, lost (counted) with one; ``fetch_retries=`` overrides the key."""
    base, samples, _ = data
    with FaultServer(base / "shards") as srv:
        url = f"{srv.url}/shard-{{000..007}}.tar"
        every = sorted(k for k, _ in samples)
        for retries, fetch_retries, lost in [(1, None, True), (2, None, False),
                                             (0, 2, False), (5, 1, True)]:
            ds = DatagoDataset(stream_cfg(url, source={"retries": retries}),
                               fetch_retries=fetch_retries)       # (probes the sizes)
            assert ds.fetcher.config.retries == (retries if fetch_retries is None
                                                 else fetch_retries)
            srv.add_fault("/shard-003.tar", "503", times=2)
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                ids = sorted(i for b in ds for i in b["id"])
            if lost:
                assert ids == sorted(k for j, (k, _) in enumerate(samples) if j % 8 != 3)
                assert ds.stats()["streaming"]["shards_failed"] == 1
                assert any("shard 3 failed" in str(x.message) for x in w)
            else:
                assert ids == every and ds.stats()["streaming"]["shards_failed"] == 0
            srv.clear_faults()


def test_over_nginx(data):
    base, samples, _ = data
    with Nginx(base / "shards") as ng:
        ds = DatagoDataset(stream_cfg(f"{ng.url}/shard-{{000..007}}.tar"))
        assert sorted(i for b in ds for i in b["id"]) == sorted(k for k, _ in samples)


def test_iter_shard_groups_members_and_skips_huge_ones(tmp_path):
    """A streamed member is held in memory: one over ``max_object_bytes`` is
    skipped and counted."""
    p = tmp_path / "a.tar"
    with tarfile.open(p, "w") as tar:
        for name, payload in [("a/x.jpg", b"1"), ("a/x.json", b"{}"), ("b.y.jpg", b"2"),
                              ("big.jpg", b"3" * 100), (".hidden.jpg", b"4")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    counts = {}
    got = list(iter_shard(str(p), Fetcher(FetchConfig(max_object_bytes=50)), counts=counts))
    assert got == [("a/x", {"jpg": b"1", "json": b"{}"}), ("b", {"y.jpg": b"2"})]
    assert counts == {"too_large_members": 1, "ignored_members": 1}


def test_streamed_shards_go_to_the_disk_cache(data, tmp_path):
    """With cache_limit_bytes, a shard streamed to its end is kept; the next epoch
    reads it from disk (no request), and gives the same samples."""
    base, samples, _ = data
    with FaultServer(base / "shards") as srv:
        url = f"{srv.url}/shard-{{000..007}}.tar"
        cfg = stream_cfg(url, source={"cache_dir": str(tmp_path / "c"),
                                      "cache_limit_bytes": 50_000_000})
        ds = DatagoDataset(cfg)
        first = by_key(ds)
        gets = [r for r in srv.log if r.range is None]
        assert len(gets) == 8 and ds.stats()["cache"]["misses"] == 8
        ds.reset_stats()
        again = by_key(DatagoDataset(cfg))
        assert again == first and len(first) == len(samples)
        assert [r for r in srv.log if r.range is None] == gets     # nothing streamed again
        # what is cached is whole shards; a stream abandoned midway keeps nothing
        import glob
        shards = {p.read_bytes() for p in (base / "shards").glob("*.tar")}
        cached = glob.glob(str(tmp_path / "c" / "objects" / "*" / "*.bin"))
        assert len(cached) == 8 and all(open(c, "rb").read() in shards for c in cached)
        f = Fetcher(FetchConfig(cache_dir=str(tmp_path / "d"), cache_limit_bytes=50_000_000))
        stream = f.stream(f"{srv.url}/shard-000.tar", chunk_size=1024)
        next(stream)
        stream.close()
        assert not glob.glob(str(tmp_path / "d" / "objects" / "*" / "*"))


# ----------------------------------------------------------------------------- the tar reader

def _tar_bytes(members, fmt=tarfile.PAX_FORMAT, extra=()):
    """A tar (``fmt``) of ``[(name, payload)]``, plus ``extra`` TarInfos without data
    (directories, links) after the first member."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for i, (name, payload) in enumerate(members):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
            if i == 0:
                for e in extra:
                    tar.addfile(e)
    return buf.getvalue()


def _oracle(data):
    """``tarfile``'s own reading of the same bytes: [(name, offset_data, payload)]."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, m.offset_data, tar.extractfile(m).read()) for m in tar if m.isfile()]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_the_tar_reader_agrees_with_tarfile(tmp_path, fmt):
    """Long names (pax ``path`` records, GNU long-name members, the ustar prefix),
    non-ASCII names, empty members, members of exactly 512 bytes, directories and
    links in between: names, offsets and bytes as ``tarfile`` reads them, through
    ``iter_shard`` and ``build_index`` (and gzip-compressed too)."""
    from datago.sources.webdataset import build_index
    deep = "d" * 60 + "/" + "e" * 60 + "/"                         # > 100 chars with the name
    members = [(f"{deep}k1.jpg", b"A" * 700), (f"{deep}k1.json", b"{}"),
               ("k2.jpg", b"B" * 512), ("k2.txt", b""), ("k3.cls", b"7")]
    if fmt != tarfile.USTAR_FORMAT:
        members += [("x" * 120 + ".jpg", b"C" * 3), ("caf\u00e9/\u732b.jpg", b"D" * 1000)]
    d = tarfile.TarInfo("somedir")
    d.type = tarfile.DIRTYPE
    ln = tarfile.TarInfo("k1link.jpg")
    ln.type, ln.linkname = tarfile.SYMTYPE, "k2.jpg"
    data = _tar_bytes(members, fmt, extra=(d, ln))
    oracle = _oracle(data)
    assert [n for n, _, _ in oracle] == [n for n, _ in members]
    (tmp_path / "a.tar").write_bytes(data)
    import gzip
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress(data))
    for name in ("a.tar", "a.tar.gz"):
        got = list(iter_shard(str(tmp_path / name)))
        want = {}
        for n, _, payload in oracle:
            key, _, ext = n.rpartition("/")[2].partition(".")
            want.setdefault(n.rpartition("/")[0] + "/" * ("/" in n) + key, {})[ext] = payload
        assert dict(got) == want and len(got) == len(want)
    idx = build_index(str(tmp_path / "a.tar"))
    offsets = {(s["key"], ext): tuple(v) for s in idx["samples"] for ext, v in s["members"].items()}
    assert sorted(offsets.values()) == sorted((off, len(p)) for _, off, p in oracle)
    for (_, off, payload) in oracle:                            # the offsets read the bytes
        assert data[off:off + len(payload)] == payload


def test_a_damaged_tar_is_an_error_not_a_short_shard(tmp_path):
    """A header whose checksum fails after the first member, data cut short, and a
    tar without its end marker raise (``tarfile``'s stream mode would end quietly at
    the bad header, losing the rest of the shard uncounted)."""
    data = _tar_bytes([("a.jpg", b"1" * 600), ("b.jpg", b"2" * 600), ("c.jpg", b"3")])
    second = 512 + 1024                                   # header of b.jpg
    bad = bytearray(data)
    bad[second + 10] ^= 0x55                              # its name: checksum mismatch
    huge = tarfile.TarInfo("h")                            # a pax header claiming 1 TiB
    huge.type, huge.size = tarfile.XHDTYPE, 1 << 40
    cases = {"bad.tar": bytes(bad), "cut.tar": data[:second + 512 + 100],
             "noend.tar": data[:second + 512 + 1024 + 512 + 512],
             "huge.tar": data[:second] + huge.tobuf(tarfile.GNU_FORMAT) + data[second:]}
    assert _oracle(bytes(bad)) == [("a.jpg", 512, b"1" * 600)]      # tarfile stops quietly
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
        got = []
        with pytest.raises(DatagoError, match="not a readable tar shard") as e:
            for item in iter_shard(str(tmp_path / name)):
                got.append(item[0])
        # samples are complete when the next key's header is read: the one being
        # read when the damage shows is lost with the shard (counted as failed)
        assert got == {"bad.tar": [], "cut.tar": ["a"], "noend.tar": ["a", "b"],
                       "huge.tar": []}[name], name
        assert {"bad.tar": "checksum", "cut.tar": "unexpected end",
                "noend.tar": "without its end marker",
                "huge.tar": "extended header"}[name] in str(e.value), (name, e.value)


def test_a_damaged_streamed_shard_is_counted(data, tmp_path):
    """In a streamed epoch such a shard's samples before the damage are delivered,
    and the shard is counted as failed with a warning."""
    base, samples, _ = data
    src = (base / "shards" / "shard-002.tar").read_bytes()
    shards = tmp_path / "s"
    shards.mkdir()
    for i in range(8):
        (shards / f"shard-{i:03d}.tar").write_bytes(
            (base / "shards" / f"shard-{i:03d}.tar").read_bytes())
    (shards / "shard-002.tar").write_bytes(src[:len(src) // 2])
    ds = DatagoDataset(stream_cfg(str(shards / "shard-{000..007}.tar")))
    with pytest.warns(RuntimeWarning, match=r"shard 2 failed"):
        ids = [i for b in ds for i in b["id"]]
    lost = {k for j, (k, _) in enumerate(samples) if j % 8 == 2} - set(ids)
    assert lost and set(ids) | lost == {k for k, _ in samples}
    assert ds.stats()["streaming"]["shards_failed"] == 1


def test_a_finished_prefetch_keeps_saying_so():
    """``next`` after the end (or after the error was raised) is StopIteration again,
    not a wait on a queue no thread will fill: the per-sample streaming engine asks
    once more after the end, and hung there (found by the reference_image_type test
    with ``batch_size: None``)."""
    import threading
    from datago._prefetch import prefetched

    def bounded_next(p):
        """``next(p, "end")``, or "hung" after 5 s."""
        got = ["hung"]
        t = threading.Thread(target=lambda: got.__setitem__(0, next(p, "end")), daemon=True)
        t.start()
        t.join(5)
        return got[0]

    p = prefetched(iter([1, 2]), 4)
    assert list(p) == [1, 2]
    assert bounded_next(p) == "end" and bounded_next(p) == "end"

    def failing():
        yield 1
        raise ValueError("boom")

    p = prefetched(failing(), 4)
    assert next(p) == 1
    with pytest.raises(ValueError, match="boom"):
        next(p)
    assert bounded_next(p) == "end"


def test_prefetch_poll_gives_up_in_time_and_keeps_the_order():
    """``poll(timeout)``: EMPTY while the producer is still working, then the items
    in order, the producer's exception, and StopIteration after it, as ``next``."""
    import threading
    from datago._prefetch import prefetched
    go = threading.Event()

    def slow():
        yield 1
        go.wait(10)
        yield 2
        raise ValueError("boom")

    p = prefetched(slow(), 4)
    assert p.poll(5.0) == 1
    assert p.poll(0.01) is prefetched.EMPTY          # 2 waits for the event
    go.set()
    assert p.poll(5.0) == 2
    with pytest.raises(ValueError, match="boom"):
        p.poll(5.0)
    with pytest.raises(StopIteration):
        p.poll(0.01)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_limit_holds_for_streamed_shards(data, batch_size):
    """``limit`` (samples per rank per pass) holds for streamed shards: the first
    ``limit`` samples of the stream (batches group them by bucket)."""
    base, samples, pattern = data
    ds = DatagoDataset(stream_cfg(pattern, batch_size=batch_size, limit=5))
    got = [s["id"] for s in ds] if batch_size is None else [i for b in ds for i in b["id"]]
    full = DatagoDataset(stream_cfg(pattern, batch_size=None))
    assert sorted(got) == sorted([s["id"] for s in full][:5])


def test_limit_is_shared_by_the_workers_and_sets_the_ranks_steps(data):
    """Each DataLoader worker reads its share of ``limit`` (7 = 4 + 3 over two
    workers); on several ranks ``limit`` also sets the steps each rank yields
    (limit // batch_size), so that no rank waits for another."""
    base, samples, pattern = data
    ds = DatagoDataset(stream_cfg(pattern, batch_size=None, limit=7))
    got = [s["id"] for s in DataLoader(ds, batch_size=None, num_workers=2)]
    assert len(got) == 7 and len(set(got)) == 7
    per_rank = []
    for rank in range(2):
        ds = DatagoDataset(stream_cfg(pattern, batch_size=2, limit=6), detector=fixed(rank, 2))
        per_rank.append([list(b["id"]) for b in ds])
    assert [len(b) for b in per_rank] == [3, 3]
    assert not set(sum(per_rank[0], [])) & set(sum(per_rank[1], []))


def test_per_sample_streaming_ends(data):
    """``batch_size: None`` over streamed shards yields every sample and ends."""
    base, samples, pattern = data
    ds = DatagoDataset(stream_cfg(pattern, batch_size=None))
    assert sorted(s["id"] for s in ds) == sorted(k for k, _ in samples)
