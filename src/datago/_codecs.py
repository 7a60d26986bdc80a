"""How an archive member's stored bytes become its content (``Member.codec``).

The fetch layer reads a member's stored bytes (a byte range of a file or URL)
and, when the member has a codec, hands them here:

* ``""``: stored as is;
* ``"deflate"``: raw deflate (a ZIP member), inflated to exactly
  ``Member.raw_size`` bytes -- more is refused before it is produced (a ZIP bomb
  costs nothing), less is ``truncated``;
* ``"tfrecord:<feature>"``: one whole TFRecord record (length, CRC-32C of the
  length, data, CRC-32C of the data); the CRCs are checked and the bytes of
  the named feature of its ``tf.train.Example`` are returned
  (``datago.sources.tfrecord``).

Errors are ``FetchError`` with a reason the engine counts (``bad_member``,
``crc_mismatch``, ``truncated``).
"""

from __future__ import annotations

import zlib

__all__ = ["decode_member"]


def decode_member(member, data: bytes) -> bytes:
    codec = member.codec
    if not codec:
        return data
    if codec == "deflate":
        return inflate(data, member.raw_size, member)
    if codec.startswith("tfrecord:"):
        from datago.sources.tfrecord import record_feature
        return record_feature(data, codec[len("tfrecord:"):], member)
    from datago.fetch import FetchError
    raise FetchError(f"{member}: unknown member codec {codec!r}", "bad_member", str(member))


def inflate(data: bytes, raw_size: int, member=None) -> bytes:
    """Raw deflate ``data`` to exactly ``raw_size`` bytes (never more)."""
    from datago.fetch import FetchError
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(data, raw_size + 1)
    except zlib.error as e:
        raise FetchError(f"{member}: corrupt deflate data ({e})", "bad_member",
                         str(member)) from None
    if len(out) > raw_size or d.unconsumed_tail:
        raise FetchError(f"{member}: inflates to more than its declared {raw_size} bytes",
                         "bad_member", str(member))
    if len(out) < raw_size:
        raise FetchError(f"{member}: inflates to {len(out)} of its declared {raw_size} bytes",
                         "truncated", str(member))
    return out
