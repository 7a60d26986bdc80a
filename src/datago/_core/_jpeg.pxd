# cython: language_level=3
from libc.stdint cimport uint8_t
from datago._core.turbojpeg cimport tjhandle

cdef struct JpegInfo:
    int width
    int height
    int subsamp
    int colorspace      # TJCS_*
    int orientation     # EXIF 1..8

cdef class JpegDecoder:
    """One TurboJPEG decompressor handle; one per thread, never shared."""
    cdef tjhandle handle

    cdef int read_header(self, const uint8_t* data, size_t n, JpegInfo* info) noexcept nogil
    cdef int decode(self, const uint8_t* data, size_t n, uint8_t* dst, int width, int pitch,
                    int height, int pixel_format) noexcept nogil
    cdef int check(self, int rc, str what) except -1
