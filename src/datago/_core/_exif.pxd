# cython: language_level=3
"""EXIF orientation (TIFF block, JPEG APP1, PNG eXIf) and the JPEG marker walk.

Inline and nogil; every read is checked against the buffer length: malformed
metadata yields orientation 1 (identity), never an out-of-bounds read.

The orientation follows Pillow's reading of EXIF (``ImageOps.exif_transpose``),
which the tests compare against:

* the first tag 0x0112 of IFD0 decides; its first value is used whatever the
  count (0 values: no orientation); a BYTE, ASCII or UNDEFINED value is not a
  number and is never applied; rational and float values are applied when they
  are a whole number 1..8;
* every entry is bounds-checked against the block: count x type size, and when
  that exceeds the 4-byte value field, the value offset + size must lie inside
  the block.  An entry whose data lies outside ends the IFD (Pillow stops there),
  so an orientation entry at or after it is not applied; entries of an unknown
  type are skipped; a truncated IFD ends at its last complete entry.
"""
from libc.stdint cimport int8_t, int16_t, int32_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset


cdef inline uint32_t _rd16(const uint8_t* p, bint le) noexcept nogil:
    return (p[0] | (p[1] << 8)) if le else ((p[0] << 8) | p[1])


cdef inline uint32_t _rd32(const uint8_t* p, bint le) noexcept nogil:
    if le:
        return p[0] | (p[1] << 8) | (p[2] << 16) | (<uint32_t>p[3] << 24)
    return (<uint32_t>p[0] << 24) | (p[1] << 16) | (p[2] << 8) | p[3]


cdef inline uint64_t _rd64(const uint8_t* p, bint le) noexcept nogil:
    if le:
        return <uint64_t>_rd32(p, le) | (<uint64_t>_rd32(p + 4, le) << 32)
    return (<uint64_t>_rd32(p, le) << 32) | <uint64_t>_rd32(p + 4, le)


cdef inline int _tiff_unit(uint32_t typ) noexcept nogil:
    """Bytes per value of a TIFF field type (the types Pillow reads); 0: unknown."""
    if typ == 1 or typ == 2 or typ == 6 or typ == 7:        # BYTE ASCII SBYTE UNDEFINED
        return 1
    if typ == 3 or typ == 8:                                # SHORT SSHORT
        return 2
    if typ == 4 or typ == 9 or typ == 11 or typ == 13:      # LONG SLONG FLOAT IFD
        return 4
    if typ == 5 or typ == 10 or typ == 12 or typ == 16:     # RATIONAL SRATIONAL DOUBLE LONG8
        return 8
    return 0


cdef inline int _whole(double v) noexcept nogil:
    """v if it is a whole number 1..8, else 1."""
    if v >= 1.0 and v <= 8.0 and v == <double><int>v:
        return <int>v
    return 1


cdef inline int _orientation_value(const uint8_t* p, uint32_t typ, bint le) noexcept nogil:
    """The first value of an orientation entry as Pillow reads it, 1 unless 1..8."""
    cdef long long v
    cdef uint32_t u32
    cdef uint64_t u64
    cdef float f
    cdef double g
    cdef long long num, den
    if typ == 3:
        v = _rd16(p, le)
    elif typ == 8:
        v = <int16_t>_rd16(p, le)
    elif typ == 4 or typ == 13:
        v = _rd32(p, le)
    elif typ == 9:
        v = <int32_t>_rd32(p, le)
    elif typ == 6:
        v = <int8_t>p[0]
    elif typ == 16:
        u64 = _rd64(p, le)
        v = <long long>u64 if u64 <= 8 else 0
    elif typ == 5 or typ == 10:
        if typ == 5:
            num = _rd32(p, le)
            den = _rd32(p + 4, le)
        else:
            num = <int32_t>_rd32(p, le)
            den = <int32_t>_rd32(p + 4, le)
        if den == 0 or num % den != 0:
            return 1
        v = num // den
    elif typ == 11:
        u32 = _rd32(p, le)
        memcpy(&f, &u32, 4)
        return _whole(f)
    elif typ == 12:
        u64 = _rd64(p, le)
        memcpy(&g, &u64, 8)
        return _whole(g)
    else:                       # BYTE, ASCII, UNDEFINED: bytes or text to Pillow
        return 1
    return <int>v if 1 <= v <= 8 else 1


cdef inline int tiff_orientation(const uint8_t* p, size_t n) noexcept nogil:
    """Orientation (tag 0x0112 of IFD0) of a TIFF/EXIF block; 1 if absent or invalid.

    A leading ``Exif\\0\\0`` (some PNG writers keep it in eXIf) is skipped.
    """
    cdef bint le
    cdef size_t ifd, e, off
    cdef uint64_t size
    cdef uint32_t count, i, typ, cnt
    cdef int unit
    cdef const uint8_t* val
    if n >= 6 and memcmp(p, b"Exif\0\0", 6) == 0:
        p += 6
        n -= 6
    if n < 8:
        return 1
    if p[0] == 0x49 and p[1] == 0x49:        # "II"
        le = True
    elif p[0] == 0x4D and p[1] == 0x4D:      # "MM"
        le = False
    else:
        return 1
    if _rd16(p + 2, le) != 42:
        return 1
    ifd = _rd32(p + 4, le)
    if ifd < 8 or ifd > n - 2:
        return 1
    count = _rd16(p + ifd, le)
    for i in range(count):
        e = ifd + 2 + 12 * <size_t>i
        if e + 12 > n:
            return 1                         # the IFD is cut short before the tag
        typ = _rd16(p + e + 2, le)
        unit = _tiff_unit(typ)
        if unit == 0:
            continue                         # unknown type: skipped
        cnt = _rd32(p + e + 4, le)
        size = <uint64_t>cnt * <uint64_t>unit
        if size > 4:
            off = _rd32(p + e + 8, le)
            if off > n or size > n - off:
                return 1                     # data outside the block: the IFD ends here
            val = p + off
        else:
            val = p + e + 8
        if _rd16(p + e, le) != 0x0112:
            continue
        if cnt == 0:
            return 1
        return _orientation_value(val, typ, le)
    return 1


# ----------------------------------------------------------------------------- JPEG walk

cdef enum:
    JW_MAX_FIX = 8          # junk runs and byte patches a repairable header may have
    JW_MAX_COMP = 16        # frame components remembered (libjpeg allows 10)

    # warnings libjpeg would give about the header (bits of JpegWalk.warn); the
    # header is repaired in a copy so that it does not, and the file decodes
    # with the strict policy for everything else
    JW_JUNK = 1             # bytes before a marker ("extraneous bytes before marker")
    JW_JFIF = 2             # unknown JFIF major version
    JW_ADOBE = 4            # unknown Adobe colour transform code
    JW_SOS = 8              # non-sequential Ss/Se/Ah/Al in a sequential file's scan


cdef struct JpegWalk:
    int width               # frame size from the first SOFn (0 when none)
    int height
    int orientation         # EXIF orientation of the first APP1 "Exif" segment
    int sof                 # SOFn marker byte of the frame, 0 when none
    int ncomp               # components of the frame
    int warn                # JW_* bits
    bint undefined_tables   # the first scan uses a Huffman or quantisation table the
                            # header does not define (Motion-JPEG: the standard tables)
    int njunk
    size_t junk_at[JW_MAX_FIX]      # junk runs to drop, in file order
    size_t junk_len[JW_MAX_FIX]
    size_t junk_total
    int junk_marker         # the marker after the first junk run
    int npatch
    size_t patch_at[JW_MAX_FIX]     # bytes to overwrite
    uint8_t patch_val[JW_MAX_FIX]
    int jfif_major          # the unknown JFIF major version (JW_JFIF)
    int adobe_transform     # the unknown Adobe transform (JW_ADOBE)
    size_t sos_at           # offset of the first SOS marker byte (0xDA)


cdef inline bint _jw_patch(JpegWalk* w, size_t at, uint8_t val) noexcept nogil:
    if w.npatch == JW_MAX_FIX:
        return False
    w.patch_at[w.npatch] = at
    w.patch_val[w.npatch] = val
    w.npatch += 1
    return True


cdef inline int jpeg_walk(const uint8_t* d, size_t n, JpegWalk* w) noexcept nogil:
    """Walk the JPEG markers up to the first scan as libjpeg's marker reader does.

    Fills ``w``: frame size, EXIF orientation, and what libjpeg would warn about
    (junk before a marker, an unknown JFIF version or Adobe transform, bad scan
    parameters) with the bytes that repair it.  Like libjpeg, an APPn or COM
    segment whose length field is below 2 is taken as 2 bytes long, and bytes
    between segments are skipped up to the next marker.

    Returns 1 when a frame header was found, 0 when the data ends first (truncated,
    or a tables-only stream), -1 on a marker sequence libjpeg would refuse too (or
    more junk runs or patches than JW_MAX_FIX).
    """
    cdef size_t pos = 2
    cdef size_t start, ffrun, seglen, end, p, cnt
    cdef uint8_t m, b, cid, tb
    cdef int found = 0, exif_seen = 0, jfif = 0, i, k, ns, ss, se, ahal
    cdef size_t adobe_at = 0
    cdef uint32_t hdef = 0, qdef = 0
    cdef bint seq, huff, dc, ac
    cdef uint8_t comp_id[JW_MAX_COMP]
    cdef uint8_t comp_tq[JW_MAX_COMP]
    cdef int nc = 0
    memset(w, 0, sizeof(JpegWalk))
    w.orientation = 1
    if n < 4 or d[0] != 0xFF or d[1] != 0xD8:
        return -1
    while True:
        # libjpeg's next_marker: skip bytes up to a run of 0xFF and a marker byte;
        # FF 00 (a stuffed zero) is skipped too
        start = pos
        while True:
            while pos < n and d[pos] != 0xFF:
                pos += 1
            ffrun = pos
            while pos < n and d[pos] == 0xFF:
                pos += 1
            if pos >= n:
                return found
            m = d[pos]
            pos += 1
            if m != 0:
                break
        if ffrun > start:
            if w.njunk == JW_MAX_FIX:
                return -1
            if w.njunk == 0:
                w.junk_marker = m
            w.junk_at[w.njunk] = start
            w.junk_len[w.njunk] = ffrun - start
            w.njunk += 1
            w.junk_total += ffrun - start
            w.warn |= JW_JUNK
        if m == 0xD8 or m == 0x01 or 0xD0 <= m <= 0xD7:     # no length (libjpeg decides)
            continue
        if m == 0xD9:                                        # end of image
            return found
        if pos + 2 > n:
            return found
        seglen = (<size_t>d[pos] << 8) | d[pos + 1]
        if m == 0xDA:
            break
        if seglen < 2:
            if 0xE0 <= m <= 0xEF or m == 0xFE:               # APPn, COM: skipped
                pos += 2
                continue
            return -1
        end = pos + seglen
        if (0xC0 <= m <= 0xCF and m != 0xC4 and m != 0xC8 and m != 0xCC
                and seglen >= 8 and pos + 7 <= n and not found):
            w.height = (d[pos + 3] << 8) | d[pos + 4]
            w.width = (d[pos + 5] << 8) | d[pos + 6]
            w.sof = m
            w.ncomp = d[pos + 7]
            found = 1
            p = pos + 8
            while nc < w.ncomp and nc < JW_MAX_COMP and p + 3 <= end and p + 3 <= n:
                comp_id[nc] = d[p]
                comp_tq[nc] = d[p + 2]
                nc += 1
                p += 3
        if end > n:
            return found
        if m == 0xC4:                                        # DHT: which tables it defines
            p = pos + 2
            while p + 17 <= end:
                b = d[p]
                cnt = 0
                for k in range(1, 17):
                    cnt += d[p + k]
                hdef |= (<uint32_t>1) << ((4 if b & 0x10 else 0) + (b & 3))
                p += 17 + cnt
        elif m == 0xDB:                                      # DQT
            p = pos + 2
            while p < end:
                b = d[p]
                qdef |= (<uint32_t>1) << (b & 3)
                p += 1 + (128 if b >> 4 else 64)
        elif m == 0xE0 and seglen >= 16 and memcmp(d + pos + 2, b"JFIF\0", 5) == 0:
            jfif = 1
            if d[pos + 7] != 1 and d[pos + 7] != 2:
                w.warn |= JW_JFIF
                w.jfif_major = d[pos + 7]
                if not _jw_patch(w, pos + 7, 1):
                    return -1
        elif m == 0xEE and seglen >= 14 and memcmp(d + pos + 2, b"Adobe", 5) == 0:
            adobe_at = pos + 13                              # the last one counts
        elif (m == 0xE1 and not exif_seen and seglen >= 8
                and memcmp(d + pos + 2, b"Exif\0\0", 6) == 0):
            exif_seen = 1                                    # only the first (as Pillow)
            w.orientation = tiff_orientation(d + pos + 8, seglen - 8)
        pos = end
    # the first SOS (pos is at its length field)
    w.sos_at = pos - 1
    if not found:
        return 0
    if adobe_at:
        b = d[adobe_at]
        if (w.ncomp == 3 and not jfif and b > 1) or (w.ncomp == 4 and b != 0 and b != 2):
            w.warn |= JW_ADOBE
            w.adobe_transform = b
            if not _jw_patch(w, adobe_at, 1 if w.ncomp == 3 else 2):
                return -1
    if pos + seglen > n or seglen < 6:
        return found                                         # libjpeg reports it
    ns = d[pos + 2]
    if seglen != 6 + 2 * <size_t>ns:
        return found
    ss = d[pos + 3 + 2 * ns]
    se = d[pos + 4 + 2 * ns]
    ahal = d[pos + 5 + 2 * ns]
    seq = w.sof == 0xC0 or w.sof == 0xC1 or w.sof == 0xC9
    huff = 0xC0 <= w.sof <= 0xC3
    if seq and (ss != 0 or se != 63 or ahal != 0):
        w.warn |= JW_SOS
    # tables the first scan needs: Huffman DC (sequential, or a first DC scan) and
    # AC (sequential, or an AC scan), and each component's quantisation table
    dc = huff and (seq or (ss == 0 and (ahal >> 4) == 0))
    ac = huff and (seq or ss > 0)
    for k in range(ns):
        cid = d[pos + 3 + 2 * k]
        tb = d[pos + 4 + 2 * k]
        if dc and not (hdef >> (tb >> 4 & 3)) & 1:
            w.undefined_tables = True
        if ac and not (hdef >> (4 + (tb & 3))) & 1:
            w.undefined_tables = True
        for i in range(nc):
            if comp_id[i] == cid and not (qdef >> (comp_tq[i] & 3)) & 1:
                w.undefined_tables = True
    return found
