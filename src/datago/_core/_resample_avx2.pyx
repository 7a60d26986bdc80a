# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The resampling kernels of _kernels.pxi compiled with -mavx2 -mfma.

Imported by ``_resample`` only when the CPU has AVX2 and FMA; exposes its kernel
table as a capsule.  Results are identical to the baseline build.
"""
from libc.stdint cimport int16_t, int32_t, uint8_t
from libc.string cimport memcpy
from cpython.pycapsule cimport PyCapsule_New

from datago._core._kernels cimport (AxisPlan, KernelTable, LANES, MAX_TAPS, R_COLOR, R_RGBA,
                                    R_GREY, wbits)

include "_kernels.pxi"


def table():
    """Capsule ("datago.KernelTable") holding this build's kernel table."""
    return PyCapsule_New(<void*>&KERNELS, "datago.KernelTable", NULL)
