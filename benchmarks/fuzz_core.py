#!/usr/bin/env python
"""Fuzzing the image core: ``datago.decode``, ``datago.read_header`` and
``datago.decode_to_bucket`` on mutated JPEG/PNG/WebP/BMP/GIF/TIFF bytes.

    python benchmarks/fuzz_core.py --target decode --runs 1000000            # atheris
    python benchmarks/fuzz_core.py --target all --runs 1000000 --out fuzz.md
    python benchmarks/fuzz_core.py --target all --runs 3000 --engine builtin  # a smoke
    python benchmarks/fuzz_core.py --replay crash-1234 [--target T]           # run saved inputs
    python benchmarks/fuzz_core.py --minimize crash-1234 --target decode      # shrink one

Acceptable outcomes of a target: a result (checked: shapes and dtypes, the
header's size equals the decoded size, the bucket's shape; a decoded PNG's pixels
equal libspng's alone, ``_pipeline.decode_png_libspng``, the PNG fast path's
reference), ``DecodeError``, ``ImageTooLargeError`` or ``ValueError``.  Anything else is a finding: another
exception, a crash (a signal: segfault, abort, bus error), a hang (an input
that runs longer than ``--timeout`` seconds) or a broken invariant.  Findings
are saved under ``--crash-dir`` (default ``/tmp/datago_fuzz/crashes``) as
``<target>-<kind>-<sha1>``, to replay (``--replay``), shrink (``--minimize``)
and keep as a regression fixture in ``tests/test_fuzz_smoke.py``.

Seeds: small images generated like ``tests/conftest.py`` does (its ``photo``
generator), in the variants real files come in -- JPEG baseline/progressive/
optimized, 4:2:0/4:2:2/4:4:4, grey, CMYK, restart markers, EXIF orientation;
PNG grey/grey+alpha/RGB/RGBA/palette with tRNS, 1/8/16-bit, Adam7-interlaced,
eXIf before and after the image data; WebP lossy/lossless, BMP, GIF, TIFF --
plus every image file under ``tests/`` (fixtures) and ``--seed-dir``.

Engines:

* ``atheris`` (default when installed; ``pip install atheris``): libFuzzer
  driven, one subprocess per target (libFuzzer exits when done), restarted
  after a crash until ``--runs`` executions are done or ``--max-crashes``.  The
  mutator is libFuzzer's, half of the time followed or replaced by the
  structure-aware one below (and PNG chunk CRCs recomputed: the core checks
  them, so most blind PNG mutations would stop there).  Coverage (``cov``/``ft``)
  is libFuzzer's count over the Python code atheris instruments (``datago``'s
  Python layer, the Pillow fallback); the Cython core is native code that only
  counts when built with clang ``-fsanitize=fuzzer-no-link``, which this script
  does not do.  Its corpus persists in ``--work`` (default
  ``/tmp/datago_fuzz/<target>``): a second run continues from it.
* ``builtin`` (no dependency): a seeded havoc mutator -- bit flips, interesting
  bytes and integers, inserts, deletions, duplications, truncation, splicing,
  and structure-aware mutations (JPEG segments, SOF fields, dropped tables, odd
  APPn lengths, EXIF blocks; PNG chunks and IHDR fields with CRCs fixed, IDAT
  inflated, mutated and deflated again, eXIf chunks) -- with a little feedback:
  an input whose outcome (exception type and message shape, or the decoded
  format/shape) is new joins the corpus.  Execution ``i`` of a target is
  derived from ``(--seed, target, i)`` alone, so a run is reproducible.  The
  targets run in a forked child that writes every input to shared memory before
  running it; the parent turns a child's death into a saved crash input and
  starts a new child at the next execution.  "coverage" is the number of
  distinct outcomes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import mmap
import os
import random
import re
import select
import signal
import struct
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TARGETS = ("read_header", "decode", "decode_to_bucket")
MAX_PIXELS = 1 << 22             # mutated headers may claim any size: keep execs fast
MAX_LEN = 1 << 16
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class Finding(AssertionError):
    """A broken invariant (a result that is wrong, not an error)."""


# ============================================================================ targets

def _datago():
    import datago
    return datago


_BUCKETS = None


def _buckets():
    global _BUCKETS
    if _BUCKETS is None:
        _BUCKETS = _datago().make_buckets(64, 8, 0.25, 4.0)
    return _BUCKETS


def acceptable() -> tuple:
    d = _datago()
    return (d.DecodeError, d.ImageTooLargeError, ValueError)


def target_read_header(data: bytes) -> str:
    info = _datago().read_header(data)
    if not (info.width > 0 and info.height > 0 and 1 <= info.orientation <= 8):
        raise Finding(f"read_header gave {info}")
    return f"ok:{info.format}"


def target_decode(data: bytes) -> str:
    d = _datago()
    mode = ("RGB", "L", "RGBA")[len(data) % 3]
    arr = d.decode(data, mode=mode, max_pixels=MAX_PIXELS)
    c = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    if not (isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.ndim == 3
            and arr.shape[2] == c and arr.shape[0] > 0 and arr.shape[1] > 0):
        raise Finding(f"decode({mode}) gave {type(arr).__name__} "
                      f"{getattr(arr, 'shape', None)} {getattr(arr, 'dtype', None)}")
    # what the dataset relies on: the header's display size is the decoded size (a
    # header that fails where the pixels decode only leaves the file out of the plan)
    try:
        info = d.read_header(data)
    except d.DecodeError:
        return f"ok-but-header-fails:{mode}"
    h, w = info.display_size
    if arr.shape[:2] != (h, w):
        raise Finding(f"read_header says {w}x{h} (display), decode gave "
                      f"{arr.shape[1]}x{arr.shape[0]}")
    if info.format == "png":
        return f"ok:png:{mode}" + _png_matches_libspng(data, mode, arr)
    return f"ok:{info.format}:{mode}"


def _png_matches_libspng(data: bytes, mode: str, arr: np.ndarray) -> str:
    """A PNG ``decode`` read (through the fast path where it applies) must have
    libspng's pixels: ``_pipeline.decode_png_libspng`` is the reference.  Returns "".
    A file the fast path read and libspng refuses is a finding too: the fast path
    hands libspng everything libspng would refuse (``_png.png_scan``), so the two
    accept the same files."""
    from datago._core import _pipeline
    from datago.image import DEFAULT_BACKGROUND, _orient
    try:
        ref, orientation, _ = _pipeline.decode_png_libspng(data, mode, MAX_PIXELS,
                                                           bytes(DEFAULT_BACKGROUND))
    except acceptable() as e:
        raise Finding(f"PNG decode({mode}) read a file libspng alone refuses "
                      f"({type(e).__name__}: {e})") from None
    ref = _orient(ref, orientation)
    if ref.shape != arr.shape or not np.array_equal(ref, arr):
        raise Finding(f"PNG decode({mode}) and libspng alone (the reference) differ: "
                      f"{arr.shape} vs {ref.shape}")
    return ""


def target_decode_to_bucket(data: bytes) -> str:
    """As the engine calls it: the bucket from the header, the image written into a
    preallocated slot; or read as a label mask (``mask=True``, kept exactly)."""
    d = _datago()
    mask = len(data) % 2 == 1
    filt = ("triangle", "lanczos", "box", "nearest")[(len(data) // 2) % 4]
    mode = "L" if (len(data) // 8) % 3 == 0 else "RGB"
    info = d.read_header(data)
    bh, bw = d.nearest_bucket(*info.display_size, _buckets())
    dh, dw = info.display_size
    if mask:
        res = d.decode_to_bucket(data, bucket=(bh, bw), mask=True, max_pixels=MAX_PIXELS)
        img = res.image
        if not (img.ndim == 3 and img.shape[:2] == (bh, bw) and img.shape[2] in (1, 3)
                and img.dtype in (np.uint8, np.int32, np.uint16)):
            raise Finding(f"mask: {img.shape} {img.dtype} for bucket {bw}x{bh}")
    else:
        out = np.full((bh, bw, 1 if mode == "L" else 3), 7, np.uint8)
        res = d.decode_to_bucket(data, bucket=(bh, bw), out=out, mode=mode, filter=filt,
                                 max_pixels=MAX_PIXELS)
        if res.image is not out and not np.shares_memory(res.image, out):
            raise Finding("decode_to_bucket did not write into out")
        # and without out=, from the bucket list: the same pixels
        res2 = d.decode_to_bucket(data, _buckets(), mode=mode, filter=filt,
                                  max_pixels=MAX_PIXELS)
        if res2.image.shape != out.shape or not np.array_equal(res2.image, out):
            raise Finding("decode_to_bucket with and without out= differ")
    if tuple(res.bucket) != (bh, bw):
        raise Finding(f"bucket {res.bucket} != (height, width) {(bh, bw)}")
    if tuple(res.original_size) != (dh, dw):
        raise Finding(f"original_size {res.original_size} != header {(dh, dw)}")
    left, top, right, bottom = res.crop_box
    if not (-1e-6 <= left < right <= dw + 1e-6 and -1e-6 <= top < bottom <= dh + 1e-6):
        raise Finding(f"crop_box {res.crop_box} outside {dw}x{dh}")
    return f"ok:{info.format}:{'mask' if mask else mode}"


TARGET_FUNCS: Dict[str, Callable[[bytes], str]] = {
    "read_header": target_read_header,
    "decode": target_decode,
    "decode_to_bucket": target_decode_to_bucket,
}

_DIGITS = re.compile(r"\d+")
_QUOTED = re.compile(r"first bytes .*|b?'[^']*'|b?\"[^\"]*\"")   # bytes shown: not a new outcome


def outcome(target: str, data: bytes) -> Tuple[str, Optional[str]]:
    """(signature, finding text or None): run ``target`` on ``data``."""
    try:
        return TARGET_FUNCS[target](data), None
    except Finding as e:
        return "finding:" + _QUOTED.sub("'.'", _DIGITS.sub("N", str(e)))[:80], f"Finding: {e}"
    except acceptable() as e:
        msg = _QUOTED.sub("'.'", _DIGITS.sub("N", str(e)))[:60]
        return f"{type(e).__name__}:{msg}", None
    except Exception as e:                      # noqa: BLE001 - that is what we look for
        tb = traceback.format_exc(limit=6)
        last = traceback.extract_tb(e.__traceback__)[-1]
        where = f"{Path(last.filename).name}:{last.lineno}"
        return f"unexpected:{type(e).__name__}@{where}", f"{type(e).__name__}: {e}\n{tb}"


# ============================================================================ seeds

def _photo(w: int, h: int, seed: int) -> np.ndarray:
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from conftest import photo                      # the tests' generator
        return photo(w, h, seed)
    except Exception:                                   # noqa: BLE001 - standalone copy
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:h, 0:w]
        img = rng.uniform(40, 200, 3) + 60 * np.sin(xx[..., None] / 5.0) * np.cos(yy[..., None] / 3.0)
        return np.clip(img + rng.normal(0, 3, (h, w, 3)), 0, 255).astype(np.uint8)
    finally:
        sys.path.pop(0)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _tiff_orientation(value: int = 6, count: int = 1, typ: int = 3, offset: Optional[int] = None) -> bytes:
    """A little-endian TIFF (EXIF) block with one Orientation entry."""
    entry = struct.pack("<HHI", 0x0112, typ, count)
    entry += struct.pack("<I", offset) if offset is not None else struct.pack("<HH", value, 0)
    return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + entry + b"\x00\x00\x00\x00"


def _png_raw(arr: np.ndarray, color_type: int, bit_depth: int = 8, interlace: bool = False,
             extra_before: bytes = b"", extra_after: bytes = b"") -> bytes:
    """A PNG written by hand (16-bit RGB and Adam7 interlacing, which Pillow
    does not write).  ``arr``: (H, W, C) of uint8 or uint16."""
    h, w = arr.shape[:2]
    dt = ">u2" if bit_depth == 16 else "u1"
    a = arr.astype(dt)

    def rows(img):
        return b"".join(b"\x00" + img[y].tobytes() for y in range(img.shape[0]))

    if interlace:
        raw = b""
        for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4),
                               (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)):
            sub = a[y0::dy, x0::dx]
            if sub.shape[0] and sub.shape[1]:
                raw += rows(sub)
    else:
        raw = rows(a)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, int(interlace))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + extra_before
            + _png_chunk(b"IDAT", zlib.compress(raw, 6)) + extra_after + _png_chunk(b"IEND", b""))


def generated_seeds() -> List[Tuple[str, bytes]]:
    from PIL import Image
    out: List[Tuple[str, bytes]] = []

    def save(name, im, fmt, **kw):
        buf = io.BytesIO()
        try:
            im.save(buf, fmt, **kw)
        except (OSError, ValueError, KeyError, TypeError):
            return                                  # this Pillow build lacks it
        out.append((name, buf.getvalue()))

    rgb = Image.fromarray(_photo(37, 23, 1))
    small = Image.fromarray(_photo(16, 16, 2))
    exif = Image.Exif()
    exif[0x0112] = 6
    save("jpeg_420.jpg", rgb, "JPEG", quality=90)
    save("jpeg_444.jpg", rgb, "JPEG", quality=95, subsampling=0)
    save("jpeg_422.jpg", rgb, "JPEG", quality=75, subsampling=1)
    save("jpeg_progressive.jpg", rgb, "JPEG", quality=85, progressive=True)
    save("jpeg_optimized.jpg", rgb, "JPEG", quality=80, optimize=True)
    save("jpeg_q10.jpg", small, "JPEG", quality=10)
    save("jpeg_grey.jpg", rgb.convert("L"), "JPEG", quality=90)
    save("jpeg_cmyk.jpg", small.convert("CMYK"), "JPEG", quality=90)
    save("jpeg_exif6.jpg", rgb, "JPEG", quality=85, exif=exif.tobytes())
    save("jpeg_restart.jpg", rgb, "JPEG", quality=85, restart_marker_blocks=2)
    save("jpeg_icc.jpg", small, "JPEG", quality=85, icc_profile=b"\x00" * 200)
    grey = np.asarray(rgb.convert("L"))
    arr = np.asarray(rgb)
    save("png_rgb.png", rgb, "PNG", compress_level=1)
    save("png_rgba.png", Image.fromarray(np.dstack([arr, grey])), "PNG", compress_level=1)
    save("png_grey.png", Image.fromarray(grey), "PNG", compress_level=1)
    save("png_la.png", Image.merge("LA", [Image.fromarray(grey), Image.fromarray(255 - grey)]),
         "PNG")
    pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    save("png_palette_trns.png", pal, "PNG", transparency=3)
    save("png_1bit.png", rgb.convert("1"), "PNG")
    save("png_grey16.png", Image.fromarray(grey.astype(np.uint16) * 257 + 3), "PNG")
    labels = (np.arange(37 * 23).reshape(23, 37) % 7).astype(np.uint8)
    save("png_mask.png", Image.fromarray(labels), "PNG")
    rgb16 = arr.astype(np.uint16) * 257
    out.append(("png_rgb16.png", _png_raw(rgb16, 2, 16)))
    out.append(("png_adam7.png", _png_raw(arr, 2, 8, interlace=True)))
    out.append(("png_grey_adam7.png", _png_raw(grey[..., None], 0, 8, interlace=True)))
    exif_chunk = _png_chunk(b"eXIf", _tiff_orientation(6))
    out.append(("png_exif_before.png", _png_raw(arr, 2, extra_before=exif_chunk)))
    out.append(("png_exif_after.png", _png_raw(arr, 2, extra_after=exif_chunk)))
    out.append(("png_rgba_trns.png", _png_raw(np.dstack([arr, grey]), 6,
                                              extra_before=_png_chunk(b"gAMA", b"\x00\x00\xb1\x8f"))))
    # the ancillary chunks libspng checks (a suggested palette, its bKGD and hIST, text,
    # a profile, sPLT, tIME): mutating them finds what libspng refuses that the fast path reads
    z = zlib.compress(b"profile or text " * 8)
    extra = b"".join(_png_chunk(k, v) for k, v in (
        (b"gAMA", b"\x00\x00\xb1\x8f"), (b"iCCP", b"icc\x00\x00" + z), (b"PLTE", bytes(range(48))),
        (b"bKGD", b"\x00\x10\x00\x20\x00\x30"), (b"hIST", bytes(32)), (b"pHYs", bytes(9)),
        (b"sPLT", b"pal\x00\x08" + bytes(12)), (b"tEXt", b"Title\x00seed"),
        (b"zTXt", b"Comment\x00\x00" + z), (b"iTXt", b"Author\x00\x00\x00en\x00\x00name")))
    out.append(("png_ancillary.png", _png_raw(arr, 2, extra_before=extra,
                                              extra_after=_png_chunk(b"tIME", b"\x07\xe9\x01\x02\x03\x04\x05"))))
    save("webp_lossy.webp", rgb, "WEBP", quality=80)
    save("webp_lossless.webp", Image.fromarray(np.dstack([arr, grey])), "WEBP", lossless=True)
    save("bmp.bmp", small, "BMP")
    save("gif.gif", pal, "GIF")
    save("tiff.tif", small, "TIFF")
    return out


def fixture_seeds(extra: Iterable[Path] = ()) -> List[Tuple[str, bytes]]:
    """Image files under tests/ (fixtures) and the given folders."""
    out = []
    for root in [REPO / "tests", *extra]:
        if not root.is_dir():
            continue
        for p in sorted(root.rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and p.stat().st_size <= MAX_LEN:
                out.append((str(p.relative_to(root.parent)), p.read_bytes()))
    return out


def all_seeds(seed_dirs: Iterable[Path] = ()) -> List[Tuple[str, bytes]]:
    return generated_seeds() + fixture_seeds(seed_dirs)


# ============================================================================ mutator

INTERESTING8 = [0, 1, 2, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 129, 191, 192, 254, 255]
INTERESTING16 = [0, 1, 2, 8, 16, 255, 256, 257, 1023, 1024, 4096, 8192, 16383, 32767, 32768,
                 65534, 65535]
INTERESTING32 = [0, 1, 2, 8, 65535, 65536, 65537, 1 << 24, (1 << 31) - 1, 1 << 31,
                 (1 << 32) - 1, (1 << 32) - 2, 0x10000000, 0x7FFFFF00]
JPEG_MARKERS = [0xC0, 0xC1, 0xC2, 0xC4, 0xDB, 0xDD, 0xDA, 0xD9, 0xD8, 0xE0, 0xE1, 0xE2, 0xEE,
                0xFE, 0xCC, 0xC3, 0xC9, 0xD0, 0xD7, 0xFF]


def _rand_int(rng: random.Random, size: int) -> int:
    pool = {1: INTERESTING8, 2: INTERESTING16, 4: INTERESTING32}[size]
    v = rng.choice(pool)
    if rng.random() < 0.3:
        v = (v + rng.randint(-3, 3)) % (1 << (8 * size))
    return v


def _bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(n))


def _generic(rng: random.Random, b: bytearray, others: List[bytes]) -> None:
    n = len(b)
    op = rng.randrange(9)
    if n == 0:
        b.extend(_bytes(rng, rng.randint(1, 16)))
        return
    if op == 0:                                             # bit flips
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1:                                           # interesting bytes
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(n)] = rng.choice(INTERESTING8)
    elif op == 2:                                           # interesting integers
        size = rng.choice((2, 4))
        if n >= size:
            i = rng.randrange(n - size + 1)
            b[i:i + size] = _rand_int(rng, size).to_bytes(size, rng.choice(("big", "little")))
    elif op == 3:                                           # insert
        i = rng.randrange(n + 1)
        b[i:i] = _bytes(rng, rng.randint(1, 64)) if rng.random() < 0.5 else \
            bytes([rng.choice(INTERESTING8)]) * rng.randint(1, 256)
    elif op == 4:                                           # delete
        i = rng.randrange(n)
        del b[i:i + rng.randint(1, max(1, min(n - i, 256)))]
    elif op == 5:                                           # duplicate a range elsewhere
        i = rng.randrange(n)
        chunk = b[i:i + rng.randint(1, 512)]
        j = rng.randrange(n + 1)
        b[j:j] = chunk
    elif op == 6:                                           # truncate
        del b[rng.randrange(n):]
    elif op == 7 and others:                                # splice with another input
        o = rng.choice(others)
        i, j = rng.randrange(n + 1), rng.randrange(len(o) + 1)
        b[i:] = o[j:]
    else:                                                   # a random run
        i = rng.randrange(n)
        k = rng.randint(1, 32)
        b[i:i + k] = _bytes(rng, k)


# --- JPEG ---------------------------------------------------------------------

def jpeg_segments(b: bytes) -> List[Tuple[int, int, int]]:
    """(marker, start, end) of the marker segments before the scan data (and SOS)."""
    segs = []
    i = 2
    while i + 4 <= len(b) and b[i] == 0xFF:
        m = b[i + 1]
        if m in (0xD8, 0x01) or 0xD0 <= m <= 0xD7:
            segs.append((m, i, i + 2))
            i += 2
            continue
        if m == 0xD9:
            break
        ln = struct.unpack(">H", b[i + 2:i + 4])[0]
        segs.append((m, i, min(len(b), i + 2 + ln)))
        if m == 0xDA:
            break
        i += 2 + ln
    return segs


def _exif_app1(rng: random.Random) -> bytes:
    typ = rng.choice((3, 3, 3, 4, 1, 7, 0, 12, 65535))
    count = rng.choice((1, 1, 2, 0, 3, 1 << 16, (1 << 32) - 1))
    off = rng.choice((None, None, 0, 8, 26, 4096, 0xFFFFFFF0))
    tiff = _tiff_orientation(rng.randint(0, 10), count, typ, off)
    if rng.random() < 0.3:
        tiff = tiff[:rng.randrange(len(tiff) + 1)]
    if rng.random() < 0.2:
        tiff = b"MM\x00*" + tiff[4:]
    body = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", (len(body) + 2) & 0xFFFF) + body


def _jpeg(rng: random.Random, b: bytearray) -> None:
    segs = jpeg_segments(bytes(b))
    op = rng.randrange(7)
    if not segs or op == 0:                                 # insert an EXIF APP1 after SOI
        b[2:2] = _exif_app1(rng)
        return
    m, s, e = rng.choice(segs)
    if op == 1 and e - s > 4:                               # mutate inside a segment
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(s + 4, e) if e > s + 4 else s + 2
            b[i] = rng.choice(INTERESTING8) if rng.random() < 0.5 else rng.getrandbits(8)
    elif op == 2:                                           # drop a segment (DHT, DQT, ...)
        del b[s:e]
    elif op == 3:                                           # a bad length field
        if e - s >= 4:
            b[s + 2:s + 4] = struct.pack(">H", rng.choice((0, 1, 2, 3, e - s, e - s - 1,
                                                           65535, rng.getrandbits(16))))
    elif op == 4:                                           # SOF fields
        sof = [x for x in segs if x[0] in (0xC0, 0xC1, 0xC2, 0xC3, 0xC9)]
        if sof:
            _, s, e = sof[0]
            field = rng.choice(("prec", "h", "w", "nc", "comp"))
            if field == "prec" and s + 4 < len(b):
                b[s + 4] = rng.choice((0, 1, 8, 12, 16, 255))
            elif field in ("h", "w") and s + 9 <= len(b):
                at = s + 5 if field == "h" else s + 7
                b[at:at + 2] = struct.pack(">H", _rand_int(rng, 2))
            elif field == "nc" and s + 9 < len(b):
                b[s + 9] = rng.choice((0, 1, 2, 3, 4, 5, 255))
            elif s + 12 < len(b):                           # a component's sampling / table
                at = s + 10 + 3 * rng.randrange(3) + rng.choice((1, 2))
                if at < len(b):
                    b[at] = rng.choice((0x00, 0x11, 0x12, 0x21, 0x22, 0x44, 0x41, 0x14, 0xFF, 3, 4))
    elif op == 5:                                           # a short APPn right after SOI
        body = _bytes(rng, rng.randint(0, 8))
        ln = rng.choice((0, 1, 2, len(body) + 2))
        b[2:2] = bytes([0xFF, rng.choice((0xE0, 0xE1, 0xE2, 0xEE, 0xFE))]) + struct.pack(">H", ln) + body
    else:                                                   # a stray marker in the data
        i = rng.randint(min(segs[-1][2], len(b)), len(b))
        b[i:i] = bytes([0xFF, rng.choice(JPEG_MARKERS)])


# --- PNG ----------------------------------------------------------------------

def png_chunks(b: bytes) -> Optional[List[Tuple[bytes, bytes]]]:
    if not b.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    out, i = [], 8
    while i + 8 <= len(b):
        n = struct.unpack(">I", b[i:i + 4])[0]
        kind = b[i + 4:i + 8]
        data = b[i + 8:i + 8 + n]
        out.append((kind, data))
        i += 12 + n
        if kind == b"IEND":
            break
    return out


def png_build(chunks: List[Tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(_png_chunk(k, d) for k, d in chunks)


def fix_png_crcs(b: bytes) -> bytes:
    """Recompute every chunk's CRC (the core rejects bad ones in critical chunks)."""
    chunks = png_chunks(b)
    if not chunks:
        return b
    rebuilt = png_build(chunks)
    end = 8 + sum(12 + len(d) for _, d in chunks)
    return rebuilt + b[end:] if end < len(b) else rebuilt


def _png(rng: random.Random, b: bytearray, others: List[bytes]) -> None:
    chunks = png_chunks(bytes(b))
    if not chunks:
        return
    op = rng.randrange(7)
    k = rng.randrange(len(chunks))
    kind, data = chunks[k]
    if op == 0:                                             # IHDR fields
        ih = [i for i, (kd, _) in enumerate(chunks) if kd == b"IHDR"]
        if ih and len(chunks[ih[0]][1]) >= 13:
            d = bytearray(chunks[ih[0]][1])
            f = rng.randrange(6)
            if f == 0:
                d[0:4] = struct.pack(">I", _rand_int(rng, 4))
            elif f == 1:
                d[4:8] = struct.pack(">I", _rand_int(rng, 4))
            elif f == 2:
                d[8] = rng.choice((0, 1, 2, 4, 8, 16, 3, 32, 255))
            elif f == 3:
                d[9] = rng.choice((0, 2, 3, 4, 6, 1, 5, 7, 255))
            elif f == 4:
                d[12] = rng.choice((0, 1, 2))
            else:
                d[10 + rng.randrange(2)] = rng.choice((0, 1, 255))
            chunks[ih[0]] = (b"IHDR", bytes(d))
    elif op == 1:                                           # inflate IDAT, mutate, deflate
        idat = b"".join(d for kd, d in chunks if kd == b"IDAT")
        try:
            raw = bytearray(zlib.decompress(idat))
        except zlib.error:
            raw = bytearray(idat)
        for _ in range(rng.randint(1, 3)):
            _generic(rng, raw, [])
        if raw and rng.random() < 0.3:                      # odd filter types
            raw[rng.randrange(len(raw))] = rng.choice((0, 1, 2, 3, 4, 5, 255))
        new = zlib.compress(bytes(raw), rng.choice((0, 1, 6, 9)))
        first = next(i for i, (kd, _) in enumerate(chunks) if kd == b"IDAT") \
            if any(kd == b"IDAT" for kd, _ in chunks) else len(chunks) - 1
        chunks = [c for c in chunks if c[0] != b"IDAT"]
        if rng.random() < 0.3 and len(new) > 2:             # split over several IDATs
            cut = rng.randrange(1, len(new))
            chunks[first:first] = [(b"IDAT", new[:cut]), (b"IDAT", new[cut:])]
        else:
            chunks.insert(first, (b"IDAT", new))
    elif op == 2:                                           # mutate a chunk's data
        d = bytearray(data)
        _generic(rng, d, [])
        chunks[k] = (kind, bytes(d))
    elif op == 3:                                           # drop / duplicate / swap chunks
        r = rng.randrange(3)
        if r == 0 and len(chunks) > 1:
            del chunks[k]
        elif r == 1:
            chunks.insert(rng.randrange(len(chunks) + 1), chunks[k])
        else:
            j = rng.randrange(len(chunks))
            chunks[k], chunks[j] = chunks[j], chunks[k]
    elif op == 4:                                           # an eXIf chunk, anywhere
        e = bytearray(_exif_app1(rng)[10:])                 # the TIFF block
        if rng.random() < 0.3:
            _generic(rng, e, [])
        chunks.insert(rng.randrange(1, len(chunks) + 1), (b"eXIf", bytes(e)))
    elif op == 5:                                           # PLTE / tRNS of odd sizes
        kind2 = rng.choice((b"PLTE", b"tRNS", b"sBIT", b"gAMA", b"iCCP", b"acTL", b"fcTL"))
        size = rng.choice((0, 1, 2, 3, 6, 255, 768, 769))
        chunks.insert(rng.randint(1, len(chunks)), (kind2, _bytes(rng, size)))
    else:                                                   # a chunk length that lies
        raw = bytearray(png_build(chunks))
        offs, i = [], 8
        for _, d in chunks:
            offs.append(i)
            i += 12 + len(d)
        o = rng.choice(offs)
        raw[o:o + 4] = struct.pack(">I", _rand_int(rng, 4))
        b[:] = raw
        return
    b[:] = png_build(chunks)


def mutate(rng: random.Random, data: bytes, others: List[bytes], max_len: int = MAX_LEN) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        r = rng.random()
        try:
            if r < 0.35 and b[:2] == b"\xff\xd8":
                _jpeg(rng, b)
            elif r < 0.35 and b[:4] == b"\x89PNG":
                _png(rng, b, others)
            else:
                _generic(rng, b, others)
        except (ValueError, IndexError, struct.error, StopIteration, OverflowError):
            _generic(rng, b, others)                    # a structure that did not parse
    if b[:4] == b"\x89PNG" and rng.random() < 0.8:
        b = bytearray(fix_png_crcs(bytes(b)))
    return bytes(b[:max_len])


# ============================================================================ builtin engine

class Result:
    def __init__(self, target: str, engine: str):
        self.target = target
        self.engine = engine
        self.execs = 0
        self.seconds = 0.0
        self.coverage = ""                       # atheris: "cov N ft M"; builtin: outcomes
        self.corpus = 0
        self.findings: List[dict] = []           # {"kind", "detail", "path", "input"}
        self.outcomes: Dict[str, int] = {}
        self.restarts = 0

    def row(self) -> str:
        kinds: Dict[str, int] = {}
        for f in self.findings:
            kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
        found = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())) or "none"
        rate = self.execs / self.seconds if self.seconds else 0.0
        return (f"| {self.target} | {self.engine} | {self.execs:,} | {rate:,.0f} | "
                f"{self.coverage} | {self.corpus} | {found} |")


def _save(crash_dir: Path, target: str, kind: str, data: bytes) -> Path:
    crash_dir.mkdir(parents=True, exist_ok=True)
    p = crash_dir / f"{target}-{kind}-{hashlib.sha1(data).hexdigest()[:16]}"
    p.write_bytes(data)
    return p


def _exec_rng(seed: int, target: str, i: int) -> random.Random:
    h = hashlib.blake2b(f"{seed}:{target}:{i}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(h, "little"))


def _child(target: str, seeds: List[bytes], start: int, runs: int, seed: int, shm: mmap.mmap,
           wfd: int, max_len: int, max_findings: int) -> None:
    """Forked: run executions start..runs-1; report through ``wfd`` (JSON lines)."""
    import resource
    try:
        soft = 8 << 30
        resource.setrlimit(resource.RLIMIT_AS, (soft, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        pass
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    import warnings
    warnings.simplefilter("ignore")                     # Pillow's "corrupt EXIF" and such
    out = os.fdopen(wfd, "w", buffering=1)
    corpus = list(seeds)
    seen: Dict[str, int] = {}
    t_report = time.monotonic()
    findings = 0
    executed = start
    for s in seeds:                                    # the seeds first, as is
        sig, _ = outcome(target, s)
        seen[sig] = seen.get(sig, 0) + 1
    for i in range(start, runs):
        rng = _exec_rng(seed, target, i)
        data = mutate(rng, rng.choice(corpus), corpus, max_len)
        shm.seek(0)
        shm.write(struct.pack("<QI", i, len(data)) + data)
        sig, finding = outcome(target, data)
        executed = i + 1
        if sig not in seen:
            seen[sig] = 0
            if len(corpus) < 4000:
                corpus.append(data)
        seen[sig] += 1
        if finding is not None and seen[sig] == 1:      # a new kind: reported once
            findings += 1
            out.write(json.dumps({"finding": finding, "sig": _describe(sig, finding), "i": i,
                                  "input": data.hex()}) + "\n")
            if findings >= max_findings:
                break
        now = time.monotonic()
        if now - t_report > 1.0:
            out.write(json.dumps({"progress": i + 1}) + "\n")
            t_report = now
    out.write(json.dumps({"done": True, "execs": executed, "outcomes": seen,
                          "corpus": len(corpus)}) + "\n")
    out.flush()


def run_builtin(target: str, runs: int, seed: int = 0, seeds: Optional[List[bytes]] = None,
                crash_dir: Path = Path("/tmp/datago_fuzz/crashes"), timeout: float = 10.0,
                max_len: int = MAX_LEN, max_findings: int = 20,
                log: Callable[[str], None] = lambda s: None) -> Result:
    """``runs`` mutated executions of ``target`` in forked children (see the module
    docstring); a child's death or hang becomes a finding and a new child goes on."""
    _datago()                                           # import before forking
    if seeds is None:
        seeds = [d for _, d in all_seeds()]
    res = Result(target, "builtin")
    shm = mmap.mmap(-1, max_len + 64)
    t0 = time.perf_counter()
    start = 0
    outcomes: Dict[str, int] = {}
    while start < runs and len(res.findings) < max_findings:
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:                                    # child
            code = 0
            try:
                os.close(rfd)
                _child(target, seeds, start, runs, seed, shm, wfd, max_len,
                       max_findings - len(res.findings))
            except BaseException:                       # noqa: BLE001
                traceback.print_exc()
                code = 70
            finally:
                os._exit(code)
        os.close(wfd)
        buf = b""
        last_progress = time.monotonic()
        last_i = -1
        done = None
        status = None
        with os.fdopen(rfd, "rb", buffering=0) as r:
            while True:
                ready, _, _ = select.select([r], [], [], 0.25)
                if ready:
                    chunk = r.read(1 << 16)
                    if not chunk:
                        break
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        msg = json.loads(line)
                        if "finding" in msg:
                            data = bytes.fromhex(msg["input"])
                            p = _save(crash_dir, target, msg["sig"].split(":")[0], data)
                            res.findings.append({"kind": msg["sig"].split(":")[0],
                                                 "sig": msg["sig"], "detail": msg["finding"],
                                                 "path": str(p), "input": data})
                            log(f"[{target}] finding at exec {msg['i']}: "
                                f"{msg['finding'].splitlines()[0]} -> {p}")
                        elif "progress" in msg:
                            res.execs = msg["progress"]
                        elif "done" in msg:
                            done = msg
                # hang check: the execution counter in shared memory
                i = struct.unpack("<Q", shm[:8])[0]
                now = time.monotonic()
                if i != last_i:
                    last_i, last_progress = i, now
                elif now - last_progress > timeout:
                    os.kill(pid, signal.SIGKILL)
                    status = "timeout"
            _, wstatus = os.waitpid(pid, 0)
        i, n = struct.unpack("<QI", shm[:12])
        if done is not None:
            for k, v in done["outcomes"].items():
                outcomes[k] = outcomes.get(k, 0) + v
            res.corpus = max(res.corpus, done["corpus"])
            res.execs = done["execs"]
            break
        data = bytes(shm[12:12 + n])
        if status != "timeout":
            if os.WIFSIGNALED(wstatus):
                status = f"crash-{signal.Signals(os.WTERMSIG(wstatus)).name}"
            elif os.WEXITSTATUS(wstatus) == 70:
                raise RuntimeError(f"fuzz_core: the harness itself failed in {target} at exec "
                                   f"{i} (traceback above)")
            else:
                status = f"exit-{os.WEXITSTATUS(wstatus)}"
        p = _save(crash_dir, target, status, data)
        res.findings.append({"kind": status, "sig": status, "detail": f"{status} at exec {i}",
                             "path": str(p), "input": data})
        log(f"[{target}] {status} at exec {i} ({n} bytes) -> {p}")
        res.restarts += 1
        start = i + 1
        res.execs = start
    res.seconds = time.perf_counter() - t0
    res.outcomes = outcomes
    res.coverage = f"{len(outcomes)} outcomes"
    shm.close()
    return res


# ============================================================================ atheris engine

def _atheris_child(target: str, argv: List[str]) -> None:
    """Run libFuzzer on ``target`` in this process (it exits when done).  Findings
    whose signature is in ``$DATAGO_FUZZ_KNOWN`` (one per line) were reported by
    an earlier child of this run: they pass, so the fuzzing goes on."""
    import atheris
    import warnings
    warnings.simplefilter("ignore")
    with atheris.instrument_imports(include=["datago"]):
        import datago  # noqa: F401
        import datago.image  # noqa: F401
        import datago._fallback  # noqa: F401
    known = set()
    if os.environ.get("DATAGO_FUZZ_KNOWN") and os.path.exists(os.environ["DATAGO_FUZZ_KNOWN"]):
        known = set(Path(os.environ["DATAGO_FUZZ_KNOWN"]).read_text().splitlines())

    def test_one_input(data: bytes) -> None:
        sig, finding = outcome(target, data)
        if finding is not None and _key(_describe(sig, finding)) not in known:
            raise RuntimeError(f"fuzz finding: {finding}")

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.5:
            out = atheris.Mutate(data, max_size)
            if out[:4] == b"\x89PNG" and rng.random() < 0.8:
                out = fix_png_crcs(out)
            return out[:max_size]
        return mutate(rng, data, [], max_size)

    atheris.Setup([sys.argv[0]] + argv, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


_STAT = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
_PROGRESS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)(?: corp: (\d+))?")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


def run_atheris(target: str, runs: int, seed: int, seeds: List[Tuple[str, bytes]], work: Path,
                crash_dir: Path, timeout: float, max_len: int, max_crashes: int,
                log: Callable[[str], None] = print) -> Result:
    res = Result(target, "atheris")
    corpus = work / target / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for name, data in seeds:
        (corpus / f"seed-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)
    crash_dir.mkdir(parents=True, exist_ok=True)
    known_file = work / target / "known-findings.txt"
    known_file.write_text("")
    known: Dict[str, int] = {}
    t0 = time.perf_counter()
    done = 0
    attempt = 0
    cov = ft = 0
    while done < runs and len(res.findings) < max_crashes:
        args = [str(corpus), f"-runs={runs - done}", f"-max_len={max_len}",
                f"-timeout={int(timeout)}", "-rss_limit_mb=4096", "-print_final_stats=1",
                f"-seed={seed + attempt}", f"-artifact_prefix={crash_dir}/{target}-"]
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_atheris-child", target, "--",
               *args]
        env = dict(os.environ, DATAGO_FUZZ_KNOWN=str(known_file))
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=env)
        executed = None
        last_hash = 0
        artifact = None
        for line in p.stdout:
            m = _PROGRESS.match(line)
            if m:
                last_hash = int(m.group(1))
                cov, ft = int(m.group(2)), int(m.group(3))
                res.corpus = int(m.group(4) or res.corpus)
                if "DONE" in line or "pulse" in line or last_hash % 100000 < 2:
                    log(f"[{target}] {line.rstrip()}")
            elif (m := _STAT.search(line)):
                executed = int(m.group(1))
            elif (m := _ARTIFACT.search(line)):
                artifact = m.group(1)
                log(f"[{target}] {line.rstrip()}")
            elif "fuzz finding [" in line or "deadly signal" in line or "libFuzzer: " in line:
                log(f"[{target}] {line.rstrip()}")
        p.wait()
        executed = executed if executed is not None else last_hash
        done += max(executed, 1)
        attempt += 1
        if artifact:
            data = Path(artifact).read_bytes()
            sig = _run_forked(target, data, timeout)
            key = _key(sig)
            if key not in known:
                res.findings.append({"kind": sig.split(":")[0], "sig": sig,
                                     "detail": sig if _is_bad(sig) else
                                     f"libFuzzer artifact (exit {p.returncode}), not reproduced: {sig}",
                                     "path": artifact, "input": data})
            known[key] = known.get(key, 0) + 1
            known_file.write_text("\n".join(known) + "\n")
            # an input that kills the process stays out of the corpus (else every
            # restart would stop on it while reading the corpus)
            h = hashlib.sha1(data).hexdigest()
            for f in corpus.iterdir():
                if f.stat().st_size == len(data) and hashlib.sha1(f.read_bytes()).hexdigest() == h:
                    f.unlink()
            res.restarts += 1
            if known[key] > 5 and sig.startswith(("crash-", "timeout")):
                log(f"[{target}] the same crash again: stopping this target")
                break
        elif p.returncode != 0:
            log(f"[{target}] libFuzzer exited with {p.returncode} without an artifact")
            break
    res.execs = done
    res.seconds = time.perf_counter() - t0
    res.coverage = f"cov {cov} ft {ft}"
    return res


# ============================================================================ replay / minimize

def _describe(sig: str, finding: Optional[str]) -> str:
    """One line for an outcome: its signature, or the finding's first line."""
    if finding is None:
        return sig
    first = finding.splitlines()[0]
    if sig.startswith("finding:"):
        return "finding:" + first.replace("Finding: ", "", 1)
    return f"{sig}: {first}"


def _run_forked(target: str, data: bytes, timeout: float) -> str:
    """The outcome signature of one input, in a child ("crash-SIG", "timeout")."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        try:
            import warnings
            warnings.simplefilter("ignore")
            os.write(wfd, _describe(*outcome(target, data)).encode()[:4000])
        finally:
            os._exit(0)
    os.close(wfd)
    ready, _, _ = select.select([rfd], [], [], timeout)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(rfd)
        return "timeout"
    with os.fdopen(rfd, "rb") as r:
        text = r.read().decode(errors="replace")
    _, st = os.waitpid(pid, 0)
    if os.WIFSIGNALED(st):
        return f"crash-{signal.Signals(os.WTERMSIG(st)).name}"
    return text


def _is_bad(sig: str) -> bool:
    return sig.startswith(("crash-", "timeout", "finding:", "unexpected:"))


def _key(sig: str) -> str:
    return _DIGITS.sub("N", sig)[:60]


def minimize(target: str, data: bytes, timeout: float = 10.0,
             log: Callable[[str], None] = print) -> bytes:
    """Shrink ``data`` while ``target`` fails the same way: the tail cut first
    (bisection), then ranges removed, halving their size (ddmin).  Python-level
    failures are rerun in this process, crashes and hangs in a forked child."""
    want = _run_forked(target, data, timeout)
    if not _is_bad(want):
        raise SystemExit(f"{target}: this input does not fail ({want})")
    key = _key(want)
    forked = want.startswith(("crash-", "timeout"))
    import warnings
    warnings.simplefilter("ignore")

    png = data.startswith(b"\x89PNG")

    def same(cand: bytes) -> bool:
        if png:
            cand = fix_png_crcs(cand)
        if forked:
            return _key(_run_forked(target, cand, timeout)) == key
        return _key(_describe(*outcome(target, cand))) == key

    log(f"minimizing {len(data)} bytes, failure {key!r}")
    lo, hi = 1, len(data)                      # shortest failing prefix
    while lo < hi:
        mid = (lo + hi) // 2
        if same(data[:mid]):
            hi = mid
        else:
            lo = mid + 1
    data = data[:hi]
    chunk = max(1, len(data) // 2)
    while chunk >= 1:
        start, shrunk = 0, False
        while start < len(data):
            cand = data[:start] + data[start + chunk:]
            if cand and same(cand):
                data, shrunk = cand, True
            else:
                start += chunk
        if not shrunk:
            chunk //= 2
    if png:
        data = fix_png_crcs(data)
    log(f"minimized to {len(data)} bytes: {data.hex()}")
    return data


# ============================================================================ main

def _report(results: List[Result], argv: List[str], seeds: int) -> str:
    import datago
    lines = ["| target | engine | execs | exec/s | coverage | corpus | findings |",
             "|---|---|---:|---:|---|---:|---|"] + [r.row() for r in results]
    notes = [f"- command: `python benchmarks/fuzz_core.py {' '.join(argv)}`",
             f"- datago {datago.__version__}, {seeds} seeds, max_pixels {MAX_PIXELS:,}"]
    for r in results:
        for f in r.findings:
            notes.append(f"- {r.target}: {f['kind']}: {f['detail'].splitlines()[0][:200]} "
                         f"({len(f['input'])} bytes, {f['path']})")
    return "\n".join(lines + [""] + notes)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--_atheris-child"]:
        _atheris_child(argv[1], argv[3:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="all", choices=TARGETS + ("all",))
    ap.add_argument("--runs", type=int, default=100_000, help="executions per target")
    try:
        import atheris  # noqa: F401
        default_engine = "atheris"
    except ImportError:
        default_engine = "builtin"
    ap.add_argument("--engine", choices=("atheris", "builtin"), default=default_engine,
                    help=f"default here: {default_engine}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seed-dir", type=Path, action="append", default=[],
                    help="more seed files (images up to 64 KiB, recursive)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per input")
    ap.add_argument("--max-len", type=int, default=MAX_LEN)
    ap.add_argument("--max-crashes", type=int, default=20, help="stop a target after this many")
    ap.add_argument("--work", type=Path, default=Path("/tmp/datago_fuzz"))
    ap.add_argument("--crash-dir", type=Path, default=None,
                    help="where findings are written (default WORK/crashes)")
    ap.add_argument("--replay", type=Path, nargs="+", help="run the target(s) on these inputs")
    ap.add_argument("--minimize", type=Path, help="shrink this failing input for --target")
    ap.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = ap.parse_args(argv)
    crash_dir = args.crash_dir or args.work / "crashes"
    targets = list(TARGETS) if args.target == "all" else [args.target]

    if args.replay:
        bad = 0
        for path in args.replay:
            data = path.read_bytes()
            for t in targets:
                sig = _run_forked(t, data, args.timeout)
                bad += _is_bad(sig)
                print(f"{path.name}: {t}: {sig}")
        return 1 if bad else 0
    if args.minimize:
        if args.target == "all":
            ap.error("--minimize needs one --target")
        small = minimize(args.target, args.minimize.read_bytes(), args.timeout,
                         log=lambda m: print(m, flush=True))
        out = args.minimize.with_name(args.minimize.name + ".min")
        out.write_bytes(small)
        print(f"wrote {out}")
        return 0

    seeds = all_seeds(args.seed_dir)
    print(f"{len(seeds)} seeds ({sum(len(d) for _, d in seeds):,} bytes), targets {targets}, "
          f"engine {args.engine}, {args.runs:,} runs each", flush=True)
    results = []
    for t in targets:
        if args.engine == "atheris":
            r = run_atheris(t, args.runs, args.seed, seeds, args.work, crash_dir, args.timeout,
                            args.max_len, args.max_crashes)
        else:
            r = run_builtin(t, args.runs, args.seed, [d for _, d in seeds], crash_dir,
                            args.timeout, args.max_len, args.max_crashes,
                            log=lambda s: print(s, flush=True))
        results.append(r)
        print(f"{t}: {r.execs:,} execs in {r.seconds:.1f} s, coverage {r.coverage}, "
              f"{len(r.findings)} finding(s)", flush=True)
    report = _report(results, argv, len(seeds))
    print("\n" + report)
    if args.out:
        args.out.write_text(report + "\n")
        print(f"wrote {args.out}")
    return 1 if any(r.findings for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
