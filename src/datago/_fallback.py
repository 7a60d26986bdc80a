"""Formats outside the core (WebP, BMP, GIF, TIFF, ...) through Pillow, same contract.

Same modes, EXIF orientation, alpha compositing, 16-bit rounding, size guard and
typed errors as the core.  Pillow releases the GIL while it decodes.
"""

from __future__ import annotations

import io

import numpy as np

from datago.errors import DatagoError, DecodeError, ImageTooLargeError

# Formats we hand to Pillow; anything else is "unrecognised" (Pillow also opens
# odd formats such as ICO or PCX, which are not image-dataset material).
FORMATS = ("WEBP", "BMP", "GIF", "TIFF")


def _open(view, max_pixels: int):
    from PIL import Image, UnidentifiedImageError
    head = bytes(view[:12])
    try:
        im = Image.open(io.BytesIO(view), formats=FORMATS)
    except UnidentifiedImageError:
        raise DecodeError(f"unrecognised image format (first bytes {head!r}); "
                          f"supported: JPEG, PNG, {', '.join(f.title() for f in FORMATS)}") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError(f"image header could not be read: {e}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise DecodeError(f"{im.format}: invalid image size {w}x{h}")
    if w * h > max_pixels:
        raise ImageTooLargeError(
            f"{im.format}: {w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels} "
            "(decompression-bomb guard; raise max_pixels to allow it)")
    return im


def _typed(fn):
    """Run ``fn()``; anything Pillow raises on bad data becomes ``DecodeError`` (it
    raises TypeError, KeyError, IndexError, ... on some malformed TIFFs, and an
    untyped error would end an epoch instead of skipping one file)."""
    from PIL import Image
    try:
        return fn()
    except DatagoError:                       # typed already (DecodeError, MaskMismatchError...)
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(str(e)) from None
    except Exception as e:                    # noqa: BLE001 - see the docstring
        raise DecodeError(f"image could not be read: {type(e).__name__}: {e}") from None


def read_header(view):
    from datago.image import ImageInfo

    def run():
        im = _open(view, 1 << 62)
        orientation = im.getexif().get(0x0112, 1)
        if orientation not in range(1, 9):
            orientation = 1
        return ImageInfo(im.format.lower(), im.size[0], im.size[1], orientation)
    return _typed(run)


def decode(view, mode: str, max_pixels: int, background: bytes) -> np.ndarray:
    """(H, W, C) uint8 in display orientation."""
    return _typed(lambda: _decode(view, mode, max_pixels, background))


def load(view, max_pixels: int):
    """(the decoded Pillow image in display orientation, its format)."""
    from PIL import Image, ImageOps
    im = _open(view, max_pixels)
    fmt = im.format
    try:
        im.load()
        return ImageOps.exif_transpose(im), fmt
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{fmt}: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise DecodeError(f"{fmt}: decoding failed: {e}") from None


def _decode(view, mode: str, max_pixels: int, background: bytes) -> np.ndarray:
    from PIL import Image
    im, fmt = load(view, max_pixels)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.array(im, dtype=np.int64)
        if im.mode == "I" and a.max(initial=0) <= 255:
            grey = a.astype(np.uint8)
        else:
            grey = ((np.clip(a, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        im = Image.fromarray(grey, "L")
    if im.mode in ("RGBA", "LA", "PA", "P", "RGBa", "La") or "transparency" in im.info:
        rgba = np.array(im.convert("RGBA"), dtype=np.uint32)
        if mode == "RGBA":
            return rgba.astype(np.uint8)
        a = rgba[:, :, 3:4]
        bg = np.frombuffer(background, dtype=np.uint8).astype(np.uint32)
        rgb = ((rgba[:, :, :3] * a + bg * (255 - a) + 127) // 255).astype(np.uint8)
        if mode == "RGB":
            return rgb
        r, g, b = (rgb[:, :, i].astype(np.uint32) for i in range(3))
        return ((19595 * r + 38470 * g + 7471 * b + 32768) >> 16).astype(np.uint8)[:, :, None]
    arr = np.array(im.convert(mode), dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr
