"""decode_to_bucket: quality against Pillow, crop geometry, outputs, masks."""

import io

import numpy as np
import pytest
from PIL import Image

import datago
from datago._core import _resample
from conftest import encode, photo

BUCKETS = datago.make_buckets(512, 16, 0.5, 2.0)


def pillow_cover_crop(im: Image.Image, bucket, exact: bool) -> np.ndarray:
    """Pillow full decode + LANCZOS cover-resize + centre crop.

    ``exact=False`` is the classic code (resize to the rounded cover size, crop at
    integer offsets).  ``exact=True`` asks Pillow for the same operation without the
    rounding (``resize(box=centre crop)``), so sub-pixel shifts do not count.
    ``bucket`` is (height, width); Pillow's sizes are (width, height).
    """
    bh, bw = bucket
    w, h = im.size
    s = max(bw / w, bh / h)
    if exact:
        cw, ch = bw / s, bh / s
        x0, y0 = (w - cw) / 2, (h - ch) / 2
        return np.asarray(im.resize((bw, bh), Image.LANCZOS, box=(x0, y0, x0 + cw, y0 + ch)))
    rw, rh = max(bw, round(w * s)), max(bh, round(h * s))
    r = im.resize((rw, rh), Image.LANCZOS)
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return np.asarray(r.crop((left, top, left + bw, top + bh)))


def psnr(a, b):
    mse = ((a.astype(np.float64) - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


SIZES = [(1600, 1200), (1200, 1600), (1800, 800), (640, 480), (900, 1300),
         (400, 300), (1024, 1024), (2000, 900), (300, 700)]


@pytest.fixture(scope="module")
def photos():
    return {wh: photo(*wh, seed=i) for i, wh in enumerate(SIZES)}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("filt", ["triangle", "lanczos"])
@pytest.mark.parametrize("exact", [True, False], ids=["exact-crop", "classic-crop"])
def test_quality_against_pillow(photos, fmt, filt, exact):
    for (w, h), arr in photos.items():
        data = encode(arr, fmt, quality=92) if fmt == "JPEG" else encode(arr, fmt)
        res = datago.decode_to_bucket(data, BUCKETS, filter=filt)
        ref = pillow_cover_crop(Image.open(io.BytesIO(data)).convert("RGB"), res.bucket, exact)
        assert res.image.shape == ref.shape
        mad = np.abs(res.image.astype(int) - ref).mean()
        assert mad < 2.5, (w, h, mad)
        assert psnr(res.image, ref) >= 33, (w, h)


def test_crop_geometry():
    for w, h in SIZES + [(37, 2000), (2000, 37)]:
        data = encode(np.zeros((h, w), np.uint8), "PNG")
        res = datago.decode_to_bucket(data, BUCKETS)
        bh, bw = res.bucket
        assert res.bucket == datago.nearest_bucket(h, w, BUCKETS)
        assert res.image.shape == (bh, bw, 3)
        assert res.original_size == (h, w)
        left, top, right, bottom = res.crop_box
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
        assert (right - left) / (bottom - top) == pytest.approx(bw / bh)
        assert left == pytest.approx(w - right) and top == pytest.approx(h - bottom)  # centred
        assert left == 0 or top == 0                                                  # cover
        s = max(bw / w, bh / h)
        assert res.crop_coords == (round(top * s), round(left * s))


def test_scaled_jpeg_decode_matches_full_decode():
    # DCT-domain downscaling (here 1/4 or 3/8) must not shift or blur the result
    arr = photo(2400, 1800, seed=7)
    data = encode(arr, "JPEG", quality=95, subsampling=0)
    res = datago.decode_to_bucket(data, BUCKETS)
    full = datago.decode(data)
    ref = datago.resize(full, res.bucket, box=res.crop_box)
    assert np.abs(res.image.astype(int) - ref).mean() < 1.5


def test_upscale_small_image():
    data = encode(photo(40, 30, seed=1), "PNG")               # 40 wide, 30 high
    res = datago.decode_to_bucket(data, BUCKETS)
    assert res.bucket == (432, 592)                           # 592x432
    ref = datago.resize(datago.decode(data), res.bucket, box=res.crop_box)
    assert np.abs(res.image.astype(int) - ref).max() <= 1


@pytest.mark.parametrize("size", [(300, 180), (1100, 700)], ids=["up", "down"])
@pytest.mark.parametrize("k", range(1, 9), ids=[f"o{k}" for k in range(1, 9)])
def test_exif_orientation_in_the_fused_path(k, size):
    """The orientation is applied through the output strides (mirrored, transposed);
    the result matches resampling the upright decode with the reported crop box, and
    the AVX2 build writes exactly what the generic one does for every orientation."""
    exif = Image.Exif()
    exif[0x0112] = k
    data = encode(photo(*size, seed=21), "JPEG", exif=exif.tobytes(), quality=95)
    res = datago.decode_to_bucket(data, BUCKETS)
    stored_hw = size[::-1]                                    # photo() takes (w, h)
    display_hw = stored_hw[::-1] if k >= 5 else stored_hw
    assert res.bucket == datago.nearest_bucket(*display_hw, BUCKETS)
    assert res.original_size == display_hw
    ref = datago.resize(datago.decode(data), res.bucket, box=res.crop_box)
    # the passes run in the stored orientation: rounding may differ by one step
    assert np.abs(res.image.astype(int) - ref).max() <= 1
    assert np.abs(res.image.astype(int) - ref).mean() < 0.2
    if _resample.simd() == "avx2":
        try:
            _resample.set_simd("generic")
            generic = datago.decode_to_bucket(data, BUCKETS).image
        finally:
            _resample.set_simd("auto")
        assert np.array_equal(res.image, generic)


def test_out_batch_slice_and_planar_view():
    data = encode(photo(1000, 700, seed=2), "JPEG")           # 1000 wide, 700 high
    bucket = datago.nearest_bucket(700, 1000, BUCKETS)
    bh, bw = bucket
    alone = datago.decode_to_bucket(data, bucket=bucket).image
    batch = np.zeros((3, bh, bw, 3), np.uint8)
    res = datago.decode_to_bucket(data, bucket=bucket, out=batch[1])
    assert res.image.base is batch or np.shares_memory(res.image, batch)
    assert np.array_equal(batch[1], alone) and not batch[0].any() and not batch[2].any()
    chw = np.zeros((2, 3, bh, bw), np.uint8)                      # torch-style NCHW
    datago.decode_to_bucket(data, bucket=bucket, out=chw[0].transpose(1, 2, 0))
    assert np.array_equal(chw[0].transpose(1, 2, 0), alone)


def test_out_errors():
    data = encode(photo(100, 100), "JPEG")
    with pytest.raises(ValueError, match=r"out must have shape \(64, 32, 3\)"):
        datago.decode_to_bucket(data, bucket=(64, 32), out=np.zeros((32, 64, 3), np.uint8))
    ro = np.zeros((64, 32, 3), np.uint8)
    ro.flags.writeable = False
    with pytest.raises((ValueError, TypeError)):
        datago.decode_to_bucket(data, bucket=(64, 32), out=ro)
    with pytest.raises(TypeError, match="numpy array"):
        datago.decode_to_bucket(data, bucket=(64, 32), out=[[0]])
    with pytest.raises(ValueError, match="mode"):
        datago.decode_to_bucket(data, bucket=(64, 32), mode="RGBA")


def test_mask_nearest_keeps_labels_and_follows_the_image_crop():
    h, w = 600, 900
    labels = np.zeros((h, w), np.uint8)
    labels[:, w // 3:] = 5
    labels[h // 2:, :] = 200
    labels[100:110, 100:900] = 17
    img = encode(photo(w, h, seed=3), "JPEG")
    msk = encode(labels, "PNG")
    res = datago.decode_to_bucket(img, BUCKETS)
    m = datago.decode_to_bucket(msk, bucket=res.bucket, mask=True)
    assert m.image.shape == (*res.bucket, 1)
    assert m.crop_box == pytest.approx(res.crop_box)
    assert set(np.unique(m.image)) <= {0, 5, 17, 200}
    ref = datago.resize(labels, res.bucket, box=res.crop_box, filter="nearest")
    assert np.array_equal(m.image[:, :, 0], ref)


def test_palette_png_mask_gives_indices():
    idx = (np.arange(120 * 80).reshape(80, 120) % 7).astype(np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette([v for i in range(256) for v in (i * 30 % 256, 255 - i, i * 7 % 256)])
    data = encode(im, "PNG")
    m = datago.decode_to_bucket(data, bucket=(80, 120), mask=True)
    assert np.array_equal(m.image[:, :, 0], idx)
    # the same file as an image is decoded through the palette
    rgb = datago.decode_to_bucket(data, bucket=(80, 120), filter="nearest").image
    assert np.array_equal(rgb, np.asarray(im.convert("RGB")))


def test_grey_jpeg_to_rgb_and_l():
    grey = photo(640, 480, seed=4)[:, :, 1]
    data = encode(grey, "JPEG", quality=90)
    rgb = datago.decode_to_bucket(data, BUCKETS).image
    assert (rgb[:, :, 0] == rgb[:, :, 1]).all() and (rgb[:, :, 1] == rgb[:, :, 2]).all()
    lum = datago.decode_to_bucket(data, BUCKETS, mode="L").image
    assert lum.shape[2] == 1 and np.array_equal(lum[:, :, 0], rgb[:, :, 0])


def test_rgba_png_composited_before_resampling():
    arr = photo(500, 400, seed=6)
    alpha = np.tile(np.linspace(0, 255, 500).astype(np.uint8), (400, 1))
    data = encode(np.dstack([arr, alpha]), "PNG")
    for bg in [(128, 128, 128), (255, 0, 10)]:
        res = datago.decode_to_bucket(data, BUCKETS, background=bg)
        ref = datago.resize(datago.decode(data, background=bg), res.bucket, box=res.crop_box)
        assert np.abs(res.image.astype(int) - ref).max() <= 1


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "TIFF"])
def test_fallback_formats(fmt):
    arr = photo(700, 500, seed=8)
    data = encode(arr, fmt, lossless=True) if fmt == "WEBP" else encode(arr, fmt)
    res = datago.decode_to_bucket(data, BUCKETS)
    assert res.image.shape == (*res.bucket, 3)
    ref = datago.resize(arr, res.bucket, box=res.crop_box)
    assert np.array_equal(res.image, ref)


def test_bucket_argument_validation():
    data = encode(photo(100, 100), "JPEG")
    with pytest.raises(ValueError, match="bucket"):
        datago.decode_to_bucket(data)
    with pytest.raises(ValueError, match="positive"):
        datago.decode_to_bucket(data, bucket=(0, 10))
    with pytest.raises(ValueError, match="pair"):
        datago.decode_to_bucket(data, [(10, 10, 3)])
    with pytest.raises(ValueError, match=r"\(height, width\) pair"):
        datago.decode_to_bucket(data, bucket=(10, 10, 3))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_bucket_is_height_width(fmt):
    """``bucket=(H, W)`` gives an H x W image, for the fused path and Pillow's."""
    arr = photo(300, 500, seed=9)                             # tall: 300 wide, 500 high
    data = encode(arr, fmt, lossless=True) if fmt == "WEBP" else encode(arr, fmt)
    H, W = 96, 64
    res = datago.decode_to_bucket(data, bucket=(H, W))
    assert res.image.shape[:2] == (H, W)
    assert res.bucket == (H, W) and type(res.bucket) is datago.Bucket
    assert (res.bucket.height, res.bucket.width) == (H, W)
    assert res.original_size == (500, 300)
    # the mask path, and a mask aligned with the image
    m = datago.decode_to_bucket(encode(arr[:, :, 0], "PNG"), bucket=(H, W), mask=True)
    assert m.image.shape[:2] == (H, W) and m.bucket == (H, W)
    like = datago.decode_to_bucket(encode(arr[:, :, 0], "PNG"), mask=True, like=res)
    assert like.image.shape[:2] == (H, W) and like.bucket == (H, W)
    # from the bucket list: a tall image gets a tall bucket
    res = datago.decode_to_bucket(data, BUCKETS)
    assert res.bucket.height > res.bucket.width
    assert res.image.shape[:2] == res.bucket == datago.nearest_bucket(500, 300, BUCKETS)
