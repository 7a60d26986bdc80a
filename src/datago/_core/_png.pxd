# cython: language_level=3
from libc.stdint cimport uint8_t, uint32_t
from datago._core cimport spng
from datago._core cimport libdeflate

# --- fast path: 8-bit grey / RGB / RGBA, not interlaced, no tRNS (libdeflate + our
# unfilter); everything else goes through libspng
cdef enum:
    FAST_OK = 0
    FAST_FALLBACK = 1           # not for the fast path: use libspng
    FAST_TRUNCATED = -1
    FAST_CRC = -2
    FAST_INFLATE = -3           # corrupt zlib stream (or bad Adler-32)
    FAST_SHORT = -4             # the image data ends before the last row
    FAST_FILTER = -5            # a row with a filter type above 4
    FAST_NOMEM = -6

cdef struct PngScan:
    uint32_t width
    uint32_t height
    int channels                # 1 grey, 3 RGB, 4 RGBA
    int orientation             # EXIF (the last eXIf chunk), 1..8
    size_t idat_total           # bytes of compressed image data
    int idat_count              # number of IDAT chunks
    const uint8_t* idat0        # data of the first IDAT
    size_t raw_size             # (1 + width * channels) * height
    char bad_chunk[5]           # type of the chunk that failed its CRC

cdef int png_scan(const uint8_t* d, size_t n, PngScan* p) noexcept nogil
cdef int png_orientation(const uint8_t* d, size_t n) noexcept nogil
cdef void png_gather(const uint8_t* d, size_t n, uint8_t* dst) noexcept nogil
cdef int png_unfilter(uint8_t* buf, uint32_t w, uint32_t h, int bpp) noexcept nogil
cdef str png_fast_message(int code, PngScan* p)

cdef class Inflater:
    """One libdeflate decompressor; one per thread."""
    cdef libdeflate.libdeflate_decompressor* d
    cdef int inflate(self, const uint8_t* src, size_t n, uint8_t* dst, size_t size) noexcept nogil

cdef class PngDecoder:
    """One libspng context for one image (spng contexts cannot be reused)."""
    cdef spng.spng_ctx* ctx
    cdef spng.spng_ihdr ihdr
    cdef bint has_trns
    cdef int orient
    cdef long long pre_width     # IHDR size read by us, before libspng validates it
    cdef long long pre_height

    cdef int open(self, const uint8_t* data, size_t n) noexcept nogil
    cdef int decode(self, void* out, size_t size, int fmt, int flags) noexcept nogil
    cdef bint has_alpha(self) noexcept nogil
    cdef int check(self, int rc, str what) except -1
