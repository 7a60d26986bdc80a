# PNG unfiltering for the fast path, included by _png.pyx.
#
# datago_png_unfilter(buf, w, h, bpp): undo the per-row filters of a whole image,
# in place.  Layout: row y is one filter byte, then w * bpp filtered bytes, at
# buf + y * (1 + w * bpp); the buffer may end with the last row's last byte.
# Returns 0, or -1 at the first row whose filter type is above 4 (the rows before
# it are unfiltered by then).
#
# SSE2 (the x86-64 baseline, so no runtime dispatch) for 3 and 4 bytes per pixel:
# Sub, Average and Paeth carry a dependency from one pixel to the next, so each
# step unfilters one pixel, its bytes in the lanes of one register (Paeth in 16-bit
# lanes, Sub and Average in 8-bit lanes); two Paeth rows in a row are done together,
# one in each half of the registers (about 1.5x faster than one at a time here; 2/3
# of the rows of the benchmark corpus's PNGs are Paeth).  Up adds 16 bytes at a
# time, any bpp.  3-byte pixels are read 4 bytes at a time except the last of a row
# (its 4th byte would be the next row's filter byte, or past the buffer) and
# written 3 bytes at a time.  Everything else, and every filter without SSE2 (or with
# DATAGO_UNFILTER_SCALAR defined), takes the scalar loops, which are also what
# datago_png_unfilter_scalar runs for the tests.  Both give the same bytes.
#
# Safety: noexcept nogil; the caller guarantees h rows of 1 + w * bpp bytes.

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #if defined(__SSE2__) && !defined(DATAGO_UNFILTER_SCALAR)
    #include <emmintrin.h>
    #define DATAGO_UNFILTER_SIMD 1
    #else
    #define DATAGO_UNFILTER_SIMD 0
    #endif
    #if defined(__GNUC__) || defined(__clang__)
    #define DATAGO_UF_INLINE static inline __attribute__((always_inline))
    #else
    #define DATAGO_UF_INLINE static inline
    #endif

    /* ---- scalar: any bpp; prev is NULL for the first row (an all-zero row above) */

    static void datago_uf_sub(uint8_t* row, size_t n, int bpp) {
        size_t i;
        for (i = bpp; i < n; i++)
            row[i] = (uint8_t)(row[i] + row[i - bpp]);
    }

    static void datago_uf_up(uint8_t* row, const uint8_t* prev, size_t n) {
        size_t i = 0;
    #if DATAGO_UNFILTER_SIMD
        for (; i + 16 <= n; i += 16)
            _mm_storeu_si128((__m128i*)(row + i),
                             _mm_add_epi8(_mm_loadu_si128((const __m128i*)(row + i)),
                                          _mm_loadu_si128((const __m128i*)(prev + i))));
    #endif
        for (; i < n; i++)
            row[i] = (uint8_t)(row[i] + prev[i]);
    }

    static void datago_uf_avg(uint8_t* row, const uint8_t* prev, size_t n, int bpp) {
        size_t i;
        if (prev == NULL) {
            for (i = bpp; i < n; i++)
                row[i] = (uint8_t)(row[i] + (row[i - bpp] >> 1));
            return;
        }
        for (i = 0; i < (size_t)bpp && i < n; i++)
            row[i] = (uint8_t)(row[i] + (prev[i] >> 1));
        for (; i < n; i++)
            row[i] = (uint8_t)(row[i] + ((row[i - bpp] + prev[i]) >> 1));
    }

    DATAGO_UF_INLINE uint8_t datago_paeth(int a, int b, int c) {
        int pa = b - c, pb = a - c, pc = pa + pb;
        pa = pa < 0 ? -pa : pa;
        pb = pb < 0 ? -pb : pb;
        pc = pc < 0 ? -pc : pc;
        if (pa <= pb && pa <= pc)
            return (uint8_t)a;
        return (uint8_t)(pb <= pc ? b : c);
    }

    static void datago_uf_paeth(uint8_t* row, const uint8_t* prev, size_t n, int bpp) {
        size_t i;
        if (prev == NULL) {                 /* Paeth(a, 0, 0) = a: Sub */
            datago_uf_sub(row, n, bpp);
            return;
        }
        for (i = 0; i < (size_t)bpp && i < n; i++)
            row[i] = (uint8_t)(row[i] + prev[i]);
        for (; i < n; i++)
            row[i] = (uint8_t)(row[i] + datago_paeth(row[i - bpp], prev[i], prev[i - bpp]));
    }

    /* One row, scalar; 0, or -1 for a filter type above 4. */
    static int datago_uf_row_scalar(uint8_t* row, const uint8_t* prev, size_t n, int bpp, int f) {
        switch (f) {
        case 0: return 0;
        case 1: datago_uf_sub(row, n, bpp); return 0;
        case 2: if (prev != NULL) datago_uf_up(row, prev, n); return 0;
        case 3: datago_uf_avg(row, prev, n, bpp); return 0;
        case 4: datago_uf_paeth(row, prev, n, bpp); return 0;
        }
        return -1;
    }

    #if DATAGO_UNFILTER_SIMD
    /* ---- SSE2, bpp 3 or 4 (a constant once inlined); prev is never NULL here */

    DATAGO_UF_INLINE __m128i datago_uf_load(const uint8_t* p, int bytes) {
        uint32_t v = 0;
        memcpy(&v, p, bytes);
        return _mm_cvtsi32_si128((int)v);
    }

    /* a pixel's bytes, plus the next byte unless it is the last of its row */
    DATAGO_UF_INLINE __m128i datago_uf_load_px(const uint8_t* p, int last, int bpp) {
        return last ? datago_uf_load(p, bpp) : datago_uf_load(p, 4);
    }

    DATAGO_UF_INLINE void datago_uf_store(uint8_t* p, __m128i v, int bytes) {
        uint32_t u = (uint32_t)_mm_cvtsi128_si32(v);
        if (bytes == 4) {
            memcpy(p, &u, 4);
        } else {                        /* 2 + 1 bytes, from a register */
            uint16_t lo = (uint16_t)u;
            memcpy(p, &lo, 2);
            p[2] = (uint8_t)(u >> 16);
        }
    }

    /* Sub: a = x + a, byte-wise. */
    DATAGO_UF_INLINE void datago_uf_sub_px(uint8_t* r, uint32_t w, int bpp) {
        __m128i a = _mm_setzero_si128();
        for (; w > 1; w--, r += bpp) {
            a = _mm_add_epi8(a, datago_uf_load(r, 4));
            datago_uf_store(r, a, bpp);
        }
        datago_uf_store(r, _mm_add_epi8(a, datago_uf_load(r, bpp)), bpp);
    }

    /* Average: a = x + floor((a + b) / 2) = x + pavgb(a, b) - ((a ^ b) & 1), byte-wise. */
    DATAGO_UF_INLINE __m128i datago_uf_avg_step(__m128i a, __m128i b, __m128i x) {
        return _mm_sub_epi8(_mm_add_epi8(x, _mm_avg_epu8(a, b)),
                            _mm_and_si128(_mm_xor_si128(a, b), _mm_set1_epi8(1)));
    }

    DATAGO_UF_INLINE void datago_uf_avg_px(uint8_t* r, const uint8_t* p, uint32_t w, int bpp) {
        __m128i a = _mm_setzero_si128();
        for (; w > 1; w--, r += bpp, p += bpp) {
            a = datago_uf_avg_step(a, datago_uf_load(p, 4), datago_uf_load(r, 4));
            datago_uf_store(r, a, bpp);
        }
        a = datago_uf_avg_step(a, datago_uf_load(p, bpp), datago_uf_load(r, bpp));
        datago_uf_store(r, a, bpp);
    }

    /* Paeth in 16-bit lanes: x + the predictor, mod 256; the predictor is c if
       pc < min(pa, pb), else b if pb < pa, else a (the tie order: a, then b, then
       c), with pa = |b - c|, pb = |a - c| and pc = |a + b - 2c| = |a - q| for
       q = 2c - b, each |u - v| as max - min. */
    DATAGO_UF_INLINE __m128i datago_uf_paeth_step(__m128i a, __m128i b, __m128i c, __m128i x) {
        __m128i q = _mm_sub_epi16(_mm_add_epi16(c, c), b);
        __m128i pa = _mm_sub_epi16(_mm_max_epi16(b, c), _mm_min_epi16(b, c));
        __m128i pb = _mm_sub_epi16(_mm_max_epi16(a, c), _mm_min_epi16(a, c));
        __m128i pc = _mm_sub_epi16(_mm_max_epi16(a, q), _mm_min_epi16(a, q));
        __m128i gb = _mm_cmpgt_epi16(pa, pb);                       /* b (or c) over a */
        __m128i gc = _mm_cmpgt_epi16(_mm_min_epi16(pa, pb), pc);    /* c over both */
        __m128i t = _mm_or_si128(_mm_and_si128(gb, b), _mm_andnot_si128(gb, a));
        t = _mm_or_si128(_mm_and_si128(gc, c), _mm_andnot_si128(gc, t));
        return _mm_and_si128(_mm_add_epi16(t, x), _mm_set1_epi16(0xFF));
    }

    DATAGO_UF_INLINE void datago_uf_paeth_px(uint8_t* r, const uint8_t* p, uint32_t w, int bpp) {
        const __m128i z = _mm_setzero_si128();
        __m128i a = z, c = z, b;
        for (; w > 1; w--, r += bpp, p += bpp) {
            b = _mm_unpacklo_epi8(datago_uf_load(p, 4), z);
            a = datago_uf_paeth_step(a, b, c, _mm_unpacklo_epi8(datago_uf_load(r, 4), z));
            datago_uf_store(r, _mm_packus_epi16(a, a), bpp);
            c = b;
        }
        b = _mm_unpacklo_epi8(datago_uf_load(p, bpp), z);
        a = datago_uf_paeth_step(a, b, c, _mm_unpacklo_epi8(datago_uf_load(r, bpp), z));
        datago_uf_store(r, _mm_packus_epi16(a, a), bpp);
    }

    /* Paeth on two rows at once, r0 (prev above it) and r1 below r0: r0 in the
       low four 16-bit lanes, r1 in the high four, r1 one pixel behind, so that
       the pixel above r1's (its b) is the r0 pixel just made (a's low half) and
       never goes through memory.  Step k makes r0[k] and r1[k - 1]. */
    DATAGO_UF_INLINE void datago_uf_paeth2_px(uint8_t* r0, uint8_t* r1, const uint8_t* p,
                                              uint32_t w, int bpp) {
        const __m128i z = _mm_setzero_si128();
        __m128i a, b, c, x, o;
        uint32_t k;
        /* step 0: r0[0] only; r1's pixel left of its first, and above-left, are 0 */
        b = _mm_unpacklo_epi8(datago_uf_load_px(p, w == 1, bpp), z);
        a = datago_uf_paeth_step(z, b, z, _mm_unpacklo_epi8(datago_uf_load_px(r0, w == 1, bpp), z));
        a = _mm_move_epi64(a);
        datago_uf_store(r0, _mm_packus_epi16(a, a), bpp);
        c = b;
        for (k = 1; k < w; k++) {           /* r0 += bpp: r0[k]; r1 stays one behind */
            int last = k + 1 == w;
            p += bpp;
            r0 += bpp;
            b = _mm_unpacklo_epi64(_mm_unpacklo_epi8(datago_uf_load_px(p, last, bpp), z), a);
            x = _mm_unpacklo_epi8(_mm_unpacklo_epi32(datago_uf_load_px(r0, last, bpp),
                                                     datago_uf_load(r1, 4)), z);
            a = datago_uf_paeth_step(a, b, c, x);
            o = _mm_packus_epi16(a, a);
            datago_uf_store(r0, o, bpp);
            datago_uf_store(r1, _mm_srli_si128(o, 4), bpp);
            r1 += bpp;
            c = b;
        }
        /* step w: r1[w - 1] only */
        b = _mm_unpacklo_epi64(z, a);
        x = _mm_unpacklo_epi8(_mm_unpacklo_epi32(z, datago_uf_load(r1, bpp)), z);
        a = datago_uf_paeth_step(a, b, c, x);
        datago_uf_store(r1, _mm_srli_si128(_mm_packus_epi16(a, a), 4), bpp);
    }

    static int datago_uf_row_simd(uint8_t* row, const uint8_t* prev, uint32_t w, int bpp, int f) {
        if (f == 2 || prev == NULL || (bpp != 3 && bpp != 4))
            return datago_uf_row_scalar(row, prev, (size_t)w * bpp, bpp, f);
        switch (f) {
        case 0: return 0;
        case 1: if (bpp == 3) datago_uf_sub_px(row, w, 3); else datago_uf_sub_px(row, w, 4); return 0;
        case 3: if (bpp == 3) datago_uf_avg_px(row, prev, w, 3); else datago_uf_avg_px(row, prev, w, 4); return 0;
        case 4: if (bpp == 3) datago_uf_paeth_px(row, prev, w, 3); else datago_uf_paeth_px(row, prev, w, 4); return 0;
        }
        return -1;
    }
    #endif

    static int datago_png_unfilter_impl(uint8_t* buf, uint32_t w, uint32_t h, int bpp, int simd) {
        size_t rowlen = (size_t)w * bpp, stride = rowlen + 1;
        uint8_t* prev = NULL;
        uint8_t* row;
        uint32_t y;
        int rc;
        for (y = 0; y < h; y++, prev = row) {
            row = buf + y * stride + 1;
    #if DATAGO_UNFILTER_SIMD
            if (simd && row[-1] == 4 && prev != NULL && (bpp == 3 || bpp == 4) && y + 1 < h
                    && row[rowlen] == 4) {      /* two Paeth rows: row[rowlen] is the next one's filter byte */
                if (bpp == 3)
                    datago_uf_paeth2_px(row, row + stride, prev, w, 3);
                else
                    datago_uf_paeth2_px(row, row + stride, prev, w, 4);
                y++;
                row += stride;
                continue;
            }
            if (simd)
                rc = datago_uf_row_simd(row, prev, w, bpp, row[-1]);
            else
    #endif
                rc = datago_uf_row_scalar(row, prev, rowlen, bpp, row[-1]);
            if (rc)
                return rc;
        }
        return 0;
    }

    static int datago_png_unfilter(uint8_t* buf, uint32_t w, uint32_t h, int bpp) {
        return datago_png_unfilter_impl(buf, w, h, bpp, 1);
    }

    static int datago_png_unfilter_scalar(uint8_t* buf, uint32_t w, uint32_t h, int bpp) {
        return datago_png_unfilter_impl(buf, w, h, bpp, 0);
    }
    """
    int DATAGO_UNFILTER_SIMD
    int datago_png_unfilter(uint8_t* buf, uint32_t w, uint32_t h, int bpp) noexcept nogil
    int datago_png_unfilter_scalar(uint8_t* buf, uint32_t w, uint32_t h, int bpp) noexcept nogil
