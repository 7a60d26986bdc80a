"""TFRecord files of ``tf.train.Example`` (``source_type: "tfrecord"``), read without
TensorFlow.

    {"source_type": "tfrecord",
     "source_config": {"path": "data/train-{00000..00127}.tfrecord",
                       "image_key": "image/encoded", "id_key": "image/filename"}}

    with TFRecordWriter("out.tfrecord") as w:          # files TensorFlow reads
        w.write_example({"image/encoded": jpeg_bytes, "label": 3, "emb": np.zeros(8)})

Records
-------
A record is ``length`` (u64 LE), the masked CRC-32C of those 8 bytes (u32 LE), the
``length`` bytes of data and the masked CRC-32C of the data (u32 LE); CRC-32C is
``datago._core._crc32c`` (the SSE4.2 instruction, else slicing-by-8 tables), masked
as TFRecord does: ``((crc >> 15) | (crc << 17)) + 0xa282ead8`` mod 2**32.  Both CRCs
are checked on every read; a record that fails is counted (``crc_mismatch``) and
never parsed.  The data is a ``tf.train.Example``, parsed by a small protobuf
reader in Cython, ``datago._core._protobuf`` (varints and length-delimited
fields; packed and unpacked repeated values; unknown fields skipped; the last of
repeated map keys wins, as in protobuf).

Features of an Example
----------------------
* ``image_key`` (default ``image/encoded``): the main image (the first value of a
  bytes feature).  A record without it is counted ``no_image`` and not listed.
* ``id_key`` (a bytes feature, UTF-8, or a single int64): the sample id; without
  ``id_key``, or in a record that lacks the feature, the id is ``<file
  name>:<record index>`` (the file's base name -- its path or URL as given when
  two files share a base name -- and records numbered from 0 in file order, bad
  ones included).  Repeated ids are counted ``duplicate_id`` and
  listed once.  The id feature is no attribute.
* Masks: a single-valued bytes feature whose key, without a trailing ``/encoded``,
  is ``mask`` or ``seg`` (the mask ``"mask"`` / ``"seg"``, as the folder
  source's ``<key>.mask.png``), or ``<name>/mask`` or ``<name>/seg`` (the mask
  ``"<name>"``): ``mask/encoded`` is ``"mask"``, ``alpha/mask`` is ``"alpha"``.
* Additional images: another single-valued bytes feature whose key ends in
  ``/encoded`` or whose value starts with a JPEG, PNG, GIF or WebP signature;
  named by its key without ``/encoded`` (``depth/encoded`` is
  ``batch["additional_images"]["depth"]``).
* Arrays (``batch["latents"][key]``): a float_list (float32) or int64_list (int64)
  with more than one value, or any feature with a ``<key>/shape`` int64 companion,
  which gives the array's shape (a bytes feature with a shape companion holds raw
  array bytes: uint8, or the NumPy dtype named by a ``<key>/dtype`` bytes
  companion, e.g. ``float16``).  Companions are not attributes.
* Everything else is an attribute: bytes values as UTF-8 strings when they are
  valid UTF-8, else as ``bytes`` when at most ``MAX_ATTRIBUTE_BYTES`` (larger
  binary values that are no image are not read); int64 values as ``int``, float
  values as ``float`` (the float32 value, widened); single-element lists unwrapped
  to scalars, longer lists kept as lists, empty lists as ``[]``.  (A numeric
  feature with one value in one record and several in another is an attribute in
  the first and an array in the second: give it a ``/shape`` companion, as
  ``TFRecordWriter`` does for arrays, to make it an array everywhere.)

The index
---------
Each file gets an index: every record's offset and length, its id, the main
image's width, height and format (read from its header while the file streams
by), its attributes and which features are masks, images and arrays.  Planning
therefore reads no pixels, and a sample is read with one ranged read of its
record (a seek locally, an HTTP ``Range`` request remotely), CRCs checked, then
its image feature taken out (``Member(file, offset, length,
codec="tfrecord:<image_key>")``, decoded by ``record_feature``).  A mask,
additional image or array is one more ranged read of the same record (the local
page cache or ``cache_limit_bytes``'s disk cache usually has it).

Where indexes come from, in order:

1. ``<index_dir>/<file name>.tfidx.json``, then ``<file>.tfidx.json`` next to the
   file (also over HTTP), as written by ``write_index`` (``datago``'s own format);
2. the cache: ``<cache_dir>/tfrecord/<hash of the URL and keys>.tfidx.json``;
3. a ``.index`` file of the ``tfrecord`` package (text lines ``offset length``;
   ``<index_dir>/`` or next to the file, named ``<file name>.index`` or
   ``<file name without .tfrecord(s)>.index``): its records are read by offset in
   parallel (``io_concurrency`` threads) to build the full index;
4. else the file is streamed once (``Fetcher.stream``: local reads, or HTTP
   resumed by ``Range`` when it breaks) to build it.

Built indexes are cached (2); ranks of a node that start together build once
(an ``flock``).  An index whose recorded file size differs from the local file
(or, for a cached index, whose mtime differs) is stale and rebuilt; an index
built for other ``image_key``/``id_key`` is not used.  Remote files are not
stat'ed (one index per URL).

Records found bad while indexing (a data CRC that does not match, an Example that
does not parse, no image) are counted in ``stats()["listing"]["skipped"]`` and not
listed; a length whose CRC does not match ends the file there (its framing is
lost; counted ``crc_mismatch``), as does a truncated last record (``truncated``).
Records that go bad after indexing are counted when read
(``stats()["skipped"]["crc_mismatch"]``, ``truncated``, ``bad_member``).

Gzip
----
A gzip file (``compression: "gzip"``, or a ``.gz`` name with ``compression``
unset) cannot be read by offset.  It is decompressed once, as it streams by, into
``<cache_dir>/tfrecord/<hash>.tfrecord`` (indexed in the same pass) and samples are
read from that copy.  The copy takes the decompressed size on the local disk of
every node and is never evicted by datago (delete the folder to reclaim it); an
index of a gzip file counts offsets in the decompressed stream.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import xxhash

from datago._core._crc32c import crc32c, masked_crc32c
# the Example walk (Cython); _Bad: a record or Example that cannot be parsed (bad_member)
from datago._core._protobuf import ExampleError as _Bad, find as _find, parse_example
from datago.errors import ConfigError, DatagoError, DecodeError
from datago.fetch import FetchError, Fetcher, Member, is_remote, redact
from datago.sources.base import SampleRef, Source
from datago.sources.filesystem import MASK_NAMES
from datago.sources.sizes import FORMATS, SizesIndex, _locked, atomic_write, default_cache_dir
from datago.sources.webdataset import expand_urls

__all__ = ["TFRecordSource", "TFRecordWriter", "build_index", "crc32c", "encode_example",
           "masked_crc32c", "parse_example", "read_records", "record_feature", "write_index"]

INDEX_SUFFIX = ".tfidx.json"
INDEX_VERSION = 1
ID_SEP = ":"                          # <file name>:<record index>
MAX_RECORD_BYTES = 1 << 30            # larger records are skipped (too_large), never buffered
MAX_ATTRIBUTE_BYTES = 1024            # binary attribute values kept up to this size
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_EXT = {"jpeg": "jpg", "png": "png", "webp": "webp", "bmp": "bmp", "gif": "gif", "tiff": "tif"}
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")


# ---------------------------------------------------------------------- records
class _CRC(ValueError):
    """A CRC that does not match (``crc_mismatch``)."""


def check_record(data) -> Tuple[bytes, int, int]:
    """(bytes, start, end) of the data of one whole record (length, its CRC, data,
    its CRC), both CRCs checked; ``_CRC`` / ``_Bad``."""
    if not isinstance(data, bytes):
        data = bytes(data)
    n = len(data)
    if n < 16:
        raise _Bad(f"a record is at least 16 bytes, got {n}")
    length, length_crc = _HEADER.unpack_from(data, 0)
    view = memoryview(data)
    if masked_crc32c(view[:8]) != length_crc:
        raise _CRC("the CRC of the record's length does not match")
    if length != n - 16:
        raise _Bad(f"the record says {length} bytes of data, the index {n - 16}")
    (data_crc,) = _FOOTER.unpack_from(data, 12 + length)
    if masked_crc32c(view[12:12 + length]) != data_crc:
        raise _CRC("the CRC of the record's data does not match")
    return data, 12, 12 + length


def frame(record: bytes) -> bytes:
    """``record`` framed as TFRecord stores it (length, CRCs)."""
    head = struct.pack("<Q", len(record))
    return b"".join((head, struct.pack("<I", masked_crc32c(head)), record,
                     struct.pack("<I", masked_crc32c(record))))


def _array(values, shape, dtype_name: Optional[str]) -> np.ndarray:
    """A feature's values as an array of ``shape`` (bytes: raw, uint8 or ``dtype_name``)."""
    if isinstance(values, list):
        if len(values) != 1:
            raise _Bad(f"an array in a bytes feature needs one value, got {len(values)}")
        dt = np.dtype("uint8")
        if dtype_name:
            try:
                dt = np.dtype(dtype_name)
            except TypeError:
                raise _Bad(f"unknown array dtype {dtype_name!r}") from None
            if dt.kind not in "biufc" or dt.hasobject:
                raise _Bad(f"unsupported array dtype {dtype_name!r}")
        raw = values[0]
        if len(raw) % dt.itemsize:
            raise _Bad(f"{len(raw)} bytes are no whole number of {dt} values")
        arr = np.frombuffer(raw, dt).copy()
    else:
        arr = values
    if shape is not None:
        shape = tuple(int(x) for x in shape)
        if any(x < 0 for x in shape) or int(np.prod(shape, dtype=np.int64)) != arr.size:
            raise _Bad(f"shape {list(shape)} does not fit {arr.size} values")
        arr = arr.reshape(shape)
    return arr


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def record_feature(data, feature: str, member=None) -> bytes:
    """The content of feature ``feature`` of one whole record (``Member.codec``
    ``"tfrecord:<feature>"``): both CRCs checked, the Example parsed; a bytes
    feature gives its first value, a numeric one (or one with a ``/shape``
    companion) an ``.npy`` file of its array.  ``FetchError`` (``crc_mismatch``,
    ``bad_member``)."""
    where = str(member) if member is not None else "record"
    try:
        b, start, end = check_record(data)
        key = feature.encode()
        shape_key, dtype_key = key + b"/shape", key + b"/dtype"
        found = _find(b, start, end, (key, shape_key, dtype_key))
        if key not in found:
            raise _Bad(f"no feature {feature!r}")
        values = found[key]
        shape = found.get(shape_key)
        if isinstance(values, list) and shape is None:
            if not values:
                raise _Bad(f"feature {feature!r} has no value")
            return values[0]
        if shape is not None and (not isinstance(shape, np.ndarray) or shape.dtype != np.int64):
            raise _Bad(f"{feature}/shape is not an int64 list")
        dtype = found.get(dtype_key)
        dtype_name = dtype[0].decode("ascii", "replace") \
            if isinstance(dtype, list) and dtype else None
        return _npy(_array(values, shape, dtype_name))
    except _CRC as e:
        raise FetchError(f"{where}: {e}", "crc_mismatch", where) from None
    except _Bad as e:
        raise FetchError(f"{where}: {e}", "bad_member", where) from None


# ---------------------------------------------------------------------- writing
def _enc_varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    return _enc_varint(field << 3 | 2) + _enc_varint(len(payload)) + payload


def _feature_bytes(key: str, value) -> Tuple[int, bytes]:
    """(kind, list message) of a value (1 bytes, 2 float, 3 int64)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return 1, _ld(1, bytes(value))
    if isinstance(value, str):
        return 1, _ld(1, value.encode("utf-8"))
    if isinstance(value, (bool, int, np.integer, np.bool_)):
        return 3, _ld(1, _enc_varint(int(value)))
    if isinstance(value, (float, np.floating)):
        return 2, _ld(1, struct.pack("<f", float(value)))
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f":
            return 2, _ld(1, value.astype("<f4").tobytes()) if value.size else b""
        if value.dtype.kind in "iub":
            return 3, _ld(1, b"".join(_enc_varint(int(v)) for v in value.reshape(-1))) \
                if value.size else b""
        if value.dtype.kind in "SUO":
            value = list(value.reshape(-1))
        else:
            raise TypeError(f"feature {key!r}: arrays of {value.dtype} have no TFRecord kind")
    if isinstance(value, (list, tuple)):
        items = list(value)
        if items and all(isinstance(v, (bytes, bytearray, memoryview, str)) for v in items):
            return 1, b"".join(_ld(1, v.encode("utf-8") if isinstance(v, str) else bytes(v))
                               for v in items)
        if all(isinstance(v, (bool, int, np.integer, np.bool_)) for v in items):
            if not items:
                return 1, b""                    # an empty list: an empty bytes_list
            return 3, _ld(1, b"".join(_enc_varint(int(v)) for v in items))
        if all(isinstance(v, (bool, int, float, np.integer, np.floating)) for v in items):
            return 2, _ld(1, np.asarray(items, dtype="<f4").tobytes())
        raise TypeError(f"feature {key!r}: a list of mixed or unsupported types")
    raise TypeError(f"feature {key!r}: {type(value).__name__} values have no TFRecord kind")


def encode_example(features: Dict[str, Any]) -> bytes:
    """A serialized ``tf.train.Example``: bytes/str values become bytes_list, int
    (and lists of them) int64_list, float (and lists with a float) float_list, a
    NumPy array its flattened values (float kinds float_list, integer and bool
    kinds int64_list) plus a ``<key>/shape`` int64 feature when it is not 1-D with
    two or more values (so the reader gives back its shape); None values are left
    out.  float_list holds float32: a Python float comes back as its nearest
    float32."""
    entries = []
    given = set(features)
    for key, value in features.items():
        if value is None:
            continue
        kind, body = _feature_bytes(key, value)
        entries.append((key, kind, body))
        if isinstance(value, np.ndarray) and (value.ndim != 1 or value.size < 2) \
                and value.ndim != 0 and f"{key}/shape" not in given:
            entries.append((f"{key}/shape", 3,
                            _ld(1, b"".join(_enc_varint(d) for d in value.shape))
                            if value.shape else b""))
    out = b"".join(_ld(1, _ld(1, key.encode("utf-8")) + _ld(2, _ld(kind, body)))
                   for key, kind, body in entries)
    return _ld(1, out)


class TFRecordWriter:
    """Writes a TFRecord file (``gzip``: gzip-compressed, as TensorFlow's
    ``compression_type="GZIP"``).  A context manager; the file appears at ``path``
    only when it is closed without an exception (written to a temporary name beside
    it, then renamed), so an interrupted write never leaves a file that looks
    complete (without ``with``, call ``close()``; ``close(abort=True)`` discards).
    ``offsets``: (offset, length) of each record written, in the
    uncompressed stream (the ``tfrecord`` package's ``.index`` lines)."""

    def __init__(self, path, gzip: bool = False):
        self.path = os.fspath(path)
        folder, name = os.path.split(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        # (not mkstemp: the file gets the umask's permissions, not 0600)
        self._tmp = os.path.join(folder, f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self._raw = os.fdopen(fd, "wb")
        self._gz = None
        if gzip:
            import gzip as _gzip
            self._gz = _gzip.GzipFile(filename="", fileobj=self._raw, mode="wb", mtime=0)
        self._out = self._gz or self._raw
        self._pos = 0
        self.offsets: List[Tuple[int, int]] = []
        self.closed = False

    def write(self, record: bytes) -> None:
        """One record (its bytes; framed and CRC'd here)."""
        framed = frame(bytes(record))
        self._out.write(framed)
        self.offsets.append((self._pos, len(framed)))
        self._pos += len(framed)

    def write_example(self, features: Dict[str, Any]) -> None:
        """One ``tf.train.Example`` record (see ``encode_example``)."""
        self.write(encode_example(features))

    def write_index(self, path=None) -> str:
        """The ``tfrecord`` package's ``.index`` of what was written (default: the
        file's path with ``.index`` appended)."""
        path = os.fspath(path) if path is not None else self.path + ".index"
        text = "".join(f"{o} {n}\n" for o, n in self.offsets).encode()
        atomic_write(path, lambda f: f.write(text))
        return path

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self._gz is not None:
                self._gz.close()
            self._raw.close()
            if not abort:
                os.replace(self._tmp, self.path)
        finally:
            if abort or os.path.exists(self._tmp):
                with contextlib.suppress(OSError):
                    os.unlink(self._tmp)

    def __enter__(self) -> "TFRecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(abort=exc_type is not None)


# ---------------------------------------------------------------------- reading
class _Reader:
    """Exact reads over an iterator of byte chunks (a stream)."""

    def __init__(self, chunks: Iterable[bytes]):
        self._it = iter(chunks)
        self._buf = bytearray()
        self._pos = 0
        self.offset = 0                     # bytes consumed so far

    def _fill(self, n: int) -> None:
        while len(self._buf) - self._pos < n:
            chunk = next(self._it, None)
            if chunk is None:
                return
            if self._pos:
                del self._buf[:self._pos]
                self._pos = 0
            self._buf += chunk

    def read(self, n: int) -> bytes:
        """``n`` bytes (fewer at the end of the stream)."""
        self._fill(n)
        out = bytes(self._buf[self._pos:self._pos + n])
        self._pos += len(out)
        self.offset += len(out)
        return out

    def skip(self, n: int) -> int:
        done = 0
        while done < n:
            avail = len(self._buf) - self._pos
            if not avail:
                self._fill(1)
                avail = len(self._buf) - self._pos
                if not avail:
                    break
            k = min(avail, n - done)
            self._pos += k
            done += k
        self.offset += done
        return done


def _gunzip(chunks: Iterable[bytes], where: str, out=None) -> Iterator[bytes]:
    """Decompressed chunks of a gzip stream (concatenated members too), also written
    to ``out``; ``DatagoError`` when it is not gzip; a stream that ends early ends
    the output there (the reader then finds a truncated record or none)."""
    d = zlib.decompressobj(31)
    try:
        for chunk in chunks:
            while chunk:
                data = d.decompress(chunk)
                if data:
                    if out is not None:
                        out.write(data)
                    yield data
                if d.eof:
                    chunk = d.unused_data
                    d = zlib.decompressobj(31)
                else:
                    chunk = b""
        data = d.flush()
        if data:
            if out is not None:
                out.write(data)
            yield data
    except zlib.error as e:
        raise DatagoError(f"{where}: not a readable gzip file ({e})") from None


def _scan(chunks: Iterable[bytes]) -> Iterator[Tuple[int, int, Optional[bytes], Optional[str]]]:
    """(offset, length, data, problem) of each record of a stream: ``data`` None and
    ``problem`` a reason for a record that cannot be used; after ``crc_mismatch``
    of a length or ``truncated`` the stream ends."""
    r = _Reader(chunks)
    while True:
        offset = r.offset
        head = r.read(12)
        if not head:
            return
        if len(head) < 12:
            yield offset, len(head), None, "truncated"
            return
        length, length_crc = _HEADER.unpack(head)
        if masked_crc32c(head[:8]) != length_crc:
            yield offset, 0, None, "crc_mismatch_length"
            return
        if length > MAX_RECORD_BYTES:
            got = r.skip(length + 4)
            if got < length + 4:
                yield offset, 12 + got, None, "truncated"
                return
            yield offset, length + 16, None, "too_large"
            continue
        data = r.read(length + 4)
        if len(data) < length + 4:
            yield offset, 12 + len(data), None, "truncated"
            return
        (data_crc,) = _FOOTER.unpack_from(data, length)
        payload = data[:length]
        if masked_crc32c(payload) != data_crc:
            yield offset, length + 16, None, "crc_mismatch"
            continue
        yield offset, length + 16, payload, None


def _gzipped(url: str, compression: Optional[str]) -> bool:
    if compression is None:
        return url.split("?")[0].endswith(".gz")
    return compression == "gzip"


def read_records(url: str, fetcher: Optional[Fetcher] = None,
                 compression: Optional[str] = None) -> Iterator[bytes]:
    """The data of each record of a TFRecord file or URL, in order, both CRCs
    checked (``compression`` as in the config).  ``DatagoError`` on a bad CRC or a
    truncated file."""
    fetcher = fetcher or Fetcher()
    chunks: Iterable[bytes] = fetcher.stream(url, cache=False)
    if _gzipped(url, compression):
        chunks = _gunzip(chunks, redact(url))
    for offset, _, data, problem in _scan(chunks):
        if problem is not None:
            raise DatagoError(f"{redact(url)}: record at offset {offset}: {problem}")
        yield data


# ---------------------------------------------------------------------- the index
def _mask_name(key: str) -> Optional[str]:
    """The mask a bytes feature is, or None (see the module docstring)."""
    base = key[:-len("/encoded")] if key.endswith("/encoded") else key
    if base in MASK_NAMES:
        return base
    head, _, last = base.rpartition("/")
    return head if last in MASK_NAMES and head else None


def _is_image(value: bytes) -> bool:
    return value.startswith(_MAGIC) or (value[:4] == b"RIFF" and value[8:12] == b"WEBP")


def _attribute(values) -> Any:
    """A feature's values as an attribute (see the module docstring); ``_SKIP`` when
    it is not one."""
    if isinstance(values, np.ndarray):
        items = values.tolist()
    else:
        items = []
        for v in values:
            try:
                items.append(v.decode("utf-8"))
            except UnicodeDecodeError:
                if len(v) > MAX_ATTRIBUTE_BYTES:
                    return _SKIP
                items.append(v)
    return items[0] if len(items) == 1 else items


_SKIP = object()


def _to_json(value):
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    return value


def _from_json(value):
    if isinstance(value, dict):
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _describe(payload, image_key: str, id_key: Optional[str]) -> dict:
    """What the index keeps of one record's Example: id, size, attributes, parts.
    ``_Bad`` when the Example does not parse."""
    from datago.image import read_header
    feats = parse_example(payload)
    image = feats.get(image_key)
    if not isinstance(image, list) or not image:
        return {"bad": "no_image"}
    out: dict = {}
    if id_key is not None:
        v = feats.get(id_key)
        if isinstance(v, list) and v:
            out["id"] = v[0].decode("utf-8", "replace")
        elif isinstance(v, np.ndarray) and v.size == 1 and v.dtype == np.int64:
            out["id"] = str(int(v[0]))             # an int64 id
    try:
        info = read_header(image[0])
        h, w = info.display_size
        fmt = FORMATS.index(info.format) if info.format in FORMATS else len(FORMATS) - 1
        if w <= 0 or h <= 0:
            w = h = fmt = 0
    except (DecodeError, ValueError):
        w = h = fmt = 0
    out["w"], out["h"], out["f"] = int(w), int(h), int(fmt)
    companions = set()
    for key in feats:
        if key.endswith("/shape") and key[:-6] in feats:
            companions.add(key)
            if key[:-6] + "/dtype" in feats:
                companions.add(key[:-6] + "/dtype")
    attrs, masks, images, arrays = {}, [], [], []
    for key, v in feats.items():
        if key == image_key or key == id_key or key in companions:
            continue
        if f"{key}/shape" in feats:
            arrays.append([key, key])
        elif isinstance(v, list):
            mask = _mask_name(key)
            if len(v) == 1 and mask is not None:
                masks.append([mask, key])
            elif len(v) == 1 and (key.endswith("/encoded") or _is_image(v[0])):
                images.append([key[:-len("/encoded")] if key.endswith("/encoded") else key, key])
            else:
                a = _attribute(v)
                if a is not _SKIP:
                    attrs[key] = _to_json(a)
        elif v.size > 1:
            arrays.append([key, key])
        else:
            attrs[key] = _attribute(v)
    if attrs:
        out["a"] = attrs
    if masks or images or arrays:
        out["p"] = [masks, images, arrays]
    return out


def _entry(offset: int, length: int, payload, problem: Optional[str], image_key: str,
           id_key: Optional[str]) -> dict:
    if problem is None:
        try:
            d = _describe(payload, image_key, id_key)
        except ValueError:                   # _Bad: an Example that does not parse
            d = {"bad": "bad_member"}
    else:
        d = {"bad": problem}
    d["o"], d["n"] = offset, length
    return d


def _source_stat(url: str) -> dict:
    if is_remote(url):
        return {}
    st = os.stat(url)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def build_index(url: str, fetcher: Optional[Fetcher] = None, image_key: str = "image/encoded",
                id_key: Optional[str] = None, compression: Optional[str] = None,
                copy_to: Optional[str] = None) -> dict:
    """Stream one TFRecord file and return its index (see the module docstring);
    ``copy_to``: a gzip file's decompressed bytes are also written there (atomically)."""
    fetcher = fetcher or Fetcher()
    shown = redact(url)
    stat = _source_stat(url)
    records: List[dict] = []
    gz = _gzipped(url, compression)

    def run(out=None) -> int:
        chunks: Iterable[bytes] = fetcher.stream(url, cache=False)
        if gz:
            chunks = _gunzip(chunks, shown, out)
        end = 0
        for offset, length, payload, problem in _scan(chunks):
            records.append(_entry(offset, length, payload, problem, image_key, id_key))
            end = offset + length
        return end

    try:
        if gz and copy_to is not None:
            atomic_write(copy_to, run)
            raw_size = os.path.getsize(copy_to)
        else:
            raw_size = run()
    except OSError as e:
        if isinstance(e, FetchError):
            raise
        raise FetchError(f"{shown}: {e}", "read_error", shown) from None
    return {"version": INDEX_VERSION, "file": os.path.basename(url.split("?")[0]),
            "image_key": image_key, "id_key": id_key, "gzip": gz, "raw_size": raw_size,
            **stat, "records": records}


def _read_text_index(data: bytes) -> List[Tuple[int, int]]:
    out = []
    for line in data.decode("ascii").splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(f"not an 'offset length' line: {line[:60]!r}")
        o, n = int(parts[0]), int(parts[1])
        if o < 0 or n < 16:
            raise ValueError(f"impossible record at {o} of {n} bytes")
        out.append((o, n))
    return out


def _index_by_offsets(url: str, spans: List[Tuple[int, int]], fetcher: Fetcher,
                      image_key: str, id_key: Optional[str], threads: int) -> dict:
    """A file's index from a ``.index`` (offsets, lengths): each record read by
    offset, in parallel."""
    def one(span):
        o, n = span
        try:
            b, start, end = check_record(fetcher.read(Member(url, o, n), cache=False))
            payload = b[start:end]
        except _CRC:
            return _entry(o, n, None, "crc_mismatch", image_key, id_key)
        except _Bad:
            return _entry(o, n, None, "bad_member", image_key, id_key)
        except FetchError as e:
            return _entry(o, n, None, e.reason, image_key, id_key)
        return _entry(o, n, payload, None, image_key, id_key)

    with ThreadPoolExecutor(max(1, min(threads, len(spans) or 1))) as pool:
        records = list(pool.map(one, spans))
    return {"version": INDEX_VERSION, "file": os.path.basename(url.split("?")[0]),
            "image_key": image_key, "id_key": id_key, "gzip": False,
            "raw_size": max((o + n for o, n in spans), default=0), **_source_stat(url),
            "records": records}


def index_path_for(url: str, index_dir: Optional[str]) -> str:
    name = os.path.basename(url.split("?")[0]) + INDEX_SUFFIX
    if index_dir:
        return os.path.join(index_dir, name)
    return url.split("?")[0] + INDEX_SUFFIX


def _text_index_paths(url: str, index_dir: Optional[str]) -> List[str]:
    """Where a ``tfrecord``-package ``.index`` of ``url`` may be: in ``index_dir``
    or beside the file, as ``<name>.index`` or ``<name without .tfrecord(s)>.index``."""
    path = url.split("?")[0]
    folder, _, base = path.rpartition("/")
    names = [base + ".index"]
    for ext in (".tfrecords", ".tfrecord"):
        if base.endswith(ext):
            names.append(base[:-len(ext)] + ".index")
    if index_dir:
        return [os.path.join(index_dir, n) for n in names]
    return [f"{folder}/{n}" if folder else n for n in names]


def write_index(url: str, out_dir: Optional[str] = None, fetcher: Optional[Fetcher] = None,
                image_key: str = "image/encoded", id_key: Optional[str] = None,
                compression: Optional[str] = None) -> str:
    """Build a file's index and write it next to a local file or into ``out_dir``
    (``<file name>.tfidx.json``); returns its path."""
    if out_dir is None and is_remote(url):
        raise ConfigError(f"{redact(url)} is remote: give a folder for its index")
    path = index_path_for(url, out_dir)
    idx = build_index(url, fetcher, image_key, id_key, compression)
    data = json.dumps(idx, separators=(",", ":")).encode()
    atomic_write(path, lambda f: f.write(data))
    return path


# ---------------------------------------------------------------------- the source
class TFRecordSource(Source):
    """Samples of TFRecord files, read by record offset (see the module docstring)."""

    kind = "tfrecord"

    def __init__(self, cfg, fetcher: Optional[Fetcher] = None):
        self.files = expand_urls(cfg.path)
        self.image_key = cfg.image_key
        self.id_key = cfg.id_key
        self.compression = cfg.compression
        self.fetcher = fetcher or Fetcher()
        self.root = "|".join(self.files)
        self.skipped: Dict[str, int] = {}
        self._index_dir = cfg.index_dir
        self._cache = os.path.join(cfg.cache_dir or os.path.dirname(default_cache_dir()),
                                   "tfrecord")
        threads = max(1, min(8, len(self.files)))
        with ThreadPoolExecutor(threads) as pool:
            got = list(pool.map(lambda f: self._load(f, cfg.io_concurrency), self.files))
        self.built = sum(built for _, _, built in got)   # indexes built by reading a file
        self._locs: List[str] = [loc for _, loc, _ in got]
        # ids name a file by its base name, or by its path when two base names agree
        names = [os.path.basename(f.split("?")[0]) for f in self.files]
        if len(set(names)) < len(names):
            names = [redact(f) for f in self.files]
        ids: List[str] = []
        file_of, offset, length, layout = [], [], [], []
        width, height, fmt = [], [], []
        attrs: List[Optional[dict]] = []
        layouts: Dict[str, int] = {}
        self._layouts: List[tuple] = []
        seen = set()
        for f, (idx, _, _) in enumerate(got):
            name = names[f]
            for n, rec in enumerate(idx["records"]):
                bad = rec.get("bad")
                if bad is not None:
                    self._count("crc_mismatch" if bad == "crc_mismatch_length" else bad)
                    continue
                sid = rec.get("id") or f"{name}{ID_SEP}{n}"
                if sid in seen:
                    self._count("duplicate_id")
                    continue
                seen.add(sid)
                ids.append(sid)
                file_of.append(f)
                offset.append(rec["o"])
                length.append(rec["n"])
                width.append(rec.get("w", 0))
                height.append(rec.get("h", 0))
                fmt.append(rec.get("f", 0))
                a = rec.get("a")
                attrs.append({k: _from_json(v) for k, v in a.items()} if a else None)
                parts = rec.get("p")
                if parts:
                    key = json.dumps(parts)
                    if key not in layouts:
                        layouts[key] = len(self._layouts)
                        self._layouts.append(tuple(tuple(tuple(x) for x in group)
                                                   for group in parts))
                    layout.append(layouts[key])
                else:
                    layout.append(-1)
        self._ids = ids
        self._file = np.asarray(file_of, dtype=np.int32)
        self._offset = np.asarray(offset, dtype=np.int64)
        self._length = np.asarray(length, dtype=np.int64)
        self._layout = np.asarray(layout, dtype=np.int32)
        self._attrs = attrs
        self._sizes = SizesIndex(np.asarray(width, dtype=np.int32),
                                 np.asarray(height, dtype=np.int32),
                                 np.asarray(fmt, dtype=np.uint8))

    # ------------------------------------------------------------------ indexes
    def _count(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def _cache_key(self, url: str) -> str:
        return xxhash.xxh64_hexdigest(
            "\0".join((url, self.image_key, self.id_key or "", str(self.compression))).encode())

    def _usable(self, idx, url: str, stat: dict, cached: bool) -> bool:
        if not isinstance(idx, dict) or idx.get("version") != INDEX_VERSION or \
                idx.get("image_key") != self.image_key or idx.get("id_key") != self.id_key or \
                not isinstance(idx.get("records"), list):
            return False
        if stat and "size" in idx and idx["size"] != stat["size"]:
            if not cached:
                warnings.warn(f"datago: the index of {url} is stale (the file's size "
                              "changed); rebuilding it", RuntimeWarning, stacklevel=3)
            return False
        if cached and stat and idx.get("mtime_ns") != stat.get("mtime_ns"):
            return False
        return True

    def _load(self, url: str, threads: int) -> Tuple[dict, str, bool]:
        """(index, location the records are read from, whether it was built) of
        one file."""
        gz = _gzipped(url, self.compression)
        if not is_remote(url) and not os.path.isfile(url):
            raise ConfigError(f"source_config.url: {url!r} is not a file")
        stat = _source_stat(url)
        key = self._cache_key(url)
        cached = os.path.join(self._cache, key + INDEX_SUFFIX)
        copy = os.path.join(self._cache, key + ".tfrecord") if gz else None

        def found() -> Optional[dict]:
            candidates = []
            if self._index_dir:
                candidates.append((index_path_for(url, self._index_dir), False))
            candidates.append((index_path_for(url, None), False))
            candidates.append((cached, True))
            for path, is_cache in candidates:
                data = self.fetcher.read_optional(path)
                if data is None:
                    continue
                try:
                    idx = json.loads(data)
                except ValueError:
                    continue                 # a broken index is rebuilt
                if not self._usable(idx, url, stat, is_cache):
                    continue
                if gz and not (os.path.isfile(copy) and
                               os.path.getsize(copy) == idx.get("raw_size")):
                    continue
                return idx
            return None

        idx = found()
        if idx is not None:
            return idx, copy or url, False
        os.makedirs(self._cache, exist_ok=True)
        with _locked(cached + ".lock"):
            idx = found()                    # another rank of this node built it meanwhile
            if idx is not None:
                return idx, copy or url, False
            idx = None
            if not gz:
                for path in _text_index_paths(url, self._index_dir):
                    data = self.fetcher.read_optional(path)
                    if data is None:
                        continue
                    try:
                        spans = _read_text_index(data)
                    except (ValueError, UnicodeDecodeError) as e:
                        warnings.warn(f"datago: ignoring {redact(path)} ({e})", RuntimeWarning,
                                      stacklevel=2)
                        continue
                    idx = _index_by_offsets(url, spans, self.fetcher, self.image_key,
                                            self.id_key, threads)
                    break
            if idx is None:
                idx = build_index(url, self.fetcher, self.image_key, self.id_key,
                                  self.compression, copy_to=copy)
            data = json.dumps(idx, separators=(",", ":")).encode()
            try:
                atomic_write(cached, lambda f: f.write(data))
            except OSError:
                pass
        problems = [r["bad"] for r in idx["records"] if r.get("bad") in
                    ("truncated", "crc_mismatch_length")]
        if problems:
            what = "truncated record" if problems[-1] == "truncated" else \
                "record whose length fails its CRC"
            warnings.warn(f"datago: {redact(url)} ends in a {what}; the records after it "
                          "are not read", RuntimeWarning, stacklevel=2)
        return idx, copy or url, True

    # ------------------------------------------------------------------ listing
    def __len__(self) -> int:
        return len(self._ids)

    def sample_id(self, i: int) -> str:
        return self._ids[i]

    def ids(self) -> Iterator[str]:
        return iter(self._ids)

    def _member(self, i: int, feature: str, name: str) -> Member:
        return Member(self._locs[self._file[i]], int(self._offset[i]), int(self._length[i]),
                      name, f"tfrecord:{feature}")

    def main_location(self, i: int) -> Member:
        stem = self._ids[i].rsplit("/", 1)[-1]
        ext = _EXT.get(FORMATS[self._sizes.format[i]], "bin")
        return self._member(i, self.image_key, f"{stem}.{ext}")

    def ref(self, i: int) -> SampleRef:
        main = self.main_location(i)
        masks = images = latents = ()
        if self._layout[i] >= 0:
            stem = self._ids[i].rsplit("/", 1)[-1]
            m, im, arr = self._layouts[self._layout[i]]
            masks = tuple((name, self._member(i, key, f"{stem}.{name}")) for name, key in m)
            images = tuple((name, self._member(i, key, f"{stem}.{name}")) for name, key in im)
            latents = tuple((name, self._member(i, key, f"{stem}.{name}.npy"))
                            for name, key in arr)
        a = self._attrs[i]
        return SampleRef(self._ids[i], main, masks, images, (),
                         attributes=dict(a) if a else None, latents=latents)

    def remote(self) -> bool:
        return any(is_remote(loc) for loc in self._locs)

    def known_sizes(self) -> SizesIndex:
        return self._sizes
