# cython: language_level=3, boundscheck=False, wraparound=False
"""Raw deflate and CRC-32 (ZIP members) with libdeflate, without the GIL.

``inflate_raw(data, size)`` inflates a whole raw-deflate stream into a new
``bytes`` of exactly ``size`` bytes -- the size a ZIP directory declares -- in one
call (libdeflate is ~2-3x zlib here, and nothing past ``size`` is ever produced:
a stream that would inflate to more, to less, or that is corrupt raises
``InflateError``, whose ``reason`` says which).  ``crc32(data)`` is the CRC-32
of ZIP and zlib (PCLMUL-accelerated where the CPU has it).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t

cimport datago._core.libdeflate as ld

__all__ = ["InflateError", "crc32", "inflate_raw"]


class InflateError(ValueError):
    """A raw-deflate stream that does not inflate to its declared size;
    ``reason``: ``"corrupt"``, ``"too_long"`` or ``"too_short"``."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def inflate_raw(const uint8_t[::1] data, Py_ssize_t size):
    """``data`` (raw deflate) inflated to exactly ``size`` bytes, or InflateError."""
    cdef ld.libdeflate_decompressor* d
    cdef ld.libdeflate_result r
    cdef size_t got = 0
    cdef size_t n = data.shape[0]
    cdef const uint8_t* src = &data[0] if n else <const uint8_t*>b""
    cdef char* dst
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if n == 0 and size == 0:
        return b""                      # (no stream at all: nothing to inflate)
    out = PyBytes_FromStringAndSize(NULL, size)
    dst = PyBytes_AS_STRING(out)
    d = ld.libdeflate_alloc_decompressor()
    if d == NULL:
        raise MemoryError("libdeflate_alloc_decompressor failed")
    try:
        with nogil:
            r = ld.libdeflate_deflate_decompress(d, src, n, dst, <size_t>size, &got)
    finally:
        ld.libdeflate_free_decompressor(d)
    if r == ld.LIBDEFLATE_INSUFFICIENT_SPACE:
        raise InflateError(f"inflates to more than its declared {size} bytes", "too_long")
    if r != ld.LIBDEFLATE_SUCCESS:
        raise InflateError("corrupt deflate data", "corrupt")
    if got != <size_t>size:
        raise InflateError(f"inflates to {got} of its declared {size} bytes", "too_short")
    return out


def crc32(const uint8_t[::1] data, uint32_t crc=0):
    """The CRC-32 of ``data`` (ZIP's and zlib's; ``crc``: a running value)."""
    cdef size_t n = data.shape[0]
    if n == 0:
        return crc
    with nogil:
        crc = ld.libdeflate_crc32(crc, &data[0], n)
    return crc
