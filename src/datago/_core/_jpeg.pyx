# cython: language_level=3, boundscheck=False, wraparound=False
"""JPEG through the TurboJPEG API of the system libjpeg-turbo (TJ2 calls, kept in 3.x).

Ownership: a ``JpegDecoder`` owns one ``tjhandle`` (created in ``__cinit__``,
destroyed in ``__dealloc__``).  The pipeline keeps one per thread.  Every
TurboJPEG return code goes through ``JpegDecoder.check``, the one place that
turns it into ``DecodeError``.
"""

from libc.stdint cimport uint8_t
from libc.string cimport memset, strncpy
from datago._core cimport turbojpeg as tj
from datago._core._exif cimport jpeg_scan

from datago.errors import DecodeError

cdef extern from *:
    """
    #ifndef DATAGO_TURBOJPEG_VERSION
    #define DATAGO_TURBOJPEG_VERSION "unknown"
    #endif
    """
    const char* DATAGO_TURBOJPEG_VERSION

cdef extern from *:
    """
    /* libjpeg warnings about header trivia that leave a complete, correct image.
       Every other warning (premature end, bad Huffman code, corrupt data,
       extraneous bytes -- which also appears when the entropy decoder loses
       sync) is an error: a partially decoded image is never a success. */
    #include <string.h>
    static int datago_jpeg_benign(const char* msg) {
        return msg != NULL && (strstr(msg, "unknown JFIF revision") != NULL
                               || strstr(msg, "Invalid SOS parameters for sequential JPEG") != NULL);
    }
    """
    int datago_jpeg_benign(const char* msg) noexcept nogil

# DCT scaling factors we decode at (numerator over 8).  libjpeg-turbo 2.1 has SIMD
# IDCTs for 8/8, 4/8, 2/8 and 1/8 only; measured on the benchmark corpus, 5/8, 6/8
# and 7/8 decode slower than 8/8 (benchmarks/RESULTS.md), so they are skipped.
SCALES = (1, 2, 3, 4, 8)


def scale_numerator(double needed):
    """Smallest numerator m in SCALES with m/8 >= needed (8 when needed >= 1)."""
    cdef int m
    for m in SCALES:
        if m >= needed * 8.0 - 1e-9:
            return m
    return 8


cdef class JpegDecoder:

    def __cinit__(self):
        self.handle = tj.tjInitDecompress()
        if self.handle == NULL:
            raise MemoryError("tjInitDecompress failed")
        self.msg[0] = 0
        self.code = 0

    def __dealloc__(self):
        if self.handle != NULL:
            tj.tjDestroy(self.handle)
            self.handle = NULL

    cdef int read_header(self, const uint8_t* data, size_t n, JpegInfo* info) noexcept nogil:
        """Fill ``info``; returns 0, -1 (TurboJPEG error), HDR_NO_FRAME or HDR_MALFORMED.

        Our own marker scan runs first, so ``info.width``/``height`` hold the frame
        size even when TurboJPEG refuses the header (the caller checks max_pixels
        with them before reporting the error).
        """
        cdef int w = 0, h = 0, rc
        memset(info, 0, sizeof(JpegInfo))
        if self.handle == NULL:
            self.handle = tj.tjInitDecompress()
            if self.handle == NULL:
                return NO_HANDLE
        rc = jpeg_scan(data, n, &info.width, &info.height, &info.orientation)
        if rc == 0:
            return HDR_NO_FRAME
        if rc < 0:
            return HDR_MALFORMED
        rc = tj.tjDecompressHeader3(self.handle, data, n, &w, &h, &info.subsamp, &info.colorspace)
        if rc == 0:
            info.width = w
            info.height = h
        return self._failed(rc)

    cdef int decode(self, const uint8_t* data, size_t n, uint8_t* dst, int width, int pitch,
                    int height, int pixel_format) noexcept nogil:
        """Decode, stopping at the first warning (a corrupt file fails fast instead of
        being decoded to the end); a benign warning is decoded again without stopping."""
        cdef int rc
        if self.handle == NULL:
            return NO_HANDLE
        rc = tj.tjDecompress2(self.handle, data, n, dst, width, pitch, height,
                              pixel_format, tj.TJFLAG_LIMITSCANS | tj.TJFLAG_STOPONWARNING)
        if (rc != 0 and tj.tjGetErrorCode(self.handle) == tj.TJERR_WARNING
                and datago_jpeg_benign(tj.tjGetErrorStr2(self.handle))):
            rc = tj.tjDecompress2(self.handle, data, n, dst, width, pitch, height,
                                  pixel_format, tj.TJFLAG_LIMITSCANS)
        return self._failed(rc)

    cdef int _failed(self, int rc) noexcept nogil:
        """Record a failed call's message; replace the handle unless it was a benign
        warning (a fatal error can leave libjpeg mid-header, and the next image must
        not inherit that state).  Returns 0 for success or a benign warning, else -1."""
        if rc == 0:
            return 0
        strncpy(self.msg, tj.tjGetErrorStr2(self.handle), 255)
        self.msg[255] = 0
        self.code = tj.tjGetErrorCode(self.handle)
        if self.code == tj.TJERR_WARNING and datago_jpeg_benign(self.msg):
            return 0
        tj.tjDestroy(self.handle)
        self.handle = tj.tjInitDecompress()      # NULL is handled by the next call
        return -1

    cdef int check(self, int rc, str what) except -1:
        """Raise DecodeError for a failed call; accept the benign warnings.

        The message is the one ``_failed`` saved before it replaced the handle.
        """
        cdef bytes raw
        if rc == 0:
            return 0
        if rc == HDR_NO_FRAME:
            raise DecodeError(f"JPEG: {what} failed: the data ends before a frame header "
                              "(truncated file, or a tables-only stream)")
        if rc == HDR_MALFORMED:
            raise DecodeError(f"JPEG: {what} failed: malformed marker segment")
        if rc == NO_HANDLE:
            raise MemoryError("tjInitDecompress failed")
        raw = self.msg
        msg = raw.decode("utf-8", "replace").strip()
        if "premature end" in msg.lower():
            msg += " (truncated file?)"
        raise DecodeError(f"JPEG: {what} failed: {msg}")


def version():
    """Version of the libjpeg-turbo the module was built against (from its pkg-config)."""
    return DATAGO_TURBOJPEG_VERSION.decode()
