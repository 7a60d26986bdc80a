"""source_type "index": CSV / JSONL / text lists, local and over HTTP (nginx and the
fault server), compared with the folder source on the same images."""

from __future__ import annotations

import csv
import json

import pytest

from datago import ConfigError, DatagoDataset
from servers import FaultServer, Nginx
from test_dataset import make_tree

IMAGE = {"crop_and_resize": True, "default_image_size": 64, "downsampling_ratio": 16}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    ids = make_tree(root, n=24)
    return root, ids


def folder_cfg(root, **kw):
    return {"source_config": {"root_path": str(root)}, "image_config": IMAGE,
            "batch_size": 4, "seed": 3, **kw}


def index_cfg(index, **kw):
    src = {"index": str(index)}
    src.update(kw.pop("source", {}))
    return {"source_type": "index", "source_config": src, "image_config": IMAGE,
            "batch_size": 4, "seed": 3, **kw}


def by_id(ds):
    """{id: (bucket, image bytes, original_size, crop_coords, attributes)} over an epoch."""
    out = {}
    for b in ds:
        for j, sid in enumerate(b["id"]):
            out[sid] = (tuple(b["bucket"]), b["image"][j].numpy().tobytes(),
                        tuple(b["original_size"][j].tolist()), tuple(b["crop_coords"][j].tolist()),
                        b["attributes"][j])
    return out


def write_csv(path, rows, fields):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def test_csv_index_equals_the_folder_source(tree, tmp_path):
    root, ids = tree
    index = root / "index.csv"                  # relative paths resolve next to the index
    write_csv(index, [{"url": i, "caption": f"c{k}"} for k, i in enumerate(ids)], ["url", "caption"])
    try:
        got = by_id(DatagoDataset(index_cfg(index)))
    finally:
        index.unlink()
    want = by_id(DatagoDataset(folder_cfg(root)))
    assert set(got) == set(want) == set(ids)
    for k, sid in enumerate(ids):
        assert got[sid][:4] == want[sid][:4]                     # pixels, bucket, crop
        assert got[sid][4] == {"caption": f"c{k}"}               # other columns: attributes


def test_jsonl_with_sizes_needs_no_header_scan(tree, tmp_path):
    root, ids = tree
    from datago import read_header
    rows = []
    for i in ids:
        h, w = read_header((root / i).read_bytes()).display_size
        rows.append({"path": str(root / i), "width": w, "height": h, "score": 0.5, "tags": ["a"]})
    index = tmp_path / "x.jsonl"
    index.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = DatagoDataset(index_cfg(index, source={"cache_dir": str(tmp_path / "c")}))
    assert "index" in ds.stats() and ds.stats()["index"]["scanned"] == 0
    got = by_id(ds)
    assert {r["path"] for r in rows} == set(got)
    assert all(v[4] == {"score": 0.5, "tags": ["a"]} for v in got.values())


def test_text_list_over_nginx_equals_local(tree, tmp_path):
    root, ids = tree
    (root / "list.txt").write_text("# images\n" + "\n".join(ids) + "\n\n")
    try:
        with Nginx(root) as n:
            remote = DatagoDataset(index_cfg(f"{n.url}/list.txt",
                                             source={"cache_dir": str(tmp_path / "c")}))
            assert remote._remote and remote._io_threads() == 64
            got = by_id(remote)
            ranged = [line for line in n.access_log() if "206" in line]
    finally:
        (root / "list.txt").unlink()
    want = by_id(DatagoDataset(folder_cfg(root)))
    assert set(got) == set(ids)
    for sid in ids:
        assert got[sid][:4] == want[sid][:4]
    assert ranged                                              # headers were read by range


def test_remote_faults_are_retried_or_counted(tree, tmp_path):
    root, ids = tree
    (root / "list.txt").write_text("\n".join(ids))
    try:
        with FaultServer(root) as srv:
            cfg = index_cfg(f"{srv.url}/list.txt", source={"cache_dir": str(tmp_path / "c"),
                                                           "timeout_s": 1.0},
                            remainder="drop", batch_size=2)
            ds = DatagoDataset(cfg)
            srv.clear_faults()
            # transient faults: delivered anyway
            for k, kind in enumerate(["503", "429", "reset", "truncate", "500", "drop"]):
                srv.add_fault(f"/{ids[k]}", kind, times=1)
            # permanent ones: counted with their reason
            srv.add_fault(f"/{ids[10]}", "404", times=None)
            srv.add_fault(f"/{ids[11]}", "403", times=None)
            srv.add_fault(f"/{ids[12]}", "wrong_type", times=None)
            srv.add_fault(f"/{ids[13]}", "302", times=None, location=f"/{ids[13]}")  # a loop
            got = [i for b in ds for i in b["id"]]
            st = ds.stats()
            planned_now = {ds.listing.sample_id(int(ds._items[i])) for i in ds.plan().samples.ravel()}
            for k in range(6):                  # each transient fault was hit, then retried
                if ids[k] in planned_now:
                    assert len(srv.requests(f"/{ids[k]}")) >= 2, ids[k]
    finally:
        (root / "list.txt").unlink()
    planned = {ds.listing.sample_id(int(ds._items[i])) for i in ds.plan().samples.ravel()}
    lost = {ids[10], ids[11], ids[12], ids[13]} & planned
    assert set(got) == planned - lost
    assert st["skipped"].get("http_4xx", 0) == len(lost - {ids[12], ids[13]})
    assert st["skipped"].get("wrong_content_type", 0) == (ids[12] in planned)
    assert st["skipped"].get("redirect", 0) == (ids[13] in planned)
    assert len(got) + st["skipped_total"] + st["dropped_remainder"] == len(ids)


def test_fetch_retries_count_for_the_reads_at_construction(tree):
    """``fetch_retries`` (what DatagoClient's DATAGO_MAX_RETRIES sets) holds for the
    reads that build the dataset: the index file (too few retries: construction
    fails naming the reason) and the image headers of the size scan."""
    from datago.fetch import FetchError
    root, ids = tree
    (root / "list.txt").write_text("\n".join(ids))
    try:
        with FaultServer(root) as srv:
            cfg = index_cfg(f"{srv.url}/list.txt", source={"sizes_cache": False})
            srv.add_fault("/list.txt", "503", times=3)
            with pytest.raises(FetchError, match="list.txt: HTTP 503") as e:
                DatagoDataset(cfg, fetch_retries=2)
            assert (e.value.reason, e.value.attempts) == ("http_5xx", 3)
            assert len(srv.requests("/list.txt")) == 3
            srv.clear_faults()
            srv.add_fault("/list.txt", "503", times=3)
            srv.add_fault(f"/{ids[0]}", "503", times=1)
            ds = DatagoDataset(cfg, fetch_retries=3)
            assert len(srv.requests("/list.txt")) == 3 + 4
            assert ds.fetcher.config.retries == 3
            first = [ds.listing.sample_id(i) for i in range(len(ds.listing))].index(ids[0])
            assert ds.sizes.width[first] > 0 and len(srv.requests(f"/{ids[0]}")) == 2
            srv.add_fault(f"/{ids[0]}", "503", times=1)          # no retries: its size is lost
            assert DatagoDataset(cfg, fetch_retries=0).sizes.width[first] == 0
            assert DatagoDataset(cfg).fetcher.config.retries == 5
    finally:
        (root / "list.txt").unlink()
    with pytest.raises(ConfigError, match="fetch_retries"):
        DatagoDataset(cfg, fetch_retries=-1)


def test_retries_key_counts_and_fetch_retries_overrides_it(tree):
    """``source_config.retries`` is the retries of a failed request, from the index
    file read at construction on (too few: construction fails after exactly
    retries + 1 requests); ``fetch_retries=`` wins over it, both ways; absent, the
    fetch layer's default."""
    from datago.fetch import FetchConfig, FetchError
    root, ids = tree
    (root / "list.txt").write_text("\n".join(ids))
    try:
        with FaultServer(root) as srv:
            def cfg(**src):
                return index_cfg(f"{srv.url}/list.txt", source={"sizes_cache": False, **src})

            def requests():
                return len(srv.requests("/list.txt"))

            srv.add_fault("/list.txt", "503", times=3)
            with pytest.raises(FetchError, match="list.txt: HTTP 503") as e:
                DatagoDataset(cfg(retries=2))
            assert (e.value.reason, e.value.attempts, requests()) == ("http_5xx", 3, 3)
            srv.clear_faults()
            srv.add_fault("/list.txt", "503", times=3)
            ds = DatagoDataset(cfg(retries=3))              # 3 failures, then it reads
            assert requests() == 3 + 4 and ds.fetcher.config.retries == 3
            assert len(ds.listing) == len(ids)
            srv.add_fault("/list.txt", "503", times=1)
            with pytest.raises(FetchError, match="HTTP 503"):
                DatagoDataset(cfg(retries=0))               # 0: no retry at all
            assert requests() == 7 + 1
            srv.add_fault("/list.txt", "503", times=2)
            ds = DatagoDataset(cfg(retries=0), fetch_retries=2)     # the argument wins
            assert requests() == 8 + 3 and ds.fetcher.config.retries == 2
            srv.add_fault("/list.txt", "503", times=2)
            with pytest.raises(FetchError, match="HTTP 503"):
                DatagoDataset(cfg(retries=5), fetch_retries=1)      # ... both ways
            assert requests() == 11 + 2
            srv.clear_faults()
            assert DatagoDataset(cfg()).fetcher.config.retries == FetchConfig().retries == 5
    finally:
        (root / "list.txt").unlink()


def test_map_dataset_takes_fetch_retries(tree):
    """``DatagoMapDataset(config, fetch_retries=N)``: the retries of the index read
    at construction and of every ``ds[i]``, over the config's ``retries``."""
    from datago._engine import SampleError
    from datago.dataset import DatagoMapDataset
    from datago.fetch import FetchError
    root, ids = tree
    (root / "list.txt").write_text("\n".join(ids))
    try:
        with FaultServer(root) as srv:
            cfg = index_cfg(f"{srv.url}/list.txt", batch_size=None, source={"retries": 0})
            srv.add_fault("/list.txt", "503", times=3)
            with pytest.raises(FetchError, match="list.txt: HTTP 503") as e:
                DatagoMapDataset(cfg, fetch_retries=2)
            assert e.value.attempts == 3 and len(srv.requests("/list.txt")) == 3
            srv.add_fault("/list.txt", "503", times=1)
            m = DatagoMapDataset(cfg, fetch_retries=1)     # one failure, then it reads
            assert len(m) == len(ids) and m.fetcher.config.retries == 1
            assert len(srv.requests("/list.txt")) == 3 + 2
            i = 5
            path = "/" + m.sample_id(i)
            srv.add_fault(path, "503", times=1)
            assert m[i]["id"] == m.sample_id(i)                # one retry: read
            assert len(srv.requests(path)) == 2
            plain = DatagoMapDataset(cfg)                      # the config's retries: 0
            assert plain.fetcher.config.retries == 0
            srv.add_fault(path, "503", times=1)
            with pytest.raises(SampleError, match="http_5xx"):
                plain[i]
            assert len(srv.requests(path)) == 3
    finally:
        (root / "list.txt").unlink()


@pytest.mark.parametrize("bad", [-1, True, 1.5, "2"])
def test_fetch_retries_is_checked_alike_by_both_datasets(tree, bad):
    from datago.dataset import DatagoMapDataset
    root, ids = tree
    for klass, kw in ((DatagoDataset, {}), (DatagoMapDataset, {"batch_size": None})):
        with pytest.raises(ConfigError) as e:
            klass(folder_cfg(root, **kw), fetch_retries=bad)
        assert str(e.value) == f"fetch_retries: must be an integer >= 0, got {bad!r}"


def test_each_mixed_source_takes_its_own_retries(tree, tmp_path):
    """In a mix each source's fetcher has its own ``retries`` (as its own
    ``timeout_s``): the source allowed one retry reads through one failure of its
    index, the one allowed none fails the mix on it; ``fetch_retries=`` sets every
    source's."""
    from datago.fetch import FetchError
    root, ids = tree
    (root / "a.txt").write_text("\n".join(ids[:12]))
    (root / "b.txt").write_text("\n".join(ids[12:]))
    try:
        with FaultServer(root) as srv:
            def mix(ra, rb):
                return {"sources": [
                    {"weight": 1, "source_type": "index",
                     "source_config": {"index": f"{srv.url}/a.txt", "retries": ra,
                                       "timeout_s": 7.0, "cache_dir": str(tmp_path)}},
                    {"weight": 1, "source_type": "index",
                     "source_config": {"index": f"{srv.url}/b.txt", "retries": rb,
                                       "cache_dir": str(tmp_path)}}],
                    "image_config": IMAGE, "batch_size": 4, "seed": 1}

            srv.add_fault("/a.txt", "503", times=1)
            srv.add_fault("/b.txt", "503", times=1)
            ds = DatagoDataset(mix(1, 3))
            assert [(f.config.retries, f.config.timeout_s) for f in ds.fetcher.fetchers] == \
                [(1, 7.0), (3, 30.0)]
            assert len(ds.listing) == len(ids)
            srv.add_fault("/a.txt", "503", times=1)
            srv.add_fault("/b.txt", "503", times=1)
            with pytest.raises(FetchError, match="b.txt: HTTP 503"):
                DatagoDataset(mix(1, 0))
            assert (len(srv.requests("/a.txt")), len(srv.requests("/b.txt"))) == (4, 3)
            srv.clear_faults()
            ds = DatagoDataset(mix(1, 0), fetch_retries=4)
            assert [f.config.retries for f in ds.fetcher.fetchers] == [4, 4]
    finally:
        (root / "a.txt").unlink()
        (root / "b.txt").unlink()


def test_max_failures_turns_a_dying_source_into_an_error(tree, tmp_path):
    root, ids = tree
    (root / "list.txt").write_text("\n".join(ids))
    try:
        with FaultServer(root) as srv:
            ds = DatagoDataset(index_cfg(f"{srv.url}/list.txt",
                                         source={"cache_dir": str(tmp_path / "c"),
                                                 "max_failures": 3}))
            srv.add_fault("*.jpg", "404", times=None)
            from datago import DatagoError
            with pytest.raises(DatagoError, match="max_failures"):
                list(ds)
    finally:
        (root / "list.txt").unlink()


def test_index_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="index"):
        DatagoDataset(index_cfg(tmp_path / "missing.csv"))
    with pytest.raises(ConfigError, match="matches no file"):
        DatagoDataset(index_cfg(tmp_path / "*.csv"))
    bad = tmp_path / "bad.csv"
    write_csv(bad, [{"file": "a.jpg"}], ["file"])
    with pytest.raises(ConfigError, match=r"no column 'url' \(columns: file\)"):
        DatagoDataset(index_cfg(bad))
    latin = tmp_path / "latin.csv"
    latin.write_bytes("url\ncaf\xe9.jpg\n".encode("latin-1"))
    from datago import DatagoError
    with pytest.raises(DatagoError, match=r"latin.csv: not a readable index file \(UnicodeDecodeError"):
        DatagoDataset(index_cfg(latin))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"url": "a.jpg"}\n{"url": \n')
    with pytest.raises(DatagoError, match="broken.jsonl: line 2 is not JSON"):
        DatagoDataset(index_cfg(broken))
    with pytest.raises(ConfigError, match="cache_limit_bytes: must be >= 1"):
        DatagoDataset(index_cfg(bad, source={"cache_limit_bytes": 0}))


def test_duplicates_and_empty_rows_are_counted(tree, tmp_path):
    root, ids = tree
    index = tmp_path / "i.csv"
    rows = [{"url": str(root / i)} for i in ids[:5]] + [{"url": str(root / ids[0])}, {"url": ""}]
    write_csv(index, rows, ["url"])
    ds = DatagoDataset(index_cfg(index, source={"cache_dir": str(tmp_path / "c")}))
    assert len(ds.listing) == 5
    assert ds.stats()["listing"]["skipped"] == {"duplicate_id": 1, "no_location": 1}


@pytest.mark.parametrize("key,value,message", [
    ("index", 5, "must be a file, URL or glob"),
    ("index", [], "must be a file, URL or glob"),
    ("url_column", "", "must be a column name"),
    ("mask_columns", "mask", "must be a list of column names"),
    ("io_concurrency", 0, "must be >= 1"),
    ("timeout_s", -1, "must be > 0"),
    ("retries", -1, "must be >= 0, got -1"),
    ("retries", 1.5, "must be an integer, got 1.5"),
    ("retries", "3", "must be an integer, got '3'"),
    ("retries", True, "must be an integer, got True"),
    ("retries", None, "must be an integer, got None"),
    ("max_failures", "3", "must be a number"),
    ("random_sampling", 1, "must be true or false"),
    ("indx", "x.csv", "did you mean 'index'"),
])
def test_index_config_errors_name_the_key(key, value, message):
    from datago import DatagoConfig
    src = {"index": "x.csv", key: value}
    with pytest.raises(ConfigError, match=f"source_config.{key}: .*{message}"):
        DatagoConfig.from_dict({"source_type": "index", "source_config": src})


def test_index_config_round_trips():
    from datago import DatagoConfig
    d = {"source_type": "index",
         "source_config": {"index": ["a.csv", "http://h/b.jsonl"], "url_column": "path",
                           "mask_columns": ["seg"], "image_columns": ["depth"],
                           "io_concurrency": 8, "timeout_s": 5.0, "retries": 2,
                           "max_failures": 0.1},
         "image_config": IMAGE, "batch_size": 4}
    cfg = DatagoConfig.from_dict(d)
    assert DatagoConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.source.io_concurrency == 8 and cfg.source.mask_columns == ["seg"]
    assert cfg.source.retries == 2 and cfg.to_dict()["source_config"]["retries"] == 2


def test_disk_cache_serves_the_second_epoch_and_counts_hits(tree, tmp_path):
    root, ids = tree
    (root / "list.txt").write_text("\n".join(ids))
    try:
        with Nginx(root) as n:
            cfg = index_cfg(f"{n.url}/list.txt", remainder="drop",
                            source={"cache_dir": str(tmp_path / "c"), "cache_limit_bytes": 10 ** 8})
            ds = DatagoDataset(cfg)
            first = by_id(ds)
            before = len(n.access_log())
            again = by_id(DatagoDataset(cfg))                # a new dataset: same cache folder
            after = len(n.access_log())
            st = ds.stats()["cache"]
    finally:
        (root / "list.txt").unlink()
    assert first == again
    # the second epoch read the images from the cache: only the index file was fetched
    assert after - before == 1
    assert st["misses"] > 0 and st["hits"] == 0
    entries = list((tmp_path / "c" / "objects").rglob("*.bin"))
    assert entries and all(".jpg" not in p.name and ".png" not in p.name for p in entries)


def test_disk_cache_reaches_spawned_workers(tree, tmp_path):
    """A dataset with the disk cache pickles into spawn-context DataLoader workers;
    their hits are counted in the trainer's stats."""
    from torch.utils.data import DataLoader
    root, ids = tree
    (root / "list.txt").write_text("\n".join(ids))
    try:
        with Nginx(root) as n:
            cfg = index_cfg(f"{n.url}/list.txt", remainder="drop",
                            source={"cache_dir": str(tmp_path / "c"), "cache_limit_bytes": 10 ** 8})
            want = by_id(DatagoDataset(cfg))                  # fills the cache
            ds = DatagoDataset(cfg)
            got = by_id(DataLoader(ds, batch_size=None, num_workers=2,
                                   multiprocessing_context="spawn"))
    finally:
        (root / "list.txt").unlink()
    assert got == want
    st = ds.stats()["cache"]
    assert st["hits"] == len(want) and st["misses"] == 0


def test_disk_cache_evicts_least_recently_used(tmp_path):
    import os
    from datago._diskcache import DiskCache
    c = DiskCache(str(tmp_path), limit_bytes=10_000)
    for i in range(8):
        c.put(f"http://h/{i}", bytes([i]) * 1000)
        t = 1_000_000 + i
        os.utime(c._path(f"http://h/{i}"), (t, t))
    assert c.get("http://h/0") == bytes([0]) * 1000          # touched: now the newest
    for i in range(8, 12):
        c.put(f"http://h/{i}", bytes([i]) * 1000)             # past the limit: evict
    c.evict()
    assert c.size() <= 9_000
    assert c.get("http://h/0") is not None                    # recently used: kept
    assert c.get("http://h/1") is None                        # least recently used: gone
    assert c.hit_ratio() is not None
    c.put("http://h/huge", b"x" * 20_000)                     # larger than the cache: skipped
    assert c.get("http://h/huge") is None


def test_parquet_by_row_groups_local_and_over_nginx(tree, tmp_path):
    """A Parquet index (several row groups, typed columns, a mask column) gives what
    the CSV index gives; remote, it is spooled and read the same way."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    root, ids = tree
    table = pa.table({"path": ids, "score": [float(k) / 2 for k in range(len(ids))],
                      "tags": [[f"t{k}", "x"] for k in range(len(ids))]})
    pq.write_table(table, root / "index.parquet", row_group_size=5)
    assert pq.ParquetFile(root / "index.parquet").num_row_groups == 5
    write_csv(root / "same.csv", [{"url": i} for i in ids], ["url"])
    try:
        want = by_id(DatagoDataset(index_cfg(root / "same.csv")))
        got = by_id(DatagoDataset(index_cfg(root / "index.parquet")))
        assert set(got) == set(want) == set(ids)
        for k, sid in enumerate(ids):
            assert got[sid][:4] == want[sid][:4]
            assert got[sid][4] == {"score": k / 2, "tags": [f"t{k}", "x"]}   # types kept
        with Nginx(root) as ng:
            remote = by_id(DatagoDataset(index_cfg(f"{ng.url}/index.parquet")))
        assert {k: v[:4] for k, v in remote.items()} == {k: v[:4] for k, v in got.items()}
    finally:
        (root / "index.parquet").unlink()
        (root / "same.csv").unlink()


def test_duplicates_across_files_first_row_wins(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"url": f"http://h/{i}.jpg", "n": i}) + "\n"
                         for i in range(1000)))
    b.write_text("".join(json.dumps({"url": f"http://h/{i}.jpg", "n": -i}) + "\n"
                         for i in range(990, 1010)))
    from datago.sources.index import IndexSource
    src = IndexSource(str(tmp_path / "*.jsonl"))
    assert len(src) == 1010 and src.skipped == {"duplicate_id": 10}
    assert [src.sample_id(i) for i in (0, 999, 1000, 1009)] == [
        "http://h/0.jpg", "http://h/999.jpg", "http://h/1000.jpg", "http://h/1009.jpg"]
    assert src.ref(995).attributes == {"n": 995}               # the first row's
    assert src.ref(1000).attributes == {"n": -1000}


def test_a_large_index_is_read_as_a_stream(tmp_path):
    """Building the source from a 200k-row CSV allocates little beyond its compact
    blobs: not the file's bytes, not a Python object per row."""
    import tracemalloc
    from datago.sources.index import IndexSource
    n = 200_000
    path = tmp_path / "big.csv"
    with open(path, "w") as f:
        f.write("url,width,height,caption\n")
        for i in range(n):
            f.write(f"https://cdn.example.com/images/{i:08d}.jpg,{640 + i % 7},{480},"
                    f"a photo number {i}\n")
    size = path.stat().st_size
    tracemalloc.start()
    src = IndexSource(str(path))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    held = src.memory_bytes()
    assert len(src) == n and src.known_sizes() is not None
    assert src.main_location(7) == "https://cdn.example.com/images/00000007.jpg"
    assert held / n < 150                   # (a dict per row alone would be ~400 bytes)
    # blobs are built in bytearrays and frozen into bytes (a copy each), plus
    # 12 bytes per row in arrays: ~2x what is held, never the file + objects per row
    assert peak < 2.3 * held + 4_000_000, (peak, held, size)
