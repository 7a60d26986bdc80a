"""Split bins (``datago.bins`` writer, ``source_type: "bins"`` reader): equal to the
folder source on the same images, interrupted writes never read as complete,
resume, random access, bin-wise order, and bins over nginx."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import datago.bins as bins
from datago import ConfigError, DatagoDataset, DatagoError, read_header
from datago.sources.bins import BinsSource
from conftest import encode, photo
from servers import Nginx
from test_dataset import make_tree
from test_webdataset import npy_bytes

IMAGE = {"crop_and_resize": True, "default_image_size": 64, "downsampling_ratio": 16}
HERE = os.path.dirname(os.path.abspath(__file__))


def _sidecars(root, ids):
    """Masks, attributes and latents next to some of the tree's images."""
    for k, sid in enumerate(ids):
        base = str(root / sid).rsplit(".", 1)[0]
        if k % 3 == 0:
            h, w = read_header((root / sid).read_bytes()).display_size
            m = (photo(w, h, seed=50 + k)[..., 0] > 120).astype(np.uint8) * 255
            with open(base + ".mask.png", "wb") as f:
                f.write(encode(m, "PNG"))
        if k % 2 == 0:
            with open(base + ".json", "w") as f:
                json.dump({"caption": f"c{k}", "k": k, "tags": ["a", "b"]}, f)
        if k % 4 == 1:
            with open(base + ".npy", "wb") as f:
                f.write(npy_bytes(np.full((2, 3), k, dtype=np.float16)))


def sample_of(root, sid):
    """The bins sample dict of a folder sample (its sidecars read by hand)."""
    base = str(root / sid).rsplit(".", 1)[0]
    s = {"id": sid, "image": (root / sid).read_bytes(), "masks": {}, "latents": {},
         "attributes": {}}
    if os.path.exists(base + ".mask.png"):
        s["masks"]["mask"] = open(base + ".mask.png", "rb").read()
    if os.path.exists(base + ".json"):
        s["attributes"] = json.load(open(base + ".json"))
    if os.path.exists(base + ".npy"):
        s["latents"]["npy"] = open(base + ".npy", "rb").read()
    return s


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("bins-src")
    ids = make_tree(root, n=24)
    _sidecars(root, ids)
    out = tmp_path_factory.mktemp("bins") / "ds"
    summary = bins.write(out, (sample_of(root, i) for i in ids), splits=5)
    return root, ids, out, summary


def folder_cfg(root, **kw):
    return {"source_config": {"root_path": str(root)}, "image_config": IMAGE,
            "batch_size": 4, "seed": 3, **kw}


def bins_cfg(path, **kw):
    src = {"path": str(path)}
    src.update(kw.pop("source", {}))
    return {"source_type": "bins", "source_config": src, "image_config": IMAGE,
            "batch_size": 4, "seed": 3, **kw}


def by_id(ds):
    """{id: (bucket, image bytes, original size, crop, attributes, masks, latents)}."""
    out = {}
    for b in ds:
        present = b.get("present", {})
        for j, sid in enumerate(b["id"]):
            masks = {k: t[j].numpy().tobytes() for k, t in b["masks"].items()
                     if present.get(f"mask/{k}", [True] * (j + 1))[j]}
            lat = {}
            for k, v in b["latents"].items():
                a = v[j]
                if a is not None:
                    lat[k] = (a.numpy().dtype.str, a.numpy().tobytes())
            out[sid] = (tuple(b["bucket"]), b["image"][j].numpy().tobytes(),
                        tuple(b["original_size"][j].tolist()),
                        tuple(b["crop_coords"][j].tolist()), b["attributes"][j], masks, lat)
    return out


def test_bins_equal_the_folder_source_without_a_header_scan(tree):
    root, ids, out, summary = tree
    assert summary["samples"] == 24 and summary["bins"] == 5 and summary["unreadable"] == 0
    assert sorted(os.listdir(out)) == [f"bin-{b:05d}.bin" for b in range(5)] + ["index.jsonl"]
    ds = DatagoDataset(bins_cfg(out))
    assert ds.listing.kind == "bins" and ds.mode == "plan"
    assert ds.stats()["index"]["scanned"] == 0            # sizes from the index
    folder = DatagoDataset(folder_cfg(root))
    assert np.array_equal(ds.sizes.width, folder.sizes.width)
    assert np.array_equal(ds.sizes.height, folder.sizes.height)
    got, want = by_id(ds), by_id(folder)
    assert set(got) == set(want) == set(ids)
    for sid in ids:
        assert got[sid] == want[sid], sid                 # pixels, attributes, masks, latents
    assert sum(1 for v in got.values() if v[5]) == 8 and sum(1 for v in got.values() if v[6]) == 6


def test_random_access_and_binwise_order(tree):
    root, ids, out, _ = tree
    src = BinsSource(str(out))
    assert len(src) == 24 and list(src.ids()) == ids
    for i in (0, 7, -1):
        s, want = src[i], sample_of(root, ids[i])
        assert s["id"] == want["id"] and s["image"] == want["image"]
        assert s["masks"] == want["masks"] and s["latents"] == want["latents"]
        assert s["attributes"] == want["attributes"]
        assert s["ext"] == ids[i].rsplit(".", 1)[1]
        assert (s["height"], s["width"]) == read_header(want["image"]).display_size
    with pytest.raises(IndexError):
        src[24]
    counts = np.bincount([src.bin_of(i) for i in range(len(src))], minlength=5)
    assert counts.max() - counts.min() <= 1                # round-robin: balanced
    assert [src.bin_of(i) for i in range(6)] == [0, 1, 2, 3, 4, 0]
    plain = src.binwise_order()
    assert sorted(plain.tolist()) == list(range(24))
    assert [src.bin_of(i) for i in plain] == sorted(src.bin_of(i) for i in plain)
    a, b = src.binwise_order(shuffle=True, seed=1), src.binwise_order(shuffle=True, seed=1)
    assert np.array_equal(a, b) and not np.array_equal(a, src.binwise_order(shuffle=True, seed=2))
    runs = [src.bin_of(i) for i in a]                       # each bin's samples together
    assert len([k for k in range(1, 24) if runs[k] != runs[k - 1]]) == 4
    assert [s["id"] for s in src.iter_binwise(shuffle=True, seed=1)] == [ids[i] for i in a]


def _write_partial(path, samples, stop_after):
    def gen():
        for k, s in enumerate(samples):
            if k == stop_after:
                raise RuntimeError("boom")
            yield s
    with pytest.raises(RuntimeError, match="boom"):
        bins.write(path, gen(), splits=4)


def test_an_interrupted_write_is_never_read_and_a_rerun_completes_it(tree, tmp_path):
    root, ids, _, _ = tree
    samples = [sample_of(root, i) for i in ids]
    path = tmp_path / "ds"
    _write_partial(path, samples, 10)
    assert "index.jsonl" not in os.listdir(path)
    assert "index.jsonl.part" in os.listdir(path)
    with pytest.raises(DatagoError, match="interrupted"):
        BinsSource(str(path))
    with pytest.raises(DatagoError, match="interrupted"):
        DatagoDataset(bins_cfg(path))
    bins.write(path, samples, splits=4)                     # a re-run starts over
    assert [s["id"] for s in BinsSource(str(path))] == ids
    # resume: the first samples are kept, the rest appended; same bytes as a clean write
    path2 = tmp_path / "ds2"
    _write_partial(path2, samples, 13)
    # as after a kill: the index line of sample 12 (bin 0) is on disk, its bytes are not
    cut = sum(len(samples[k]["image"]) + sum(len(v) for v in samples[k]["masks"].values())
              + sum(len(v) for v in samples[k]["latents"].values()) for k in (0, 4, 8))
    with open(path2 / "bin-00000.bin.part", "r+b") as f:
        f.truncate(cut + 5)
    s = bins.write(path2, samples, splits=4, resume=True)
    assert s["resumed"] == 12 and s["samples"] == 24
    for name in os.listdir(path):
        assert (path / name).read_bytes() == (path2 / name).read_bytes(), name
    with pytest.raises(DatagoError, match="already holds a complete"):
        bins.write(path2, samples, splits=4)
    bins.write(path2, samples[:3], splits=4, overwrite=True)
    assert len(BinsSource(str(path2))) == 3
    assert sorted(os.listdir(path2)) == [f"bin-{b:05d}.bin" for b in range(4)] + ["index.jsonl"]
    # resume with other samples or other splits is refused
    _write_partial(path2 / "x", samples, 5)
    with pytest.raises(DatagoError, match="not the same samples"):
        bins.write(path2 / "x", samples[1:], splits=4, resume=True)
    with pytest.raises(DatagoError, match="splits=4"):
        bins.write(path2 / "x", samples, splits=8, resume=True)


WRITER = r"""
import json, sys, time
sys.path.insert(0, {here!r})
import datago.bins as bins
from test_bins import sample_of
import pathlib
root = pathlib.Path({root!r})
ids = json.loads({ids!r})
def gen():
    for k, sid in enumerate(ids):
        if k == 15:
            sys.stdout.write("ready\n"); sys.stdout.flush()
            time.sleep(60)                  # killed here
        yield sample_of(root, sid)
bins.write({path!r}, gen(), splits=4)
"""


def test_a_killed_writer_leaves_no_dataset_and_resume_finishes_it(tree, tmp_path):
    root, ids, _, _ = tree
    path = tmp_path / "killed"
    code = WRITER.format(here=HERE, root=str(root), ids=json.dumps(ids), path=str(path))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=HERE)
    try:
        assert p.stdout.readline().strip() == b"ready"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert "index.jsonl" not in os.listdir(path)
    with pytest.raises(DatagoError, match="interrupted"):
        BinsSource(str(path))
    # the killed process flushed nothing (or part) of its buffers: resume keeps what is whole
    s = bins.write(path, (sample_of(root, i) for i in ids), splits=4, resume=True)
    assert s["samples"] == 24 and 0 <= s["resumed"] <= 15
    src = BinsSource(str(path))
    assert [x["id"] for x in src] == ids
    assert all(src[i]["image"] == (root / ids[i]).read_bytes() for i in range(24))
    assert not [n for n in os.listdir(path) if n.endswith(".part") or n.startswith(".")]


def test_damaged_datasets_raise_clear_errors(tree, tmp_path):
    root, ids, out, _ = tree
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    index = (bad / "index.jsonl").read_bytes()
    (bad / "index.jsonl").write_bytes(index.replace(b'"k":2', b'"k":3', 1))
    with pytest.raises(DatagoError, match="does not match"):
        BinsSource(str(bad))
    (bad / "index.jsonl").write_bytes(index[:index.rindex(b'{"complete"')])
    with pytest.raises(DatagoError, match="no completion marker"):
        BinsSource(str(bad))
    (bad / "index.jsonl").write_bytes(index)
    with open(bad / "bin-00002.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DatagoError, match="bin-00002.bin: 100 bytes"):
        BinsSource(str(bad))
    (bad / "index.jsonl").unlink()
    with pytest.raises(DatagoError, match="not a datago bins dataset"):
        BinsSource(str(bad))
    with pytest.raises(ConfigError, match="source_config.path"):
        DatagoDataset(bins_cfg(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="one folder"):
        DatagoDataset(dict(bins_cfg(out), source_config={"path": [str(out)]}))


def test_writer_checks_samples(tmp_path):
    img = encode(photo(20, 10), "JPEG")
    with pytest.raises(DatagoError, match="non-empty string 'id'"):
        bins.write(tmp_path / "a", [{"image": img}], splits=2)
    with pytest.raises(DatagoError, match="must be bytes"):
        bins.write(tmp_path / "b", [{"id": "x", "image": "text"}], splits=2)
    with pytest.raises(DatagoError, match="unknown keys"):
        bins.write(tmp_path / "c", [{"id": "x", "image": img, "caption": "y"}], splits=2)
    # a corrupt image is kept (bytes as given) with size 0 x 0: unreadable, not planned
    s = bins.write(tmp_path / "d", [{"id": "x", "image": img}, {"id": "y", "image": b"junk"},
                                    {"id": "x", "image": img}], splits=2)
    assert s["unreadable"] == 1
    src = BinsSource(str(tmp_path / "d"))
    assert len(src) == 2 and src.skipped == {"duplicate_id": 1}        # the first x wins
    assert src.known_sizes().width.tolist() == [20, 0]
    assert src[1]["image"] == b"junk"


def test_bins_over_nginx_equal_local(tree, tmp_path):
    root, ids, out, _ = tree
    local = by_id(DatagoDataset(bins_cfg(out)))
    with Nginx(out.parent) as n:
        url = f"{n.url}/{out.name}"
        ds = DatagoDataset(bins_cfg(url, source={"cache_dir": str(tmp_path / "c")}))
        assert ds._remote and ds.stats()["index"]["scanned"] == 0
        got = by_id(ds)
        src = BinsSource(url)
        assert src[5]["image"] == (root / ids[5]).read_bytes()
        ranged = [line for line in n.access_log() if " 206 " in line]
        with pytest.raises(DatagoError, match="not found"):
            BinsSource(f"{n.url}/nothing-here")
    assert got == local
    assert len(ranged) >= 24


def test_write_speed_is_streaming(tmp_path):
    """A write keeps one sample in memory: 2,000 tiny samples through a generator."""
    img = encode(photo(16, 16), "JPEG")
    t0 = time.perf_counter()
    s = bins.write(tmp_path / "many", ({"id": f"s{i:05d}", "image": img, "width": 16,
                                        "height": 16} for i in range(2000)), splits=128,
                   durable=False)
    assert s["samples"] == 2000
    src = BinsSource(str(tmp_path / "many"))
    assert len(src) == 2000 and src.sample_id(1999) == "s01999"
    assert time.perf_counter() - t0 < 10
