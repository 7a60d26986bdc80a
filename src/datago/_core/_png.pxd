# cython: language_level=3
from libc.stdint cimport uint8_t
from datago._core cimport spng

cdef class PngDecoder:
    """One libspng context for one image (spng contexts cannot be reused)."""
    cdef spng.spng_ctx* ctx
    cdef spng.spng_ihdr ihdr
    cdef bint has_trns
    cdef int orient
    cdef long long pre_width     # IHDR size read by us, before libspng validates it
    cdef long long pre_height

    cdef int open(self, const uint8_t* data, size_t n) noexcept nogil
    cdef int decode(self, void* out, size_t size, int fmt, int flags) noexcept nogil
    cdef bint has_alpha(self) noexcept nogil
    cdef int check(self, int rc, str what) except -1
