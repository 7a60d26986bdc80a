# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Decode, decode-to-bucket and mask-to-bucket for JPEG and PNG, with the GIL released.

Entry points: ``read_header``, ``decode``, ``decode_to_bucket`` (images:
colour converted, antialiased resampling) and ``mask_to_bucket`` (label masks:
values kept, nearest neighbour, widened to int32 for 16-bit sources).

One shape per entry point: validate and allocate with the GIL, run the C work in
``with nogil`` blocks, turn return codes into exceptions (``JpegDecoder.check``,
``PngDecoder.check``), return numpy arrays that own their memory.

Sizes: header sizes are checked against ``max_pixels`` (and the libraries'
limits) before anything is allocated; buckets and boxes returned by the ``pick``
callbacks are validated (sides in 1..MAX_EXTENT, at most ``max_pixels`` pixels)
before they reach C; buffer sizes are ``size_t`` products.

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
from datago._core._exif cimport JpegWalk
from datago._core._jpeg cimport (JpegDecoder, JpegInfo, HDR_REPAIR, jpeg_repaired,
                                 jpeg_warning)
from datago._core._png cimport (PngDecoder, PngScan, Inflater, png_scan, png_gather,
                                png_unfilter, png_fast_message, FAST_OK, FAST_FALLBACK)
from datago._core._kernels cimport FILTER_NEAREST
from datago._core._resample cimport Resampler
from datago._core._pixels cimport cmyk_convert, luma, rgba16_to_rgba8, rgba8_convert

from datago._core._jpeg import scale_numerator
from datago._core._resample import MAX_EXTENT, check_extent, plan_error
from datago.errors import DatagoError, DecodeError, ImageTooLargeError, MaskMismatchError


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
        if rc == HDR_REPAIR:
            v = jpeg_repaired(v, &info.walk)
            n = v.shape[0]
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

    Returns (array, orientation, warning): ``warning`` is None, or what libjpeg
    would have warned about in a header datago repaired (``_jpeg``).
    ``background`` is 3 bytes (RGB) for alpha compositing.  Other formats:
    returns None (the Python layer falls back).
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


cdef tuple _jpeg_header(_State st, const uint8_t[::1] v, JpegInfo* info, long long max_pixels):
    """Read a JPEG header and check its size: ``(fixed, warning)``.

    ``fixed`` is None, or the repaired copy of the file to decode instead (a header
    libjpeg would warn about, ``_jpeg``'s docstring); ``warning`` then says what
    was repaired.  ``info`` describes the data to decode.
    """
    cdef size_t n = v.shape[0]
    cdef int rc
    cdef const uint8_t[::1] f
    fixed = warning = None
    with nogil:
        rc = st.jpeg.read_header(&v[0], n, info)
    if rc == HDR_REPAIR:
        warning = jpeg_warning(&info.walk)
        fixed = jpeg_repaired(v, &info.walk)
        f = fixed
        with nogil:
            rc = st.jpeg.read_header(&f[0], f.shape[0], info)
    _check_header(rc, info.width, info.height, max_pixels, "JPEG")
    st.jpeg.check(rc, "reading the header")
    _check_size(info.width, info.height, max_pixels, "JPEG")
    return fixed, warning


cdef tuple _decode_jpeg(const uint8_t[::1] v, int C, long long max_pixels):
    cdef _State st = _state()
    cdef size_t n
    cdef JpegInfo info
    cdef int rc, pf
    cdef uint8_t* buf
    cdef uint8_t[:, :, ::1] o
    fixed, warning = _jpeg_header(st, v, &info, max_pixels)
    if fixed is not None:
        v = fixed
    n = v.shape[0]
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
    return out, info.orientation, warning


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
    cdef size_t y, x
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
            return out, scan.orientation, None
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
        return out, orient, None
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
    return out, orient, None


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
    pixels as (left, top, right, bottom), orientation, warning); ``warning`` as
    in ``decode``.
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
    warning = None
    # 1. header: stored size and orientation
    if fmt == FMT_JPEG:
        fixed, warning = _jpeg_header(st, v, &info, max_pixels)
        if fixed is not None:
            v = fixed
            n = v.shape[0]
        sw, sh, orient = info.width, info.height, info.orientation
    else:
        fast = _fast_scan(v, &scan, max_pixels) == FAST_OK
        if fast:
            sw, sh, orient = scan.width, scan.height, scan.orientation
        else:
            png = _png_open(v, max_pixels)
            sw, sh, orient = png.ihdr.width, png.ihdr.height, png.orient
    dw, dh = (sh, sw) if orient >= 5 else (sw, sh)
    # 2. bucket and cover crop, in display coordinates, mapped to stored coordinates
    tw, th = _bucket(pick(dw, dh), max_pixels)
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
    if rc != 0:
        plan_error(rc, f"resampling {sw}x{sh} -> {ow}x{oh}")
    return out, (dw, dh), (tw, th), (crop[0], crop[1], crop[2], crop[3]), orient, warning


cdef tuple _bucket(r, long long max_pixels):
    """(width, height) of the bucket a ``pick`` callback returned, validated."""
    try:
        tw, th = r[0], r[1]
    except (TypeError, IndexError):
        raise ValueError(f"the bucket must be a (width, height) pair, got {r!r}") from None
    tw = check_extent(tw, "bucket width")
    th = check_extent(th, "bucket height")
    if tw * th > max_pixels:
        raise ValueError(f"bucket {tw}x{th} = {tw * th} pixels exceeds max_pixels={max_pixels}")
    return tw, th


cdef uint8_t* _data(arr):
    cdef uint8_t[:, ::1] a = arr
    return &a[0, 0]


# ----------------------------------------------------------------------------- masks

MASK_VALUES = 0         # the stored values: 1 channel (grey, palette indices) or 3 (colour)
MASK_ONE = 1            # the stored values, and the mask must have one channel
MASK_COLOURS = 3        # colours: palette expanded, grey replicated (8-bit sources)

_LABEL_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int32))


def _channels_contiguous(a):
    """``a`` (H, W, C) with the channel stride equal to the item size (a view), or
    ValueError; a single channel's stride is free (``out[:, :, None]`` has 0)."""
    if a.strides[2] == a.dtype.itemsize:
        return a
    if a.shape[2] == 1:
        return np.lib.stride_tricks.as_strided(a, strides=(a.strides[0], a.strides[1],
                                                           a.dtype.itemsize))
    raise ValueError("out must have contiguous channels")


cdef tuple _mask_layout(int colour_type, int bit_depth, int want):
    """(channels, item size) of a mask's values, or MaskMismatchError.

    colour_type is the PNG's (0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA);
    alpha is never part of a mask's values (it is dropped, not composited)."""
    cdef int C = 3 if colour_type == 2 or colour_type == 6 else 1
    cdef int item = 2 if bit_depth == 16 else 1
    if want == MASK_COLOURS:
        if item == 2:
            raise MaskMismatchError("a 16-bit mask has no 8-bit colours to match a palette "
                                    "against (mask_palette needs 8-bit colour masks)")
        return 3, 1
    if want == MASK_ONE and C == 3:
        raise MaskMismatchError("a colour (RGB) mask has 3 channels; reading it as one "
                                "would average its labels")
    return C, item


cdef tuple _mask_box(r, int dw, int dh, long long max_pixels):
    """(bucket_w, bucket_h, x0, y0, x1, y1) from a mask ``pick`` callback, validated."""
    try:
        tw, th, box = r
        x0, y0, x1, y1 = (float(b) for b in box)
    except (TypeError, ValueError):
        raise ValueError(f"pick must return (bucket_w, bucket_h, (x0, y0, x1, y1)), got {r!r}") from None
    tw, th = _bucket((tw, th), max_pixels)
    if not (0.0 <= x0 < x1 <= dw and 0.0 <= y0 < y1 <= dh):
        raise ValueError(f"crop box {(x0, y0, x1, y1)} is not inside the {dw}x{dh} mask")
    return tw, th, x0, y0, x1, y1


def mask_to_bucket(data, pick, out, int want, long long max_pixels):
    """Decode a label mask (JPEG or PNG) and resample it, nearest neighbour, into a bucket.

    Values are kept: 8-bit sources give uint8, 16-bit ones int32 (or ``out``'s
    type); palette PNGs give their indices; grey PNGs of 1, 2 or 4 bits give the
    stored values (not scaled to 0..255); colour sources give 3 channels; alpha
    is dropped.  ``want``: MASK_VALUES, MASK_ONE (a colour source raises
    MaskMismatchError) or MASK_COLOURS (3 colour channels: palette expanded,
    grey replicated; 16-bit raises MaskMismatchError).  JPEG masks are decoded at
    full scale (no DCT scaling, which would blend labels).

    ``pick(display_w, display_h) -> (bucket_w, bucket_h, (x0, y0, x1, y1))``: the
    bucket and the crop box in display pixels of the mask, once the header is
    read (it may raise, e.g. MaskMismatchError).  ``out``: None, or a uint8,
    uint16 or int32 array of shape (bucket_h, bucket_w, C) (or (h, w) when
    C = 1) with contiguous channels, at least as wide as the values.

    Returns (out, (display_w, display_h), (bucket_w, bucket_h), box, orientation,
    warning), or None for other formats.
    """
    cdef const uint8_t[::1] v = data
    cdef size_t n = v.shape[0]
    cdef _State st
    cdef PngDecoder png = None
    cdef JpegInfo info
    cdef PngScan scan
    cdef int fmt, rc = 0, orient, sw, sh, dw, dh, tw, th, ow, oh, C, item, pf, ct = 0, bd = 8
    cdef int srcC, s_item, d_item
    cdef bint fast = False
    cdef double box[4]
    cdef double sbox[4]
    cdef size_t size = 0
    cdef uint8_t* buf = NULL
    cdef uint8_t* dst
    cdef uint8_t[:, :, :] o
    cdef Py_ssize_t s_row, s_px, d_row, d_px
    if want != MASK_VALUES and want != MASK_ONE and want != MASK_COLOURS:
        raise ValueError(f"want must be MASK_VALUES, MASK_ONE or MASK_COLOURS, got {want}")
    if n == 0:
        raise DecodeError("empty input (0 bytes)")
    fmt = _sniff(&v[0], n)
    if fmt == FMT_UNKNOWN:
        return None
    st = _state()
    warning = None
    # 1. header: stored size, orientation, layout of the values
    if fmt == FMT_JPEG:
        fixed, warning = _jpeg_header(st, v, &info, max_pixels)
        if fixed is not None:
            v = fixed
            n = v.shape[0]
        sw, sh, orient = info.width, info.height, info.orientation
        C, item = _mask_layout(0 if info.colorspace == tj.TJCS_GRAY else 2, 8, want)
    else:
        fast = _fast_scan(v, &scan, max_pixels) == FAST_OK
        if fast:
            sw, sh, orient = scan.width, scan.height, scan.orientation
            ct, bd = (0 if scan.channels == 1 else (2 if scan.channels == 3 else 6)), 8
        else:
            png = _png_open(v, max_pixels)
            sw, sh, orient = png.ihdr.width, png.ihdr.height, png.orient
            ct, bd = png.ihdr.color_type, png.ihdr.bit_depth
        C, item = _mask_layout(ct, bd, want)
    dw, dh = (sh, sw) if orient >= 5 else (sw, sh)
    # 2. bucket and crop box (display coordinates), mapped to stored coordinates
    tw, th, box[0], box[1], box[2], box[3] = _mask_box(pick(dw, dh), dw, dh, max_pixels)
    _source_box(orient, sw, sh, box[0], box[1], box[2], box[3], sbox)
    ow, oh = (th, tw) if orient >= 5 else (tw, th)
    # 3. output
    if out is None:
        out = np.empty((th, tw, C), dtype=np.uint8 if item == 1 else np.int32)
    elif not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    elif out.ndim == 2 and C == 1:
        out = out[:, :, None]
    if out.ndim != 3 or out.shape[0] != th or out.shape[1] != tw or out.shape[2] != C:
        raise ValueError(f"out must have shape ({th}, {tw}, {C}) for bucket {tw}x{th}, "
                         f"got {tuple(out.shape)}")
    if out.dtype not in _LABEL_DTYPES or out.dtype.itemsize < item:
        raise ValueError(f"out must be {'uint8, ' if item == 1 else ''}uint16 or int32 for "
                         f"{8 * item}-bit mask values, got {out.dtype}")
    out = _channels_contiguous(out)
    d_item = out.dtype.itemsize
    o = out.view(np.uint8)                  # raises for a read-only array
    dst = _oriented_dst(orient, &o[0, 0, 0], th, tw, out.strides[0], out.strides[1],
                        &d_row, &d_px)
    # 4. the values at full size, in the scratch (or an array kept alive here)
    keep = None
    s_item = item
    if fmt == FMT_JPEG:
        if _is_cmyk(info.colorspace):
            pf, srcC = tj.TJPF_CMYK, 4
        elif info.colorspace == tj.TJCS_GRAY:
            pf, srcC = tj.TJPF_GRAY, 1
        else:
            pf, srcC = tj.TJPF_RGB, 3
        with nogil:
            buf = st.reserve(<size_t>sw * sh * srcC)
            if buf != NULL:
                rc = st.jpeg.decode(&v[0], n, buf, sw, sw * srcC, sh, pf)
        if buf == NULL:
            raise MemoryError("JPEG: no memory for the decode buffer")
        st.jpeg.check(rc, "decoding")
        if pf == tj.TJPF_CMYK:
            with nogil:
                cmyk_convert(buf, buf, <size_t>sw * sh, 3)
            srcC = 3
        s_row, s_px = <Py_ssize_t>sw * srcC, srcC
    else:
        if fast:
            buf = _fast_inflate(v, st, &scan)
            fast = buf != NULL
        if fast:                            # unfiltered rows: pixels at buf + 1
            srcC = 1 if scan.channels == 1 else 3
            s_row, s_px = 1 + <Py_ssize_t>sw * scan.channels, scan.channels
            buf = buf + 1
        else:
            if png is None:
                png = _png_open(v, max_pixels)
            if want == MASK_COLOURS and ct == spng.SPNG_COLOR_TYPE_INDEXED:
                pf, srcC, s_px = spng.SPNG_FMT_RGB8, 3, 3          # the palette's colours
            elif bd < 8:                    # packed samples: one byte per pixel
                keep = np.empty((sh, sw), dtype=np.uint8)
                buf = _data(keep)
                _png_indices(png, st, buf)
                pf, srcC, s_px = 0, 1, 1
            else:                           # the stored samples, host-endian
                pf = spng.SPNG_FMT_PNG
                srcC = 1 if ct == 0 or ct == 3 or ct == 4 else 3
                s_px = item * (1 if ct == 0 or ct == 3 else (2 if ct == 4 else (3 if ct == 2 else 4)))
            if pf:
                with nogil:
                    rc = spng.spng_decoded_image_size(png.ctx, pf, &size)
                    if rc == 0:
                        buf = st.reserve(size)
                        if buf != NULL:
                            rc = png.decode(buf, size, pf, 0)
                png.check(rc, "decoding")
                if buf == NULL:
                    raise MemoryError("PNG: no memory for the decode buffer")
            s_row = <Py_ssize_t>sw * s_px
    # 5. nearest neighbour from the crop into out
    with nogil:
        rc = st.rs.plan(sw, sh, sbox[0], sbox[1], sbox[2], sbox[3], ow, oh, FILTER_NEAREST)
        if rc == 0:
            rc = st.rs.run_labels(buf, s_item, s_row, s_px, srcC, dst, d_item, d_row, d_px, C)
        st.trim()
    if rc != 0:
        plan_error(rc, f"resampling {sw}x{sh} -> {ow}x{oh}")
    return out, (dw, dh), (tw, th), (box[0], box[1], box[2], box[3]), orient, warning
