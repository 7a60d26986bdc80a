# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Decode and decode-to-bucket for JPEG and PNG, with the GIL released.

One shape per entry point: validate and allocate with the GIL, run the C work in
``with nogil`` blocks, turn return codes into exceptions (``JpegDecoder.check``,
``PngDecoder.check``), return numpy arrays that own their memory.

Per-thread state (``_State``): the TurboJPEG handle, the resampler's plans and
scratch, and a scratch pixel buffer reused across images.  It lives in a
``threading.local`` and is freed with its thread.
"""

import threading

import numpy as np

from libc.math cimport ceil
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcmp, memcpy

from datago._core cimport spng
from datago._core cimport turbojpeg as tj
from datago._core._jpeg cimport JpegDecoder, JpegInfo
from datago._core._png cimport (PngDecoder, PngScan, Inflater, png_scan, png_gather,
                                png_unfilter, png_fast_message, FAST_OK, FAST_FALLBACK)
from datago._core._kernels cimport FILTER_NEAREST
from datago._core._resample cimport Resampler
from datago._core._pixels cimport cmyk_convert, luma, rgba16_to_rgba8, rgba8_convert

from datago._core._jpeg import scale_numerator
from datago.errors import DecodeError, ImageTooLargeError

cdef enum:
    FMT_UNKNOWN = 0
    FMT_JPEG = 1
    FMT_PNG = 2

# A thread keeps at most this much scratch between images; bigger buffers are freed.
cdef size_t KEEP_SCRATCH = 64 * 1024 * 1024


cdef class _State:
    cdef JpegDecoder jpeg
    cdef Inflater inflater
    cdef Resampler rs
    cdef uint8_t* buf
    cdef size_t cap

    def __cinit__(self):
        self.jpeg = JpegDecoder()
        self.inflater = Inflater()
        self.rs = Resampler()
        self.buf = NULL
        self.cap = 0

    def __dealloc__(self):
        free(self.buf)

    cdef uint8_t* reserve(self, size_t n) noexcept nogil:
        cdef void* p
        if n > self.cap:
            p = realloc(self.buf, n)
            if p == NULL:
                return NULL
            self.buf = <uint8_t*>p
            self.cap = n
        return self.buf

    cdef void trim(self) noexcept nogil:
        if self.cap > KEEP_SCRATCH:
            free(self.buf)
            self.buf = NULL
            self.cap = 0


_local = threading.local()


cdef _State _state():
    cdef _State st
    try:
        return _local.state
    except AttributeError:
        st = _State()
        _local.state = st
        return st


cdef int _sniff(const uint8_t* p, size_t n) noexcept nogil:
    if n >= 3 and p[0] == 0xFF and p[1] == 0xD8 and p[2] == 0xFF:
        return FMT_JPEG
    if n >= 8 and memcmp(p, b"\x89PNG\r\n\x1a\n", 8) == 0:
        return FMT_PNG
    return FMT_UNKNOWN


def sniff(data):
    """'jpeg', 'png' or None, from the magic bytes."""
    cdef const uint8_t[::1] v = data
    if v.shape[0] == 0:
        return None
    f = _sniff(&v[0], v.shape[0])
    return "jpeg" if f == FMT_JPEG else ("png" if f == FMT_PNG else None)


cdef int _channels(str mode) except -1:
    if mode == "RGB":
        return 3
    if mode == "L":
        return 1
    if mode == "RGBA":
        return 4
    raise ValueError(f"mode must be 'RGB', 'RGBA' or 'L', got {mode!r}")


cdef int _check_size(long long w, long long h, long long max_pixels, str fmt) except -1:
    if w <= 0 or h <= 0:
        raise DecodeError(f"{fmt}: invalid image size {w}x{h} in the header")
    if w * h > max_pixels:
        raise ImageTooLargeError(
            f"{fmt}: {w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels} "
            "(decompression-bomb guard; raise max_pixels to allow it)")
    return 0


cdef int _check_header(int rc, long long w, long long h, long long max_pixels, str fmt) except -1:
    """A header the library refused for its size (libjpeg stops at 65500 px, libspng at
    2^31 - 1) still announces a size over the limit: report that, not a decode error."""
    if rc == 0 or w <= 0 or h <= 0 or w * h <= max_pixels:
        return 0
    if fmt == "JPEG" and (w > 65500 or h > 65500):
        _check_size(w, h, max_pixels, fmt)
    if fmt == "PNG" and w <= 0x7FFFFFFF and h <= 0x7FFFFFFF:   # larger is invalid PNG
        _check_size(w, h, max_pixels, fmt)
    return 0


cdef inline bint _is_cmyk(int cs) noexcept nogil:
    return cs == tj.TJCS_CMYK or cs == tj.TJCS_YCCK


# ----------------------------------------------------------------------------- header

def read_header(data):
    """(format, width, height, orientation) of a JPEG or PNG, sizes as stored.

    Raises DecodeError for a corrupt header; returns None for other formats.
    """
    cdef const uint8_t[::1] v = data
    cdef size_t n = v.shape[0]
    cdef _State st
    cdef JpegInfo info
    cdef PngDecoder png
    cdef int rc, fmt
    if n == 0:
        return None
    fmt = _sniff(&v[0], n)
    if fmt == FMT_JPEG:
        st = _state()
        with nogil:
            rc = st.jpeg.read_header(&v[0], n, &info)
        if rc != 0 and (info.width > 65500 or info.height > 65500):
            # a well-formed frame header libjpeg will not decode: the size is still known
            return ("jpeg", info.width, info.height, info.orientation)
        st.jpeg.check(rc, "reading the header")
        return ("jpeg", info.width, info.height, info.orientation)
    if fmt == FMT_PNG:
        png = PngDecoder()
        with nogil:
            rc = png.open(&v[0], n)
        png.check(rc, "reading the header")
        return ("png", png.ihdr.width, png.ihdr.height, png.orient)
    return None


# ----------------------------------------------------------------------------- decode

def decode(data, str mode, long long max_pixels, bytes background):
    """Full-size decode of a JPEG or PNG to (H, W, C) uint8 in stored orientation.

    Returns (array, orientation).  ``background`` is 3 bytes (RGB) for alpha
    compositing.  Other formats: returns None (the Python layer falls back).
    """
    cdef const uint8_t[::1] v = data
    cdef size_t n = v.shape[0]
    cdef int C = _channels(mode)
    cdef int fmt
    if n == 0:
        raise DecodeError("empty input (0 bytes)")
    fmt = _sniff(&v[0], n)
    if fmt == FMT_JPEG:
        return _decode_jpeg(v, C, max_pixels)
    if fmt == FMT_PNG:
        return _decode_png(v, C, max_pixels, background, False)
    return None


cdef tuple _decode_jpeg(const uint8_t[::1] v, int C, long long max_pixels):
    cdef _State st = _state()
    cdef size_t n = v.shape[0]
    cdef JpegInfo info
    cdef int rc, pf
    cdef uint8_t* buf
    cdef uint8_t[:, :, ::1] o
    with nogil:
        rc = st.jpeg.read_header(&v[0], n, &info)
    _check_header(rc, info.width, info.height, max_pixels, "JPEG")
    st.jpeg.check(rc, "reading the header")
    _check_size(info.width, info.height, max_pixels, "JPEG")
    out = np.empty((info.height, info.width, C), dtype=np.uint8)
    o = out
    if not _is_cmyk(info.colorspace):
        pf = tj.TJPF_GRAY if C == 1 else (tj.TJPF_RGB if C == 3 else tj.TJPF_RGBA)
        with nogil:
            rc = st.jpeg.decode(&v[0], n, &o[0, 0, 0], info.width, info.width * C, info.height, pf)
        st.jpeg.check(rc, "decoding")
    else:
        with nogil:
            buf = st.reserve(<size_t>info.width * info.height * 4)
            if buf != NULL:
                rc = st.jpeg.decode(&v[0], n, buf, info.width, info.width * 4, info.height,
                                    tj.TJPF_CMYK)
        if buf == NULL:
            raise MemoryError("JPEG: no memory for the CMYK buffer")
        st.jpeg.check(rc, "decoding")
        with nogil:
            cmyk_convert(buf, &o[0, 0, 0], <size_t>info.width * info.height, C)
            st.trim()
    return out, info.orientation


cdef uint8_t* _png_rgba(PngDecoder png, _State st, const uint8_t* bg, uint8_t* dst,
                       int dC) except NULL:
    """Decode to RGBA (8 or 16 bit) in scratch, then convert into ``dst``.

    ``dst`` NULL converts in place (and returns the scratch).  dC: 1 (L), 3 (RGB),
    4 (RGBA) or -4 (RGB composited over bg, 4th byte 255).
    """
    cdef size_t size = 0
    cdef size_t npix = <size_t>png.ihdr.width * png.ihdr.height
    cdef int rc
    cdef int fmt = spng.SPNG_FMT_RGBA16 if png.ihdr.bit_depth == 16 else spng.SPNG_FMT_RGBA8
    cdef uint8_t* buf = NULL
    with nogil:
        rc = spng.spng_decoded_image_size(png.ctx, fmt, &size)
        if rc == 0:
            buf = st.reserve(size)
            if buf != NULL:
                rc = png.decode(buf, size, fmt, spng.SPNG_DECODE_TRNS)
    png.check(rc, "decoding")
    if buf == NULL:
        raise MemoryError("PNG: no memory for the decode buffer")
    if dst == NULL:
        dst = buf
    with nogil:
        if fmt == spng.SPNG_FMT_RGBA16:
            rgba16_to_rgba8(<const uint16_t*>buf, buf, npix)
        rgba8_convert(buf, dst, npix, dC, bg)
    return dst


cdef bint _png_fast_enabled = True


def set_png_fast(bint enabled):
    """Turn the PNG fast path on or off (for tests and benchmarks; results are identical)."""
    global _png_fast_enabled
    _png_fast_enabled = enabled


cdef int _fast_scan(const uint8_t[::1] v, PngScan* scan, long long max_pixels) except -2:
    """Run the fast path's chunk walk: FAST_OK or FAST_FALLBACK, else raise."""
    cdef int rc
    if not _png_fast_enabled:
        return FAST_FALLBACK
    with nogil:
        rc = png_scan(&v[0], v.shape[0], scan)
    if rc < 0:
        if scan.width > 0 and scan.height > 0:
            _check_size(scan.width, scan.height, max_pixels, "PNG")
        raise DecodeError(png_fast_message(rc, scan))
    if rc == FAST_OK:
        _check_size(scan.width, scan.height, max_pixels, "PNG")
    return rc


cdef uint8_t* _fast_inflate(const uint8_t[::1] v, _State st, PngScan* scan) except? NULL:
    """Inflate and unfilter into the scratch: row y's pixels at buf + y*stride + 1.

    Returns NULL when the data is longer than the header says (libspng decides).
    """
    cdef size_t need = scan.raw_size + (scan.idat_total if scan.idat_count > 1 else 0)
    cdef uint8_t* buf
    cdef const uint8_t* src
    cdef int rc
    with nogil:
        buf = st.reserve(need)
        if buf != NULL:
            src = scan.idat0
            if scan.idat_count > 1:
                png_gather(&v[0], v.shape[0], buf + scan.raw_size)
                src = buf + scan.raw_size
            rc = st.inflater.inflate(src, scan.idat_total, buf, scan.raw_size)
            if rc == FAST_OK:
                rc = png_unfilter(buf, scan.width, scan.height, scan.channels)
    if buf == NULL:
        raise MemoryError("PNG: no memory for the decode buffer")
    if rc == FAST_FALLBACK:
        return NULL
    if rc != FAST_OK:
        raise DecodeError(png_fast_message(rc, scan))
    return buf


cdef void _fast_rows(uint8_t* buf, PngScan* scan, uint8_t* dst, Py_ssize_t d_stride, int dC,
                     const uint8_t* bg) noexcept nogil:
    """Convert unfiltered rows (grey, RGB or RGBA) into dst rows with dC channels.

    dC: 1 (L), 3 (RGB), 4 (RGBA) or -4 (RGB composited, 4th byte 255).  In place
    (dst = buf + 1, d_stride = the PNG row stride) when the pixels do not grow.
    """
    cdef size_t stride = 1 + <size_t>scan.width * scan.channels
    cdef uint32_t y, x
    cdef int ch = scan.channels, k
    cdef const uint8_t* s
    cdef uint8_t* d
    for y in range(scan.height):
        s = buf + y * stride + 1
        d = dst + y * d_stride
        if ch == 4:
            rgba8_convert(s, d, scan.width, dC, bg)
        elif ch == 3:
            if dC == 1:
                for x in range(scan.width):
                    d[x] = luma(s[3 * x], s[3 * x + 1], s[3 * x + 2])
            elif dC == 3:
                if d != s:
                    memcpy(d, s, 3 * <size_t>scan.width)
            else:
                for x in range(scan.width):
                    d[4 * x] = s[3 * x]; d[4 * x + 1] = s[3 * x + 1]; d[4 * x + 2] = s[3 * x + 2]
                    d[4 * x + 3] = 255
        else:
            if dC == 1:
                if d != s:
                    memcpy(d, s, scan.width)
            else:
                k = 4 if dC == 4 or dC == -4 else 3
                for x in range(scan.width):
                    d[k * x] = s[x]; d[k * x + 1] = s[x]; d[k * x + 2] = s[x]
                    if k == 4:
                        d[k * x + 3] = 255


cdef tuple _decode_png(const uint8_t[::1] v, int C, long long max_pixels, bytes background,
                       bint indices):
    """Full decode of a PNG; ``indices`` returns palette indices for palette images."""
    cdef _State st = _state()
    cdef PngScan scan
    cdef uint8_t* buf
    cdef uint8_t[:, :, ::1] fo
    cdef const uint8_t* fbg = background
    if _fast_scan(v, &scan, max_pixels) == FAST_OK:
        buf = _fast_inflate(v, st, &scan)
        if buf != NULL:
            out = np.empty((scan.height, scan.width, C), dtype=np.uint8)
            fo = out
            with nogil:
                _fast_rows(buf, &scan, &fo[0, 0, 0], <Py_ssize_t>scan.width * C, C, fbg)
                st.trim()
            return out, scan.orientation
    return _decode_png_spng(v, C, max_pixels, background, indices)


cdef PngDecoder _png_open(const uint8_t[::1] v, long long max_pixels):
    """A libspng decoder with the header read and the size checked."""
    cdef PngDecoder png = PngDecoder()
    cdef int rc
    with nogil:
        rc = png.open(&v[0], v.shape[0])
    _check_header(rc, png.pre_width, png.pre_height, max_pixels, "PNG")
    png.check(rc, "reading the header")
    _check_size(png.ihdr.width, png.ihdr.height, max_pixels, "PNG")
    return png


cdef tuple _decode_png_spng(const uint8_t[::1] v, int C, long long max_pixels, bytes background,
                            bint indices):
    cdef _State st = _state()
    cdef PngDecoder png = _png_open(v, max_pixels)
    cdef size_t n = v.shape[0]
    cdef size_t size = 0
    cdef int rc, orient, fmt, w, h
    cdef bint gray, alpha, palette
    cdef uint8_t[:, :, ::1] o
    cdef const uint8_t* bg = background
    orient = png.orient
    w = png.ihdr.width
    h = png.ihdr.height
    gray = png.ihdr.color_type == spng.SPNG_COLOR_TYPE_GRAYSCALE
    palette = png.ihdr.color_type == spng.SPNG_COLOR_TYPE_INDEXED
    alpha = png.has_alpha()
    if indices and palette:
        out = np.empty((h, w, 1), dtype=np.uint8)
        o = out
        _png_indices(png, st, &o[0, 0, 0])
        return out, orient
    out = np.empty((h, w, C), dtype=np.uint8)
    o = out
    fmt = 0
    if png.ihdr.bit_depth <= 8 and not alpha:
        if C == 3:
            fmt = spng.SPNG_FMT_RGB8
        elif C == 1 and gray:
            fmt = spng.SPNG_FMT_G8
    if png.ihdr.bit_depth <= 8 and C == 4:
        fmt = spng.SPNG_FMT_RGBA8
    if fmt:
        with nogil:
            rc = spng.spng_decoded_image_size(png.ctx, fmt, &size)
            if rc == 0:
                rc = png.decode(&o[0, 0, 0], size, fmt, spng.SPNG_DECODE_TRNS)
        png.check(rc, "decoding")
    else:
        _png_rgba(png, st, bg, &o[0, 0, 0], C)
    st.trim()
    return out, orient


cdef int _png_indices(PngDecoder png, _State st, uint8_t* dst) except -1:
    """Palette indices of a palette PNG (1/2/4/8-bit), one byte per pixel."""
    cdef size_t size = 0
    cdef int rc, bd = png.ihdr.bit_depth
    cdef uint8_t* buf = NULL
    cdef size_t w = png.ihdr.width
    cdef size_t h = png.ihdr.height
    cdef size_t stride, y, x
    cdef int per, shift
    with nogil:
        rc = spng.spng_decoded_image_size(png.ctx, spng.SPNG_FMT_PNG, &size)
        if rc == 0:
            buf = st.reserve(size)
            if buf != NULL:
                rc = png.decode(buf, size, spng.SPNG_FMT_PNG, 0)
    png.check(rc, "decoding")
    if buf == NULL:
        raise MemoryError("PNG: no memory for the decode buffer")
    with nogil:
        stride = size // h
        per = 8 // bd
        for y in range(h):
            for x in range(w):
                if bd == 8:
                    dst[y * w + x] = buf[y * stride + x]
                else:
                    shift = 8 - bd * (1 + <int>(x % per))
                    dst[y * w + x] = (buf[y * stride + x // per] >> shift) & ((1 << bd) - 1)
    return 0


# ----------------------------------------------------------------------------- to bucket

cdef void _cover(int dw, int dh, int tw, int th, double* box) noexcept nogil:
    """Centred crop of a dw x dh image with the aspect ratio of tw x th, as large as
    possible (the crop a cover resize + centre crop keeps): box = x0, y0, x1, y1.
    The covering axis is exact (0 and the full size), whatever the rounding."""
    cdef double c
    if <long long>tw * dh >= <long long>th * dw:        # width-limited
        c = <double>th * dw / tw
        c = dh if c > dh else c
        box[0] = 0.0; box[2] = dw
        box[1] = (dh - c) / 2.0; box[3] = box[1] + c
    else:
        c = <double>tw * dh / th
        c = dw if c > dw else c
        box[1] = 0.0; box[3] = dh
        box[0] = (dw - c) / 2.0; box[2] = box[0] + c


def cover_box(int dw, int dh, int tw, int th):
    """(left, top, right, bottom) of the centred cover crop of a dw x dh image for a
    tw x th bucket."""
    cdef double box[4]
    if dw <= 0 or dh <= 0 or tw <= 0 or th <= 0:
        raise ValueError(f"sizes must be positive, got {dw}x{dh} and {tw}x{th}")
    _cover(dw, dh, tw, th, box)
    return (box[0], box[1], box[2], box[3])


cdef void _source_box(int o, double sw, double sh, double x0, double y0, double x1, double y1,
                      double* b) noexcept nogil:
    """Map a box in display coordinates to stored coordinates for EXIF orientation o."""
    if o == 2:
        b[0] = sw - x1; b[1] = y0; b[2] = sw - x0; b[3] = y1
    elif o == 3:
        b[0] = sw - x1; b[1] = sh - y1; b[2] = sw - x0; b[3] = sh - y0
    elif o == 4:
        b[0] = x0; b[1] = sh - y1; b[2] = x1; b[3] = sh - y0
    elif o == 5:
        b[0] = y0; b[1] = x0; b[2] = y1; b[3] = x1
    elif o == 6:
        b[0] = y0; b[1] = sh - x1; b[2] = y1; b[3] = sh - x0
    elif o == 7:
        b[0] = sw - y1; b[1] = sh - x1; b[2] = sw - y0; b[3] = sh - x0
    elif o == 8:
        b[0] = sw - y1; b[1] = x0; b[2] = sw - y0; b[3] = x1
    else:
        b[0] = x0; b[1] = y0; b[2] = x1; b[3] = y1


cdef uint8_t* _oriented_dst(int o, uint8_t* base, int th, int tw, Py_ssize_t row, Py_ssize_t px,
                            Py_ssize_t* d_row, Py_ssize_t* d_px) noexcept nogil:
    """Origin and strides that write a stored-orientation result displayed upright."""
    if o == 2:
        d_row[0] = row; d_px[0] = -px
        return base + (tw - 1) * px
    if o == 3:
        d_row[0] = -row; d_px[0] = -px
        return base + (th - 1) * row + (tw - 1) * px
    if o == 4:
        d_row[0] = -row; d_px[0] = px
        return base + (th - 1) * row
    if o == 5:
        d_row[0] = px; d_px[0] = row
        return base
    if o == 6:
        d_row[0] = -px; d_px[0] = row
        return base + (tw - 1) * px
    if o == 7:
        d_row[0] = -px; d_px[0] = -row
        return base + (th - 1) * row + (tw - 1) * px
    if o == 8:
        d_row[0] = px; d_px[0] = -row
        return base + (th - 1) * row
    d_row[0] = row; d_px[0] = px
    return base


cdef uint8_t* _png_spng_source(const uint8_t[::1] v, PngDecoder png, _State st,
                               long long max_pixels, int C, bint mask, const uint8_t* bg,
                               int* srcC, Py_ssize_t* s_row, list keep) except NULL:
    """Decode a PNG with libspng into the scratch (or an array kept alive in ``keep``),
    ready for the resampler: returns the first pixel, sets channels and row stride."""
    cdef size_t size = 0
    cdef int rc = 0, pf
    cdef uint8_t* buf = NULL
    cdef int sw, sh
    cdef bint gray, palette, alpha
    if png is None:
        png = _png_open(v, max_pixels)
    sw, sh = png.ihdr.width, png.ihdr.height
    gray = png.ihdr.color_type == spng.SPNG_COLOR_TYPE_GRAYSCALE
    palette = png.ihdr.color_type == spng.SPNG_COLOR_TYPE_INDEXED
    alpha = png.has_alpha()
    if mask and palette:
        # _png_indices decodes packed rows into the scratch: unpack into an array
        idx = np.empty((sh, sw), dtype=np.uint8)
        keep.append(idx)
        buf = _data(idx)
        _png_indices(png, st, buf)
        srcC[0] = 1
    elif png.ihdr.bit_depth <= 8 and not alpha and (C == 1 and gray or C == 3):
        pf = spng.SPNG_FMT_G8 if gray else spng.SPNG_FMT_RGB8
        srcC[0] = 1 if gray else 3
        with nogil:
            rc = spng.spng_decoded_image_size(png.ctx, pf, &size)
            if rc == 0:
                buf = st.reserve(size)
                if buf != NULL:
                    rc = png.decode(buf, size, pf, 0)
        png.check(rc, "decoding")
        if buf == NULL:
            raise MemoryError("PNG: no memory for the decode buffer")
    else:
        srcC[0] = 1 if C == 1 else 4
        buf = _png_rgba(png, st, bg, NULL, -4 if srcC[0] == 4 else 1)
    s_row[0] = <Py_ssize_t>sw * srcC[0]
    return buf


def decode_to_bucket(data, pick, out, str mode, bint mask, int filt, long long max_pixels,
                     bytes background, bint resample=True):
    """The fused path (JPEG/PNG).  Returns None for other formats.

    ``resample=False`` stops after decoding at the chosen DCT scale (the benchmark's
    decode-only ceiling of this same path) and returns the scaled (width, height).

    ``pick(display_w, display_h) -> (bucket_w, bucket_h)`` chooses the bucket once the
    header is read; ``out`` is None or a uint8 (bh, bw, C) array (any strides).
    Returns (out, (display_w, display_h), (bucket_w, bucket_h), crop box in display
    pixels as (left, top, right, bottom), orientation).
    """
    cdef const uint8_t[::1] v = data
    cdef size_t n = v.shape[0]
    cdef _State st
    cdef PngDecoder png = None
    cdef JpegInfo info
    cdef int C = _channels(mode)
    cdef int fmt, rc, orient, sw, sh, dw, dh, tw, th, ow, oh, m, pf, srcC, dstC, i
    cdef int scaled_w, scaled_h
    cdef double scale
    cdef double box[4]
    cdef double crop[4]
    cdef size_t size = 0
    cdef uint8_t* buf = NULL
    cdef uint8_t* dst
    cdef uint8_t[:, :, :] o
    cdef Py_ssize_t d_row, d_px, d_ch, s_row
    cdef bint fast = False
    cdef PngScan scan
    cdef list keep = []
    cdef const uint8_t* bg = background
    if C == 4:
        raise ValueError("decode_to_bucket supports mode 'RGB' or 'L' (alpha is composited)")
    if n == 0:
        raise DecodeError("empty input (0 bytes)")
    fmt = _sniff(&v[0], n)
    if fmt == FMT_UNKNOWN:
        return None
    st = _state()
    # 1. header: stored size and orientation
    if fmt == FMT_JPEG:
        with nogil:
            rc = st.jpeg.read_header(&v[0], n, &info)
        _check_header(rc, info.width, info.height, max_pixels, "JPEG")
        st.jpeg.check(rc, "reading the header")
        sw, sh, orient = info.width, info.height, info.orientation
        _check_size(sw, sh, max_pixels, "JPEG")
    else:
        fast = _fast_scan(v, &scan, max_pixels) == FAST_OK
        if fast:
            sw, sh, orient = scan.width, scan.height, scan.orientation
        else:
            png = _png_open(v, max_pixels)
            sw, sh, orient = png.ihdr.width, png.ihdr.height, png.orient
    dw, dh = (sh, sw) if orient >= 5 else (sw, sh)
    # 2. bucket and cover crop, in display coordinates, mapped to stored coordinates
    tw, th = pick(dw, dh)
    if tw <= 0 or th <= 0:
        raise ValueError(f"bucket must have positive size, got {tw}x{th}")
    scale = max(<double>tw / dw, <double>th / dh)
    _cover(dw, dh, tw, th, crop)
    _source_box(orient, sw, sh, crop[0], crop[1], crop[2], crop[3], box)
    ow, oh = (th, tw) if orient >= 5 else (tw, th)
    # 3. output
    if not resample:
        dst = NULL
        d_row = d_px = d_ch = 0
    elif out is None:
        out = np.empty((th, tw, C), dtype=np.uint8)
    elif out.ndim == 2 and C == 1:
        out = out[:, :, None]
    if resample:
        if out.ndim != 3 or out.shape[0] != th or out.shape[1] != tw or out.shape[2] != C:
            raise ValueError(f"out must have shape ({th}, {tw}, {C}) for bucket {tw}x{th}, "
                             f"got {tuple(out.shape)}")
        o = out                      # raises for a read-only or non-uint8 array
        dst = _oriented_dst(orient, &o[0, 0, 0], th, tw, o.strides[0], o.strides[1], &d_row, &d_px)
        d_ch = o.strides[2]
    # 4. decode into scratch
    if fmt == FMT_JPEG:
        m = 8 if (mask or scale >= 1.0) else scale_numerator(scale)
        scaled_w = (sw * m + 7) // 8
        scaled_h = (sh * m + 7) // 8
        if _is_cmyk(info.colorspace):
            pf, srcC = tj.TJPF_CMYK, 4
        elif C == 1 or info.colorspace == tj.TJCS_GRAY:
            pf, srcC = tj.TJPF_GRAY, 1
        else:
            pf, srcC = tj.TJPF_RGB, 3
        with nogil:
            buf = st.reserve(<size_t>scaled_w * scaled_h * srcC)
            if buf != NULL:
                rc = st.jpeg.decode(&v[0], n, buf, scaled_w, scaled_w * srcC, scaled_h, pf)
        if buf == NULL:
            raise MemoryError("JPEG: no memory for the decode buffer")
        st.jpeg.check(rc, "decoding")
        if pf == tj.TJPF_CMYK:
            dstC = 1 if C == 1 else 4
            with nogil:
                cmyk_convert(buf, buf, <size_t>scaled_w * scaled_h, dstC)
            srcC = dstC
        for i in range(4):
            box[i] = box[i] * m / 8.0
        box[2] = min(box[2], scaled_w)
        box[3] = min(box[3], scaled_h)
        sw, sh = scaled_w, scaled_h
        s_row = <Py_ssize_t>sw * srcC
    else:
        if fast:
            buf = _fast_inflate(v, st, &scan)
            fast = buf != NULL
        if fast:
            # unfiltered rows in the scratch, converted in place (pixels never grow)
            if C == 1 or scan.channels == 1:
                srcC, dstC = 1, 1
            elif scan.channels == 3:
                srcC, dstC = 3, 3
            else:
                srcC, dstC = 4, -4
            s_row = 1 + <Py_ssize_t>sw * scan.channels
            if dstC != scan.channels:
                with nogil:
                    _fast_rows(buf, &scan, buf + 1, s_row, dstC, bg)
            buf = buf + 1
        else:
            buf = _png_spng_source(v, png, st, max_pixels, C, mask, bg, &srcC, &s_row, keep)
    if not resample:
        st.trim()
        return (sw, sh)
    # 5. resample the crop into out
    with nogil:
        rc = st.rs.plan(sw, sh, box[0], box[1], box[2], box[3], ow, oh,
                        FILTER_NEAREST if mask else filt)
        if rc == 0:
            rc = st.rs.run(buf, s_row, srcC, dst, d_row, d_px, d_ch, C)
        st.trim()
    if rc == -2:
        raise ValueError(f"downscale {sw}x{sh} -> {ow}x{oh} needs too many filter taps")
    if rc < 0:
        raise MemoryError("no memory for the resampling plan")
    return out, (dw, dh), (tw, th), (crop[0], crop[1], crop[2], crop[3]), orient


cdef uint8_t* _data(arr):
    cdef uint8_t[:, ::1] a = arr
    return &a[0, 0]
