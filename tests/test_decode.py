"""Decoded pixels vs an oracle (Pillow, or numpy applying the documented conventions).

Everything is generated here (Pillow / numpy / zlib / PyTurboJPEG); nothing is
downloaded.  Lossy formats are compared with a mean absolute difference per
channel < 1.0 against Pillow; lossless ones (PNG, WebP lossless, BMP, GIF, TIFF)
are compared exactly against an array computed with the documented integer
conventions:

* 16-bit samples -> ``(v * 255 + 32767) // 65535`` (round(v / 257));
* alpha dropped -> ``(c * a + bg * (255 - a) + 127) // 255`` per channel;
* ``"L"`` -> ``(19595 R + 38470 G + 7471 B + 32768) >> 16``;
* grey is replicated into R, G, B.
"""

from __future__ import annotations

import gc
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

import datago
from conftest import encode, photo

BG = (128, 128, 128)
ODD_BG = (250, 20, 90)


# --------------------------------------------------------------------------- helpers

def pil_open(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def pil_array(data: bytes, mode: str = "RGB", transpose: bool = False) -> np.ndarray:
    im = pil_open(data)
    if transpose:
        im = ImageOps.exif_transpose(im)
    a = np.asarray(im.convert(mode))
    return a[:, :, None] if a.ndim == 2 else a


def assert_close(got: np.ndarray, want: np.ndarray, tol: float = 1.0):
    """Same shape and dtype, mean absolute difference per channel < tol."""
    assert isinstance(got, np.ndarray)
    assert got.dtype == np.uint8, got.dtype
    assert got.shape == want.shape, (got.shape, want.shape)
    d = np.abs(got.astype(np.int32) - want.astype(np.int32))
    per_channel = d.reshape(-1, d.shape[-1]).mean(axis=0)
    assert per_channel.max() < tol, f"mean abs diff per channel {per_channel}, max {d.max()}"


def assert_exact(got: np.ndarray, want: np.ndarray):
    assert isinstance(got, np.ndarray)
    assert got.dtype == np.uint8, got.dtype
    assert got.shape == want.shape, (got.shape, want.shape)
    if not np.array_equal(got, want):
        d = np.abs(got.astype(np.int32) - want.astype(np.int32))
        idx = np.argwhere(d)[:5].tolist()
        raise AssertionError(f"{int((d > 0).sum())} of {d.size} values differ, max diff {d.max()}, "
                             f"mean {d.mean():.4f}; first at {idx}: "
                             f"got {[int(got[tuple(i)]) for i in idx]} want {[int(want[tuple(i)]) for i in idx]}")


def reduce16(v) -> np.ndarray:
    return ((np.asarray(v, dtype=np.int64) * 255 + 32767) // 65535).astype(np.uint8)


def composite(rgba: np.ndarray, bg=BG) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3) uint8 over ``bg`` with the documented integer formula."""
    c = rgba[..., :3].astype(np.int64)
    a = rgba[..., 3:4].astype(np.int64)
    b = np.asarray(bg, dtype=np.int64)
    return ((c * a + b * (255 - a) + 127) // 255).astype(np.uint8)


def luma(rgb: np.ndarray) -> np.ndarray:
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return ((19595 * r + 38470 * g + 7471 * b + 32768) >> 16).astype(np.uint8)[..., None]


def from_rgba(rgba: np.ndarray, mode: str, bg=BG) -> np.ndarray:
    """What decode(..., mode, background=bg) must return for a source whose 8-bit RGBA is rgba."""
    if mode == "RGBA":
        return rgba
    rgb = composite(rgba, bg)
    return rgb if mode == "RGB" else luma(rgb)


def with_alpha(h: int, w: int, seed: int) -> np.ndarray:
    """An alpha plane with fully transparent, fully opaque and intermediate regions."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w)).astype(np.uint8)
    a[: h // 3, : w // 3] = 0
    a[h // 3: 2 * h // 3, w // 3: 2 * w // 3] = 255
    return a


# --------------------------------------------------------------------------- JPEG

def _jpeg_pillow(arr, sub, progressive):
    return encode(arr, "JPEG", quality=90, subsampling=sub, progressive=progressive)


def _jpeg_turbo(arr, samp, progressive):
    turbojpeg = pytest.importorskip("turbojpeg", reason="PyTurboJPEG needed to write 4:4:0 JPEGs")
    try:
        tj = turbojpeg.TurboJPEG()
    except Exception as e:  # library not loadable
        pytest.skip(f"libturbojpeg not loadable: {e}")
    flags = turbojpeg.TJFLAG_PROGRESSIVE if progressive else 0
    return tj.encode(np.ascontiguousarray(arr), quality=90, pixel_format=turbojpeg.TJPF_RGB,
                     jpeg_subsample=getattr(turbojpeg, samp), flags=flags)


SUBSAMPLINGS = [("444", lambda a, p: _jpeg_pillow(a, "4:4:4", p)),
                ("422", lambda a, p: _jpeg_pillow(a, "4:2:2", p)),
                ("420", lambda a, p: _jpeg_pillow(a, "4:2:0", p)),
                ("440", lambda a, p: _jpeg_turbo(a, "TJSAMP_440", p))]


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
@pytest.mark.parametrize("sub,enc", SUBSAMPLINGS, ids=[s[0] for s in SUBSAMPLINGS])
def test_jpeg_colour_vs_pillow(sub, enc, progressive):
    data = enc(photo(99, 71, seed=3), progressive)
    want = pil_array(data)
    assert_close(datago.decode(data), want)
    # RGBA: colour as RGB, opaque alpha
    rgba = datago.decode(data, mode="RGBA")
    assert rgba.shape == (71, 99, 4)
    assert (rgba[..., 3] == 255).all()
    assert_close(rgba[..., :3], want)


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
@pytest.mark.parametrize("sub,enc", SUBSAMPLINGS[:3], ids=[s[0] for s in SUBSAMPLINGS[:3]])
def test_jpeg_colour_as_L(sub, enc, progressive):
    data = enc(photo(99, 71, seed=4), progressive)
    got = datago.decode(data, mode="L")
    # Pillow's convert("L") of the decoded RGB, with a tolerance ...
    assert_close(got, pil_array(data, "L"))
    # ... and libjpeg's own Y channel (Pillow's draft("L") makes libjpeg output Y).
    im = Image.open(io.BytesIO(data))
    im.draft("L", im.size)
    assert im.mode == "L" and im.size == (99, 71)
    assert_close(got, np.asarray(im)[:, :, None])


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_jpeg_grey(progressive):
    grey = photo(61, 45, seed=5)[..., 1]
    data = encode(Image.fromarray(grey, "L"), "JPEG", quality=90, progressive=progressive)
    assert pil_open(data).mode == "L"
    want_l = pil_array(data, "L")
    rgb = datago.decode(data)
    assert rgb.shape == (45, 61, 3)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert_close(rgb, pil_array(data, "RGB"))
    assert_close(rgb[..., :1], want_l)
    assert_close(datago.decode(data, mode="L"), want_l)
    rgba = datago.decode(data, mode="RGBA")
    assert rgba.shape == (45, 61, 4) and (rgba[..., 3] == 255).all()
    assert_close(rgba[..., :3], rgb)


def test_jpeg_cmyk_vs_pillow():
    im = Image.fromarray(photo(57, 43, seed=6)).convert("CMYK")
    data = encode(im, "JPEG", quality=92)
    assert pil_open(data).mode == "CMYK"
    want = pil_array(data, "RGB")
    assert_close(datago.decode(data), want)
    assert_close(datago.decode(data, mode="L"), pil_array(data, "L"))


def test_jpeg_ycck_vs_pillow():
    turbojpeg = pytest.importorskip("turbojpeg", reason="PyTurboJPEG needed to write YCCK JPEGs")
    try:
        tj = turbojpeg.TurboJPEG()
    except Exception as e:
        pytest.skip(f"libturbojpeg not loadable: {e}")
    cmyk = np.ascontiguousarray(np.asarray(Image.fromarray(photo(57, 43, seed=7)).convert("CMYK")))
    data = tj.encode(cmyk, quality=92, pixel_format=turbojpeg.TJPF_CMYK,
                     jpeg_subsample=turbojpeg.TJSAMP_444)
    assert pil_open(data).mode == "CMYK"
    assert_close(datago.decode(data), pil_array(data, "RGB"))


ODD_SIZES = [(1, 1), (1, 23), (23, 1), (17, 9), (2, 3), (9, 17)]


@pytest.mark.parametrize("sub", ["4:4:4", "4:2:2", "4:2:0"], ids=["444", "422", "420"])
@pytest.mark.parametrize("w,h", ODD_SIZES, ids=[f"{w}x{h}" for w, h in ODD_SIZES])
def test_jpeg_odd_sizes(w, h, sub):
    data = encode(photo(w, h, seed=w * 31 + h), "JPEG", quality=90, subsampling=sub)
    got = datago.decode(data)
    assert got.shape == (h, w, 3)
    assert_close(got, pil_array(data))
    assert datago.decode(data, mode="L").shape == (h, w, 1)
    info = datago.read_header(data)
    assert (info.width, info.height, info.orientation) == (w, h, 1)


# --------------------------------------------------------------------------- PNG encoder

ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def png_chunk(typ: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + typ + body + struct.pack(">I", zlib.crc32(typ + body) & 0xFFFFFFFF)


def _pack_rows(samples: np.ndarray, bit_depth: int) -> bytes:
    """Filter-type-0 scanlines of an (h, w, c) sample array."""
    h, w, c = samples.shape
    out = bytearray()
    for y in range(h):
        row = samples[y].reshape(-1)
        if bit_depth == 16:
            raw = row.astype(">u2").tobytes()
        elif bit_depth == 8:
            raw = row.astype(np.uint8).tobytes()
        else:
            per = 8 // bit_depth
            n = -(-row.size // per)
            padded = np.zeros(n * per, dtype=np.uint8)
            padded[: row.size] = row
            padded = padded.reshape(n, per)
            packed = np.zeros(n, dtype=np.uint8)
            for i in range(per):
                packed |= (padded[:, i] << (8 - bit_depth * (i + 1))).astype(np.uint8)
            raw = packed.tobytes()
        out += b"\x00" + raw
    return bytes(out)


def make_png(samples: np.ndarray, bit_depth: int, colour_type: int, *, interlace: bool = False,
             palette: np.ndarray | None = None, trns: bytes | None = None,
             before_idat: bytes = b"") -> bytes:
    """A minimal PNG encoder: filter 0, one IDAT, optional PLTE/tRNS and Adam7."""
    samples = np.asarray(samples)
    if samples.ndim == 2:
        samples = samples[:, :, None]
    h, w, c = samples.shape
    assert c == CHANNELS[colour_type]
    if interlace:
        raw = b""
        for x0, y0, dx, dy in ADAM7:
            sub = samples[y0::dy, x0::dx]
            if sub.shape[0] and sub.shape[1]:
                raw += _pack_rows(sub, bit_depth)
    else:
        raw = _pack_rows(samples, bit_depth)
    out = b"\x89PNG\r\n\x1a\n"
    out += png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, int(interlace)))
    if palette is not None:
        out += png_chunk(b"PLTE", np.asarray(palette, dtype=np.uint8).tobytes())
    if trns is not None:
        out += png_chunk(b"tRNS", trns)
    out += before_idat
    out += png_chunk(b"IDAT", zlib.compress(raw, 9))
    out += png_chunk(b"IEND", b"")
    return out


def _sample_planes(w, h, bit_depth, channels, seed, alpha_last):
    """Sample values for a test PNG: photo-like content, 16-bit with random low bytes."""
    rng = np.random.default_rng(seed)
    base = photo(w, h, seed).astype(np.int64)
    planes = [base[..., i % 3] for i in range(channels)]
    if channels in (1, 2):
        planes[0] = luma(base.astype(np.uint8))[..., 0].astype(np.int64)
    if alpha_last:
        planes[-1] = with_alpha(h, w, seed + 1).astype(np.int64)
    s = np.stack(planes, axis=-1)
    if bit_depth == 16:
        s = s * 256 + rng.integers(0, 256, s.shape)       # low bytes decide round vs truncate
        if alpha_last:                                     # keep exact 0 and 65535 alpha too
            a = s[..., -1]
            a[: h // 3, : w // 3] = 0
            a[h // 3: 2 * h // 3, w // 3: 2 * w // 3] = 65535
    elif bit_depth < 8:
        s = s >> (8 - bit_depth)
    return s


def png_case(name: str, w: int = 37, h: int = 23, interlace: bool = False, seed: int = 11):
    """(png bytes, 8-bit RGBA the file represents) for a named PNG variant."""
    kind, bd = name.rsplit("_", 1)
    bd = int(bd)
    if kind == "grey":
        s = _sample_planes(w, h, bd, 1, seed, False)
        scale = {1: 255, 2: 85, 4: 17, 8: 1}
        g = reduce16(s[..., 0]) if bd == 16 else (s[..., 0] * scale[bd]).astype(np.uint8)
        rgba = np.dstack([g, g, g, np.full_like(g, 255)])
        return make_png(s, bd, 0, interlace=interlace), rgba
    if kind == "greyA":
        s = _sample_planes(w, h, bd, 2, seed, True)
        g, a = (reduce16(s[..., i]) if bd == 16 else s[..., i].astype(np.uint8) for i in (0, 1))
        return make_png(s, bd, 4, interlace=interlace), np.dstack([g, g, g, a])
    if kind in ("rgb", "rgba"):
        ch = 3 if kind == "rgb" else 4
        s = _sample_planes(w, h, bd, ch, seed, ch == 4)
        e = reduce16(s) if bd == 16 else s.astype(np.uint8)
        if ch == 3:
            e = np.dstack([e, np.full(e.shape[:2], 255, np.uint8)])
        return make_png(s, bd, 2 if ch == 3 else 6, interlace=interlace), e
    if kind in ("rgbkey", "greykey"):                      # tRNS colour key
        ch = 3 if kind == "rgbkey" else 1
        s = _sample_planes(w, h, bd, ch, seed, False)
        key = s[h // 2, w // 2].copy()
        s[: h // 4] = key                                   # a band of exactly the key colour
        transparent = (s == key).all(axis=-1)
        e = reduce16(s) if bd == 16 else s.astype(np.uint8)
        if ch == 1:
            e = np.repeat(e, 3, axis=-1)
        a = np.where(transparent, 0, 255).astype(np.uint8)
        trns = struct.pack(">" + "H" * ch, *[int(k) for k in key])
        return make_png(s, bd, 2 if ch == 3 else 0, interlace=interlace, trns=trns), np.dstack([e, a])
    if kind in ("pal", "paltrns"):
        rng = np.random.default_rng(seed)
        n = 1 << bd
        palette = rng.integers(0, 256, (n, 3)).astype(np.uint8)
        idx = rng.integers(0, n, (h, w))
        alpha = np.full(n, 255, np.uint8)
        trns = None
        if kind == "paltrns":
            k = max(1, n // 2)                              # tRNS shorter than PLTE: rest opaque
            alpha[:k] = rng.integers(0, 256, k)
            alpha[0] = 0
            trns = alpha[:k].tobytes()
        rgba = np.dstack([palette[idx], alpha[idx]])
        return make_png(idx, bd, 3, interlace=interlace, palette=palette, trns=trns), rgba
    raise ValueError(name)


PNG_KINDS = ["grey_1", "grey_2", "grey_4", "grey_8", "grey_16", "greyA_8", "greyA_16",
             "rgb_8", "rgb_16", "rgba_8", "rgba_16", "pal_1", "pal_2", "pal_4", "pal_8",
             "paltrns_2", "paltrns_8", "greykey_8", "greykey_16", "rgbkey_8", "rgbkey_16"]
MODES = ["RGB", "RGBA", "L"]


@pytest.mark.parametrize("kind", ["grey_1", "grey_2", "grey_4", "grey_8", "greyA_8", "rgb_8",
                                  "rgba_8", "pal_2", "pal_8", "paltrns_8", "rgbkey_8"])
@pytest.mark.parametrize("interlace", [False, True], ids=["plain", "adam7"])
def test_png_encoder_sanity(kind, interlace):
    """The test's own encoder and expected arrays agree with Pillow (8-bit and below)."""
    data, rgba = png_case(kind, interlace=interlace)
    assert_exact(np.asarray(pil_open(data).convert("RGBA")), rgba)


def test_png_encoder_sanity_16bit():
    data, rgba = png_case("rgb_16")
    s = _sample_planes(37, 23, 16, 3, 11, False)
    assert_exact(np.asarray(pil_open(data).convert("RGB")), (s >> 8).astype(np.uint8))
    data, _ = png_case("grey_16")
    s = _sample_planes(37, 23, 16, 1, 11, False)
    assert np.array_equal(np.asarray(pil_open(data)).astype(np.int64), s[..., 0])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("interlace", [False, True], ids=["plain", "adam7"])
@pytest.mark.parametrize("kind", PNG_KINDS)
def test_png_variants(kind, interlace, mode):
    data, rgba = png_case(kind, interlace=interlace)
    assert_exact(datago.decode(data, mode=mode), from_rgba(rgba, mode))


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("kind", ["greyA_8", "greyA_16", "rgba_8", "rgba_16", "paltrns_4", "rgbkey_8"])
def test_png_background(kind, mode):
    data, rgba = png_case(kind, interlace=False, seed=21)
    got = datago.decode(data, mode=mode, background=ODD_BG)
    assert_exact(got, from_rgba(rgba, mode, ODD_BG))
    # and the background really is used: fully transparent pixels are the background
    if mode == "RGB":
        transparent = rgba[..., 3] == 0
        assert transparent.any()
        assert (got[transparent] == np.array(ODD_BG, np.uint8)).all()


ADAM7_SIZES = [(1, 1), (2, 1), (1, 2), (3, 2), (5, 9), (8, 8), (9, 9), (17, 3)]


@pytest.mark.parametrize("kind", ["grey_1", "grey_4", "rgb_8", "rgba_16", "pal_2"])
@pytest.mark.parametrize("w,h", ADAM7_SIZES, ids=[f"{w}x{h}" for w, h in ADAM7_SIZES])
def test_png_adam7_small(w, h, kind):
    """Tiny interlaced images: some of the 7 passes are empty."""
    data, rgba = png_case(kind, w=w, h=h, interlace=True, seed=w * 7 + h)
    assert_exact(datago.decode(data, mode="RGBA"), rgba)
    assert_exact(datago.decode(data), composite(rgba))


@pytest.mark.parametrize("pil_mode", ["RGB", "RGBA", "L", "LA", "P", "P-trns", "P-trns-index", "I;16", "1"])
def test_png_pillow_written(pil_mode):
    """PNGs written by Pillow vs Pillow's own reading (8-bit ones) or the 16-bit rule."""
    arr = photo(45, 31, seed=12)
    kw = {}
    if pil_mode in ("RGB", "L", "1"):
        im = Image.fromarray(arr).convert(pil_mode)
    elif pil_mode in ("RGBA", "LA"):
        im = Image.fromarray(np.dstack([arr, with_alpha(31, 45, 1)])).convert(pil_mode)
    elif pil_mode.startswith("P"):
        im = Image.fromarray(arr).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        if pil_mode == "P-trns":
            kw["transparency"] = bytes(np.random.default_rng(1).integers(0, 256, 64).astype(np.uint8))
        elif pil_mode == "P-trns-index":
            kw["transparency"] = 3
    else:  # I;16
        v = (arr[..., 0].astype(np.uint16) * 256 + np.random.default_rng(2).integers(0, 256, arr.shape[:2])).astype(np.uint16)
        im = Image.fromarray(v)
        assert im.mode == "I;16"
    data = encode(im, "PNG", **kw)
    for mode in MODES:
        if pil_mode == "I;16":
            g = reduce16(np.asarray(pil_open(data)).astype(np.int64))
            rgba = np.dstack([g, g, g, np.full_like(g, 255)])
        else:
            rgba = np.asarray(pil_open(data).convert("RGBA"))
        assert_exact(datago.decode(data, mode=mode), from_rgba(rgba, mode))


# --------------------------------------------------------------------------- EXIF orientation

def _exif(k: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = k
    return exif.tobytes()


ORIENTATIONS = list(range(1, 9))


@pytest.mark.parametrize("k", ORIENTATIONS, ids=[f"o{k}" for k in ORIENTATIONS])
def test_jpeg_exif_orientation(k):
    data = encode(photo(64, 40, seed=13), "JPEG", exif=_exif(k), quality=95)
    want = pil_array(data, transpose=True)
    got = datago.decode(data)
    assert_close(got, want)
    assert datago.decode(data, mode="L").shape[:2] == want.shape[:2]
    assert datago.decode(data, mode="RGBA").shape[:2] == want.shape[:2]
    info = datago.read_header(data)
    assert info.format.lower() == "jpeg"
    assert (info.width, info.height, info.orientation) == (64, 40, k)
    assert info.display_size == ((64, 40) if k >= 5 else (40, 64))          # (height, width)
    assert info.display_size == want.shape[:2]


@pytest.mark.parametrize("k", ORIENTATIONS, ids=[f"o{k}" for k in ORIENTATIONS])
def test_png_exif_orientation(k):
    data = encode(photo(64, 40, seed=14), "PNG", exif=_exif(k))
    assert data.find(b"eXIf") < data.find(b"IDAT")
    want = pil_array(data, transpose=True)
    assert_exact(datago.decode(data), want)
    info = datago.read_header(data)
    assert info.format.lower() == "png"
    assert (info.width, info.height, info.orientation) == (64, 40, k)
    assert info.display_size == ((64, 40) if k >= 5 else (40, 64))          # (height, width)
    assert info.display_size == datago.decode(data).shape[:2]


@pytest.mark.parametrize("k", [3, 6, 8], ids=["o3", "o6", "o8"])
def test_png_exif_orientation_own_encoder_rgba16(k):
    """eXIf placed by hand before IDAT, on a 16-bit RGBA file, in RGBA mode."""
    data, rgba = png_case("rgba_16", w=29, h=13, seed=15)
    # re-encode with an eXIf chunk before IDAT
    s = _sample_planes(29, 13, 16, 4, 15, True)
    data = make_png(s, 16, 6, before_idat=png_chunk(b"eXIf", _exif(k)[6:] if _exif(k).startswith(b"Exif\x00\x00") else _exif(k)))
    im = Image.fromarray(rgba, "RGBA")
    im.getexif()[0x0112] = k
    want = np.asarray(ImageOps.exif_transpose(im))
    assert_exact(datago.decode(data, mode="RGBA"), want)
    assert datago.read_header(data).orientation == k


@pytest.mark.parametrize("k", [1, 3, 6, 8], ids=["o1", "o3", "o6", "o8"])
def test_webp_exif_orientation(k):
    data = encode(photo(64, 40, seed=16), "WEBP", lossless=True, exif=_exif(k))
    assert_exact(datago.decode(data), pil_array(data, transpose=True))
    info = datago.read_header(data)
    assert (info.width, info.height, info.orientation) == (64, 40, k)


# --------------------------------------------------------------------------- fallback formats

def _rgba_photo(w, h, seed):
    return np.dstack([photo(w, h, seed), with_alpha(h, w, seed + 1)])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", ["webp-lossless", "webp-lossy", "bmp", "gif", "tiff", "tiff-deflate"])
def test_fallback_rgb(fmt, mode):
    arr = photo(53, 37, seed=17)
    if fmt == "webp-lossless":
        data = encode(arr, "WEBP", lossless=True)
    elif fmt == "webp-lossy":
        data = encode(arr, "WEBP", quality=80)
    elif fmt == "gif":
        data = encode(Image.fromarray(arr).convert("P", palette=Image.Palette.ADAPTIVE), "GIF")
    elif fmt == "tiff-deflate":
        data = encode(arr, "TIFF", compression="tiff_adobe_deflate")
    else:
        data = encode(arr, fmt.upper())
    rgba = np.asarray(pil_open(data).convert("RGBA"))
    if fmt == "webp-lossless" or fmt.startswith(("bmp", "tiff")):
        assert np.array_equal(rgba[..., :3], arr)         # lossless round trip
    assert_exact(datago.decode(data, mode=mode), from_rgba(rgba, mode))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bg", [BG, ODD_BG], ids=["grey-bg", "odd-bg"])
@pytest.mark.parametrize("fmt", ["webp-lossless", "tiff", "gif-trns", "png-for-reference"])
def test_fallback_alpha(fmt, bg, mode):
    rgba = _rgba_photo(41, 29, seed=18)
    if fmt == "webp-lossless":
        data = encode(rgba, "WEBP", lossless=True, exact=True)
    elif fmt == "tiff":
        data = encode(rgba, "TIFF")
    elif fmt == "png-for-reference":
        data = encode(rgba, "PNG")
    else:
        im = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE, colors=255)
        idx = np.asarray(im).copy()
        idx[rgba[..., 3] < 128] = 255                       # index 255 transparent
        im2 = Image.fromarray(idx, "P")
        im2.putpalette(im.getpalette())
        data = encode(im2, "GIF", transparency=255)
    want_rgba = np.asarray(pil_open(data).convert("RGBA"))
    assert (want_rgba[..., 3] == 0).any()
    assert_exact(datago.decode(data, mode=mode, background=bg), from_rgba(want_rgba, mode, bg))


def test_fallback_tiff_16bit_grey():
    rng = np.random.default_rng(19)
    v = (photo(47, 33, seed=19)[..., 0].astype(np.int64) * 256 + rng.integers(0, 256, (33, 47))).astype(np.uint16)
    try:
        im = Image.fromarray(v)
        assert im.mode == "I;16"
        data = encode(im, "TIFF")
    except Exception as e:  # pragma: no cover - Pillow build without I;16 TIFF writing
        pytest.skip(f"Pillow cannot write I;16 TIFF: {e}")
    assert np.array_equal(np.asarray(pil_open(data)), v)
    g = reduce16(v)
    rgba = np.dstack([g, g, g, np.full_like(g, 255)])
    for mode in MODES:
        assert_exact(datago.decode(data, mode=mode), from_rgba(rgba, mode))


@pytest.mark.parametrize("fmt", ["webp", "bmp", "gif", "tiff"])
def test_fallback_read_header(fmt):
    data = encode(photo(31, 17, seed=20), fmt.upper())
    info = datago.read_header(data)
    assert info.format.lower() == fmt
    assert (info.width, info.height, info.orientation) == (31, 17, 1)


# --------------------------------------------------------------------------- data types

def _samples():
    return {
        "jpeg": encode(photo(33, 21, seed=22), "JPEG", quality=90),
        "jpeg-o6": encode(photo(33, 21, seed=22), "JPEG", quality=90, exif=_exif(6)),
        "png": encode(_rgba_photo(33, 21, seed=23), "PNG"),
        "webp": encode(photo(33, 21, seed=24), "WEBP", lossless=True),
        "gif": encode(Image.fromarray(photo(33, 21, seed=25)).convert("P"), "GIF"),
    }


SAMPLE_NAMES = ["jpeg", "jpeg-o6", "png", "webp", "gif"]


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_bytes_like_inputs(name):
    data = _samples()[name]
    ref = datago.decode(data)
    padded = b"\x00\x01\x02" + data + b"\x03"
    variants = {
        "bytearray": bytearray(data),
        "memoryview": memoryview(data),
        "memoryview-bytearray": memoryview(bytearray(data)),
        "memoryview-slice": memoryview(padded)[3:-1],
        "numpy": np.frombuffer(data, dtype=np.uint8),
        "numpy-copy": np.frombuffer(data, dtype=np.uint8).copy(),
        "numpy-slice": np.frombuffer(padded, dtype=np.uint8)[3:-1],
    }
    for vname, v in variants.items():
        got = datago.decode(v)
        assert np.array_equal(got, ref), vname
        assert datago.read_header(v) == datago.read_header(data), vname
        r1 = datago.decode_to_bucket(v, bucket=(24, 16))
        r0 = datago.decode_to_bucket(data, bucket=(24, 16))
        assert np.array_equal(r1.image, r0.image), vname


@pytest.mark.parametrize("bad", ["a string", "", 12345, None, 3.5, [0xFF, 0xD8], object()],
                         ids=["str", "empty-str", "int", "None", "float", "list", "object"])
def test_non_bytes_raise_type_error(bad):
    with pytest.raises(TypeError):
        datago.decode(bad)
    with pytest.raises(TypeError):
        datago.read_header(bad)
    with pytest.raises(TypeError):
        datago.decode_to_bucket(bad, bucket=(16, 16))


def test_str_of_a_real_path_raises_type_error(tmp_path):
    p = tmp_path / "x.jpg"
    p.write_bytes(_samples()["jpeg"])
    with pytest.raises(TypeError):
        datago.decode(str(p))


# --------------------------------------------------------------------------- memory ownership

@pytest.mark.parametrize("name", SAMPLE_NAMES)
@pytest.mark.parametrize("mode", MODES)
def test_array_owns_memory(name, mode):
    data = _samples()[name]
    fresh = datago.decode(data, mode=mode)
    src = bytearray(data)
    arr = datago.decode(src, mode=mode)
    assert arr.flags.writeable and arr.flags.c_contiguous
    # memory owned by the array or by a chain of bases that are not the input
    base = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    assert base is not src
    del src
    gc.collect()
    src2 = np.frombuffer(bytes(data), dtype=np.uint8)
    arr2 = datago.decode(src2, mode=mode)
    assert not np.shares_memory(arr2, src2)
    # more decoding in between must not overwrite arr (no reuse of a scratch buffer)
    for other in SAMPLE_NAMES:
        datago.decode(_samples()[other], mode=mode)
    gc.collect()
    assert np.array_equal(arr, fresh)
    assert np.array_equal(arr2, fresh)
    arr[...] = 7                                          # writable, independent of the next decode
    assert np.array_equal(datago.decode(data, mode=mode), fresh)


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_bucket_result_owns_memory(name):
    s = _samples()
    r = datago.decode_to_bucket(bytearray(s[name]), bucket=(24, 16))
    img = r.image
    snapshot = img.copy()
    assert img.shape == (24, 16, 3)
    assert img.flags.writeable
    gc.collect()
    for other in SAMPLE_NAMES:                             # scratch buffers get reused here
        datago.decode_to_bucket(s[other], bucket=(24, 16))
        datago.decode(s[other])
    assert np.array_equal(img, snapshot)


# --------------------------------------------------------------------------- decode_to_bucket + EXIF

BUCKETS = [(32, 40), (64, 96), (96, 64), (96, 160)]          # (height, width)


@pytest.mark.parametrize("bucket", BUCKETS, ids=[f"{w}x{h}" for h, w in BUCKETS])
@pytest.mark.parametrize("k", ORIENTATIONS, ids=[f"o{k}" for k in ORIENTATIONS])
def test_bucket_exif_jpeg_vs_upright_png(k, bucket):
    data = encode(photo(160, 96, seed=26), "JPEG", exif=_exif(k), quality=95)
    upright = ImageOps.exif_transpose(pil_open(data)).convert("RGB")
    png = encode(upright, "PNG")
    dw, dh = upright.size
    r = datago.decode_to_bucket(data, bucket=bucket)
    ref = datago.decode_to_bucket(png, bucket=bucket)
    bh, bw = bucket
    assert r.bucket == (bh, bw) and ref.bucket == (bh, bw)
    assert r.image.shape == (bh, bw, 3)
    assert r.original_size == (dh, dw) == ref.original_size
    assert r.crop_coords == ref.crop_coords
    assert np.allclose(r.crop_box, ref.crop_box)
    assert_close(r.image, ref.image, tol=3.0)
    # also in mode L
    rl = datago.decode_to_bucket(data, bucket=bucket, mode="L")
    refl = datago.decode_to_bucket(png, bucket=bucket, mode="L")
    assert_close(rl.image, refl.image, tol=3.0)


@pytest.mark.parametrize("k", ORIENTATIONS, ids=[f"o{k}" for k in ORIENTATIONS])
def test_bucket_exif_png_vs_upright_png(k):
    data = encode(photo(64, 40, seed=27), "PNG", exif=_exif(k))
    upright = encode(ImageOps.exif_transpose(pil_open(data)).convert("RGB"), "PNG")
    for bucket in [(24, 24), (48, 32), (32, 48)]:
        r = datago.decode_to_bucket(data, bucket=bucket)
        ref = datago.decode_to_bucket(upright, bucket=bucket)
        # lossless source, so only the resampler's rounding may differ (resize is
        # documented "within 1 of an exact float64 computation"; two results: 2)
        assert_close(r.image, ref.image, tol=0.5)
        assert np.abs(r.image.astype(int) - ref.image.astype(int)).max() <= 2
        assert r.original_size == ref.original_size


def test_bucket_matches_resize_of_decode():
    """The fused path equals decode + crop + resize (PNG: no DCT scaling involved)."""
    data = encode(photo(90, 50, seed=28), "PNG")
    r = datago.decode_to_bucket(data, bucket=(30, 30))
    full = datago.decode(data)
    want = datago.resize(full, (30, 30), box=r.crop_box)
    assert_close(r.image, want, tol=0.5)
    assert r.crop_box == pytest.approx((20.0, 0.0, 70.0, 50.0))
