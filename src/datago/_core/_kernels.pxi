# Resampling kernels, included by _resample.pyx (baseline ISA) and by
# _resample_avx2.pyx (compiled with -mavx2 -mfma).  _resample picks one table at
# import from the CPU's features (DATAGO_SIMD=generic forces the baseline).
#
# Safety: noexcept nogil, raw pointers whose extents the caller checked; no
# Python objects, no allocation.  Needs: int16_t, int32_t, uint8_t, memcpy and the
# _kernels.pxd declarations cimported by the including module.

cdef extern from *:
    """
    /* Pass 2 of the int16 strip for 3-channel output with contiguous channels, in
       AVX2 intrinsics: the 48 lanes of a column (16 rows x 3 channels) stay in
       three registers through the taps, the rounding and the packing.  Same
       arithmetic, bit for bit, as _hcol + the generic store: each tap is pmulhw
       (a * w >> 16), wrap-around int16 sums, then (acc + half) >> shift and an
       unsigned saturating pack.  Columns x0, x0 + xstep, ... (cnt of them).
       The stores depend on the output strides (EXIF orientation):
       - d_row = +-3 (transposed: the 16 rows are adjacent pixels): 48 contiguous
         bytes, in reverse pixel order when d_row = -3;
       - otherwise d_px = +-3: each row's 3 bytes go out in one 4-byte store whose
         4th byte belongs to the neighbouring column, which the caller makes the
         next one written (xstep = sign of d_px) and never stores past the row.
       Without AVX2 (the baseline build) DATAGO_HPASS is 0 and this is never
       called. */
    #if defined(__AVX2__)
    #include <immintrin.h>
    #define DATAGO_HPASS 1
    #define DATAGO_M(...) _mm_setr_epi8(__VA_ARGS__)
    static void datago_hpass_rgb16(const int16_t* T, int span0, const int* lo, const int* nz,
                                   const int16_t* w, int ntx, int shift,
                                   int x0, int xstep, int cnt,
                                   uint8_t* d0, Py_ssize_t d_row, Py_ssize_t d_px) {
        const __m128i m = DATAGO_M(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
        const __m128i sh = _mm_cvtsi32_si128(shift);
        const __m256i half = _mm256_set1_epi16((short)(1 << (shift - 1)));
        /* reversed store: byte j of the 48 = byte 3 * (15 - j / 3) + j % 3 of the
           column; R<k><i> picks the part of output chunk k held in input chunk i */
        const __m128i R01 = DATAGO_M(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 14);
        const __m128i R02 = DATAGO_M(13, 14, 15, 10, 11, 12, 7, 8, 9, 4, 5, 6, 1, 2, 3, -1);
        const __m128i R10 = DATAGO_M(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 15, -1);
        const __m128i R11 = DATAGO_M(15, -1, 11, 12, 13, 8, 9, 10, 5, 6, 7, 2, 3, 4, -1, 0);
        const __m128i R12 = DATAGO_M(-1, 0, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
        const __m128i R20 = DATAGO_M(-1, 12, 13, 14, 9, 10, 11, 6, 7, 8, 3, 4, 5, 0, 1, 2);
        const __m128i R21 = DATAGO_M(1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
        int i, k, x;
        for (i = 0, x = x0; i < cnt; i++, x += xstep) {
            const int16_t* t = T + (Py_ssize_t)(lo[x] - span0) * 48;
            const int16_t* wx = w + (Py_ssize_t)x * ntx;
            __m256i a0 = _mm256_set1_epi16((short)(nz[x] / 2));
            __m256i a1 = a0, a2 = a0, p01;
            __m128i b0, b1, b2, g;
            uint8_t* d = d0 + x * d_px;
            int v;
    #define DATAGO_TAP(K) {                                                                      \
                const __m256i wk = _mm256_set1_epi16(wx[K]);                                         \
                const int16_t* tk = t + (K) * 48;                                                    \
                a0 = _mm256_add_epi16(a0, _mm256_mulhi_epi16(_mm256_loadu_si256((const __m256i*)tk), wk)); \
                a1 = _mm256_add_epi16(a1, _mm256_mulhi_epi16(_mm256_loadu_si256((const __m256i*)(tk + 16)), wk)); \
                a2 = _mm256_add_epi16(a2, _mm256_mulhi_epi16(_mm256_loadu_si256((const __m256i*)(tk + 32)), wk)); }
            if (ntx == 2) {             /* upscaling with the triangle filter */
                DATAGO_TAP(0) DATAGO_TAP(1)
            } else if (ntx == 3) {      /* mild downscaling with the triangle filter */
                DATAGO_TAP(0) DATAGO_TAP(1) DATAGO_TAP(2)
            } else {
                for (k = 0; k < ntx; k++)
                    DATAGO_TAP(k)
            }
    #undef DATAGO_TAP
            a0 = _mm256_sra_epi16(_mm256_add_epi16(a0, half), sh);
            a1 = _mm256_sra_epi16(_mm256_add_epi16(a1, half), sh);
            a2 = _mm256_sra_epi16(_mm256_add_epi16(a2, half), sh);
            p01 = _mm256_permute4x64_epi64(_mm256_packus_epi16(a0, a1), 0xD8);
            b0 = _mm256_castsi256_si128(p01);
            b1 = _mm256_extracti128_si256(p01, 1);
            b2 = _mm_packus_epi16(_mm256_castsi256_si128(a2), _mm256_extracti128_si256(a2, 1));
            if (d_row == 3) {
                _mm_storeu_si128((__m128i*)d, b0);
                _mm_storeu_si128((__m128i*)(d + 16), b1);
                _mm_storeu_si128((__m128i*)(d + 32), b2);
                continue;
            }
            if (d_row == -3) {
                d -= 45;
                _mm_storeu_si128((__m128i*)d, _mm_or_si128(_mm_shuffle_epi8(b1, R01), _mm_shuffle_epi8(b2, R02)));
                _mm_storeu_si128((__m128i*)(d + 16), _mm_or_si128(_mm_or_si128(
                    _mm_shuffle_epi8(b0, R10), _mm_shuffle_epi8(b1, R11)), _mm_shuffle_epi8(b2, R12)));
                _mm_storeu_si128((__m128i*)(d + 32), _mm_or_si128(_mm_shuffle_epi8(b0, R20), _mm_shuffle_epi8(b1, R21)));
                continue;
            }
    #define DATAGO_STORE4(G, R0)                                              \
            v = _mm_cvtsi128_si32(G);      memcpy(d + (R0) * d_row, &v, 4);       \
            v = _mm_extract_epi32(G, 1);   memcpy(d + ((R0) + 1) * d_row, &v, 4); \
            v = _mm_extract_epi32(G, 2);   memcpy(d + ((R0) + 2) * d_row, &v, 4); \
            v = _mm_extract_epi32(G, 3);   memcpy(d + ((R0) + 3) * d_row, &v, 4);
            g = _mm_shuffle_epi8(b0, m);                          DATAGO_STORE4(g, 0)
            g = _mm_shuffle_epi8(_mm_alignr_epi8(b1, b0, 12), m); DATAGO_STORE4(g, 4)
            g = _mm_shuffle_epi8(_mm_alignr_epi8(b2, b1, 8), m);  DATAGO_STORE4(g, 8)
            g = _mm_shuffle_epi8(_mm_srli_si128(b2, 4), m);       DATAGO_STORE4(g, 12)
    #undef DATAGO_STORE4
        }
    }
    #undef DATAGO_M
    #else
    #define DATAGO_HPASS 0
    static void datago_hpass_rgb16(const int16_t* T, int span0, const int* lo, const int* nz,
                                   const int16_t* w, int ntx, int shift,
                                   int x0, int xstep, int cnt,
                                   uint8_t* d0, Py_ssize_t d_row, Py_ssize_t d_px) {
        (void)T; (void)span0; (void)lo; (void)nz; (void)w; (void)ntx; (void)shift;
        (void)x0; (void)xstep; (void)cnt; (void)d0; (void)d_row; (void)d_px;
    }
    #endif
    """
    bint DATAGO_HPASS
    void datago_hpass_rgb16(const int16_t* T, int span0, const int* lo, const int* nz,
                            const int16_t* w, int ntx, int shift,
                            int x0, int xstep, int cnt,
                            uint8_t* d0, Py_ssize_t d_row, Py_ssize_t d_px) noexcept nogil


# --- kernels, generic over the accumulator type ------------------------------------
# int16_t: Q7 samples, fixed-point weights, each tap (a * w) >> 16 (pmulhw).
# float:   plain samples and weights; used when there are too many taps for int16.

ctypedef fused acc_t:
    int16_t
    float


cdef inline acc_t _mul(acc_t a, acc_t w) noexcept nogil:
    if acc_t is float:
        return a * w
    else:
        return <int16_t>((<int32_t>a * <int32_t>w) >> 16)


cdef inline void _load_row(acc_t* d, const uint8_t* s, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        if acc_t is float:
            d[j] = s[j]
        else:
            d[j] = <int16_t>(<int16_t>s[j] << 7)


cdef inline void _vtaps(acc_t* acc, const acc_t** rows, const acc_t* w, int nt,
                        Py_ssize_t n, acc_t bias) noexcept nogil:
    """acc[0:n] = bias + sum_k rows[k][j] * w[k] -- three taps per sweep over acc."""
    cdef Py_ssize_t j
    cdef int k
    cdef acc_t a, b, c
    cdef const acc_t* p
    cdef const acc_t* q
    cdef const acc_t* u
    if nt >= 3:
        a = w[0]; b = w[1]; c = w[2]
        p = rows[0]; q = rows[1]; u = rows[2]
        for j in range(n):
            acc[j] = <acc_t>(bias + _mul(p[j], a) + _mul(q[j], b) + _mul(u[j], c))
        k = 3
    elif nt == 2:
        a = w[0]; b = w[1]
        p = rows[0]; q = rows[1]
        for j in range(n):
            acc[j] = <acc_t>(bias + _mul(p[j], a) + _mul(q[j], b))
        k = 2
    else:
        a = w[0]
        p = rows[0]
        for j in range(n):
            acc[j] = <acc_t>(bias + _mul(p[j], a))
        k = 1
    while k + 2 < nt:
        a = w[k]; b = w[k + 1]; c = w[k + 2]
        p = rows[k]; q = rows[k + 1]; u = rows[k + 2]
        for j in range(n):
            acc[j] = <acc_t>(acc[j] + _mul(p[j], a) + _mul(q[j], b) + _mul(u[j], c))
        k += 3
    while k < nt:
        a = w[k]
        p = rows[k]
        for j in range(n):
            acc[j] = <acc_t>(acc[j] + _mul(p[j], a))
        k += 1


cdef inline void _hcol(const acc_t* t0, const acc_t* w, int nt, acc_t bias, int shift,
                       uint8_t* u) noexcept nogil:
    """u[0:LANES] = clamp(round(bias + sum_k t0[k*LANES + j] * w[k])).

    The accumulator is a local array (it cannot alias anything), and every loop has
    the fixed trip count LANES (48): the compiler emits straight vector code, no alias checks.
    ``shift`` is the number of fraction bits of the int16 result (5 or 3).
    """
    cdef acc_t acc[LANES]
    cdef int j, k
    cdef acc_t a = w[0]
    cdef const acc_t* p
    cdef int16_t v
    cdef float f
    for j in range(LANES):
        acc[j] = <acc_t>(bias + _mul(t0[j], a))
    for k in range(1, nt):
        a = w[k]
        p = t0 + k * LANES
        for j in range(LANES):
            acc[j] = <acc_t>(acc[j] + _mul(p[j], a))
    if acc_t is float:
        for j in range(LANES):
            f = acc[j] + <float>0.5
            f = 0.0 if f < 0.0 else f
            f = 255.0 if f > 255.0 else f
            u[j] = <uint8_t><int>f
    elif shift == 5:    # constant shifts keep the loop a plain psraw/packuswb sequence
        for j in range(LANES):
            v = <int16_t>(<int16_t>(acc[j] + 16) >> 5)
            v = 0 if v < 0 else v
            v = 255 if v > 255 else v
            u[j] = <uint8_t>v
    else:
        for j in range(LANES):
            v = <int16_t>(<int16_t>(acc[j] + 4) >> 3)
            v = 0 if v < 0 else v
            v = 255 if v > 255 else v
            u[j] = <uint8_t>v


cdef inline int _strip_channels(int C, int dC) noexcept nogil:
    """Channels kept in the transposed strip: 1 (grey), 4 (RGBA kept) or 3."""
    return 1 if C == 1 else (4 if C == 4 and dC == 4 else 3)


cdef inline int _strip_rows(int CT) noexcept nogil:
    return R_GREY if CT == 1 else (R_RGBA if CT == 4 else R_COLOR)


cdef size_t _work_bytes(const AxisPlan* px, const AxisPlan* py, int C, size_t item) noexcept nogil:
    cdef size_t cw = px.span1 - px.span0
    cdef size_t n = cw * C
    cdef int R = R_GREY     # the largest strip
    return ((<size_t>(py.ntaps + 1) + R) * n + cw * LANES + 8) * item + 64


cdef void _strips(acc_t* work, const AxisPlan* px, const AxisPlan* py, int filt,
                  const uint8_t* src, Py_ssize_t s_row, int C,
                  uint8_t* dst, Py_ssize_t d_row, Py_ssize_t d_px, Py_ssize_t d_ch,
                  int dC) noexcept nogil:
    """The strip algorithm of the module docstring (``work`` from _work_bytes)."""
    cdef int cw = px.span1 - px.span0
    cdef int ow = px.out_size
    cdef int oh = py.out_size
    cdef int nty = py.ntaps
    cdef int ntx = px.ntaps
    cdef int CT = _strip_channels(C, dC)       # channels in the transposed strip
    cdef int R = _strip_rows(CT)
    cdef Py_ssize_t n = <Py_ssize_t>cw * C       # samples per row of the needed columns
    cdef int ring = nty + 1
    cdef acc_t* ring_buf = work
    cdef acc_t* rows = ring_buf + <size_t>ring * n
    cdef acc_t* T = rows + <size_t>R * n
    cdef uint8_t u[LANES + 4]
    cdef const acc_t* rp[MAX_TAPS]
    cdef const acc_t* wy
    cdef const acc_t* wx
    cdef int y0, rr, y, lo, k, nxt, x, xs, xe, c, sc, r
    cdef acc_t* tp
    cdef const acc_t* rowp
    cdef uint8_t* d0
    cdef uint8_t* dp
    cdef acc_t vbias, hbias
    # Q7 source x Q(b) weights >> 16, twice: the result has 2b - 25 fraction bits
    cdef int shift = 2 * wbits(filt) - 25
    cdef bint rgb3 = dC == 3 and d_ch == 1 and CT == 3     # 3 contiguous bytes per pixel
    cdef bint packed3 = rgb3 and d_px == 3
    cdef bint grey3 = dC == 3 and d_ch == 1 and CT == 1 and d_px == 3
    cdef uint8_t q[4]
    nxt = py.lo[0]
    y0 = 0
    while y0 < oh:
        # pass 1: R output rows (rows past the end repeat the last one)
        for rr in range(R):
            y = y0 + rr if y0 + rr < oh else oh - 1
            lo = py.lo[y]
            if nxt < lo:
                nxt = lo
            while nxt < lo + nty:
                _load_row(ring_buf + <size_t>(nxt % ring) * n,
                          src + nxt * s_row + <Py_ssize_t>px.span0 * C, n)
                nxt += 1
            for k in range(nty):
                rp[k] = ring_buf + <size_t>((lo + k) % ring) * n
            if acc_t is float:
                wy = py.wf + <size_t>y * nty
                vbias = 0
            else:
                wy = py.w + <size_t>y * nty
                vbias = <int16_t>(py.nz[y] // 2)   # each tap truncates by 1/2 unit on average
            _vtaps(rows + <size_t>rr * n, rp, wy, nty, n, vbias)
        # transpose the strip: T[x][rr][c], 3 colour channels (an RGBX source's X is
        # dropped: the 4-element moves overlap, each one's 4th element is overwritten
        # by the next; T has padding for the very last one)
        if CT == 4:
            for x in range(cw):
                tp = T + <size_t>x * LANES
                rowp = rows + <size_t>x * 4
                for rr in range(R_RGBA):
                    memcpy(tp + rr * 4, rowp + rr * n, 4 * sizeof(acc_t))
        elif C == 4:    # constant trip counts: fully unrolled moves
            for x in range(cw):
                tp = T + <size_t>x * LANES
                rowp = rows + <size_t>x * 4
                for rr in range(R_COLOR):
                    memcpy(tp + rr * 3, rowp + rr * n, 4 * sizeof(acc_t))
        elif C == 3:    # the same overlapping 4-element moves (the 4th is the next pixel's)
            for x in range(cw):
                tp = T + <size_t>x * LANES
                rowp = rows + <size_t>x * 3
                for rr in range(R_COLOR):
                    memcpy(tp + rr * 3, rowp + rr * n, 4 * sizeof(acc_t))
        else:
            for x in range(cw):
                tp = T + <size_t>x * LANES
                for rr in range(R):
                    tp[rr] = rows[rr * n + x]
        # pass 2: one output column at a time over 48 lanes, then round and store
        r = oh - y0 if oh - y0 < R else R
        d0 = dst + y0 * d_row
        xs, xe = 0, ow
        if acc_t is int16_t:
            if DATAGO_HPASS and rgb3 and r == R_COLOR:
                if d_row == 3 or d_row == -3:       # transposed: no column left over
                    datago_hpass_rgb16(T, px.span0, px.lo, px.nz, px.w, ntx, shift,
                                       0, 1, ow, d0, d_row, d_px)
                    xs = ow
                elif d_px == 3:                     # left to right, the last column below
                    datago_hpass_rgb16(T, px.span0, px.lo, px.nz, px.w, ntx, shift,
                                       0, 1, ow - 1, d0, d_row, d_px)
                    xs = ow - 1
                elif d_px == -3:                    # mirrored: right to left, column 0 below
                    datago_hpass_rgb16(T, px.span0, px.lo, px.nz, px.w, ntx, shift,
                                       ow - 1, -1, ow - 1, d0, d_row, d_px)
                    xe = 1
        for x in range(xs, xe):
            if acc_t is float:
                wx = px.wf + <size_t>x * ntx
                hbias = 0
            else:
                wx = px.w + <size_t>x * ntx
                hbias = <int16_t>(px.nz[x] // 2)
            _hcol(T + <size_t>(px.lo[x] - px.span0) * LANES, wx, ntx, hbias, shift, u)
            dp = d0 + x * d_px
            if packed3 and x < ow - 1:       # byte 4 of each row is rewritten by x + 1
                for rr in range(r):
                    memcpy(dp + rr * d_row, u + rr * 3, 4)
            elif rgb3:
                for rr in range(r):
                    memcpy(dp + rr * d_row, u + rr * 3, 3)
            elif grey3 and x < ow - 1:      # grey to packed RGB: one 4-byte store per pixel
                for rr in range(r):
                    q[0] = u[rr]; q[1] = u[rr]; q[2] = u[rr]
                    memcpy(dp + rr * d_row, q, 4)   # byte 4 is rewritten by x + 1
            else:
                for rr in range(r):
                    for c in range(dC):
                        sc = c if c < CT else CT - 1
                        dp[rr * d_row + c * d_ch] = u[rr * CT + sc]
        y0 += R


cdef void strips_i16(void* work, const AxisPlan* px, const AxisPlan* py, int filt,
                     const uint8_t* src, Py_ssize_t s_row, int C, uint8_t* dst,
                     Py_ssize_t d_row, Py_ssize_t d_px, Py_ssize_t d_ch, int dC) noexcept nogil:
    _strips(<int16_t*>work, px, py, filt, src, s_row, C, dst, d_row, d_px, d_ch, dC)


cdef void strips_f32(void* work, const AxisPlan* px, const AxisPlan* py, int filt,
                     const uint8_t* src, Py_ssize_t s_row, int C, uint8_t* dst,
                     Py_ssize_t d_row, Py_ssize_t d_px, Py_ssize_t d_ch, int dC) noexcept nogil:
    _strips(<float*>work, px, py, filt, src, s_row, C, dst, d_row, d_px, d_ch, dC)


cdef KernelTable KERNELS
KERNELS.strips_i16 = strips_i16
KERNELS.strips_f32 = strips_f32
