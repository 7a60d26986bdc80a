# cython: language_level=3
"""Per-pixel conversions shared by the codecs (inline, nogil, in-place where possible).

Conventions: alpha is composited over a background when it is dropped; 16-bit
samples become 8-bit by rounding (v * 255 + 32767) // 65535, i.e. round(v / 257);
grey is Pillow's ITU-R 601-2 luma L = (19595 R + 38470 G + 7471 B + 32768) >> 16;
CMYK JPEGs are taken as Adobe-inverted (as Pillow and Photoshop write them).
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.string cimport memmove


cdef inline uint8_t u16_to_u8(uint32_t v) noexcept nogil:
    return <uint8_t>((v * 255 + 32767) // 65535)


cdef inline uint8_t blend(uint32_t c, uint32_t a, uint32_t bg) noexcept nogil:
    """round((c * a + bg * (255 - a)) / 255)"""
    return <uint8_t>((c * a + bg * (255 - a) + 127) // 255)


cdef inline uint8_t luma(uint32_t r, uint32_t g, uint32_t b) noexcept nogil:
    return <uint8_t>((19595 * r + 38470 * g + 7471 * b + 32768) >> 16)


cdef inline uint8_t mul255(uint32_t a, uint32_t b) noexcept nogil:
    """Pillow's MULDIV255: a * b / 255 rounded."""
    cdef uint32_t t = a * b + 128
    return <uint8_t>(((t >> 8) + t) >> 8)


cdef inline void rgba16_to_rgba8(const uint16_t* s, uint8_t* d, size_t npix) noexcept nogil:
    cdef size_t i
    for i in range(npix * 4):
        d[i] = u16_to_u8(s[i])


cdef extern from *:
    """
    /* RGBA8 composited over an RGB background, 4 pixels at a time in SSE2 (the
       x86-64 baseline): round((c * a + bg * (255 - a)) / 255) per channel, the
       same bits as blend() in _pixels.pxd.  The sum t = c * a + bg * (255 - a) + 127
       is at most 65152, so it fits an unsigned 16-bit lane, and t / 255 (floor) is
       (t * 0x8081) >> 23 for every 16-bit t: pmulhuw then a shift by 7.
       dC -4 writes RGBX (X = 255), dC 3 writes RGB; d may equal s (each group of
       4 pixels is read before any of its bytes is written, and the writes never
       reach the next group).  Returns how many pixels it did (a multiple of 4); the
       caller does the rest.  Without SSE2: 0. */
    #include <stdint.h>
    #include <string.h>
    #if defined(__SSE2__)
    #include <emmintrin.h>
    static size_t datago_rgba_over(const uint8_t* s, uint8_t* d, size_t npix, int dC,
                                   const uint8_t* bg) {
        const __m128i z = _mm_setzero_si128();
        const __m128i r127 = _mm_set1_epi16(127), x255 = _mm_set1_epi16(255);
        const __m128i m = _mm_set1_epi16((short)0x8081);
        const __m128i opaque = _mm_set1_epi32((int)0xFF000000u);
        const __m128i bgv = _mm_setr_epi16(bg[0], bg[1], bg[2], 0, bg[0], bg[1], bg[2], 0);
        size_t i;
        for (i = 0; i + 4 <= npix; i += 4) {
            __m128i v = _mm_loadu_si128((const __m128i*)(s + 4 * i));
            __m128i lo = _mm_unpacklo_epi8(v, z), hi = _mm_unpackhi_epi8(v, z);
            __m128i alo = _mm_shufflehi_epi16(_mm_shufflelo_epi16(lo, 0xFF), 0xFF);
            __m128i ahi = _mm_shufflehi_epi16(_mm_shufflelo_epi16(hi, 0xFF), 0xFF);
            lo = _mm_add_epi16(_mm_add_epi16(_mm_mullo_epi16(lo, alo), r127),
                               _mm_mullo_epi16(bgv, _mm_sub_epi16(x255, alo)));
            hi = _mm_add_epi16(_mm_add_epi16(_mm_mullo_epi16(hi, ahi), r127),
                               _mm_mullo_epi16(bgv, _mm_sub_epi16(x255, ahi)));
            lo = _mm_srli_epi16(_mm_mulhi_epu16(lo, m), 7);
            hi = _mm_srli_epi16(_mm_mulhi_epu16(hi, m), 7);
            v = _mm_or_si128(_mm_packus_epi16(lo, hi), opaque);
            if (dC == -4) {
                _mm_storeu_si128((__m128i*)(d + 4 * i), v);
            } else {
                uint32_t px[4];
                _mm_storeu_si128((__m128i*)px, v);
                memcpy(d + 3 * i, &px[0], 3);
                memcpy(d + 3 * i + 3, &px[1], 3);
                memcpy(d + 3 * i + 6, &px[2], 3);
                memcpy(d + 3 * i + 9, &px[3], 3);
            }
        }
        return i;
    }
    #else
    static size_t datago_rgba_over(const uint8_t* s, uint8_t* d, size_t npix, int dC,
                                   const uint8_t* bg) {
        (void)s; (void)d; (void)npix; (void)dC; (void)bg;
        return 0;
    }
    #endif
    """
    size_t datago_rgba_over(const uint8_t* s, uint8_t* d, size_t npix, int dC,
                            const uint8_t* bg) noexcept nogil


cdef inline void rgba8_convert(const uint8_t* s, uint8_t* d, size_t npix, int dC,
                               const uint8_t* bg) noexcept nogil:
    """RGBA8 -> RGBA8 (copy), RGB8/RGBX8 (composite over bg) or L8 (composite, luma).

    ``dC`` is 1 (L), 3 (RGB), 4 (RGBA) or -4 (RGB composite, 4th byte set to 255).
    ``d`` may equal ``s`` (the write never overtakes the read).  RGB and RGBX go
    4 pixels at a time through ``datago_rgba_over`` (SSE2) where the build has it.
    """
    cdef size_t i = 0
    cdef uint32_t a
    cdef uint8_t r, g, b
    if dC == 4:
        if d != s:
            memmove(d, s, 4 * npix)
        return
    if dC == 3 or dC == -4:
        i = datago_rgba_over(s, d, npix, dC, bg)
    while i < npix:
        a = s[4 * i + 3]
        r = blend(s[4 * i + 0], a, bg[0])
        g = blend(s[4 * i + 1], a, bg[1])
        b = blend(s[4 * i + 2], a, bg[2])
        if dC == 1:
            d[i] = luma(r, g, b)
        elif dC == 3:
            d[3 * i + 0] = r; d[3 * i + 1] = g; d[3 * i + 2] = b
        else:
            d[4 * i + 0] = r; d[4 * i + 1] = g; d[4 * i + 2] = b; d[4 * i + 3] = 255
        i += 1


cdef inline void cmyk_convert(const uint8_t* s, uint8_t* d, size_t npix, int dC) noexcept nogil:
    """Adobe-inverted CMYK -> RGB (dC 3), RGBA/RGBX (dC 4, alpha 255) or L (dC 1), like Pillow."""
    cdef size_t i
    cdef uint32_t nk
    cdef uint8_t r, g, b
    for i in range(npix):
        nk = s[4 * i + 3]                     # 255 - K, with K stored inverted
        r = <uint8_t>(nk - mul255(255 - s[4 * i + 0], nk))
        g = <uint8_t>(nk - mul255(255 - s[4 * i + 1], nk))
        b = <uint8_t>(nk - mul255(255 - s[4 * i + 2], nk))
        if dC == 1:
            d[i] = luma(r, g, b)
        elif dC == 3:
            d[3 * i + 0] = r; d[3 * i + 1] = g; d[3 * i + 2] = b
        else:
            d[4 * i + 0] = r; d[4 * i + 1] = g; d[4 * i + 2] = b; d[4 * i + 3] = 255
