"""Shared fixtures: generated images (nothing is downloaded).

``photo(w, h, seed)`` makes a "real-looking" RGB image: smooth gradients, soft
blobs, a few hard edges and a little sensor-like noise, so codecs and filters see
content with both flat areas and detail.
"""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8 natural-looking test image, deterministic per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    xx /= max(w - 1, 1)
    yy /= max(h - 1, 1)
    img = np.zeros((h, w, 3))
    base = rng.uniform(40, 200, 3)
    gx, gy = rng.uniform(-80, 80, (2, 3))
    img += base + gx * xx[..., None] + gy * yy[..., None]
    for _ in range(6):                                   # soft blobs
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        amp = rng.uniform(-90, 90, 3)
        img += amp * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
    for _ in range(3):                                   # hard-edged shapes
        x0, y0 = rng.uniform(0, 0.8, 2)
        x1, y1 = x0 + rng.uniform(0.05, 0.3), y0 + rng.uniform(0.05, 0.3)
        m = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
        img[m] = img[m] * 0.3 + rng.uniform(0, 255, 3) * 0.7
    img += 6 * np.sin(xx * rng.uniform(20, 60))[..., None] * np.cos(yy * rng.uniform(20, 60))[..., None]
    img += rng.normal(0, 2.0, img.shape)                 # mild noise
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(arr_or_img, fmt: str, **kw) -> bytes:
    """Encode a numpy array or PIL image with Pillow."""
    im = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    if fmt.upper() == "PNG":
        kw.setdefault("compress_level", 1)        # fast; the decoder does not care
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def make_photo():
    return photo


@pytest.fixture
def make_encoded():
    return encode


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """The sizes cache of every test goes to a session folder, never ~/.cache."""
    import os
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


def bounded(fn, timeout_s: float = 60.0, what: str = "it"):
    """``fn()`` in a thread of its own, its result returned or its exception
    raised here; fails if it is still running after ``timeout_s`` (a hang)
    instead of hanging the test run."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:              # noqa: BLE001 - re-raised below
            out["error"] = e

    t = threading.Thread(target=run, name="bounded-test", daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"{what} still running after {timeout_s} s: a hang"
    if "error" in out:
        raise out["error"]
    return out["value"]
