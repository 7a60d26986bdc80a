# cython: language_level=3
"""Declarations of libdeflate (>= 1.0): whole-buffer zlib and raw-deflate inflate, CRC-32."""
from libc.stdint cimport uint32_t

cdef extern from "libdeflate.h" nogil:
    struct libdeflate_decompressor:
        pass

    enum libdeflate_result:
        LIBDEFLATE_SUCCESS
        LIBDEFLATE_BAD_DATA
        LIBDEFLATE_SHORT_OUTPUT
        LIBDEFLATE_INSUFFICIENT_SPACE

    libdeflate_decompressor* libdeflate_alloc_decompressor()
    void libdeflate_free_decompressor(libdeflate_decompressor* d)
    libdeflate_result libdeflate_zlib_decompress(libdeflate_decompressor* d, const void* src,
                                                 size_t in_nbytes, void* out,
                                                 size_t out_nbytes_avail,
                                                 size_t* actual_out_nbytes_ret)
    uint32_t libdeflate_crc32(uint32_t crc, const void* buffer, size_t length)
    libdeflate_result libdeflate_deflate_decompress(libdeflate_decompressor* d, const void* src,
                                                    size_t in_nbytes, void* out,
                                                    size_t out_nbytes_avail,
                                                    size_t* actual_out_nbytes_ret)
