# cython: language_level=3, boundscheck=False, wraparound=False
"""JPEG through the TurboJPEG API of the system libjpeg-turbo (TJ2 calls, kept in 3.x).

Ownership: a ``JpegDecoder`` owns one ``tjhandle`` (created in ``__cinit__``,
destroyed in ``__dealloc__``).  The pipeline keeps one per thread.  Every
TurboJPEG return code goes through ``JpegDecoder.check``, the one place that
turns it into ``DecodeError``.

Warnings.  libjpeg decodes through many warnings; datago accepts a file only
when the pixels are the ones libjpeg (and Pillow) produce for it:

* header-level warnings whose effect is known -- bytes before a marker (which
  libjpeg skips), an unknown JFIF major version, an unknown Adobe transform code
  (taken as YCbCr/YCCK), out-of-range Ss/Se/Ah/Al in a sequential file's scans
  (ignored) -- are found by our marker walk (``_exif.jpeg_walk``); the header is
  repaired in a copy (``jpeg_repaired``: the same bytes libjpeg acts on) and the
  file is decoded without warnings.  The caller reports ``jpeg_warning`` (counted
  as ``decoded_with_warnings`` by the loader).
* every other warning -- bad Huffman or arithmetic code, premature end of a data
  segment or of the file, lost restart-marker sync, extraneous bytes inside the
  scans, an inconsistent progression sequence -- means missing or wrong pixels:
  decoding stops at it (TJFLAG_STOPONWARNING) and it is a DecodeError, although
  Pillow returns the (partly grey) image for some of them.

Tables.  libjpeg keeps the Huffman and quantisation tables of earlier files in a
reused handle, and installs the standard Huffman tables only where none is set
(Motion-JPEG frames carry no DHT).  A file whose first scan uses a table its
header does not define therefore gets a fresh handle (3 us), so it decodes as it
would alone: standard tables, or libjpeg's "table not defined" error.
"""

from libc.stdint cimport uint8_t
from libc.string cimport memset, strncpy
from datago._core cimport turbojpeg as tj
from datago._core._exif cimport (jpeg_walk, JW_ADOBE, JW_JFIF, JW_JUNK, JW_SOS,
                                 JpegWalk)

from datago.errors import DecodeError

cdef extern from *:
    """
    #ifndef DATAGO_TURBOJPEG_VERSION
    #define DATAGO_TURBOJPEG_VERSION "unknown"
    #endif
    """
    const char* DATAGO_TURBOJPEG_VERSION

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
        self.used = False
        self.msg[0] = 0
        self.code = 0

    def __dealloc__(self):
        if self.handle != NULL:
            tj.tjDestroy(self.handle)
            self.handle = NULL

    cdef int _renew(self) noexcept nogil:
        """Replace the handle by a fresh one (no tables); 0, or NO_HANDLE."""
        if self.handle != NULL:
            tj.tjDestroy(self.handle)
        self.handle = tj.tjInitDecompress()
        self.used = False
        return 0 if self.handle != NULL else NO_HANDLE

    cdef int read_header(self, const uint8_t* data, size_t n, JpegInfo* info) noexcept nogil:
        """Fill ``info``; returns 0, -1 (TurboJPEG error), HDR_NO_FRAME, HDR_MALFORMED,
        HDR_REPAIR (the header needs ``jpeg_repaired``) or NO_HANDLE.

        Our own marker walk runs first, so ``info.width``/``height`` hold the frame
        size even when TurboJPEG refuses the header (the caller checks max_pixels
        with them before reporting the error).
        """
        cdef int w = 0, h = 0, rc
        memset(info, 0, sizeof(JpegInfo))
        if self.handle == NULL and self._renew() != 0:
            return NO_HANDLE
        rc = jpeg_walk(data, n, &info.walk)
        info.width = info.walk.width
        info.height = info.walk.height
        info.orientation = info.walk.orientation
        if rc == 0:
            return HDR_NO_FRAME
        if rc < 0:
            return HDR_MALFORMED
        if info.walk.njunk or info.walk.npatch or info.walk.warn & JW_SOS:
            return HDR_REPAIR
        if info.walk.undefined_tables and self.used and self._renew() != 0:
            return NO_HANDLE
        self.used = True
        rc = tj.tjDecompressHeader3(self.handle, data, n, &w, &h, &info.subsamp, &info.colorspace)
        if rc == 0:
            info.width = w
            info.height = h
        return self._failed(rc)

    cdef int decode(self, const uint8_t* data, size_t n, uint8_t* dst, int width, int pitch,
                    int height, int pixel_format) noexcept nogil:
        """Decode the file ``read_header`` accepted, stopping at the first warning (a
        corrupt file fails fast instead of being decoded to the end)."""
        cdef int rc
        if self.handle == NULL:
            return NO_HANDLE
        self.used = True
        rc = tj.tjDecompress2(self.handle, data, n, dst, width, pitch, height,
                              pixel_format, tj.TJFLAG_LIMITSCANS | tj.TJFLAG_STOPONWARNING)
        return self._failed(rc)

    cdef int _failed(self, int rc) noexcept nogil:
        """Record a failed call's message and replace the handle (a failure can leave
        libjpeg mid-header, and the next image must not inherit that state).
        Returns 0 for success, else -1."""
        if rc == 0:
            return 0
        strncpy(self.msg, tj.tjGetErrorStr2(self.handle), 255)
        self.msg[255] = 0
        self.code = tj.tjGetErrorCode(self.handle)
        self._renew()                   # NULL is handled by the next call
        return -1

    cdef int check(self, int rc, str what) except -1:
        """Raise DecodeError for a failed call.

        The message is the one ``_failed`` saved before it replaced the handle.
        """
        cdef bytes raw
        if rc == 0:
            return 0
        if rc == HDR_NO_FRAME:
            raise DecodeError(f"JPEG: {what} failed: the data ends before a frame header "
                              "(truncated file, or a tables-only stream)")
        if rc == HDR_MALFORMED or rc == HDR_REPAIR:
            raise DecodeError(f"JPEG: {what} failed: malformed marker segment")
        if rc == NO_HANDLE:
            raise MemoryError("tjInitDecompress failed")
        raw = self.msg
        msg = raw.decode("utf-8", "replace").strip()
        if "premature end" in msg.lower():
            msg += " (truncated file?)"
        raise DecodeError(f"JPEG: {what} failed: {msg}")


cdef void _patch_scans(uint8_t* d, size_t n, size_t at) noexcept nogil:
    """Set Ss = 0, Se = 63, Ah/Al = 0 in every SOS segment from the marker byte at
    ``at`` on (libjpeg ignores them in a sequential file, with a warning per scan)."""
    cdef size_t pos = at, nxt, seglen, ns
    cdef uint8_t m
    while pos < n:
        m = d[pos]
        if m == 0xD9:
            return
        nxt = pos + 1
        if not (m == 0x01 or m == 0xD8 or 0xD0 <= m <= 0xD7):
            if pos + 2 >= n:
                return
            seglen = (<size_t>d[pos + 1] << 8) | d[pos + 2]
            if m == 0xDA and pos + 3 < n:
                ns = d[pos + 3]
                if seglen == 6 + 2 * ns and pos + 1 + seglen <= n:
                    d[pos + 4 + 2 * ns] = 0
                    d[pos + 5 + 2 * ns] = 63
                    d[pos + 6 + 2 * ns] = 0
            nxt = pos + 1 + seglen
        # the next marker: 0xFF and a byte other than 00 (stuffing), FF (fill) or RSTn
        pos = nxt
        while pos + 1 < n and not (d[pos] == 0xFF and d[pos + 1] != 0 and d[pos + 1] != 0xFF
                                   and not (0xD0 <= d[pos + 1] <= 0xD7)):
            pos += 1
        pos += 1


cdef bytes jpeg_repaired(const uint8_t[::1] v, JpegWalk* w):
    """A copy of the file with the header repairs of ``w`` applied: patched bytes, and
    the junk runs libjpeg skips removed (offsets in ``w`` refer to ``v``)."""
    cdef bytearray b = bytearray(v)
    cdef unsigned char[::1] bv = b
    cdef size_t n = bv.shape[0]
    cdef size_t last = 0
    cdef int i
    for i in range(w.npatch):
        bv[w.patch_at[i]] = w.patch_val[i]
    if w.warn & JW_SOS:
        with nogil:
            _patch_scans(&bv[0], n, w.sos_at)
    parts = []
    for i in range(w.njunk):
        parts.append(b[last:w.junk_at[i]])
        last = w.junk_at[i] + w.junk_len[i]
    parts.append(b[last:])
    return bytes(b"".join(parts))


cdef str jpeg_warning(JpegWalk* w):
    """What libjpeg would have warned about (the repairs ``jpeg_repaired`` makes)."""
    parts = []
    if w.warn & JW_JUNK:
        parts.append(f"{w.junk_total} extraneous bytes before marker 0x{w.junk_marker:02x} skipped")
    if w.warn & JW_JFIF:
        parts.append(f"unknown JFIF major version {w.jfif_major} ignored")
    if w.warn & JW_ADOBE:
        parts.append(f"unknown Adobe transform code {w.adobe_transform} taken as "
                     f"{'YCbCr' if w.ncomp == 3 else 'YCCK'}")
    if w.warn & JW_SOS:
        parts.append("invalid SOS parameters for a sequential JPEG ignored")
    return "JPEG: " + "; ".join(parts)


def version():
    """Version of the libjpeg-turbo the module was built against (from its pkg-config)."""
    return DATAGO_TURBOJPEG_VERSION.decode()
