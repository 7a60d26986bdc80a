"""source_type "webdataset": tar shards made with tarfile, read by member offset from
disk, from nginx and through the fault server, against the folder source."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from conftest import encode, photo
from datago import ConfigError, DatagoDataset
from datago import cli
from datago.sharding import ShardInfo
from datago.sources.webdataset import build_index, expand_urls, write_index
from servers import FaultServer, Nginx

IMAGE = {"crop_and_resize": True, "default_image_size": 64, "downsampling_ratio": 16}


def npy_bytes(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def make_folder(root, n=30):
    """A folder of samples with sidecars; returns [(key, {ext: bytes})]."""
    rng = np.random.default_rng(1)
    samples = []
    for i in range(n):
        w = int(rng.integers(40, 200))
        h = int(w / np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        key = f"g{i % 3}/s{i:03d}"
        parts = {"jpg": encode(photo(w, max(h, 8), seed=i), "JPEG", quality=90)}
        if i % 4 == 0:
            parts["json"] = json.dumps({"caption": f"cap {i}", "i": i}).encode()
        if i % 5 == 0:
            parts["txt"] = f"text {i}".encode()
        if i % 6 == 0:
            m = (photo(w, max(h, 8), seed=100 + i)[..., 0] > 128).astype(np.uint8) * 255
            parts["mask.png"] = encode(m, "PNG")
        samples.append((key, parts))
        for ext, data in parts.items():
            p = root / f"{key}.{ext}"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    return samples


def make_shards(folder, samples, n_shards=4):
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tar:
            for key, parts in samples[s::n_shards]:
                for ext, data in parts.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"shard-{{000..{n_shards - 1:03d}}}.tar")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("wds")
    samples = make_folder(base / "folder")
    pattern = make_shards(base / "shards", samples)
    return base, samples, pattern


def wds_cfg(url, **kw):
    src = {"url": url}
    src.update(kw.pop("source", {}))
    return {"source_type": "webdataset", "source_config": src, "image_config": IMAGE,
            "batch_size": 3, "seed": 2, **kw}


def by_key(ds, strip_ext=False):
    out = {}
    for b in ds:
        for j, sid in enumerate(b["id"]):
            key = sid.rsplit(".", 1)[0] if strip_ext else sid
            masks = {k: t[j].numpy().tobytes() for k, t in b["masks"].items()
                     if b.get("present", {}).get(f"mask/{k}", [True] * 99)[j]}
            out[key] = (tuple(b["bucket"]), b["image"][j].numpy().tobytes(),
                        tuple(b["crop_coords"][j].tolist()), b["attributes"][j], masks)
    return out


def test_expand_urls(tmp_path):
    assert expand_urls("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_urls("http://h/{a,b}/x-{8..10}.tar") == [
        "http://h/a/x-8.tar", "http://h/a/x-9.tar", "http://h/a/x-10.tar",
        "http://h/b/x-8.tar", "http://h/b/x-9.tar", "http://h/b/x-10.tar"]
    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / "b.tar").write_bytes(b"")
    assert expand_urls(str(tmp_path / "*.tar")) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    with pytest.raises(ConfigError, match="matches no file"):
        expand_urls(str(tmp_path / "*.zip"))


def test_local_shards_equal_the_folder_source(data, tmp_path):
    base, samples, pattern = data
    folder = {"source_config": {"root_path": str(base / "folder")}, "image_config": IMAGE,
              "batch_size": 3, "seed": 2}
    want = by_key(DatagoDataset(folder), strip_ext=True)
    ds = DatagoDataset(wds_cfg(pattern, source={"cache_dir": str(tmp_path / "c")}))
    assert ds.listing.built == 4 and ds.stats()["listing"]["skipped"] == {}
    got = by_key(ds)
    assert set(got) == {k for k, _ in samples} == set(want)
    for key, parts in samples:
        assert got[key][:3] == want[key][:3], key              # bucket, pixels, crop
        attrs = {}
        if "json" in parts:
            attrs.update(json.loads(parts["json"]))
        if "txt" in parts:
            attrs["txt"] = parts["txt"].decode()
        assert got[key][3] == attrs == want[key][3]
        assert got[key][4] == want[key][4]                      # masks, exactly
    # the built indexes were cached: the next construction streams nothing
    assert DatagoDataset(wds_cfg(pattern, source={"cache_dir": str(tmp_path / "c")})).listing.built == 0


def test_datago_index_cli_writes_next_to_the_shards(data, tmp_path, capsys):
    base, samples, pattern = data
    out = tmp_path / "idx"
    assert cli.main(["index", pattern, "--out", str(out), "--jobs", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all("samples" in line for line in lines)
    assert [line.split(":")[0] for line in lines] == \
        [str(out / f"shard-{i:03d}.tar.idx.json") for i in range(4)]     # in shard order
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 100)
    assert cli.main(["index", str(tmp_path / "bad.tar"), pattern, "--out", str(out)]) == 1
    got = capsys.readouterr()
    assert "bad.tar: not a readable tar shard" in got.err and len(got.out.splitlines()) == 4
    idx = json.loads((out / "shard-000.tar.idx.json").read_text())
    assert {s["key"] for s in idx["samples"]} == {k for k, _ in samples[0::4]}
    ds = DatagoDataset(wds_cfg(pattern, source={"index_dir": str(out),
                                                "cache_dir": str(tmp_path / "none")}))
    assert ds.listing.built == 0 and not (tmp_path / "none").exists()
    # offsets point at the members' bytes
    with open(base / "shards" / "shard-000.tar", "rb") as f:
        smp = idx["samples"][0]
        off, size = smp["members"]["jpg"]
        f.seek(off)
        assert f.read(size) == dict(samples[0::4])[smp["key"]]["jpg"]


def test_over_nginx_by_range_requests(data, tmp_path):
    base, samples, pattern = data
    shards = base / "shards"
    for i in range(4):
        write_index(str(shards / f"shard-{i:03d}.tar"))
    try:
        with Nginx(shards) as n:
            url = f"{n.url}/shard-{{000..003}}.tar"
            ds = DatagoDataset(wds_cfg(url, source={"cache_dir": str(tmp_path / "c")}))
            assert ds.listing.built == 0 and ds._remote
            got = by_key(ds)
            log = n.access_log()
    finally:
        for p in shards.glob("*.idx.json"):
            p.unlink()
    local = by_key(DatagoDataset(wds_cfg(pattern, source={"cache_dir": str(tmp_path / "c2")})))
    assert got == local
    assert sum(" 206 " in line for line in log) >= len(samples)     # members by Range


def test_a_server_that_ignores_range_fails_members_by_a_counted_reason(data, tmp_path):
    """Shards with indexes on a server that ignores Range (nginx ``max_ranges 0``:
    every member read would bring the whole shard): each sample fails as
    ``range_ignored``, counted, or raised with on_error "raise" -- no shard is
    read whole once per member.  Under the bound (small shards), members are cut
    from the whole shard and the samples equal the local ones."""
    from datago import DatagoError
    base, samples, pattern = data
    shards = base / "shards"
    for i in range(4):
        write_index(str(shards / f"shard-{i:03d}.tar"))
    try:
        with Nginx(shards, extra_server="max_ranges 0;") as n:
            url = f"{n.url}/shard-{{000..003}}.tar"
            small = min((shards / f"shard-{i:03d}.tar").stat().st_size for i in range(4))
            cfg = wds_cfg(url, source={"max_object_bytes": small - 1, "retries": 0},
                          remainder="drop")
            ds = DatagoDataset(cfg)
            batches = list(ds)             # (the plan's steps stay, each batch empty)
            assert batches and not [i for b in batches for i in b["id"]]
            st = ds.stats()
            assert st["skipped"] == {"range_ignored": len(samples) - st["dropped_remainder"]}
            assert st["dropped_remainder"] < len(samples) // 2
            with pytest.raises(DatagoError, match="range_ignored: .* ignored the Range request"):
                next(iter(DatagoDataset(dict(cfg, on_error="raise"))))
            got = by_key(DatagoDataset(wds_cfg(url)))          # under the bound: cut here
    finally:
        for p in shards.glob("*.idx.json"):
            p.unlink()
    assert got == by_key(DatagoDataset(wds_cfg(pattern, source={"cache_dir": str(tmp_path)})))


def test_shard_indexes_are_fetched_concurrently(data, tmp_path):
    """Construction fetches the shards' indexes from several threads (a thousand
    remote shards are a thousand requests): with 0.3 s of latency per request
    they overlap, so they arrive on several connections (one after the other
    they would share one kept-alive connection), and the samples are those of
    the local shards, in the same order."""
    base, samples, pattern = data
    shards = base / "shards"
    for i in range(4):
        write_index(str(shards / f"shard-{i:03d}.tar"))
    try:
        with FaultServer(shards, latency_s=0.3) as srv:
            ds = DatagoDataset(wds_cfg(f"{srv.url}/shard-{{000..003}}.tar",
                                       source={"cache_dir": str(tmp_path / "c")}))
            peers = {r.peer for r in srv.log if r.path.endswith(".idx.json")}
    finally:
        for p in shards.glob("*.idx.json"):
            p.unlink()
    assert len(peers) >= 2, peers
    local = DatagoDataset(wds_cfg(pattern, source={"cache_dir": str(tmp_path / "c2")}))
    assert list(ds.listing.ids()) == list(local.listing.ids())
    assert ds.listing.built == 0


def test_building_an_index_keeps_no_shard_in_memory(tmp_path):
    """``build_index`` reads each image's header as the shard streams by and keeps
    only its size: on a shard of 120 noisy JPEGs (~10 MB), the peak of Python's
    allocations stays under 3 MB, what the stream's 1 MiB chunks take (it held
    every image's first 64 KiB until the end before: 10 MB here), and the sizes
    are the images'."""
    import tracemalloc
    rng = np.random.default_rng(5)
    path = tmp_path / "big.tar"
    want = {}
    with tarfile.open(path, "w") as tar:
        for i in range(120):
            w, h = 300 + i, 220
            data = encode(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "JPEG", quality=95)
            want[f"k{i:03d}"] = (w, h)
            info = tarfile.TarInfo(f"k{i:03d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert path.stat().st_size > 8_000_000
    build_index(str(path))                              # (imports, caches)
    tracemalloc.start()
    try:
        idx = build_index(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3_000_000, peak
    assert {s["key"]: (s["width"], s["height"]) for s in idx["samples"]} == want


def test_gzipped_shards_are_read_from_a_decompressed_copy(data, tmp_path):
    """``.tar.gz`` shards, local and over nginx, read with indexes: each is
    decompressed once into cache_dir while its index is built, its members read
    from that copy (offsets in a compressed file mean nothing), and the samples
    equal the plain shards'.  A second construction reuses index and copy; a copy
    gone is rebuilt with its index.  ``datago index`` refuses a compressed shard."""
    import gzip
    base, samples, pattern = data
    gz = tmp_path / "gz"
    gz.mkdir()
    for i in range(4):
        raw = (base / "shards" / f"shard-{i:03d}.tar").read_bytes()
        (gz / f"shard-{i:03d}.tar.gz").write_bytes(gzip.compress(raw))
    want = by_key(DatagoDataset(wds_cfg(pattern, source={"cache_dir": str(tmp_path / "p")})))
    cache = tmp_path / "c"
    local = wds_cfg(str(gz / "shard-{000..003}.tar.gz"), source={"cache_dir": str(cache)})
    ds = DatagoDataset(local)
    assert ds.listing.built == 4 and not ds._remote
    assert by_key(ds) == want and ds.stats()["skipped"] == {}
    copies = sorted((cache / "wds-index").glob("*.tar"))
    assert len(copies) == 4 and sum(p.stat().st_size for p in copies) == sum(
        (base / "shards" / f"shard-{i:03d}.tar").stat().st_size for i in range(4))
    assert DatagoDataset(local).listing.built == 0                 # both reused
    copies[0].unlink()
    again = DatagoDataset(local)
    assert again.listing.built == 1 and by_key(again) == want
    with Nginx(gz) as n:
        remote = DatagoDataset(wds_cfg(f"{n.url}/shard-{{000..003}}.tar.gz",
                                       source={"cache_dir": str(tmp_path / "r")}))
        assert remote.listing.built == 4
        assert by_key(remote) == want
    assert cli.main(["index", str(gz / "shard-000.tar.gz")]) == 1


def test_a_shard_changed_after_its_index_was_made(data, tmp_path):
    """An index records its shard's size.  When the shard changes size (here
    rewritten without its first sample, plus a text member): a local shard's
    index, and our cached index of a remote one, are found stale at construction
    and rebuilt; an index published next to a remote shard is checked as members
    are read -- each sample fails as ``stale_index``, counted, never read at the
    old offsets.  (A rewrite to the same size is not detected.)"""
    import shutil
    base, samples, pattern = data
    src = base / "shards" / "shard-000.tar"
    d = tmp_path / "s"
    d.mkdir()
    shard = d / "shard-000.tar"
    shutil.copy(src, shard)
    write_index(str(shard))                                  # next to the shard
    old = json.loads((d / "shard-000.tar.idx.json").read_text())
    assert old["size"] == shard.stat().st_size
    mine = [k for k, _ in samples[0::4]]
    with tarfile.open(src) as t_in, tarfile.open(shard, "w") as t_out:
        for m in t_in.getmembers():
            if not m.name.startswith(mine[0] + "."):
                t_out.addfile(m, t_in.extractfile(m))
        pad = tarfile.TarInfo("zz-notes.txt")        # (a sample without an image) so that
        pad.size = 30000                             # the size changes past tar's padding
        t_out.addfile(pad, io.BytesIO(b"n" * pad.size))
    assert shard.stat().st_size != old["size"]
    new_ids = sorted(mine[1:])
    cfg = wds_cfg(str(shard), source={"cache_dir": str(tmp_path / "c"), "retries": 0},
                  remainder="pad")
    ds = DatagoDataset(cfg)                                  # local: rebuilt at once
    assert ds.listing.built == 1 and sorted(ds.listing.ids()) == new_ids
    assert sorted(by_key(ds)) == new_ids
    with Nginx(d) as n:
        url = f"{n.url}/shard-000.tar"
        remote = DatagoDataset(wds_cfg(url, source={"cache_dir": str(tmp_path / "r"),
                                                     "retries": 0}, remainder="pad"))
        assert remote.listing.built == 0                     # the published index, stale
        assert not [i for b in remote for i in b["id"]]
        st = remote.stats()
        assert set(st["skipped"]) == {"stale_index"} and st["skipped_total"] >= len(mine)
        (d / "shard-000.tar.idx.json").unlink()
        fresh = DatagoDataset(wds_cfg(url, source={"cache_dir": str(tmp_path / "r")}))
        assert fresh.listing.built == 1 and sorted(by_key(fresh)) == new_ids
        shutil.copy(src, shard)                              # changed again
        again = DatagoDataset(wds_cfg(url, source={"cache_dir": str(tmp_path / "r")}))
        assert again.listing.built == 1                      # our cached index: rebuilt
        assert sorted(by_key(again)) == sorted(mine)


def test_remote_shard_without_index_is_streamed_once(data, tmp_path):
    base, samples, _ = data
    with FaultServer(base / "shards") as srv:
        url = f"{srv.url}/shard-{{000..003}}.tar"
        ds = DatagoDataset(wds_cfg(url, source={"cache_dir": str(tmp_path / "c")}))
        assert ds.listing.built == 4
        # faults on member range reads are retried; every sample arrives
        srv.add_fault("/shard-001.tar", "503", times=2)
        srv.add_fault("/shard-002.tar", "reset", times=1)
        srv.add_fault("/shard-003.tar", "truncate", times=1)
        got = [i for b in ds for i in b["id"]]
        st = ds.stats()
        assert set(got) == {k for k, _ in samples}
        assert st["skipped_total"] == 0
        assert not [f for f in srv.pending_faults() if f.remaining]
        again = DatagoDataset(wds_cfg(url, source={"cache_dir": str(tmp_path / "c")}))
        assert again.listing.built == 0


def test_auth_token_is_sent_and_never_shown(data, tmp_path):
    base, _, _ = data
    with FaultServer(base / "shards") as srv:
        cfg = wds_cfg(f"{srv.url}/shard-000.tar",
                      source={"auth_token": "TOKEN-123", "cache_dir": str(tmp_path / "c")})
        ds = DatagoDataset(cfg)
        list(ds)
        assert all(r.headers.get("Authorization") == "Bearer TOKEN-123" for r in srv.log)
        assert "TOKEN-123" not in repr(ds.config) and "TOKEN-123" not in repr(ds)
        srv.add_fault("/shard-000.tar", "403", times=None)
        ds2 = DatagoDataset(cfg)
        with pytest.warns(RuntimeWarning) as w:
            list(ds2)
        assert all("TOKEN-123" not in str(x.message) for x in w)
        assert ds2.stats()["skipped"].get("http_4xx", 0) > 0


def test_multi_dot_names_and_ranks(tmp_path):
    shards = tmp_path / "s"
    shards.mkdir()
    data = encode(photo(64, 48, seed=3), "JPEG")
    with tarfile.open(shards / "a.tar", "w") as tar:
        for name in ("x/photo.v2.jpg", "x/photo.v2.json", "y/cat.jpg", "y/cat.cls",
                     "z/dog.png", "z/dog.latent.npy", "w/readme.md"):
            payload = data if name.endswith(".jpg") else (
                encode(photo(30, 60, seed=1), "PNG") if name.endswith(".png") else
                npy_bytes(np.arange(6, dtype=np.float32).reshape(2, 3))
                if name.endswith(".npy") else b'{"a": 1}')
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    idx = build_index(str(shards / "a.tar"))
    keys = {s["key"]: s for s in idx["samples"]}
    assert keys["x/photo"]["main"] == "v2.jpg" and keys["y/cat"]["main"] == "jpg"
    assert keys["z/dog"]["main"] == "png" and (keys["z/dog"]["width"], keys["z/dog"]["height"]) == (30, 60)
    cfg = wds_cfg(str(shards / "a.tar"), batch_size=None, source={"cache_dir": str(tmp_path / "c")})
    ds = DatagoDataset(cfg)
    assert ds.stats()["listing"]["skipped"] == {"no_image": 1}      # readme.md alone
    items = {it["id"]: it for it in ds}
    assert set(items) == {"x/photo", "y/cat", "z/dog"}
    assert items["y/cat"]["attributes"] == {"cls": '{"a": 1}'}
    assert items["x/photo"]["attributes"] == {"v2": {"a": 1}}
    assert items["z/dog"]["latents"]["latent"].tolist() == [[0, 1, 2], [3, 4, 5]]
    # three ranks split the samples (single samples: one step each), every one once
    seen = []
    for r in range(3):
        d = DatagoDataset(wds_cfg(str(shards / "a.tar"), batch_size=None,
                                  source={"cache_dir": str(tmp_path / "c")}),
                          detector=lambda r=r: ShardInfo(r, 3, 0, 1))
        seen += [b["id"] for b in d]
    assert sorted(seen) == ["x/photo", "y/cat", "z/dog"]


def test_not_a_tar_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar archive" * 100)
    from datago import DatagoError
    with pytest.raises(DatagoError, match="not a readable tar shard"):
        DatagoDataset(wds_cfg(str(bad), source={"cache_dir": str(tmp_path / "c")}))


@pytest.mark.parametrize("streaming", [False, True])
def test_reference_image_type_picks_the_main_image(tmp_path, streaming):
    """Samples carrying both a .jpg and a .png: ``reference_image_type`` says which
    is the main image (``batch["image"]``), the other is an additional image; a
    sample without that type falls back to its other image."""
    import datago
    jpg = {k: encode(photo(64, 48, seed=k), "JPEG", quality=95) for k in range(3)}
    png = {k: encode(photo(48, 64, seed=10 + k), "PNG") for k in range(3)}
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for k in range(3):
            parts = {"jpg": jpg[k], "png": png[k]} if k < 2 else {"png": png[k]}
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"k{k}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    buckets = datago.make_buckets(64, 16, 0.5, 2.0)

    def expected(data):
        return datago.decode_to_bucket(data, buckets).image

    for ref, main, other in (("jpg", jpg, png), ("png", png, jpg)):
        ds = DatagoDataset(wds_cfg(str(shard), batch_size=None, source={
            "reference_image_type": ref, "streaming": streaming,
            "cache_dir": str(tmp_path / "c")}))
        got = {s["id"]: s for s in ds}
        assert sorted(got) == ["k0", "k1", "k2"]
        for k in range(2):
            s = got[f"k{k}"]
            assert np.array_equal(s["image"].permute(1, 2, 0).numpy(), expected(main[k])), (ref, k)
            (name, extra), = s["additional_images"].items()
            assert name == ("png" if ref == "jpg" else "jpg")
            assert extra.shape[1:] == s["image"].shape[1:]          # in the main one's bucket
        assert np.array_equal(got["k2"]["image"].permute(1, 2, 0).numpy(), expected(png[2]))
