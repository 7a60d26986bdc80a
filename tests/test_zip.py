"""source_type "zip": archives written with the standard library's ``zipfile`` (and
patched or rewritten by hand where zipfile cannot write the case), read from disk
and from nginx, against the folder source on the same files."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

from conftest import encode, photo
from datago import DatagoDataset, DatagoError
from datago.fetch import Fetcher, FetchConfig, Inline
from datago.sources.filesystem import FileListing
from datago.sources.zip import ZipSource
from servers import Nginx

IMAGE = {"crop_and_resize": True, "default_image_size": 64, "downsampling_ratio": 16}


def npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def make_files(n=15):
    """{member path: bytes}: images (JPEG and PNG) with masks, json/txt sidecars and
    npy latents, under folders."""
    rng = np.random.default_rng(5)
    files = {}
    for i in range(n):
        w = int(rng.integers(100, 260))
        h = int(w / np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        key = f"g{i % 3}/s{i:03d}"
        arr = photo(w, h, seed=i)
        if i % 4 == 0:
            files[f"{key}.png"] = encode(arr, "PNG")
        else:
            files[f"{key}.jpg"] = encode(arr, "JPEG", quality=92)
        if i % 3 == 0:
            files[f"{key}.json"] = json.dumps({"caption": f"cap {i}", "i": i}).encode()
        if i % 4 == 1:
            files[f"{key}.txt"] = f"text {i}".encode()
        if i % 5 == 0:
            m = (photo(w, h, seed=100 + i)[..., 0] > 128).astype(np.uint8) * 255
            files[f"{key}.mask.png"] = encode(m, "PNG")
        files[f"{key}.npy"] = npy(np.random.default_rng(i).standard_normal((4, 8, 8))
                                  .astype(np.float16))
        if i % 6 == 0:
            files[f"{key}.emb.npy"] = npy(np.arange(i + 1, dtype=np.int32))
    return files


def write_zip(path, files, method=zipfile.ZIP_DEFLATED, order_seed=0, **kw):
    """An archive of ``files`` in a shuffled member order (the listing must not depend on it)."""
    names = sorted(files)
    np.random.default_rng(order_seed).shuffle(names)
    with zipfile.ZipFile(path, "w", compression=method, **kw) as z:
        for name in names:
            z.writestr(name, files[name])
    return path


def write_folder(root, files):
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("zip")
    files = make_files()
    write_folder(base / "folder", files)
    (base / "zips").mkdir()
    write_zip(base / "zips" / "stored.zip", files, zipfile.ZIP_STORED)
    write_zip(base / "zips" / "deflate.zip", files, zipfile.ZIP_DEFLATED, order_seed=1)
    names = sorted(files)
    for k in range(2):                      # the samples of g0 and g1/g2 in two archives
        part = {n: files[n] for n in names if (n.startswith("g0/") == (k == 0))}
        write_zip(base / "zips" / f"part-{k}.zip", part)
    return base, files


def zip_cfg(path, **kw):
    src = {"path": path}
    src.update(kw.pop("source", {}))
    return {"source_type": "zip", "source_config": src, "image_config": IMAGE,
            "batch_size": 4, "seed": 3, **kw}


def folder_cfg(root):
    return {"source_config": {"root_path": str(root)}, "image_config": IMAGE,
            "batch_size": 4, "seed": 3}


def by_id(ds, seen=None):
    """{id: (bucket, pixels, crop, attributes, masks, latents)} over an epoch;
    ``seen`` gets every id yielded (repeats included)."""
    out = {}
    for b in ds:
        for j, sid in enumerate(b["id"]):
            if seen is not None:
                seen.append(sid)
            masks = {k: t[j].numpy().tobytes() for k, t in b["masks"].items()
                     if b.get("present", {}).get(f"mask/{k}", [True] * 99)[j]}
            lat = {k: (None if v[j] is None else (v[j].numpy().dtype.str, v[j].numpy().tobytes()))
                   for k, v in b["latents"].items()}
            out[sid] = (tuple(b["bucket"]), b["image"][j].numpy().tobytes(),
                        tuple(b["crop_coords"][j].tolist()), b["attributes"][j], masks,
                        {k: v for k, v in lat.items() if v is not None})
    return out


@pytest.fixture(scope="module")
def folder_batches(data):
    base, _ = data
    return by_id(DatagoDataset(folder_cfg(base / "folder")))


def access(log):
    """[(status, bytes sent)] of nginx access log lines."""
    out = []
    for line in log:
        m = re.search(r'" (\d{3}) (\d+) ', line)
        out.append((int(m.group(1)), int(m.group(2))))
    return out


# ---------------------------------------------------------------------- equality
@pytest.mark.parametrize("archive", ["stored.zip", "deflate.zip"])
def test_local_archive_equals_the_folder_source(data, folder_batches, archive, tmp_path):
    base, files = data
    ds = DatagoDataset(zip_cfg(str(base / "zips" / archive),
                               source={"cache_dir": str(tmp_path / "c")}))
    folder = FileListing(str(base / "folder"))
    assert list(ds.listing.ids()) == list(folder.ids())           # same ids, same order
    assert ds.stats()["listing"]["skipped"] == {}
    assert not ds._remote
    got = by_id(ds)
    assert got == folder_batches
    assert ds.stats()["skipped_total"] == 0
    # members are byte ranges of the archive: stored ones plain, deflated ones inflated
    ref = ds.listing.ref(0)
    assert ref.path.url == str(base / "zips" / archive)
    assert ref.path.codec == ("" if archive == "stored.zip" else "deflate")
    assert Fetcher().read(ref.path) == files[ref.id]
    assert any(r.latents for r in map(ds.listing.ref, range(len(ds.listing))))


def test_several_archives_give_member_paths_as_ids(data, folder_batches, tmp_path):
    base, _ = data
    ds = DatagoDataset(zip_cfg(str(base / "zips" / "part-*.zip"),
                               source={"cache_dir": str(tmp_path / "c")}))
    assert by_id(ds) == folder_batches
    # a list of locations, brace patterns: the same
    ds2 = ZipSource([str(base / "zips" / "part-{0..1}.zip")])
    assert list(ds2.ids()) == list(ds.listing.ids())
    # the same archive twice under two names: the second one's samples are duplicates
    import shutil
    shutil.copy(base / "zips" / "part-0.zip", tmp_path / "again.zip")
    dup = ZipSource([str(base / "zips" / "part-0.zip"), str(tmp_path / "again.zip")])
    single = ZipSource(str(base / "zips" / "part-0.zip"))
    assert list(dup.ids()) == list(single.ids())
    assert dup.skipped["duplicate_sample"] == len(single)


def test_over_nginx_by_range_requests_only(data, folder_batches, tmp_path):
    base, files = data
    size = (base / "zips" / "deflate.zip").stat().st_size
    members = len(files)
    with Nginx(base / "zips") as n:
        url = f"{n.url}/deflate.zip"
        fetcher = Fetcher(FetchConfig(io_concurrency=8))
        src = ZipSource(_cfg(url, tmp_path / "c"), fetcher)
        listing = access(n.access_log())
        # construction with a cache: the size, the tail (the central directory is in it)
        again = ZipSource(_cfg(url, tmp_path / "c"), fetcher)
        relisting = access(n.access_log())[len(listing):]
        ds = DatagoDataset(zip_cfg(url, source={"cache_dir": str(tmp_path / "c")}))
        assert ds._remote and ds.stats()["listing"]["skipped"] == {}
        built = len(n.access_log())
        seen = []
        got = by_id(ds, seen)
        total = access(n.access_log())
        # several remote archives (read side by side): the same ids as local ones
        parts = ZipSource(_cfg(f"{n.url}/part-{{0..1}}.zip", tmp_path / "c"), fetcher)
        assert list(parts.ids()) == list(ZipSource(str(base / "zips" / "part-*.zip")).ids())
        assert fetcher.read(parts.ref(3).path) == files[parts.sample_id(3)]
    assert got == folder_batches
    # first listing (no cache of local headers yet)
    local = ZipSource(_cfg(str(base / "zips" / "deflate.zip"), tmp_path / "d"))
    assert list(src.ids()) == list(local.ids()) == list(again.ids())
    assert all(s == 206 for s, _ in total)                           # ranges, never the file
    assert 2 <= len(listing) <= 3 + members                          # size, tail, local headers
    assert sum(b for _, b in listing) < size / 2
    assert len(relisting) == 2 and sum(b for _, b in relisting) <= 65535 + 42 + 1
    assert max(b for _, b in total) <= max(65535 + 42, max(map(len, files.values())) + 100)
    # the dataset: size and tail (local headers cached), one header scan per sample,
    # then one request per member of each sample yielded (padding repeats some)
    parts = {r.id: 1 + len(r.masks + r.images + r.texts + r.latents)
             for r in map(src.ref, range(len(src)))}
    assert built - len(listing) - len(relisting) == 2 + len(parts)
    assert len(total) - built == sum(parts[i] for i in seen)


def _cfg(path, cache):
    from datago.config import ZipSourceConfig
    return ZipSourceConfig(path=path, cache_dir=str(cache))


# ---------------------------------------------------------------------- ZIP64
def _cd(data: bytes):
    """[(offset of the central entry, name)] of a well-formed archive, and the
    directory's offset and size (from its plain end record)."""
    e = data.rfind(b"PK\x05\x06")
    count, cd_size, cd_off = struct.unpack_from("<HLL", data, e + 10)
    out, p = [], cd_off
    for _ in range(count):
        nlen, elen, clen = struct.unpack_from("<3H", data, p + 28)
        out.append((p, data[p + 46:p + 46 + nlen].decode()))
        p += 46 + nlen + elen + clen
    return out, cd_off, cd_size


def to_zip64(data: bytes) -> bytes:
    """The archive with a ZIP64 central directory: every entry's sizes and local
    header offset moved to a zip64 extra field (0xFFFFFFFF in the fixed fields),
    a zip64 end record and locator, and 0xFFFF/0xFFFFFFFF in the plain end record."""
    entries, cd_off, _ = _cd(data)
    cd = bytearray()
    for p, _ in entries:
        fixed = bytearray(data[p:p + 46])
        csize, usize = struct.unpack_from("<LL", fixed, 20)
        nlen, elen, clen = struct.unpack_from("<3H", fixed, 28)
        lho, = struct.unpack_from("<L", fixed, 42)
        name = data[p + 46:p + 46 + nlen]
        comment = data[p + 46 + nlen + elen:p + 46 + nlen + elen + clen]
        extra = struct.pack("<HHQQQ", 1, 24, usize, csize, lho) + struct.pack("<HH4s", 0x5455, 4,
                                                                                b"\0\0\0\0")
        struct.pack_into("<LL", fixed, 20, 0xFFFFFFFF, 0xFFFFFFFF)
        struct.pack_into("<L", fixed, 42, 0xFFFFFFFF)
        struct.pack_into("<H", fixed, 30, len(extra))
        struct.pack_into("<H", fixed, 6, 45)                      # version needed: 4.5
        cd += fixed + name + extra + comment
    body = data[:cd_off]
    eocd64_off = len(body) + len(cd)
    eocd64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, len(entries),
                         len(entries), len(cd), cd_off)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, eocd64_off, 1)
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF,
                       0xFFFFFFFF, 0)
    return bytes(body + cd + eocd64 + locator + eocd)


def zip64_archive(files) -> bytes:
    """Members written with ``force_zip64`` (zip64 sizes in the *local* extra field
    only), then the central directory rewritten as ZIP64."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as z:
        for k, name in enumerate(sorted(files)):
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_STORED if k % 2 else zipfile.ZIP_DEFLATED
            with z.open(info, "w", force_zip64=True) as f:
                f.write(files[name])
    return to_zip64(buf.getvalue())


def test_zip64_local_and_remote(data, tmp_path):
    base, files = data
    raw = zip64_archive(files)
    stub = b"#!/bin/sh\necho self-extracting stub\nexit 0\n" * 10   # bytes before the archive
    (tmp_path / "z64.zip").write_bytes(raw)
    (tmp_path / "stub.zip").write_bytes(stub + raw)
    for name in ("z64.zip", "stub.zip"):                  # an independent reader agrees
        with zipfile.ZipFile(tmp_path / name) as z:
            assert z.testzip() is None and z.read("g0/s000.png") == files["g0/s000.png"]
    folder_ids = list(FileListing(str(base / "folder")).ids())
    fetcher = Fetcher()

    def check(src):
        assert src.skipped == {} and list(src.ids()) == folder_ids
        for i in range(len(src)):
            ref = src.ref(i)
            stem = ref.id.rsplit(".", 1)[0]
            assert fetcher.read(ref.path) == files[ref.id]
            for name, loc in ref.masks + ref.images + ref.texts + ref.latents:
                got = fetcher.read(loc)
                assert got == files[f"{stem}.{loc.name.split('.', 1)[1]}"], (ref.id, name)

    check(ZipSource(str(tmp_path / "z64.zip")))
    check(ZipSource(str(tmp_path / "stub.zip")))
    with Nginx(tmp_path) as n:
        check(ZipSource(_cfg(f"{n.url}/stub.zip", tmp_path / "c"), fetcher))
    # and through the dataset
    got = by_id(DatagoDataset(zip_cfg(str(tmp_path / "stub.zip"),
                                      source={"cache_dir": str(tmp_path / "c")})))
    assert set(got) == set(folder_ids)


# ---------------------------------------------------------------------- refused members
def patch_central(data: bytes, name: str, **fields) -> bytes:
    """Set fixed fields of ``name``'s central entry (flags, method, usize, csize)
    and, for flags, of its local header too."""
    out = bytearray(data)
    entries, _, _ = _cd(data)
    p = dict((n, p) for p, n in entries)[name]
    lho, = struct.unpack_from("<L", out, p + 42)
    if "flags" in fields:
        struct.pack_into("<H", out, p + 8, fields["flags"])
        struct.pack_into("<H", out, lho + 6, fields["flags"])
    if "usize" in fields:
        struct.pack_into("<L", out, p + 24, fields["usize"])
    return bytes(out)


def test_encrypted_unsupported_duplicate_hidden_are_counted(data, tmp_path):
    _, files = data
    jpg = files["g0/s003.jpg"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("ok.jpg", jpg)
        z.writestr("secret.jpg", jpg)
        z.writestr("bz.jpg", jpg, compress_type=zipfile.ZIP_BZIP2)
        z.writestr("xz.jpg", jpg, compress_type=zipfile.ZIP_LZMA)
        z.writestr("sub/", b"")                                    # a directory entry
        z.writestr("dup.jpg", jpg)
        with pytest.warns(UserWarning, match="Duplicate name"):
            z.writestr("dup.jpg", b"second, never read")
        z.writestr("__MACOSX/._ok.jpg", b"resource fork")
        z.writestr(".hidden/x.jpg", jpg)
        z.writestr("README", b"no extension")
        z.writestr("notes.doc", b"other extension")
        z.writestr("lonely.txt", b"an orphan sidecar")
    raw = patch_central(buf.getvalue(), "secret.jpg", flags=0x1)
    (tmp_path / "a.zip").write_bytes(raw)
    with zipfile.ZipFile(tmp_path / "a.zip") as z:                  # zipfile agrees: encrypted
        with pytest.raises(RuntimeError, match="encrypted"):
            z.read("secret.jpg")
    src = ZipSource(str(tmp_path / "a.zip"))
    assert list(src.ids()) == ["dup.jpg", "ok.jpg"]
    assert src.skipped == {"encrypted": 1, "unsupported_method": 2, "duplicate_member": 1,
                           "hidden": 2, "no_extension": 1, "other_extension": 1,
                           "orphan_sidecars": 1}
    assert Fetcher().read(src.ref(0).path) == jpg                    # the first dup.jpg wins
    ds = DatagoDataset(zip_cfg(str(tmp_path / "a.zip"), source={"cache_dir": str(tmp_path / "c")}))
    assert {i for b in ds for i in b["id"]} == {"dup.jpg", "ok.jpg"}
    assert ds.stats()["listing"]["skipped"]["encrypted"] == 1


def test_names_with_dotdot_or_absolute_paths_are_ids_only(data, tmp_path, monkeypatch):
    _, files = data
    jpg, png = files["g0/s003.jpg"], files["g0/s000.png"]
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    names = {"../evil.jpg": jpg, "../../../../../../tmp/abs_evil.png": png,
             "/etc/datago_evil.jpg": jpg, "C:\\win\\evil.jpg": jpg, "../evil.txt": b"caption"}
    write_zip(tmp_path / "evil.zip", names)
    before = {p for p in tmp_path.rglob("*")}
    before_tmp = set(os.listdir("/tmp"))
    ds = DatagoDataset(zip_cfg(str(tmp_path / "evil.zip"),
                               source={"cache_dir": str(tmp_path / "c")}))
    got = by_id(ds)
    assert set(got) == {"../evil.jpg", "../../../../../../tmp/abs_evil.png",
                        "/etc/datago_evil.jpg", "C:\\win\\evil.jpg"}
    assert got["../evil.jpg"][3] == {"txt": "caption"}
    after = {p for p in tmp_path.rglob("*")}
    assert all(str(p).startswith(str(tmp_path / "c")) for p in after - before)   # caches only
    assert not os.path.exists("/etc/datago_evil.jpg") and not os.path.exists("/tmp/abs_evil.png")
    assert not [p for p in set(os.listdir("/tmp")) - before_tmp if "evil" in p]


def test_zip_bomb_and_huge_declared_sizes_are_refused(data, tmp_path):
    _, files = data
    jpg = files["g0/s003.jpg"]
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("ok.jpg", jpg)
        with z.open("bomb.png", "w") as f:                       # 50 MB of zeros, ~50 KB stored
            chunk = bytes(1 << 20)
            for _ in range(50):
                f.write(chunk)
        z.writestr("huge.jpg", jpg)
        z.writestr("ok.txt", b"fine")
    raw = patch_central(path.read_bytes(), "huge.jpg", usize=0xFFFFFFF0)   # declares ~4 GB
    path.write_bytes(raw)
    assert path.stat().st_size < 200_000
    tracemalloc.start()
    try:
        ds = DatagoDataset(zip_cfg(str(path), source={"cache_dir": str(tmp_path / "c")}))
        ids = [i for b in ds for i in b["id"]]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert set(ids) == {"ok.jpg"}
    assert ds.stats()["listing"]["skipped"] == {"zip_bomb": 1, "too_large_member": 1}
    assert peak < 20 << 20                                       # nothing was inflated
    # a byte limit below the bomb's declared size refuses it as too large instead
    small = ZipSource(_cfg_kw(str(path), max_member_bytes=10 << 20))
    assert small.skipped == {"too_large_member": 2}
    # a generous ratio lets it through (50 MB is under the byte limit): it is read, whole
    lax = ZipSource(_cfg_kw(str(path), max_ratio=5000))
    assert "bomb.png" in list(lax.ids()) and lax.skipped == {"too_large_member": 1}


def _cfg_kw(path, **kw):
    from datago.config import ZipSourceConfig
    return ZipSourceConfig(path=path, **kw)


def test_member_inflating_past_its_declared_size_fails_as_bad_member(data, tmp_path):
    _, files = data
    jpgs = sorted(n for n in files if n.endswith(".jpg"))[:4]
    path = tmp_path / "liar.zip"
    write_zip(path, {n: files[n] for n in jpgs})
    raw = patch_central(path.read_bytes(), jpgs[0], usize=len(files[jpgs[0]]) - 100)
    raw = patch_central(raw, jpgs[1], usize=len(files[jpgs[1]]) + 100)
    path.write_bytes(raw)
    src = ZipSource(str(path))
    from datago.fetch import FetchError
    with pytest.raises(FetchError) as e:
        Fetcher().read(src.ref(list(src.ids()).index(jpgs[0])).path)
    assert e.value.reason == "bad_member"
    cfg = zip_cfg(str(path), source={"cache_dir": str(tmp_path / "c"), "scan_sizes": False})
    ds = DatagoDataset(cfg)
    with pytest.warns(RuntimeWarning):
        ids = {i for b in ds for i in b["id"]}
    assert ids == set(jpgs[2:])
    assert ds.stats()["skipped"] == {"bad_member": 1, "truncated": 1}


def test_a_member_whose_bytes_changed_fails_its_crc(data, tmp_path):
    """A bit flipped inside a stored JPEG (a quantisation step) still decodes, to
    wrong pixels: the
    directory's CRC-32 catches it (``crc_mismatch``), as it does for a deflate
    member that inflates to the right size with the wrong content."""
    _, files = data
    jpgs = sorted(n for n in files if n.endswith(".jpg"))[:4]
    path = tmp_path / "flipped.zip"
    write_zip(path, {n: files[n] for n in jpgs}, method=zipfile.ZIP_STORED)
    raw = bytearray(path.read_bytes())
    start = raw.index(files[jpgs[0]])
    at = raw.index(b"\xff\xdb", start) + 15           # a quantisation step in the DQT
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))
    src = ZipSource(str(path))
    from datago import decode
    from datago.fetch import FetchError, Member
    loc = src.ref(list(src.ids()).index(jpgs[0])).path
    flipped = decode(Fetcher().read(Member(loc.url, loc.offset, loc.size)))
    assert not np.array_equal(flipped, decode(files[jpgs[0]]))   # only the CRC tells
    with pytest.raises(FetchError, match="CRC-32") as e:
        Fetcher().read(loc)
    assert e.value.reason == "crc_mismatch"
    ds = DatagoDataset(zip_cfg(str(path), source={"scan_sizes": False}))
    with pytest.warns(RuntimeWarning, match="crc_mismatch"):
        ids = {i for b in ds for i in b["id"]}
    assert ids == set(jpgs[1:]) and ds.stats()["skipped"] == {"crc_mismatch": 1}
    # deflate: the right size, the wrong content
    from datago._codecs import decode_member
    import zlib
    body = b"caption " * 100
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    z = c.compress(body) + c.flush()
    ok = Member("x.zip", 0, len(z), "a.txt", "deflate", len(body), zlib.crc32(body))
    assert decode_member(ok, z) == body
    with pytest.raises(FetchError) as e:
        decode_member(Member("x.zip", 0, len(z), "a.txt", "deflate", len(body),
                             zlib.crc32(body) ^ 1), z)
    assert e.value.reason == "crc_mismatch"


# ---------------------------------------------------------------------- corrupt archives
def test_truncated_or_corrupt_archives_raise_naming_the_file(data, tmp_path):
    base, _ = data
    raw = (base / "zips" / "deflate.zip").read_bytes()
    cases = {"cut.zip": raw[:len(raw) // 2], "junk.zip": os.urandom(5000), "empty.zip": b"",
             "badcd.zip": raw[:-300] + b"\0" * 278 + raw[-22:]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DatagoError, match=re.escape(name)):
            ZipSource(str(tmp_path / name))
    with pytest.raises(DatagoError, match="cut.zip"):
        DatagoDataset(zip_cfg(str(tmp_path / "cut.zip"), source={"cache_dir": str(tmp_path / "c")}))
    with pytest.raises(DatagoError, match="missing.zip"):
        ZipSource(str(tmp_path / "missing.zip"))
    # an empty archive is no error: no samples
    with zipfile.ZipFile(tmp_path / "none.zip", "w"):
        pass
    assert len(ZipSource(str(tmp_path / "none.zip"))) == 0


# ---------------------------------------------------------------------- scale
def test_ten_thousand_members_list_fast(data, tmp_path):
    _, files = data
    jpg = files["g0/s003.jpg"][:200]                  # the bytes do not matter here
    path = tmp_path / "big.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for i in range(5000):
            z.writestr(f"d{i % 50:02d}/img{i:05d}.jpg", jpg)
            z.writestr(f"d{i % 50:02d}/img{i:05d}.txt", b"t")
    t0 = time.perf_counter()
    src = ZipSource(str(path))
    dt = time.perf_counter() - t0
    assert len(src) == 5000 and src.skipped == {}
    assert dt < 2.0, f"listing 10,000 members took {dt:.2f} s"
    ref = src.ref(1234)
    assert Fetcher().read(ref.path) == jpg and Fetcher().read(ref.texts[0][1]) == b"t"
    empty = ZipSource(str(write_zip(tmp_path / "e.zip", {"a.jpg": jpg, "a.txt": b""})))
    assert isinstance(empty.ref(0).texts[0][1], Inline)
