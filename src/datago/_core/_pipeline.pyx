# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Decode, decode-to-bucket and mask-to-bucket for JPEG and PNG, with the GIL released.

Entry points: ``read_header``, ``decode``, ``decode_to_bucket`` (images:
colour converted, antialiased resampling) and ``mask_to_bucket`` (label masks:
values kept, nearest neighbour, widened to int32 for 16-bit sources); the last
two share their steps (header, plan, decode, resample: see "to bucket").
``decode_png_libspng`` is the reference the PNG fast path must match (tests, fuzzer).

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
        return _decode_png(v, C, max_pixels, background)
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


cdef uint8_t* _spng_scratch(PngDecoder png, _State st, int fmt, int flags,
                           size_t* size) except NULL:
    """Decode with libspng to ``fmt`` into the scratch: the buffer, its size in ``size``."""
    cdef int rc
    cdef uint8_t* buf = NULL
    with nogil:
        rc = spng.spng_decoded_image_size(png.ctx, fmt, size)
        if rc == 0:
            buf = st.reserve(size[0])
            if buf != NULL:
                rc = png.decode(buf, size[0], fmt, flags)
    png.check(rc, "decoding")
    if buf == NULL:
        raise MemoryError("PNG: no memory for the decode buffer")
    return buf


cdef uint8_t* _png_rgba(PngDecoder png, _State st, const uint8_t* bg, uint8_t* dst,
                       int dC) except NULL:
    """Decode to RGBA (8 or 16 bit) in scratch, then convert into ``dst``.

    ``dst`` NULL converts in place (and returns the scratch).  dC: 1 (L), 3 (RGB),
    4 (RGBA) or -4 (RGB composited over bg, 4th byte 255).
    """
    cdef size_t size = 0
    cdef size_t npix = <size_t>png.ihdr.width * png.ihdr.height
    cdef int fmt = spng.SPNG_FMT_RGBA16 if png.ihdr.bit_depth == 16 else spng.SPNG_FMT_RGBA8
    cdef uint8_t* buf = _spng_scratch(png, st, fmt, spng.SPNG_DECODE_TRNS, &size)
    if dst == NULL:
        dst = buf
    with nogil:
        if fmt == spng.SPNG_FMT_RGBA16:
            rgba16_to_rgba8(<const uint16_t*>buf, buf, npix)
        rgba8_convert(buf, dst, npix, dC, bg)
    return dst


cdef int _fast_scan(const uint8_t[::1] v, PngScan* scan, long long max_pixels) except -2:
    """Run the fast path's chunk walk: FAST_OK or FAST_FALLBACK, else raise."""
    cdef int rc
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


cdef tuple _decode_png(const uint8_t[::1] v, int C, long long max_pixels, bytes background):
    """Full decode of a PNG: the fast path when it takes the file, else libspng."""
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
    return _decode_png_spng(v, C, max_pixels, background)


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


def decode_png_libspng(data, str mode, long long max_pixels, bytes background):
    """``decode`` of a PNG through libspng alone, never the fast path.

    The reference the PNG fast path (libdeflate + our unfilter, which ``decode``,
    ``decode_to_bucket`` and ``mask_to_bucket`` take for 8-bit grey, RGB and RGBA
    PNGs without tRNS or interlacing) must match bit for bit: ``tests/test_png_fast.py``
    and ``benchmarks/fuzz_core.py`` compare the two.  Returns (array, orientation,
    None) as ``decode`` does, or None for data that is not a PNG.
    """
    cdef const uint8_t[::1] v = data
    cdef int C = _channels(mode)
    if v.shape[0] == 0:
        raise DecodeError("empty input (0 bytes)")
    if _sniff(&v[0], v.shape[0]) != FMT_PNG:
        return None
    return _decode_png_spng(v, C, max_pixels, background)


cdef tuple _decode_png_spng(const uint8_t[::1] v, int C, long long max_pixels, bytes background):
    cdef _State st = _state()
    cdef PngDecoder png = _png_open(v, max_pixels)
    cdef size_t size = 0
    cdef int rc, orient, fmt, w, h
    cdef bint gray, alpha
    cdef uint8_t[:, :, ::1] o
    cdef const uint8_t* bg = background
    orient = png.orient
    w = png.ihdr.width
    h = png.ihdr.height
    gray = png.ihdr.color_type == spng.SPNG_COLOR_TYPE_GRAYSCALE
    alpha = png.has_alpha()
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
    """The samples of a one-channel PNG (palette indices or grey; 1, 2, 4 or 8 bits),
    one byte per pixel (the mask path's)."""
    cdef size_t size = 0
    cdef int bd = png.ihdr.bit_depth
    cdef uint8_t* buf = _spng_scratch(png, st, spng.SPNG_FMT_PNG, 0, &size)
    cdef size_t w = png.ihdr.width
    cdef size_t h = png.ihdr.height
    cdef size_t stride, y, x
    cdef int per, shift
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


# The steps of decode_to_bucket and mask_to_bucket, in order:
#   header    _open_source: format, stored size, orientation, and what decoding needs
#             (TurboJPEG's header, the PNG fast path's chunk walk, or a libspng decoder)
#   plan      _plan_image / _plan_mask: the bucket from ``pick``, the crop box in display
#             and stored pixels, ``out`` checked and the destination in stored orientation
#   decode    _decode_image / _decode_mask: the pixels in the per-thread scratch
#   resample  _resample_image / _resample_mask: the crop into ``out``, with the GIL released

cdef class _Source:
    """One image once its header is read: what the steps after the header need."""
    cdef const uint8_t[::1] v           # the data to decode (a repaired copy of some JPEGs)
    cdef int fmt                        # FMT_JPEG or FMT_PNG
    cdef int sw, sh, orient             # stored size, EXIF orientation 1..8
    cdef int dw, dh                     # display size (the orientation applied)
    cdef int colour_type, bit_depth     # PNG's; a JPEG has 0 (grey) or 2 (colour), 8 bits
    cdef JpegInfo info                  # JPEG: the header
    cdef bint fast                      # PNG: the fast path's chunk walk took it (scan)
    cdef PngScan scan
    cdef PngDecoder png                 # PNG: libspng's decoder, once opened (or None)
    cdef object warning                 # JPEG: None, or what the repaired header said


cdef struct _Plan:
    int tw, th                  # the bucket (display orientation)
    int ow, oh                  # the bucket in stored orientation: what the resampler writes
    double crop[4]              # the crop in display pixels: left, top, right, bottom
    double box[4]               # the same crop in stored pixels
    uint8_t* dst                # out's pixel written first, walking it in stored orientation,
    Py_ssize_t d_row, d_px      # and out's strides in bytes along that walk
    Py_ssize_t d_ch             # images: out's channel stride
    int d_item                  # masks: bytes per value of out (1, 2 or 4)


cdef struct _Pixels:
    const uint8_t* buf          # the decoded pixel (0, 0)
    int w, h                    # their size (a JPEG image's at its DCT scale)
    int C                       # channels the resampler reads
    Py_ssize_t row, px          # row and pixel strides in bytes (px: masks)
    int item                    # masks: bytes per value (1 or 2)
    double box[4]               # the plan's crop box in these pixels


cdef _Source _open_source(_State st, const uint8_t[::1] v, long long max_pixels):
    """The header step: None for a format other than JPEG and PNG.  Raises DecodeError
    for empty or corrupt data, ImageTooLargeError above ``max_pixels``."""
    cdef _Source src
    cdef int fmt
    if v.shape[0] == 0:
        raise DecodeError("empty input (0 bytes)")
    fmt = _sniff(&v[0], v.shape[0])
    if fmt == FMT_UNKNOWN:
        return None
    src = _Source()
    src.fmt = fmt
    src.v = v
    src.bit_depth = 8
    if fmt == FMT_JPEG:
        fixed, src.warning = _jpeg_header(st, v, &src.info, max_pixels)
        if fixed is not None:
            src.v = fixed
        src.sw, src.sh, src.orient = src.info.width, src.info.height, src.info.orientation
        src.colour_type = 0 if src.info.colorspace == tj.TJCS_GRAY else 2
    else:
        src.fast = _fast_scan(v, &src.scan, max_pixels) == FAST_OK
        if src.fast:
            src.sw, src.sh, src.orient = src.scan.width, src.scan.height, src.scan.orientation
            src.colour_type = 0 if src.scan.channels == 1 else (2 if src.scan.channels == 3 else 6)
        else:
            src.png = _png_open(v, max_pixels)
            src.sw, src.sh, src.orient = src.png.ihdr.width, src.png.ihdr.height, src.png.orient
            src.colour_type, src.bit_depth = src.png.ihdr.color_type, src.png.ihdr.bit_depth
    if src.orient >= 5:
        src.dw, src.dh = src.sh, src.sw
    else:
        src.dw, src.dh = src.sw, src.sh
    return src


cdef PngDecoder _spng(_Source src, long long max_pixels):
    """libspng's decoder of a PNG, opened on first use (the fast path may hand over)."""
    if src.png is None:
        src.png = _png_open(src.v, max_pixels)
    return src.png


cdef void _place(_Source src, int tw, int th, _Plan* p) noexcept:
    """Complete a plan from its bucket and crop (``p.crop``, display pixels): the crop
    in stored pixels and the bucket in stored orientation."""
    p.tw = tw
    p.th = th
    _source_box(src.orient, src.sw, src.sh, p.crop[0], p.crop[1], p.crop[2], p.crop[3], p.box)
    if src.orient >= 5:
        p.ow = th
        p.oh = tw
    else:
        p.ow = tw
        p.oh = th


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


cdef int _jpeg_format(int colorspace, bint grey, int* srcC) noexcept:
    """TurboJPEG's pixel format for a JPEG, and its channels: CMYK (4, converted after
    decoding), grey (1) when ``grey`` or the JPEG is grey, else RGB (3)."""
    if _is_cmyk(colorspace):
        srcC[0] = 4
        return tj.TJPF_CMYK
    if grey or colorspace == tj.TJCS_GRAY:
        srcC[0] = 1
        return tj.TJPF_GRAY
    srcC[0] = 3
    return tj.TJPF_RGB


cdef uint8_t* _jpeg_scratch(_Source src, _State st, int w, int h, int pf, int srcC) except NULL:
    """Decode a JPEG at w x h (its size at the DCT scale chosen) into the scratch."""
    cdef const uint8_t* data = &src.v[0]
    cdef size_t n = src.v.shape[0]
    cdef int rc = 0
    cdef uint8_t* buf
    with nogil:
        buf = st.reserve(<size_t>w * h * srcC)
        if buf != NULL:
            rc = st.jpeg.decode(data, n, buf, w, w * srcC, h, pf)
    if buf == NULL:
        raise MemoryError("JPEG: no memory for the decode buffer")
    st.jpeg.check(rc, "decoding")
    return buf


# ----------------------------------------------------------------------------- images

cdef object _plan_image(_Source src, pick, out, int C, long long max_pixels, _Plan* p):
    """The plan step of an image: the bucket ``pick`` chooses, its centred cover crop,
    and ``out`` (allocated, or checked) with the resampler's destination.  Returns out."""
    cdef int tw, th
    cdef uint8_t[:, :, :] o
    tw, th = _bucket(pick(src.dw, src.dh), max_pixels)
    _cover(src.dw, src.dh, tw, th, p.crop)
    _place(src, tw, th, p)
    if out is None:
        out = np.empty((th, tw, C), dtype=np.uint8)
    elif out.ndim == 2 and C == 1:
        out = out[:, :, None]
    if out.ndim != 3 or out.shape[0] != th or out.shape[1] != tw or out.shape[2] != C:
        raise ValueError(f"out must have shape ({th}, {tw}, {C}) for bucket {tw}x{th}, "
                         f"got {tuple(out.shape)}")
    o = out                      # raises for a read-only or non-uint8 array
    p.dst = _oriented_dst(src.orient, &o[0, 0, 0], th, tw, o.strides[0], o.strides[1],
                          &p.d_row, &p.d_px)
    p.d_ch = o.strides[2]
    return out


cdef uint8_t* _png_spng_pixels(PngDecoder png, _State st, int C, const uint8_t* bg,
                               int* srcC, Py_ssize_t* s_row) except NULL:
    """Decode a PNG with libspng into the scratch, ready for the resampler: returns the
    first pixel, sets channels and row stride."""
    cdef size_t size = 0
    cdef int pf
    cdef uint8_t* buf
    cdef bint gray = png.ihdr.color_type == spng.SPNG_COLOR_TYPE_GRAYSCALE
    if png.ihdr.bit_depth <= 8 and not png.has_alpha() and (C == 1 and gray or C == 3):
        pf = spng.SPNG_FMT_G8 if gray else spng.SPNG_FMT_RGB8
        srcC[0] = 1 if gray else 3
        buf = _spng_scratch(png, st, pf, 0, &size)
    else:
        srcC[0] = 1 if C == 1 else 4
        buf = _png_rgba(png, st, bg, NULL, -4 if srcC[0] == 4 else 1)
    s_row[0] = <Py_ssize_t>png.ihdr.width * srcC[0]
    return buf


cdef int _decode_image(_Source src, _State st, _Plan* p, int C, const uint8_t* bg,
                       long long max_pixels, _Pixels* s) except -1:
    """The decode step of an image, into the scratch: grey, RGB or RGBX (alpha
    composited over ``bg``).  A JPEG is decoded at the smallest DCT scale m/8 that
    still covers the bucket, and the crop box scaled with it."""
    cdef double scale
    cdef int m, pf, srcC, dstC, i
    cdef uint8_t* buf = NULL
    cdef PngScan* scan = &src.scan
    s.w, s.h = src.sw, src.sh
    for i in range(4):
        s.box[i] = p.box[i]
    if src.fmt == FMT_JPEG:
        scale = max(<double>p.tw / src.dw, <double>p.th / src.dh)
        m = 8 if scale >= 1.0 else scale_numerator(scale)
        s.w = (src.sw * m + 7) // 8
        s.h = (src.sh * m + 7) // 8
        pf = _jpeg_format(src.info.colorspace, C == 1, &srcC)
        buf = _jpeg_scratch(src, st, s.w, s.h, pf, srcC)
        if pf == tj.TJPF_CMYK:
            dstC = 1 if C == 1 else 4
            with nogil:
                cmyk_convert(buf, buf, <size_t>s.w * s.h, dstC)
            srcC = dstC
        for i in range(4):
            s.box[i] = p.box[i] * m / 8.0
        s.box[2] = min(s.box[2], s.w)
        s.box[3] = min(s.box[3], s.h)
        s.buf, s.C, s.row = buf, srcC, <Py_ssize_t>s.w * srcC
        return 0
    if src.fast:
        buf = _fast_inflate(src.v, st, scan)
    if buf != NULL:
        # unfiltered rows in the scratch, converted in place (pixels never grow)
        if C == 1 or scan.channels == 1:
            srcC, dstC = 1, 1
        elif scan.channels == 3:
            srcC, dstC = 3, 3
        else:
            srcC, dstC = 4, -4
        s.row = 1 + <Py_ssize_t>src.sw * scan.channels
        if dstC != scan.channels:
            with nogil:
                _fast_rows(buf, scan, buf + 1, s.row, dstC, bg)
        s.buf, s.C = buf + 1, srcC
    else:
        s.buf = _png_spng_pixels(_spng(src, max_pixels), st, C, bg, &s.C, &s.row)
    return 0


cdef int _resample_image(_State st, _Pixels* s, _Plan* p, int filt, int C) except -1:
    """The resample step of an image: the crop of the decoded pixels into ``out``."""
    cdef int rc
    with nogil:
        rc = st.rs.plan(s.w, s.h, s.box[0], s.box[1], s.box[2], s.box[3], p.ow, p.oh, filt)
        if rc == 0:
            rc = st.rs.run(s.buf, s.row, s.C, p.dst, p.d_row, p.d_px, p.d_ch, C)
        st.trim()
    if rc != 0:
        plan_error(rc, f"resampling {s.w}x{s.h} -> {p.ow}x{p.oh}")
    return 0


def decode_to_bucket(data, pick, out, str mode, int filt, long long max_pixels,
                     bytes background):
    """The fused path (JPEG/PNG).  Returns None for other formats.

    ``pick(display_w, display_h) -> (bucket_w, bucket_h)`` chooses the bucket once the
    header is read; ``out`` is None or a uint8 (bh, bw, C) array (any strides).
    Returns (out, (display_w, display_h), (bucket_w, bucket_h), crop box in display
    pixels as (left, top, right, bottom), orientation, warning); ``warning`` as
    in ``decode``.
    """
    cdef const uint8_t[::1] v = data
    cdef int C = _channels(mode)
    cdef const uint8_t* bg = background
    cdef _State st
    cdef _Source src
    cdef _Plan p
    cdef _Pixels s
    if C == 4:
        raise ValueError("decode_to_bucket supports mode 'RGB' or 'L' (alpha is composited)")
    st = _state()
    src = _open_source(st, v, max_pixels)
    if src is None:
        return None
    out = _plan_image(src, pick, out, C, max_pixels, &p)
    _decode_image(src, st, &p, C, bg, max_pixels, &s)
    _resample_image(st, &s, &p, filt, C)
    return (out, (src.dw, src.dh), (p.tw, p.th), (p.crop[0], p.crop[1], p.crop[2], p.crop[3]),
            src.orient, src.warning)


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


cdef object _plan_mask(_Source src, pick, out, int C, int item, long long max_pixels,
                       _Plan* p):
    """The plan step of a mask: the bucket and crop box ``pick`` returns (validated),
    and ``out`` (allocated, or checked: shape, a label type wide enough, contiguous
    channels) with the resampler's destination.  Returns out (maybe a view of it)."""
    cdef int tw, th
    cdef uint8_t[:, :, :] o
    tw, th, p.crop[0], p.crop[1], p.crop[2], p.crop[3] = _mask_box(
        pick(src.dw, src.dh), src.dw, src.dh, max_pixels)
    _place(src, tw, th, p)
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
    p.d_item = out.dtype.itemsize
    o = out.view(np.uint8)                  # raises for a read-only array
    p.dst = _oriented_dst(src.orient, &o[0, 0, 0], th, tw, out.strides[0], out.strides[1],
                          &p.d_row, &p.d_px)
    return out


cdef object _decode_mask(_Source src, _State st, _Plan* p, int want, int item,
                         long long max_pixels, _Pixels* s):
    """The decode step of a mask: its values at full size (no DCT scaling, which would
    blend labels), in the scratch or in an array returned to be kept alive until the
    resample is done (PNG samples of 1, 2 or 4 bits, unpacked to a byte each)."""
    cdef int pf, srcC, i, ct = src.colour_type, bd = src.bit_depth
    cdef size_t size = 0
    cdef uint8_t* buf = NULL
    cdef PngDecoder png
    keep = None
    s.w, s.h, s.item = src.sw, src.sh, item
    for i in range(4):
        s.box[i] = p.box[i]
    if src.fmt == FMT_JPEG:
        pf = _jpeg_format(src.info.colorspace, False, &srcC)
        buf = _jpeg_scratch(src, st, src.sw, src.sh, pf, srcC)
        if pf == tj.TJPF_CMYK:
            with nogil:
                cmyk_convert(buf, buf, <size_t>src.sw * src.sh, 3)
            srcC = 3
        s.row, s.px = <Py_ssize_t>src.sw * srcC, srcC
    else:
        if src.fast:
            buf = _fast_inflate(src.v, st, &src.scan)
        if buf != NULL:                     # unfiltered rows: pixels at buf + 1
            srcC = 1 if src.scan.channels == 1 else 3
            s.row, s.px = 1 + <Py_ssize_t>src.sw * src.scan.channels, src.scan.channels
            buf = buf + 1
        else:
            png = _spng(src, max_pixels)
            if want == MASK_COLOURS and ct == spng.SPNG_COLOR_TYPE_INDEXED:
                pf, srcC, s.px = spng.SPNG_FMT_RGB8, 3, 3          # the palette's colours
            elif bd < 8:                    # packed samples: one byte per pixel
                keep = np.empty((src.sh, src.sw), dtype=np.uint8)
                buf = _data(keep)
                _png_indices(png, st, buf)
                pf, srcC, s.px = 0, 1, 1
            else:                           # the stored samples, host-endian
                pf = spng.SPNG_FMT_PNG
                srcC = 1 if ct == 0 or ct == 3 or ct == 4 else 3
                s.px = item * (1 if ct == 0 or ct == 3 else (2 if ct == 4 else (3 if ct == 2 else 4)))
            if pf:
                buf = _spng_scratch(png, st, pf, 0, &size)
            s.row = <Py_ssize_t>src.sw * s.px
    s.buf, s.C = buf, srcC
    return keep


cdef int _resample_mask(_State st, _Pixels* s, _Plan* p, int C) except -1:
    """The resample step of a mask: nearest neighbour from the crop into ``out``."""
    cdef int rc
    with nogil:
        rc = st.rs.plan(s.w, s.h, s.box[0], s.box[1], s.box[2], s.box[3], p.ow, p.oh,
                        FILTER_NEAREST)
        if rc == 0:
            rc = st.rs.run_labels(s.buf, s.item, s.row, s.px, s.C, p.dst, p.d_item, p.d_row,
                                  p.d_px, C)
        st.trim()
    if rc != 0:
        plan_error(rc, f"resampling {s.w}x{s.h} -> {p.ow}x{p.oh}")
    return 0


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
    cdef _State st
    cdef _Source src
    cdef _Plan p
    cdef _Pixels s
    cdef int C, item
    if want != MASK_VALUES and want != MASK_ONE and want != MASK_COLOURS:
        raise ValueError(f"want must be MASK_VALUES, MASK_ONE or MASK_COLOURS, got {want}")
    st = _state()
    src = _open_source(st, v, max_pixels)
    if src is None:
        return None
    C, item = _mask_layout(src.colour_type, src.bit_depth, want)
    out = _plan_mask(src, pick, out, C, item, max_pixels, &p)
    keep = _decode_mask(src, st, &p, want, item, max_pixels, &s)     # alive until resampled
    _resample_mask(st, &s, &p, C)
    return (out, (src.dw, src.dh), (p.tw, p.th), (p.crop[0], p.crop[1], p.crop[2], p.crop[3]),
            src.orient, src.warning)
