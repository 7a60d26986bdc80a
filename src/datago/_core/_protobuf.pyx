# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The ``tf.train.Example`` walk of TFRecord records (``datago.sources.tfrecord``).

    parse_example(data) -> {name: list of bytes | float32 ndarray | int64 ndarray}
    find(b, start, end, (key, ...)) -> {key: values}    # only these features decoded

The protobuf rules, all kept from the pure-Python walk this replaces:

* varints: at most 10 bytes (the 10th with a continuation bit: "varint longer than
  10 bytes"), the bits of the 10th byte past bit 63 kept (a tag or length that
  big matches nothing and fits nowhere; an int64 value that big is no int64:
  "an int64 list value past 64 bits");
* wire types 0, 1, 2 and 5 are read or skipped; 3, 4, 6, 7 raise;
* unknown fields are skipped at every level; of repeated ``Example.features``
  messages every one is walked; a map entry's last key and last value win; an
  entry with no key has the key ``b""``; map keys are decoded as UTF-8 with
  ``"replace"``; of duplicate keys the last one wins (an entry with no value, or
  a ``Feature`` with no kind, removes the key);
* a ``Feature`` is the last of its ``bytes_list`` / ``float_list`` /
  ``int64_list`` (a oneof); within it only field 1 counts: bytes values of wire
  type 2 (others ignored); float values packed (a multiple of 4 bytes) or fixed32,
  little-endian, bits kept as stored (NaN payloads too); int64 values packed or
  varints, as two's complement (``v - 2**64`` when ``v >= 2**63``); any other
  wire type of field 1 raises;
* the whole map is walked (every structural error raised) before any ``Feature``
  is decoded; ``find`` decodes only the features it is asked for.

Every other error is ``ExampleError`` (a ``ValueError``) with the messages the
Python walk had.  No read goes past ``b[start:end]``: every position is an int64 below
its message's end, and every length is compared with the bytes left before it is
added.  The walk is C (``noexcept nogil``, integer codes mapped to exceptions by
``_raise`` alone); numeric lists of 64 KiB or more are read without the GIL.
Returned values are new Python objects (``bytes``, NumPy arrays that own their
memory), never views of the input.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

import numpy as np

__all__ = ["ExampleError", "find", "parse_example"]


class ExampleError(ValueError):
    """A record or ``tf.train.Example`` that cannot be parsed (``bad_member``)."""


# return codes of the walk: 0 is success; an error's wire type is in bits 4-6
cdef enum:
    _OK = 0
    _DONE = 1               # (_next_entry: no more entries; not an error)
    _TRUNCATED = 2
    _TOO_LONG = 3
    _WIRE = 4
    _PAST_END = 5
    _FLOAT_PACKED = 6
    _FLOAT_WIRE = 7
    _INT_WIRE = 8

cdef uint64_t _NO_FIELD = 0xFFFFFFFFFFFFFFFF   # the field number of a tag >= 2**64
cdef int64_t _NOGIL_BYTES = 1 << 16            # numeric lists this long drop the GIL
cdef uint64_t _TOP = 0x8000000000000000


cdef int _raise(int rc) except -1:
    """The exception of a walk's return code (the only place one is made)."""
    cdef int code = rc & 15
    cdef int wire = rc >> 4
    if code == _TRUNCATED:
        raise ExampleError("truncated varint")
    if code == _TOO_LONG:
        raise ExampleError("varint longer than 10 bytes")
    if code == _WIRE:
        raise ExampleError(f"unsupported protobuf wire type {wire}")
    if code == _PAST_END:
        raise ExampleError("a field runs past the end of its message")
    if code == _FLOAT_PACKED:
        raise ExampleError("a packed float list is not a multiple of 4 bytes")
    if code == _FLOAT_WIRE:
        raise ExampleError(f"a float list value with wire type {wire}")
    if code == _INT_WIRE:
        raise ExampleError(f"an int64 list value with wire type {wire}")
    raise SystemError(f"datago._core._protobuf: unknown walk code {rc}")


# ---------------------------------------------------------------------- C walk
cdef struct Value:
    uint64_t lo             # wire 0: the varint's low 64 bits
    uint32_t hi             # wire 0: its bits 64-69 (a 10th byte above 1)
    int64_t s, e            # wire 1, 2, 5: the span of its bytes


cdef inline int _varint(const uint8_t* b, int64_t* pos, int64_t end, uint64_t* lo,
                        uint32_t* hi) noexcept nogil:
    """The varint at ``pos`` (< ``end``), ``pos`` moved past it."""
    cdef int64_t p = pos[0]
    cdef uint64_t c, v = 0
    cdef int shift = 0
    lo[0] = 0
    hi[0] = 0
    while True:
        if p >= end:
            return _TRUNCATED
        c = b[p]
        p += 1
        if shift < 63:
            v |= (c & 0x7F) << shift
        else:                                   # the 10th byte: bit 63 and above
            v |= (c & 1) << 63
            hi[0] = <uint32_t>((c & 0x7F) >> 1)
        if c < 0x80:
            pos[0] = p
            lo[0] = v
            return _OK
        shift += 7
        if shift >= 70:
            return _TOO_LONG


cdef inline int _value(const uint8_t* b, int64_t* pos, int64_t end, int wire,
                       Value* out) noexcept nogil:
    """The value of wire type ``wire`` at ``pos``, ``pos`` moved past it."""
    cdef uint64_t n
    cdef uint32_t hi
    cdef int rc
    out.s = out.e = pos[0]                      # (every field set on every path)
    out.lo = 0
    out.hi = 0
    if wire == 0:
        return _varint(b, pos, end, &out.lo, &out.hi)
    if wire == 2:
        rc = _varint(b, pos, end, &n, &hi)
        if rc:
            return rc
    elif wire == 1:
        n = 8
        hi = 0
    elif wire == 5:
        n = 4
        hi = 0
    else:
        return _WIRE | (wire << 4)
    if hi or n > <uint64_t>(end - pos[0]):       # pos <= end here
        return _PAST_END
    out.s = pos[0]
    out.e = pos[0] + <int64_t>n
    pos[0] = out.e
    return _OK


cdef inline int _field(const uint8_t* b, int64_t* pos, int64_t end, uint64_t* number,
                       int* wire, Value* out) noexcept nogil:
    """A field (its tag, then its value) at ``pos``, ``pos`` moved past it."""
    cdef uint64_t tag
    cdef uint32_t hi
    cdef int rc = _varint(b, pos, end, &tag, &hi)
    if rc:
        return rc
    number[0] = tag >> 3 if hi == 0 else _NO_FIELD
    wire[0] = <int>(tag & 7)
    return _value(b, pos, end, wire[0], out)


cdef struct Entries:
    const uint8_t* b
    int64_t pos, end        # in the Example
    int64_t s, send         # in the Features message being walked (s == send: none)


cdef inline void _entries_init(Entries* w, const uint8_t* b, int64_t start,
                               int64_t end) noexcept nogil:
    w.b = b
    w.pos = start
    w.end = end
    w.s = 0
    w.send = 0


cdef int _next_message(const uint8_t* b, int64_t* pos, int64_t end, Value* v) noexcept nogil:
    """Skip to the next field 1 of wire type 2 (the sub-message both levels of the
    walk look for) in ``b[pos:end]``, other fields skipped: ``_OK`` with ``v`` its
    span, ``_DONE`` at ``end``, or the first error."""
    cdef uint64_t tag
    cdef uint32_t hi
    cdef int rc
    while pos[0] < end:
        rc = _varint(b, pos, end, &tag, &hi)
        if rc:
            return rc
        if hi == 0 and tag == 0x0A:
            return _value(b, pos, end, 2, v)
        rc = _value(b, pos, end, <int>(tag & 7), v)
        if rc:
            return rc
    return _DONE


cdef int _next_entry(Entries* w, int64_t* ks, int64_t* ke, int64_t* vs,
                     int64_t* ve) noexcept nogil:
    """The next ``Features.feature`` map entry: its key's span (-1, -1: none) and
    its ``Feature``'s span (-1, -1: none); ``_DONE`` after the last one."""
    cdef const uint8_t* b = w.b
    cdef uint64_t tag
    cdef uint32_t hi
    cdef Value v
    cdef int64_t s2, e2
    cdef int rc
    while True:
        if w.s < w.send:                        # in Example.features: Features.feature
            rc = _next_message(b, &w.s, w.send, &v)
            if rc == _DONE:
                continue
            if rc:
                return rc
            s2, e2 = v.s, v.e
            ks[0] = ke[0] = vs[0] = ve[0] = -1
            while s2 < e2:
                rc = _varint(b, &s2, e2, &tag, &hi)
                if rc:
                    return rc
                if hi == 0 and tag == 0x0A:     # the entry's key
                    rc = _value(b, &s2, e2, 2, &v)
                    ks[0], ke[0] = v.s, v.e
                elif hi == 0 and tag == 0x12:   # its value, a Feature
                    rc = _value(b, &s2, e2, 2, &v)
                    vs[0], ve[0] = v.s, v.e
                else:
                    rc = _value(b, &s2, e2, <int>(tag & 7), &v)
                if rc:
                    return rc
            return _OK
        rc = _next_message(b, &w.pos, w.end, &v)   # Example.features (_DONE: no more)
        if rc:
            return rc
        w.s, w.send = v.s, v.e


cdef int _check_entries(const uint8_t* b, int64_t start, int64_t end) noexcept nogil:
    """The whole map walked, values not decoded: ``_OK`` or the first error."""
    cdef Entries w
    cdef int64_t ks, ke, vs, ve
    cdef int rc
    _entries_init(&w, b, start, end)
    while True:
        rc = _next_entry(&w, &ks, &ke, &vs, &ve)
        if rc == _DONE:
            return _OK
        if rc:
            return rc


cdef inline uint32_t _le32(const uint8_t* p) noexcept nogil:
    return <uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | \
        (<uint32_t>p[3] << 24)


cdef int _floats(const uint8_t* b, int64_t pos, int64_t end, int64_t* count,
                 uint32_t* dst) noexcept nogil:
    """The float_list at ``b[pos:end]``: its values counted (``dst`` NULL) or their
    bits written to ``dst`` (room for ``count`` of a counting call)."""
    cdef uint64_t number
    cdef int wire, rc
    cdef Value v
    cdef int64_t i, k, n = 0
    while pos < end:
        rc = _field(b, &pos, end, &number, &wire, &v)
        if rc:
            return rc
        if number != 1:
            continue
        if wire == 2:
            if (v.e - v.s) % 4:
                return _FLOAT_PACKED
            k = (v.e - v.s) // 4
            if dst != NULL:
                for i in range(k):
                    dst[n + i] = _le32(b + v.s + 4 * i)
            n += k
        elif wire == 5:
            if dst != NULL:
                dst[n] = _le32(b + v.s)
            n += 1
        else:
            return _FLOAT_WIRE | (wire << 4)
    count[0] = n
    return _OK


cdef inline void _put(uint64_t lo, uint32_t hi, int64_t n, int64_t* dst,
                      bint* overflow) noexcept nogil:
    # the Python walk's v - 2**64 if v >= 2**63, for v = lo + hi * 2**64
    if hi == 0 or (hi == 1 and lo < _TOP):
        if dst != NULL:
            dst[n] = <int64_t>lo                # two's complement when hi == 0
    else:
        overflow[0] = True                      # no int64: the Feature is bad


cdef int _ints(const uint8_t* b, int64_t pos, int64_t end, int64_t* count, int64_t* dst,
               bint* overflow) noexcept nogil:
    """The int64_list at ``b[pos:end]``: its values counted (``dst`` NULL) or
    written to ``dst``; ``overflow`` set when a value is no int64."""
    cdef uint64_t number, lo
    cdef uint32_t hi
    cdef int wire, rc
    cdef Value v
    cdef int64_t p, n = 0
    while pos < end:
        rc = _field(b, &pos, end, &number, &wire, &v)
        if rc:
            return rc
        if number != 1:
            continue
        if wire == 2:
            p = v.s
            while p < v.e:
                rc = _varint(b, &p, v.e, &lo, &hi)
                if rc:
                    return rc
                _put(lo, hi, n, dst, overflow)
                n += 1
        elif wire == 0:
            _put(v.lo, v.hi, n, dst, overflow)
            n += 1
        else:
            return _INT_WIRE | (wire << 4)
    count[0] = n
    return _OK


# ---------------------------------------------------------------------- values
cdef object _feature(const uint8_t* b, int64_t start, int64_t end):
    """A ``Feature``'s values: a ``list`` of bytes, a float32 or int64 ndarray; None
    when no kind is set."""
    cdef uint64_t number
    cdef int wire, rc
    cdef Value v
    cdef int kind = 0
    cdef int64_t ks = 0, ke = 0, pos = start, n = 0
    cdef bint overflow = False
    cdef uint32_t[::1] fdst
    cdef int64_t[::1] idst
    while pos < end:
        rc = _field(b, &pos, end, &number, &wire, &v)
        if rc:
            _raise(rc)
        if wire == 2 and 1 <= number <= 3:      # oneof: the last one wins
            kind, ks, ke = <int>number, v.s, v.e
    if kind == 0:
        return None
    if kind == 1:
        out = []
        pos = ks
        while pos < ke:
            rc = _field(b, &pos, ke, &number, &wire, &v)
            if rc:
                _raise(rc)
            if number == 1 and wire == 2:
                out.append(PyBytes_FromStringAndSize(<const char*>b + v.s, v.e - v.s))
        return out
    if kind == 2:
        if ke - ks >= _NOGIL_BYTES:
            with nogil:
                rc = _floats(b, ks, ke, &n, NULL)
        else:
            rc = _floats(b, ks, ke, &n, NULL)
        if rc:
            _raise(rc)
        arr = np.empty(n, dtype=np.float32)
        if n:
            fdst = arr.view(np.uint32)
            if ke - ks >= _NOGIL_BYTES:
                with nogil:
                    rc = _floats(b, ks, ke, &n, &fdst[0])
            else:
                rc = _floats(b, ks, ke, &n, &fdst[0])
            if rc:
                _raise(rc)
        return arr
    if ke - ks >= _NOGIL_BYTES:
        with nogil:
            rc = _ints(b, ks, ke, &n, NULL, &overflow)
    else:
        rc = _ints(b, ks, ke, &n, NULL, &overflow)
    if rc:
        _raise(rc)
    if overflow:
        raise ExampleError("an int64 list value past 64 bits")
    arr = np.empty(n, dtype=np.int64)
    if n:
        idst = arr
        if ke - ks >= _NOGIL_BYTES:
            with nogil:
                rc = _ints(b, ks, ke, &n, &idst[0], &overflow)
        else:
            rc = _ints(b, ks, ke, &n, &idst[0], &overflow)
        if rc:
            _raise(rc)
    return arr


# ---------------------------------------------------------------------- API
def parse_example(data):
    """A serialized ``tf.train.Example`` as ``{key: values}``: a ``list`` of bytes
    (bytes_list), a float32 ndarray (float_list) or an int64 ndarray (int64_list);
    features with no kind set are left out.  ``ValueError`` (``ExampleError``) when
    it does not parse."""
    b = data if isinstance(data, bytes) else bytes(data)    # (a subclass of bytes too)
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(b)
    cdef int64_t n = len(b)
    cdef Entries w
    cdef int64_t ks, ke, vs, ve
    cdef int rc = _check_entries(p, 0, n)
    if rc:
        _raise(rc)
    out = {}
    _entries_init(&w, p, 0, n)
    while True:
        rc = _next_entry(&w, &ks, &ke, &vs, &ve)
        if rc == _DONE:
            return out
        if rc:                                  # (walked once already)
            _raise(rc)
        value = _feature(p, vs, ve) if vs >= 0 else None
        name = PyUnicode_DecodeUTF8(<const char*>p + ks, ke - ks, "replace") \
            if ks >= 0 else ""
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value


def find(b, Py_ssize_t start, Py_ssize_t end, keys):
    """The features named ``keys`` (raw key bytes; ``key in keys``) of the Example
    at ``b[start:end]`` (``b``: bytes); the map is walked whole, only those
    features decoded."""
    cdef const uint8_t* p
    cdef Entries w
    cdef int64_t ks, ke, vs, ve
    cdef int rc
    if not isinstance(b, bytes):
        raise TypeError(f"find() needs bytes, got {type(b).__name__}")
    p = <const uint8_t*>PyBytes_AS_STRING(b)
    if not 0 <= start <= end <= len(b):
        raise IndexError(f"span [{start}, {end}) is not within the {len(b)} bytes given")
    spans = {}
    _entries_init(&w, p, start, end)
    while True:
        rc = _next_entry(&w, &ks, &ke, &vs, &ve)
        if rc == _DONE:
            break
        if rc:
            _raise(rc)
        key = PyBytes_FromStringAndSize(<const char*>p + ks, ke - ks) if ks >= 0 else b""
        if key in keys:
            spans[key] = (vs, ve)
    out = {}
    for key, (vs, ve) in spans.items():
        value = _feature(p, vs, ve) if vs >= 0 else None
        if value is not None:
            out[key] = value
    return out
