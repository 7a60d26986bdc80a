"""The per-worker engine: a bounded thread pool that reads, decodes into batch slots,
and groups samples by bucket.

Flow (deterministic whatever the thread timing):

1. *load* tasks (pool threads) read a sample's files and its image header;
2. the consumer takes load results in submission order, picks the bucket and a
   slot in that bucket's open batch, and submits a *decode* task that writes the
   image (and masks, additional images) straight into the batch tensors;
3. a batch whose slots are all assigned is *closed*; closed batches are yielded
   in closing order once their decode tasks are done.

At most ``buffer`` samples are being loaded or decoded at once.  A sample that
fails (unreadable file, corrupt data, bad sidecar) is counted under its reason and
skipped (``on_error="skip"``) or raised (``"raise"``); a failure after its slot was
assigned leaves a hole that is closed up when the batch is finished (the batch is
then one sample short).  Leaving the iterator (exhaustion, ``break``, garbage
collection, an exception) shuts the pool down; no thread outlives it.
"""

from __future__ import annotations

import io
import json
import threading
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from datago import _shm
from datago._prefetch import prefetched
from datago.buckets import Bucket, nearest_bucket
from datago.errors import DatagoError, DecodeError, ImageTooLargeError
from datago.fetch import read_file
from datago.image import (DEFAULT_MAX_PIXELS, MaskMismatchError, decode_to_bucket,
                          decode_with_warning, read_header)
from datago.sources.filesystem import SampleRef

# skip reasons, in the order of the stats counters
REASONS = ("read_error", "decode_error", "too_large", "bad_attributes", "bad_latent",
           # remote locations (datago.fetch)
           "http_4xx", "http_5xx", "http_429", "timeout", "truncated", "reset", "connect",
           "wrong_content_type", "redirect", "range_ignored", "bad_range", "stale_index",
           # archive members (datago._codecs)
           "bad_member", "crc_mismatch",
           # a mask that cannot be aligned with its image or read as asked
           "mask_mismatch")
COUNTERS = ("samples", "batches", "bytes", "dropped", "t_read", "t_decode", "t_wait",
            "padded", "dropped_remainder", "early_flushed", "cache_hits", "cache_misses",
            "shm_created", "shm_reused", "shm_unpooled", "shards_failed",
            "stream_ignored_members", "stream_too_large_members", "stream_no_image",
            "stream_pages", "stream_random_repeat", "decoded_with_warnings") + \
    tuple(f"source_{k}" for k in range(16)) + \
    tuple(f"skipped_{r}" for r in REASONS)


class SampleError(DatagoError):
    """A sample could not be loaded; ``reason`` is one of REASONS.

    Also constructible from its message alone, which is how DataLoader re-raises a
    worker's exception in the main process (so it stays a DatagoError there).
    """

    def __init__(self, sample_id: str, reason: Optional[str] = None,
                 cause: Optional[BaseException] = None):
        super().__init__(sample_id if reason is None else f"sample {sample_id!r}: {reason}: {cause}")
        self.sample_id = sample_id if reason is not None else None
        self.reason = reason
        self.cause = cause


class Stats:
    """Counters of one worker, in a row of a (possibly shared-memory) float64 tensor."""

    def __init__(self, row: torch.Tensor):
        self.row = row
        self._values = row.numpy()          # the same memory: ~1 us an add, not torch's ~20
        self._lock = threading.Lock()
        self._idx = {name: i for i, name in enumerate(COUNTERS)}

    def add(self, name: str, value: float = 1.0) -> None:
        with self._lock:
            self._values[self._idx[name]] += value


def summarize(table: torch.Tensor) -> dict:
    """Sum the per-worker rows into the public stats dict."""
    tot = table.sum(dim=0).tolist()
    v = dict(zip(COUNTERS, tot))
    return {
        "samples": int(v["samples"]),
        "batches": int(v["batches"]),
        "bytes_read": int(v["bytes"]),
        "skipped": {r: int(v[f"skipped_{r}"]) for r in REASONS if v[f"skipped_{r}"]},
        "skipped_total": int(sum(v[f"skipped_{r}"] for r in REASONS)),
        "dropped_last": int(v["dropped"]),
        "padded": int(v["padded"]),
        "dropped_remainder": int(v["dropped_remainder"]),
        "early_flushed": int(v["early_flushed"]),
        "decoded_with_warnings": int(v["decoded_with_warnings"]),
        "cache": {"hits": int(v["cache_hits"]), "misses": int(v["cache_misses"]),
                  "hit_ratio": (v["cache_hits"] / (v["cache_hits"] + v["cache_misses"])
                                if v["cache_hits"] + v["cache_misses"] else None)},
        "streaming": {"shards_failed": int(v["shards_failed"]),
                      "no_image": int(v["stream_no_image"]),
                      "ignored_members": int(v["stream_ignored_members"]),
                      "too_large_members": int(v["stream_too_large_members"]),
                      "pages": int(v["stream_pages"]),
                      "random_repeat": int(v["stream_random_repeat"])},
        "shared_buffers": {"created": int(v["shm_created"]), "reused": int(v["shm_reused"]),
                           "unpooled": int(v["shm_unpooled"])},
        "seconds": {"read": v["t_read"], "decode": v["t_decode"], "wait": v["t_wait"]},
    }


class _Loaded:
    __slots__ = ("ref", "data", "info", "masks", "images", "attributes", "nbytes", "latents")

    def __init__(self, ref, data, info, masks, images, attributes, nbytes, latents=()):
        self.ref, self.data, self.info = ref, data, info
        self.masks, self.images, self.attributes, self.nbytes = masks, images, attributes, nbytes
        self.latents = latents                  # [(name, ndarray)]


def _read(path) -> bytes:
    return read_file(path)


def _location_name(loc) -> str:
    """A location's file name (lower case, no query string) for telling formats apart."""
    name = getattr(loc, "name", None) or getattr(loc, "url", loc)
    return str(name).lower().split("?", 1)[0]


def _is_json(loc) -> bool:
    return _location_name(loc).endswith(".json")


def fetch_parts(ref: SampleRef, stats: Stats, read=_read) -> tuple:
    """The bytes of a sample's files: (main, masks, images, texts, latents) (IO thread)."""
    t0 = time.perf_counter()
    try:
        data = read(ref.path)
        masks = [(name, read(p)) for name, p in ref.masks]
        images = [(name, read(p)) for name, p in ref.images]
        texts = [(name, read(p), p) for name, p in ref.texts]
        latents = [(name, _MMap(p) if _mappable(p) else read(p)) for name, p in ref.latents]
    except OSError as e:
        raise SampleError(ref.id, getattr(e, "reason", "read_error"), e) from None
    finally:
        stats.add("t_read", time.perf_counter() - t0)
    return data, masks, images, texts, latents


class _MMap(str):
    """A local ``.npy`` latent, memory-mapped (copy-on-write) instead of read."""


def _mappable(loc) -> bool:
    return isinstance(loc, str) and "://" not in loc and loc.lower().endswith(".npy")


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
              "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}


def parse_safetensors(raw: bytes) -> dict:
    """The tensors of a ``.safetensors`` file as ``{name: ndarray}`` (BF16 widened
    to float32, exactly); ``ValueError`` naming what is wrong."""
    if len(raw) < 8:
        raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(raw[:8], "little")
    if n > min(len(raw) - 8, 100 << 20):
        raise ValueError(f"header of {n} bytes in a file of {len(raw)}")
    header = json.loads(raw[8:8 + n])
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    data = memoryview(raw)[8 + n:]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(t, dict) or not isinstance(t.get("shape"), list) \
                or not isinstance(t.get("data_offsets"), list) or len(t["data_offsets"]) != 2:
            raise ValueError(f"tensor {name!r}: bad header entry")
        a, b = (int(x) for x in t["data_offsets"])
        shape = tuple(int(x) for x in t["shape"])
        if any(x < 0 for x in shape) or not 0 <= a <= b <= len(data):
            raise ValueError(f"tensor {name!r}: offsets {a}..{b} outside the data ({len(data)} bytes)")
        dtype = t.get("dtype")
        count = int(np.prod(shape, dtype=np.int64))
        if dtype == "BF16":
            if b - a != 2 * count:
                raise ValueError(f"tensor {name!r}: {b - a} bytes for {count} BF16 values")
            bits = np.frombuffer(data[a:b], dtype="<u2").astype(np.uint32) << 16
            out[name] = bits.view(np.float32).reshape(shape)
            continue
        if dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {name!r}: unsupported dtype {dtype!r}")
        dt = np.dtype(_ST_DTYPES[dtype]).newbyteorder("<")
        if b - a != dt.itemsize * count:
            raise ValueError(f"tensor {name!r}: {b - a} bytes for {count} {dtype} values")
        out[name] = np.frombuffer(data[a:b], dtype=dt).astype(dt.newbyteorder("=")).reshape(shape)
    return out


def _parse_npy(raw: bytes) -> np.ndarray:
    """A ``.npy`` file's array (no pickles), in native byte order."""
    arr = np.load(io.BytesIO(raw), allow_pickle=False)
    if not isinstance(arr, np.ndarray):
        raise ValueError("not a .npy array")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


MAX_JSON_DEPTH = 100
"""Deepest nesting of a sidecar JSON accepted (deeper: ``bad_attributes``).  Python's
parser gives up near 1,000 levels (RecursionError) and the pickling that carries a
batch out of a DataLoader worker near 500; no real annotation nests this deep."""


def _check_depth(text: Optional[str], value) -> None:
    """ValueError when ``value`` (parsed from ``text``; None: not from a text) nests
    more than MAX_JSON_DEPTH arrays/objects; cheap unless the text holds that many
    brackets at all."""
    if text is not None and text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        for x in (v.values() if isinstance(v, dict) else v):
            if isinstance(x, (dict, list)):
                stack.append((x, depth + 1))


def merge_attributes(ref: SampleRef, texts: list) -> dict:
    """A sample's attributes: those its source knows, merged with its sidecar texts
    (``[(name, bytes, location)]``: a ``.json`` object without a name merged, a
    named one or a ``.txt`` under its name).  ``SampleError`` (bad_attributes),
    also for JSON nested deeper than ``MAX_JSON_DEPTH``."""
    attributes = dict(ref.attributes) if ref.attributes else {}
    try:
        if attributes:          # a source's own (an index's columns, an API's JSON)
            _check_depth(None, attributes)
        for name, raw, p in texts:
            text = raw.decode("utf-8")
            if _is_json(p):
                value = json.loads(text)
                _check_depth(text, value)
                if name == "" and isinstance(value, dict):
                    attributes.update(value)
                else:
                    attributes[name or "json"] = value
            else:
                attributes[name or "txt"] = text
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SampleError(ref.id, "bad_attributes", e) from None
    return attributes


def load(ref: SampleRef, stats: Stats, read=_read, parts: Optional[tuple] = None) -> _Loaded:
    """Read a sample's files (unless ``parts`` has them) and its image header."""
    data, masks, images, texts, raw_latents = \
        parts if parts is not None else fetch_parts(ref, stats, read)
    nbytes = len(data) + sum(len(b) for _, b in masks) + sum(len(b) for _, b in images) \
        + sum(len(b) for _, b, _ in texts) \
        + sum(len(b) for _, b in raw_latents if not isinstance(b, _MMap))
    latents = []
    for (name, raw), (_, loc) in zip(raw_latents, ref.latents):
        lname = _location_name(loc)
        try:
            if isinstance(raw, _MMap):
                arr = np.load(str(raw), mmap_mode="c", allow_pickle=False)
                latents.append((name, arr if arr.dtype.isnative
                                else arr.astype(arr.dtype.newbyteorder("="))))
                nbytes += arr.nbytes
            elif lname.endswith(".safetensors"):
                tensors = parse_safetensors(raw)
                if len(tensors) == 1:
                    latents.append((name, next(iter(tensors.values()))))
                else:
                    latents.extend((f"{name}/{k}", v) for k, v in sorted(tensors.items()))
            elif raw.startswith(b"\x93NUMPY") or lname.endswith(".npy"):
                latents.append((name, _parse_npy(raw)))
            else:
                latents.append((name, raw))      # another format: its bytes, as they are
        except (ValueError, OSError, EOFError, RecursionError) as e:
            raise SampleError(ref.id, "bad_latent", f"latent {name!r}: {e}") from None
    attributes = merge_attributes(ref, texts)
    try:
        info = read_header(data)
    except ImageTooLargeError as e:
        raise SampleError(ref.id, "too_large", e) from None
    except DecodeError as e:
        raise SampleError(ref.id, "decode_error", e) from None
    return _Loaded(ref, data, info, masks, images, attributes, nbytes, latents)


def _in_worker() -> bool:
    from torch.utils.data import get_worker_info
    return get_worker_info() is not None


def _alloc(shape, shared: bool, zero: bool = True, stats: Optional[Stats] = None,
           pool_bytes: Optional[int] = None) -> torch.Tensor:
    """A uint8 tensor for a batch (zero-filled unless ``zero=False``).

    In a DataLoader worker it lives directly in shared memory, so that sending the
    batch to the main process does not copy it (torch would otherwise copy every
    batch into shared memory: 100 MB per batch at 1024 buckets); the segments are
    recycled once the trainer lets go of them (``_shm``).  Elsewhere it comes from
    the allocator (which reuses earlier batches' pages below glibc's mmap threshold,
    32 MB at most; a larger batch is a fresh mapping)."""
    if shared and all(shape):
        t, how = _shm.alloc(shape, zero, pool_bytes)
        if stats is not None:
            stats.add(f"shm_{how}")
        return t
    return torch.zeros(shape, dtype=torch.uint8) if zero else torch.empty(shape, dtype=torch.uint8)


class Batch:
    """Preallocated tensors of one bucket and the samples assigned to their slots."""

    def __init__(self, bucket: Tuple[int, int], capacity: int, shared: bool = False,
                 mask_names: Iterable[str] = (), image_names: Iterable[str] = (),
                 stats: Optional[Stats] = None, pool_bytes: Optional[int] = None):
        self.bucket = Bucket(*bucket)             # (height, width)
        self.capacity = capacity
        self.shared = shared
        self.stats = stats
        self.pool_bytes = pool_bytes
        self._image: Optional[torch.Tensor] = None          # allocated by its first decode
        self._image_np: Optional[np.ndarray] = None
        self._lock = threading.Lock()
        self.masks: Dict[str, torch.Tensor] = {}
        self.images: Dict[str, torch.Tensor] = {}
        self.present: Dict[Tuple[str, str], np.ndarray] = {}
        self.samples: List[Optional[_Loaded]] = []
        self.meta: List[Optional[tuple]] = []
        self.futures: List[Future] = []
        for name in mask_names:
            self._mask_name(name)
        for name in image_names:
            self._table("image", self.images, name, 3)

    def _table(self, kind: str, table: Dict[str, torch.Tensor], name: str, channels: int) -> None:
        if name not in table:
            h, w = self.bucket
            table[name] = _alloc((self.capacity, h, w, channels), self.shared, stats=self.stats,
                                 pool_bytes=self.pool_bytes)
            self.present[(kind, name)] = np.zeros(self.capacity, dtype=bool)

    # masks: a table's type and channels are those of its masks (uint8 or int32;
    # 1 or 3 channels), known once one is decoded, so it is allocated by the first
    # ``put_mask`` and widened if a later mask needs more
    def _mask_name(self, name: str) -> None:
        if ("mask", name) not in self.present:
            self.present[("mask", name)] = np.zeros(self.capacity, dtype=bool)

    def _mask_table(self, name: str, dtype: torch.dtype, channels: int) -> torch.Tensor:
        """A zero-filled (capacity, H, W, channels) table, holding the old one's values."""
        h, w = self.bucket
        size = torch.empty((), dtype=dtype).element_size()
        t = _alloc((self.capacity, h, w, channels * size), self.shared, stats=self.stats,
                   pool_bytes=self.pool_bytes)
        if size > 1:
            t = t.view(dtype)
        old = self.masks.get(name)
        if old is not None:
            t.copy_(old.expand(-1, -1, -1, channels) if old.shape[3] != channels else old)
        self.masks[name] = t
        return t

    def put_mask(self, name: str, slot: int, mask: np.ndarray) -> None:
        """Copy a decoded (H, W, C) mask into its slot (decode threads).  The table
        widens to the widest type and the most channels seen in the batch (a grey
        mask in a colour table is replicated); values are never changed."""
        src = torch.from_numpy(mask)
        with self._lock:
            t = self.masks.get(name)
            dtype = torch.int32 if src.dtype != torch.uint8 or (
                t is not None and t.dtype == torch.int32) else torch.uint8
            channels = max(src.shape[2], t.shape[3] if t is not None else 1)
            if t is None or t.dtype != dtype or t.shape[3] != channels:
                t = self._mask_table(name, dtype, channels)
            t[slot].copy_(src)
            self.present[("mask", name)][slot] = True

    def mask_tables(self) -> Dict[str, torch.Tensor]:
        """The mask tables in the order their names were first seen (deterministic,
        unlike the order in which decode threads allocate them)."""
        return {name: self.masks[name] for kind, name in self.present
                if kind == "mask" and name in self.masks}

    def finish_masks(self) -> None:
        """Tables for mask names no decoded sample had (all zero, uint8, 1 channel)."""
        for kind, name in self.present:
            if kind == "mask" and name not in self.masks:
                self._mask_table(name, torch.uint8, 1)

    @property
    def image(self) -> torch.Tensor:
        """The (capacity, H, W, 3) image tensor, allocated on first use: a batch
        that is planned but not started yet holds no memory."""
        if self._image is None:
            with self._lock:
                if self._image is None:
                    h, w = self.bucket
                    t = _alloc((self.capacity, h, w, 3), self.shared, zero=False,
                               stats=self.stats, pool_bytes=self.pool_bytes)
                    self._image_np = t.numpy()
                    self._image = t
        return self._image

    def image_np(self) -> np.ndarray:
        if self._image_np is None:
            self.image
        return self._image_np

    @property
    def full(self) -> bool:
        return len(self.samples) == self.capacity

    def assign(self, loaded: "_Loaded") -> int:
        """Give ``loaded`` the next slot; allocate the tensors of its masks and additional
        images.  Consumer thread only: decode threads never change the tables."""
        for name, _ in loaded.masks:
            self._mask_name(name)
        for name, _ in loaded.images:
            self._table("image", self.images, name, 3)
        self.samples.append(loaded)
        self.meta.append(None)
        return len(self.samples) - 1


def _palette_ids(rgb: np.ndarray, colours: tuple, name: str) -> np.ndarray:
    """(H, W, 3) uint8 colours -> (H, W, 1) ids: the index of each colour in
    ``colours`` (uint8 for up to 256 colours, else int32); MaskMismatchError when a
    colour is not listed."""
    pal = np.array(colours, dtype=np.int32)
    keys = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    order = np.argsort(keys)
    sorted_keys = keys[order]
    px = rgb.astype(np.int32)
    k = (px[..., 0] << 16) | (px[..., 1] << 8) | px[..., 2]
    pos = np.minimum(np.searchsorted(sorted_keys, k), len(sorted_keys) - 1)
    found = sorted_keys[pos] == k
    if not found.all():
        bad = k[~found]
        c = int(bad[0])
        raise MaskMismatchError(f"mask {name!r}: {bad.size} pixels have colours not in "
                                f"mask_palette (the first: {[c >> 16, (c >> 8) & 255, c & 255]})")
    ids = order[pos]
    return ids.astype(np.uint8 if len(colours) <= 256 else np.int32)[:, :, None]


def _decode_into(loaded: _Loaded, batch: Batch, slot: int, cfg, stats: Stats) -> None:
    """Decode a sample's image, masks and additional images into its batch slot.

    Masks follow the image: same bucket, and the image's crop box (scaled to the
    mask's size when it differs); their values are kept (``decode_to_bucket``
    with ``mask=True``), or mapped to ids through ``cfg.mask_palette``."""
    t0 = time.perf_counter()
    palettes = getattr(cfg, "mask_palette", None) or {}
    warned = 0
    try:
        res = decode_to_bucket(loaded.data, bucket=batch.bucket, out=batch.image_np()[slot],
                               filter=cfg.filter, max_pixels=cfg.max_pixels)
        warned += res.warning is not None
        for name, data in loaded.masks:
            colours = palettes.get(name, palettes.get("*"))
            m = decode_to_bucket(data, mask=True, like=res, max_pixels=cfg.max_pixels,
                                 mode=None if colours is None else "RGB")
            warned += m.warning is not None
            batch.put_mask(name, slot, m.image if colours is None
                           else _palette_ids(m.image, colours, name))
        for name, data in loaded.images:
            r = decode_to_bucket(data, bucket=batch.bucket, out=batch.images[name].numpy()[slot],
                                 filter=cfg.filter, max_pixels=cfg.max_pixels)
            warned += r.warning is not None
            batch.present[("image", name)][slot] = True
    except ImageTooLargeError as e:
        raise SampleError(loaded.ref.id, "too_large", e) from None
    except MaskMismatchError as e:
        raise SampleError(loaded.ref.id, "mask_mismatch", e) from None
    except DecodeError as e:
        raise SampleError(loaded.ref.id, "decode_error", e) from None
    finally:
        stats.add("t_decode", time.perf_counter() - t0)
    if warned:
        stats.add("decoded_with_warnings", warned)
    batch.meta[slot] = (res.original_size, res.crop_coords)


def _output(batch: Batch, good: List[int], stats: Stats, step: Optional[int] = None) -> Optional[dict]:
    """The output dict of a batch whose decodes are done; ``good``: the slots that
    succeeded (failed ones are closed up, so the batch is that much shorter)."""
    n = len(good)
    if n == 0 and step is None:
        return None                 # streaming mode: nothing to yield
    batch.finish_masks()
    # planned batches are yielded even when every sample failed (an empty batch):
    # every rank must take part in every step
    if good != list(range(n)):                  # move the survivors to the front
        for dst, src in enumerate(good):
            if dst != src:
                batch.image[dst] = batch.image[src]
                for t in list(batch.masks.values()) + list(batch.images.values()):
                    t[dst] = t[src]
                for p in batch.present.values():
                    p[dst] = p[src]
    samples = [batch.samples[s] for s in good]
    meta = [batch.meta[s] for s in good]
    stats.add("samples", n)
    stats.add("batches", 1)
    stats.add("bytes", sum(s.nbytes for s in samples))
    out = {
        "image": batch.image[:n].permute(0, 3, 1, 2),
        "id": [s.ref.id for s in samples],
        "original_size": torch.tensor([m[0] for m in meta], dtype=torch.int64).reshape(n, 2),
        "crop_coords": torch.tensor([m[1] for m in meta], dtype=torch.int64).reshape(n, 2),
        "bucket": batch.bucket,
        "attributes": [s.attributes for s in samples],
        "masks": {k: t[:n].permute(0, 3, 1, 2) for k, t in batch.mask_tables().items()},
        "additional_images": {k: t[:n].permute(0, 3, 1, 2) for k, t in batch.images.items()},
        "latents": collate_latents([s.latents for s in samples]),
    }
    _add_meta(out, [s.ref.meta for s in samples])
    if step is not None:
        out["step"] = step
    if batch.present:
        out["present"] = {f"{kind}/{name}": torch.from_numpy(p[:n].copy())
                          for (kind, name), p in batch.present.items()}
    return out


def _add_meta(out: dict, metas: List[Optional[dict]]) -> None:
    """The sources' per-sample fields as ``out[key]`` lists (None where missing)."""
    keys: List[str] = []
    for m in metas:
        for k in m or ():
            if k not in keys and k not in out:
                keys.append(k)
    for k in keys:
        out[k] = [(m or {}).get(k) for m in metas]


def _latent_tensor(arr):
    """A latent as a tensor (sharing its memory), or the array where torch has no
    such dtype (or the bytes of a latent that is not a .npy array)."""
    if not isinstance(arr, np.ndarray):
        return arr
    try:
        return torch.from_numpy(arr)
    except TypeError:
        return arr


def collate_latents(per_sample: List[list]) -> Dict[str, object]:
    """``{name: (B, ...) tensor}`` for latents every sample has with one shape and
    dtype; else ``{name: [tensor or None per sample]}`` (ragged or missing)."""
    names: List[str] = []
    for lat in per_sample:
        for name, _ in lat:
            if name not in names:
                names.append(name)
    out: Dict[str, object] = {}
    for name in names:
        arrays = [dict(lat).get(name) for lat in per_sample]
        first = arrays[0]
        if isinstance(first, np.ndarray) and all(
                isinstance(a, np.ndarray) and a.shape == first.shape and a.dtype == first.dtype
                for a in arrays):
            out[name] = _latent_tensor(np.stack(arrays))
        else:
            out[name] = [None if a is None else _latent_tensor(a) for a in arrays]
    return out


class _ErrorPolicy:
    """Counts failed samples by reason; skips them (one warning per reason) or raises."""

    def __init__(self, on_error: str, stats: Stats, max_failures: Optional[float] = None,
                 expected: Optional[int] = None):
        self.on_error = on_error
        self.stats = stats
        self._warned = set()
        self.failures = 0
        self.limit = None
        if max_failures is not None:
            self.limit = max_failures if max_failures >= 1 or expected is None \
                else max_failures * expected

    def _skip(self, err: SampleError) -> None:
        self.stats.add(f"skipped_{err.reason}")
        if self.on_error == "raise":
            raise err
        self.failures += 1
        if self.limit is not None and self.failures > self.limit:
            raise DatagoError(f"{self.failures} samples failed in this epoch (this worker), "
                              f"more than max_failures allows ({self.limit:g}): the source "
                              f"looks broken; the last one: {err}")
        if err.reason not in self._warned:
            self._warned.add(err.reason)
            warnings.warn(f"datago: skipping {err} (further '{err.reason}' skips are "
                          "counted in stats() without a warning)", RuntimeWarning, stacklevel=3)

    def _good_slots(self, batch: "Batch") -> List[int]:
        """Wait for a batch's tasks; the slots that succeeded (failures counted)."""
        good = []
        for slot, f in enumerate(batch.futures):
            exc = f.exception()
            if exc is None:
                good.append(slot)
            elif isinstance(exc, SampleError):
                self._skip(exc)
            else:
                raise exc
        return good


_NOT_YET = object()


def _polled(poll, wait: float = 0.005):
    """The next ref of a stream (``prefetched.poll``) if one arrives within ``wait``
    seconds: the ref, None at the stream's end, else ``_NOT_YET``."""
    try:
        ref = poll(wait)
    except StopIteration:
        return None
    return _NOT_YET if ref is prefetched.EMPTY else ref


class Engine(_ErrorPolicy):
    """Streaming mode: iterates batches (or samples) of sample references whose sizes
    are not known in advance.  A loaded sample (its bytes and header, not decoded)
    waits with the others of its bucket; a bucket's batch is decoded once it has
    ``batch_size`` of them, so batches are full and only complete batches hold
    decoded pixels.

    Memory is bounded: at most ``buffer`` samples are being loaded or decoded, at
    most ``max_open`` x ``batch_size`` loaded samples wait (one more, and the bucket
    with the most waiting is decoded early as a partial batch, counted as
    ``early_flushed``), and no new sample is loaded while ``prefetch`` batches wait
    to be yielded.

    In per-sample mode (``batch_size=None``), ``refs`` may hold ``(step, ref)``
    pairs (with ``steps=True``); each sample dict then carries ``"step"``.
    """

    def __init__(self, refs: Iterable[SampleRef], *, image_cfg, buckets, batch_size, drop_last,
                 num_threads: int, buffer: int, on_error: str, stats: Stats,
                 max_open: Optional[int] = None, prefetch: int = 2, steps: bool = False,
                 read=_read, max_failures: Optional[float] = None,
                 pool_bytes: Optional[int] = None):
        self.read = read
        self.pool_bytes = pool_bytes
        self.max_open = max_open
        self.prefetch = max(1, prefetch)
        self.with_steps = steps
        super().__init__(on_error, stats, max_failures)
        self.refs = iter(refs)
        self.cfg = image_cfg
        self.buckets = buckets
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.num_threads = num_threads
        self.buffer = buffer
        self._pending = 0
        self._cond = threading.Condition()
        self._shared = _in_worker()

    def _wait(self, fut):
        """The future's result, or None when its sample failed (counted by _skip)."""
        t0 = time.perf_counter()
        try:
            return fut.result()
        except SampleError as e:
            self._skip(e)
            return None
        finally:
            self.stats.add("t_wait", time.perf_counter() - t0)

    def _done(self, _fut) -> None:
        with self._cond:
            self._pending -= 1
            self._cond.notify()

    # ------------------------------------------------------------------ main loop
    def __iter__(self) -> Iterator[dict]:
        if self.batch_size is None:
            yield from self._samples()
            return
        pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="datago")
        loads: deque = deque()
        closed: deque = deque()
        # loaded samples (bytes and header, not decoded) waiting for their bucket's
        # batch to fill, by bucket in order of first arrival
        waiting: Dict[Tuple[int, int], List[_Loaded]] = {}
        cap = None if self.max_open is None else self.max_open * self.batch_size
        n_waiting = 0
        exhausted = False
        poll = getattr(self.refs, "poll", None)     # refs arriving from a stream
        try:
            while True:
                while (not exhausted and len(loads) + self._pending < self.buffer
                       and len(closed) < self.prefetch):
                    if poll is not None and (loads or closed):
                        # work is at hand: a stalled stream must not hold it back
                        ref = _polled(poll)
                        if ref is _NOT_YET:
                            break
                    else:
                        ref = next(self.refs, None)
                    if ref is None:
                        exhausted = True
                        break
                    loads.append(pool.submit(load, ref, self.stats, self.read))
                while closed and all(f.done() for f in closed[0].futures):
                    out = self._finish(closed.popleft())
                    if out is not None:
                        yield out
                if loads:
                    loaded = self._wait(loads.popleft())
                    if loaded is None:
                        continue
                    bucket = nearest_bucket(*loaded.info.display_size, self.buckets)
                    group = waiting.setdefault(bucket, [])
                    group.append(loaded)
                    n_waiting += 1
                    if len(group) == self.batch_size:
                        closed.append(self._start(pool, bucket, waiting.pop(bucket)))
                        n_waiting -= self.batch_size
                    elif cap is not None and n_waiting > cap:
                        fullest = max(waiting, key=lambda b: len(waiting[b]))
                        group = waiting.pop(fullest)
                        n_waiting -= len(group)
                        closed.append(self._start(pool, fullest, group))
                        self.stats.add("early_flushed")
                elif closed:
                    t0 = time.perf_counter()
                    for f in closed[0].futures:
                        f.exception()                   # wait
                    self.stats.add("t_wait", time.perf_counter() - t0)
                elif not exhausted:
                    # the buffer is full of decodes: wait for one to finish, then load more
                    t0 = time.perf_counter()
                    with self._cond:
                        while self._pending >= self.buffer:
                            self._cond.wait()
                    self.stats.add("t_wait", time.perf_counter() - t0)
                else:
                    if not waiting:
                        break
                    for bucket, group in waiting.items():   # partial batches, first seen first
                        if self.drop_last:
                            self.stats.add("dropped", len(group))
                        else:
                            closed.append(self._start(pool, bucket, group))
                    waiting.clear()
                    n_waiting = 0
        finally:
            for f in loads:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    def _start(self, pool: ThreadPoolExecutor, bucket: Tuple[int, int],
               group: List[_Loaded]) -> Batch:
        """A batch of ``group`` (one bucket's loaded samples), its decodes submitted."""
        batch = Batch(bucket, len(group), self._shared, stats=self.stats,
                      pool_bytes=self.pool_bytes)
        for loaded in group:
            slot = batch.assign(loaded)
            with self._cond:
                self._pending += 1
            f = pool.submit(_decode_into, loaded, batch, slot, self.cfg, self.stats)
            f.add_done_callback(self._done)
            batch.futures.append(f)
        return batch

    def _finish(self, batch: Batch) -> Optional[dict]:
        """Wait for the batch's decodes, close up failed slots, build the output dict."""
        return _output(batch, self._good_slots(batch), self.stats)

    # ------------------------------------------------------------------ per sample
    def _samples(self) -> Iterator[dict]:
        """batch_size=None: the same dict per sample, without the batch dimension."""
        pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="datago")
        work: deque = deque()
        poll = getattr(self.refs, "poll", None)     # refs arriving from a stream
        try:
            while True:
                # top the buffer up, but never past a sample that is ready: a ref
                # still on its way (a streamed shard stalls) must not hold it back
                while len(work) < self.buffer and not (work and work[0].done()):
                    if work and poll is not None:
                        ref = _polled(poll)
                        if ref is _NOT_YET:
                            continue
                    else:
                        ref = next(self.refs, None)
                    if ref is None:
                        break
                    if self.with_steps:
                        step, ref = ref
                        work.append(pool.submit(self._one, ref, step))
                    else:
                        work.append(pool.submit(self._one, ref))
                if not work:
                    break
                out = self._wait(work.popleft())
                if out is None:
                    continue
                yield out
        finally:
            for f in work:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    def _one(self, ref: SampleRef, step: Optional[int] = None) -> dict:
        loaded = load(ref, self.stats, self.read)
        if self.buckets is None:                    # no crop_and_resize: the image as it is
            t0 = time.perf_counter()
            try:
                max_pixels = self.cfg.max_pixels if self.cfg else DEFAULT_MAX_PIXELS
                arr, warning = decode_with_warning(loaded.data, max_pixels=max_pixels)
                img = torch.from_numpy(arr)
                if warning is not None:
                    self.stats.add("decoded_with_warnings")
            except ImageTooLargeError as e:
                raise SampleError(ref.id, "too_large", e) from None
            except DecodeError as e:
                raise SampleError(ref.id, "decode_error", e) from None
            finally:
                self.stats.add("t_decode", time.perf_counter() - t0)
            h, w = img.shape[:2]
            out = {"image": img.permute(2, 0, 1), "id": ref.id,
                   "original_size": torch.tensor([h, w]), "crop_coords": torch.tensor([0, 0]),
                   "bucket": Bucket(h, w), "attributes": loaded.attributes, "masks": {},
                   "additional_images": {}}
        else:
            bucket = nearest_bucket(*loaded.info.display_size, self.buckets)
            batch = Batch(bucket, 1)
            batch.assign(loaded)
            _decode_into(loaded, batch, 0, self.cfg, self.stats)
            out = {
                "image": batch.image[0].permute(2, 0, 1),
                "id": ref.id,
                "original_size": torch.tensor(batch.meta[0][0]),
                "crop_coords": torch.tensor(batch.meta[0][1]),
                "bucket": batch.bucket,
                "attributes": loaded.attributes,
                "masks": {k: t[0].permute(2, 0, 1) for k, t in batch.mask_tables().items()},
                "additional_images": {k: t[0].permute(2, 0, 1) for k, t in batch.images.items()},
            }
        out["latents"] = {name: _latent_tensor(a) for name, a in loaded.latents}
        for k, v in (ref.meta or {}).items():
            out.setdefault(k, v)
        if step is not None:
            out["step"] = step
        self.stats.add("samples", 1)
        self.stats.add("bytes", loaded.nbytes)
        return out


# ---------------------------------------------------------------------------- planned batches

class Job(NamedTuple):
    """One batch of the epoch plan: its global step, bucket, samples and which of
    them repeat a sample (remainder padding)."""
    step: int
    bucket: Tuple[int, int]                 # (height, width)
    refs: Sequence[SampleRef]
    padded: Sequence[bool]


def _load_decode(ref: SampleRef, batch: Batch, slot: int, cfg, stats: Stats, read=_read,
                 parts: Optional[tuple] = None) -> None:
    """Pool thread: read one sample (unless ``parts`` has its bytes) and decode it into
    its slot; keep only its metadata."""
    loaded = load(ref, stats, read, parts)
    _decode_into(loaded, batch, slot, cfg, stats)
    loaded.data = loaded.masks = loaded.images = None          # the bytes are done with
    batch.samples[slot] = loaded


class PlanEngine(_ErrorPolicy):
    """Executes a worker's share of the epoch plan, batch by batch.

    Each batch's samples are known before any is read (the plan chose them by
    their sizes), so its tensors are allocated once and every sample is read and
    decoded straight into its slot by one pool task.  At most
    ``prefetch_batches`` batches exist at once -- being decoded or finished and
    waiting -- whatever the number of buckets; the batch being consumed is the
    caller's.  A sample that fails is counted and its slot closed up (that batch
    is one shorter; the step count never changes).
    """

    def __init__(self, jobs: Iterable[Job], *, image_cfg, num_threads: int,
                 prefetch_batches: int, on_error: str, stats: Stats, read=_read,
                 io_threads: int = 0, max_failures: Optional[float] = None,
                 expected: Optional[int] = None, pool_bytes: Optional[int] = None):
        self.pool_bytes = pool_bytes
        super().__init__(on_error, stats, max_failures, expected)
        self.read = read
        self.io_threads = io_threads
        self._io: Optional[ThreadPoolExecutor] = None
        self.jobs = iter(jobs)
        self.cfg = image_cfg
        self.num_threads = num_threads
        self.prefetch = max(1, prefetch_batches)
        self._shared = _in_worker()

    def _submit(self, pool: ThreadPoolExecutor, job: Job) -> Batch:
        masks = {n for r in job.refs for n, _ in r.masks}
        images = {n for r in job.refs for n, _ in r.images}
        batch = Batch(job.bucket, len(job.refs), self._shared, sorted(masks), sorted(images),
                      stats=self.stats, pool_bytes=self.pool_bytes)
        batch.samples = [None] * len(job.refs)
        batch.meta = [None] * len(job.refs)
        if self._io is None:
            batch.futures = [pool.submit(_load_decode, ref, batch, slot, self.cfg, self.stats,
                                         self.read) for slot, ref in enumerate(job.refs)]
        else:
            # remote bytes: many fetches in flight on the IO pool, each handing its
            # sample to the decode pool when it arrives
            batch.futures = [self._chain(pool, ref, batch, slot) for slot, ref in enumerate(job.refs)]
        return batch

    def _chain(self, pool: ThreadPoolExecutor, ref: SampleRef, batch: Batch, slot: int) -> Future:
        out: Future = Future()
        out.set_running_or_notify_cancel()

        def decoded(f: Future) -> None:
            exc = f.exception() if not f.cancelled() else SampleError(ref.id, "read_error",
                                                                       RuntimeError("cancelled"))
            if exc is None:
                out.set_result(None)
            else:
                out.set_exception(exc)

        def fetched(f: Future) -> None:
            exc = f.exception() if not f.cancelled() else SampleError(ref.id, "read_error",
                                                                       RuntimeError("cancelled"))
            if exc is not None:
                out.set_exception(exc)
                return
            try:
                d = pool.submit(_load_decode, ref, batch, slot, self.cfg, self.stats,
                                self.read, f.result())
            except RuntimeError as e:                   # the pool is shutting down
                out.set_exception(SampleError(ref.id, "read_error", e))
                return
            d.add_done_callback(decoded)

        self._io.submit(fetch_parts, ref, self.stats, self.read).add_done_callback(fetched)
        return out

    def __iter__(self) -> Iterator[dict]:
        pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="datago")
        if self.io_threads:
            self._io = ThreadPoolExecutor(self.io_threads, thread_name_prefix="datago-io")
        inflight: deque = deque()

        def refill() -> None:
            while len(inflight) < self.prefetch:
                job = next(self.jobs, None)
                if job is None:
                    break
                inflight.append((job, self._submit(pool, job)))

        try:
            while True:
                refill()
                if not inflight:
                    break
                job, batch = inflight.popleft()
                t0 = time.perf_counter()
                good = self._good_slots(batch)
                self.stats.add("t_wait", time.perf_counter() - t0)
                padded = sum(1 for s in good if job.padded[s])
                if padded:
                    self.stats.add("padded", padded)
                out = _output(batch, good, self.stats, job.step)
                del batch
                refill()        # the threads keep ``prefetch`` batches going while the
                yield out       # consumer holds this one
        finally:
            for _, b in inflight:
                for f in b.futures:
                    f.cancel()
            if self._io is not None:
                self._io.shutdown(wait=True, cancel_futures=True)
                self._io = None
            pool.shutdown(wait=True, cancel_futures=True)
