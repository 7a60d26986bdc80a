# cython: language_level=3, boundscheck=False, wraparound=False
"""PNG: a fast path for the common files, libspng for everything else.

EXIF orientation: the last eXIf chunk with a valid CRC, before or after the image
data (as Pillow reads it), on both paths.

Fast path (8-bit grey, RGB or RGBA, not interlaced, no tRNS -- the bulk of
photo and mask datasets): our own chunk walk (every chunk's CRC checked),
libdeflate's whole-buffer zlib inflate (2.4x faster than zlib's streaming inflate
on the benchmark corpus; Adler-32 checked) and our own unfiltering, in place
(SSE2 for RGB and RGBA: ``_unfilter.pxi``).
Anything else, and anything the walk finds unusual (odd chunk order, unknown
critical chunks, invalid headers, chunks libspng refuses: see ``png_scan``, more
data than the header announces), is handed to libspng, which also produces the
error messages for malformed files.

Ownership: a ``PngDecoder`` owns one ``spng_ctx`` (``__cinit__``/``__dealloc__``),
made per image; an ``Inflater`` owns one libdeflate decompressor, kept per thread.
libspng codes go through ``PngDecoder.check``, fast-path codes through
``png_fast_message``: the two places that turn them into ``DecodeError``.
"""

from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcpy, memcmp
from datago._core cimport spng
from datago._core cimport libdeflate as ld
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
        orientation (``png_orientation``: eXIf wherever it is).
        """
        cdef spng.spng_trns trns
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
        self.orient = png_orientation(data, n)
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


# ----------------------------------------------------------------------------- fast path

cdef inline uint32_t _be32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


# Chunk types, as _be32 reads them.
cdef enum:
    T_IDAT = 0x49444154
    T_IEND = 0x49454E44
    T_PLTE = 0x504C5445
    T_tRNS = 0x74524E53
    T_eXIf = 0x65584966
    T_tEXt = 0x74455874
    T_zTXt = 0x7A545874
    T_iTXt = 0x69545874
    T_iCCP = 0x69434350
    T_sPLT = 0x73504C54
    T_bKGD = 0x624B4744
    T_hIST = 0x68495354

# What libspng (0.7, not strict) refuses in chunks the fast path would otherwise
# read, found with benchmarks/fuzz_core.py and crafted files (tests/test_png_fast.py):
# - IEND with data; a PLTE of 0 bytes, a length not a multiple of 3 or above 768
#   bytes, or after a bKGD or hIST chunk;
# - an empty eXIf chunk (the first one; "reached chunk/cache limits");
# - more than 1000 eXIf/tEXt/zTXt/iTXt/sPLT chunks, counted whatever their CRC
#   ("reached chunk/cache limits"), and text or profiles that decompress beyond
#   CHUNK_LIMIT, or together beyond CACHE_LIMIT.
# The walk hands such files to libspng, which refuses them (or reads them) in its
# own words.  The limits are checked on a bound: more than STORED_COUNT such
# chunks, or more than STORED_BYTES as counted by _stored_bound (deflate expands
# at most 1032:1), go to libspng.
cdef int STORED_COUNT = 256
cdef unsigned long long STORED_BYTES = 32 * 1024 * 1024


cdef inline unsigned long long _stored_bound(uint32_t typ, size_t length) noexcept nogil:
    """An upper bound on what libspng keeps in memory for one of these chunks."""
    if typ == T_zTXt or typ == T_iTXt or typ == T_iCCP:
        return 1032 * <unsigned long long>length + 1024
    return 2 * <unsigned long long>length + 1024


cdef inline bint _chunk_name(const uint8_t* t) noexcept nogil:
    """Four ASCII letters (what the PNG specification allows in a chunk type)."""
    cdef int i
    for i in range(4):
        if not (0x41 <= t[i] <= 0x5A or 0x61 <= t[i] <= 0x7A):
            return False
    return True


cdef int png_scan(const uint8_t* d, size_t n, PngScan* p) noexcept nogil:
    """Walk the chunks of a PNG (signature already checked); FAST_OK fills ``p``.

    Returns FAST_FALLBACK for anything the fast path does not handle (including
    what libspng refuses, above), and a negative code for a truncated file or a
    critical chunk whose CRC does not match (an ancillary chunk with a bad CRC is
    ignored, as libspng does).
    """
    cdef size_t pos = 8
    cdef size_t length
    cdef unsigned long long stored_bytes = 0
    cdef const uint8_t* t
    cdef uint32_t typ
    cdef int bd, ct, prev_idat = 0, seen_idat = 0, stored = 0, bkgd_hist = 0
    p.orientation = 1
    p.idat_total = 0
    p.idat_count = 0
    p.idat0 = NULL
    p.bad_chunk[0] = 0
    if n < 8 + 25:
        return FAST_FALLBACK                     # let libspng describe it
    if _be32(d + 8) != 13 or memcmp(d + 12, b"IHDR", 4) != 0:
        return FAST_FALLBACK
    p.width = _be32(d + 16)
    p.height = _be32(d + 20)
    bd, ct = d[24], d[25]
    if (p.width == 0 or p.height == 0 or p.width > 0x7FFFFFFF or p.height > 0x7FFFFFFF
            or bd != 8 or (ct != 0 and ct != 2 and ct != 6) or d[26] != 0 or d[27] != 0
            or d[28] != 0):
        return FAST_FALLBACK
    p.channels = 1 if ct == 0 else (3 if ct == 2 else 4)
    while True:
        if pos + 12 > n:
            return FAST_TRUNCATED
        length = _be32(d + pos)
        if length > 0x7FFFFFFF:
            return FAST_FALLBACK
        if pos + 12 + length > n:
            return FAST_TRUNCATED
        t = d + pos + 4
        typ = _be32(t)
        # what libspng refuses, whatever the CRC (it parses a chunk before checking it)
        if typ == T_IEND:
            if length != 0:
                return FAST_FALLBACK
        elif typ == T_PLTE:
            if length == 0 or length % 3 != 0 or length > 768 or bkgd_hist:
                return FAST_FALLBACK
        elif (typ == T_eXIf or typ == T_tEXt or typ == T_zTXt or typ == T_iTXt
                or typ == T_sPLT or typ == T_iCCP):
            stored += 1
            stored_bytes += _stored_bound(typ, length)
            if (typ == T_eXIf and length == 0) or stored > STORED_COUNT or stored_bytes > STORED_BYTES:
                return FAST_FALLBACK
        elif typ == T_bKGD or typ == T_hIST:
            bkgd_hist = 1
        if ld.libdeflate_crc32(0, t, length + 4) != _be32(t + 4 + length):
            if t[0] & 0x20:                          # ancillary: ignored, as libspng does
                pos += 12 + length
                prev_idat = 0
                continue
            memcpy(p.bad_chunk, t, 4)
            p.bad_chunk[4] = 0
            return FAST_CRC
        if typ == T_IDAT:
            if seen_idat and not prev_idat:
                return FAST_FALLBACK             # IDATs must be consecutive
            if p.idat_count == 0:
                p.idat0 = t + 4
            p.idat_count += 1
            p.idat_total += length
            seen_idat = prev_idat = 1
        else:
            prev_idat = 0
            if typ == T_IEND:
                break
            if typ == T_tRNS:
                return FAST_FALLBACK
            if typ == T_eXIf:                         # the last one counts (as Pillow)
                p.orientation = tiff_orientation(t + 4, length)
            elif pos > 8 and (not (t[0] & 0x20) or not _chunk_name(t)):
                # critical (bit 5 of the first byte clear, as libspng reads it), or
                # not a chunk name at all: only a PLTE in colour is ours
                if typ != T_PLTE or ct == 0:
                    return FAST_FALLBACK     # unknown critical chunk, or PLTE in grey
        pos += 12 + length
    if not seen_idat:
        return FAST_FALLBACK
    if <unsigned long long>p.width * p.height > (<unsigned long long>1 << 40):
        return FAST_FALLBACK                     # beyond any max_pixels: libspng reports it
    p.raw_size = (1 + <size_t>p.width * p.channels) * p.height
    return FAST_OK


cdef int png_orientation(const uint8_t* d, size_t n) noexcept nogil:
    """EXIF orientation of a PNG (signature already checked): the last eXIf chunk with
    a valid CRC, before or after the image data (Pillow reads both); 1 when none."""
    cdef size_t pos = 8
    cdef size_t length
    cdef const uint8_t* t
    cdef int o = 1
    while pos + 12 <= n:
        length = _be32(d + pos)
        if length > 0x7FFFFFFF or pos + 12 + length > n:
            break
        t = d + pos + 4
        if memcmp(t, b"IEND", 4) == 0:
            break
        if (memcmp(t, b"eXIf", 4) == 0
                and ld.libdeflate_crc32(0, t, length + 4) == _be32(t + 4 + length)):
            o = tiff_orientation(t + 4, length)
        pos += 12 + length
    return o


cdef void png_gather(const uint8_t* d, size_t n, uint8_t* dst) noexcept nogil:
    """Concatenate the IDAT data of a PNG that png_scan accepted."""
    cdef size_t pos = 8
    cdef size_t length
    while pos + 12 <= n:
        length = _be32(d + pos)
        if memcmp(d + pos + 4, b"IDAT", 4) == 0:
            memcpy(dst, d + pos + 8, length)
            dst += length
        elif memcmp(d + pos + 4, b"IEND", 4) == 0:
            return
        pos += 12 + length


include "_unfilter.pxi"


cdef int png_unfilter(uint8_t* buf, uint32_t w, uint32_t h, int bpp) noexcept nogil:
    """Undo the per-row filters in place; row y's pixels start at buf[y*stride + 1]
    (``_unfilter.pxi``: SSE2 for 3 and 4 bytes per pixel)."""
    return FAST_OK if datago_png_unfilter(buf, w, h, bpp) == 0 else FAST_FILTER


# whether png_unfilter has its SSE2 loops in this build (else: the scalar ones)
UNFILTER_SIMD = bool(DATAGO_UNFILTER_SIMD)


def _unfilter(buf, uint32_t w, uint32_t h, int bpp, bint simd=True):
    """For the tests: ``png_unfilter`` (or, ``simd=False``, its scalar loops) on a
    writable buffer of h rows of 1 + w*bpp bytes, in place; True, or False for a
    filter type above 4.  ``UNFILTER_SIMD`` says whether this build has SIMD loops."""
    cdef uint8_t[::1] v = buf
    cdef int rc
    if w == 0 or h == 0 or bpp < 1 or <size_t>v.shape[0] < (1 + <size_t>w * bpp) * h:
        raise ValueError("buffer too small for the image")
    with nogil:
        rc = datago_png_unfilter(&v[0], w, h, bpp) if simd else datago_png_unfilter_scalar(&v[0], w, h, bpp)
    return rc == 0


cdef str png_fast_message(int code, PngScan* p):
    if code == FAST_TRUNCATED:
        return "PNG: truncated file (a chunk extends past the end of the data)"
    if code == FAST_CRC:
        return f"PNG: CRC mismatch in chunk {(<bytes>p.bad_chunk).decode('latin-1')!r} (corrupt file)"
    if code == FAST_INFLATE:
        return "PNG: decoding failed: corrupt compressed image data (zlib stream or Adler-32 checksum)"
    if code == FAST_SHORT:
        return "PNG: decoding failed: the image data ends before the last row (truncated file?)"
    if code == FAST_FILTER:
        return "PNG: decoding failed: invalid filter type in the image data"
    if code == FAST_NOMEM:
        return "PNG: out of memory"
    return f"PNG: decoding failed (code {code})"


cdef class Inflater:

    def __cinit__(self):
        self.d = ld.libdeflate_alloc_decompressor()
        if self.d == NULL:
            raise MemoryError("libdeflate_alloc_decompressor failed")

    def __dealloc__(self):
        if self.d != NULL:
            ld.libdeflate_free_decompressor(self.d)
            self.d = NULL

    cdef int inflate(self, const uint8_t* src, size_t n, uint8_t* dst, size_t size) noexcept nogil:
        """Exactly ``size`` bytes of zlib data: FAST_OK, FAST_SHORT, FAST_INFLATE, or
        FAST_FALLBACK when there is more data than that (libspng decides)."""
        cdef ld.libdeflate_result r = ld.libdeflate_zlib_decompress(self.d, src, n, dst, size, NULL)
        if r == ld.LIBDEFLATE_SUCCESS:
            return FAST_OK
        if r == ld.LIBDEFLATE_SHORT_OUTPUT:
            return FAST_SHORT
        if r == ld.LIBDEFLATE_INSUFFICIENT_SPACE:
            return FAST_FALLBACK
        return FAST_INFLATE


def version():
    """Version of the libspng in use."""
    return (<bytes>spng.spng_version_string()).decode()
