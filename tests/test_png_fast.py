"""The PNG fast path (libdeflate + our unfilter) against libspng and exact pixels.

The reference is libspng alone: ``_pipeline.decode_png_libspng`` (``decode``
through libspng, never the fast path) and, inside the fused paths, the same
pixels stored Adam7-interlaced, which the fast path leaves to libspng.
"""

import struct
import zlib

import numpy as np
import pytest

import datago
from datago._core import _pipeline
from datago.image import DEFAULT_BACKGROUND, DEFAULT_MAX_PIXELS, _orient


def chunk(typ: bytes, body: bytes, crc_ok: bool = True) -> bytes:
    crc = zlib.crc32(typ + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + typ + body + struct.pack(">I", crc if crc_ok else crc ^ 1)


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def filter_rows(img: np.ndarray, filters) -> bytes:
    """Filter each row with the given PNG filter types (cycled)."""
    h, w, c = img.shape
    raw = img.reshape(h, w * c).astype(np.int32)
    out = bytearray()
    prev = np.zeros(w * c, np.int32)
    for y in range(h):
        f = filters[y % len(filters)]
        row = raw[y]
        left = np.concatenate([np.zeros(c, np.int32), row[:-c]])
        upleft = np.concatenate([np.zeros(c, np.int32), prev[:-c]])
        pred = {0: 0, 1: left, 2: prev, 3: (left + prev) // 2, 4: _paeth(left, prev, upleft)}[f]
        out += bytes([f]) + ((row - pred) % 256).astype(np.uint8).tobytes()
        prev = row
    return bytes(out)


# Adam7 passes: (x0, y0, dx, dy)
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
         (0, 1, 1, 2))


def encode(img, colour_type, filters=(0, 1, 2, 3, 4), idat_parts=1, extra_before=b"",
           extra_after=b"", level=6, interlace=False):
    h, w = img.shape[:2]
    if interlace:       # each pass filtered as an image of its own; empty passes left out
        raw = b"".join(filter_rows(img[y0::dy, x0::dx], filters)
                       for x0, y0, dx, dy in ADAM7 if img[y0::dy, x0::dx].size)
    else:
        raw = filter_rows(img, filters)
    data = zlib.compress(raw, level)
    cuts = np.linspace(0, len(data), idat_parts + 1).astype(int)
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0,
                                                             int(interlace)))
    out += extra_before
    for a, b in zip(cuts[:-1], cuts[1:]):
        out += chunk(b"IDAT", data[a:b])
    out += extra_after + chunk(b"IEND", b"")
    return out


def libspng(data, mode="RGB", background=DEFAULT_BACKGROUND):
    """The reference: ``datago.decode(data, mode=mode)`` through libspng alone."""
    arr, orientation, _ = _pipeline.decode_png_libspng(data, mode, DEFAULT_MAX_PIXELS,
                                                       bytes(background))
    return _orient(arr, orientation)


def both_paths(data, mode="RGB"):
    """``datago.decode`` (the fast path where it applies) and the libspng reference."""
    return datago.decode(data, mode=mode), libspng(data, mode)


IMG = np.random.default_rng(0).integers(0, 256, (29, 41, 4), dtype=np.uint8)


@pytest.mark.parametrize("ct, channels", [(0, 1), (2, 3), (6, 4)])
@pytest.mark.parametrize("filters", [(0,), (1,), (2,), (3,), (4,), (4, 3, 2, 1, 0)],
                         ids=lambda f: "f" + "".join(map(str, f)))
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_filters_and_modes_match_libspng(ct, channels, filters, mode):
    img = IMG[:, :, :channels].copy()
    data = encode(img, ct, filters, idat_parts=3)
    fast, slow = both_paths(data, mode)
    assert np.array_equal(fast, slow)
    if mode == "RGBA" and ct == 6:
        assert np.array_equal(fast, img)
    if mode == "RGB" and ct == 2:
        assert np.array_equal(fast, img)
    if mode == "L" and ct == 0:
        assert np.array_equal(fast, img)


def _de_bruijn(k: int, n: int) -> list:
    """A de Bruijn sequence B(k, n) made linear: every run of n symbols appears."""
    a, seq = [0] * k * n, []

    def db(t, p):
        if t > n:
            if n % p == 0:
                seq.extend(a[1:p + 1])
        else:
            a[t] = a[t - p]
            db(t + 1, p)
            for j in range(a[t - p] + 1, k):
                a[t] = j
                db(t + 1, t)
    db(1, 1)
    return seq + seq[:n - 1]


# Row filters after the first row: every filter after every filter, then runs of 1 to 4
# Paeth rows (the SIMD unfilter does two Paeth rows at once).
FILTER_TAIL = _de_bruijn(5, 2) + [4, 4, 4, 0, 4, 4, 4, 4, 1, 4]


@pytest.mark.parametrize("ct, channels", [(0, 1), (2, 3), (6, 4)])
@pytest.mark.parametrize("width", [1, 2, 3, 5, 17, 33])
@pytest.mark.parametrize("values", ["random", "few"])
def test_every_filter_per_row_matches_libspng(ct, channels, width, values):
    """Every filter type on the first row and after every other one, for each colour
    type the fast path takes, at odd widths: the fast path's pixels are the image's,
    as libspng's are.  "few" values (0 to 5 and 250 to 255) make the Paeth distances
    tie often and the sums wrap around."""
    rng = np.random.default_rng(width * 10 + channels)
    for first in range(5):
        filters = [first] + FILTER_TAIL
        shape = (len(filters), width, channels)
        if values == "random":
            img = rng.integers(0, 256, shape, dtype=np.uint8)
        else:
            img = rng.choice(np.r_[0:6, 250:256].astype(np.uint8), shape)
        data = encode(img, ct, filters)
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
        fast, slow = both_paths(data, mode)
        assert np.array_equal(slow, img)
        assert np.array_equal(fast, img), f"first filter {first}"


@pytest.mark.parametrize("bpp", [1, 2, 3, 4, 6])
def test_unfilter_simd_matches_scalar(bpp):
    """The unfilter's SIMD loops (3 and 4 bytes per pixel) against its scalar loops,
    on random filtered bytes with random filter types; a filter type above 4 stops
    both at the same row."""
    from datago._core import _png
    rng = np.random.default_rng(bpp)
    for width in (1, 2, 3, 5, 17, 33, 100):
        for trial in range(12):
            h = int(rng.integers(1, 12))
            raw = rng.integers(0, 256, (h, 1 + width * bpp), dtype=np.uint8)
            if trial % 2:
                raw[:, 1:] = rng.integers(126, 130, (h, width * bpp))
            raw[:, 0] = 4 if trial % 3 == 0 else rng.integers(0, 5, h)
            if trial == 11:
                raw[h // 2, 0] = 5
            a, b = bytearray(raw.tobytes()), bytearray(raw.tobytes())
            ok_a = _png._unfilter(a, width, h, bpp, simd=True)
            ok_b = _png._unfilter(b, width, h, bpp, simd=False)
            assert ok_a == ok_b == (trial != 11)
            assert a == b, (width, h, raw[:, 0].tolist())


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 0, 0), (12, 200, 77)])
def test_alpha_composite_is_exact(background):
    """RGBA composited over the background (4 pixels at a time, then one by one)
    is round((c * a + bg * (255 - a)) / 255) for every alpha, at widths around
    multiples of 4: in decode (RGB, L) and in decode_to_bucket (RGBX, resampled),
    on the fast path and on libspng's."""
    rng = np.random.default_rng(sum(background))
    bg = np.array(background, np.int64)
    for width in (1, 2, 3, 4, 5, 7, 8, 9, 17, 64):
        img = rng.integers(0, 256, (256 // width + 3, width, 4), dtype=np.uint8)
        img[..., 3].flat[:256] = np.arange(256)                  # every alpha
        c, a = img[..., :3].astype(np.int64), img[..., 3:].astype(np.int64)
        want = ((c * a + bg * (255 - a) + 127) // 255).astype(np.uint8)
        data = encode(img, 6, (4, 1))
        adam7 = encode(img, 6, (4, 1), interlace=True)           # libspng's route
        for d in (data, adam7):
            assert np.array_equal(datago.decode(d, background=background), want)
            assert np.array_equal(datago.decode(d, mode="L", background=background),
                                  _luma(want))
            res = datago.decode_to_bucket(d, bucket=(5, 3), background=background)
            ref = datago.resize(want, (5, 3), box=res.crop_box).reshape(res.image.shape)
            assert np.array_equal(res.image, ref), width


def _luma(rgb):
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return ((19595 * r + 38470 * g + 7471 * b + 32768) >> 16).astype(np.uint8)[..., None]


@pytest.mark.parametrize("ct, channels", [(0, 1), (2, 3), (6, 4)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_interlaced_copy_takes_libspng_and_matches(ct, channels, mode):
    """The oracle of the fused tests below: the Adam7 copy decodes (through libspng)
    to the same pixels as the original."""
    img = IMG[:, :, :channels].copy()
    data = encode(img, ct, (4, 1, 3), idat_parts=2)
    adam7 = encode(img, ct, (4, 1, 3), idat_parts=2, interlace=True)
    assert np.array_equal(datago.decode(adam7, mode=mode), libspng(data, mode))
    assert np.array_equal(libspng(adam7, mode), libspng(data, mode))


def _corrupt_idat(data: bytes) -> bytes:
    """``data`` with its first IDAT replaced by a zlib stream whose first deflate block
    has the reserved type 3 (CRC valid)."""
    at = data.index(b"IDAT")
    n = struct.unpack(">I", data[at - 4:at])[0]
    return data[:at - 4] + chunk(b"IDAT", b"\x78\x9c" + b"\xff" * 20) + data[at + 8 + n:]


@pytest.mark.parametrize("ct, channels", [(0, 1), (2, 3), (6, 4)])
def test_which_path_decodes(ct, channels):
    """The comparisons here are not vacuous: a corrupt stream is reported in the words of
    the path that read it -- the fast path (libdeflate) for the plain files in
    decode, decode_to_bucket and masks, libspng for their Adam7 copies and for the
    reference."""
    img = IMG[:, :, :channels].copy()
    fast_words, spng_words = "zlib stream or Adler-32", "IDAT stream error"
    for interlace, words in ((False, fast_words), (True, spng_words)):
        data = _corrupt_idat(encode(img, ct, interlace=interlace))
        for fn in (datago.decode, lambda d: datago.decode_to_bucket(d, bucket=(16, 16)),
                   lambda d: datago.decode_to_bucket(d, bucket=(16, 16), mask=True)):
            with pytest.raises(datago.DecodeError, match=words):
                fn(data)
        with pytest.raises(datago.DecodeError, match=spng_words):
            libspng(data)


@pytest.mark.parametrize("ct, channels", [(0, 1), (2, 3), (6, 4)])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_decode_to_bucket_matches_libspng(ct, channels, mode):
    rng = np.random.default_rng(ct)
    img = rng.integers(0, 256, (150, 230, channels), dtype=np.uint8)
    data = encode(img, ct, (4, 1, 3), idat_parts=5)
    adam7 = encode(img, ct, (4, 1, 3), idat_parts=5, interlace=True)     # libspng's route
    ref = libspng(data, mode)
    for bucket in [(48, 64), (200, 300), (128, 16)]:                    # (height, width)
        fast = datago.decode_to_bucket(data, bucket=bucket, mode=mode)
        slow = datago.decode_to_bucket(adam7, bucket=bucket, mode=mode)
        assert np.array_equal(fast.image, slow.image)
        # cover_box is the core's: (display w, display h, bucket w, bucket h)
        assert fast.crop_box == slow.crop_box == _pipeline.cover_box(230, 150, *bucket[::-1])
        # and libspng's full decode through the resampler alone gives the same pixels
        want = datago.resize(ref, bucket, box=fast.crop_box).reshape(fast.image.shape)
        assert np.array_equal(fast.image, want)
    fm = datago.decode_to_bucket(data, bucket=(40, 60), mask=True)
    sm = datago.decode_to_bucket(adam7, bucket=(40, 60), mask=True)
    assert np.array_equal(fm.image, sm.image)
    values = img[:, :, :3]                                   # a mask's values: alpha dropped
    want = datago.resize(values, (40, 60), box=fm.crop_box, filter="nearest")
    assert np.array_equal(fm.image, want.reshape(fm.image.shape))


def test_ancillary_chunks_exif_and_plte_hint():
    img = IMG[:, :, :3].copy()
    exif = b"MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00\x00\x00\x00\x00"
    data = encode(img, 2, extra_before=chunk(b"tEXt", b"Comment\x00hi") + chunk(b"eXIf", exif)
                  + chunk(b"PLTE", bytes(range(48))), extra_after=chunk(b"tIME", b"\x07\xe9\x01\x01\x00\x00\x00"))
    fast, slow = both_paths(data)
    assert np.array_equal(fast, slow)
    assert np.array_equal(fast, np.rot90(img, -1))          # orientation 6 applied
    assert datago.read_header(data).orientation == 6


@pytest.mark.parametrize("ct", [3, 4])
def test_other_types_take_libspng(ct):
    rng = np.random.default_rng(1)
    if ct == 3:
        idx = rng.integers(0, 4, (20, 30, 1), dtype=np.uint8)
        pal = chunk(b"PLTE", bytes([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255]))
        data = encode(idx, 3, extra_before=pal)
    else:
        data = encode(rng.integers(0, 256, (20, 30, 2), dtype=np.uint8), 4)
    fast, slow = both_paths(data)
    assert np.array_equal(fast, slow)


def test_trns_takes_libspng_and_is_applied():
    img = np.zeros((10, 12, 3), np.uint8)
    img[:, 6:] = (10, 20, 30)
    data = encode(img, 2, extra_before=chunk(b"tRNS", struct.pack(">HHH", 10, 20, 30)))
    out = datago.decode(data, background=(200, 100, 0))
    assert (out[:, 6:] == (200, 100, 0)).all() and (out[:, :6] == 0).all()


@pytest.mark.parametrize("case", ["bad_filter", "crc_idat", "truncated_idat",
                                  "corrupt_zlib", "short_data"])
def test_errors(case):
    img = IMG[:, :, :3].copy()
    if case == "bad_filter":
        raw = bytearray(filter_rows(img, (0,)))
        raw[(1 + img.shape[1] * 3) * 5] = 7
        data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 41, 29, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b""))
        match = "filter"
    elif case == "crc_idat":
        data = bytearray(encode(img, 2, idat_parts=2))
        i = data.index(b"IEND") - 8
        data[i] ^= 0xFF                                   # last byte of the last IDAT's CRC
        data = bytes(data)
        match = "CRC|checksum"
    elif case == "truncated_idat":
        full = encode(img, 2)
        data = full[: full.index(b"IDAT") + 40]
        match = "truncated"
    elif case == "corrupt_zlib":
        raw = zlib.compress(filter_rows(img, (0,)))
        bad = raw[:10] + bytes(b ^ 0x5A for b in raw[10:40]) + raw[40:]
        data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 41, 29, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", bad) + chunk(b"IEND", b""))
        match = "PNG"
    else:                                                 # fewer rows than the header says
        raw = filter_rows(img[:20], (0,))
        data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 41, 29, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
        match = "PNG"
    with pytest.raises(datago.DecodeError, match=match):
        datago.decode(data)
    with pytest.raises(datago.DecodeError, match=match):
        datago.decode_to_bucket(data, bucket=(16, 16))
    with pytest.raises(datago.DecodeError, match=match):
        datago.decode_to_bucket(data, bucket=(16, 16), mask=True)
    with pytest.raises(datago.DecodeError, match=match):
        libspng(data)


def test_ancillary_chunk_with_bad_crc_is_ignored_by_both_paths():
    img = IMG[:, :, :3].copy()
    exif = b"MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00\x00\x00\x00\x00"
    data = encode(img, 2, extra_before=chunk(b"tEXt", b"a\x00b", crc_ok=False)
                  + chunk(b"eXIf", exif, crc_ok=False))
    fast, slow = both_paths(data)
    assert np.array_equal(fast, img) and np.array_equal(slow, img)   # eXIf ignored too


def test_more_data_than_the_header_hands_over_to_libspng():
    img = IMG[:, :, :3].copy()
    raw = filter_rows(np.concatenate([img, img]), (0,))    # twice the rows
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 41, 29, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    fast, slow = _try(lambda: datago.decode(data)), _try(lambda: libspng(data))
    assert type(fast) is type(slow)
    if isinstance(fast, np.ndarray):
        assert np.array_equal(fast, slow)


def _try(fn):
    try:
        return fn()
    except datago.DecodeError as e:
        return e


# ----------------------------------------------------------------------------- what libspng refuses

EXIF6 = b"MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00\x00\x00\x00\x00"


def _png_with(ct=2, before=b"", after=b"", iend=None, corrupt=False):
    """A small PNG with chunks before and after its IDAT, and another IEND if given;
    ``corrupt``: the IDAT holds a broken zlib stream (which path read it shows in
    the message)."""
    img = IMG[:5, :7, :{0: 1, 2: 3, 6: 4}[ct]].copy()
    data = encode(img, ct, (4, 1), extra_before=before, extra_after=after)
    if corrupt:
        data = _corrupt_idat(data)
    if iend is not None:
        data = data[:-12] + iend
    return data


def _texts(k, crc_ok=True):
    return b"".join(chunk(b"tEXt", b"k\x00%d" % i, crc_ok) for i in range(k))


# file -> libspng's words.  libspng 0.7 discards most invalid ancillary chunks, but not
# these: the fast path hands them over, so the message is libspng's on every path.
REFUSED = {
    "IEND with 1 byte": (dict(iend=chunk(b"IEND", b"\x00")), "invalid chunk length"),
    "IEND with 4 bytes": (dict(iend=chunk(b"IEND", b"abcd")), "invalid chunk length"),
    "PLTE of 0 bytes": (dict(before=chunk(b"PLTE", b"")), "invalid chunk length"),
    "PLTE of 2 bytes": (dict(before=chunk(b"PLTE", b"ab")), "invalid chunk length"),
    "PLTE of 2 bytes, RGBA": (dict(ct=6, before=chunk(b"PLTE", b"ab")), "invalid chunk length"),
    "PLTE of 4 bytes": (dict(before=chunk(b"PLTE", bytes(4))), "invalid chunk length"),
    "PLTE of 257 entries": (dict(before=chunk(b"PLTE", bytes(771))), "invalid chunk length"),
    "PLTE of 2 bytes after IDAT": (dict(after=chunk(b"PLTE", b"ab")), "invalid chunk length"),
    "PLTE after bKGD": (dict(before=chunk(b"bKGD", bytes(6)) + chunk(b"PLTE", bytes(6))),
                        "invalid chunk position"),
    "empty eXIf": (dict(before=chunk(b"eXIf", b"")), "chunk/cache limits"),
    "empty eXIf, RGBA": (dict(ct=6, before=chunk(b"eXIf", b"")), "chunk/cache limits"),
    "empty eXIf after IDAT": (dict(after=chunk(b"eXIf", b"")), "chunk/cache limits"),
    "empty eXIf with a bad CRC": (dict(before=chunk(b"eXIf", b"", crc_ok=False)),
                                  "chunk/cache limits"),
    "1001 tEXt": (dict(before=_texts(1001)), "chunk/cache limits"),
    "1001 tEXt with bad CRCs": (dict(before=_texts(1001, crc_ok=False)), "chunk/cache limits"),
    "500 tEXt before IDAT, 501 after": (dict(before=_texts(500), after=_texts(501)),
                                        "chunk/cache limits"),
    # a chunk type that is not four letters, its "critical" bit (bit 5 of the first
    # byte) clear: the fuzzer's find (fuzz_core, seed 12)
    "critical non-letter chunk after IDAT": (dict(after=chunk(b"\x04\x01v[", b"")),
                                             "unknown critical chunk"),
    "critical non-letter chunk before IDAT": (dict(before=chunk(b"\x1bxyz", b"ab")),
                                              "unknown critical chunk"),
    "unknown critical chunk after IDAT": (dict(after=chunk(b"ABCD", b"")),
                                          "unknown critical chunk"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_fast_path_hands_over_what_libspng_refuses(case):
    kw, words = REFUSED[case]
    data = _png_with(**kw)
    match = "PNG: (reading the header|decoding) failed: .*" + words
    with pytest.raises(datago.DecodeError, match=match):
        libspng(data)
    with pytest.raises(datago.DecodeError, match=match):
        datago.decode(data)
    with pytest.raises(datago.DecodeError, match=match):
        datago.decode_to_bucket(data, bucket=(4, 4))
    with pytest.raises(datago.DecodeError, match=match):
        datago.decode_to_bucket(data, bucket=(4, 4), mask=True)


def test_decompression_bomb_in_ztxt_is_libspngs_to_refuse():
    """A zTXt (or iCCP, iTXt) whose text inflates beyond the chunk limit: the walk
    bounds what the compressed chunks could inflate to and hands the file over."""
    bomb = zlib.compress(bytes(65 << 20), 9)                 # 64 KiB -> 65 MiB
    for typ, head in ((b"zTXt", b"k\x00\x00"), (b"iCCP", b"icc\x00\x00")):
        data = _png_with(before=chunk(typ, head + bomb))
        for fn in (libspng, datago.decode):
            with pytest.raises(datago.DecodeError, match="chunk/cache limits"):
                fn(data)


ACCEPTED = {
    "PLTE of 1 entry": dict(before=chunk(b"PLTE", b"abc")),
    "PLTE of 256 entries": dict(before=chunk(b"PLTE", bytes(768))),
    "two PLTE": dict(before=chunk(b"PLTE", bytes(6)) + chunk(b"PLTE", bytes(6))),
    "PLTE after IDAT": dict(after=chunk(b"PLTE", bytes(6))),
    "eXIf, then an empty one": dict(before=chunk(b"eXIf", EXIF6) + chunk(b"eXIf", b"")),
    "eXIf of 3 bytes": dict(before=chunk(b"eXIf", b"MM\x00")),
    "hIST without PLTE, then PLTE": dict(before=chunk(b"hIST", bytes(4)) + chunk(b"PLTE", bytes(6))),
    "1000 tEXt": dict(before=_texts(1000)),
    "1100 empty tEXt": dict(before=b"".join(chunk(b"tEXt", b"") for _ in range(1100))),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_what_libspng_accepts_decodes_the_same(case):
    data = _png_with(**ACCEPTED[case])
    fast, slow = both_paths(data)
    assert np.array_equal(fast, slow)
    assert np.array_equal(slow, IMG[:5, :7, :3])      # (the last eXIf counts: no rotation)


@pytest.mark.parametrize("before", [
    chunk(b"PLTE", bytes(768)) + chunk(b"bKGD", bytes(6)) + chunk(b"hIST", bytes(512)),
    chunk(b"eXIf", EXIF6) + _texts(254) + chunk(b"iCCP", b"icc\x00\x00" + bytes(30000)),
    chunk(b"gAMA", bytes(4)) + chunk(b"sRGB", b"\x00") + chunk(b"pHYs", bytes(9))],
    ids=["plte-bkgd-hist", "exif-256-texts-iccp", "gama-srgb-phys"])
def test_ordinary_ancillary_chunks_stay_on_the_fast_path(before):
    """The new checks cost no fast-path file with the usual chunks: the broken zlib
    stream is reported in the fast path's words (libdeflate), not libspng's."""
    data = _png_with(before=before, after=chunk(b"tIME", b"\x07\xe9\x01\x01\x00\x00\x00"),
                     corrupt=True)
    with pytest.raises(datago.DecodeError, match="zlib stream or Adler-32"):
        datago.decode(data)
    with pytest.raises(datago.DecodeError, match="IDAT stream error"):
        libspng(data)
