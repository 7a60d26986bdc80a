# cython: language_level=3, boundscheck=False, wraparound=False
"""PNG through libspng.

Ownership: a ``PngDecoder`` owns one ``spng_ctx`` (``__cinit__``/``__dealloc__``);
the pipeline makes one per image.  Every libspng return code goes through
``PngDecoder.check``, the one place that turns it into ``DecodeError``.
"""

from libc.stdint cimport uint8_t
from datago._core cimport spng
from datago._core._exif cimport tiff_orientation

from datago.errors import DecodeError

# Ancillary chunks above this size are refused (a decompression bomb in a zTXt/iCCP).
cdef size_t CHUNK_LIMIT = 64 * 1024 * 1024
cdef size_t CACHE_LIMIT = 128 * 1024 * 1024


cdef class PngDecoder:

    def __cinit__(self):
        self.ctx = spng.spng_ctx_new(0)
        if self.ctx == NULL:
            raise MemoryError("spng_ctx_new failed")
        self.has_trns = False
        self.orient = 1
        self.pre_width = self.pre_height = 0

    def __dealloc__(self):
        if self.ctx != NULL:
            spng.spng_ctx_free(self.ctx)
            self.ctx = NULL

    cdef int open(self, const uint8_t* data, size_t n) noexcept nogil:
        """Attach the bytes and read the chunks before the image data; returns an spng code.

        Sets ``pre_width``/``pre_height`` from the IHDR bytes first, so the caller can
        apply max_pixels even to a header libspng rejects; reads tRNS and the EXIF
        orientation (eXIf before IDAT).
        """
        cdef spng.spng_trns trns
        cdef spng.spng_exif exif
        cdef int rc
        if n >= 24 and data[12] == 0x49 and data[13] == 0x48 and data[14] == 0x44 and data[15] == 0x52:
            self.pre_width = (<long long>data[16] << 24) | (data[17] << 16) | (data[18] << 8) | data[19]
            self.pre_height = (<long long>data[20] << 24) | (data[21] << 16) | (data[22] << 8) | data[23]
        rc = spng.spng_set_png_buffer(self.ctx, data, n)
        if rc:
            return rc
        rc = spng.spng_set_chunk_limits(self.ctx, CHUNK_LIMIT, CACHE_LIMIT)
        if rc:
            return rc
        rc = spng.spng_get_ihdr(self.ctx, &self.ihdr)
        if rc:
            return rc
        rc = spng.spng_get_trns(self.ctx, &trns)
        if rc == 0:
            self.has_trns = True
        elif rc != spng.SPNG_ECHUNKAVAIL:
            return rc
        rc = spng.spng_get_exif(self.ctx, &exif)
        if rc == 0 and exif.data != NULL:
            self.orient = tiff_orientation(<const uint8_t*>exif.data, exif.length)
        elif rc != 0 and rc != spng.SPNG_ECHUNKAVAIL:
            return rc
        return 0

    cdef bint has_alpha(self) noexcept nogil:
        return (self.has_trns
                or self.ihdr.color_type == spng.SPNG_COLOR_TYPE_GRAYSCALE_ALPHA
                or self.ihdr.color_type == spng.SPNG_COLOR_TYPE_TRUECOLOR_ALPHA)

    cdef int decode(self, void* out, size_t size, int fmt, int flags) noexcept nogil:
        """Decode the image, then read the chunks after it up to IEND, so the CRC of
        the last IDAT and of trailing chunks is verified too."""
        cdef int rc = spng.spng_decode_image(self.ctx, out, size, fmt, flags)
        if rc == 0:
            rc = spng.spng_decode_chunks(self.ctx)
        return rc

    cdef int check(self, int rc, str what) except -1:
        if rc == 0:
            return 0
        if rc == -1:        # SPNG_IO_EOF
            msg = "unexpected end of data (truncated file?)"
        else:
            msg = (<bytes>spng.spng_strerror(rc)).decode("utf-8", "replace")
        raise DecodeError(f"PNG: {what} failed: {msg}")


def version():
    """Version of the libspng in use."""
    return (<bytes>spng.spng_version_string()).decode()
