# cython: language_level=3
"""Separable resampling of 8-bit images (C-level API shared by the _core modules)."""
from libc.stdint cimport uint8_t
from datago._core._kernels cimport AxisPlan

cdef class Resampler:
    """Owns the plans and scratch memory of one thread's resampling calls."""
    cdef AxisPlan px
    cdef AxisPlan py
    cdef int filt
    cdef void* work
    cdef size_t work_cap

    cdef int plan(self, int in_w, int in_h, double x0, double y0, double x1, double y1,
                  int out_w, int out_h, int filt) noexcept nogil
    cdef int run_labels(self, const void* src, int s_item, Py_ssize_t s_row, Py_ssize_t s_px,
                        int C, void* dst, int d_item, Py_ssize_t d_row, Py_ssize_t d_px,
                        int dC) noexcept nogil
    cdef int run(self, const uint8_t* src, Py_ssize_t s_row, int channels,
                 uint8_t* dst, Py_ssize_t d_row, Py_ssize_t d_px, Py_ssize_t d_ch,
                 int d_channels) noexcept nogil
