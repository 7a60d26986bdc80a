# cython: language_level=3
"""Declarations shared by the resampler and its per-ISA kernel builds (no .pyx).

Sizes: extents are ``int`` (the callers refuse anything above 2**31 - 1); every
product of extents (offsets, buffer sizes) is computed in ``size_t`` or
``Py_ssize_t``.
"""
from libc.stdint cimport int16_t, uint8_t

cdef enum Filter:
    FILTER_NEAREST = 0
    FILTER_BOX = 1
    FILTER_TRIANGLE = 2
    FILTER_LANCZOS3 = 3
    FILTER_BICUBIC = 4

cdef enum:
    LANES = 48          # int16/float lanes per strip column (R * channels of T)
    R_COLOR = 16        # strip height for colour to RGB (T keeps 3 channels)
    R_RGBA = 12         # strip height for 4-channel output (T keeps 4 channels)
    R_GREY = 48         # strip height for 1-channel images
    MAX_TAPS = 4096
    MAX_PLAN = 1 << 28  # weights one axis plan may hold (out_size x ntaps): 1.5 GiB
    MAX_WORK = 1 << 30  # bytes of strip scratch one resampling pass may use

cdef struct AxisPlan:
    int in_size     # extent of the source along this axis
    int out_size
    int ntaps       # taps per output sample (longest window; shorter ones padded with 0)
    int span0       # first source index read
    int span1       # one past the last source index read
    size_t cap      # allocated outputs
    size_t wcap     # allocated weights
    int* lo         # [out_size] source index of tap 0
    int* nz         # [out_size] number of non-zero taps
    int16_t* w      # [out_size * ntaps] fixed-point weights (Q15, or Q14 with negative lobes)
    float* wf       # [out_size * ntaps] the same weights in float

ctypedef void (*strips_fn)(void* work, const AxisPlan* px, const AxisPlan* py, int filt,
                           const uint8_t* src, Py_ssize_t s_row, int C, uint8_t* dst,
                           Py_ssize_t d_row, Py_ssize_t d_px, Py_ssize_t d_ch,
                           int dC) noexcept nogil

cdef struct KernelTable:
    strips_fn strips_i16
    strips_fn strips_f32


cdef inline int wbits(int filt) noexcept nogil:
    """Fraction bits of the fixed-point weights: Q15 for non-negative kernels, Q14 for
    kernels with negative lobes (Lanczos, bicubic), whose renormalised weights can
    exceed 1 where an edge clips the window."""
    return 14 if filt == FILTER_LANCZOS3 or filt == FILTER_BICUBIC else 15
