"""How an archive member's stored bytes become its content (``Member.codec``).

The fetch layer reads a member's stored bytes (a byte range of a file or URL)
and, when the member has a codec, hands them here:

* ``""``: stored as is;
* ``"deflate"``: raw deflate (a ZIP member), inflated to exactly
  ``Member.raw_size`` bytes by libdeflate -- more is refused before it is
  produced (a ZIP bomb costs nothing), less is ``truncated``;
* ``"tfrecord:<feature>"``: one whole TFRecord record (length, CRC-32C of the
  length, data, CRC-32C of the data); the CRCs are checked and the bytes of
  the named feature of its ``tf.train.Example`` are returned
  (``datago.sources.tfrecord``).

A member with a ``Member.crc32`` (a ZIP member: its directory's CRC-32) has its
content checked against it, stored or inflated (~45 us per 400 KB).

Errors are ``FetchError`` with a reason the engine counts (``bad_member``,
``crc_mismatch``, ``truncated``).
"""

from __future__ import annotations

from datago._core._deflate import InflateError, crc32, inflate_raw

__all__ = ["decode_member"]


def decode_member(member, data: bytes) -> bytes:
    codec = member.codec
    if not codec:
        out = data
    elif codec == "deflate":
        out = inflate(data, member.raw_size, member)
    elif codec.startswith("tfrecord:"):
        from datago.sources.tfrecord import record_feature
        return record_feature(data, codec[len("tfrecord:"):], member)
    else:
        from datago.fetch import FetchError
        raise FetchError(f"{member}: unknown member codec {codec!r}", "bad_member",
                         str(member))
    want = member.crc32
    if want >= 0:
        got = crc32(out)
        if got != want:
            from datago.fetch import FetchError
            raise FetchError(f"{member}: CRC-32 {got:08x} where the archive's directory "
                             f"says {want:08x} (corrupt member)", "crc_mismatch", str(member))
    return out


def inflate(data: bytes, raw_size: int, member=None) -> bytes:
    """Raw deflate ``data`` to exactly ``raw_size`` bytes (never more)."""
    from datago.fetch import FetchError
    try:
        return inflate_raw(data, raw_size)
    except InflateError as e:
        reason = "truncated" if e.reason == "too_short" else "bad_member"
        raise FetchError(f"{member}: {e}", reason, str(member)) from None
