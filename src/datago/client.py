"""A client with the reference datago's Python API, for users migrating.

    from datago import DatagoClient
    client = DatagoClient(json.dumps(config))     # raises ConfigError on a bad config
    client.start()                                # optional: get_sample() starts lazily
    while (sample := client.get_sample()) is not None:
        sample.id, sample.source, sample.attributes
        sample.image.to_numpy_array()             # (H, W, 3) uint8
        sample.image.to_pil_image()
        sample.masks["mask"].to_numpy_array()     # (H, W, 1) uint8
    client.stop()

Same config schema, same sample fields (``id``, ``source``, ``attributes``,
``duplicate_state``, ``image``, ``masks``, ``additional_images``, ``latents``,
``coca_embedding``, ``tags``) and the same payload API (``get_payload()``,
``to_numpy_array()``, ``to_pil_image()``, ``width``, ``height``,
``original_width``, ``original_height``, ``channels``, ``bit_depth``,
``is_encoded``).  Where the reference misbehaves, this one does not: a bad config
raises instead of logging and returning None forever; ``id`` is the sample id
(path relative to the root), not a JSON-quoted absolute path; ``attributes`` is a
dict with JSON values kept as values; ``to_numpy_array()`` works on encoded
payloads too; unknown keys are errors; ``limit`` is optional (absent: one pass)
and exact.  After the end of a pass or ``stop()``, ``get_sample()`` returns None
until ``start()`` begins a new pass (as in reference 2026.10.1).
"""

from __future__ import annotations

import io
from typing import Dict, Optional, Union

import numpy as np

from datago.config import DatagoConfig
from datago.dataset import DatagoDataset
from datago.errors import ConfigError

__all__ = ["DatagoClient", "ImagePayload", "Sample"]


class ImagePayload:
    """An image of a sample: raw (H, W, C) uint8 pixels, or encoded bytes."""

    def __init__(self, array: Optional[np.ndarray] = None, *, encoded: Optional[bytes] = None,
                 width: int = 0, height: int = 0, original_width: int = 0,
                 original_height: int = 0, encoded_channels: int = 3):
        self._array = array
        self._encoded = encoded
        self._encoded_channels = encoded_channels
        if array is not None:
            height, width = array.shape[:2]
        self.width, self.height = width, height
        self.original_width = original_width or width
        self.original_height = original_height or height

    # -- the reference's payload fields
    @property
    def is_encoded(self) -> bool:
        return self._encoded is not None

    @property
    def channels(self) -> int:
        return -1 if self.is_encoded else (0 if self._array is None else self._array.shape[2])

    @property
    def bit_depth(self) -> int:
        return 8

    @property
    def data(self) -> bytes:
        if self._encoded is not None:
            return self._encoded
        return b"" if self._array is None else np.ascontiguousarray(self._array).tobytes()

    def get_payload(self) -> "ImagePayload":
        """The reference returns an inner payload object; here it is the same object."""
        return self

    # -- conversions
    def to_numpy_array(self) -> np.ndarray:
        """(H, W, C) uint8.  Raw payloads: a read-only view; encoded ones are decoded."""
        if self._encoded is not None:
            from datago.image import decode
            return decode(self._encoded, mode="L" if self._encoded_channels == 1 else "RGB")
        if self._array is None:
            return np.zeros((0, 0, 3), np.uint8)
        view = self._array.view()
        view.flags.writeable = False
        return view

    def to_pil_image(self):
        from PIL import Image
        if self._encoded is not None:
            im = Image.open(io.BytesIO(self._encoded))
            im.load()
            return im
        arr = self.to_numpy_array()
        return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)

    def __repr__(self) -> str:
        kind = "encoded" if self.is_encoded else f"{self.channels}ch"
        return f"ImagePayload({self.width}x{self.height}, {kind})"


class Sample:
    """One sample, with the reference datago's attributes."""

    def __init__(self, id: str, image: ImagePayload, attributes: dict,
                 masks: Dict[str, ImagePayload], additional_images: Dict[str, ImagePayload],
                 source: str = "filesystem"):
        self.id = id
        self.source = source
        self.attributes = attributes
        self.duplicate_state = 0
        self.image = image
        self.masks = masks
        self.additional_images = additional_images
        self.latents: dict = {}
        self.coca_embedding: list = []
        self.tags: list = []

    @property
    def original_width(self) -> int:
        return self.image.original_width

    @property
    def original_height(self) -> int:
        return self.image.original_height

    def __repr__(self) -> str:
        return f"Sample(id={self.id!r}, image={self.image!r}, masks={list(self.masks)})"


class DatagoClient:
    """Reference-compatible client over ``DatagoDataset`` (per-sample mode)."""

    def __init__(self, config: Union[str, dict, DatagoConfig]):
        if isinstance(config, str):
            cfg = DatagoConfig.from_json(config)
        elif isinstance(config, dict):
            cfg = DatagoConfig.from_dict(config)
        elif isinstance(config, DatagoConfig):
            cfg = config
        else:
            raise ConfigError(f"config must be a JSON string, a dict or a DatagoConfig, "
                              f"got {type(config).__name__}")
        if cfg.loader.batch_size is not None:
            raise ConfigError("batch_size: DatagoClient yields single samples; "
                              "use DatagoDataset for batches")
        self.config = cfg
        self._dataset = DatagoDataset(cfg)
        self._it = None
        self._epoch = 0
        self._ended = False

    def start(self) -> None:
        """Begin a pass (a new, reshuffled one after the end of the previous pass)."""
        self.stop()
        self._dataset.set_epoch(self._epoch)
        self._epoch += 1
        self._it = iter(self._dataset)
        self._ended = False

    def get_sample(self) -> Optional[Sample]:
        """The next sample, or None at the end of the pass (or after ``stop()``)."""
        if self._it is None:
            if self._ended:
                return None
            self.start()
        try:
            item = next(self._it)
        except StopIteration:
            self._it = None
            self._ended = True
            return None
        return self._to_sample(item)

    def get_sample_auto_convert(self) -> Optional[dict]:
        """The next sample as a dict of Python/PIL values (the reference's auto-convert)."""
        s = self.get_sample()
        if s is None:
            return None
        return {"id": s.id, "source": s.source, "duplicate_state": s.duplicate_state,
                "attributes": s.attributes, "tags": s.tags, "coca_embedding": s.coca_embedding,
                "latents": {}, "image": s.image.to_pil_image(),
                "masks": {k: v.to_pil_image() for k, v in s.masks.items()},
                "additional_images": {k: v.to_pil_image() for k, v in s.additional_images.items()}}

    def stop(self) -> None:
        """End the current pass and release its threads."""
        if self._it is not None:
            close = getattr(self._it, "close", None)
            if close is not None:
                close()
            self._it = None
            self._ended = True

    def stats(self) -> dict:
        return self._dataset.stats()

    def __enter__(self) -> "DatagoClient":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):
        try:
            self.stop()
        except Exception:
            pass

    # ------------------------------------------------------------------ conversion
    def _payload(self, t, orig_hw) -> ImagePayload:
        arr = t.permute(1, 2, 0).numpy()            # (H, W, C) view of the sample's tensor
        img = self.config.image
        if img is not None and img.pre_encode_images:
            from PIL import Image
            buf = io.BytesIO()
            pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
            if img.encode_format == "jpeg":
                pil.save(buf, "JPEG", quality=img.jpeg_quality)
            else:
                pil.save(buf, "PNG", compress_level=1)
            return ImagePayload(encoded=buf.getvalue(), width=arr.shape[1], height=arr.shape[0],
                                original_width=orig_hw[1], original_height=orig_hw[0],
                                encoded_channels=arr.shape[2])
        return ImagePayload(arr, original_width=orig_hw[1], original_height=orig_hw[0])

    def _to_sample(self, item: dict) -> Sample:
        orig = tuple(int(v) for v in item["original_size"])
        return Sample(
            id=item["id"],
            image=self._payload(item["image"], orig),
            attributes=dict(item["attributes"]),
            masks={k: self._payload(v, orig) for k, v in item["masks"].items()},
            additional_images={k: self._payload(v, orig)
                               for k, v in item["additional_images"].items()},
        )

