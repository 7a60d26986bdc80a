"""A small generated sample corpus, so the CLI and the README's first command have
something realistic to run on without downloading anything.

Images are procedural "photos" (gradients, soft blobs, hard edges, texture and
grain) of mixed sizes (long side 320-2400 px) and aspect ratios (0.4-2.5), saved
as JPEG (quality 70-95, 4:2:0/4:2:2/4:4:4, some progressive, some with an EXIF
orientation) and PNG (some RGBA, some grey), in nested folders.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

__all__ = ["default_cache_dir", "make_sample_corpus"]

_VERSION = 1


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "datago"


def _texture(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    # work at a reduced resolution and upscale: fast, and smooth like a photo
    sw, sh = max(8, w // 4), max(8, h // 4)
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
    xx /= sw
    yy /= sh
    img = np.zeros((sh, sw, 3), np.float32)
    img += rng.uniform(40, 200, 3) + rng.uniform(-80, 80, 3) * xx[..., None] \
        + rng.uniform(-80, 80, 3) * yy[..., None]
    for _ in range(8):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.3)
        img += rng.uniform(-90, 90, 3) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
    for _ in range(4):
        x0, y0 = rng.uniform(0, 0.8, 2)
        m = (xx >= x0) & (xx < x0 + rng.uniform(0.05, 0.3)) & (yy >= y0) & (yy < y0 + rng.uniform(0.05, 0.3))
        img[m] = img[m] * 0.3 + rng.uniform(0, 255, 3) * 0.7
    from PIL import Image
    small = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    big = np.asarray(small.resize((w, h), Image.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    big = big + 10 * (np.sin(xx * rng.uniform(0.05, 0.4)) * np.cos(yy * rng.uniform(0.05, 0.4)))[..., None]
    big += rng.normal(0, 3.0, (h, w, 1)).astype(np.float32)         # luminance grain
    return np.clip(big, 0, 255).astype(np.uint8)


def make_sample_corpus(dest: os.PathLike | str | None = None, n: int = 200, seed: int = 0) -> Path:
    """Write ``n`` images under ``dest`` (default: a per-user cache folder) and return it.

    Reuses an existing complete corpus with the same parameters.
    """
    from PIL import Image
    root = Path(dest) if dest is not None else default_cache_dir() / f"sample-v{_VERSION}-n{n}-s{seed}"
    stamp = root / "corpus.json"
    if stamp.exists():
        try:
            if json.loads(stamp.read_text()).get("n") == n:
                return root
        except ValueError:
            pass
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        long_side = int(np.clip(rng.lognormal(np.log(1100), 0.4), 320, 2400))
        ar = float(np.exp(rng.uniform(np.log(0.4), np.log(2.5))))
        w, h = (long_side, max(16, int(long_side / ar))) if ar >= 1 else (max(16, int(long_side * ar)), long_side)
        arr = _texture(w, h, rng)
        sub = root / f"part{i % 4}" / f"{(i // 4) % 10:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        kind = rng.uniform()
        buf = io.BytesIO()
        if kind < 0.08:                                    # PNG: RGBA or grey or RGB
            im = Image.fromarray(arr)
            if rng.uniform() < 0.5:
                alpha = np.clip(np.linspace(0, 400, w)[None, :] + np.zeros((h, 1)), 0, 255).astype(np.uint8)
                im = Image.fromarray(np.dstack([arr, alpha]), "RGBA")
            elif rng.uniform() < 0.3:
                im = im.convert("L")
            im.save(buf, "PNG", compress_level=int(rng.integers(1, 7)))
            name = f"img_{i:05d}.png"
        else:
            im = Image.fromarray(arr)
            if rng.uniform() < 0.02:
                im = im.convert("L")
            kw = dict(quality=int(rng.integers(70, 96)),
                      subsampling=int(rng.choice([0, 1, 2], p=[0.25, 0.1, 0.65])),
                      progressive=bool(rng.uniform() < 0.1))
            if rng.uniform() < 0.05:
                exif = Image.Exif()
                exif[0x0112] = int(rng.choice([3, 6, 8]))
                kw["exif"] = exif.tobytes()
            im.save(buf, "JPEG", **kw)
            name = f"img_{i:05d}.jpg"
        (sub / name).write_bytes(buf.getvalue())
    stamp.write_text(json.dumps({"n": n, "seed": seed, "version": _VERSION}))
    return root
