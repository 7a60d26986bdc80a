# cython: language_level=3
"""EXIF orientation from a TIFF block or a JPEG's APP1 segment (inline, nogil, bounds-checked).

Every read is checked against the buffer length: malformed metadata yields
orientation 1 (identity), never an out-of-bounds read.
"""
from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcmp


cdef inline uint32_t _rd16(const uint8_t* p, bint le) noexcept nogil:
    return (p[0] | (p[1] << 8)) if le else ((p[0] << 8) | p[1])


cdef inline uint32_t _rd32(const uint8_t* p, bint le) noexcept nogil:
    if le:
        return p[0] | (p[1] << 8) | (p[2] << 16) | (<uint32_t>p[3] << 24)
    return (<uint32_t>p[0] << 24) | (p[1] << 16) | (p[2] << 8) | p[3]


cdef inline int tiff_orientation(const uint8_t* p, size_t n) noexcept nogil:
    """Orientation tag (0x0112) of IFD0 of a TIFF/EXIF block; 1 if absent or invalid."""
    cdef bint le
    cdef size_t ifd, e
    cdef uint32_t count, i, typ, v
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
            return 1
        if _rd16(p + e, le) == 0x0112:
            typ = _rd16(p + e + 2, le)
            if typ == 3:
                v = _rd16(p + e + 8, le)
            elif typ == 4:
                v = _rd32(p + e + 8, le)
            else:
                return 1
            return <int>v if 1 <= v <= 8 else 1
    return 1


cdef inline int jpeg_scan(const uint8_t* d, size_t n, int* width, int* height,
                          int* orientation) noexcept nogil:
    """Walk the JPEG markers up to the first scan: frame size (SOFn) and EXIF orientation.

    Returns 1 when a frame header was found, 0 when the data ends first (truncated,
    or a tables-only stream), -1 on a malformed marker sequence.  ``orientation`` is
    1 unless an APP1 "Exif" segment says otherwise.
    """
    cdef size_t pos = 2
    cdef size_t seglen
    cdef uint8_t marker
    cdef int found = 0
    width[0] = 0
    height[0] = 0
    orientation[0] = 1
    if n < 4 or d[0] != 0xFF or d[1] != 0xD8:
        return -1
    while pos + 4 <= n:
        if d[pos] != 0xFF:
            return -1 if not found else 1
        marker = d[pos + 1]
        if marker == 0xFF:                       # fill byte
            pos += 1
            continue
        if marker == 0x01 or marker == 0xD8 or (0xD0 <= marker <= 0xD7):
            pos += 2
            continue
        if marker == 0xDA or marker == 0xD9:     # start of scan / end of image
            return found
        seglen = (<size_t>d[pos + 2] << 8) | d[pos + 3]
        if seglen < 2:
            return -1
        if (0xC0 <= marker <= 0xCF and marker != 0xC4 and marker != 0xC8 and marker != 0xCC
                and seglen >= 8 and pos + 9 <= n and not found):
            height[0] = (d[pos + 5] << 8) | d[pos + 6]
            width[0] = (d[pos + 7] << 8) | d[pos + 8]
            found = 1
        elif (marker == 0xE1 and seglen >= 16 and pos + 2 + seglen <= n
                and orientation[0] == 1 and memcmp(d + pos + 4, b"Exif\0\0", 6) == 0):
            orientation[0] = tiff_orientation(d + pos + 10, seglen - 8)
        pos += 2 + seglen
    return found
