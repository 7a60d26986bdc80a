"""Image decoding and decode-to-bucket.

JPEG (libjpeg-turbo) and PNG (libspng) are decoded by the Cython core with the
GIL released; WebP, BMP, GIF and TIFF go through Pillow with the same contract
(same modes, EXIF orientation, alpha handling, errors, size guard).

Conventions
-----------
* Arrays are ``(H, W, C)`` uint8, C = 3 (``"RGB"``), 4 (``"RGBA"``) or 1 (``"L"``).
* The EXIF orientation (JPEG APP1, PNG eXIf before the image data, or any format
  Pillow reads) is applied: the array is what an image viewer shows.
* Alpha dropped by ``"RGB"``/``"L"`` is composited over ``background``
  (default mid-grey ``(128, 128, 128)``, as the reference datago does).
* 16-bit samples are reduced by rounding, ``round(v / 257)``, not truncation.
* ``"L"`` is ITU-R 601-2 luma (as Pillow's ``convert("L")``); from a colour JPEG
  it is the decoder's Y channel.
* CMYK/YCCK JPEGs are read as Adobe-inverted CMYK and converted like Pillow.
* ``max_pixels`` (default ``DEFAULT_MAX_PIXELS`` = 178,956,970, Pillow's
  decompression-bomb error threshold) is checked against the header before any
  pixel buffer is allocated: ``ImageTooLargeError``.
* Corrupt, truncated, empty or unsupported data raises ``DecodeError`` (a
  ``ValueError``) whose message names the format and the cause.  A partially
  decoded image is never returned.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from datago._core import _pipeline, _resample
from datago.buckets import Bucket, nearest_bucket
from datago.errors import DecodeError

__all__ = [
    "DEFAULT_BACKGROUND", "DEFAULT_FILTER", "DEFAULT_MAX_PIXELS", "BucketResult",
    "ImageInfo", "decode", "decode_to_bucket", "read_header", "resize",
]

DEFAULT_MAX_PIXELS = 178_956_970
"""Largest width x height decoded by default (Pillow's DecompressionBombError limit)."""

DEFAULT_BACKGROUND: Tuple[int, int, int] = (128, 128, 128)
"""Colour under transparent pixels when alpha is dropped (the reference datago's grey)."""

DEFAULT_FILTER = "triangle"
"""Resampling filter of decode_to_bucket and resize (see ``resize`` for the choice)."""

_MODES = ("RGB", "RGBA", "L")
BytesLike = Union[bytes, bytearray, memoryview, np.ndarray]


class ImageInfo(NamedTuple):
    """What the header says: format, stored size and EXIF orientation (1..8)."""
    format: str
    width: int
    height: int
    orientation: int

    @property
    def display_size(self) -> Tuple[int, int]:
        """(width, height) after the EXIF orientation, as a viewer shows the image."""
        if self.orientation >= 5:
            return self.height, self.width
        return self.width, self.height


class BucketResult(NamedTuple):
    """Result of ``decode_to_bucket``.

    Orders are spelled out because they differ by convention:

    * ``image``: the (H, W, C) uint8 output (``out`` when one was given);
    * ``bucket``: ``(width, height)``, as in the bucket list;
    * ``original_size``: ``(height, width)`` of the displayed source image (SDXL's
      ``original_size``);
    * ``crop_coords``: ``(top, left)`` of the crop in the cover-resized image, in
      output pixels (SDXL's ``crops_coords_top_left``);
    * ``crop_box``: ``(left, top, right, bottom)`` of the crop in source pixels
      (display orientation, floats).
    """
    image: np.ndarray
    bucket: Bucket
    original_size: Tuple[int, int]
    crop_coords: Tuple[int, int]
    crop_box: Tuple[float, float, float, float]


def _view(data: BytesLike) -> Union[bytes, memoryview]:
    """A contiguous byte view of any bytes-like object, or TypeError."""
    if isinstance(data, (bytes, bytearray)):
        return data
    if isinstance(data, str):
        raise TypeError("data must be a bytes-like object (the encoded file), not str; "
                        "read the file with open(path, 'rb')")
    try:
        mv = memoryview(data)
    except TypeError:
        raise TypeError(f"data must be a bytes-like object, got {type(data).__name__}") from None
    if not mv.c_contiguous:
        raise TypeError("data must be a contiguous bytes-like object")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def _check_common(mode: str, max_pixels: int, background) -> bytes:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    try:
        bg = bytes(int(c) for c in background)
    except (TypeError, ValueError):
        raise ValueError(f"background must be three ints in 0..255, got {background!r}") from None
    if len(bg) != 3:
        raise ValueError(f"background must be three ints in 0..255, got {background!r}")
    return bg


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to a stored-orientation (H, W, C) array."""
    if orientation == 1:
        return arr
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
        8: lambda a: np.rot90(a, 1),
    }
    return np.ascontiguousarray(ops[orientation](arr))


def read_header(data: BytesLike) -> ImageInfo:
    """Format, stored size and EXIF orientation, reading only the header.

    Raises DecodeError for corrupt or unrecognised data.
    """
    view = _view(data)
    if len(view) == 0:
        raise DecodeError("empty input (0 bytes)")
    info = _pipeline.read_header(view)
    if info is not None:
        return ImageInfo(*info)
    from datago import _fallback
    return _fallback.read_header(view)


def decode(data: BytesLike, *, mode: str = "RGB", max_pixels: int = DEFAULT_MAX_PIXELS,
           background: Sequence[int] = DEFAULT_BACKGROUND) -> np.ndarray:
    """Decode an encoded image to an (H, W, C) uint8 array, EXIF orientation applied.

    ``data`` is any bytes-like object holding a JPEG, PNG, WebP, BMP, GIF or TIFF
    file.  ``mode`` is ``"RGB"``, ``"RGBA"`` or ``"L"``; see the module docstring
    for alpha, 16-bit, grey and CMYK handling.  The returned array owns its memory.

    Raises DecodeError (corrupt, truncated, empty or unsupported data),
    ImageTooLargeError (more than ``max_pixels`` pixels, from the header),
    TypeError (``data`` is not bytes-like) or ValueError (bad arguments).
    """
    bg = _check_common(mode, max_pixels, background)
    view = _view(data)
    res = _pipeline.decode(view, mode, int(max_pixels), bg)
    if res is None:
        from datago import _fallback
        return _fallback.decode(view, mode, int(max_pixels), bg, indices=False)
    arr, orientation = res
    return _orient(arr, orientation)


def resize(img: np.ndarray, size: Tuple[int, int], *, box=None, filter: str = DEFAULT_FILTER,
           out: Optional[np.ndarray] = None) -> np.ndarray:
    """Resample ``img[box]`` to ``size = (width, height)`` with an antialiased filter.

    ``img`` is uint8 (H, W) or (H, W, C) with C in 1, 3, 4; ``box`` is
    ``(left, top, right, bottom)`` in source pixels (floats allowed, default the
    whole image).  ``out``, if given, receives the result (any strides, e.g. a
    slice of a batch).  The GIL is released while resampling.

    Filters: ``"triangle"`` (default; antialiased bilinear, support 1), ``"lanczos"``
    (Lanczos-3, support 3, sharper, about 1.7x the cost), ``"box"`` (area average)
    and ``"nearest"`` (for label masks).  Geometry and edge handling follow
    Pillow's ``Image.resize(size, filter, box)``; the result is within 1 of an
    exact float64 computation of the same filter.  The default is the triangle
    filter because after DCT-domain downscaling the remaining scale factor is
    close to 1, where it is visually on par with Lanczos for training data while
    costing about 60% as much (benchmarks/RESULTS.md).
    """
    w, h = size
    return _resample.resize(img, int(w), int(h), box=box, filter=filter, out=out)


def _picker(buckets, bucket) -> Callable[[int, int], Bucket]:
    if bucket is not None:
        try:
            bw, bh = bucket
            bw, bh = int(bw), int(bh)
        except (TypeError, ValueError):
            raise ValueError(f"bucket must be a (width, height) pair, got {bucket!r}") from None
        if bw <= 0 or bh <= 0:
            raise ValueError(f"bucket must have a positive size, got {bucket!r}")
        return lambda w, h: (bw, bh)
    if buckets is None:
        raise ValueError("give the bucket list (buckets=...) or a fixed bucket (bucket=...)")
    buckets = [tuple(b) for b in buckets]
    nearest_bucket(1, 1, buckets)           # validates the list once
    return lambda w, h: nearest_bucket(w, h, buckets)


def decode_to_bucket(data: BytesLike, buckets: Optional[Sequence[Bucket]] = None, *,
                     bucket: Optional[Bucket] = None, out: Optional[np.ndarray] = None,
                     mask: bool = False, mode: Optional[str] = None,
                     filter: str = DEFAULT_FILTER, max_pixels: int = DEFAULT_MAX_PIXELS,
                     background: Sequence[int] = DEFAULT_BACKGROUND) -> BucketResult:
    """Decode, pick the bucket, cover-resize and centre-crop in one fused pass.

    Steps: read the header; apply the EXIF orientation; pick the bucket nearest to
    the displayed aspect ratio (``nearest_bucket``, log metric), or use ``bucket``;
    compute the cover-scale crop rectangle (centred) in source coordinates; for a
    JPEG, decode at the smallest fast DCT scale m/8 (m in 1, 2, 3, 4, 8) that
    still covers the crop at the bucket's resolution; resample only the crop into
    the output.  There is no full-size intermediate copy: the decoder writes to a
    per-thread scratch buffer and the resampler writes straight into ``out``.

    ``out``: optional uint8 array of shape (bucket_h, bucket_w, C) (any strides, e.g.
    ``batch[i]`` of an (N, H, W, C) array or a transposed (C, H, W) view); it
    must match the chosen bucket.  ``mode``: ``"RGB"`` (C = 3, default) or ``"L"``
    (C = 1, the default for masks).  ``mask=True`` resamples with nearest
    neighbour and no DCT scaling, so label values survive; palette PNG masks give
    their palette indices.

    Raises the same errors as ``decode``.
    """
    if mode is None:
        mode = "L" if mask else "RGB"
    if mode not in ("RGB", "L"):
        raise ValueError(f"decode_to_bucket supports mode 'RGB' or 'L', got {mode!r}")
    bg = _check_common(mode, max_pixels, background)
    filt = _resample.filter_id(filter)
    pick = _picker(buckets, bucket)
    view = _view(data)
    if out is not None and not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array (use tensor.numpy() for a torch tensor), "
                        f"got {type(out).__name__}")
    res = _pipeline.decode_to_bucket(view, pick, out, mode, bool(mask), filt,
                                     int(max_pixels), bg)
    if res is None:
        from datago import _fallback
        arr = _fallback.decode(view, mode, int(max_pixels), bg, indices=mask)
        dh, dw = arr.shape[:2]
        tw, th = pick(dw, dh)
        box = _pipeline.cover_box(dw, dh, tw, th)
        if out is not None and out.ndim == 2:
            out = out[:, :, None]
        if out is not None and out.shape != (th, tw, arr.shape[2]):
            raise ValueError(f"out must have shape ({th}, {tw}, {arr.shape[2]}) for bucket "
                             f"{tw}x{th}, got {tuple(out.shape)}")
        img = _resample.resize(arr, tw, th, box=box, filter="nearest" if mask else filter, out=out)
        res = (img, (dw, dh), (tw, th), box, 1)
    img, (dw, dh), (tw, th), box, _ = res
    scale = max(tw / dw, th / dh)
    crop = (int(round(box[1] * scale)), int(round(box[0] * scale)))
    return BucketResult(img, (tw, th), (dh, dw), crop, tuple(float(v) for v in box))

