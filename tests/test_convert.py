"""``datago convert`` (function and CLI): a folder with sidecars to bins, WebDataset
and TFRecord and back, byte for byte; re-encoding; resume; clear errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from datago import ConfigError, DatagoError, decode, read_header
from datago._engine import merge_attributes
from datago.convert import convert, load_config, wds_key
from datago.sources import make_source
from conftest import encode, photo
from test_webdataset import make_folder, npy_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 samples: JPEG main images, .json/.txt attributes, masks, latents, one PNG
    main image with an additional image and a list attribute, one corrupt sidecar."""
    base = tmp_path_factory.mktemp("convert")
    root = base / "folder"
    make_folder(root, n=24)
    for i in (1, 6, 13):
        (root / f"g{i % 3}" / f"s{i:03d}.npy").write_bytes(
            npy_bytes(np.arange(6 * i, dtype=np.float16).reshape(2, 3 * i)))
    (root / "extra").mkdir()
    (root / "extra" / "p.png").write_bytes(encode(photo(50, 30, seed=7), "PNG"))
    (root / "extra" / "p.depth.png").write_bytes(encode(photo(50, 30, seed=8)[..., 0], "PNG"))
    (root / "extra" / "p.json").write_text(json.dumps({"tags": ["x", "y"], "n": 3}))
    (root / "extra" / "bad.jpg").write_bytes(encode(photo(30, 30, seed=9), "JPEG"))
    (root / "extra" / "bad.json").write_text("{not json")
    return base, root


def dump(cfg, latents_as_arrays=False):
    """{id: (main bytes, masks, additional images, latents, attributes)}; samples
    whose parts cannot be read are left out."""
    fetcher, src = make_source(load_config(cfg))
    out = {}
    for i in range(len(src)):
        r = src.ref(i)
        try:
            attrs = merge_attributes(r, [(n, fetcher.read(p), p) for n, p in r.texts])
        except DatagoError:
            continue
        lat = {n: fetcher.read(p) for n, p in r.latents}
        if latents_as_arrays:
            lat = {n: (a.dtype.str, a.shape, a.tobytes()) for n, a in
                   ((n, np.load(io.BytesIO(b))) for n, b in lat.items())}
        out[r.id] = (fetcher.read(r.path), {n: fetcher.read(p) for n, p in r.masks},
                     {n: fetcher.read(p) for n, p in r.images}, lat, attrs)
    return out


def test_folder_to_bins_round_trip(corpus, tmp_path):
    base, root = corpus
    want = dump(str(root))
    assert len(want) == 25 and sum(1 for v in want.values() if v[3]) == 3
    s = convert(str(root), tmp_path / "b", "bins", splits=4, workers=2)
    assert s["samples"] == 25 and s["bins"] == 4 and s["failed"] == {"bad_attributes": 1}
    assert s["failed_ids"] == ["extra/bad.jpg"]
    got = dump(str(tmp_path / "b"))                      # a bins folder is read as bins
    assert got == want
    # bins are a source too: bins -> bins keeps everything (one process)
    s2 = convert(str(tmp_path / "b"), tmp_path / "b2", "bins", splits=3, workers=1)
    assert s2["samples"] == 25 and dump(str(tmp_path / "b2")) == want


def test_folder_to_webdataset_round_trip(corpus, tmp_path):
    base, root = corpus
    want = dump(str(root))
    s = convert(str(root), tmp_path / "w", "webdataset", shard_samples=7, workers=2)
    assert s["samples"] == 25 and len(s["shards"]) == 4
    names = sorted(os.listdir(tmp_path / "w"))
    assert names == sorted([f"shard-{k:06d}.tar" for k in range(4)]
                           + [f"shard-{k:06d}.tar.idx.json" for k in range(4)])
    cfg = {"source_type": "webdataset", "source_config": {"url": s["pattern"]}}
    fetcher, src = make_source(load_config(cfg))
    assert src.built == 0                                  # the indexes were written
    got = dump(cfg)
    assert set(got) == {wds_key(k) for k in want}
    for sid, v in want.items():
        assert got[wds_key(sid)] == v, sid
    # WebDataset (through a JSON config file) -> bins keeps it all again
    (tmp_path / "wds.json").write_text(json.dumps(cfg))
    convert(str(tmp_path / "wds.json"), tmp_path / "b", "bins", splits=2, workers=1)
    assert dump(str(tmp_path / "b")) == got


def test_wds_key():
    assert wds_key("a/b/cat.jpg") == "a/b/cat"
    assert wds_key("a/b/cat.v2.png") == "a/b/cat_v2"
    assert wds_key("https://host/x/../y.JPG?sig=1") == "host/x/y"
    assert wds_key("/abs/path/f.tfrecord:12") == "abs/path/f_tfrecord:12"
    assert wds_key("__key__") == "_key__" and wds_key("") == "sample"
    assert wds_key("train.tfrecord#3") == "train_tfrecord#3"


def test_folder_to_tfrecord_round_trip(corpus, tmp_path):
    base, root = corpus
    want = dump(str(root), latents_as_arrays=True)
    s = convert(str(root), tmp_path / "t", "tfrecord", shard_samples=10, workers=2)
    assert s["samples"] == 25 and len(s["shards"]) == 3
    assert all(os.path.exists(tmp_path / "t" / f"{n}.tfidx.json") for n in s["shards"])
    cfg = {"source_type": "tfrecord", "source_config": {
        "path": str(tmp_path / "t" / "shard-*.tfrecord"), "id_key": "image/filename"}}
    fetcher, src = make_source(load_config(cfg))
    assert src.built == 0
    got = dump(cfg, latents_as_arrays=True)
    assert set(got) == set(want)
    for sid, v in want.items():
        assert got[sid] == v, sid


def _run(*args):
    return subprocess.Popen([sys.executable, "-m", "datago", "convert", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)


def test_cli(corpus, tmp_path):
    base, root = corpus
    procs = {"plain": _run(root, tmp_path / "w", "--format", "webdataset", "--workers", "2",
                           "--shard-size", "10"),
             "jpeg": _run(root, tmp_path / "j", "--format", "bins", "--reencode", "jpeg:95",
                          "--splits", "3", "--workers", "1", "--quiet")}
    out = {k: (p.wait(120), p.stdout.read().decode(), p.stderr.read().decode())
           for k, p in procs.items()}
    rc, stdout, stderr = out["plain"]
    assert rc == 0, stderr
    assert "25 samples as webdataset (3 shards" in stdout and "bad_attributes 1" in stdout
    want = dump(str(root))
    got = dump({"source_type": "webdataset",
                "source_config": {"url": str(tmp_path / "w" / "shard-*.tar")}})
    assert {wds_key(k): v for k, v in want.items()} == got
    rc, stdout, stderr = out["jpeg"]
    assert rc == 0, stderr
    recoded = dump(str(tmp_path / "j"))
    assert set(recoded) == set(want)
    for sid, (main, masks, images, lat, attrs) in recoded.items():
        assert main[:3] == b"\xff\xd8\xff"                     # all JPEG now
        orig = want[sid][0]
        assert read_header(main).display_size == read_header(orig).display_size
        diff = np.abs(decode(main).astype(int) - decode(orig).astype(int)).mean()
        assert diff < 8, (sid, diff)                         # (another image: ~50)
        assert (masks, images, lat, attrs) == want[sid][1:]     # the rest untouched


def test_errors_are_clear(corpus, tmp_path, capsys):
    base, root = corpus
    from datago.cli import main
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "x"),
                 "--format", "bins"]) == 2
    assert "no such folder or file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["convert", str(root), str(tmp_path / "x"), "--format", "zip"])
    assert e.value.code == 2 and "invalid choice: 'zip'" in capsys.readouterr().err
    assert main(["convert", str(root), str(tmp_path / "x"), "--format", "bins",
                 "--reencode", "gif:3"]) == 2
    assert "reencode 'gif:3'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="format 'zip'"):
        convert(str(root), tmp_path / "x", "zip")
    (tmp_path / "c.json").write_text("{nope")
    with pytest.raises(ConfigError, match="c.json: config is not valid JSON"):
        convert(str(tmp_path / "c.json"), tmp_path / "x", "bins")
    with pytest.raises(ConfigError, match="DST is SRC"):
        convert(str(root), root, "bins")
    with pytest.raises(ConfigError, match="streaming"):
        convert({"source_type": "webdataset",
                 "source_config": {"url": "x.tar", "streaming": True}}, tmp_path / "x", "bins")
    with pytest.raises(ConfigError, match="workers"):
        convert(str(root), tmp_path / "x", "bins", workers=-1)
    # a finished output is not overwritten by accident
    convert(str(root), tmp_path / "w", "webdataset", limit=3, workers=1)
    with pytest.raises(DatagoError, match="--overwrite"):
        convert(str(root), tmp_path / "w", "webdataset", limit=3, workers=1)
    s = convert(str(root), tmp_path / "w", "webdataset", limit=5, workers=1, overwrite=True)
    assert s["samples"] == 4 and len(s["shards"]) == 1        # extra/bad.jpg left out


@pytest.mark.parametrize("fmt", ["bins", "webdataset"])
def test_an_interrupted_conversion_resumes_to_the_same_output(corpus, tmp_path, monkeypatch,
                                                              fmt):
    base, root = corpus
    import datago.bins
    import datago.convert as conv
    clean = tmp_path / "clean"
    convert(str(root), clean, fmt, splits=4, shard_samples=4, workers=1)
    target = (datago.bins.BinsWriter, "add") if fmt == "bins" else (conv._Tars, "_write")
    real, calls = getattr(*target), []

    def flaky(self, *a):
        calls.append(1)
        if len(calls) == 11:
            raise KeyboardInterrupt
        return real(self, *a)

    monkeypatch.setattr(*target, flaky)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(str(root), out, fmt, splits=4, shard_samples=4, workers=2)
    monkeypatch.setattr(*target, real)
    if fmt == "bins":
        with pytest.raises(DatagoError, match="interrupted"):       # not read as complete
            convert(str(out), tmp_path / "again", "bins")
    s = convert(str(root), out, fmt, splits=4, shard_samples=4, workers=2, resume=True)
    # bins keep all 10 samples written; shards are kept whole (2 of 4 samples)
    assert s["resumed"] == (10 if fmt == "bins" else 8) and s["samples"] == 25
    assert sorted(os.listdir(out)) == sorted(os.listdir(clean))
    for name in os.listdir(clean):
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
