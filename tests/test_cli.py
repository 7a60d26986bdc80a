"""The command line: datago bench, datago core, and datago alone (sample corpus)."""

import re
import subprocess
import sys

import numpy as np

from datago import cli
from datago.corpus import make_sample_corpus
from datago.sources import FileListing
import datago
from test_dataset import make_tree


def test_bench_summary(tmp_path, capsys):
    ids = make_tree(tmp_path, n=14)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    rc = cli.main(["bench", str(tmp_path), "--size", "128", "--ratio", "16", "--batch", "4",
                   "--workers", "1", "--threads", "2"])
    assert rc == 0
    out = capsys.readouterr()
    # the corrupt file is left out of the plan when its header is scanned
    padded = int(re.search(r"^remainder policy: (\d+) repeats", out.out, re.M).group(1))
    assert padded > 0
    total = len(ids) + padded
    assert re.search(rf"^{total} images in [0-9.]+ s: [0-9.]+ img/s, [0-9.]+ MB/s read",
                     out.out, re.M)
    assert "left out of the plan: 1 files whose header could not be read" in out.out
    assert "skipped: none" in out.out
    hist = [int(m) for m in re.findall(r"^\s+\d+ x \d+\s+(\d+)\s+#+$", out.out, re.M)]
    assert sum(hist) == total
    assert f"{total}/{total} img" in out.err      # the progress bar


def test_bench_limit_and_errors(tmp_path, capsys):
    make_tree(tmp_path, n=10)
    assert cli.main(["bench", str(tmp_path), "--size", "128", "--batch", "3", "--limit", "4"]) == 0
    assert re.search(r"^4 images in", capsys.readouterr().out, re.M)
    assert cli.main(["bench", str(tmp_path / "missing")]) == 2
    assert "root_path" in capsys.readouterr().err


def test_core_table(tmp_path, capsys):
    make_tree(tmp_path, n=6)
    assert cli.main(["core", str(tmp_path), "--size", "128", "--seconds", "0.05",
                     "--threads", "2"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (Pillow|datago)[^|]*\|\s+([0-9.]+) \|", out, re.M)
    assert [r[0] for r in rows] == ["Pillow", "datago", "datago"]
    assert all(float(r[1]) > 0 for r in rows)


def test_sample_corpus(tmp_path):
    root = make_sample_corpus(tmp_path / "c", n=24, seed=1)
    listing = FileListing(root)
    assert len(listing) == 24
    kinds = {i.rsplit(".", 1)[1] for i in listing.ids()}
    assert kinds == {"jpg", "png"}
    sizes = [datago.read_header((root / i).read_bytes()).display_size for i in listing.ids()]
    ars = [w / h for h, w in sizes]
    assert min(ars) < 0.75 and max(ars) > 1.4            # mixed aspect ratios
    assert make_sample_corpus(tmp_path / "c", n=24, seed=1) == root   # reused
    for i in listing.ids():
        assert datago.decode((root / i).read_bytes()).dtype == np.uint8


def test_datago_alone_runs_on_the_sample_corpus(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path), "DATAGO_SAMPLE_IMAGES": "16", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "datago"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    m = re.search(r"^(\d+) images in", r.stdout, re.M)
    pad = re.search(r"^remainder policy: (\d+) repeats", r.stdout, re.M)
    assert int(m.group(1)) == 16 + (int(pad.group(1)) if pad else 0)
    assert "datago decode_to_bucket, 1 thread" in r.stdout
