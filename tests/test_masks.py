"""Masks keep their label values exactly, and follow their image's crop.

Every mask is checked against a NumPy nearest-neighbour reference of the same
geometry (``nearest_ref``): output pixel i of an axis takes source pixel
``floor(box0 + (i + 0.5) * (box1 - box0) / out)`` -- the geometry of
``tests/reference.py`` with the nearest kernel, computed with the same float64
operations, so the comparison is exact.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import datago
from datago import DatagoDataset
from datago.image import MaskMismatchError
from conftest import encode, photo
from test_decode import make_png

SIZE = dict(default_image_size=128, downsampling_ratio=16, min_aspect_ratio=0.5,
            max_aspect_ratio=2.0)
BUCKETS = datago.make_buckets(256, 16, 0.5, 2.0)


# --------------------------------------------------------------------------- helpers

def nearest_ref(labels: np.ndarray, bucket, box) -> np.ndarray:
    """Nearest-neighbour crop + resize of ``labels`` (H, W[, C]) to ``bucket`` (h, w)."""
    th, tw = bucket
    h, w = labels.shape[:2]
    x0, y0, x1, y1 = box
    sx, sy = (x1 - x0) / tw, (y1 - y0) / th
    xs = np.clip(np.floor(x0 + (np.arange(tw) + 0.5) * sx).astype(np.int64), 0, w - 1)
    ys = np.clip(np.floor(y0 + (np.arange(th) + 0.5) * sy).astype(np.int64), 0, h - 1)
    out = labels[ys][:, xs]
    return out if out.ndim == 3 else out[:, :, None]


def label_image(w: int, h: int, values: np.ndarray, seed: int, block: int = 3) -> np.ndarray:
    """(h, w) labels in blocks of ``block`` pixels, every value of ``values`` present."""
    rng = np.random.default_rng(seed)
    bh, bw = -(-h // block), -(-w // block)
    idx = rng.integers(0, len(values), (bh, bw))
    idx.flat[:len(values)] = np.arange(len(values))          # each label at least once
    return np.repeat(np.repeat(values[idx], block, 0), block, 1)[:h, :w]


def labels16(w, h, seed=0):
    """300 distinct 16-bit labels, 0 and 65535 included, most above 255."""
    values = np.unique(np.concatenate([[0, 1, 255, 256, 65535],
                                       np.linspace(300, 65000, 295).astype(np.int64)]))
    assert len(values) == 300
    return label_image(w, h, values.astype(np.uint16), seed)


def labels8(w, h, seed=0):
    """200 distinct 8-bit labels."""
    values = np.arange(0, 255, 255 / 200).astype(np.uint8)
    values = np.unique(values)[:200]
    assert len(values) == 200
    return label_image(w, h, values, seed)


def palette_png(idx: np.ndarray) -> bytes:
    im = Image.fromarray(idx.astype(np.uint8), "P")
    im.putpalette([v for i in range(256) for v in ((i * 37) % 256, (255 - i) % 256, (i * 11) % 256)])
    return encode(im, "PNG")


def rgb_labels(w, h, seed=0):
    """A colour-coded mask: 40 distinct colours (the same for every seed), two of
    them with the same luma."""
    rng = np.random.default_rng(7)
    colours = rng.integers(0, 256, (40, 3)).astype(np.uint8)
    colours[0], colours[1] = (255, 0, 0), (0, 127, 10)         # both have luma 76
    idx = label_image(w, h, np.arange(40), seed)
    return colours[idx], colours, idx


def cfg(root, **loader):
    d = {"source_type": "file", "source_config": {"root_path": str(root)},
         "image_config": {"crop_and_resize": True, **SIZE}}
    d.update(loader)
    return d


# --------------------------------------------------------------------------- decode_to_bucket

MASK_KINDS = ["grey16", "grey8", "palette8", "palette4", "grey4", "grey1", "grey16_interlaced",
              "grey_alpha16", "rgb", "rgba", "rgb16"]


def mask_case(kind: str, w: int, h: int, seed: int = 0):
    """(encoded mask, expected values (h, w, C), expected dtype)."""
    if kind == "grey16":
        lab = labels16(w, h, seed)
        return encode(lab, "PNG"), lab[:, :, None], np.int32
    if kind == "grey16_interlaced":
        lab = labels16(w, h, seed)
        return make_png(lab, 16, 0, interlace=True), lab[:, :, None], np.int32
    if kind == "grey8":
        lab = labels8(w, h, seed)
        return encode(lab, "PNG"), lab[:, :, None], np.uint8
    if kind == "palette8":
        lab = labels8(w, h, seed)
        return palette_png(lab), lab[:, :, None], np.uint8
    if kind == "palette4":
        lab = label_image(w, h, np.arange(16, dtype=np.uint8), seed)
        pal = np.arange(48, dtype=np.uint8).reshape(16, 3) * 5
        return make_png(lab, 4, 3, palette=pal), lab[:, :, None], np.uint8
    if kind == "grey4":                   # stored values, not scaled to 0..255
        lab = label_image(w, h, np.arange(16, dtype=np.uint8), seed)
        return make_png(lab, 4, 0), lab[:, :, None], np.uint8
    if kind == "grey1":
        lab = label_image(w, h, np.arange(2, dtype=np.uint8), seed)
        return make_png(lab, 1, 0), lab[:, :, None], np.uint8
    if kind == "grey_alpha16":            # alpha is dropped, never composited
        lab = labels16(w, h, seed)
        alpha = np.random.default_rng(seed).integers(0, 65536, (h, w)).astype(np.uint16)
        return make_png(np.dstack([lab, alpha]), 16, 4), lab[:, :, None], np.int32
    if kind == "rgb":
        rgb, _, _ = rgb_labels(w, h, seed)
        return encode(rgb, "PNG"), rgb, np.uint8
    if kind == "rgba":
        rgb, _, _ = rgb_labels(w, h, seed)
        alpha = np.random.default_rng(seed).integers(0, 256, (h, w, 1)).astype(np.uint8)
        return encode(np.dstack([rgb, alpha]), "PNG"), rgb, np.uint8
    if kind == "rgb16":
        rgb = (label_image(w, h, np.arange(300), seed)[:, :, None]
               * np.array([199, 13, 211])).astype(np.uint16)
        return make_png(rgb, 16, 2), rgb, np.int32
    raise ValueError(kind)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_mask_values_kept_exactly(kind):
    w, h = 301, 207
    data, want, dtype = mask_case(kind, w, h, seed=3)
    for bucket in [(128, 192), (256, 128), (208, 304), (64, 64)]:          # (height, width)
        m = datago.decode_to_bucket(data, bucket=bucket, mask=True)
        assert m.image.dtype == dtype, (kind, m.image.dtype)
        assert m.image.shape == (*bucket, want.shape[2])
        ref = nearest_ref(want, bucket, m.crop_box)
        assert np.array_equal(m.image, ref.astype(dtype)), kind
        assert set(np.unique(m.image)) <= set(np.unique(want))
    if kind in ("grey16", "grey8", "palette8"):
        # many distinct labels survive a mild downscale
        m = datago.decode_to_bucket(data, bucket=(192, 288), mask=True)
        assert len(np.unique(m.image)) >= 150


@pytest.mark.parametrize("kind", ["grey16", "palette8", "rgb"])
def test_mask_follows_its_image(kind):
    """``like=`` gives the image's bucket and crop box; a mask of another size with the
    same aspect ratio gets the image's box scaled to its size."""
    img = encode(photo(600, 400, seed=5), "JPEG")
    res = datago.decode_to_bucket(img, BUCKETS)
    for mw, mh in [(600, 400), (300, 200), (1200, 800), (603, 401)]:
        data, want, dtype = mask_case(kind, mw, mh, seed=mw)
        m = datago.decode_to_bucket(data, mask=True, like=res)
        assert m.bucket == res.bucket and m.image.dtype == dtype
        sx, sy = mw / 600, mh / 400
        box = tuple(v * s for v, s in zip(res.crop_box, (sx, sy, sx, sy)))
        assert m.crop_box == pytest.approx(box)
        assert np.array_equal(m.image, nearest_ref(want, res.bucket, m.crop_box).astype(dtype))


def test_mask_with_another_aspect_ratio_is_a_mismatch():
    img = encode(photo(600, 400, seed=5), "JPEG")
    res = datago.decode_to_bucket(img, BUCKETS)
    data = encode(labels8(600, 390), "PNG")                    # 2.6% off
    with pytest.raises(MaskMismatchError, match="aspect ratio"):
        datago.decode_to_bucket(data, mask=True, like=res)
    with pytest.raises(ValueError):                            # it is a ValueError too
        datago.decode_to_bucket(data, mask=True, like=res)
    ok = encode(labels8(600, 397), "PNG")                      # 0.76% off: aligned
    assert datago.decode_to_bucket(ok, mask=True, like=res).bucket == res.bucket


def test_mask_follows_exif_orientation_of_its_image():
    """A JPEG with EXIF orientation 6 and a mask stored upright (display size)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    arr = photo(400, 300, seed=2)                               # stored 400x300, shown 300x400
    img = encode(arr, "JPEG", exif=exif.tobytes())
    res = datago.decode_to_bucket(img, BUCKETS)
    assert res.original_size == (400, 300)
    lab = labels16(300, 400, seed=4)                            # display size
    m = datago.decode_to_bucket(encode(lab, "PNG"), mask=True, like=res)
    assert np.array_equal(m.image, nearest_ref(lab, res.bucket, res.crop_box).astype(np.int32))


def test_mask_with_its_own_exif_orientation():
    lab = labels8(120, 80, seed=1)
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(Image.fromarray(lab), "PNG", exif=exif.tobytes())
    shown = np.rot90(lab, 1)                                    # orientation 8
    m = datago.decode_to_bucket(data, bucket=(96, 64), mask=True)
    assert np.array_equal(m.image, nearest_ref(shown, (96, 64), m.crop_box))


def test_mask_modes_and_outputs():
    rgb, colours, idx = rgb_labels(90, 60)
    data = encode(rgb, "PNG")
    with pytest.raises(MaskMismatchError, match="3 channels"):
        datago.decode_to_bucket(data, bucket=(60, 90), mask=True, mode="L")
    # colours: a palette PNG expanded, a grey one replicated
    pal = palette_png(labels8(90, 60))
    got = datago.decode_to_bucket(pal, bucket=(60, 90), mask=True, mode="RGB").image
    assert np.array_equal(got, np.asarray(Image.open(io.BytesIO(pal)).convert("RGB")))
    grey = labels8(90, 60)
    got = datago.decode_to_bucket(encode(grey, "PNG"), bucket=(60, 90), mask=True, mode="RGB").image
    assert np.array_equal(got, np.repeat(grey[:, :, None], 3, 2))
    with pytest.raises(MaskMismatchError, match="16-bit"):
        datago.decode_to_bucket(encode(labels16(90, 60), "PNG"), bucket=(60, 90), mask=True,
                                mode="RGB")
    # out: uint16 or int32 for 16-bit values, any of the three for 8-bit ones
    data16 = encode(labels16(90, 60), "PNG")
    for dt in (np.uint16, np.int32):
        out = np.zeros((60, 90), dt)
        r = datago.decode_to_bucket(data16, bucket=(60, 90), mask=True, out=out)
        assert np.array_equal(out, labels16(90, 60).astype(dt))
        assert np.shares_memory(r.image, out)
    with pytest.raises(ValueError, match="uint16 or int32"):
        datago.decode_to_bucket(data16, bucket=(60, 90), mask=True, out=np.zeros((60, 90, 1), np.uint8))
    out = np.zeros((60, 90, 1), np.int32)
    datago.decode_to_bucket(encode(grey, "PNG"), bucket=(60, 90), mask=True, out=out)
    assert np.array_equal(out[:, :, 0], grey)
    with pytest.raises(ValueError, match="like"):
        datago.decode_to_bucket(data, bucket=(60, 90), like=datago.decode_to_bucket(data, bucket=(60, 90)))


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP"])
def test_other_formats_keep_values(fmt):
    lab = labels8(150, 100, seed=9)
    if fmt == "GIF":
        data, want = palette_png(lab), lab                       # palette as indices
        im = Image.open(io.BytesIO(data))
        buf = io.BytesIO()
        im.save(buf, "GIF")
        data = buf.getvalue()
        want = np.asarray(Image.open(io.BytesIO(data)))
    elif fmt == "TIFF":
        lab16 = labels16(150, 100, seed=9)
        data, want = encode(lab16, "TIFF"), lab16
    elif fmt == "WEBP":
        rgb, _, _ = rgb_labels(150, 100)
        data, want = encode(rgb, "WEBP", lossless=True), rgb
    else:
        data, want = encode(lab, "BMP"), lab
    m = datago.decode_to_bucket(data, bucket=(64, 96), mask=True)
    want = want if want.ndim == 3 else want[:, :, None]
    dtype = np.int32 if want.dtype == np.uint16 else np.uint8
    assert m.image.dtype == dtype
    assert np.array_equal(m.image, nearest_ref(want, (64, 96), m.crop_box).astype(dtype))


def test_jpeg_mask_full_scale_values():
    """A JPEG mask (lossy, but it happens) is decoded at full scale, never DCT-scaled:
    its bucket is the nearest-neighbour sample of the full decode."""
    lab = labels8(640, 480)
    data = encode(lab, "JPEG", quality=95)
    full = datago.decode(data, mode="L")
    m = datago.decode_to_bucket(data, bucket=(48, 64), mask=True)
    assert m.image.dtype == np.uint8 and m.image.shape == (48, 64, 1)
    assert np.array_equal(m.image, nearest_ref(full, (48, 64), m.crop_box))
    rgb, _, _ = rgb_labels(320, 240)
    m = datago.decode_to_bucket(encode(rgb, "JPEG", quality=95), bucket=(24, 32), mask=True)
    assert m.image.shape == (24, 32, 3)


# --------------------------------------------------------------------------- DatagoDataset

def _write(root, key, img_wh, mask_bytes, name="mask"):
    (root / f"{key}.jpg").write_bytes(encode(photo(*img_wh, seed=len(key)), "JPEG"))
    (root / f"{key}.{name}.png").write_bytes(mask_bytes)


def _check_batches(ds, root, labels: dict, name="mask", dtype=None):
    seen = set()
    for b in ds:
        h, w = b["bucket"]
        t = b["masks"][name]
        if dtype is not None:
            assert t.dtype == dtype
        for j, sid in enumerate(b["id"]):
            key = sid[:-4]
            img = datago.decode_to_bucket((root / sid).read_bytes(), bucket=(h, w))
            lab, (mw, mh) = labels[key]
            sx, sy = mw / img.original_size[1], mh / img.original_size[0]
            box = (img.crop_box[0] * sx, img.crop_box[1] * sy,
                   min(img.crop_box[2] * sx, mw), min(img.crop_box[3] * sy, mh))
            want = nearest_ref(lab, (h, w), box)
            got = t[j].permute(1, 2, 0).numpy()
            assert np.array_equal(got, want.astype(got.dtype)), sid
            assert int(np.abs(got.astype(np.int64) - want).max(initial=0)) == 0
            seen.add(key)
    return seen


def test_dataset_16bit_masks_exact(tmp_path):
    labels = {}
    for i, (w, h) in enumerate([(300, 200), (200, 300), (256, 256), (320, 160), (240, 180)]):
        lab = labels16(w, h, seed=i)
        _write(tmp_path, f"k{i}", (w, h), encode(lab, "PNG"))
        labels[f"k{i}"] = (lab, (w, h))
    ds = DatagoDataset(cfg(tmp_path, batch_size=2, num_threads=4))
    assert _check_batches(ds, tmp_path, labels, dtype=torch.int32) == set(labels)
    st = ds.stats()
    assert st["skipped_total"] == 0
    # 300 labels, many above 255, come through
    vals = set()
    for b in ds:
        vals |= set(np.unique(b["masks"]["mask"].numpy()).tolist())
    assert max(vals) > 255 and len(vals) > 200


def test_dataset_8bit_and_palette_masks_exact(tmp_path):
    labels = {}
    for i, (w, h) in enumerate([(300, 200), (200, 300), (256, 256), (320, 160)]):
        lab = labels8(w, h, seed=i)
        data = encode(lab, "PNG") if i % 2 else palette_png(lab)
        _write(tmp_path, f"k{i}", (w, h), data)
        labels[f"k{i}"] = (lab, (w, h))
    ds = DatagoDataset(cfg(tmp_path, batch_size=2))
    assert _check_batches(ds, tmp_path, labels, dtype=torch.uint8) == set(labels)


def test_dataset_mask_sizes_and_mismatch(tmp_path):
    """Masks at half or double their image's size are aligned; one whose aspect ratio
    differs by more than 1% skips its sample as ``mask_mismatch``."""
    labels = {}
    for i, (w, h, mw, mh) in enumerate([(300, 200, 150, 100), (300, 200, 600, 400),
                                        (240, 240, 120, 120), (300, 200, 301, 200)]):
        lab = labels16(mw, mh, seed=i)
        _write(tmp_path, f"k{i}", (w, h), encode(lab, "PNG"))
        labels[f"k{i}"] = (lab, (mw, mh))
    _write(tmp_path, "bad", (300, 200), encode(labels8(300, 150), "PNG"))
    ds = DatagoDataset(cfg(tmp_path, batch_size=2))
    with pytest.warns(RuntimeWarning, match="mask_mismatch"):
        seen = _check_batches(ds, tmp_path, labels)
    assert seen == set(labels)
    assert ds.stats()["skipped"] == {"mask_mismatch": 1}


def test_dataset_mixed_depths_and_missing_masks(tmp_path):
    """8- and 16-bit masks in one batch: an int32 table, every value kept; a sample
    without a mask has zeros and present False."""
    labels = {}
    _write(tmp_path, "a", (300, 200), encode(labels8(300, 200, 1), "PNG"))
    labels["a"] = (labels8(300, 200, 1), (300, 200))
    _write(tmp_path, "b", (300, 200), encode(labels16(300, 200, 2), "PNG"))
    labels["b"] = (labels16(300, 200, 2), (300, 200))
    (tmp_path / "c.jpg").write_bytes(encode(photo(300, 200, seed=3), "JPEG"))
    ds = DatagoDataset(cfg(tmp_path, batch_size=3))
    (b,) = list(ds)
    t = b["masks"]["mask"]
    assert t.dtype == torch.int32 and t.shape[1] == 1
    for j, sid in enumerate(b["id"]):
        key = sid[:-4]
        assert bool(b["present"]["mask/mask"][j]) == (key != "c")
        if key == "c":
            assert not t[j].any()
            continue
        img = datago.decode_to_bucket((tmp_path / sid).read_bytes(), bucket=b["bucket"])
        want = nearest_ref(labels[key][0], img.bucket, img.crop_box)
        assert np.array_equal(t[j].permute(1, 2, 0).numpy(), want.astype(np.int32))


def test_dataset_rgb_masks_kept_or_mapped(tmp_path):
    rgb, colours, idx = rgb_labels(300, 200)
    _write(tmp_path, "a", (300, 200), encode(rgb, "PNG"), name="seg")
    rgb2, _, idx2 = rgb_labels(200, 300, seed=1)
    _write(tmp_path, "b", (200, 300), encode(rgb2, "PNG"), name="seg")
    # kept as 3 channels
    ds = DatagoDataset(cfg(tmp_path, batch_size=None))
    for s in ds:
        m = s["masks"]["seg"]
        assert m.shape[0] == 3 and m.dtype == torch.uint8
        key = s["id"][:-4]
        src = rgb if key == "a" else rgb2
        img = datago.decode_to_bucket((tmp_path / s["id"]).read_bytes(), BUCKETS_OF(s))
        assert np.array_equal(m.permute(1, 2, 0).numpy(), nearest_ref(src, img.bucket, img.crop_box))
    # mapped to ids through mask_palette
    palette = {"seg": [list(map(int, c)) for c in colours]}
    c = cfg(tmp_path, batch_size=None)
    c["image_config"]["mask_palette"] = palette
    for s in DatagoDataset(c):
        m = s["masks"]["seg"]
        assert m.shape[0] == 1 and m.dtype == torch.uint8
        key = s["id"][:-4]
        src = idx if key == "a" else idx2
        img = datago.decode_to_bucket((tmp_path / s["id"]).read_bytes(), BUCKETS_OF(s))
        assert np.array_equal(m[0].numpy(), nearest_ref(src, img.bucket, img.crop_box)[:, :, 0])
    # a colour missing from the palette: mask_mismatch
    c["image_config"]["mask_palette"] = {"*": palette["seg"][:-1]}
    ds = DatagoDataset(c)
    with pytest.warns(RuntimeWarning, match="mask_mismatch"):
        got = list(ds)
    assert len(got) < 2 and ds.stats()["skipped"]["mask_mismatch"] >= 1


def BUCKETS_OF(sample):
    return [tuple(sample["bucket"])]


def test_mask_palette_config_validation():
    with pytest.raises(datago.ConfigError, match="mask_palette.seg"):
        datago.DatagoConfig.from_dict(
            {"source_type": "file", "source_config": {"root_path": "."},
             "image_config": {"mask_palette": {"seg": [[0, 0, 0], [0, 0]]}}})
    with pytest.raises(datago.ConfigError, match="already id 0"):
        datago.DatagoConfig.from_dict(
            {"source_type": "file", "source_config": {"root_path": "."},
             "image_config": {"mask_palette": {"seg": [[1, 2, 3], [1, 2, 3]]}}})


def test_dataloader_workers_int32_masks(tmp_path):
    """int32 mask tables live in shared memory in DataLoader workers, like the rest."""
    labels = {}
    for i in range(4):
        lab = labels16(300, 200, seed=i)
        _write(tmp_path, f"k{i}", (300, 200), encode(lab, "PNG"))
        labels[f"k{i}"] = (lab, (300, 200))
    ds = DatagoDataset(cfg(tmp_path, batch_size=2))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    seen = _check_batches(loader, tmp_path, labels, dtype=torch.int32)
    assert seen == set(labels)


def test_dataset_grey_and_colour_masks_in_one_batch(tmp_path):
    """A grey mask in a batch with a colour mask of the same name is replicated into
    the 3-channel table, whichever is decoded first."""
    rgb, _, _ = rgb_labels(300, 200, seed=1)
    grey = labels8(300, 200, seed=2)
    _write(tmp_path, "a", (300, 200), encode(rgb, "PNG"))
    _write(tmp_path, "b", (300, 200), encode(grey, "PNG"))
    for threads in (1, 2):
        (b,) = list(DatagoDataset(cfg(tmp_path, batch_size=2, num_threads=threads)))
        t = b["masks"]["mask"]
        assert t.dtype == torch.uint8 and t.shape[1] == 3
        for j, sid in enumerate(b["id"]):
            img = datago.decode_to_bucket((tmp_path / sid).read_bytes(), bucket=b["bucket"])
            src = rgb if sid == "a.jpg" else np.repeat(grey[:, :, None], 3, 2)
            assert np.array_equal(t[j].permute(1, 2, 0).numpy(),
                                  nearest_ref(src, img.bucket, img.crop_box))
