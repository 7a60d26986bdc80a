# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Separable antialiased resampling of 8-bit images, shaped for the vectoriser.

Safety: the kernels are ``noexcept nogil`` and work on raw pointers whose
extents the caller checked with the GIL held.  Functions that can fail
(allocation) return -1; the caller raises.

Geometry (same as Pillow's ``Image.resize(size, filter, box)``): output pixel
``i`` samples the source at ``box0 + (i + 0.5) * scale``; when downscaling the
kernel is stretched by the scale (antialiasing); windows are clipped to the
image and renormalised.

Arithmetic is 16-bit fixed point, which halves the memory traffic of float32
and doubles the SIMD lanes (this work is bound by memory traffic, not
multiplies).  Weights are Q15; source samples enter as Q7 (``v << 7``); each tap
is ``(a * w) >> 16`` (``pmulhw`` on x86, ``sqdmulh``-like on ARM), so the vertical
pass leaves Q6 and the horizontal pass Q5.  The truncation of every tap is
compensated by a rounding bias before the final shift; the result stays within
1 LSB of an exact float64 computation (tests check this).

Layout: the output is produced in strips of R rows (R*3 = 48 lanes for colour,
R = 48 for grey).  Each source row the strip needs is converted to Q7 once into
a small ring.  Pass 1 (vertical) combines ring rows into R rows of the needed
source columns (contiguous loops).  The strip is transposed to
``T[x][row][channel]``, so pass 2 (horizontal) is again a contiguous loop of
fixed length 48 per output column (an RGBX source's X channel is dropped in the
transpose); its result is rounded and stored.  No inner
loop has a branch, a gather, or a trip count unknown to the compiler.

The AVX2 build runs pass 2 for 3-channel output (the decode_to_bucket case) in
hand-written intrinsics (``datago_hpass_rgb16`` in _kernels.pxi): the 48 lanes
stay in registers through taps, rounding and packing, and each output row gets
one 4-byte store per pixel (or 48 contiguous bytes per column when an EXIF
transposition makes the strip's rows adjacent pixels).  Compiled from C, the
generic loop went through a stack buffer whose reloads straddled the stores that
filled it; the intrinsic pass halves pass 2's time.  Results are bit-identical to
the generic build (tests compare them for every orientation).
"""

from libc.math cimport ceil, floor, fabs, sin, M_PI, lrint
from libc.stdint cimport int16_t, int32_t, uint8_t, uint16_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy, memset

import numpy as np

from datago._core._kernels cimport (
    AxisPlan, KernelTable, LANES, MAX_PLAN, MAX_TAPS, MAX_WORK, R_COLOR, R_GREY, R_RGBA, wbits,
    FILTER_BICUBIC, FILTER_BOX, FILTER_LANCZOS3, FILTER_NEAREST, FILTER_TRIANGLE)

include "_kernels.pxi"

cdef extern from *:
    """
    static int datago_cpu_has_avx2(void) {
    #if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    #else
        return 0;
    #endif
    }
    """
    int datago_cpu_has_avx2() noexcept nogil

from cpython.pycapsule cimport PyCapsule_GetPointer
import os

# The kernel table in use: this module's baseline build, or the AVX2+FMA build.
cdef KernelTable* _K = &KERNELS
_SIMD = "generic"


def set_simd(str name):
    """Select the kernel build: "avx2" (needs CPU support and the compiled module),
    "generic", or "auto" (avx2 when available).  Returns the name in use.

    Both builds give identical results; this exists for tests and benchmarks.
    ``DATAGO_SIMD`` in the environment sets the choice made at import.
    """
    global _K, _SIMD
    cdef KernelTable* t
    if name not in ("auto", "avx2", "generic"):
        raise ValueError(f"simd must be 'auto', 'avx2' or 'generic', got {name!r}")
    if name == "generic" or not datago_cpu_has_avx2():
        if name == "avx2":
            raise RuntimeError("this CPU lacks AVX2/FMA")
        _K, _SIMD = &KERNELS, "generic"
        return _SIMD
    try:
        from datago._core import _resample_avx2
    except ImportError:
        if name == "avx2":
            raise RuntimeError("datago was built without the AVX2 kernels") from None
        _K, _SIMD = &KERNELS, "generic"
        return _SIMD
    t = <KernelTable*>PyCapsule_GetPointer(_resample_avx2.table(), "datago.KernelTable")
    _K, _SIMD = t, "avx2"
    return _SIMD


def simd():
    """Name of the kernel build in use ("avx2" or "generic")."""
    return _SIMD


set_simd(os.environ.get("DATAGO_SIMD", "auto") or "auto")


FILTERS = {"nearest": FILTER_NEAREST, "box": FILTER_BOX,
           "triangle": FILTER_TRIANGLE, "bilinear": FILTER_TRIANGLE,
           "bicubic": FILTER_BICUBIC, "lanczos": FILTER_LANCZOS3, "lanczos3": FILTER_LANCZOS3}


cdef inline double _sinc(double x) noexcept nogil:
    if x == 0.0:
        return 1.0
    x = x * M_PI
    return sin(x) / x


cdef inline double _kernel(int filt, double x) noexcept nogil:
    if filt == FILTER_LANCZOS3:
        if -3.0 <= x < 3.0:
            return _sinc(x) * _sinc(x / 3.0)
        return 0.0
    if filt == FILTER_TRIANGLE:
        x = fabs(x)
        return 1.0 - x if x < 1.0 else 0.0
    if filt == FILTER_BICUBIC:          # Keys cubic, a = -0.5 (Catmull-Rom), as Pillow
        x = fabs(x)
        if x < 1.0:
            return (1.5 * x - 2.5) * x * x + 1.0
        if x < 2.0:
            return ((x - 5.0) * x + 8.0) * x * -0.5 + 2.0
        return 0.0
    return 1.0 if -0.5 < x <= 0.5 else 0.0      # box, as Pillow: (-0.5, 0.5]


cdef inline double _support(int filt) noexcept nogil:
    if filt == FILTER_LANCZOS3:
        return 3.0
    if filt == FILTER_TRIANGLE:
        return 1.0
    if filt == FILTER_BICUBIC:
        return 2.0
    return 0.5


cdef inline void _window(double center, double support, int in_size, int* xmin, int* xmax) noexcept nogil:
    """[xmin, xmax) of the samples within ``support`` of ``center``, clipped to the axis
    (clipped in double first: a huge support must not overflow the int conversion)."""
    cdef double a = center - support + 0.5
    cdef double b = center + support + 0.5
    xmin[0] = 0 if a < 0.0 else (in_size if a > in_size else <int>a)
    xmax[0] = in_size if b > in_size else (0 if b < 0.0 else <int>b)


cdef inline int _max_fixed_taps(int filt) noexcept nogil:
    """Above this many taps the truncation of 16-bit taps could exceed 1/2 LSB: use float."""
    return 12 if filt == FILTER_LANCZOS3 or filt == FILTER_BICUBIC else 48


cdef int _plan_axis(AxisPlan* a, int in_size, double in0, double in1, int out_size,
                    int filt) noexcept nogil:
    """Fill ``a`` to resample [in0, in1) of an axis of ``in_size`` onto ``out_size``.

    Returns 0, -1 when memory runs out, or -2 when the plan would hold more than
    MAX_PLAN weights (out_size x taps).
    """
    cdef double scale = (in1 - in0) / out_size
    cdef double fscale = scale if scale > 1.0 else 1.0
    cdef double one = <double>(1 << wbits(filt))
    cdef double support = 0.0
    cdef double center, ss, total, wx, q
    cdef int ntaps = 1
    cdef int i, x, xmin, xmax, lo, n, acc, big
    cdef size_t nw
    cdef int16_t* row
    cdef float* rowf
    cdef void* p
    if out_size > MAX_PLAN:
        return -2
    if filt != FILTER_NEAREST:
        support = _support(filt) * fscale
        ntaps = 0
        for i in range(out_size):
            _window(in0 + (i + 0.5) * scale, support, in_size, &xmin, &xmax)
            if xmax - xmin > ntaps:
                ntaps = xmax - xmin
        if ntaps < 1:
            ntaps = 1
    nw = <size_t>out_size * <size_t>ntaps
    if out_size <= 0 or in_size <= 0 or nw > MAX_PLAN:
        return -2
    if <size_t>out_size > a.cap:
        p = realloc(a.lo, <size_t>out_size * 2 * sizeof(int))
        if p == NULL:
            return -1
        a.lo = <int*>p
        a.cap = out_size
    a.nz = a.lo + a.cap
    if nw > a.wcap:
        p = realloc(a.w, nw * sizeof(int16_t))
        if p == NULL:
            return -1
        a.w = <int16_t*>p
        p = realloc(a.wf, nw * sizeof(float))
        if p == NULL:
            return -1
        a.wf = <float*>p
        a.wcap = nw
    a.in_size = in_size
    a.out_size = out_size
    a.ntaps = ntaps
    a.span0 = in_size
    a.span1 = 0
    ss = 1.0 / fscale
    for i in range(out_size):
        center = in0 + (i + 0.5) * scale
        row = a.w + <size_t>i * ntaps
        rowf = a.wf + <size_t>i * ntaps
        memset(row, 0, ntaps * sizeof(int16_t))
        memset(rowf, 0, ntaps * sizeof(float))
        if filt == FILTER_NEAREST:
            lo = <int>floor(center)
            lo = 0 if lo < 0 else (in_size - 1 if lo > in_size - 1 else lo)
            row[0] = 32767
            rowf[0] = 1.0
        else:
            _window(center, support, in_size, &xmin, &xmax)
            n = xmax - xmin
            lo = xmin
            if lo + ntaps > in_size:
                lo = in_size - ntaps
            total = 0.0
            for x in range(n):
                total = total + _kernel(filt, (x + xmin - center + 0.5) * ss)
            if n <= 0 or total == 0.0:
                # degenerate window (cannot happen with these kernels): nearest sample
                x = <int>floor(center)
                x = 0 if x < 0 else (in_size - 1 if x > in_size - 1 else x)
                lo = x if x < lo else lo
                if lo + ntaps <= x:
                    lo = x - ntaps + 1
                row[x - lo] = <int16_t>(one if one < 32767.0 else 32767.0)
                rowf[x - lo] = 1.0
            else:
                # quantise so that the weights sum to `one` (the rounding error goes
                # onto the largest weight); a lone Q15 weight of 1.0 becomes 32767
                acc = 0
                big = xmin - lo
                for x in range(n):
                    wx = _kernel(filt, (x + xmin - center + 0.5) * ss) / total
                    rowf[xmin - lo + x] = <float>wx
                    q = lrint(wx * one)
                    q = 32767.0 if q > 32767.0 else (-32768.0 if q < -32768.0 else q)
                    row[xmin - lo + x] = <int16_t>q
                    acc = acc + <int>q
                    if row[xmin - lo + x] > row[big]:
                        big = xmin - lo + x
                acc = <int>row[big] + (<int>one - acc)
                row[big] = <int16_t>(32767 if acc > 32767 else acc)
        a.lo[i] = lo
        n = 0
        for x in range(ntaps):
            n = n + (row[x] != 0)
        a.nz[i] = n
        if lo < a.span0:
            a.span0 = lo
        if lo + ntaps > a.span1:
            a.span1 = lo + ntaps
    return 0


cdef void _nearest(const uint8_t* src, Py_ssize_t s_row, int C, const AxisPlan* px,
                   const AxisPlan* py, uint8_t* dst, Py_ssize_t d_row, Py_ssize_t d_px,
                   Py_ssize_t d_ch, int dC) noexcept nogil:
    cdef int x, y, c, sc
    cdef const uint8_t* srow
    cdef const uint8_t* sp
    cdef uint8_t* dp
    for y in range(py.out_size):
        srow = src + py.lo[y] * s_row
        for x in range(px.out_size):
            sp = srow + <Py_ssize_t>px.lo[x] * C
            dp = dst + y * d_row + x * d_px
            for c in range(dC):
                sc = c if c < C else C - 1
                dp[c * d_ch] = sp[sc]


# --- nearest neighbour for label images (masks): values copied, never blended --------

ctypedef fused lsrc_t:
    uint8_t
    uint16_t
    int32_t

ctypedef fused ldst_t:
    uint8_t
    uint16_t
    int32_t


cdef void _nearest_labels(const lsrc_t* src, Py_ssize_t s_row, Py_ssize_t s_px, int C,
                          const AxisPlan* px, const AxisPlan* py, ldst_t* dst,
                          Py_ssize_t d_row, Py_ssize_t d_px, int dC) noexcept nogil:
    """Copy the planned samples, widened to the output type (the caller never narrows).

    Strides are in bytes (the output's may be negative or swapped: EXIF orientation);
    channels are contiguous on both sides; output channel c reads source channel
    min(c, C - 1).
    """
    cdef int x, y, c
    cdef const char* srow
    cdef char* drow
    cdef const lsrc_t* sp
    cdef ldst_t* dp
    for y in range(py.out_size):
        srow = <const char*>src + py.lo[y] * s_row
        drow = <char*>dst + y * d_row
        for x in range(px.out_size):
            sp = <const lsrc_t*>(srow + px.lo[x] * s_px)
            dp = <ldst_t*>(drow + x * d_px)
            for c in range(dC):
                dp[c] = <ldst_t>sp[c if c < C else C - 1]


cdef void _labels_to(const void* src, int s_item, Py_ssize_t s_row, Py_ssize_t s_px, int C,
                     const AxisPlan* px, const AxisPlan* py, ldst_t* dst,
                     Py_ssize_t d_row, Py_ssize_t d_px, int dC) noexcept nogil:
    if s_item == 1:
        _nearest_labels(<const uint8_t*>src, s_row, s_px, C, px, py, dst, d_row, d_px, dC)
    elif s_item == 2:
        _nearest_labels(<const uint16_t*>src, s_row, s_px, C, px, py, dst, d_row, d_px, dC)
    else:
        _nearest_labels(<const int32_t*>src, s_row, s_px, C, px, py, dst, d_row, d_px, dC)


cdef class Resampler:
    """Per-thread plans and scratch memory, reused across images (no page faults)."""

    def __cinit__(self):
        memset(&self.px, 0, sizeof(AxisPlan))
        memset(&self.py, 0, sizeof(AxisPlan))
        self.filt = FILTER_TRIANGLE
        self.work = NULL
        self.work_cap = 0

    def __dealloc__(self):
        free(self.px.lo)
        free(self.px.w)
        free(self.px.wf)
        free(self.py.lo)
        free(self.py.w)
        free(self.py.wf)
        free(self.work)

    cdef int plan(self, int in_w, int in_h, double x0, double y0, double x1, double y1,
                  int out_w, int out_h, int filt) noexcept nogil:
        """Plan both axes.  Returns 0, -1 when memory runs out, -2 when a plan would
        be too large (MAX_PLAN)."""
        cdef int rc
        self.filt = filt
        rc = _plan_axis(&self.px, in_w, x0, x1, out_w, filt)
        if rc < 0:
            return rc
        return _plan_axis(&self.py, in_h, y0, y1, out_h, filt)

    cdef int run_labels(self, const void* src, int s_item, Py_ssize_t s_row, Py_ssize_t s_px,
                        int C, void* dst, int d_item, Py_ssize_t d_row, Py_ssize_t d_px,
                        int dC) noexcept nogil:
        """Nearest-neighbour copy of a label image with the current (nearest) plans.

        Item sizes name the types: 1 uint8, 2 uint16, 4 int32; ``d_item >= s_item``
        (values are widened, never narrowed; the caller checks).  Returns 0, or -2
        for item sizes it does not handle.
        """
        if d_item < s_item or not (s_item == 1 or s_item == 2 or s_item == 4):
            return -2
        if d_item == 1:
            _labels_to(src, s_item, s_row, s_px, C, &self.px, &self.py, <uint8_t*>dst,
                       d_row, d_px, dC)
        elif d_item == 2:
            _labels_to(src, s_item, s_row, s_px, C, &self.px, &self.py, <uint16_t*>dst,
                       d_row, d_px, dC)
        elif d_item == 4:
            _labels_to(src, s_item, s_row, s_px, C, &self.px, &self.py, <int32_t*>dst,
                       d_row, d_px, dC)
        else:
            return -2
        return 0

    cdef int run(self, const uint8_t* src, Py_ssize_t s_row, int C,
                 uint8_t* dst, Py_ssize_t d_row, Py_ssize_t d_px, Py_ssize_t d_ch,
                 int dC) noexcept nogil:
        """Resample with the current plans.

        ``src`` points at pixel (0, 0) of a ``C``-channel image (C in 1, 3, 4) with
        row stride ``s_row``.  ``dst`` points at output pixel (0, 0); its strides may
        be negative or swapped (that is how EXIF orientation is applied for free).
        Output channel c reads source channel min(c, C - 1), so grey fills RGB.
        Returns 0, -1 when memory runs out, -2 for a downscale beyond MAX_TAPS taps
        or a source span needing more than MAX_WORK bytes of scratch.
        """
        cdef bint use_float
        cdef size_t need
        cdef void* p
        if self.filt == FILTER_NEAREST:
            _nearest(src, s_row, C, &self.px, &self.py, dst, d_row, d_px, d_ch, dC)
            return 0
        if self.py.ntaps > MAX_TAPS:
            return -2
        use_float = (self.px.ntaps > _max_fixed_taps(self.filt)
                     or self.py.ntaps > _max_fixed_taps(self.filt))
        need = _work_bytes(&self.px, &self.py, C, sizeof(float) if use_float else sizeof(int16_t))
        if need > MAX_WORK:
            return -2
        if need > self.work_cap:
            p = realloc(self.work, need)
            if p == NULL:
                return -1
            self.work = p
            self.work_cap = need
        if use_float:
            _K.strips_f32(self.work, &self.px, &self.py, self.filt, src, s_row, C,
                          dst, d_row, d_px, d_ch, dC)
        else:
            _K.strips_i16(self.work, &self.px, &self.py, self.filt, src, s_row, C,
                          dst, d_row, d_px, d_ch, dC)
        return 0


def filter_id(name):
    """Map a filter name to its id; raises ValueError naming the valid choices."""
    try:
        return FILTERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown filter {name!r}; expected one of {sorted(FILTERS)}") from None


MAX_EXTENT = 0x7FFFFFFF
"""Largest image or output side in pixels (sizes are C ints in the kernels)."""


def check_extent(v, str what):
    """``v`` as an int in 1..MAX_EXTENT, else ValueError naming ``what``."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{what} must be an integer, got {v!r}")
    if not 1 <= v <= MAX_EXTENT:
        raise ValueError(f"{what} must be in 1..{MAX_EXTENT}, got {v}")
    return int(v)


def _check_target(out_w, out_h, channels, max_pixels):
    """Validate an output size (ValueError, before anything is allocated)."""
    w = check_extent(out_w, "target width")
    h = check_extent(out_h, "target height")
    if w * h > max_pixels:
        raise ValueError(f"target {w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}")
    return w, h


def _check_box(box, int in_w, int in_h):
    if box is None:
        return 0.0, 0.0, <double>in_w, <double>in_h
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"box must be four numbers (left, top, right, bottom), got {box!r}") from None
    if not (0 <= x0 < x1 <= in_w and 0 <= y0 < y1 <= in_h):
        raise ValueError(f"box {tuple(box)} is not inside the {in_w}x{in_h} source")
    return x0, y0, x1, y1


def plan_error(int rc, str what):
    """Raise for a failed plan/run return code (-2: ValueError, -1: MemoryError)."""
    if rc == -2:
        raise ValueError(f"{what} is too large for one pass (more than {MAX_PLAN} filter "
                         f"weights per axis, more than {MAX_TAPS} vertical taps, or more "
                         f"than {MAX_WORK >> 20} MiB of scratch)")
    if rc < 0:
        raise MemoryError(f"{what}: out of memory for the resampling plan")


def coefficients(in_size, double in0, double in1, out_size, filter="triangle"):
    """One axis's plan as numpy arrays ``(lo, weights)`` with float weights (for tests)."""
    cdef Resampler rs = Resampler()
    cdef int filt = filter_id(filter)
    cdef int i, rc, n_in, n_out
    cdef size_t k
    n_in = check_extent(in_size, "in_size")
    n_out = check_extent(out_size, "out_size")
    if not (0 <= in0 < in1 <= n_in):
        raise ValueError("need in_size > 0, out_size > 0 and 0 <= in0 < in1 <= in_size")
    with nogil:
        rc = _plan_axis(&rs.px, n_in, in0, in1, n_out, filt)
    plan_error(rc, "coefficients")
    lo = np.array([rs.px.lo[i] for i in range(n_out)], dtype=np.int32)
    w = np.array([rs.px.wf[k] for k in range(<size_t>n_out * rs.px.ntaps)], dtype=np.float64)
    return lo, w.reshape(n_out, rs.px.ntaps)


def resize(src, out_w, out_h, box=None, filter="triangle", out=None,
           long long max_pixels=MAX_EXTENT):
    """Resample ``src[box]`` (uint8, (H, W) or (H, W, C), C in 1, 3, 4) to (out_h, out_w[, C]).

    ``box`` = (x0, y0, x1, y1) in source pixels (floats allowed; default: all).
    ``out``, if given, is a uint8 array of shape (out_h, out_w, C') with any
    strides (C' = C, or 3 from a grey source); the result is written there and
    returned.  The GIL is released while resampling.  Sizes outside
    1..MAX_EXTENT, an output above ``max_pixels`` or a plan above MAX_PLAN
    weights raise ValueError before anything is allocated.
    """
    cdef const uint8_t[:, :, :] s3
    cdef uint8_t[:, :, :] o3
    cdef Resampler rs = Resampler()
    cdef int filt = filter_id(filter)
    cdef double x0, y0, x1, y1
    cdef int rc, C, dC, in_w, in_h, ow, oh
    cdef Py_ssize_t s_row, d_row, d_px, d_ch
    arr = np.asarray(src)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise TypeError(f"resize expects a uint8 array of shape (H, W) or (H, W, C), got {arr.dtype} {arr.shape}")
    squeeze = arr.ndim == 2
    if squeeze:
        arr = arr[:, :, None]
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"empty source {arr.shape[1]}x{arr.shape[0]}")
    in_h = check_extent(arr.shape[0], "source height")
    in_w = check_extent(arr.shape[1], "source width")
    if arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"resize supports 1, 3 or 4 channels, got {arr.shape[2]}")
    C = arr.shape[2]
    ow, oh = _check_target(out_w, out_h, C, max_pixels)
    x0, y0, x1, y1 = _check_box(box, in_w, in_h)
    with nogil:
        rc = rs.plan(in_w, in_h, x0, y0, x1, y1, ow, oh, filt)
    plan_error(rc, f"resize {in_w}x{in_h} -> {ow}x{oh}")
    if arr.strides[2] != 1 or arr.strides[1] != arr.shape[2]:
        arr = np.ascontiguousarray(arr)
    if out is None:
        res = np.empty((oh, ow, C), dtype=np.uint8)
    else:
        res = out if out.ndim == 3 else out[:, :, None]
        if res.dtype != np.uint8 or res.shape[0] != oh or res.shape[1] != ow or res.shape[2] not in (C, 3):
            raise ValueError(f"out must be uint8 of shape ({oh}, {ow}, {C}), got {out.dtype} {out.shape}")
    dC = res.shape[2]
    s3 = arr
    o3 = res
    s_row = arr.strides[0]
    d_row, d_px, d_ch = o3.strides[0], o3.strides[1], o3.strides[2]
    with nogil:
        rc = rs.run(&s3[0, 0, 0], s_row, C, &o3[0, 0, 0], d_row, d_px, d_ch, dC)
    plan_error(rc, f"resize {in_w}x{in_h} -> {ow}x{oh}")
    if out is not None:
        return out
    return res[:, :, 0] if squeeze else res


_LABEL_TYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int32))


def nearest(src, out_w, out_h, box=None, out=None, dtype=None,
            long long max_pixels=MAX_EXTENT):
    """Nearest-neighbour resampling of a label image: values are copied, never blended.

    ``src``: (H, W) or (H, W, C) uint8, uint16 or int32, any C.  Same geometry
    as ``resize(..., filter="nearest")``: output pixel i takes source pixel
    ``floor(box0 + (i + 0.5) * (box1 - box0) / out)``.  The result has ``dtype``
    (default the source's; never narrower) or is written into ``out`` (uint8,
    uint16 or int32 of shape (out_h, out_w[, C]), channels contiguous).
    """
    cdef Resampler rs = Resampler()
    cdef double x0, y0, x1, y1
    cdef int rc, C, in_w, in_h, ow, oh, s_item, d_item
    cdef Py_ssize_t s_row, s_px, d_row, d_px
    cdef const uint8_t[:, :, :] s3
    cdef uint8_t[:, :, :] o3
    arr = np.asarray(src)
    if arr.dtype not in _LABEL_TYPES or arr.ndim not in (2, 3):
        raise TypeError(f"nearest expects a uint8, uint16 or int32 array of shape (H, W) or "
                        f"(H, W, C), got {arr.dtype} {arr.shape}")
    squeeze = arr.ndim == 2 and out is None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"empty source of shape {arr.shape}")
    in_h = check_extent(arr.shape[0], "source height")
    in_w = check_extent(arr.shape[1], "source width")
    C = arr.shape[2]
    ow, oh = _check_target(out_w, out_h, C, max_pixels)
    x0, y0, x1, y1 = _check_box(box, in_w, in_h)
    with nogil:
        rc = rs.plan(in_w, in_h, x0, y0, x1, y1, ow, oh, FILTER_NEAREST)
    plan_error(rc, f"nearest {in_w}x{in_h} -> {ow}x{oh}")
    if arr.strides[2] != arr.itemsize:
        arr = (np.lib.stride_tricks.as_strided(arr, strides=(arr.strides[0], arr.strides[1],
                                                             arr.itemsize))
               if C == 1 else np.ascontiguousarray(arr))
    if out is None:
        dt = np.dtype(dtype) if dtype is not None else arr.dtype
        res = np.empty((oh, ow, C), dtype=dt)
    else:
        res = out if out.ndim == 3 else out[:, :, None]
        if res.shape != (oh, ow, C):
            raise ValueError(f"out must have shape ({oh}, {ow}, {C}), got {tuple(out.shape)}")
    if res.dtype not in _LABEL_TYPES or res.dtype.itemsize < arr.dtype.itemsize:
        raise ValueError(f"{arr.dtype} labels need an output of type "
                         f"{' or '.join(str(t) for t in _LABEL_TYPES if t.itemsize >= arr.dtype.itemsize)}, "
                         f"got {res.dtype}")
    if res.strides[2] != res.itemsize:
        if res.shape[2] != 1:
            raise ValueError("out must have contiguous channels")
        res = np.lib.stride_tricks.as_strided(res, strides=(res.strides[0], res.strides[1],
                                                            res.itemsize))
    s_item, d_item = arr.itemsize, res.itemsize
    s3 = arr.view(np.uint8)
    o3 = res.view(np.uint8)
    s_row, s_px = arr.strides[0], arr.strides[1]
    d_row, d_px = res.strides[0], res.strides[1]
    with nogil:
        rc = rs.run_labels(&s3[0, 0, 0], s_item, s_row, s_px, C, &o3[0, 0, 0], d_item,
                           d_row, d_px, C)
    plan_error(rc, f"nearest {in_w}x{in_h} -> {ow}x{oh}")
    if out is not None:
        return out
    return res[:, :, 0] if squeeze else res
