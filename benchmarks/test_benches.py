"""The benchmark scripts as opt-in pytest benches (marker ``bench``):

    pytest benchmarks -m bench                       # all of them, small and fast
    pytest benchmarks -m bench -k loader             # one
    DATAGO_BENCH_CORPUS=/tmp/corpus pytest benchmarks -m bench -k core

Each bench calls a script's ``main`` with small arguments (a few images, one
round) and prints the script's own side-by-side tables; it fails only when the
script fails.  The numbers of a run this small are indicative: the recorded
results come from the scripts run on their own with their default sizes
(``benchmarks/RESULTS.md``).  See ``conftest.py`` for the corpus and the
reference datago.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

pytestmark = pytest.mark.bench


def _needs(*modules: str) -> None:
    for m in modules:
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"needs {m}")


def _ok(rc) -> None:
    assert rc in (None, 0), f"the script returned {rc}"


def _ref_args(ref_venv) -> list:
    return ["--ref-venv", ref_venv] if ref_venv else ["--no-ref"]


def test_core(run_script, corpus):
    """bench_core: decode-to-bucket, datago vs Pillow vs PyTurboJPEG+OpenCV."""
    _needs("cv2", "turbojpeg")
    _ok(run_script("bench_core.py", [corpus, "--limit", 24, "--rounds", 1, "--sizes", 512]))


def test_loader(run_script, corpus, ref_venv):
    """bench_loader: DatagoDataset + DataLoader vs a Pillow DataLoader (and the
    reference datago with $DATAGO_BENCH_REF_VENV)."""
    _ok(run_script("bench_loader.py", [corpus, "--limit", 32, "--rounds", 1, "--sizes", 512,
                                       "--batch", 8, *_ref_args(ref_venv)]))


def test_client(run_script, corpus, ref_venv):
    """bench_client: DatagoClient vs the reference's (needs the reference)."""
    if ref_venv is None:
        pytest.skip("compares with the reference datago: set DATAGO_BENCH_REF_VENV")
    _ok(run_script("bench_client.py", [corpus, "--limit", 32, "--rounds", 1, "--threads", "1,2",
                                       "--ref-venv", ref_venv]))


def test_remote(run_script, corpus, ref_venv):
    """bench_remote: index and WebDataset sources over nginx vs the local folder."""
    if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        pytest.skip("needs nginx")
    _ok(run_script("bench_remote.py", [corpus, "--limit", 32, "--rounds", 1,
                                       *_ref_args(ref_venv)]))


def test_db(run_script, corpus, ref_venv):
    """bench_db: the dataroom API source from `datago serve` vs the local folder."""
    _needs("starlette", "uvicorn")
    _ok(run_script("bench_db.py", [corpus, "--limit", 32, "--rounds", 1, *_ref_args(ref_venv)]))


def test_plan(run_script, corpus):
    """bench_plan: planning an epoch (time, memory) and what the remainder costs."""
    _ok(run_script("bench_plan.py", ["--n", 100_000, "--repeats", 1, "--corpus", corpus]))


def test_listing(run_script, tmp_path):
    """bench_listing: FileListing vs glob and os.walk on a generated tree."""
    _ok(run_script("bench_listing.py", ["--files", 3000, "--per-dir", 500, "--jobs", 1,
                                        "--dir", tmp_path / "tree"]))


def test_index(run_script):
    """bench_index: memory and time of an index source from CSV / Parquet."""
    formats = "csv,parquet" if importlib.util.find_spec("pyarrow") else "csv"
    _ok(run_script("bench_index.py", ["--rows", 20_000, "--formats", formats]))


def test_resample(run_script):
    """bench_resample: the resampler vs Pillow (and OpenCV when installed)."""
    _ok(run_script("bench_resample.py", ["--reps", 3]))


def test_dct_scales(run_script, corpus):
    """bench_dct_scales: libjpeg-turbo's speed at each DCT scale."""
    _needs("turbojpeg")
    _ok(run_script("bench_dct_scales.py", [corpus, "--limit", 16, "--rounds", 1]))


def test_quality(run_script, corpus):
    """quality_core: decode_to_bucket vs Pillow's LANCZOS, per filter."""
    _ok(run_script("quality_core.py", [corpus, "--limit", 8, "--sizes", 512]))


def test_soak(run_script, corpus):
    """soak: a short soak (the real one is 100,000 samples); its PASS/FAIL lines
    are printed, not asserted: a run this short is mostly warm-up."""
    run_script("soak.py", [corpus, "--samples", 400, "--every", 80, "--warmup", 160,
                           "--batch", 8, "--size", 256])


def test_fuzz(run_script, tmp_path):
    """fuzz_core: a few hundred executions per target (builtin mutator)."""
    rc = run_script("fuzz_core.py", ["--engine", "builtin", "--runs", 500,
                                     "--work", tmp_path])
    assert rc in (0, 1)                      # 1: findings, listed in its report
