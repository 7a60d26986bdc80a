"""Decoder edge cases found in real datasets, each built here from a Pillow-written
file by byte surgery and compared with Pillow.

JPEG: Motion-JPEG frames without DHT (standard tables implied), APPn/COM
segments with a length field below 2, bytes between segments, an unknown JFIF
version or Adobe transform, bad scan parameters in a sequential file -- all
decoded as libjpeg/Pillow decode them (the header ones reported in
``BucketResult.warning`` and counted as ``decoded_with_warnings``); corrupt
entropy-coded data is an error even where Pillow returns an image.

EXIF: every entry bounds-checked (count x type size against the segment), the
first APP1 Exif and the first orientation entry decide, as Pillow reads them.
PNG: eXIf is read wherever it is; the last one counts.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

import datago
from datago import DatagoDataset
from datago.errors import DecodeError
from conftest import encode, photo


# --------------------------------------------------------------------------- helpers

def pil_rgb(data: bytes, transpose: bool = False) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        im = Image.open(io.BytesIO(data))
        im.load()
        if transpose:
            im = ImageOps.exif_transpose(im)
        return np.asarray(im.convert("RGB"))


def assert_close(got: np.ndarray, want: np.ndarray, tol: float = 1.0):
    """Mean absolute difference per channel < tol (Pillow bundles its own libjpeg)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    d = np.abs(got.astype(np.int32) - want.astype(np.int32)).reshape(-1, got.shape[-1])
    assert d.mean(axis=0).max() < tol, d.mean(axis=0)


def segments(data: bytes):
    """[(marker, start, end)] of the marker segments before the first scan (end
    excludes the next marker); the SOS entry ends at the end of the data."""
    out, pos = [], 2
    while pos + 4 <= len(data):
        m = data[pos + 1]
        n = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if m == 0xDA:
            out.append((m, pos, len(data)))
            break
        out.append((m, pos, pos + 2 + n))
        pos += 2 + n
    return out


def drop(data: bytes, marker: int) -> bytes:
    """The file without its segments of ``marker`` (before the first scan)."""
    keep = [data[:2]]
    for m, s, e in segments(data):
        if m != marker:
            keep.append(data[s:e])
    return b"".join(keep)


def offset(data: bytes, marker: int) -> int:
    return next(s for m, s, _ in segments(data) if m == marker)


def baseline(w=96, h=64, seed=1, **kw) -> bytes:
    return encode(photo(w, h, seed=seed), "JPEG", quality=90, **kw)


def check_all_paths(data: bytes, want: np.ndarray, warning):
    """decode, read_header and decode_to_bucket agree with ``want`` (Pillow)."""
    assert_close(datago.decode(data), want)
    info = datago.read_header(data)
    assert (info.width, info.height) == (want.shape[1], want.shape[0])
    res = datago.decode_to_bucket(data, bucket=want.shape[:2])
    assert_close(res.image, want)
    if warning is None:
        assert res.warning is None
    else:
        assert res.warning is not None and warning in res.warning, res.warning


# --------------------------------------------------------------------------- Motion-JPEG

def _prime_with(kind: str):
    """Leave this thread's decoder holding the tables of another kind of JPEG."""
    arr = photo(80, 48, seed=9)
    if kind == "optimized":
        datago.decode(encode(arr, "JPEG", quality=75, optimize=True))
    elif kind == "progressive":
        datago.decode(encode(arr, "JPEG", quality=75, progressive=True))
    elif kind == "grey":
        datago.decode(encode(arr[:, :, 0], "JPEG", quality=75, optimize=True))


@pytest.mark.parametrize("before", ["nothing", "optimized", "progressive", "grey"])
@pytest.mark.parametrize("colour", ["rgb", "grey"])
def test_mjpeg_frame_without_dht(before, colour):
    """A frame without DHT uses the standard tables, whatever the thread decoded before
    (libjpeg keeps an earlier file's tables in a reused handle)."""
    arr = photo(96, 64, seed=3)
    src = encode(arr if colour == "rgb" else arr[:, :, 0], "JPEG", quality=90)  # standard tables
    frame = drop(src, 0xC4)
    assert b"\xff\xc4" not in frame[:offset(frame, 0xDA)]
    want = pil_rgb(frame)
    assert_close(want, pil_rgb(src), tol=1e-9)              # Pillow: the same pixels
    for _ in range(2):
        _prime_with(before)
        check_all_paths(frame, want, None)
        _prime_with(before)
        assert np.array_equal(datago.decode(frame), datago.decode(src))


def test_file_without_dqt_fails_like_pillow():
    """A stale quantisation table from the previous file is not used either."""
    src = baseline()
    broken = drop(src, 0xDB)
    with pytest.raises(OSError):
        pil_rgb(broken)
    datago.decode(baseline(seed=4))
    with pytest.raises(DecodeError, match="JPEG"):
        datago.decode(broken)
    assert np.array_equal(datago.decode(src), datago.decode(src))


# --------------------------------------------------------------------------- header trivia

def _insert_after_soi(data: bytes, raw: bytes) -> bytes:
    return data[:2] + raw + data[2:]


HEADER_CASES = {
    # name: (bytes inserted right after SOI, warning expected or None)
    "APP1-length-0": (b"\xff\xe1\x00\x00", None),
    "APP1-length-1": (b"\xff\xe1\x00\x01", None),
    "APP0-length-0": (b"\xff\xe0\x00\x00", None),
    "APP15-length-1": (b"\xff\xef\x00\x01", None),
    "COM-length-0": (b"\xff\xfe\x00\x00", None),
    "APP1-length-0-then-junk": (b"\xff\xe1\x00\x00ABC", "3 extraneous bytes before marker 0xe0"),
    "APP1-length-1-then-junk-FF00": (b"\xff\xe1\x00\x01x\xff\x00yz", "extraneous bytes"),
    "stuffed-zero-after-SOI": (b"\xff\x00", "2 extraneous bytes"),
    "fill-bytes": (b"\xff\xff\xff", None),
}


@pytest.mark.parametrize("name", list(HEADER_CASES))
def test_malformed_segments_libjpeg_skips(name):
    raw, warning = HEADER_CASES[name]
    data = _insert_after_soi(baseline(), raw)
    want = pil_rgb(data)
    assert_close(want, pil_rgb(baseline()), tol=1e-9)
    check_all_paths(data, want, warning)


def test_junk_between_segments():
    src = baseline()
    at = offset(src, 0xC0)                       # before SOF0
    data = src[:at] + b"\x00\x01junk" + src[at:]
    want = pil_rgb(data)
    check_all_paths(data, want, "6 extraneous bytes before marker 0xc0")


def test_unknown_jfif_version():
    src = baseline()
    at = offset(src, 0xE0)
    assert src[at + 4:at + 9] == b"JFIF\x00"
    data = bytearray(src)
    data[at + 9] = 3                              # JFIF 3.01
    data = bytes(data)
    check_all_paths(data, pil_rgb(data), "JFIF major version 3")


@pytest.mark.parametrize("transform", [0, 1, 7])
def test_adobe_transform(transform):
    """An Adobe APP14 marker (no JFIF): 0 = RGB, 1 = YCbCr, anything else is taken as
    YCbCr with a warning -- as libjpeg and Pillow do."""
    src = drop(baseline(), 0xE0)
    app14 = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00" + bytes([transform])
    data = _insert_after_soi(src, app14)
    want = pil_rgb(data)
    if transform == 7:
        assert_close(want, pil_rgb(src), tol=1e-9)
    check_all_paths(data, want, "Adobe transform code 7" if transform == 7 else None)


def test_bad_scan_parameters_in_a_sequential_file():
    src = baseline()
    sos = offset(src, 0xDA)
    ns = src[sos + 4]
    data = bytearray(src)
    data[sos + 5 + 2 * ns: sos + 8 + 2 * ns] = b"\x00\x00\x00"     # Se = 0 (as some encoders)
    data = bytes(data)
    want = pil_rgb(data)
    assert_close(want, pil_rgb(src), tol=1e-9)
    check_all_paths(data, want, "SOS parameters")


def test_corrupt_data_is_an_error_even_where_pillow_returns_an_image():
    src = baseline(200, 160)
    sos = offset(src, 0xDA)
    data = bytearray(src)
    mid = (sos + len(src)) // 2
    data[mid:mid + 64] = b"\xff\x00" * 32                 # all-ones Huffman codes
    data = bytes(data)
    pil_rgb(data)                                          # Pillow: an image
    with pytest.raises(DecodeError, match="Huffman|Corrupt"):
        datago.decode(data)
    with pytest.raises(DecodeError):
        datago.decode_to_bucket(data, bucket=(64, 64))
    # the next file is fine
    assert_close(datago.decode(src), pil_rgb(src))


def test_warnings_are_counted_by_the_loader(tmp_path):
    ok = baseline(seed=1)
    (tmp_path / "a.jpg").write_bytes(ok)
    (tmp_path / "b.jpg").write_bytes(_insert_after_soi(baseline(seed=2), b"\xff\xe1\x00\x00AB"))
    (tmp_path / "c.jpg").write_bytes(_insert_after_soi(baseline(seed=3), b"\xff\xe1\x00\x00"))
    ds = DatagoDataset({"source_type": "file", "source_config": {"root_path": str(tmp_path)},
                        "image_config": {"crop_and_resize": True, "default_image_size": 64,
                                         "downsampling_ratio": 16},
                        "batch_size": 3})
    (b,) = list(ds)
    assert len(b["id"]) == 3
    st = ds.stats()
    assert st["decoded_with_warnings"] == 1 and st["skipped_total"] == 0
    # without crop_and_resize (full decodes) too
    ds = DatagoDataset({"source_type": "file", "source_config": {"root_path": str(tmp_path)},
                        "image_config": {"crop_and_resize": False}})
    assert len(list(ds)) == 3
    assert ds.stats()["decoded_with_warnings"] == 1
    arr, warning = datago.image.decode_with_warning((tmp_path / "b.jpg").read_bytes())
    assert "2 extraneous bytes" in warning and arr.shape == (64, 96, 3)
    assert datago.image.decode_with_warning(ok)[1] is None


# --------------------------------------------------------------------------- EXIF

def tiff(entries, le: bool = False, extra: bytes = b"") -> bytes:
    e = "<" if le else ">"
    out = (b"II" if le else b"MM") + struct.pack(e + "HI", 42, 8) + struct.pack(e + "H", len(entries))
    for tag, typ, cnt, val in entries:
        out += struct.pack(e + "HHI", tag, typ, cnt) + val
    return out + struct.pack(e + "I", 0) + extra


def _s(v, le=False):
    return struct.pack("<HH" if le else ">HH", v, 0)


_EXTRA = struct.pack(">II", 6, 1) + b"\x00\x06" * 8        # what in-bounds offsets point at
EXIF_CASES = {
    "short": [(0x112, 3, 1, _s(6))],
    "short-count-2-inline": [(0x112, 3, 2, struct.pack(">HH", 6, 6))],
    "short-count-3-in-bounds": [(0x112, 3, 3, struct.pack(">I", 26))],
    "short-count-3-offset-outside": [(0x112, 3, 3, struct.pack(">I", 1000))],
    "offset-outside-whose-bytes-say-6": [(0x112, 3, 3, struct.pack(">HH", 6, 0))],
    "huge-count": [(0x112, 3, 0x80000001, struct.pack(">I", 26))],
    "count-0": [(0x112, 3, 0, _s(6))],
    "long": [(0x112, 4, 1, struct.pack(">I", 6))],
    "signed-short": [(0x112, 8, 1, _s(6))],
    "signed-long": [(0x112, 9, 1, struct.pack(">i", 6))],
    "signed-byte": [(0x112, 6, 1, bytes([6, 0, 0, 0]))],
    "byte": [(0x112, 1, 1, bytes([6, 0, 0, 0]))],
    "undefined": [(0x112, 7, 1, bytes([6, 0, 0, 0]))],
    "ascii": [(0x112, 2, 1, bytes([6, 0, 0, 0]))],
    "rational": [(0x112, 5, 1, struct.pack(">I", 26))],
    "unknown-type-then-short": [(0x112, 99, 1, _s(3)), (0x112, 3, 1, _s(6))],
    "first-of-two-wins": [(0x112, 3, 1, _s(3)), (0x112, 3, 1, _s(6))],
    "byte-then-short": [(0x112, 1, 1, bytes([6, 0, 0, 0])), (0x112, 3, 1, _s(6))],
    "outside-entry-ends-the-ifd": [(0x10F, 2, 40, struct.pack(">I", 5000)), (0x112, 3, 1, _s(6))],
    "outside-entry-after-it": [(0x112, 3, 1, _s(6)), (0x10F, 2, 40, struct.pack(">I", 5000))],
    "value-9": [(0x112, 3, 1, _s(9))],
}


def _orientation_of(data: bytes, size) -> int:
    """The orientation Pillow applies, found by comparing pixels."""
    plain = pil_rgb(data)
    shown = pil_rgb(data, transpose=True)
    ops = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1],
           4: lambda a: a[::-1], 5: lambda a: a.transpose(1, 0, 2),
           6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
           8: lambda a: np.rot90(a, 1)}
    found = [k for k, f in ops.items() if f(plain).shape == shown.shape
             and np.array_equal(f(plain), shown)]
    assert len(found) == 1, found
    return found[0]


def _jpeg_with_exif(*blocks) -> bytes:
    src = encode(photo(24, 16, seed=5), "JPEG", quality=95)
    segs = b"".join(b"\xff\xe1" + struct.pack(">H", len(t) + 8) + b"Exif\x00\x00" + t for t in blocks)
    return src[:2] + segs + src[2:]


@pytest.mark.parametrize("name", list(EXIF_CASES))
def test_jpeg_exif_entries_like_pillow(name):
    data = _jpeg_with_exif(tiff(EXIF_CASES[name], extra=_EXTRA))
    want = _orientation_of(data, (24, 16))
    assert datago.read_header(data).orientation == want, name
    assert_close(datago.decode(data), pil_rgb(data, transpose=True))


LE_CASES = {
    "short": [(0x112, 3, 1, _s(6, le=True))],
    "short-count-3-offset-outside": [(0x112, 3, 3, struct.pack("<I", 1000))],
    "short-count-3-in-bounds": [(0x112, 3, 3, struct.pack("<I", 26))],
    "huge-count": [(0x112, 3, 0x80000001, struct.pack("<I", 26))],
    "first-of-two-wins": [(0x112, 3, 1, _s(8, le=True)), (0x112, 3, 1, _s(6, le=True))],
}


@pytest.mark.parametrize("name", list(LE_CASES))
def test_little_endian_exif(name):
    data = _jpeg_with_exif(tiff(LE_CASES[name], le=True, extra=b"\x06\x00" * 8))
    assert datago.read_header(data).orientation == _orientation_of(data, (24, 16))


def test_only_the_first_exif_segment_counts():
    no_orientation = tiff([(0x10F, 2, 4, b"abc\x00")])
    for first, second, want in [(no_orientation, tiff([(0x112, 3, 1, _s(6))]), 1),
                                (tiff([(0x112, 3, 1, _s(1))]), tiff([(0x112, 3, 1, _s(6))]), 1),
                                (tiff([(0x112, 3, 1, _s(8))]), tiff([(0x112, 3, 1, _s(6))]), 8)]:
        data = _jpeg_with_exif(first, second)
        assert _orientation_of(data, (24, 16)) == want
        assert datago.read_header(data).orientation == want


def test_truncated_ifd_keeps_the_entries_before_the_cut():
    t = tiff([(0x112, 3, 1, _s(6))])
    t = t[:8] + struct.pack(">H", 50) + t[10:]               # 50 entries announced, 1 present
    data = _jpeg_with_exif(t)
    assert datago.read_header(data).orientation == _orientation_of(data, (24, 16)) == 6


# --------------------------------------------------------------------------- PNG eXIf

def chunk(typ: bytes, body: bytes, good_crc: bool = True) -> bytes:
    crc = zlib.crc32(typ + body) ^ (0 if good_crc else 1)
    return struct.pack(">I", len(body)) + typ + body + struct.pack(">I", crc)


def _exif(k: int) -> bytes:
    return tiff([(0x112, 3, 1, _s(k))])


def _png_with(arr: np.ndarray, before: bytes = b"", after: bytes = b"") -> bytes:
    data = encode(arr, "PNG")
    idat = data.find(b"IDAT") - 4
    iend = data.rfind(b"IEND") - 4
    return data[:idat] + before + data[idat:iend] + after + data[iend:]


PNG_EXIF_CASES = {
    "after-IDAT": (b"", chunk(b"eXIf", _exif(6))),
    "before-and-after: the last": (chunk(b"eXIf", _exif(3)), chunk(b"eXIf", _exif(6))),
    "two-before: the last": (chunk(b"eXIf", _exif(3)) + chunk(b"eXIf", _exif(8)), b""),
    "two-after: the last": (b"", chunk(b"eXIf", _exif(3)) + chunk(b"eXIf", _exif(8))),
    "Exif-prefix": (chunk(b"eXIf", b"Exif\x00\x00" + _exif(5)), b""),
    "after-IDAT-without-orientation": (chunk(b"eXIf", _exif(6)),
                                       chunk(b"eXIf", tiff([(0x10F, 2, 4, b"abc\x00")]))),
}


@pytest.mark.parametrize("kind", ["rgb8", "rgba16", "trns"])
@pytest.mark.parametrize("name", list(PNG_EXIF_CASES))
def test_png_exif_anywhere(name, kind):
    """Both PNG paths (our fast path: 8-bit; libspng: 16-bit, tRNS) read eXIf wherever
    it is, as Pillow does."""
    before, after = PNG_EXIF_CASES[name]
    arr = photo(40, 24, seed=8)
    if kind == "rgba16":
        arr16 = (arr.astype(np.uint16) * 257)
        raw = np.dstack([arr16, np.full((24, 40), 65535, np.uint16)])
        from test_decode import make_png
        data = make_png(raw, 16, 6)
        idat = data.find(b"IDAT") - 4
        iend = data.rfind(b"IEND") - 4
        data = data[:idat] + before + data[idat:iend] + after + data[iend:]
    elif kind == "trns":
        data = _png_with(arr, before + chunk(b"tRNS", struct.pack(">HHH", 1, 2, 3)), after)
    else:
        data = _png_with(arr, before, after)
    want = _orientation_of(data, (40, 24))
    assert datago.read_header(data).orientation == want
    assert np.array_equal(datago.decode(data), pil_rgb(data, transpose=True))
    dh, dw = (40, 24) if want >= 5 else (24, 40)
    res = datago.decode_to_bucket(data, bucket=(dh, dw), filter="nearest")
    assert np.array_equal(res.image, pil_rgb(data, transpose=True))


def test_png_exif_with_bad_crc_is_ignored():
    data = _png_with(photo(40, 24, seed=8), b"", chunk(b"eXIf", _exif(6), good_crc=False))
    assert datago.read_header(data).orientation == 1
    assert datago.decode(data).shape == (24, 40, 3)
