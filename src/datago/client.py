"""A client with the reference datago's Python API, for users migrating.

    import datago
    datago.initialize_logging("info")                 # optional; RUST_LOG also works
    client = datago.DatagoClient(json.dumps(config))  # raises ConfigError on a bad config
    client.start()                                    # optional: get_sample() starts lazily
    while (sample := client.get_sample()) is not None:
        sample.id, sample.source, sample.attributes, sample.tags
        sample.image.to_numpy_array()                 # (H, W, 3) uint8, read-only view
        sample.image.to_pil_image(); sample.image.mode
        sample.masks["mask"].to_numpy_array()         # (H, W, 1) uint8
        np.load(io.BytesIO(sample.latents["npy"].data))
    client.stop()

The reference's names and fields, over every source (``file``, ``index``,
``webdataset``, ``db``): ``DatagoClient`` (``start``, ``get_sample``,
``get_sample_auto_convert``, ``stop``), ``Sample`` (``id``, ``source``,
``attributes``, ``duplicate_state``, ``image``, ``masks``, ``additional_images``,
``latents``, ``coca_embedding``, ``tags``), ``ImagePayload`` (``get_payload()``
with ``data``, ``width``, ``height``, ``original_width``, ``original_height``,
``channels``, ``bit_depth``, ``is_encoded``; ``to_numpy_array()``,
``to_pil_image()``, ``mode``, and any other attribute answered by the image as a
PIL image, converted once per payload), ``LatentPayload`` (``data``, ``len``),
``initialize_logging`` and ``live_cleanup_threads``.  A config without
``source_type`` is a db config, as in the reference, unless its ``source_config``
names ``root_path`` (file), ``url`` (webdataset) or ``index`` (index).

Passes and threads
------------------
A pass is read by one producer thread into a queue of at most
``samples_buffer_size`` samples (the dataset's decode threads work ahead of it).
``get_sample()`` may be called from any number of threads: each sample goes to
exactly one caller; the caller waits with the GIL released, in slices of 50 ms,
so Ctrl-C (KeyboardInterrupt, on the main thread) arrives within about 50 ms.  At
the end of the pass every caller gets ``None``, and keeps getting it until
``start()`` begins the next pass (reshuffled when ``random_sampling``); ``start()``
during a pass does nothing, as in the reference.  ``stop()`` ends the pass:
waiting callers get ``None``.  An error of the pass (a source that fails, a
sample that fails with ``on_error: "raise"``) is raised to every caller, never
turned into ``None``.

Where this client differs from the reference on purpose (see the README's
migration section; ``compat=True`` restores the reference's behaviour for the
first four):

* ``id`` of a file is its path relative to ``root_path`` (the reference: the
  JSON-quoted absolute path, quotes included);
* ``attributes`` is a dict of JSON values (the reference: JSON text on
  ``Sample``, JSON-quoted strings in the auto-convert dict);
* an unknown config key raises ``ConfigError`` naming the closest valid key
  (the reference ignores it silently; the keys its README still shows, such as
  ``prefetch_buffer_size``, only warn here);
* a bad config raises ``ConfigError`` at construction (the reference logs it
  and ``get_sample()`` returns ``None`` forever);
* ``to_numpy_array()`` / ``to_pil_image()`` work on encoded and 16-bit payloads;
* ``limit`` is optional (absent: one pass) and exact.

Seeds: ``random_sampling`` without a ``seed`` key draws a new seed per client,
logged at INFO on the ``datago`` logger (pass ``"seed": N`` to replay that
order); with ``seed`` every client reads the same order, pass after pass (each
pass its own).  A ``DatagoConfig`` object is used as it is (its seed; its
``num_threads`` and ``io_concurrency``: ``DATAGO_MAX_TASKS`` is not applied to it).

Environment variables (read when the client is built)
-----------------------------------------------------
``DATAGO_MAX_TASKS=N``
    Samples read and decoded at once: the decode threads (``num_threads``) and,
    for remote sources (index of URLs, WebDataset over HTTP, db), the requests
    in flight (``io_concurrency``) become ``N`` (0 means 1: serial, as in the
    reference).  A ``num_threads`` or ``io_concurrency`` key in the config wins.
``DATAGO_MAX_RETRIES=N``
    Retries of a failed request of a remote source (``datago.fetch``'s policy:
    5xx, 429, timeouts, resets; default 5): the reads that build the client
    (the index files, the pages of a db listing, the WebDataset shard indexes,
    the image headers of a size scan) and the samples read after
    (``DatagoDataset``'s ``fetch_retries``: it overrides a ``retries`` key of
    the config, every source's in a mix).
    Local files are not retried (an unreadable file is skipped, counted).
``RUST_LOG``
    Read by ``initialize_logging`` as the reference does (it wins over the
    argument): ``info``, ``datago=debug``, ...; when it is set, building a client
    calls ``initialize_logging()`` if nothing did yet (the reference does too).
``DATAROOM_API_URL`` / ``DATAROOM_API_KEY``
    The db source's API root and token, as in the reference.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import queue
import secrets
import sys
import threading
import warnings
import weakref
from typing import Any, Dict, Iterator, List, Optional, Union

import numpy as np

from datago.config import SOURCE_CONFIGS, DatagoConfig, ImageConfig, LoaderConfig
from datago.dataset import DatagoDataset
from datago.errors import ConfigError

__all__ = ["DatagoClient", "ImagePayload", "LatentPayload", "Sample", "initialize_logging",
           "live_cleanup_threads"]

logger = logging.getLogger(__name__)

POLL_S = 0.05                 # a waiting get_sample() checks for signals this often
STOP_GRACE_S = 2.0            # stop() waits this long for the producer thread
_SOURCE_NAMES = {"file": "filesystem", "index": "index", "webdataset": "webdataset", "db": ""}


# ---------------------------------------------------------------------------- logging

_LEVELS = {"off": logging.CRITICAL + 10, "error": logging.ERROR, "warn": logging.WARNING,
           "warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG,
           "trace": 5}
_log_lock = threading.Lock()
_log_initialized = False


def _parse_level(spec: Union[str, int], *, strict: bool) -> Optional[int]:
    """A logging level from a level name or an env_logger spec (``warn,datago=debug``):
    the ``datago`` directive wins over a bare level; None when there is neither."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"log_level must be a level name, got {type(spec).__name__}")
    bare = ours = None
    for directive in spec.split(","):
        directive = directive.split("/", 1)[0].strip()      # env_logger's "/regex" filter
        if not directive:
            continue
        module, _, name = directive.rpartition("=")
        level = _LEVELS.get(name.strip().lower())
        if level is None:
            if strict:
                raise ValueError(f"log level {name.strip()!r} is not one of "
                                 f"{', '.join(n for n in _LEVELS if n != 'warning')}")
            continue
        if not module:
            bare = level
        elif module.strip() == "datago" or module.strip().startswith("datago::"):
            ours = level
    return ours if ours is not None else bare


def initialize_logging(log_level: Optional[Union[str, int]] = None) -> bool:
    """Set up logging of the ``datago`` logger, as the reference's function does.

    ``log_level``: ``"error"``, ``"warn"``, ``"info"``, ``"debug"``, ``"trace"`` or
    ``"off"`` (any case; a Python logging level number also works); None: warn.
    ``$RUST_LOG``, when set, wins over the argument (as in the reference) and may
    be an env_logger spec such as ``warn,datago=debug``.  The first call attaches a
    stderr handler to the ``datago`` logger (unless the root logger already has
    handlers, which then print its records) and returns True; later calls return
    False (they still set the level).  An unknown level name raises ValueError.
    """
    global _log_initialized
    level = _parse_level(log_level, strict=True) if log_level is not None else None
    env = os.environ.get("RUST_LOG")
    if env:
        level = _parse_level(env, strict=False) or level
    if level is None:
        level = logging.WARNING
    log = logging.getLogger("datago")
    with _log_lock:
        log.setLevel(level)
        if _log_initialized:
            return False
        _log_initialized = True
        if not logging.getLogger().handlers and not log.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(
                "[%(asctime)s %(levelname)-5s %(name)s] %(message)s", "%Y-%m-%dT%H:%M:%S"))
            log.addHandler(handler)
        return True


# ---------------------------------------------------------------------------- payloads

def _to_8bit(arr: np.ndarray) -> np.ndarray:
    """16-bit samples to 8 bits, rounded (``round(v / 257)``, as ``datago.image``)."""
    return ((arr.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8)


_MODES_8 = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


class ImagePayload:
    """An image of a sample: raw ``(H, W, C)`` pixels (uint8, or uint16 for 16-bit
    images), or encoded bytes (``pre_encode_images``).

    The reference's fields are here (``get_payload()`` returns this object):
    ``data`` (bytes: the pixels, row-major HWC, or the encoded file), ``width``,
    ``height``, ``original_width``, ``original_height``, ``channels`` (-1 when
    encoded), ``bit_depth`` (8 or 16), ``is_encoded``.  Attributes it does not
    have (``getpixel``, ``info``, ...) are answered by ``to_pil_image()``'s
    image, converted once and kept.
    """

    __slots__ = ("_array", "_encoded", "_channels", "_bit_depth", "width", "height",
                 "original_width", "original_height", "_pil", "__weakref__")

    def __init__(self, array: Optional[np.ndarray] = None, *, encoded: Optional[bytes] = None,
                 width: int = 0, height: int = 0, original_width: int = 0,
                 original_height: int = 0, encoded_channels: Optional[int] = None,
                 bit_depth: Optional[int] = None):
        """``array``: (H, W, C) or (H, W) uint8/uint16 pixels (not copied); or
        ``encoded``: the bytes of a PNG/JPEG/... file with ``width`` x ``height``
        pixels, ``encoded_channels`` channels when decoded (None: read from the
        file when needed) and ``bit_depth`` (default 8)."""
        if (array is None) == (encoded is None):
            raise ValueError("ImagePayload needs either array or encoded")
        self._pil = None
        if array is not None:
            if array.ndim == 2:
                array = array[:, :, None]
            if array.ndim != 3 or not 1 <= array.shape[2] <= 4 or \
                    array.dtype not in (np.uint8, np.uint16):
                raise ValueError(f"array must be (H, W, 1..4) uint8 or uint16, got "
                                 f"{array.shape} {array.dtype}")
            self._array, self._encoded = array, None
            height, width = array.shape[:2]
            self._channels = int(array.shape[2])
            self._bit_depth = 16 if array.dtype == np.uint16 else 8
        else:
            self._array, self._encoded = None, bytes(encoded)
            self._channels = encoded_channels
            self._bit_depth = bit_depth or 8
        self.width, self.height = int(width), int(height)
        self.original_width = int(original_width or width)
        self.original_height = int(original_height or height)

    # -- the reference's payload fields
    @property
    def is_encoded(self) -> bool:
        return self._encoded is not None

    @property
    def channels(self) -> int:
        """1 to 4; -1 when encoded (as the reference)."""
        return -1 if self._encoded is not None else self._channels

    @property
    def bit_depth(self) -> int:
        return self._bit_depth

    @property
    def data(self) -> bytes:
        """The encoded file, or the pixels (row-major HWC; 16-bit: native order)."""
        if self._encoded is not None:
            return self._encoded
        return np.ascontiguousarray(self._array).tobytes()

    @property
    def size(self) -> tuple:
        """(width, height), as PIL's ``Image.size``."""
        return self.width, self.height

    @property
    def mode(self) -> str:
        """The PIL mode ``to_pil_image()`` gives: L, LA, RGB, RGBA, or I;16 for
        16-bit grey (other 16-bit images are reduced to 8 bits for PIL)."""
        if self._encoded is not None:
            return self._cached_pil().mode
        if self._bit_depth == 16 and self._channels == 1:
            return "I;16"
        return _MODES_8[self._channels]

    def get_payload(self) -> "ImagePayload":
        """The reference returns its inner payload; here it is this same object."""
        return self

    # -- conversions
    def to_numpy_array(self) -> np.ndarray:
        """(H, W, C) uint8; uint16 for 16-bit raw payloads and 16-bit grey encoded
        ones (16-bit colour files decode to 8 bits).  Raw payloads: a read-only view,
        no copy.  Encoded ones are decoded (the reference raises here)."""
        if self._encoded is None:
            view = self._array.view()
            view.flags.writeable = False
            return view
        if self._bit_depth == 8 and self._channels in (1, 3, 4):
            from datago.image import decode
            return decode(self._encoded, mode={1: "L", 3: "RGB", 4: "RGBA"}[self._channels])
        arr = np.asarray(self._open())
        if arr.dtype == np.int32 and self._bit_depth == 16:     # PIL's "I" for 16-bit grey
            arr = arr.astype(np.uint16)
        return arr[:, :, None] if arr.ndim == 2 else arr

    def __array__(self, dtype=None, copy=None):
        """``np.asarray(payload)``: ``to_numpy_array()`` (a copy when asked)."""
        arr = self.to_numpy_array()
        if dtype is not None and arr.dtype != dtype:
            return arr.astype(dtype)
        return arr.copy() if copy else arr

    def to_pil_image(self):
        """A new PIL image (the reference's conversion, which fails for 16-bit and
        some encoded payloads; this one does not)."""
        from PIL import Image
        if self._encoded is not None:
            return self._open()
        arr = self._array
        if self._bit_depth == 16:
            if self._channels == 1:
                return Image.fromarray(np.ascontiguousarray(arr[:, :, 0]))   # mode I;16
            arr = _to_8bit(arr)
        return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)

    def _open(self):
        from PIL import Image
        im = Image.open(io.BytesIO(self._encoded))
        im.load()
        return im

    def _cached_pil(self):
        im = self._pil
        if im is None:
            im = self._pil = self.to_pil_image()
        return im

    def __getattr__(self, name: str):
        # only for names the payload does not have: the reference answers them from
        # a PIL image (converted again at every access); here from one kept conversion
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return getattr(self._cached_pil(), name)
        except AttributeError:
            raise AttributeError(f"'ImagePayload' object (nor its PIL image) has no "
                                 f"attribute {name!r}") from None

    def __repr__(self) -> str:
        kind = "encoded" if self.is_encoded else f"{self._channels}ch"
        return f"ImagePayload({self.width}x{self.height}, {kind}, {self._bit_depth}-bit)"


class LatentPayload:
    """A latent of a sample: ``data`` (bytes: a ``.npy`` file for array latents, so
    ``np.load(io.BytesIO(p.data))`` gives the array back; else the bytes as
    served) and ``len`` (its length), as in the reference.  ``array``: the array
    itself, without the round trip (None for a latent that is not an array)."""

    __slots__ = ("_data", "array")

    def __init__(self, data: Optional[bytes] = None, *, array: Optional[np.ndarray] = None):
        if (data is None) == (array is None):
            raise ValueError("LatentPayload needs either data or array")
        self._data = None if data is None else bytes(data)
        self.array = array

    @property
    def data(self) -> bytes:
        if self._data is None:                 # serialised on first use
            buf = io.BytesIO()
            np.save(buf, self.array, allow_pickle=False)
            self._data = buf.getvalue()
        return self._data

    @property
    def len(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        if self.array is not None:
            return f"LatentPayload({self.array.dtype}{list(self.array.shape)})"
        return f"LatentPayload({len(self._data)} bytes)"


class Sample:
    """One sample, with the reference datago's attributes (see the module
    docstring for what each source fills in)."""

    __slots__ = ("id", "source", "attributes", "duplicate_state", "image", "masks",
                 "additional_images", "latents", "coca_embedding", "tags")

    def __init__(self, id: str, image: ImagePayload,
                 attributes: Optional[Union[dict, str]] = None,
                 masks: Optional[Dict[str, ImagePayload]] = None,
                 additional_images: Optional[Dict[str, ImagePayload]] = None,
                 source: str = "filesystem", duplicate_state: int = 0,
                 latents: Optional[Dict[str, LatentPayload]] = None,
                 coca_embedding: Optional[List[float]] = None, tags: Optional[List[str]] = None):
        self.id = id
        self.source = source
        self.attributes = {} if attributes is None else attributes
        self.duplicate_state = duplicate_state
        self.image = image
        self.masks = masks or {}
        self.additional_images = additional_images or {}
        self.latents = latents or {}
        self.coca_embedding = coca_embedding or []
        self.tags = tags or []

    @property
    def original_width(self) -> int:
        return self.image.original_width

    @property
    def original_height(self) -> int:
        return self.image.original_height

    def __repr__(self) -> str:
        return (f"Sample(id={self.id!r}, source={self.source!r}, image={self.image!r}, "
                f"masks={list(self.masks)}, latents={list(self.latents)})")


# ---------------------------------------------------------------------------- a pass

_ITEM, _END, _ERR = 0, 1, 2
_lingering: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()


def live_cleanup_threads() -> int:
    """Reading threads of stopped passes still running after ``stop()``'s grace
    period (stuck in a read that has not returned yet; each ends when it does),
    as the reference's function of the same name counts its cleanup reapers."""
    return sum(1 for t in list(_lingering) if t.is_alive())


class _Pass:
    """One pass over a dataset: a producer thread puts its items into a bounded
    queue; ``get()`` hands each to one caller, then the end (or the error) to all."""

    def __init__(self, dataset, maxsize: int):
        self._dataset = dataset
        self._q: "queue.Queue" = queue.Queue(max(1, maxsize))
        self._stop = threading.Event()
        self._final: Optional[tuple] = None
        self._ended = False                     # the producer queued the end of the pass
        self._thread = threading.Thread(target=self._run, name="datago-client", daemon=True)
        self._thread.start()

    def _put(self, entry) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(entry, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        final = self._produce()
        # the end is published only now that the producer holds no sample: a tensor
        # freed by this (daemon) thread while the interpreter exits aborts the
        # process (torch's destructor waits for the GIL, which exits the thread)
        if final is not None and self._put(final) and final[0] == _END:
            self._ended = True
        final = None

    def _produce(self) -> Optional[tuple]:
        """Iterate the dataset into the queue; the pass's end or error (None once
        stopped).  The dataset's iterator is closed before it returns."""
        it = item = None
        try:
            it = iter(self._dataset)
            for item in it:
                if not self._put((_ITEM, item)):
                    return None
                item = None
            return (_END, None)
        except BaseException as e:              # handed to the callers
            item = None
            return (_ERR, e)
        finally:
            close = getattr(it, "close", None)
            it = None
            if close is not None:
                try:
                    close()
                except Exception:               # noqa: BLE001 - the pass is over anyway
                    pass

    def get(self):
        """The next item; None at the end or once stopped; raises the pass's error."""
        while True:
            if self._stop.is_set():
                return None
            final = self._final
            if final is not None:
                if final[0] == _ERR:
                    raise final[1]
                return None
            try:
                kind, value = self._q.get(timeout=POLL_S)      # GIL released while waiting
            except queue.Empty:
                continue
            if kind == _ITEM:
                return value
            self._final = (kind, value)
            try:                                # wake another waiting caller at once
                self._q.put_nowait((kind, value))
            except queue.Full:                  # pragma: no cover - nothing else is queued
                pass

    @property
    def running(self) -> bool:
        """False once stopped, or ended (even when no caller has seen the end yet:
        only the end is left in the queue).  A failed pass runs until a caller has
        been given its error."""
        if self._stop.is_set() or self._final is not None:
            return False
        return not (self._ended and self._q.qsize() <= 1)

    def close(self) -> None:
        self._stop.set()
        while True:                             # free the queued samples now
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        if threading.current_thread() is not self._thread:
            self._thread.join(STOP_GRACE_S)
            if self._thread.is_alive():
                _lingering.add(self._thread)


# ---------------------------------------------------------------------------- the client

def _env_int(name: str) -> Optional[int]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"${name}: must be an integer >= 0, got {raw!r}")
    return value


def _known_keys(d: dict) -> dict:
    """``d`` without the keys no config section knows (compat mode), named in one
    warning; the reference's deprecated keys stay (the config warns about them)."""
    from datago.config import LEGACY_IGNORED
    if "sources" in d:                          # a mix of sources: datago's own schema
        return d
    klass = SOURCE_CONFIGS.get(d.get("source_type", "file"))
    valid = {"": ["source_type", "source_config", "image_config"]
             + [f.name for f in dataclasses.fields(LoaderConfig)],
             "source_config": [f.name for f in dataclasses.fields(klass)] if klass else None,
             "image_config": [f.name for f in dataclasses.fields(ImageConfig)]}
    dropped: List[str] = []

    def keep(section: str, sub: dict) -> dict:
        names = valid[section]
        out = {}
        for k, v in sub.items():
            if names is None or k in names or k in LEGACY_IGNORED:
                out[k] = v
            else:
                dropped.append(f"{section}.{k}" if section else str(k))
        return out

    out = keep("", d)
    for section in ("source_config", "image_config"):
        if isinstance(out.get(section), dict):
            out[section] = keep(section, out[section])
    if dropped:
        warnings.warn(f"datago: compat mode ignores unknown config keys (as the reference "
                      f"does): {', '.join(dropped)}", UserWarning, stacklevel=4)
    return out


def _infer_source_type(raw: dict) -> str:
    """A config without ``source_type``: the reference's default is ``"db"``; a
    ``source_config`` holding ``root_path`` / ``url`` / ``index`` is a folder /
    WebDataset / index config (which the reference would reject)."""
    src = raw.get("source_config")
    keys = src if isinstance(src, dict) else {}
    for key, source_type in (("root_path", "file"), ("url", "webdataset"), ("index", "index")):
        if key in keys:
            return source_type
    return "db"


def _tag_shard_source(listing) -> None:
    """WebDataset: give every sample ref its shard URL as ``meta["source"]`` (the
    reference's ``Sample.source``), on this client's own listing object."""
    ref, stream_refs = listing.ref, listing.stream_refs

    def tagged(r, url):
        return dataclasses.replace(r, meta={**(r.meta or {}), "source": url})

    def ref_with_source(i):
        r = ref(i)
        return tagged(r, getattr(r.path, "url", "webdataset"))

    def stream_refs_with_source(shard, counts):
        url = listing.shards[shard]
        for r in stream_refs(shard, counts):
            yield tagged(r, url)

    listing.ref = ref_with_source
    listing.stream_refs = stream_refs_with_source


class DatagoClient:
    """The reference's ``DatagoClient`` over ``DatagoDataset`` (one sample at a
    time); see the module docstring.

    ``config``: the reference's JSON string (or a dict, or a ``DatagoConfig``).
    ``compat=True``: the reference's behaviour where this client differs on
    purpose -- file ids are JSON-quoted absolute paths, ``attributes`` JSON text
    (JSON-quoted values in ``get_sample_auto_convert``), unknown config keys are
    ignored with a warning, and a bad config is logged and makes ``get_sample()``
    return None instead of raising ``ConfigError``.
    """

    def __init__(self, config: Union[str, dict, DatagoConfig], *, compat: bool = False):
        self.compat = bool(compat)
        self._lock = threading.Lock()
        self._pass: Optional[_Pass] = None
        self._epoch = 0
        self._dataset: Optional[DatagoDataset] = None
        self.config: Optional[DatagoConfig] = None
        if os.environ.get("RUST_LOG") and not _log_initialized:
            initialize_logging()                    # as the reference does with RUST_LOG
        try:
            self._build(config)
        except ConfigError as e:
            if not self.compat:
                raise
            logger.error("Failed to parse config: %s", e)   # the reference's behaviour

    def _build(self, config) -> None:
        seed_given = True
        if isinstance(config, DatagoConfig):
            cfg = config
        else:
            if isinstance(config, str):
                try:
                    raw = json.loads(config)
                except (TypeError, ValueError):
                    DatagoConfig.from_json(config)          # raises the ConfigError
                    raise                                   # pragma: no cover
            elif isinstance(config, dict):
                raw = config
            else:
                DatagoConfig.coerce(config)                 # raises the ConfigError
                raise AssertionError("unreachable")         # pragma: no cover
            if isinstance(raw, dict) and "source_type" not in raw and "sources" not in raw:
                raw = {**raw, "source_type": _infer_source_type(raw)}   # (top-level
                # "sources": a mix of sources, datago's own)
            if self.compat and isinstance(raw, dict):
                raw = _known_keys(raw)
            seed_given = isinstance(raw, dict) and "seed" in raw
            cfg = DatagoConfig.from_dict(raw)
            raw_src = raw.get("source_config") if isinstance(raw, dict) else None
            cfg = self._apply_env(cfg, raw, raw_src if isinstance(raw_src, dict) else {})
        if cfg.loader.batch_size is not None:
            raise ConfigError("batch_size: DatagoClient yields single samples; "
                              "use DatagoDataset for batches")
        if cfg.source.random_sampling and not seed_given:
            seed = secrets.randbits(63)
            cfg = dataclasses.replace(cfg, loader=dataclasses.replace(cfg.loader, seed=seed))
            logger.info("random_sampling without a seed: this client's order has seed %d "
                        "(add \"seed\": %d to the config to read it again)", seed, seed)
        self.config = cfg
        self._dataset = DatagoDataset(cfg, fetch_retries=_env_int("DATAGO_MAX_RETRIES"))
        if cfg.source_type == "webdataset":
            _tag_shard_source(self._dataset.listing)

    @staticmethod
    def _apply_env(cfg: DatagoConfig, raw: dict, raw_src: dict) -> DatagoConfig:
        """``$DATAGO_MAX_TASKS``: decode threads and remote requests in flight,
        unless the config sets them."""
        tasks = _env_int("DATAGO_MAX_TASKS")
        if tasks is None:
            return cfg
        tasks = max(1, tasks)
        if "num_threads" not in raw:
            cfg = dataclasses.replace(cfg, loader=dataclasses.replace(cfg.loader,
                                                                      num_threads=tasks))
        remote = any(f.name == "io_concurrency" for f in dataclasses.fields(cfg.source))
        if remote and "io_concurrency" not in raw_src and not raw_src.get("concurrent_downloads"):
            cfg = dataclasses.replace(cfg, source=dataclasses.replace(cfg.source,
                                                                      io_concurrency=tasks))
        return cfg

    # ------------------------------------------------------------------ passes
    def _begin(self) -> Optional[_Pass]:
        """Begin a pass unless one is running (the lock held)."""
        if self._dataset is None:                   # compat mode, bad config
            return None
        p = self._pass
        if p is not None and p.running:
            return p
        if p is not None:
            p.close()
        self._dataset.set_epoch(self._epoch)
        self._epoch += 1
        self._pass = _Pass(self._dataset, self.config.loader.samples_buffer_size)
        return self._pass

    def start(self) -> None:
        """Begin a pass (the next epoch: reshuffled with ``random_sampling``); while
        a pass is running it does nothing, as in the reference."""
        with self._lock:
            self._begin()

    def get_sample(self) -> Optional[Sample]:
        """The next sample; None at the end of the pass or after ``stop()``, until
        ``start()``.  Safe from any number of threads; see the module docstring."""
        p = self._pass
        if p is None:
            with self._lock:
                if self._pass is None and self._epoch == 0:
                    self._begin()                   # the first read starts the client
                p = self._pass
            if p is None:
                return None
        item = p.get()
        return None if item is None else self._to_sample(item)

    def get_sample_auto_convert(self) -> Optional[dict]:
        """The next sample as the reference's dict of Python values: ``id``,
        ``source``, ``duplicate_state``, ``attributes`` (dict), ``tags``,
        ``coca_embedding``, ``latents`` (``{name: {"data": bytes, "len": int}}``),
        ``image``, ``masks``, ``additional_images`` (PIL images)."""
        s = self.get_sample()
        if s is None:
            return None
        attributes = s.attributes
        if self.compat:                             # the reference's JSON-quoted values
            attributes = {k: json.dumps(v, default=str) for k, v in json.loads(attributes).items()}
        return {"id": s.id, "source": s.source, "duplicate_state": s.duplicate_state,
                "attributes": attributes, "tags": list(s.tags),
                "coca_embedding": list(s.coca_embedding),
                "latents": {k: {"data": v.data, "len": v.len} for k, v in s.latents.items()},
                "image": s.image.to_pil_image(),
                "masks": {k: v.to_pil_image() for k, v in s.masks.items()},
                "additional_images": {k: v.to_pil_image() for k, v in s.additional_images.items()}}

    def stop(self) -> None:
        """End the current pass: waiting and later callers get None until
        ``start()``.  Waits up to 2 s for the reading thread."""
        with self._lock:
            p = self._pass
            if p is not None:
                p.close()
            if self._epoch == 0:
                self._epoch = 1                     # stopped before the first read: no lazy start

    def __iter__(self) -> Iterator[Sample]:
        """Samples until the end of the pass."""
        while (s := self.get_sample()) is not None:
            yield s

    def stats(self) -> dict:
        """The dataset's counters (``DatagoDataset.stats()``)."""
        return self._dataset.stats() if self._dataset is not None else {}

    def __enter__(self) -> "DatagoClient":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):
        # a client dropped while reading stops its pass; at interpreter exit nothing
        # is done (joining threads then aborted the process now and then, in C++)
        if sys.is_finalizing():
            return
        try:
            p = self._pass
            if p is not None and p.running:
                p.close()
        except Exception:                           # noqa: BLE001 - half torn down
            pass

    # ------------------------------------------------------------------ conversion
    def _payload(self, t, orig_hw, is_mask: bool = False) -> ImagePayload:
        arr = t.permute(1, 2, 0).numpy()            # (H, W, C) view of the sample's tensor
        if arr.dtype == np.int32:                   # a 16-bit label mask: its values fit
            arr = arr.astype(np.uint16)
        img = self.config.image
        if img is not None and img.pre_encode_images:
            from PIL import Image
            buf = io.BytesIO()
            pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
            if img.encode_format == "jpeg" and not is_mask:
                pil.save(buf, "JPEG", quality=img.jpeg_quality)
            else:                                   # masks stay lossless (reference #141)
                pil.save(buf, "PNG", compress_level=1)
            return ImagePayload(encoded=buf.getvalue(), width=arr.shape[1], height=arr.shape[0],
                                original_width=orig_hw[1], original_height=orig_hw[0],
                                encoded_channels=arr.shape[2])
        return ImagePayload(arr, original_width=orig_hw[1], original_height=orig_hw[0])

    def _to_sample(self, item: dict) -> Sample:
        cfg = self.config
        orig = tuple(int(v) for v in item["original_size"])
        source_type = cfg.source_type
        if "source_index" in item:                  # a mix: the source the sample came from
            source_type = cfg.source.sources[int(item["source_index"])][1]
        latents: Dict[str, LatentPayload] = {}
        coca: List[float] = []
        for name, v in (item.get("latents") or {}).items():
            if hasattr(v, "numpy"):
                v = v.numpy()
            if name == "coca_embedding" and source_type == "db":
                coca = np.asarray(v, dtype=np.float64).ravel().tolist()
                continue
            latents[name] = LatentPayload(array=v) if isinstance(v, np.ndarray) \
                else LatentPayload(bytes(v))
        sid = item["id"]
        attributes: Any = dict(item["attributes"] or {})
        if self.compat:
            if cfg.source_type == "file":             # (a mix's ids stay as they are)
                sid = json.dumps(os.path.abspath(os.path.join(cfg.source.root_path, sid)))
            attributes = json.dumps(attributes, default=str)
        ds = item.get("duplicate_state", -1 if source_type == "db" else 0)
        return Sample(
            id=sid,
            source=str(item.get("source") or _SOURCE_NAMES.get(source_type, source_type)),
            attributes=attributes,
            duplicate_state=-1 if ds is None else int(ds),
            image=self._payload(item["image"], orig),
            masks={k: self._payload(v, orig, is_mask=True) for k, v in item["masks"].items()},
            additional_images={k: self._payload(v, orig)
                               for k, v in item["additional_images"].items()},
            latents=latents,
            coca_embedding=coca,
            tags=[str(t) for t in (item.get("tags") or ())],
        )
