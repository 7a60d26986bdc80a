"""``datago convert``: rewrite a dataset from any source that lists its samples
(folder, index, WebDataset, zip, tfrecord, bins, db) as split bins, WebDataset
shards with their indexes, or TFRecord files.

    datago convert /data/photos /data/photos-bins --format bins --splits 128
    datago convert cfg.json /data/wds --format webdataset --shard-size 2000 --workers 8
    datago convert /data/photos /data/tfr --format tfrecord --reencode jpeg:95

    from datago.convert import convert
    convert("/data/photos", "/data/photos-bins", "bins", workers=8)

SRC is a folder (a folder of images; a folder written by ``datago.bins`` is read
as bins), a JSON config file, or (from Python) a ``DatagoConfig`` or its dict;
only its source is used.

What is kept
------------
Every sample's main image bytes (exactly, unless ``reencode``), its masks,
additional images and latents (bytes as they are), and its attributes (the
source's own, merged with its ``.json``/``.txt`` sidecars, as the data loader
sees them).  Sizes the source knows are kept; others are read from the headers.

* ``bins``: ``datago.bins`` (ids kept exactly).
* ``webdataset``: ``shard-000000.tar`` ... (``shard_samples`` samples each) and
  next to each its index (``shard-000000.tar.idx.json``, what ``datago index``
  writes).  Members follow the folder conventions: ``<key>.<ext>`` (the main
  image), ``<key>.<name>.<ext>`` (masks: ``<key>.mask.png``; additional images),
  ``<key>.npy`` / ``<key>.<name>.npy`` (latents), ``<key>.json`` (the attributes,
  when any).  The key is ``wds_key(id)``: the id without a URL's scheme and
  query, ``..`` or leading ``/``, without its image extension, the other dots
  of its file name made ``_`` (a key ends at the first dot); a key already
  taken gets ``_1``, ``_2``, ...  The WebDataset source's sample id is that key.
* ``tfrecord``: ``shard-000000.tfrecord`` ... of ``tf.train.Example`` records
  (``datago.sources.tfrecord.TFRecordWriter``), each with its index
  (``shard-000000.tfrecord.tfidx.json``, built for ``id_key: "image/filename"``).
  Read them back with ``{"source_type": "tfrecord", "source_config": {"path":
  "DST/shard-*.tfrecord", "id_key": "image/filename"}}``.  Features, in the
  TFRecord source's conventions: ``image/encoded`` (the main image),
  ``image/filename`` (the id), ``mask/encoded`` / ``seg/encoded`` (masks; other
  mask names ``<name>/mask``), ``<name>/encoded`` (additional images), a latent
  as its raw array bytes under its name with ``<name>/shape`` and
  ``<name>/dtype`` (read back as the same array: the ``.npy`` bytes are equal
  for C-ordered arrays), and one feature per attribute (``_tf_attribute``:
  str, int, bytes and lists of two or more strings come back as they were,
  floats as float32 (TFRecord's float), bools as ints, other values as their
  JSON text).  A name taken twice gets a ``masks/``,
  ``images/``, ``latents/`` or ``attributes/`` prefix.

Work
----
The main process lists the source and writes, in the source's order (the output
does not depend on ``workers``); ``workers`` processes read the samples' bytes
(and re-encode them) in chunks, a bounded number ahead.  A sample that cannot be
read is left out and counted by reason (``summary["failed"]``).  A progress bar
goes to stderr.

Interrupted?  ``bins`` leaves ``.part`` files that no reader takes for a
dataset; ``webdataset``/``tfrecord`` commit shard by shard (a ``.part`` name
until a shard is complete) and keep ``.datago-convert.json`` in DST until the
end.  ``resume=True`` (``--resume``) continues where it stopped (same SRC and
options), anything else starts over (``overwrite`` to replace a finished
output).
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import time
from collections import deque
from typing import Any, Dict, Iterator, List, Optional, Tuple

from datago.errors import ConfigError, DatagoError

__all__ = ["FORMATS", "convert", "load_config", "parse_reencode", "wds_key"]

FORMATS = ("bins", "webdataset", "tfrecord")
REENCODE = {"jpeg": "jpg", "jpg": "jpg", "png": "png", "webp": "webp"}
MANIFEST = ".datago-convert.json"
CHUNK = 16                       # samples per task sent to a worker process


# ---------------------------------------------------------------------- inputs
def load_config(src):
    """The ``DatagoConfig`` of SRC (see the module docstring); ``ConfigError``
    naming SRC when it is none of them."""
    from datago.config import DatagoConfig
    if isinstance(src, DatagoConfig):
        return src
    if isinstance(src, dict):
        return DatagoConfig.from_dict(src)
    if not isinstance(src, (str, os.PathLike)):
        raise ConfigError(f"SRC must be a folder, a JSON config file or a config, "
                          f"got {type(src).__name__}")
    path = os.fspath(src)
    if os.path.isdir(path):
        from datago.bins import INDEX_NAME, PART
        for index in (os.path.join(path, INDEX_NAME), os.path.join(path, INDEX_NAME + PART)):
            if os.path.isfile(index):              # (an interrupted one: the reader says so)
                with open(index, "rb") as f:
                    if f.read(40).startswith(b'{"format":"datago-bins"'):
                        return DatagoConfig.from_dict({"source_type": "bins",
                                                       "source_config": {"path": path}})
        return DatagoConfig.from_dict({"source_type": "file",
                                       "source_config": {"root_path": path}})
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"SRC {path}: cannot read it as a JSON config ({e})") from None
        try:
            return DatagoConfig.from_json(text)
        except ConfigError as e:
            raise ConfigError(f"SRC {path}: {e}") from None
    raise ConfigError(f"SRC {path!r}: no such folder or file (give a folder of images, a "
                      "bins folder, or a JSON config file)")


def parse_reencode(spec: Optional[str]) -> Optional[Tuple[str, int]]:
    """``"jpeg:95"`` -> ("jpg", 95); ``"png"`` -> ("png", 0); None -> None."""
    if spec is None or spec == "":
        return None
    name, _, q = str(spec).partition(":")
    ext = REENCODE.get(name.lower())
    if ext is None:
        raise ConfigError(f"reencode {spec!r}: the format must be one of jpeg, png, webp "
                          "(e.g. jpeg:95)")
    if not q:
        return ext, 95 if ext != "png" else 0
    if ext == "png" or not q.isdigit() or not 1 <= int(q) <= 100:
        raise ConfigError(f"reencode {spec!r}: the quality is 1-100 for jpeg/webp "
                          "(png takes none)")
    return ext, int(q)


# ---------------------------------------------------------------------- reading
_STATE: Dict[str, Any] = {}             # a worker process's fetcher and options


def _ext_of(loc) -> str:
    from datago._engine import _location_name
    from datago.sources.filesystem import IMAGE_EXTENSIONS
    name = _location_name(loc)
    ext = name.rsplit("/", 1)[-1].rpartition(".")[2] if "." in name.rsplit("/", 1)[-1] else ""
    return ext if ext in IMAGE_EXTENSIONS else ""


def _reencode(data: bytes, reencode: Tuple[str, int]) -> bytes:
    """The image decoded by datago (orientation applied, alpha composited as the
    loader does) and encoded by Pillow."""
    from PIL import Image
    from datago.image import decode
    arr = decode(data, mode="RGB")
    buf = io.BytesIO()
    ext, q = reencode
    im = Image.fromarray(arr)
    if ext == "jpg":
        im.save(buf, "JPEG", quality=q)
    elif ext == "webp":
        im.save(buf, "WEBP", quality=q)
    else:
        im.save(buf, "PNG")
    return buf.getvalue()


def _read_one(ref, hw, fetcher, reencode) -> dict:
    """A sample dict (``datago.bins``'s) of one SampleRef, or ``{"error": ...}``."""
    from datago._engine import SampleError, merge_attributes
    from datago.bins import sniff_ext
    from datago.errors import DecodeError
    try:
        data = fetcher.read(ref.path)
        masks = {name: fetcher.read(p) for name, p in ref.masks}
        images = {name: fetcher.read(p) for name, p in ref.images}
        texts = [(name, fetcher.read(p), p) for name, p in ref.texts]
        latents = {name: fetcher.read(p) for name, p in ref.latents}
        attributes = merge_attributes(ref, texts)
        ext = _ext_of(ref.path) or sniff_ext(data, "jpg")
        if reencode is not None:
            data, ext = _reencode(data, reencode), reencode[0]
    except SampleError as e:
        return {"error": e.reason, "id": ref.id, "message": str(e)}
    except DecodeError as e:
        return {"error": "decode_error", "id": ref.id, "message": str(e)}
    except OSError as e:                                  # FetchError too
        return {"error": getattr(e, "reason", "read_error"), "id": ref.id, "message": str(e)}
    out = {"id": ref.id, "image": data, "ext": ext, "masks": masks, "images": images,
           "latents": latents, "attributes": attributes}
    if hw is not None and hw[0] > 0 and hw[1] > 0:
        out["width"], out["height"] = int(hw[1]), int(hw[0])
    return out


def _work(chunk, fetcher, reencode, threads: int = 1) -> list:
    """[(source index, sample dict)] for a chunk of (index, ref, (height, width) or None)."""
    if threads > 1 and len(chunk) > 1:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(min(threads, len(chunk))) as pool:
            got = list(pool.map(lambda c: _read_one(c[1], c[2], fetcher, reencode), chunk))
    else:
        got = [_read_one(ref, hw, fetcher, reencode) for _, ref, hw in chunk]
    return [(c[0], s) for c, s in zip(chunk, got)]


def _init_worker(fetcher, reencode, threads) -> None:
    _STATE.update(fetcher=fetcher, reencode=reencode, threads=threads)


def _work_in_worker(chunk) -> list:
    return _work(chunk, _STATE["fetcher"], _STATE["reencode"], _STATE["threads"])


def _samples(source, fetcher, indices, sizes, workers: int, reencode,
             threads: int) -> Iterator[Tuple[int, dict]]:
    """(source index, sample dict or error dict) in the order of ``indices``."""
    def chunks():
        for k in range(0, len(indices), CHUNK):
            out = []
            for i in indices[k:k + CHUNK]:
                hw = (int(sizes.height[i]), int(sizes.width[i])) if sizes is not None else None
                out.append((int(i), source.ref(int(i)), hw))
            yield out

    if workers <= 1:
        for chunk in chunks():
            yield from _work(chunk, fetcher, reencode, threads)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(fetcher, reencode, threads))
    pending: deque = deque()
    try:
        it = chunks()
        for chunk in it:
            pending.append(pool.submit(_work_in_worker, chunk))
            if len(pending) >= 4 * workers:             # bounded: a few chunks ahead
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------- webdataset
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")


def wds_key(sample_id: str) -> str:
    """A WebDataset key for a sample id (see the module docstring)."""
    s = sample_id.replace("\\", "/")
    if "://" in s:                           # a URL: no scheme, query or fragment
        s = s.split("://", 1)[1].split("?", 1)[0].split("#", 1)[0]
    parts = [p for p in s.split("/") if p not in ("", ".", "..")]
    if not parts:
        return "sample"
    base = parts[-1]
    stem, dot, ext = base.rpartition(".")
    if dot and stem and ext.lower() in _IMAGE_EXTS:
        base = stem
    base = base.replace(".", "_")
    parts = [p.lstrip(".") or "_" for p in parts[:-1]] + [base or "sample"]
    key = "/".join(parts)
    if key.startswith("__"):                # WebDataset's __key__-style names are not samples
        key = "_" + key.lstrip("_")
    return key


def _safe(name: str) -> str:
    return name.replace("/", "_").replace("\\", "_") or "_"


def wds_members(key: str, sample: dict) -> List[Tuple[str, bytes]]:
    """(member name, bytes) of one sample, the main image first."""
    from datago.bins import sniff_ext
    out = [(f"{key}.{sample['ext']}", sample["image"])]
    for name, data in sorted(sample.get("masks", {}).items()):
        out.append((f"{key}.{_safe(name)}.{sniff_ext(data, 'png')}", data))
    for name, data in sorted(sample.get("images", {}).items()):
        out.append((f"{key}.{_safe(name)}.{sniff_ext(data, 'png')}", data))
    for name, data in sorted(sample.get("latents", {}).items()):
        ext = sniff_ext(data, "npy")
        out.append((f"{key}.{ext}" if name == ext else f"{key}.{_safe(name)}.{ext}", data))
    if sample.get("attributes"):
        out.append((f"{key}.json", json.dumps(sample["attributes"], default=str).encode()))
    return out


class _Shards:
    """Shard files written one at a time under ``.part`` names, each committed
    (renamed, indexed) when full; a manifest in DST says how far it got."""

    suffix = ""

    def __init__(self, dst: str, shard_samples: int, meta: dict, resume: bool,
                 overwrite: bool):
        self.dst = os.path.abspath(dst)
        self.shard_samples = shard_samples
        self.meta = meta
        self.manifest = os.path.join(self.dst, MANIFEST)
        self.shards: List[str] = []
        self.count = 0                     # samples in the open shard
        self.written = 0
        self.start = 0                     # source index to start from
        self._f = None
        os.makedirs(self.dst, exist_ok=True)
        old = None
        if os.path.exists(self.manifest):
            try:
                with open(self.manifest) as f:
                    old = json.load(f)
            except (OSError, ValueError):
                old = None
        existing = self._existing()
        for name in os.listdir(self.dst):      # temporary files of writes cut short
            if name.startswith(".datago-") and name.endswith(".tmp"):
                os.unlink(os.path.join(self.dst, name))
        if resume and old is not None:
            for k in ("format", "shard_samples", "source_samples", "reencode"):
                if old.get(k) != meta.get(k):
                    raise DatagoError(f"{self.dst}: cannot resume: the interrupted conversion "
                                      f"had {k}={old.get(k)!r}, this one {meta.get(k)!r}")
            self.shards = [os.path.join(self.dst, s) for s in old["shards"]]
            self.start, self.written = int(old["next"]), int(old["written"])
            keep = set(old["shards"])
            for name in existing:
                if name not in keep:
                    self._remove(name)
        else:
            if existing and old is None and not overwrite:
                raise DatagoError(f"{self.dst} already holds {len(existing)} shard files of a "
                                  "finished conversion; pass overwrite=True (--overwrite) to "
                                  "replace them, or choose another DST")
            for name in existing:
                self._remove(name)
        self._save_manifest()

    def _existing(self) -> List[str]:
        return sorted(n for n in os.listdir(self.dst) if n.startswith("shard-") and
                      (n.endswith(self.suffix) or n.endswith(self.suffix + ".part")))

    def _remove(self, name: str) -> None:
        for p in (name, name + ".idx.json", name + ".tfidx.json"):
            try:
                os.unlink(os.path.join(self.dst, p))
            except FileNotFoundError:
                pass

    def _save_manifest(self, next_index: Optional[int] = None) -> None:
        from datago.sources.sizes import atomic_write
        state = dict(self.meta, shards=[os.path.basename(s) for s in self.shards],
                     next=self.start if next_index is None else next_index,
                     written=self.written)
        atomic_write(self.manifest, lambda f: f.write(json.dumps(state).encode()))

    def path(self, k: int) -> str:
        return os.path.join(self.dst, f"shard-{k:06d}{self.suffix}")

    def add(self, index: int, sample: dict) -> None:
        if self._f is None:
            self._open(self.path(len(self.shards)) + ".part")
        self._write(sample)
        self.count += 1
        self.written += 1
        if self.count >= self.shard_samples:
            self._commit(index + 1)

    def _commit(self, next_index: int) -> None:
        if self._f is None:
            return
        final = self.path(len(self.shards))
        self._close()
        os.replace(final + ".part", final)
        self._index(final)
        self.shards.append(final)
        self.count = 0
        self._save_manifest(next_index)

    def finish(self, next_index: int) -> None:
        self._commit(next_index)
        os.unlink(self.manifest)

    def abort(self) -> None:
        if self._f is not None:
            try:
                self._close()
            except Exception:
                pass
            self._f = None

    # per format
    def _open(self, path: str) -> None:
        raise NotImplementedError

    def _write(self, sample: dict) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def _index(self, path: str) -> None:
        pass


class _Tars(_Shards):
    suffix = ".tar"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._keys: set = set()
        import xxhash
        self._hash = xxhash.xxh64_intdigest
        for shard in self.shards:            # keys of the shards kept by a resume
            try:
                with open(shard + ".idx.json") as f:
                    for s in json.load(f)["samples"]:
                        self._keys.add(self._hash(s["key"].encode("utf-8", "surrogatepass")))
            except (OSError, ValueError, KeyError):
                raise DatagoError(f"{shard}: its index is missing or unreadable; cannot "
                                  "resume (start over without --resume)") from None

    def _open(self, path: str) -> None:
        self._raw = open(path, "wb")
        self._f = tarfile.open(fileobj=self._raw, mode="w", format=tarfile.PAX_FORMAT)

    def _key(self, sid: str) -> str:
        key = base = wds_key(sid)
        n = 0
        while self._hash(key.encode("utf-8", "surrogatepass")) in self._keys:
            n += 1
            key = f"{base}_{n}"
        self._keys.add(self._hash(key.encode("utf-8", "surrogatepass")))
        return key

    def _write(self, sample: dict) -> None:
        for name, data in wds_members(self._key(sample["id"]), sample):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._f.addfile(info, io.BytesIO(data))

    def _close(self) -> None:
        self._f.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        self._f = None

    def _index(self, path: str) -> None:
        from datago.sources.webdataset import write_index
        write_index(path, reference_image_type="jpg")


def _tf_attribute(v):
    """An attribute as a feature value the TFRecord source reads back as it was:
    str, int (and bool, read back as int), float (stored as float32, as TFRecord
    does), bytes, a list of two or more strings; anything else (other lists,
    dicts, None) as its JSON text."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int) and -(1 << 63) <= v < (1 << 63):
        return v
    if isinstance(v, (str, float, bytes)):
        return v
    if isinstance(v, (list, tuple)) and len(v) >= 2 and all(isinstance(x, str) for x in v):
        return list(v)
    return json.dumps(v, default=str)


def _tf_features(sample: dict) -> dict:
    """The ``tf.train.Example`` features of one sample (see the module docstring)."""
    import numpy as np
    from datago.sources.filesystem import MASK_NAMES
    feats: Dict[str, Any] = {"image/encoded": sample["image"],
                             "image/filename": sample["id"].encode("utf-8", "surrogatepass")}

    def put(key: str, value, prefix: str) -> str:
        while key in feats or f"{key}/shape" in feats:
            key = f"{prefix}/{key}"
        feats[key] = value
        return key

    for name, data in sorted((sample.get("masks") or {}).items()):
        put(f"{name}/encoded" if name in MASK_NAMES else f"{name}/mask", data, "masks")
    for name, data in sorted((sample.get("images") or {}).items()):
        put(f"{name}/encoded", data, "images")
    for name, data in sorted((sample.get("latents") or {}).items()):
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError):
            arr = np.frombuffer(data, np.uint8)        # not a .npy: its bytes, as uint8
        key = put(name, np.ascontiguousarray(arr).tobytes(), "latents")
        feats[f"{key}/shape"] = [int(d) for d in arr.shape] or [1]
        feats[f"{key}/dtype"] = arr.dtype.str.encode()
    for k, v in (sample.get("attributes") or {}).items():
        put(str(k), _tf_attribute(v), "attributes")
    return feats


class _TFRecords(_Shards):
    suffix = ".tfrecord"

    def _open(self, path: str) -> None:
        from datago.sources.tfrecord import TFRecordWriter
        self._path = path
        self._f = TFRecordWriter(path)

    def _write(self, sample: dict) -> None:
        self._f.write_example(_tf_features(sample))

    def _close(self) -> None:
        self._f.close()                       # renamed from its temporary name to .part
        with open(self._path, "rb+") as f:
            os.fsync(f.fileno())
        self._f = None

    def _index(self, path: str) -> None:
        from datago.sources.tfrecord import write_index
        write_index(path, image_key="image/encoded", id_key="image/filename")


def _tfrecord_writer_available() -> Optional[str]:
    try:
        import datago.sources.tfrecord as tfrecord
    except ImportError as e:
        return f"TFRecord output needs datago.sources.tfrecord ({e})"
    if not hasattr(tfrecord, "TFRecordWriter"):
        return "TFRecord output needs datago.sources.tfrecord.TFRecordWriter"
    return None


# ---------------------------------------------------------------------- convert
def convert(src, dst, format: str = "bins", *, reencode: Optional[str] = None,
            workers: Optional[int] = None, splits: int = 128, shard_samples: int = 1000,
            resume: bool = False, overwrite: bool = False, limit: Optional[int] = None,
            progress: Optional[bool] = None, durable: bool = True) -> dict:
    """Convert SRC to ``format`` in the folder DST (see the module docstring).

    ``reencode``: None (keep the bytes) or ``"jpeg:95"``, ``"webp:90"``, ``"png"``;
    ``workers``: reading processes (default: the available CPUs, at most 8; 1: in
    this process); ``splits``: bins; ``shard_samples``: samples per shard
    (webdataset, tfrecord); ``limit``: the first N samples only; ``progress``: a
    progress bar on stderr (default: when stderr is a terminal).

    Returns a summary: format, dst, samples (written), failed ({reason: count}),
    failed_ids (the first 20), seconds, and per format bins/bytes or shards.
    """
    t0 = time.perf_counter()
    if format not in FORMATS:
        raise ConfigError(f"format {format!r}: must be one of {', '.join(FORMATS)}")
    recode = parse_reencode(reencode)
    for name, v, lo in (("splits", splits, 1), ("shard_samples", shard_samples, 1),
                        ("limit", limit, 1), ("workers", workers, 0)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
    if format == "tfrecord":
        missing = _tfrecord_writer_available()
        if missing:
            raise ConfigError(missing)
    cfg = load_config(src)
    if getattr(cfg.source, "streaming", False):
        raise ConfigError("source_config.streaming: convert needs a source that lists its "
                          "samples; set streaming to false")
    dst = os.fspath(dst)
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ConfigError(f"DST {dst!r} exists and is not a folder")
    if cfg.source_type == "bins" and os.path.abspath(dst) == os.path.abspath(cfg.source.path):
        raise ConfigError("DST is SRC: convert into another folder")
    if cfg.source_type == "file" and os.path.abspath(dst) == os.path.abspath(cfg.source.root_path):
        raise ConfigError("DST is SRC: convert into another folder")
    from datago.sources import make_source
    from datago.sharding import available_cpus
    fetcher, source = make_source(cfg)
    n = len(source) if limit is None else min(limit, len(source))
    sizes = source.known_sizes()
    remote = source.kind != "file" and source.remote()
    threads = min(16, cfg.source.io_concurrency) if remote and \
        hasattr(cfg.source, "io_concurrency") else 1
    if workers is None:
        workers = min(8, available_cpus())
    failed: Dict[str, int] = {}
    failed_ids: List[str] = []
    summary: Dict[str, Any] = {"format": format, "dst": os.path.abspath(dst),
                               "source_type": cfg.source_type, "source_samples": len(source)}
    if progress is None:
        progress = sys.stderr.isatty()
    from datago._progress import Progress
    bar = Progress(n, unit="samples") if progress else None

    def stream(start: int) -> Iterator[Tuple[int, dict]]:
        if bar is not None and start:
            bar.update(start)
        for i, s in _samples(source, fetcher, list(range(start, n)), sizes, workers, recode,
                             threads):
            if bar is not None:
                bar.update(1)
            if "error" in s:
                failed[s["error"]] = failed.get(s["error"], 0) + 1
                if len(failed_ids) < 20:
                    failed_ids.append(s["id"])
                continue
            yield i, s

    if format == "bins":
        from datago.bins import BinsWriter
        with BinsWriter(dst, splits, resume=resume, overwrite=overwrite, durable=durable) as w:
            start = 0
            if w.done:
                start = _resume_position(source, w.last_id, w.done, n)
            for _, s in stream(start):
                w.add(s)
        summary.update(w.summary)
        summary["dst"] = summary.pop("path")
    else:
        meta = {"format": format, "shard_samples": shard_samples, "source_samples": n,
                "reencode": reencode}
        klass = _Tars if format == "webdataset" else _TFRecords
        w = klass(dst, shard_samples, meta, resume, overwrite)
        resumed = w.written
        try:
            for i, s in stream(w.start):
                w.add(i, s)
            w.finish(n)
        except BaseException:
            w.abort()
            raise
        summary.update(shards=[os.path.basename(p) for p in w.shards], samples=w.written,
                       resumed=resumed)
        if w.shards and format == "webdataset":
            summary["pattern"] = os.path.join(
                w.dst, f"shard-{{000000..{len(w.shards) - 1:06d}}}.tar")
    if bar is not None:
        bar.close()
    summary.update(failed=failed, failed_ids=failed_ids,
                   seconds=round(time.perf_counter() - t0, 3))
    return summary


def _resume_position(source, last_id: str, done: int, n: int) -> int:
    """The source index after the sample ``last_id`` (the interrupted write's last):
    at ``done - 1`` or later (failed samples are not written)."""
    for j in range(max(0, done - 1), n):
        if source.sample_id(j) == last_id:
            return j + 1
    raise DatagoError(f"cannot resume: the interrupted write's last sample {last_id!r} is not "
                      "in SRC at or after its position: not the same SRC (start over without "
                      "--resume)")


# ---------------------------------------------------------------------- CLI
def run_convert(args) -> int:
    """``datago convert`` (see ``datago.cli``)."""
    try:
        s = convert(args.src, args.dst, args.format, reencode=args.reencode,
                    workers=args.workers, splits=args.splits, shard_samples=args.shard_size,
                    resume=args.resume, overwrite=args.overwrite, limit=args.limit,
                    progress=not args.quiet)
    except (DatagoError, OSError) as e:
        print(f"datago convert: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("datago convert: interrupted; --resume continues it", file=sys.stderr)
        return 130
    what = {"bins": lambda: f"{s['bins']} bins, {s['bytes'] / 1e6:.1f} MB",
            "webdataset": lambda: f"{len(s['shards'])} shards ({s.get('pattern', '')})",
            "tfrecord": lambda: f"{len(s['shards'])} files"}[s["format"]]()
    print(f"{s['dst']}: {s['samples']} samples as {s['format']} ({what}) in "
          f"{s['seconds']:.1f} s")
    if s["failed"]:
        print("left out (could not be read): " + ", ".join(
            f"{k} {v}" for k, v in sorted(s["failed"].items()))
            + f"; e.g. {', '.join(map(repr, s['failed_ids'][:3]))}")
    return 0
