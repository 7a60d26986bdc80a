"""Opt-in pytest benches: ``pytest benchmarks -m bench`` runs the benchmark scripts'
comparisons with small, fast arguments and prints their side-by-side tables.

* Without ``-m bench`` (an expression naming ``bench``) every bench is skipped,
  so a plain ``pytest benchmarks`` runs nothing by accident; the README's test
  command, ``pytest -q tests``, never collects this folder.
* Corpus: ``$DATAGO_BENCH_CORPUS`` (a folder of images, e.g. one made by
  ``shared/corpus/make_corpus.py``) or, when unset, a small photo-like corpus
  generated on the fly with the tests' image generator (``$DATAGO_BENCH_N``
  images, default 40: JPEG of several qualities and subsamplings, some
  progressive or EXIF-rotated, some PNG, long side 400-1200 px).
* The reference datago (PyPI, in its own venv) takes part where a script
  compares with it when ``$DATAGO_BENCH_REF_VENV`` names that venv; otherwise
  those scripts run with ``--no-ref`` (or are skipped when the reference is
  their whole point).
"""

from __future__ import annotations

import importlib.util
import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))            # the scripts import _common


def pytest_collection_modifyitems(config, items):
    expr = config.getoption("markexpr", "") or ""
    if "bench" in expr:
        return
    skip = pytest.mark.skip(reason="bench: opt-in, run with `pytest benchmarks -m bench`")
    for item in items:
        if "bench" in item.keywords:
            item.add_marker(skip)


def _photo_module():
    path = HERE.parent / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_datago_bench_images", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_corpus(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` photo-like images under ``root/p0..p3`` (JPEG mostly, some PNG)."""
    from PIL import Image
    photo = _photo_module().photo
    rng = np.random.default_rng(seed)
    for i in range(n):
        long_side = int(rng.integers(400, 1200))
        aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        w, h = (long_side, max(8, int(long_side / aspect))) if aspect >= 1 else \
            (max(8, int(long_side * aspect)), long_side)
        im = Image.fromarray(photo(w, h, seed=1000 + i))
        sub = root / f"p{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        if i % 10 == 3:
            im.save(buf, "PNG", compress_level=1)
            name = f"img_{i:06d}.png"
        else:
            kw = {"quality": int(rng.choice([75, 80, 85, 90, 95])),
                  "subsampling": int(rng.choice([0, 2, 2, 1])),
                  "progressive": bool(i % 12 == 5)}
            if i % 15 == 7:
                exif = Image.Exif()
                exif[0x0112] = int(rng.choice([6, 8, 3]))
                kw["exif"] = exif.tobytes()
            im.save(buf, "JPEG", **kw)
            name = f"img_{i:06d}.jpg"
        (sub / name).write_bytes(buf.getvalue())
    return root


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    given = os.environ.get("DATAGO_BENCH_CORPUS")
    if given:
        p = Path(given)
        if not p.is_dir():
            pytest.fail(f"DATAGO_BENCH_CORPUS={given}: not a folder")
        return p
    n = int(os.environ.get("DATAGO_BENCH_N", "40"))
    return make_corpus(tmp_path_factory.mktemp("bench_corpus"), n)


@pytest.fixture(scope="session")
def ref_venv():
    """The reference datago's venv, when $DATAGO_BENCH_REF_VENV names one."""
    v = os.environ.get("DATAGO_BENCH_REF_VENV")
    if v and (Path(v) / "bin" / "python").exists():
        return Path(v)
    return None


@pytest.fixture
def run_script(capsys):
    """``run_script("bench_x.py", [args])``: the script's ``main`` with those
    arguments (as ``sys.argv`` for the scripts whose ``main`` takes none), its
    output shown as it runs; returns what ``main`` returned."""
    def run(name: str, args):
        args = [str(a) for a in args]
        old_argv = sys.argv
        with capsys.disabled():
            print(f"\n===== python benchmarks/{name} {' '.join(args)}", flush=True)
            try:
                # by its own name (this folder is on sys.path), so that what it
                # hands to worker processes pickles
                mod = importlib.import_module(Path(name).stem)
                sys.argv = [str(HERE / name)] + args
                import inspect
                takes_argv = bool(inspect.signature(mod.main).parameters)
                return mod.main(args) if takes_argv else mod.main()
            finally:
                sys.argv = old_argv
    return run
