# cython: language_level=3
from libc.stdint cimport uint8_t
from datago._core.turbojpeg cimport tjhandle
from datago._core._exif cimport JpegWalk

cdef enum:
    HDR_NO_FRAME = 1        # read_header: the data ends before a frame header
    HDR_MALFORMED = 2       # read_header: broken marker segments
    NO_HANDLE = 3           # tjInitDecompress failed (out of memory)
    HDR_REPAIR = 4          # read_header: decode ``jpeg_repaired(data)`` instead (walk.warn)

cdef struct JpegInfo:
    int width               # from our marker scan, then from TurboJPEG when it succeeds
    int height
    int subsamp
    int colorspace      # TJCS_*
    int orientation     # EXIF 1..8
    JpegWalk walk       # our marker walk (warnings and their repairs)

cdef class JpegDecoder:
    """One TurboJPEG decompressor handle; one per thread, never shared."""
    cdef tjhandle handle
    cdef bint used          # the handle has read a file (it keeps that file's tables)
    cdef char msg[256]      # message and code of the last failed call
    cdef int code

    cdef int _renew(self) noexcept nogil
    cdef int _failed(self, int rc) noexcept nogil

    cdef int read_header(self, const uint8_t* data, size_t n, JpegInfo* info) noexcept nogil
    cdef int decode(self, const uint8_t* data, size_t n, uint8_t* dst, int width, int pitch,
                    int height, int pixel_format) noexcept nogil
    cdef int check(self, int rc, str what) except -1

cdef bytes jpeg_repaired(const uint8_t[::1] v, JpegWalk* w)
cdef str jpeg_warning(JpegWalk* w)
