"""Split bins: a dataset stored as N bin files plus one index (``source_type: "bins"``).

    import datago.bins
    datago.bins.write("/data/photos-bins", samples, splits=128)
    ds = DatagoDataset({"source_type": "bins",
                        "source_config": {"path": "/data/photos-bins"}, ...})

The idea is splitdataloader's (a few large files instead of millions of small
ones, an index for random access, bin-wise shuffled iteration); the format is
datago's own.

Samples
-------
``write`` and ``BinsWriter.add`` take samples as mappings::

    {"id": "a/cat.jpg",                   # str, required (kept exactly)
     "image": b"...",                     # the main image's encoded bytes, required
     "ext": "jpg",                        # optional; default sniffed from the bytes
     "masks": {"mask": b"..."},           # optional {name: encoded image}
     "images": {"depth": b"..."},         # optional {name: encoded image}: additional images
     "latents": {"npy": b"\\x93NUMPY..."},  # optional {name: .npy (or other) bytes}
     "attributes": {"caption": "a cat"},  # optional JSON-able dict
     "width": 640, "height": 480}         # optional: the displayed size; else read
                                          # from the header (read_header().display_size)

The folder
----------
::

    <dir>/bin-00000.bin ... bin-00127.bin    the bytes (``splits`` files)
    <dir>/index.jsonl                        the index; its presence means "complete"

While a write is in progress the files are ``bin-NNNNN.bin.part`` and
``index.jsonl.part`` (plus a ``.datago-bins.lock`` lock file); the bins are
renamed to their final names first and the index last, so ``index.jsonl`` exists
only once every byte it points at is in place.

Bins.  Sample number ``k`` (in the order the samples were given) goes to bin
``k % splits`` (round-robin): every bin holds ``floor(n / splits)`` or
``ceil(n / splits)`` samples, consecutive samples (often similar: one folder, one
source) are spread over all bins, and the assignment does not depend on
anything but the position, which is what lets an interrupted write resume.  In a
bin, a sample's parts are stored back to back, raw (no framing, no padding): the
main image, then its masks, additional images and latents in name order.

The index (UTF-8 JSON lines, ASCII-escaped):

* line 1, the header:
  ``{"format": "datago-bins", "version": 1, "splits": 128, "bins": ["bin-00000.bin", ...]}``;
* one line per sample:
  ``{"id": "a/cat.jpg", "bin": 5, "offset": 1048576, "parts": [["main", "", "jpg", 51234],
  ["mask", "mask", "png", 812], ["latent", "npy", "npy", 2176]], "width": 640,
  "height": 480, "attributes": {"caption": "a cat"}}`` -- ``parts`` are
  ``[kind, name, extension, length]`` in storage order from ``offset`` (kinds:
  ``main``, ``mask``, ``image``, ``latent``); ``width``/``height`` are the
  displayed size (0 when the header could not be read at write time: the
  sample is then left out of planned epochs, like any unreadable image);
  ``attributes`` is left out when empty;
* the last line, the completion marker:
  ``{"complete": true, "samples": n, "bin_bytes": [size of each bin], "xxh64": "..."}``
  where ``xxh64`` is the hex XXH64 (seed 0) of every byte of the file before
  this line.

A reader (``datago.sources.bins.BinsSource``) accepts the folder only when
``index.jsonl`` exists, its header is this format, its last line is the marker,
the sample count and checksum agree, and (local folders) every bin has the
recorded size; otherwise it raises ``BinsError`` saying what is wrong (an
interrupted write names the ``.part`` files and how to finish it).

Interrupting and resuming
-------------------------
The writer streams: one sample in memory at a time, bin files written as the
samples come.  Stopped in any way (exception, Ctrl-C, a killed process), it
leaves only ``.part`` files, which no reader takes for a dataset.  A new write
into the folder starts over (removing them), or with ``resume=True`` continues:
it keeps the index lines whose bytes are all on disk (a killed process may have
flushed an index line before the bytes it points at), truncates the files to
them, and skips that many samples of the new input -- which must list the same
samples in the same order (the last kept id is checked).
"""

from __future__ import annotations

import json
import numbers
import os
import re
from typing import Any, Iterable, Iterator, List, Mapping, Optional, Tuple

import xxhash

from datago.errors import DatagoError

__all__ = ["BinsError", "BinsWriter", "INDEX_NAME", "read_index_header", "sniff_ext", "write"]

FORMAT = "datago-bins"
VERSION = 1
INDEX_NAME = "index.jsonl"
PART = ".part"
LOCK_NAME = ".datago-bins.lock"
KINDS = ("main", "mask", "image", "latent")
_BIN_RE = re.compile(r"^bin-\d+\.bin(\.part)?$")
_BUFFER = 1 << 16                    # per open bin file (128 bins: 8 MiB of buffers)


class BinsError(DatagoError, ValueError):
    """A bins dataset that cannot be written or read as asked (the message says why)."""


def bin_name(b: int, splits: int) -> str:
    return f"bin-{b:0{max(5, len(str(splits - 1)))}d}.bin"


def sniff_ext(data: bytes, default: str = "bin") -> str:
    """A file extension for encoded bytes, from their magic number."""
    head = bytes(data[:16])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tif"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if len(head) >= 9 and head[8:9] == b"{":          # 8-byte header length, then JSON
        return "safetensors"
    return default


def _check_name(what: str, sid: str, name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise BinsError(f"sample {sid!r}: {what} names must be non-empty strings, got {name!r}")
    return name


def _bytes(what: str, sid: str, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value) if not isinstance(value, bytes) else value
    raise BinsError(f"sample {sid!r}: {what} must be bytes, got {type(value).__name__}")


def _normalize(sample: Mapping[str, Any]) -> Tuple[str, List[Tuple[str, str, str, bytes]],
                                                   Optional[int], Optional[int], dict]:
    """(id, [(kind, name, ext, bytes)], width, height, attributes) of a sample mapping;
    ``BinsError`` for a malformed one."""
    if not isinstance(sample, Mapping):
        raise BinsError(f"a sample must be a mapping (id, image, ...), got {type(sample).__name__}")
    sid = sample.get("id")
    if not isinstance(sid, str) or not sid:
        raise BinsError(f"a sample needs a non-empty string 'id', got {sid!r}")
    unknown = set(sample) - {"id", "image", "ext", "masks", "images", "latents", "attributes",
                             "width", "height"}
    if unknown:
        raise BinsError(f"sample {sid!r}: unknown keys {sorted(unknown)} (valid: id, image, "
                        "ext, masks, images, latents, attributes, width, height)")
    image = _bytes("'image'", sid, sample.get("image"))
    ext = sample.get("ext") or sniff_ext(image)
    if not isinstance(ext, str) or "/" in ext:
        raise BinsError(f"sample {sid!r}: 'ext' must be an extension like 'jpg', got {ext!r}")
    parts = [("main", "", ext.lower().lstrip("."), image)]
    for key, kind in (("masks", "mask"), ("images", "image"), ("latents", "latent")):
        group = sample.get(key) or {}
        if not isinstance(group, Mapping):
            raise BinsError(f"sample {sid!r}: {key!r} must be a mapping name -> bytes")
        for name in sorted(group):
            data = _bytes(f"{key}[{name!r}]", sid, group[name])
            _check_name(key, sid, name)
            parts.append((kind, name, sniff_ext(data, "npy" if kind == "latent" else "bin"),
                          data))
    attributes = sample.get("attributes") or {}
    if not isinstance(attributes, Mapping):
        raise BinsError(f"sample {sid!r}: 'attributes' must be a mapping")
    w, h = sample.get("width"), sample.get("height")
    for v, what in ((w, "width"), (h, "height")):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)
                              or v < 0):
            raise BinsError(f"sample {sid!r}: {what!r} must be an integer >= 0, got {v!r}")
    return sid, parts, None if w is None else int(w), None if h is None else int(h), \
        dict(attributes)


def _display_size(image: bytes) -> Tuple[int, int]:
    """(height, width) of the displayed image; (0, 0) when the header is unreadable."""
    from datago.errors import DecodeError
    from datago.image import read_header
    try:
        h, w = read_header(image).display_size
        return (int(h), int(w)) if w > 0 and h > 0 else (0, 0)
    except (DecodeError, ValueError):
        return 0, 0


def _line(obj: dict) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode("ascii")


def read_index_header(line: bytes, where: str) -> dict:
    """The parsed header line of an index; ``BinsError`` when it is not one."""
    try:
        head = json.loads(line)
    except ValueError:
        head = None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise BinsError(f"{where}: not a datago bins index (its first line is no "
                        f"{FORMAT!r} header)")
    if head.get("version") != VERSION:
        raise BinsError(f"{where}: bins index version {head.get('version')!r}; this datago "
                        f"reads version {VERSION}")
    bins, splits = head.get("bins"), head.get("splits")
    if not isinstance(splits, int) or splits < 1 or not isinstance(bins, list) or \
            len(bins) != splits or not all(isinstance(b, str) and _BIN_RE.match(b) for b in bins):
        raise BinsError(f"{where}: a malformed header (splits/bins)")
    return head


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class BinsWriter:
    """Writes samples into ``splits`` bins plus an index (see the module docstring).

        with BinsWriter("/data/out", splits=128) as w:
            for s in samples[w.done:]:        # w.done > 0 only with resume=True
                w.add(s)
        # committed when the block ends normally; an exception leaves .part files

    ``resume``: continue an interrupted write (else it starts over); ``overwrite``:
    replace a complete dataset already there (else ``BinsError``); ``durable``:
    fsync the files before the commit (off only for throwaway data).
    """

    def __init__(self, target_dir, splits: int = 128, *, resume: bool = False,
                 overwrite: bool = False, durable: bool = True):
        if isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= 100000:
            raise BinsError(f"splits must be an integer in [1, 100000], got {splits!r}")
        self.dir = os.path.abspath(os.fspath(target_dir))
        self.splits = splits
        self.durable = durable
        self.names = [bin_name(b, splits) for b in range(splits)]
        self.index_path = os.path.join(self.dir, INDEX_NAME)
        self.done = 0                     # samples in the index so far
        self.last_id: Optional[str] = None
        self.unreadable = 0               # samples whose header could not be read (width 0)
        self.resumed = 0                  # samples kept from an interrupted write
        self.summary: Optional[dict] = None
        self._files: List[Any] = []
        self._index = None
        self._hash = xxhash.xxh64()
        self._sizes = [0] * splits
        self._lock_fd: Optional[int] = None
        os.makedirs(self.dir, exist_ok=True)
        self._lock()
        try:
            if os.path.exists(self.index_path):
                if not overwrite:
                    raise BinsError(f"{self.dir} already holds a complete bins dataset "
                                    f"({INDEX_NAME}); pass overwrite=True (--overwrite) to "
                                    "replace it")
                os.unlink(self.index_path)     # first: the old dataset is never half-replaced
                resume = False
            if resume and os.path.exists(self.index_path + PART):
                self._resume()
            else:
                self._clear()
                self._start()
        except BaseException:
            self._close_files()
            self._unlock()
            raise

    # ------------------------------------------------------------------ setup
    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:                   # pragma: no cover - not POSIX
            return
        path = os.path.join(self.dir, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(path).st_ino:   # unlinked by its last owner
                raise OSError("lock file replaced")
        except OSError:
            os.close(fd)
            raise BinsError(f"{self.dir}: another bins writer is writing into this folder") \
                from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            try:
                os.unlink(os.path.join(self.dir, LOCK_NAME))   # while still holding it
            except OSError:
                pass
            os.close(self._lock_fd)           # closing releases the flock
            self._lock_fd = None

    def _clear(self) -> None:
        """Remove what an earlier write left (bins, parts); other files are kept."""
        for name in os.listdir(self.dir):
            if _BIN_RE.match(name) or name == INDEX_NAME + PART:
                os.unlink(os.path.join(self.dir, name))

    def _header(self) -> bytes:
        return _line({"format": FORMAT, "version": VERSION, "splits": self.splits,
                      "bins": self.names})

    def _start(self) -> None:
        self._files = [open(os.path.join(self.dir, n + PART), "wb", buffering=_BUFFER)
                       for n in self.names]
        self._index = open(self.index_path + PART, "wb", buffering=_BUFFER)
        self._emit(self._header())

    def _resume(self) -> None:
        part = self.index_path + PART
        with open(part, "rb") as f:
            first = f.readline()
            head = read_index_header(first, part) if first.endswith(b"\n") else None
            if head is None:                  # not even a whole header: start over
                self._clear()
                self._start()
                return
            if head["splits"] != self.splits:
                raise BinsError(f"{self.dir}: the interrupted write has {head['splits']} "
                                f"bins, this one asks for {self.splits}; resume with "
                                f"splits={head['splits']} or start over (resume=False)")
            for b, n in enumerate(self.names):          # bins renamed by a commit cut short
                p = os.path.join(self.dir, n)
                if not os.path.exists(p + PART) and os.path.exists(p):
                    os.replace(p, p + PART)
            have = [os.path.getsize(os.path.join(self.dir, n + PART))
                    if os.path.exists(os.path.join(self.dir, n + PART)) else 0
                    for n in self.names]
            keep_end = len(first)
            ends = [0] * self.splits
            self._hash.update(first)
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                try:
                    rec = json.loads(raw)
                    if "complete" in rec:
                        break                 # a marker whose rename did not happen: redo
                    b, off = int(rec["bin"]), int(rec["offset"])
                    end = off + sum(int(p[3]) for p in rec["parts"])
                    sid = rec["id"]
                except (ValueError, KeyError, TypeError, IndexError):
                    break
                if not 0 <= b < self.splits or off != ends[b] or end > have[b] \
                        or b != self.done % self.splits:
                    break                     # its bytes are not all on disk (or out of order)
                ends[b] = end
                keep_end += len(raw)
                self._hash.update(raw)
                self.done += 1
                self.last_id = sid
                if not rec.get("width"):
                    self.unreadable += 1
        with open(part, "r+b") as f:
            f.truncate(keep_end)
        self._files = []
        for b, n in enumerate(self.names):
            p = os.path.join(self.dir, n + PART)
            f = open(p, "ab" if os.path.exists(p) else "wb", buffering=_BUFFER)
            f.truncate(ends[b])
            f.seek(ends[b])
            self._files.append(f)
        self._sizes = ends
        self._index = open(part, "ab", buffering=_BUFFER)
        self.resumed = self.done

    # ------------------------------------------------------------------ writing
    def _emit(self, line: bytes) -> None:
        self._hash.update(line)
        self._index.write(line)

    def add(self, sample: Mapping[str, Any]) -> None:
        """Append one sample (see the module docstring for its keys)."""
        if self._index is None:
            raise BinsError("this BinsWriter is closed")
        sid, parts, w, h, attributes = _normalize(sample)
        if not w or not h:
            h, w = _display_size(parts[0][3])
        if not w or not h:
            self.unreadable += 1
        b = self.done % self.splits
        f = self._files[b]
        offset = self._sizes[b]
        for _, _, _, data in parts:          # the bytes first, then the line pointing at them
            f.write(data)
        self._sizes[b] = offset + sum(len(p[3]) for p in parts)
        rec = {"id": sid, "bin": b, "offset": offset,
               "parts": [[k, n, e, len(d)] for k, n, e, d in parts],
               "width": int(w or 0), "height": int(h or 0)}
        if attributes:
            rec["attributes"] = attributes
        try:
            line = _line(rec)
        except (TypeError, ValueError) as e:
            raise BinsError(f"sample {sid!r}: attributes are not JSON-serialisable ({e})") \
                from None
        self._emit(line)
        self.done += 1
        self.last_id = sid

    def close(self) -> dict:
        """Commit: bins renamed to their final names, then the index with its
        completion marker.  Returns a summary dict."""
        if self.summary is not None:
            return self.summary
        if self._index is None:
            raise BinsError("this BinsWriter was aborted")
        try:
            for f in self._files:
                f.flush()
                if self.durable:
                    os.fsync(f.fileno())
                f.close()
            self._files = []
            for n in self.names:
                p = os.path.join(self.dir, n)
                os.replace(p + PART, p)
            marker = {"complete": True, "samples": self.done, "bin_bytes": self._sizes,
                      "xxh64": self._hash.hexdigest()}
            self._index.write(_line(marker))
            self._index.flush()
            if self.durable:
                os.fsync(self._index.fileno())
            self._index.close()
            self._index = None
            os.replace(self.index_path + PART, self.index_path)
            if self.durable:
                _fsync_dir(self.dir)
        except BaseException:
            self._close_files()
            raise
        finally:
            self._unlock()
        self.summary = {"path": self.dir, "samples": self.done, "bins": self.splits,
                        "bytes": sum(self._sizes), "unreadable": self.unreadable,
                        "resumed": self.resumed}
        return self.summary

    def _close_files(self) -> None:
        for f in self._files + ([self._index] if self._index is not None else []):
            try:
                f.close()
            except OSError:
                pass
        self._files, self._index = [], None

    def abort(self) -> None:
        """Stop without committing: the ``.part`` files stay (``resume=True`` continues)."""
        self._close_files()
        self._unlock()

    def __enter__(self) -> "BinsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self):                      # never commit from the garbage collector
        try:
            self._unlock()
        except Exception:                    # pragma: no cover
            pass


def write(target_dir, samples: Iterable[Mapping[str, Any]], splits: int = 128, *,
          resume: bool = False, overwrite: bool = False, durable: bool = True,
          progress: Optional[bool] = None, total: Optional[int] = None) -> dict:
    """Write ``samples`` (mappings, see the module docstring) into ``target_dir`` as
    ``splits`` bins plus an index, streaming; returns a summary dict (path,
    samples, bins, bytes, unreadable, resumed).  ``resume=True`` continues an
    interrupted write of the same samples (their first ``done`` are skipped);
    ``progress``: a progress bar on stderr (default: when stderr is a terminal)."""
    import sys
    from datago._progress import Progress
    it: Iterator = iter(samples)
    with BinsWriter(target_dir, splits, resume=resume, overwrite=overwrite,
                    durable=durable) as w:
        if w.done:
            last = None
            for _ in range(w.done):
                try:
                    last = next(it)
                except StopIteration:
                    raise BinsError(f"{w.dir}: the interrupted write has {w.done} samples, "
                                    "the input fewer: not the same samples") from None
            lid = last.get("id") if isinstance(last, Mapping) else None
            if lid != w.last_id:
                raise BinsError(f"{w.dir}: sample {w.done - 1} of the input is {lid!r}, "
                                f"the interrupted write's is {w.last_id!r}: not the same "
                                "samples (start over with resume=False)")
        if progress is None:
            progress = sys.stderr.isatty()
        bar = Progress(total, unit="samples") if progress else None
        if bar is not None and w.done:
            bar.update(w.done)
        for s in it:
            w.add(s)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    return w.summary
