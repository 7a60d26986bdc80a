# cython: language_level=3
"""Per-pixel conversions shared by the codecs (inline, nogil, in-place where possible).

Conventions: alpha is composited over a background when it is dropped; 16-bit
samples become 8-bit by rounding (v * 255 + 32767) // 65535, i.e. round(v / 257);
grey is Pillow's ITU-R 601-2 luma L = (19595 R + 38470 G + 7471 B + 32768) >> 16;
CMYK JPEGs are taken as Adobe-inverted (as Pillow and Photoshop write them).
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t


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


cdef inline void rgba8_convert(const uint8_t* s, uint8_t* d, size_t npix, int dC,
                               const uint8_t* bg) noexcept nogil:
    """RGBA8 -> RGBA8 (copy), RGB8/RGBX8 (composite over bg) or L8 (composite, luma).

    ``dC`` is 1 (L), 3 (RGB), 4 (RGBA) or -4 (RGB composite, 4th byte set to 255).
    ``d`` may equal ``s`` (the write never overtakes the read).
    """
    cdef size_t i
    cdef uint32_t a
    cdef uint8_t r, g, b
    for i in range(npix):
        a = s[4 * i + 3]
        if dC == 4:
            d[4 * i + 0] = s[4 * i + 0]; d[4 * i + 1] = s[4 * i + 1]
            d[4 * i + 2] = s[4 * i + 2]; d[4 * i + 3] = <uint8_t>a
            continue
        r = blend(s[4 * i + 0], a, bg[0])
        g = blend(s[4 * i + 1], a, bg[1])
        b = blend(s[4 * i + 2], a, bg[2])
        if dC == 1:
            d[i] = luma(r, g, b)
        elif dC == 3:
            d[3 * i + 0] = r; d[3 * i + 1] = g; d[3 * i + 2] = b
        else:
            d[4 * i + 0] = r; d[4 * i + 1] = g; d[4 * i + 2] = b; d[4 * i + 3] = 255


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
