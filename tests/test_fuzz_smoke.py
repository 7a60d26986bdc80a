"""A short fuzzing smoke of the image core (``benchmarks/fuzz_core.py``'s builtin
mutator, no atheris needed): a few thousand mutated JPEG/PNG/WebP/BMP/GIF/TIFF
inputs per target through ``read_header``, ``decode`` and ``decode_to_bucket``
(as the engine calls it); anything but a result, ``DecodeError``,
``ImageTooLargeError`` or ``ValueError`` fails -- another exception, a crash, a
hang or a broken invariant.  Each run is reproducible (seeded), and runs in a
forked child, so a crash is reported with its input instead of taking pytest
down.  Inputs the long runs found are kept below as regression fixtures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import datago

pytestmark = pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")

RUNS = 4000                      # per target; ~1 s each


def _fuzz_core():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "fuzz_core.py"
    spec = importlib.util.spec_from_file_location("fuzz_core", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_core", mod)
    spec.loader.exec_module(mod)
    return sys.modules["fuzz_core"]


fc = _fuzz_core()

# Findings already reported and waiting for a fix: the start of their signature
# (as fuzz_core._key gives it) -> what is wrong.  The smoke tolerates these (the
# regression fixtures below pin them); anything else fails it.
KNOWN: dict = {}          # findings tolerated while a fix is pending (none now)

# Regression fixtures: minimized inputs the fuzzer found -> the datago functions
# that must raise DecodeError on them (every target must in any case end in an
# acceptable outcome).
REGRESSIONS = {
    # SOF0 declaring 0 x 65533 (width 0): read_header returned width=0, which
    # nearest_bucket rejects with a plain ValueError -- in streaming mode that
    # ended the epoch instead of counting the file
    "jpeg_sof_width_0": (bytes.fromhex("ffd8ffc0001408fffd0000"), ("read_header",)),
    # TIFF whose StripOffsets (0x0111) entry has type UNDEFINED (7) / RATIONAL (5):
    # Pillow's load() raises TypeError, which datago._fallback.decode does not map
    # to DecodeError, so it escaped decode() and decode_to_bucket() (and ended an
    # epoch: the engine counts only DecodeError)
    "tiff_strip_offsets_undefined": (bytes.fromhex(
        "49492a00080000000afe0001040001000000100000000101040001000000100000000201030003000000"
        "8600000003010300010000000100000006010300010000000200000011010700010000008c0000001501"
        "030001000000030000001601040001000000100000001701040001000000000300001c01030001000000"
        "0100000000000000080008000800"), ("decode", "decode_to_bucket")),
    # found by the 1M-execution run: StripOffsets of type ASCII; Pillow's TypeError
    # escaped from the mask path (decode_to_bucket(mask=True)), which read TIFFs
    # through Pillow without mapping its errors
    "tiff_strip_offsets_ascii_mask": (bytes.fromhex(
        "49492a00080000000a00000104000100000010000000010104000100000010000000020103000300000086"
        "00000003010300010000000100000006010300010000000200000011010200010000008c00000015010300"
        "01000000030000001601040001000000100000001701040001000000000300001c01030001000000010000"
        "00000000000800080008004c5aaa565eb14959ac3d58ac415cb34362ba365bb82f58b82c64be2673ca1077"
        "ca0773ca1971d21d6c2010"), ("decode", "decode_to_bucket")),
    "tiff_strip_offsets_rational": (bytes.fromhex(
        "49492a00080000000a0000010400010000001000000001010400010000001000000002010300030000008"
        "600000003010300010000000100000006010300010000000200000011010500010000008c000000150103"
        "0001000000030000001601040001000000100000001701040001000000000300001c0103000100000001"
        "000000000000000800080008004c5aaa565eb14959"), ("decode", "decode_to_bucket")),
}
PENDING: dict = {}        # regression fixtures whose fix is pending (none now)


def _known(sig: str) -> bool:
    return any(fc._key(sig).startswith(k) for k in KNOWN)


@pytest.fixture(scope="module")
def seeds():
    s = fc.all_seeds()
    assert len(s) >= 25
    return [d for _, d in s]


def test_seeds_decode(seeds):
    """Every seed is a valid image for every target (else the fuzzing starts from
    errors and says little)."""
    for data in seeds:
        for target in fc.TARGETS:
            sig, finding = fc.outcome(target, data)
            assert finding is None and sig.startswith("ok"), (target, sig, data[:16])


@pytest.mark.parametrize("target", fc.TARGETS)
def test_fuzz_smoke(target, seeds, tmp_path):
    res = fc.run_builtin(target, RUNS, seed=0, seeds=seeds, crash_dir=tmp_path, timeout=10.0)
    assert res.execs == RUNS or res.findings
    new = [f for f in res.findings if not _known(f["sig"])]
    assert not new, "\n\n".join(
        f"{f['kind']}: {f['detail'][:2000]}\ninput ({len(f['input'])} bytes, saved as "
        f"{f['path']}): {f['input'][:256].hex()}" for f in new)
    assert len(res.outcomes) > 10                   # the mutations reach many code paths


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_regression_fixture(name):
    data, must_raise = REGRESSIONS[name]
    try:
        for target in fc.TARGETS:
            sig = fc._run_forked(target, data, timeout=10.0)
            assert not fc._is_bad(sig), (target, sig)
        for fn in must_raise:
            with pytest.raises(datago.DecodeError):
                (datago.decode_to_bucket(data, bucket=(64, 64)) if fn == "decode_to_bucket"
                 else getattr(datago, fn)(data))
    except (AssertionError, pytest.fail.Exception):
        if name in PENDING:
            pytest.xfail(PENDING[name])
        raise
