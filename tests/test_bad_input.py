"""Every bad input gets the documented exception; nothing crashes.

Contract (datago.image): corrupt, truncated, empty or unsupported data raises
``DecodeError`` (a ``ValueError``) whose message names the format and the cause;
a partially decoded image is never returned.  ``max_pixels`` is checked from the
header (``ImageTooLargeError``, a ``DecodeError``).  Bad arguments raise
``ValueError``, non-bytes data ``TypeError``.

All inputs are generated here.  The last test re-runs a sample of the bad inputs
and then decodes a good image: if anything above had crashed the interpreter,
pytest would have died with it.

datago keeps one decoder state per thread (``_pipeline._State``).  Every test but
the last runs in a thread of its own (``isolated`` below), so that an input that
leaves the thread's decoder broken is reported by the test of that input
(``test_jpeg_error_does_not_break_next_decode``) instead of making every later
test fail; the final survival test runs in the main thread on purpose.
"""

from __future__ import annotations

import functools
import struct
import threading
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

import datago
from datago import DecodeError, ImageTooLargeError
from conftest import encode, photo

# Regexes for messages: the format name, and some word saying what went wrong.
JPEG_RE = r"(?i)\bjpe?g\b"
PNG_RE = r"(?i)\bpng\b"
CAUSE_RE = (r"(?i)(truncat|premature|end of (data|file|stream)|\beof\b|incomplete|missing|short|"
            r"corrupt|bogus|invalid|bad|unexpected|not enough|unsupported|unrecogni[sz]ed|"
            r"marker|huffman|crc|checksum|zlib|inflate|deflate|adler|wrong|error|damaged|"
            r"empty|not (supported|defined|allowed)|undefined|exceed|overflow|out of range|too (large|big|long))")
TRUNC_RE = r"(?i)(truncat|premature|end of|\beof\b|incomplete|missing|short|not enough|unexpected)"
CRC_RE = r"(?i)(crc|checksum)"


def _msg(excinfo) -> str:
    return str(excinfo.value)


def expect_decode_error(data, fmt_re=None, cause_re=CAUSE_RE, *, bucket=True, allow_too_large=False):
    """decode (every mode) and decode_to_bucket raise DecodeError naming format and cause."""
    calls = [("decode", lambda: datago.decode(data)),
             ("decode-L", lambda: datago.decode(data, mode="L")),
             ("decode-RGBA", lambda: datago.decode(data, mode="RGBA"))]
    if bucket:
        calls.append(("decode_to_bucket", lambda: datago.decode_to_bucket(data, bucket=(64, 64))))
    for name, call in calls:
        try:
            res = call()
        except DecodeError as e:
            msg = str(e)
            if not allow_too_large:
                assert not isinstance(e, ImageTooLargeError), \
                    f"{name}: small corrupt file reported as too large: {msg!r}"
            if fmt_re is not None:
                assert _search(fmt_re, msg), f"{name}: message does not name the format: {msg!r}"
            if cause_re is not None:
                assert _search(cause_re, msg), f"{name}: message gives no cause: {msg!r}"
        except BaseException as e:  # noqa: BLE001 - we want to report the wrong type
            raise AssertionError(f"{name}: expected DecodeError, got {type(e).__name__}: {e}") from e
        else:
            shape = getattr(res, "shape", None) or getattr(getattr(res, "image", None), "shape", None)
            raise AssertionError(f"{name}: expected DecodeError, but it returned an image of shape {shape}")


def _search(pattern, text):
    import re
    return re.search(pattern, text) is not None


# --------------------------------------------------------------------------- sample files

def _good_jpeg(progressive=False, **kw) -> bytes:
    return encode(photo(96, 64, seed=1), "JPEG", quality=90, progressive=progressive, **kw)


def _good_png(**kw) -> bytes:
    return encode(photo(96, 64, seed=2), "PNG", **kw)


def jpeg_segments(data: bytes):
    """[(marker, offset, total_length)] up to and including the first SOS; then scan start/end."""
    segs = []
    i = 2
    while i < len(data):
        assert data[i] == 0xFF, i
        m = data[i + 1]
        if m == 0xD9:
            break
        ln = struct.unpack(">H", data[i + 2: i + 4])[0]
        segs.append((m, i, ln + 2))
        i += ln + 2
        if m == 0xDA:
            break
    return segs, i


def jpeg_scan(data: bytes):
    """(start, end) of the first scan's entropy-coded data (end = next marker)."""
    segs, start = jpeg_segments(data)
    j = start
    while True:
        j = data.index(b"\xff", j)
        if data[j + 1] == 0x00 or 0xD0 <= data[j + 1] <= 0xD7:
            j += 2
            continue
        return start, j


def seg_offset(data: bytes, marker: int) -> int:
    segs, _ = jpeg_segments(data)
    return next(off for m, off, _ in segs if m == marker)


def png_chunk(typ: bytes, body: bytes, crc: int | None = None) -> bytes:
    if crc is None:
        crc = zlib.crc32(typ + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + typ + body + struct.pack(">I", crc)


def png_chunks(data: bytes):
    """[(type, offset, body_len)]"""
    out, i = [], 8
    while i < len(data):
        n = struct.unpack(">I", data[i: i + 4])[0]
        out.append((data[i + 4: i + 8], i, n))
        i += 12 + n
    return out


def make_png(w, h, raw: bytes | None = None, *, bit_depth=8, colour_type=2, ihdr_crc=None, idat=None,
             extra=b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr, ihdr_crc) + extra
    if idat is None:
        idat = zlib.compress(raw if raw is not None else b"")
    out += png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    return out


def rebuild_png_with_idat(data: bytes, zdata: bytes) -> bytes:
    """Same PNG, IDAT body replaced by zdata (with a correct CRC)."""
    out = data[:8]
    for typ, off, n in png_chunks(data):
        body = data[off + 8: off + 8 + n]
        out += png_chunk(typ, zdata if typ == b"IDAT" else body)
    return out


def png_raw_rows(w, h, seed=3) -> bytes:
    rgb = photo(w, h, seed)
    return b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))


# --------------------------------------------------------------------------- truncation

def _jpeg_trunc_offsets(data):
    sof = seg_offset(data, 0xC0)
    dht = seg_offset(data, 0xC4)
    dqt = seg_offset(data, 0xDB)
    s, e = jpeg_scan(data)
    header = [3, 4, 6, 12, dqt + 10, sof + 3, sof + 7, sof + 12, dht + 20, s - 4]
    scan = [int(x) for x in np.linspace(s + 1, e - 8, 10)]
    return [("hdr", o) for o in header] + [("scan", o) for o in scan]


_J = _good_jpeg()
JPEG_TRUNC = _jpeg_trunc_offsets(_J)


@pytest.mark.parametrize("where,off", JPEG_TRUNC, ids=[f"{w}-{o}of{len(_J)}" for w, o in JPEG_TRUNC])
def test_jpeg_truncated(where, off):
    data = _J[:off]
    expect_decode_error(data, JPEG_RE, CAUSE_RE)
    if where == "scan":                               # the cause is the truncation
        expect_decode_error(data, JPEG_RE, TRUNC_RE)


JPEG_HDR_TRUNC = [o for w, o in JPEG_TRUNC if w == "hdr"]


@pytest.mark.parametrize("off", JPEG_HDR_TRUNC, ids=[f"{o}of{len(_J)}" for o in JPEG_HDR_TRUNC])
def test_jpeg_read_header_truncated(off):
    """A header cut before the SOF has no size: read_header must not invent one."""
    try:
        info = datago.read_header(_J[:off])
    except DecodeError as e:
        assert _search(JPEG_RE, str(e)), str(e)
    else:
        raise AssertionError(f"read_header returned {info} for the first {off} bytes of a 96x64 JPEG")


@pytest.mark.parametrize("off", [1, 2])
def test_jpeg_truncated_in_magic(off):
    expect_decode_error(_J[:off], None, None)


_JP = _good_jpeg(progressive=True)


def _progressive_scan_offsets(data):
    sos = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xDA]
    assert len(sos) >= 3
    offs = []
    for a, b in zip(sos, sos[1:] + [len(data) - 2]):
        offs.append((a + b) // 2)                     # inside each scan's data
    offs.append(sos[1])                              # exactly between two scans
    offs.append(sos[-1])
    return offs


PROG_TRUNC = _progressive_scan_offsets(_JP)


@pytest.mark.parametrize("off", PROG_TRUNC, ids=[f"{o}of{len(_JP)}" for o in PROG_TRUNC])
def test_jpeg_progressive_truncated(off):
    """A progressive JPEG cut between/inside scans would give a blurry partial image."""
    expect_decode_error(_JP[:off], JPEG_RE, TRUNC_RE)


def _png_trunc_offsets(data):
    chunks = png_chunks(data)
    idat = next(off for t, off, n in chunks if t == b"IDAT")
    idat_n = next(n for t, off, n in chunks if t == b"IDAT")
    header = [8, 9, 12, 16, 20, 24, 29, 32, idat + 4, idat + 8]
    body = [int(x) for x in np.linspace(idat + 9, idat + 8 + idat_n - 1, 9)]
    crc = [idat + 8 + idat_n + 2]                     # inside the IDAT CRC
    return [("hdr", o) for o in header] + [("idat", o) for o in body] + [("crc", o) for o in crc]


_P = _good_png()
PNG_TRUNC = _png_trunc_offsets(_P)


@pytest.mark.parametrize("where,off", PNG_TRUNC, ids=[f"{w}-{o}of{len(_P)}" for w, o in PNG_TRUNC])
def test_png_truncated(where, off):
    data = _P[:off]
    expect_decode_error(data, PNG_RE, CAUSE_RE)
    if where != "hdr":
        expect_decode_error(data, PNG_RE, TRUNC_RE)


@pytest.mark.parametrize("off", [1, 4, 7])
def test_png_truncated_in_signature(off):
    expect_decode_error(_P[:off], None, None)


def test_png_missing_idat_rows():
    """A complete zlib stream holding only half the rows: not a partial image."""
    raw = png_raw_rows(40, 30)
    data = make_png(40, 30, raw[: len(raw) // 2])
    expect_decode_error(data, PNG_RE, CAUSE_RE)


def test_png_without_idat():
    ihdr = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")
    expect_decode_error(data, PNG_RE, CAUSE_RE)


FALLBACK = {
    "webp": lambda: encode(photo(64, 48, 4), "WEBP", quality=80),
    "webp-lossless": lambda: encode(photo(64, 48, 4), "WEBP", lossless=True),
    "bmp": lambda: encode(photo(64, 48, 4), "BMP"),
    "gif": lambda: encode(Image.fromarray(photo(64, 48, 4)).convert("P"), "GIF"),
    "tiff": lambda: encode(photo(64, 48, 4), "TIFF"),
}


@pytest.mark.parametrize("frac", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("fmt", list(FALLBACK))
def test_fallback_truncated(fmt, frac):
    data = FALLBACK[fmt]()
    cut = data[: int(len(data) * frac)]
    expect_decode_error(cut, None, None)


# --------------------------------------------------------------------------- random / empty / magic

RANDOM_LENGTHS = list(range(1, 17)) + [100, 4096]


@pytest.mark.parametrize("n", RANDOM_LENGTHS)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_bytes(seed, n):
    data = np.random.default_rng(seed * 1000 + n).integers(0, 256, n, dtype=np.uint8).tobytes()
    expect_decode_error(data, None, None)
    with pytest.raises(DecodeError):
        datago.read_header(data)


@pytest.mark.parametrize("n", [0, 1, 2, 10, 100, 2000])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fmt", ["jpeg", "soi-only", "png"])
def test_magic_then_random(fmt, seed, n):
    rng = np.random.default_rng(seed * 7 + n)
    body = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    if fmt == "jpeg":
        data, fre = b"\xff\xd8\xff" + body, JPEG_RE
    elif fmt == "soi-only":                               # FF D8 alone is not a JPEG signature
        data, fre = b"\xff\xd8" + body, None
    else:
        data, fre = b"\x89PNG\r\n\x1a\n" + body, PNG_RE
    expect_decode_error(data, fre, CAUSE_RE)
    with pytest.raises(DecodeError) as ei:
        datago.read_header(data)
    if fre is not None:
        assert _search(fre, str(ei.value)), str(ei.value)


def test_jpeg_soi_then_random_segments():
    """SOI + APP0 + a random-length garbage marker segment."""
    data = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + b"\xff\xc0\xff\xff" + b"\x00" * 40
    expect_decode_error(data, JPEG_RE, CAUSE_RE)


@pytest.mark.parametrize("empty", [b"", bytearray(), memoryview(b""), np.zeros(0, np.uint8)],
                         ids=["bytes", "bytearray", "memoryview", "numpy"])
def test_empty(empty):
    expect_decode_error(empty, None, r"(?i)(empty|0 bytes|no data)")
    with pytest.raises(DecodeError):
        datago.read_header(empty)


def test_jpeg_wrong_first_byte():
    data = b"\x00" + _J[1:]
    expect_decode_error(data, None, None)
    with pytest.raises(DecodeError):
        datago.read_header(data)


def test_png_signature_then_garbage():
    data = b"\x89PNG\r\n\x1a\n" + b"this is not a PNG chunk stream at all" * 4
    expect_decode_error(data, PNG_RE, CAUSE_RE)
    with pytest.raises(DecodeError, match=PNG_RE):
        datago.read_header(data)


def test_png_bad_signature_byte():
    data = _P[:1] + b"Q" + _P[2:]
    expect_decode_error(data, None, None)


def test_unsupported_format():
    """A format Pillow knows but datago does not support (ICO, PCX...)."""
    data = encode(photo(16, 16, 5), "PCX")
    expect_decode_error(data, None, r"(?i)(unrecogni[sz]ed|unsupported|unknown)")


# --------------------------------------------------------------------------- size guard

def jpeg_with_size(w: int, h: int, base: bytes = _J) -> bytes:
    sof = seg_offset(base, 0xC0)
    b = bytearray(base)
    b[sof + 5: sof + 7] = struct.pack(">H", h)
    b[sof + 7: sof + 9] = struct.pack(">H", w)
    return bytes(b)


def png_with_size(w: int, h: int) -> bytes:
    raw = png_raw_rows(8, 4)                              # far fewer rows than announced
    return make_png(w, h, raw)


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_huge_header_too_large(fmt):
    data = jpeg_with_size(65535, 65535) if fmt == "jpeg" else png_with_size(65535, 65535)
    info = datago.read_header(data)
    assert (info.width, info.height) == (65535, 65535)
    for call in (lambda: datago.decode(data),
                 lambda: datago.decode(data, mode="L"),
                 lambda: datago.decode_to_bucket(data, bucket=(64, 64)),
                 lambda: datago.decode_to_bucket(data, buckets=[(64, 64), (128, 32)])):
        with pytest.raises(ImageTooLargeError, match=JPEG_RE if fmt == "jpeg" else PNG_RE):
            call()


def test_png_max_dimensions_too_large():
    data = png_with_size(2**31 - 1, 2**31 - 1)
    with pytest.raises(ImageTooLargeError):
        datago.decode(data)
    with pytest.raises(ImageTooLargeError):
        datago.decode_to_bucket(data, bucket=(64, 64))


def test_jpeg_65500_square_too_large():
    """Largest size libjpeg accepts: the max_pixels guard fires (control for the 65535 case)."""
    data = jpeg_with_size(65500, 65500)
    with pytest.raises(ImageTooLargeError, match=JPEG_RE):
        datago.decode(data)
    with pytest.raises(ImageTooLargeError, match=JPEG_RE):
        datago.decode_to_bucket(data, bucket=(64, 64))


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_max_pixels_guard_then_missing_data(fmt):
    data = jpeg_with_size(20000, 20000) if fmt == "jpeg" else png_with_size(20000, 20000)
    fre = JPEG_RE if fmt == "jpeg" else PNG_RE
    with pytest.raises(ImageTooLargeError, match=fre):
        datago.decode(data, max_pixels=10_000)
    with pytest.raises(ImageTooLargeError, match=fre):
        datago.decode_to_bucket(data, bucket=(64, 64), max_pixels=10_000)
    # one pixel below the limit is too large, exactly at the limit passes the header check
    with pytest.raises(ImageTooLargeError):
        datago.decode(data, max_pixels=20000 * 20000 - 1)
    for call in (lambda: datago.decode(data, max_pixels=20000 * 20000),
                 lambda: datago.decode(data, max_pixels=10**9, mode="L"),
                 lambda: datago.decode_to_bucket(data, bucket=(64, 64), max_pixels=10**9)):
        with pytest.raises(DecodeError, match=fre) as ei:
            call()
        assert not isinstance(ei.value, ImageTooLargeError), str(ei.value)
        assert _search(CAUSE_RE, str(ei.value)), str(ei.value)


def test_fallback_max_pixels():
    data = FALLBACK["webp-lossless"]()
    with pytest.raises(ImageTooLargeError):
        datago.decode(data, max_pixels=64 * 48 - 1)
    assert datago.decode(data, max_pixels=64 * 48).shape == (48, 64, 3)


@pytest.mark.parametrize("w,h", [(0, 64), (96, 0), (0, 0)])
def test_zero_dimensions(w, h):
    expect_decode_error(png_with_size(w, h), PNG_RE, CAUSE_RE)
    if h != 0:   # a JPEG height of 0 means "defined by DNL" (not supported by libjpeg)
        expect_decode_error(jpeg_with_size(w, h), JPEG_RE, CAUSE_RE)
    else:
        expect_decode_error(jpeg_with_size(w, h), JPEG_RE, None)


def test_png_width_above_spec_limit():
    expect_decode_error(png_with_size(2**31, 4), PNG_RE, CAUSE_RE)


# --------------------------------------------------------------------------- corrupted JPEG data

def turbo_reports(data: bytes) -> bool:
    """Does libjpeg-turbo (through PyTurboJPEG) report a warning or an error?"""
    turbojpeg = pytest.importorskip("turbojpeg")
    try:
        tj = turbojpeg.TurboJPEG()
    except Exception as e:
        pytest.skip(f"libturbojpeg not loadable: {e}")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            tj.decode(data)
        except Exception:
            return True
    return len(w) > 0


def _corruptions(base: bytes):
    s, e = jpeg_scan(base)
    mid = (s + e) // 2
    b = bytearray(base)
    out = {}
    out["insert-RST3-mid-scan"] = bytes(b[:mid] + b"\xff\xd3" + b[mid:])
    out["insert-SOF0-mid-scan"] = bytes(b[:mid] + b"\xff\xc0" + b[mid:])
    out["insert-EOI-mid-scan"] = bytes(b[:mid] + b"\xff\xd9" + b[mid:])
    c = bytearray(b)
    c[s + (e - s) // 3: s + (e - s) // 3 + 32] = b"\xff" * 32
    c[s + (e - s) // 3 + 32] = 0xC8                         # make it a (JPG) marker after the FF run
    out["ff-run-then-marker"] = bytes(c)
    c = bytearray(b)
    c[mid: mid + 64] = b"\xff\x00" * 32                     # stuffed 0xFF bytes: all-ones codes
    out["all-ones-huffman-codes"] = bytes(c)
    out["cut-scan-then-EOI"] = bytes(b[:mid] + b"\xff\xd9")
    out["scan-replaced-by-EOI"] = bytes(b[:s] + b"\xff\xd9")
    # header-level corruption
    dht = seg_offset(base, 0xC4)
    c = bytearray(b)
    c[dht + 5: dht + 21] = b"\xff" * 16                     # code counts sum far above 256
    out["bogus-DHT-counts"] = bytes(c)
    sos = seg_offset(base, 0xDA)
    c = bytearray(b)
    c[sos + 5] = 0x09                                       # SOS names component id 9
    out["SOS-unknown-component"] = bytes(c)
    sof = seg_offset(base, 0xC0)
    c = bytearray(b)
    c[sof + 4] = 7                                          # 7-bit precision
    out["SOF-precision-7"] = bytes(c)
    c = bytearray(b)
    c[sof + 11] = 0x55                                      # 5x5 sampling factors
    out["SOF-bad-sampling"] = bytes(c)
    c = bytearray(b)
    c[sof + 12] = 9                                         # component 1 uses quantisation table 9
    out["SOF-bad-qtable"] = bytes(c)
    c = bytearray(b)
    c[sof + 13] = 9                                         # component 2 id 9: SOS names a missing id
    out["SOF-SOS-id-mismatch"] = bytes(c)
    return out


_CORR = _corruptions(_J)


@pytest.mark.parametrize("name", list(_CORR))
def test_jpeg_corrupted_reported(name):
    data = _CORR[name]
    assert turbo_reports(data), f"libjpeg-turbo does not report {name}; pick another corruption"
    expect_decode_error(data, JPEG_RE, CAUSE_RE)


def test_jpeg_progressive_corrupted():
    sos = [i for i in range(len(_JP) - 1) if _JP[i] == 0xFF and _JP[i + 1] == 0xDA]
    at = (sos[2] + sos[3]) // 2
    data = _JP[:at] + b"\xff\xd5" + _JP[at:]
    assert turbo_reports(data)
    expect_decode_error(data, JPEG_RE, CAUSE_RE)


@pytest.mark.parametrize("seed", range(8))
def test_jpeg_random_run_in_scan(seed):
    """64 random bytes over the scan data: an error whenever libjpeg reports one."""
    s, e = jpeg_scan(_J)
    rng = np.random.default_rng(seed)
    at = int(rng.integers(s, e - 64))
    b = bytearray(_J)
    b[at: at + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    data = bytes(b)
    if turbo_reports(data):
        expect_decode_error(data, JPEG_RE, CAUSE_RE)
    else:  # libjpeg itself sees nothing wrong: decoding is allowed, but no crash
        try:
            arr = datago.decode(data)
            assert arr.shape == (64, 96, 3)
        except DecodeError:
            pass


def _poison_inputs():
    out = {f"trunc{o}": _J[:o] for o in JPEG_HDR_TRUNC}
    out.update({f"trunc{o}": _J[:o] for w, o in JPEG_TRUNC[::4] if w == "scan"})
    out.update(_CORR)
    out["huge-65535"] = jpeg_with_size(65535, 65535)
    out["zero-width"] = jpeg_with_size(0, 64)
    return out


_POISON = _poison_inputs()


@pytest.mark.parametrize("name", list(_POISON))
def test_jpeg_error_does_not_break_next_decode(name):
    """After any failed JPEG, the next good JPEG in the same thread decodes correctly."""
    want = datago.decode(_J)        # (fails here if an earlier test left the thread broken)
    try:
        datago.decode(_POISON[name])
    except DecodeError:
        pass
    try:
        datago.decode_to_bucket(_POISON[name], bucket=(64, 64))
    except DecodeError:
        pass
    for i in range(3):
        try:
            got = datago.decode(_J)
        except Exception as e:
            raise AssertionError(f"good JPEG decode #{i + 1} after {name!r} raised "
                                 f"{type(e).__name__}: {e}") from None
        assert np.array_equal(got, want)
    assert datago.read_header(_J)[1:3] == (96, 64)
    assert datago.decode_to_bucket(_J, bucket=(32, 48)).image.shape == (32, 48, 3)


# --------------------------------------------------------------------------- corrupted PNG data

def test_png_bad_ihdr_crc():
    i = 8 + 8 + 13                                         # IHDR CRC offset
    data = bytearray(_P)
    data[i] ^= 0x5A
    expect_decode_error(bytes(data), PNG_RE, CRC_RE)
    with pytest.raises(DecodeError, match=PNG_RE):
        datago.read_header(bytes(data))


def test_png_bad_idat_crc():
    typ, off, n = next(c for c in png_chunks(_P) if c[0] == b"IDAT")
    data = bytearray(_P)
    data[off + 8 + n + 1] ^= 0x01
    expect_decode_error(bytes(data), PNG_RE, CRC_RE)


def test_png_idat_body_changed_crc_not():
    """Both the CRC and the zlib data are now wrong: either diagnosis is right."""
    typ, off, n = next(c for c in png_chunks(_P) if c[0] == b"IDAT")
    data = bytearray(_P)
    data[off + 8 + n // 2] ^= 0x10
    expect_decode_error(bytes(data), PNG_RE, CAUSE_RE)


def _zdata(data):
    typ, off, n = next(c for c in png_chunks(data) if c[0] == b"IDAT")
    return data[off + 8: off + 8 + n]


def _zlib_corruptions():
    z = _zdata(_P)
    out = {}
    out["bad-zlib-header"] = b"\x00\x00" + z[2:]
    out["bad-adler32"] = z[:-4] + bytes(x ^ 0xFF for x in z[-4:])
    mid = len(z) // 2
    out["garbage-deflate-run"] = z[:mid] + np.random.default_rng(5).integers(0, 256, 200, dtype=np.uint8).tobytes() + z[mid + 200:]
    out["invalid-block-type"] = z[:2] + bytes([0x07]) + z[3:]   # BTYPE=11 (reserved)
    out["zlib-stream-cut"] = z[: len(z) // 3]
    return out


_ZC = _zlib_corruptions()


@pytest.mark.parametrize("name", list(_ZC))
def test_png_corrupted_zlib(name):
    data = rebuild_png_with_idat(_P, _ZC[name])
    # sanity: the corrupted stream really is invalid for zlib
    with pytest.raises(zlib.error):
        d = zlib.decompressobj()
        d.decompress(_ZC[name])
        if not d.eof:
            raise zlib.error("incomplete stream")
    expect_decode_error(data, PNG_RE, CAUSE_RE)


def test_png_bad_filter_type():
    raw = bytearray(png_raw_rows(20, 10))
    raw[(1 + 60) * 4] = 9                                 # filter byte of row 4
    expect_decode_error(make_png(20, 10, bytes(raw)), PNG_RE, CAUSE_RE)


@pytest.mark.parametrize("bd,ct", [(4, 2), (16, 3), (3, 0), (8, 5), (1, 6)],
                         ids=["rgb4", "pal16", "grey3", "ct5", "rgba1"])
def test_png_invalid_ihdr_combination(bd, ct):
    data = make_png(8, 8, b"\x00" * 100, bit_depth=bd, colour_type=ct)
    expect_decode_error(data, PNG_RE, CAUSE_RE)


def test_png_palette_missing_plte():
    data = make_png(8, 8, b"".join(b"\x00" + bytes(8) for _ in range(8)), colour_type=3)
    expect_decode_error(data, PNG_RE, CAUSE_RE)


def test_png_palette_index_out_of_range():
    plte = png_chunk(b"PLTE", bytes(range(12)))            # 4 entries
    raw = b"".join(b"\x00" + bytes([200] * 8) for _ in range(8))
    data = make_png(8, 8, raw, colour_type=3, extra=plte)
    # libspng rejects out-of-range indices; Pillow would map them to black: either a
    # DecodeError or a fully defined image, never garbage memory or a crash
    try:
        arr = datago.decode(data)
    except DecodeError as e:
        assert _search(PNG_RE, str(e))
    else:
        assert arr.shape == (8, 8, 3)


# --------------------------------------------------------------------------- bad arguments

def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        datago.decode(_J, mode="XYZ")
    with pytest.raises(ValueError, match="mode"):
        datago.decode(_J, mode="rgb")
    with pytest.raises(ValueError, match="mode"):
        datago.decode_to_bucket(_J, bucket=(8, 8), mode="XYZ")
    with pytest.raises(ValueError, match="mode"):
        datago.decode_to_bucket(_J, bucket=(8, 8), mode="RGBA")


@pytest.mark.parametrize("mp", [0, -1, 1.5, True, "100", None], ids=["0", "-1", "float", "bool", "str", "None"])
def test_bad_max_pixels(mp):
    with pytest.raises(ValueError, match="max_pixels"):
        datago.decode(_J, max_pixels=mp)
    with pytest.raises(ValueError, match="max_pixels"):
        datago.decode_to_bucket(_J, bucket=(8, 8), max_pixels=mp)


@pytest.mark.parametrize("bg", [(1, 2), (1, 2, 3, 4), (256, 0, 0), (-1, 0, 0), "abc", None, 5],
                         ids=["2-tuple", "4-tuple", "256", "negative", "str", "None", "int"])
def test_bad_background(bg):
    with pytest.raises(ValueError, match="background"):
        datago.decode(_P, background=bg)
    with pytest.raises(ValueError, match="background"):
        datago.decode_to_bucket(_P, bucket=(8, 8), background=bg)


def test_bucket_arguments():
    with pytest.raises(ValueError):
        datago.decode_to_bucket(_J)
    with pytest.raises(ValueError):
        datago.decode_to_bucket(_J, bucket=(0, 8))
    with pytest.raises(ValueError):
        datago.decode_to_bucket(_J, bucket=(8,))
    with pytest.raises(ValueError):
        datago.decode_to_bucket(_J, buckets=[])


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
@pytest.mark.parametrize("shape", [(32, 64, 3), (64, 32, 3), (64, 64, 4), (64, 64, 1), (64, 64), (3, 64, 64)],
                         ids=["hw-short", "w-short", "4ch", "1ch", "2d", "chw-as-hwc"])
def test_out_wrong_shape(fmt, shape):
    data = {"jpeg": _J, "png": _P, "webp": FALLBACK["webp-lossless"]()}[fmt]
    out = np.zeros(shape, np.uint8)
    before = out.copy()
    with pytest.raises(ValueError, match=r"(?i)out|shape"):
        datago.decode_to_bucket(data, bucket=(64, 64), out=out)
    assert np.array_equal(out, before)


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
def test_out_wrong_dtype_or_type(fmt):
    data = {"jpeg": _J, "png": _P, "webp": FALLBACK["webp-lossless"]()}[fmt]
    with pytest.raises((TypeError, ValueError)):
        datago.decode_to_bucket(data, bucket=(64, 64), out=np.zeros((64, 64, 3), np.float32))
    with pytest.raises(TypeError):
        datago.decode_to_bucket(data, bucket=(64, 64), out=[[0] * 64] * 64)
    ro = np.zeros((64, 64, 3), np.uint8)
    ro.flags.writeable = False
    with pytest.raises((TypeError, ValueError)):
        datago.decode_to_bucket(data, bucket=(64, 64), out=ro)


def test_out_correct_shape_and_strided():
    """Control for the tests above: a right-shaped (and a strided) out works."""
    batch = np.zeros((2, 3, 48, 64), np.uint8)             # (N, C, H, W)
    ref = datago.decode_to_bucket(_J, bucket=(48, 64)).image
    r = datago.decode_to_bucket(_J, bucket=(48, 64), out=batch[1].transpose(1, 2, 0))
    assert np.array_equal(batch[1].transpose(1, 2, 0), ref)
    assert np.shares_memory(r.image, batch)
    assert not batch[0].any()


# --------------------------------------------------------------------------- absurd sizes

ABSURD = [(2**31, 2**31), (2**31 - 1, 2**31 - 1), (1, 2**31), (2**31, 1), (2**40, 2**40),
          (2**20, 2**20), (65536, 65536), (8, -1), (0, 0)]            # (height, width)


@pytest.mark.parametrize("size", ABSURD, ids=[f"{w}x{h}" for h, w in ABSURD])
def test_absurd_sizes_are_value_errors(size):
    """Resize targets and buckets that cannot be allocated (or overflow a C int) are a
    ValueError before anything is allocated: never an OverflowError, MemoryError or
    a crash."""
    img = np.zeros((8, 8, 3), np.uint8)
    for call in (lambda: datago.resize(img, size),
                 lambda: datago.resize(img, size, filter="nearest"),
                 lambda: datago.resize(img[:, :, 0], size, filter="lanczos"),
                 lambda: datago.resize(img[:, :, :1].astype(np.uint16), size, filter="nearest"),
                 lambda: datago.decode_to_bucket(_J, bucket=size),
                 lambda: datago.decode_to_bucket(_P, bucket=size),
                 lambda: datago.decode_to_bucket(FALLBACK["webp-lossless"](), bucket=size),
                 lambda: datago.decode_to_bucket(_P, bucket=size, mask=True),
                 lambda: datago.decode_to_bucket(_J, buckets=[size])):
        with pytest.raises(ValueError):
            call()


def test_absurd_sizes_with_a_huge_max_pixels():
    """Raising max_pixels does not lift the C limits: sides above 2**31 - 1 and
    resampling plans above their limits are still ValueErrors."""
    img = np.zeros((8, 8, 3), np.uint8)
    big = 2**62
    for size in [(2**31, 2**31), (1, 2**31)]:
        with pytest.raises(ValueError):
            datago.resize(img, size, max_pixels=big)
        with pytest.raises(ValueError):
            datago.decode_to_bucket(_J, bucket=size, max_pixels=big)
    # one side of 2**28 + 1: the plan limit (nothing of that size is allocated)
    for filt in ("nearest", "triangle"):
        with pytest.raises(ValueError, match="too large"):
            datago.resize(img, (1, 2**28 + 1), filter=filt, max_pixels=big)
    # max_pixels beyond 2**63 is capped, not an OverflowError
    assert datago.decode(_J, max_pixels=2**80).shape == (64, 96, 3)
    assert datago.decode_to_bucket(_J, bucket=(16, 16), max_pixels=2**80).image.shape == (16, 16, 3)
    data = png_with_size(2**31 - 1, 2**31 - 1)
    with pytest.raises(ImageTooLargeError):
        datago.decode(data, max_pixels=2**80)
    with pytest.raises(ImageTooLargeError):
        datago.decode_to_bucket(data, bucket=(8, 8), max_pixels=2**80, mask=True)


def test_resampler_scratch_limit():
    """A source span whose strip scratch (columns x 48 lanes) would exceed 1 GiB is a
    ValueError, not a multi-GiB allocation (and the column offsets no int overflow)."""
    wide = np.zeros((2, 6_000_000), np.uint8)
    with pytest.raises(ValueError, match="too large"):
        datago.resize(wide, (1, 3))
    assert datago.resize(wide[:, :600_000], (1, 3)).shape == (1, 3)


def test_bad_resize_arguments():
    img = np.zeros((8, 8, 3), np.uint8)
    for size in [(8,), (8, 8, 8), None, "8x8", (8.0, 8), (True, 8), (8, 8.0), (8, True)]:
        with pytest.raises(ValueError):
            datago.resize(img, size)
    for box in [(0, 0, float("nan"), 8), (0, 0, float("inf"), 8), (0, 0, 9, 8), ("a", 0, 1, 1)]:
        with pytest.raises(ValueError, match="box"):
            datago.resize(img, (4, 4), box=box)


# --------------------------------------------------------------------------- survival

def test_survival_after_everything():
    """Re-run a sample of the bad inputs, then a normal decode must still work."""
    bad = [_J[:o] for _, o in JPEG_TRUNC] + [_P[:o] for _, o in PNG_TRUNC] + list(_CORR.values())
    bad += [rebuild_png_with_idat(_P, z) for z in _ZC.values()]
    bad += [b"", b"\xff", b"\xff\xd8", b"\x89PNG\r\n\x1a\n"]
    for i in range(20):
        bad.append(np.random.default_rng(100 + i).integers(0, 256, 1 + i * 37, dtype=np.uint8).tobytes())
    for _ in range(3):
        for data in bad:
            for call in (datago.decode, datago.read_header,
                         lambda d: datago.decode_to_bucket(d, bucket=(32, 32))):
                try:
                    call(data)
                except DecodeError:
                    pass
                except Exception:  # wrong exception types are reported by the tests above
                    pass
    arr = photo(80, 56, seed=9)
    png = encode(arr, "PNG")
    assert np.array_equal(datago.decode(png), arr)
    jpg = encode(arr, "JPEG", quality=95)
    got = datago.decode(jpg)
    assert got.shape == (56, 80, 3)
    assert np.abs(got.astype(int) - arr.astype(int)).mean() < 3
    r = datago.decode_to_bucket(jpg, bucket=(28, 40))
    assert r.image.shape == (28, 40, 3)


# --------------------------------------------------------------------------- per-test thread

def isolated(fn):
    """Run a test in a fresh thread (fresh per-thread decoder state); re-raise its outcome."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        box = {}

        def run():
            try:
                fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - includes pytest's skip/fail outcomes
                box["exc"] = e

        t = threading.Thread(target=run, name=f"datago-{fn.__name__}")
        t.start()
        t.join()
        if "exc" in box:
            raise box["exc"]
    return wrapper


for _name, _obj in list(globals().items()):
    if _name.startswith("test_") and callable(_obj) and _name != "test_survival_after_everything":
        globals()[_name] = isolated(_obj)
del _name, _obj
