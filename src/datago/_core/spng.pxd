# cython: language_level=3
"""Declarations of libspng (>= 0.7)."""
from libc.stdint cimport uint8_t, uint16_t, uint32_t

cdef extern from "spng.h" nogil:
    ctypedef struct spng_ctx:
        pass

    struct spng_ihdr:
        uint32_t width
        uint32_t height
        uint8_t bit_depth
        uint8_t color_type
        uint8_t compression_method
        uint8_t filter_method
        uint8_t interlace_method

    struct spng_trns:
        uint16_t gray
        uint16_t red
        uint16_t green
        uint16_t blue
        uint32_t n_type3_entries
        uint8_t type3_alpha[256]

    struct spng_exif:
        size_t length
        char* data

    enum spng_errno:
        SPNG_OK
        SPNG_ECHUNKAVAIL

    enum spng_format:
        SPNG_FMT_RGBA8
        SPNG_FMT_RGBA16
        SPNG_FMT_RGB8
        SPNG_FMT_GA8
        SPNG_FMT_GA16
        SPNG_FMT_G8
        SPNG_FMT_PNG
        SPNG_FMT_RAW

    enum spng_decode_flags:
        SPNG_DECODE_TRNS
        SPNG_DECODE_GAMMA

    enum spng_color_type:
        SPNG_COLOR_TYPE_GRAYSCALE
        SPNG_COLOR_TYPE_TRUECOLOR
        SPNG_COLOR_TYPE_INDEXED
        SPNG_COLOR_TYPE_GRAYSCALE_ALPHA
        SPNG_COLOR_TYPE_TRUECOLOR_ALPHA

    enum spng_crc_action:
        SPNG_CRC_ERROR
        SPNG_CRC_DISCARD
        SPNG_CRC_USE

    spng_ctx* spng_ctx_new(int flags)
    void spng_ctx_free(spng_ctx* ctx)
    int spng_set_png_buffer(spng_ctx* ctx, const void* buf, size_t size)
    int spng_set_image_limits(spng_ctx* ctx, uint32_t width, uint32_t height)
    int spng_set_chunk_limits(spng_ctx* ctx, size_t chunk_size, size_t cache_size)
    int spng_set_crc_action(spng_ctx* ctx, int critical, int ancillary)
    int spng_decoded_image_size(spng_ctx* ctx, int fmt, size_t* len)
    int spng_decode_image(spng_ctx* ctx, void* out, size_t len, int fmt, int flags)
    int spng_decode_chunks(spng_ctx* ctx)
    int spng_get_ihdr(spng_ctx* ctx, spng_ihdr* ihdr)
    int spng_get_trns(spng_ctx* ctx, spng_trns* trns)
    int spng_get_exif(spng_ctx* ctx, spng_exif* exif)
    const char* spng_strerror(int err)
    const char* spng_version_string()
