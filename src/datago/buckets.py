"""Aspect-ratio buckets, built the way the reference datago builds them.

A bucket is a ``Bucket(height, width)`` named tuple -- the order in which tensors
and arrays index an image (``image.shape[-2:]``, ``array.shape[:2]``) -- whose
sides are multiples of the downsampling ratio (VAE factor / patch size) and whose
area is close to, never above, ``default_image_size ** 2``.  Training batches
hold images of one bucket, so every tensor in a batch has one shape.

The reference datago (and most image libraries: PIL's ``Image.size``) write a
size as ``(width, height)``; datago's Python API writes every size pair as
``(height, width)``.  Only the reference-compatible client (``DatagoClient``)
and human-readable text keep the ``width x height`` spelling ("352x720" is 352
wide, 720 high).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from functools import lru_cache
from typing import NamedTuple, Sequence, Tuple

from datago.errors import ConfigError

__all__ = ["Bucket", "make_buckets", "nearest_bucket"]


class Bucket(NamedTuple):
    """A bucket's size, ``(height, width)`` as tensors are indexed.

    A plain tuple to everything that takes one (``out.shape[:2] == bucket``,
    ``torch.empty(n, 3, *bucket)``), and a named tuple so that it keeps its type
    through pickling and DataLoader's conversions (a plain tuple comes out as a
    list).  It compares equal to the plain ``(height, width)`` tuple.
    """
    height: int
    width: int

    @property
    def aspect_ratio(self) -> float:
        """``width / height``, the aspect ratio buckets are sorted and matched by."""
        return self.width / self.height


def make_buckets(default_image_size: int, downsampling_ratio: int,
                 min_aspect_ratio: float, max_aspect_ratio: float) -> list[Bucket]:
    """The bucket list ``[Bucket(height, width), ...]``, sorted by aspect ratio
    (``width / height``, ascending: tallest first, widest last).

    Same construction and same set of sizes as the reference datago, so migrating
    users get the same buckets -- but in datago's ``(height, width)`` order, where
    the reference reports ``(width, height)``: its ``352x720`` bucket (352 wide,
    720 high) is ``Bucket(height=720, width=352)`` here.  With ``r =
    downsampling_ratio``, ``p = default_image_size // r`` and ``P = p * p`` (the
    patch budget):

    * width sweep: for every integer ``pw`` in ``[ceil(sqrt(P * min_ar)),
      floor(sqrt(P * max_ar))]`` the bucket ``width = r * pw``, ``height = r *
      floor(P / pw)``;
    * height sweep: for every ``ph`` in ``[ceil(sqrt(P / max_ar)),
      floor(sqrt(P / min_ar))]`` the bucket ``height = r * ph``, ``width = r *
      floor(P / ph)``;
    * buckets whose aspect ratios agree to 3 decimals are merged (the later one,
      i.e. the height sweep, wins).

    Every bucket has at most ``default_image_size ** 2`` pixels; the extreme ones
    can fall slightly outside ``[min_ar, max_ar]``.  ``make_buckets(512, 16, 0.5,
    2.0)`` has 27 buckets::

        [Bucket(height=720, width=352),      # AR 0.489 (the reference's 352x720)
         Bucket(height=704, width=368),
         ...
         Bucket(height=512, width=512),
         ...
         Bucket(height=352, width=720)]      # AR 2.045 (the reference's 720x352)

    Raises ConfigError for non-positive sizes, a ratio larger than the size, or an
    empty or inverted aspect-ratio range.
    """
    for name, value in (("default_image_size", default_image_size),
                        ("downsampling_ratio", downsampling_ratio)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("min_aspect_ratio", min_aspect_ratio),
                        ("max_aspect_ratio", max_aspect_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name} must be a positive number, got {value!r}")
    if min_aspect_ratio > max_aspect_ratio:
        raise ConfigError(f"min_aspect_ratio ({min_aspect_ratio}) is larger than "
                          f"max_aspect_ratio ({max_aspect_ratio})")
    r = downsampling_ratio
    p = default_image_size // r
    if p == 0:
        raise ConfigError(f"downsampling_ratio ({r}) is larger than default_image_size "
                          f"({default_image_size})")
    budget = p * p
    by_key: dict[str, Bucket] = {}

    def add(h: int, w: int) -> None:
        if w > 0 and h > 0:
            by_key[f"{w / h:.3f}"] = Bucket(h, w)

    for pw in range(math.ceil(math.sqrt(budget * min_aspect_ratio)),
                    math.floor(math.sqrt(budget * max_aspect_ratio)) + 1):
        if pw > 0:
            add(r * (budget // pw), r * pw)
    for ph in range(math.ceil(math.sqrt(budget / max_aspect_ratio)),
                    math.floor(math.sqrt(budget / min_aspect_ratio)) + 1):
        if ph > 0:
            add(r * ph, r * (budget // ph))
    if not by_key:
        raise ConfigError(f"no bucket fits aspect ratios [{min_aspect_ratio}, {max_aspect_ratio}] "
                          f"at size {default_image_size}/{r}")
    return sorted(by_key.values(), key=lambda b: b.width / b.height)


@lru_cache(maxsize=64)
def _index(buckets: tuple) -> Tuple[list[float], list[Bucket]]:
    if not buckets:
        raise ValueError("the bucket list is empty")
    for b in buckets:
        if (not isinstance(b, tuple) or len(b) != 2 or not all(isinstance(v, int) for v in b)
                or b[0] <= 0 or b[1] <= 0):
            raise ValueError(f"a bucket must be a (height, width) pair of positive ints, got {b!r}")
    ordered = sorted((Bucket(*b) for b in buckets), key=lambda b: b.width / b.height)
    return [b.width / b.height for b in ordered], ordered


def nearest_bucket(height: int, width: int, buckets: Sequence[Tuple[int, int]], *,
                   metric: str = "log") -> Bucket:
    """The bucket whose aspect ratio is nearest to that of a ``height`` x ``width``
    image (``width / height``), as a ``Bucket(height, width)``.

    ``buckets`` is a list of ``(height, width)`` pairs (``make_buckets``' list).
    ``metric="log"`` (default) compares ``|log(bucket_ar) - log(image_ar)|``.  Under
    a cover resize and centre crop, an image of aspect ratio t placed in a bucket of
    ratio b keeps ``min(t, b) / max(t, b) = exp(-|log t - log b|)`` of its area, so
    the log metric picks the bucket that crops the least.  It is also symmetric:
    a 2:1 and a 1:2 image are treated alike.  ``metric="linear"`` compares
    ``|bucket_ar - image_ar|`` like the reference datago (the two differ only for
    images near the midpoint between two buckets).  Ties go to the wider bucket.
    Images outside the bucket range get the extreme bucket.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    ars, ordered = _index(tuple(buckets))
    t = width / height
    i = bisect_left(ars, t)
    if i == 0:
        return ordered[0]
    if i == len(ars):
        return ordered[-1]
    lo, hi = ars[i - 1], ars[i]
    if metric == "log":
        d_lo, d_hi = math.log(t / lo), math.log(hi / t)
    elif metric == "linear":
        d_lo, d_hi = t - lo, hi - t
    else:
        raise ValueError(f"metric must be 'log' or 'linear', got {metric!r}")
    return ordered[i - 1] if d_lo < d_hi else ordered[i]
