"""The sizes index: header scan, on-disk cache, incremental rescans."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from PIL import Image

from conftest import encode, photo
from datago import DatagoDataset
from datago.sharding import shard_hash
from datago.sources.filesystem import FileListing
from datago.sources.sizes import FORMATS, scan_files


def make_images(root, n=12):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = 40 + 13 * i, 90 - 3 * i
        arr = photo(w, h, seed=i)
        if i % 4 == 0:
            (root / f"im{i:02d}.png").write_bytes(encode(arr, "PNG"))
        elif i % 4 == 1:               # EXIF orientation 6: displayed transposed
            exif = Image.Exif()
            exif[0x0112] = 6
            (root / f"im{i:02d}.jpg").write_bytes(encode(arr, "JPEG", exif=exif.tobytes()))
        elif i % 4 == 2:
            (root / f"im{i:02d}.webp").write_bytes(encode(arr, "WEBP"))
        else:
            (root / f"im{i:02d}.jpg").write_bytes(encode(arr, "JPEG"))


def scan(root, cache, **kw):
    listing = FileListing(root)
    paths = [listing.ref(i).path for i in range(len(listing))]
    hashes = np.array([shard_hash(i) for i in listing.ids()], dtype=np.uint64)
    return listing, scan_files(str(root), paths, hashes, cache_dir=str(cache), **kw)


def oracle(path):
    with Image.open(path) as im:
        w, h = im.size
        orient = im.getexif().get(0x0112, 1)
    return (h, w) if orient in (5, 6, 7, 8) else (w, h)


def test_sizes_match_pillow_and_formats(tmp_path):
    make_images(tmp_path / "d")
    listing, idx = scan(tmp_path / "d", tmp_path / "cache")
    assert idx.scanned == len(listing) and idx.cached == 0 and idx.unreadable == 0
    for i in range(len(listing)):
        path = listing.ref(i).path
        assert (idx.width[i], idx.height[i]) == oracle(path), path
        ext = path.rsplit(".", 1)[1]
        assert FORMATS[idx.format[i]] == {"jpg": "jpeg"}.get(ext, ext)


def test_second_scan_comes_from_the_cache(tmp_path):
    make_images(tmp_path / "d")
    _, first = scan(tmp_path / "d", tmp_path / "cache")
    _, again = scan(tmp_path / "d", tmp_path / "cache")
    assert again.scanned == 0 and again.cached == len(first)
    assert np.array_equal(first.width, again.width) and np.array_equal(first.height, again.height)


def test_only_added_and_changed_files_are_rescanned(tmp_path):
    d = tmp_path / "d"
    make_images(d)
    scan(d, tmp_path / "cache")
    (d / "im03.jpg").unlink()                                       # removed
    (d / "new.jpg").write_bytes(encode(photo(30, 70, seed=99), "JPEG"))   # added
    later = time.time() + 5
    os.utime(d / "im07.jpg", (later, later))                        # touched
    (d / "im04.png").write_bytes(encode(photo(111, 22, seed=5), "PNG"))   # rewritten
    listing, idx = scan(d, tmp_path / "cache")
    assert idx.scanned == 3 and idx.cached == len(listing) - 3
    i = list(listing.ids()).index("im04.png")
    assert (idx.width[i], idx.height[i]) == (111, 22)
    i = list(listing.ids()).index("new.jpg")
    assert (idx.width[i], idx.height[i]) == (30, 70)


def test_corrupt_header_is_counted_and_cached(tmp_path):
    d = tmp_path / "d"
    make_images(d, n=4)
    (d / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no jpeg")
    (d / "empty.png").write_bytes(b"")
    listing, idx = scan(d, tmp_path / "cache")
    assert idx.unreadable == 2
    bad = [listing.sample_id(i) for i in np.flatnonzero(idx.format == 0)]
    assert sorted(bad) == ["bad.jpg", "empty.png"]
    _, again = scan(d, tmp_path / "cache")
    assert again.scanned == 0 and again.unreadable == 2          # not rescanned, still counted


def test_header_longer_than_the_first_read(tmp_path):
    """A JPEG whose APP segments push the frame header past 64 KiB."""
    d = tmp_path / "d"
    d.mkdir()
    data = encode(photo(64, 48, seed=1), "JPEG")
    app = b"\xff\xe2" + (65533).to_bytes(2, "big") + b"\0" * 65531
    (d / "long.jpg").write_bytes(data[:2] + app + app + data[2:])
    _, idx = scan(d, tmp_path / "cache")
    assert (idx.width[0], idx.height[0]) == (64, 48)


def test_corrupt_cache_file_is_ignored_and_rewritten(tmp_path):
    make_images(tmp_path / "d", n=5)
    cache = tmp_path / "cache"
    scan(tmp_path / "d", cache)
    (f,) = [p for p in cache.iterdir() if p.suffix == ".npz"]
    f.write_bytes(b"garbage, not a zip")
    with pytest.warns(RuntimeWarning, match="ignoring unreadable sizes cache"):
        _, idx = scan(tmp_path / "d", cache)
    assert idx.scanned == 5
    _, idx = scan(tmp_path / "d", cache)
    assert idx.scanned == 0


def test_unwritable_cache_dir_warns_and_still_scans(tmp_path):
    make_images(tmp_path / "d", n=3)
    blocker = tmp_path / "file"
    blocker.write_text("x")                                      # a file where a folder should be
    with pytest.warns(RuntimeWarning, match="sizes cache is off"):
        _, idx = scan(tmp_path / "d", blocker / "sub")
    assert idx.scanned == 3


def test_cache_off_reads_nothing_writes_nothing(tmp_path):
    make_images(tmp_path / "d", n=3)
    _, idx = scan(tmp_path / "d", tmp_path / "cache", use_cache=False)
    assert idx.scanned == 3 and not (tmp_path / "cache").exists()


def test_dataset_uses_the_cache_and_leaves_bad_headers_out(tmp_path):
    d = tmp_path / "d"
    make_images(d, n=8)
    (d / "zz_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    cfg = {"source_config": {"root_path": str(d), "cache_dir": str(tmp_path / "c")},
           "image_config": {"crop_and_resize": True, "default_image_size": 64,
                            "downsampling_ratio": 16},
           "batch_size": 2, "remainder": "drop"}
    ds = DatagoDataset(cfg)
    st = ds.stats()["index"]
    assert st["scanned"] == 9 and st["unreadable"] == 1
    got = [i for b in ds for i in b["id"]]
    assert "zz_bad.png" not in got
    assert len(got) + ds.stats()["dropped_remainder"] == 8
    assert ds.stats()["skipped_total"] == 0
    assert DatagoDataset(cfg).stats()["index"]["scanned"] == 0
