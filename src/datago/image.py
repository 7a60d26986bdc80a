"""Image decoding and decode-to-bucket.

JPEG (libjpeg-turbo) and PNG (libspng) are decoded by the Cython core with the
GIL released; WebP, BMP, GIF and TIFF go through Pillow with the same contract
(same modes, EXIF orientation, alpha handling, errors, size guard).

Conventions
-----------
* Arrays are ``(H, W, C)`` uint8, C = 3 (``"RGB"``), 4 (``"RGBA"``) or 1 (``"L"``).
* Every size pair is ``(height, width)``, the order arrays and tensors are
  indexed in: buckets (``Bucket(height, width)``), ``resize`` targets,
  ``BucketResult.original_size``, ``ImageInfo.display_size``.  Boxes are
  ``(left, top, right, bottom)`` as in Pillow; ``crop_coords`` is ``(top, left)``.
  Messages spell sizes the image way, ``WxH`` (``352x720``: 352 wide, 720 high).
* The EXIF orientation (the first JPEG APP1 Exif, the last PNG eXIf wherever it
  is, or any format Pillow reads; read as Pillow reads it, every entry
  bounds-checked) is applied: the array is what an image viewer shows.
* Alpha dropped by ``"RGB"``/``"L"`` is composited over ``background``
  (default mid-grey ``(128, 128, 128)``, as the reference datago does).
* 16-bit samples are reduced by rounding, ``round(v / 257)``, not truncation.
* ``"L"`` is ITU-R 601-2 luma (as Pillow's ``convert("L")``); from a colour JPEG
  it is the decoder's Y channel.
* CMYK/YCCK JPEGs are read as Adobe-inverted CMYK and converted like Pillow.
* ``max_pixels`` (default ``DEFAULT_MAX_PIXELS`` = 178,956,970, Pillow's
  decompression-bomb error threshold) is checked against the header before any
  pixel buffer is allocated: ``ImageTooLargeError``.  Values above
  ``HARD_MAX_PIXELS`` (2**40) act as that limit.  Buckets, resize targets and
  boxes are validated the same way (sides in 1..2**31 - 1, at most
  ``max_pixels`` pixels): an impossible size is a ``ValueError``, never an
  allocation attempt.
* Corrupt, truncated, empty or unsupported data raises ``DecodeError`` (a
  ``ValueError``) whose message names the format and the cause.  A partially
  decoded image is never returned.  JPEG headers that libjpeg decodes with a
  warning but correct pixels (bytes before a marker, an APPn length below 2, an
  unknown JFIF version or Adobe transform, bad scan parameters in a sequential
  file) are accepted; ``BucketResult.warning`` says so.  Warnings about the
  compressed data itself (bad Huffman code, premature end, lost restart sync,
  inconsistent progression) are errors.

Masks (``decode_to_bucket(..., mask=True)``) keep their values: see
``decode_to_bucket``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from datago._core import _pipeline, _resample
from datago.buckets import Bucket, nearest_bucket
from datago.errors import DecodeError, MaskMismatchError

__all__ = [
    "DEFAULT_BACKGROUND", "DEFAULT_FILTER", "DEFAULT_MAX_PIXELS", "HARD_MAX_PIXELS",
    "MASK_ASPECT_TOLERANCE", "BucketResult", "ImageInfo", "MaskMismatchError", "decode",
    "decode_to_bucket", "decode_with_warning", "read_header", "resize",
]

DEFAULT_MAX_PIXELS = 178_956_970
"""Largest width x height decoded by default (Pillow's DecompressionBombError limit)."""

HARD_MAX_PIXELS = 1 << 40
"""A larger ``max_pixels`` acts as this (no image that size can be held in memory)."""

MASK_ASPECT_TOLERANCE = 0.01
"""A mask whose size differs from its image's is aligned when the aspect ratios
differ by at most this fraction; otherwise it is a ``MaskMismatchError``."""

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
        """``(height, width)`` after the EXIF orientation, as a viewer shows the image
        (the shape ``decode`` returns: ``decode(data).shape[:2]``).  ``width`` and
        ``height`` are the stored sizes, before the orientation."""
        if self.orientation >= 5:
            return self.width, self.height
        return self.height, self.width


class BucketResult(NamedTuple):
    """Result of ``decode_to_bucket``.

    Orders are spelled out because they differ by convention:

    * ``image``: the (H, W, C) uint8 output (``out`` when one was given);
    * ``bucket``: the ``Bucket(height, width)``, equal to ``image.shape[:2]``;
    * ``original_size``: ``(height, width)`` of the displayed source image (SDXL's
      ``original_size``);
    * ``crop_coords``: ``(top, left)`` of the crop in the cover-resized image, in
      output pixels (SDXL's ``crops_coords_top_left``);
    * ``crop_box``: ``(left, top, right, bottom)`` of the crop in source pixels
      (display orientation, floats);
    * ``warning``: None, or what libjpeg would have warned about in a JPEG header
      datago repaired to decode it (the loader counts ``decoded_with_warnings``).
    """
    image: np.ndarray
    bucket: Bucket
    original_size: Tuple[int, int]
    crop_coords: Tuple[int, int]
    crop_box: Tuple[float, float, float, float]
    warning: Optional[str] = None


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


def _max_pixels(max_pixels) -> int:
    """``max_pixels`` validated (a positive integer), capped at HARD_MAX_PIXELS."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    return min(int(max_pixels), HARD_MAX_PIXELS)


def _check_common(mode: str, max_pixels: int, background) -> bytes:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    _max_pixels(max_pixels)
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
    if info is None:
        from datago import _fallback
        info = _fallback.read_header(view)
    else:
        info = ImageInfo(*info)
    if info.width <= 0 or info.height <= 0:
        raise DecodeError(f"{info.format.upper()}: the header gives a {info.width}x{info.height} "
                          "image")
    return info


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
    return decode_with_warning(data, mode=mode, max_pixels=max_pixels, background=background)[0]


def decode_with_warning(data: BytesLike, *, mode: str = "RGB",
                        max_pixels: int = DEFAULT_MAX_PIXELS,
                        background: Sequence[int] = DEFAULT_BACKGROUND
                        ) -> Tuple[np.ndarray, Optional[str]]:
    """``decode``, and the warning of a JPEG header datago repaired (or None): what
    ``BucketResult.warning`` reports for ``decode_to_bucket``."""
    bg = _check_common(mode, max_pixels, background)
    mp = _max_pixels(max_pixels)
    view = _view(data)
    res = _pipeline.decode(view, mode, mp, bg)
    if res is None:
        from datago import _fallback
        return _fallback.decode(view, mode, mp, bg), None
    arr, orientation, warning = res
    return _orient(arr, orientation), warning


def _size_pair(size, what: str = "size") -> Tuple[int, int]:
    """``size`` as a validated ``(height, width)`` pair of ints."""
    try:
        h, w = size
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a (height, width) pair, got {size!r}") from None
    w = _resample.check_extent(w, f"{what} width")
    return _resample.check_extent(h, f"{what} height"), w


def resize(img: np.ndarray, size: Tuple[int, int], *, box=None, filter: str = DEFAULT_FILTER,
           out: Optional[np.ndarray] = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Resample ``img[box]`` to ``size = (height, width)`` with an antialiased filter.

    ``size`` is in torchvision's order, the shape of the result (``resize(img,
    (h, w)).shape[:2] == (h, w)``); Pillow's ``Image.resize`` takes ``(width,
    height)`` instead.  ``img`` is uint8 (H, W) or (H, W, C) with C in 1, 3, 4; ``box`` is
    ``(left, top, right, bottom)`` in source pixels (floats allowed, default the
    whole image).  ``out``, if given, receives the result (any strides, e.g. a
    slice of a batch).  The GIL is released while resampling.  A target with a
    side outside 1..2**31 - 1 or more than ``max_pixels`` pixels raises
    ValueError.  With ``filter="nearest"``, label images of type uint16 or int32
    (any number of channels) are accepted too; their values are copied.

    Filters: ``"triangle"`` (default; antialiased bilinear, support 1), ``"lanczos"``
    (Lanczos-3, support 3, sharper, about 1.7x the cost), ``"box"`` (area average)
    and ``"nearest"`` (for label masks).  Geometry and edge handling follow
    Pillow's ``Image.resize((width, height), filter, box)``; the result is within 1 of an
    exact float64 computation of the same filter.  The default is the triangle
    filter because after DCT-domain downscaling the remaining scale factor is
    close to 1, where it is visually on par with Lanczos for training data while
    costing about 60% as much (benchmarks/RESULTS.md).
    """
    h, w = _size_pair(size, "target")
    mp = _max_pixels(max_pixels)
    arr = np.asarray(img)
    if filter == "nearest" and arr.dtype in (np.uint16, np.int32):
        return _resample.nearest(arr, w, h, box=box, out=out, max_pixels=mp)
    return _resample.resize(img, w, h, box=box, filter=filter, out=out, max_pixels=mp)


def _picker(buckets, bucket) -> Callable[[int, int], Bucket]:
    """``choose(height, width) -> Bucket``: the fixed ``bucket``, or the one of
    ``buckets`` nearest to the displayed image's aspect ratio."""
    if bucket is not None:
        try:
            bh, bw = bucket
            fixed = Bucket(int(bh), int(bw))
        except (TypeError, ValueError):
            raise ValueError(f"bucket must be a (height, width) pair, got {bucket!r}") from None
        if fixed.height <= 0 or fixed.width <= 0:
            raise ValueError(f"bucket must have a positive size, got {bucket!r} "
                             "(height, width)")
        return lambda h, w: fixed
    if buckets is None:
        raise ValueError("give the bucket list (buckets=...) or a fixed bucket (bucket=...)")
    buckets = [tuple(b) for b in buckets]
    nearest_bucket(1, 1, buckets)           # validates the list once
    return lambda h, w: nearest_bucket(h, w, buckets)


def _core_pick(choose: Callable[[int, int], Bucket]) -> Callable[[int, int], Tuple[int, int]]:
    """``choose`` in the Cython core's protocol, which is (width, height) both ways:
    ``pick(display_w, display_h) -> (bucket_w, bucket_h)``."""
    def pick(dw: int, dh: int) -> Tuple[int, int]:
        b = choose(dh, dw)
        return b[1], b[0]
    return pick


def decode_to_bucket(data: BytesLike, buckets: Optional[Sequence[Bucket]] = None, *,
                     bucket: Optional[Bucket] = None, out: Optional[np.ndarray] = None,
                     mask: bool = False, mode: Optional[str] = None,
                     filter: str = DEFAULT_FILTER, max_pixels: int = DEFAULT_MAX_PIXELS,
                     background: Sequence[int] = DEFAULT_BACKGROUND,
                     like: Optional[BucketResult] = None) -> BucketResult:
    """Decode, pick the bucket, cover-resize and centre-crop in one fused pass.

    Steps: read the header; apply the EXIF orientation; pick the bucket nearest to
    the displayed aspect ratio (``nearest_bucket``, log metric), or use ``bucket``;
    compute the cover-scale crop rectangle (centred) in source coordinates; for a
    JPEG, decode at the smallest fast DCT scale m/8 (m in 1, 2, 3, 4, 8) that
    still covers the crop at the bucket's resolution; resample only the crop into
    the output.  There is no full-size intermediate copy: the decoder writes to a
    per-thread scratch buffer and the resampler writes straight into ``out``.

    ``buckets`` is a list of ``(height, width)`` pairs (``make_buckets``' list);
    ``bucket`` a single ``(height, width)``.  The result's ``image.shape[:2]`` is
    the bucket.

    ``out``: optional uint8 array of shape (bucket_h, bucket_w, C) (any strides, e.g.
    ``batch[i]`` of an (N, H, W, C) array or a transposed (C, H, W) view); it
    must match the chosen bucket.  ``mode``: ``"RGB"`` (C = 3, default) or ``"L"``
    (C = 1).

    ``mask=True`` reads a label mask: its values are kept exactly (nearest
    neighbour, no DCT scaling, no colour conversion, alpha dropped, never
    composited):

    * 8-bit (and 1/2/4-bit) grey gives the stored values as uint8 (not scaled);
      palette images give their indices (uint8);
    * 16-bit grey gives int32 (torch.int32 in batches: torch.uint16 supports few
      operations); ``out`` may also be uint16;
    * colour (RGB, RGBA, colour JPEG) gives 3 channels, never averaged to luma;
    * ``mode="RGB"`` asks for colours instead (palette expanded, grey
      replicated; for ``mask_palette`` mapping), ``mode="L"`` refuses a colour
      mask (``MaskMismatchError``);
    * ``like=result`` (the image's ``BucketResult``) aligns the mask with that
      image: same bucket, and the image's crop box scaled to the mask's size
      when the sizes differ and the aspect ratios agree within
      ``MASK_ASPECT_TOLERANCE`` (1%); otherwise ``MaskMismatchError`` (a
      ``ValueError``).  Without ``like`` the mask gets its own cover crop.

    Raises the same errors as ``decode``.
    """
    if mask:
        return _mask_to_bucket(data, buckets, bucket, out, mode, max_pixels, like)
    if like is not None:
        raise ValueError("like= aligns a mask with its image: use it with mask=True")
    if mode is None:
        mode = "RGB"
    if mode not in ("RGB", "L"):
        raise ValueError(f"decode_to_bucket supports mode 'RGB' or 'L', got {mode!r}")
    bg = _check_common(mode, max_pixels, background)
    mp = _max_pixels(max_pixels)
    filt = _resample.filter_id(filter)
    choose = _picker(buckets, bucket)
    pick = _core_pick(choose)
    view = _view(data)
    if out is not None and not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array (use tensor.numpy() for a torch tensor), "
                        f"got {type(out).__name__}")
    res = _pipeline.decode_to_bucket(view, pick, out, mode, filt, mp, bg)
    if res is None:
        from datago import _fallback
        arr = _fallback.decode(view, mode, mp, bg)
        dh, dw = arr.shape[:2]
        th, tw = _size_pair(choose(dh, dw), "bucket")
        box = _pipeline.cover_box(dw, dh, tw, th)
        if out is not None and out.ndim == 2:
            out = out[:, :, None]
        if out is not None and out.shape != (th, tw, arr.shape[2]):
            raise ValueError(f"out must have shape ({th}, {tw}, {arr.shape[2]}) for bucket "
                             f"{tw}x{th}, got {tuple(out.shape)}")
        img = _resample.resize(arr, tw, th, box=box, filter=filter, out=out, max_pixels=mp)
        res = (img, (dw, dh), (tw, th), box, 1, None)
    return _result(res)


def _result(res) -> BucketResult:
    """The BucketResult of a core result tuple, whose sizes are (width, height):
    ``(image, (display_w, display_h), (bucket_w, bucket_h), box, orientation, warning)``."""
    img, (dw, dh), (tw, th), box, _, warning = res
    scale = max(tw / dw, th / dh)
    crop = (int(round(box[1] * scale)), int(round(box[0] * scale)))
    return BucketResult(img, Bucket(th, tw), (dh, dw), crop, tuple(float(v) for v in box),
                        warning)


_MASK_WANT = {None: _pipeline.MASK_VALUES, "L": _pipeline.MASK_ONE, "RGB": _pipeline.MASK_COLOURS}


def _follow(like) -> Callable[[int, int], tuple]:
    """The mask ``pick`` that aligns a mask with the image of ``like``, in the core's
    protocol: ``pick(display_w, display_h) -> (bucket_w, bucket_h, box)``."""
    try:
        ih, iw = (int(v) for v in like.original_size)
        th, tw = (int(v) for v in like.bucket)
        box = tuple(float(v) for v in like.crop_box)
    except (AttributeError, TypeError, ValueError):
        raise TypeError(f"like must be the image's BucketResult, got {type(like).__name__}") from None

    def pick(dw: int, dh: int):
        if (dw, dh) == (iw, ih):
            return tw, th, box
        off = abs((dw * ih) / (dh * iw) - 1.0)
        if off > MASK_ASPECT_TOLERANCE:
            raise MaskMismatchError(
                f"the mask is {dw}x{dh} and its image {iw}x{ih}: aspect ratios "
                f"{dw / dh:.4f} and {iw / ih:.4f} differ by {off:.1%} (more than "
                f"{MASK_ASPECT_TOLERANCE:.0%}), so the mask cannot be aligned")
        sx, sy = dw / iw, dh / ih
        x0, y0, x1, y1 = box
        return tw, th, (min(x0 * sx, dw), min(y0 * sy, dh), min(x1 * sx, dw), min(y1 * sy, dh))
    return pick


def _mask_to_bucket(data, buckets, bucket, out, mode, max_pixels, like) -> BucketResult:
    if mode not in _MASK_WANT:
        raise ValueError(f"a mask is read with mode None (its values), 'L' (one channel) or "
                         f"'RGB' (colours), got {mode!r}")
    want = _MASK_WANT[mode]
    mp = _max_pixels(max_pixels)
    if like is not None:
        if buckets is not None or bucket is not None:
            raise ValueError("like= gives the mask its image's bucket: do not pass buckets or bucket")
        pick = _follow(like)
    else:
        choose = _picker(buckets, bucket)

        def pick(dw: int, dh: int):             # the core's (width, height) protocol
            th, tw = _size_pair(choose(dh, dw), "bucket")
            return tw, th, _pipeline.cover_box(dw, dh, tw, th)
    view = _view(data)
    if out is not None and not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array (use tensor.numpy() for a torch tensor), "
                        f"got {type(out).__name__}")
    res = _pipeline.mask_to_bucket(view, pick, out, want, mp)
    if res is None:
        arr = _pillow_mask(view, want, mp)
        dh, dw = arr.shape[:2]
        tw, th, box = pick(dw, dh)
        img = _resample.nearest(arr, tw, th, box=box, out=out,
                                dtype=np.uint8 if arr.dtype == np.uint8 else np.int32,
                                max_pixels=mp)
        if img.ndim == 2:
            img = img[:, :, None]
        res = (img, (dw, dh), (tw, th), box, 1, None)
    return _result(res)


def _pillow_mask(view, want: int, max_pixels: int) -> np.ndarray:
    """A mask in another format (GIF, BMP, TIFF, WebP) as (H, W, C) values in display
    orientation: uint8, uint16 (16-bit grey) or int32 (32-bit integer TIFF); every
    error Pillow raises on bad data is a DecodeError."""
    from datago import _fallback
    return _fallback._typed(lambda: _pillow_mask_values(view, want, max_pixels))


def _pillow_mask_values(view, want: int, max_pixels: int) -> np.ndarray:
    from datago import _fallback
    im, fmt = _fallback.load(view, max_pixels)
    m = im.mode
    if m == "F":
        raise MaskMismatchError(f"{fmt}: a floating-point image is not a label mask")
    if want == _pipeline.MASK_COLOURS:
        if m.startswith("I"):
            raise MaskMismatchError(f"{fmt}: a 16/32-bit mask has no 8-bit colours to match "
                                    "a palette against (mask_palette needs 8-bit colour masks)")
        if m in ("1", "L", "LA", "La"):
            a = np.asarray(im.convert("L") if m != "L" else im, dtype=np.uint8)
            return np.repeat(a[:, :, None], 3, axis=2)
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    if m in ("1", "L", "P"):
        a = np.asarray(im).astype(np.uint8)[:, :, None]          # "1": 0/1; "P": indices
    elif m in ("LA", "La", "PA"):
        a = np.asarray(im)[:, :, :1].astype(np.uint8)
    elif m.startswith("I;16"):
        a = np.asarray(im).astype(np.uint16)[:, :, None]
    elif m == "I":
        a = np.asarray(im).astype(np.int32)[:, :, None]
    elif m in ("RGB", "RGBA", "RGBX"):
        a = np.asarray(im)[:, :, :3]
    else:                                                        # CMYK, YCbCr, ...
        a = np.asarray(im.convert("RGB"))
    if want == _pipeline.MASK_ONE and a.shape[2] != 1:
        raise MaskMismatchError(f"{fmt}: a colour (RGB) mask has 3 channels; reading it as "
                                "one would average its labels")
    return np.ascontiguousarray(a)

