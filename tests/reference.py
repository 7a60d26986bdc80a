"""Float64 NumPy reference of datago's resampling filters (the test oracle).

Same geometry as Pillow's ``Image.resize(size, filter, box)``: output pixel i
samples the source at ``box0 + (i + 0.5) * scale``; when downscaling the kernel is
stretched by the scale; windows are clipped to the image and renormalised.
Computed in float64 with no intermediate rounding.
"""

import numpy as np

SUPPORT = {"triangle": 1.0, "box": 0.5, "lanczos": 3.0, "bicubic": 2.0}


def kernel(name, x):
    x = np.asarray(x, dtype=np.float64)
    if name == "triangle":
        return np.clip(1.0 - np.abs(x), 0.0, None)
    if name == "box":
        return ((x > -0.5) & (x <= 0.5)).astype(np.float64)
    if name == "lanczos":
        return np.where((x >= -3) & (x < 3), np.sinc(x) * np.sinc(x / 3.0), 0.0)
    if name == "bicubic":
        a = np.abs(x)
        return np.where(a < 1, (1.5 * a - 2.5) * a * a + 1,
                        np.where(a < 2, ((a - 5) * a + 8) * a * -0.5 + 2, 0.0))
    raise ValueError(name)


def weights(in_size, in0, in1, out_size, name):
    """Dense (out_size, in_size) weight matrix of one axis."""
    scale = (in1 - in0) / out_size
    fscale = max(scale, 1.0)
    support = SUPPORT[name] * fscale
    m = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = in0 + (i + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        xs = np.arange(xmin, xmax)
        w = kernel(name, (xs - center + 0.5) / fscale)
        m[i, xmin:xmax] = w / w.sum()
    return m


def resize(img, out_w, out_h, box=None, name="triangle", exact=False):
    """uint8 (H, W, C) -> rounded uint8 (or the exact float64 values if ``exact``)."""
    h, w = img.shape[:2]
    x0, y0, x1, y1 = box if box is not None else (0, 0, w, h)
    wy = weights(h, y0, y1, out_h, name)
    wx = weights(w, x0, x1, out_w, name)
    f = img.astype(np.float64)
    tmp = np.einsum("yh,hwc->ywc", wy, f)
    out = np.einsum("xw,ywc->yxc", wx, tmp)
    if exact:
        return out
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
