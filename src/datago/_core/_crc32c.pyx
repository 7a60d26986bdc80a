# cython: language_level=3, boundscheck=False, wraparound=False
"""CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord checks it.

    crc32c(b"123456789") == 0xE3069283
    masked_crc32c(data) == (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

Two kernels, chosen once at import: the SSE4.2 ``crc32`` instruction (8 bytes per
instruction; x86-64 with GCC or Clang, when ``__builtin_cpu_supports("sse4.2")``
says the CPU has it; the function is compiled for SSE4.2 by a ``target``
attribute, so the module itself needs no ``-msse4.2``), else slicing-by-8 tables
(portable C, byte order independent).  ``DATAGO_CRC32C=table`` in the
environment forces the tables (tests compare the two).  Both run without the GIL.
"""

import os

from libc.stdint cimport uint32_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <stddef.h>
    #include <string.h>

    static uint32_t datago_crc32c_t[8][256];

    static void datago_crc32c_tables(void) {
        for (uint32_t n = 0; n < 256; n++) {
            uint32_t c = n;
            for (int k = 0; k < 8; k++)
                c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : (c >> 1);
            datago_crc32c_t[0][n] = c;
        }
        for (uint32_t n = 0; n < 256; n++) {
            uint32_t c = datago_crc32c_t[0][n];
            for (int k = 1; k < 8; k++) {
                c = datago_crc32c_t[0][c & 0xff] ^ (c >> 8);
                datago_crc32c_t[k][n] = c;
            }
        }
    }

    /* crc: the running CRC (0 to start); the pre/post inversion is done here */
    static uint32_t datago_crc32c_sw(uint32_t crc, const unsigned char *p, size_t n) {
        uint32_t c = ~crc;
        while (n && ((uintptr_t)p & 7)) {
            c = datago_crc32c_t[0][(c ^ *p++) & 0xff] ^ (c >> 8);
            n--;
        }
        while (n >= 8) {
            uint32_t lo = ((uint32_t)p[0] | ((uint32_t)p[1] << 8) |
                           ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24)) ^ c;
            uint32_t hi = (uint32_t)p[4] | ((uint32_t)p[5] << 8) |
                          ((uint32_t)p[6] << 16) | ((uint32_t)p[7] << 24);
            c = datago_crc32c_t[7][lo & 0xff] ^ datago_crc32c_t[6][(lo >> 8) & 0xff] ^
                datago_crc32c_t[5][(lo >> 16) & 0xff] ^ datago_crc32c_t[4][lo >> 24] ^
                datago_crc32c_t[3][hi & 0xff] ^ datago_crc32c_t[2][(hi >> 8) & 0xff] ^
                datago_crc32c_t[1][(hi >> 16) & 0xff] ^ datago_crc32c_t[0][hi >> 24];
            p += 8;
            n -= 8;
        }
        while (n--)
            c = datago_crc32c_t[0][(c ^ *p++) & 0xff] ^ (c >> 8);
        return ~c;
    }

    #if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
    #include <nmmintrin.h>
    #define DATAGO_CRC32C_HW 1
    __attribute__((target("sse4.2")))
    static uint32_t datago_crc32c_hw(uint32_t crc, const unsigned char *p, size_t n) {
        uint64_t c = (uint32_t)~crc;
        while (n && ((uintptr_t)p & 7)) {
            c = _mm_crc32_u8((uint32_t)c, *p++);
            n--;
        }
        while (n >= 8) {
            uint64_t w;
            memcpy(&w, p, 8);
            c = _mm_crc32_u64(c, w);
            p += 8;
            n -= 8;
        }
        while (n--)
            c = _mm_crc32_u8((uint32_t)c, *p++);
        return ~(uint32_t)c;
    }
    static int datago_crc32c_has_hw(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("sse4.2") ? 1 : 0;
    }
    #else
    #define DATAGO_CRC32C_HW 0
    static uint32_t datago_crc32c_hw(uint32_t crc, const unsigned char *p, size_t n) {
        return datago_crc32c_sw(crc, p, n);
    }
    static int datago_crc32c_has_hw(void) { return 0; }
    #endif
    """
    void datago_crc32c_tables() nogil
    uint32_t datago_crc32c_sw(uint32_t crc, const unsigned char *p, size_t n) nogil
    uint32_t datago_crc32c_hw(uint32_t crc, const unsigned char *p, size_t n) nogil
    int datago_crc32c_has_hw() nogil

datago_crc32c_tables()
cdef bint _HW = datago_crc32c_has_hw() != 0 and os.environ.get("DATAGO_CRC32C", "") != "table"
# below this many bytes the GIL is kept (releasing it costs more than the work)
cdef size_t _NOGIL_BYTES = 1 << 16

KERNEL = "sse4.2" if _HW else "table"
"""Which kernel this process uses: ``"sse4.2"`` or ``"table"``."""


cdef inline uint32_t _crc(uint32_t crc, const unsigned char[::1] view, bint hw):
    cdef size_t n = view.shape[0]
    cdef const unsigned char *p
    if n == 0:
        return crc
    p = &view[0]
    if n < _NOGIL_BYTES:
        return datago_crc32c_hw(crc, p, n) if hw else datago_crc32c_sw(crc, p, n)
    with nogil:
        crc = datago_crc32c_hw(crc, p, n) if hw else datago_crc32c_sw(crc, p, n)
    return crc


def crc32c(const unsigned char[::1] data, uint32_t crc=0):
    """CRC-32C of ``data`` (any contiguous bytes-like object); ``crc``: the value of
    the bytes before, to continue a running CRC."""
    return _crc(crc, data, _HW)


def crc32c_table(const unsigned char[::1] data, uint32_t crc=0):
    """``crc32c`` by the portable table kernel (whatever the CPU has)."""
    return _crc(crc, data, False)


def masked_crc32c(const unsigned char[::1] data):
    """TFRecord's masked CRC-32C of ``data``: the CRC rotated right by 15 bits plus
    0xA282EAD8 (mod 2**32)."""
    cdef uint32_t c = _crc(0, data, _HW)
    cdef uint32_t rotated = (c >> 15) | (c << 17)
    cdef uint32_t masked = rotated + <uint32_t>0xA282EAD8u     # wraps mod 2**32
    return masked
