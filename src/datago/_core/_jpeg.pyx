# cython: language_level=3, boundscheck=False, wraparound=False
"""JPEG through the TurboJPEG API of the system libjpeg-turbo (TJ2 calls, kept in 3.x).

Ownership: a ``JpegDecoder`` owns one ``tjhandle`` (created in ``__cinit__``,
destroyed in ``__dealloc__``).  The pipeline keeps one per thread.  Every
TurboJPEG return code goes through ``JpegDecoder.check``, the one place that
turns it into ``DecodeError``.
"""

from libc.stdint cimport uint8_t
from datago._core cimport turbojpeg as tj
from datago._core._exif cimport jpeg_orientation

from datago.errors import DecodeError

cdef extern from *:
    """
    #ifndef DATAGO_TURBOJPEG_VERSION
    #define DATAGO_TURBOJPEG_VERSION "unknown"
    #endif
    """
    const char* DATAGO_TURBOJPEG_VERSION

# libjpeg warnings that leave a complete, correct image behind.  Everything else a
# decoder reports (premature end, bad Huffman code, corrupt data) is an error: a
# partially decoded image is never returned as a success.
_BENIGN_WARNINGS = (
    "extraneous bytes before marker 0xd9",      # junk between the last scan and EOI
    "unknown jfif revision number",
    "invalid sos parameters for sequential jpeg",
)

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

    def __dealloc__(self):
        if self.handle != NULL:
            tj.tjDestroy(self.handle)
            self.handle = NULL

    cdef int read_header(self, const uint8_t* data, size_t n, JpegInfo* info) noexcept nogil:
        cdef int rc = tj.tjDecompressHeader3(self.handle, data, n, &info.width, &info.height,
                                             &info.subsamp, &info.colorspace)
        info.orientation = jpeg_orientation(data, n)
        return rc

    cdef int decode(self, const uint8_t* data, size_t n, uint8_t* dst, int width, int pitch,
                    int height, int pixel_format) noexcept nogil:
        return tj.tjDecompress2(self.handle, data, n, dst, width, pitch, height, pixel_format,
                                tj.TJFLAG_LIMITSCANS)

    cdef int check(self, int rc, str what) except -1:
        """Raise DecodeError for a failed TurboJPEG call; accept the benign warnings."""
        cdef bytes raw
        if rc == 0:
            return 0
        raw = tj.tjGetErrorStr2(self.handle)
        msg = raw.decode("utf-8", "replace").strip()
        if tj.tjGetErrorCode(self.handle) == tj.TJERR_WARNING:
            low = msg.lower()
            if any(b in low for b in _BENIGN_WARNINGS):
                return 0
        if "premature end" in msg.lower():
            msg += " (truncated file?)"
        raise DecodeError(f"JPEG: {what} failed: {msg}")


def version():
    """Version of the libjpeg-turbo the module was built against (from its pkg-config)."""
    return DATAGO_TURBOJPEG_VERSION.decode()
