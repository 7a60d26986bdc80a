# cython: language_level=3
from libc.stdint cimport uint8_t
from datago._core.turbojpeg cimport tjhandle

cdef enum:
    HDR_NO_FRAME = 1        # read_header: the data ends before a frame header
    HDR_MALFORMED = 2       # read_header: broken marker segments
    NO_HANDLE = 3           # tjInitDecompress failed (out of memory)

cdef struct JpegInfo:
    int width               # from our marker scan, then from TurboJPEG when it succeeds
    int height
    int subsamp
    int colorspace      # TJCS_*
    int orientation     # EXIF 1..8

cdef class JpegDecoder:
    """One TurboJPEG decompressor handle; one per thread, never shared."""
    cdef tjhandle handle
    cdef char msg[256]      # message and code of the last failed call
    cdef int code

    cdef int _failed(self, int rc) noexcept nogil

    cdef int read_header(self, const uint8_t* data, size_t n, JpegInfo* info) noexcept nogil
    cdef int decode(self, const uint8_t* data, size_t n, uint8_t* dst, int width, int pitch,
                    int height, int pixel_format) noexcept nogil
    cdef int check(self, int rc, str what) except -1
