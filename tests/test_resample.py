"""The resampler against a float64 NumPy reference of the same filters."""

import numpy as np
import pytest

import datago
from datago._core import _resample
import reference
from conftest import photo

FILTERS = ["triangle", "lanczos", "bicubic", "box"]


def _cases(seed, n):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        c = int(rng.choice([1, 3, 4]))
        sw, sh = (int(v) for v in rng.integers(1, 300, 2))
        ow, oh = (int(v) for v in rng.integers(1, 200, 2))
        yield c, sw, sh, ow, oh, rng


@pytest.mark.parametrize("name", FILTERS)
def test_matches_float64_reference_within_one_lsb(name):
    worst = 0
    for c, sw, sh, ow, oh, rng in _cases(hash(name) % 1000, 40):
        img = rng.integers(0, 256, (sh, sw, c), dtype=np.uint8)
        ours = datago.resize(img, (oh, ow), filter=name)
        ref = reference.resize(img, ow, oh, name=name)
        assert ours.shape == ref.shape and ours.dtype == np.uint8
        worst = max(worst, int(np.abs(ours.astype(int) - ref).max()))
    assert worst <= 1


@pytest.mark.parametrize("name", FILTERS)
def test_fractional_box_matches_reference(name):
    img = photo(257, 190, seed=3)
    for box, size in [((10.25, 3.5, 250.75, 180.0), (90, 120)),     # downscale
                      ((100.5, 50.25, 140.0, 80.0), (120, 160)),     # upscale
                      ((0, 0, 257, 190), (190, 257)),                # identity
                      ((1.0, 0.0, 256.0, 190.0), (190, 64))]:        # one axis only
        ours = datago.resize(img, size, box=box, filter=name)         # (height, width)
        ref = reference.resize(img, size[1], size[0], box=box, name=name)
        assert np.abs(ours.astype(int) - ref).max() <= 1, box


def test_large_downscale_uses_precise_path():
    # 40x downscale: hundreds of taps, beyond the 16-bit path's precision budget
    img = np.random.default_rng(0).integers(0, 256, (60, 2400, 3), dtype=np.uint8)
    for name in ("lanczos", "triangle"):
        ours = datago.resize(img, (50, 60), filter=name)
        ref = reference.resize(img, 60, 50, name=name)
        assert np.abs(ours.astype(int) - ref).max() <= 1


def test_unbiased_on_smooth_content():
    img = photo(400, 300, seed=5)
    ours = datago.resize(img, (170, 230)).astype(np.float64)
    exact = reference.resize(img, 230, 170, exact=True)
    assert abs((ours - exact).mean()) < 0.05          # no systematic rounding bias
    assert np.abs(ours - exact).max() <= 1.0


def test_coefficients_are_normalised():
    for name in FILTERS:
        lo, w = _resample.coefficients(100, 3.5, 97.25, 37, name)
        assert np.allclose(w.sum(axis=1), 1.0, atol=1e-6)
        assert (lo >= 0).all() and (lo + w.shape[1] <= 100).all()


@pytest.mark.skipif(_resample.simd() != "avx2", reason="no AVX2 build on this machine")
def test_simd_builds_are_identical():
    try:
        for c, sw, sh, ow, oh, rng in _cases(11, 30):
            img = rng.integers(0, 256, (sh, sw, c), dtype=np.uint8)
            name = str(rng.choice(FILTERS))
            _resample.set_simd("avx2")
            a = datago.resize(img, (oh, ow), filter=name)
            _resample.set_simd("generic")
            b = datago.resize(img, (oh, ow), filter=name)
            assert np.array_equal(a, b), (c, sw, sh, ow, oh, name)
    finally:
        _resample.set_simd("auto")


@pytest.mark.skipif(_resample.simd() != "avx2", reason="no AVX2 build on this machine")
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("channels", [4, 3, 1], ids=["rgbx", "rgb", "grey"])
def test_simd_builds_are_identical_to_rgb(flip, channels):
    """The decode_to_bucket shapes: RGBX, RGB or grey source, packed RGB output (the
    AVX2 build has a hand-written pass for colour; grey has its own store path), also
    through a flipped view (EXIF orientation)."""
    rng = np.random.default_rng(17 + flip + 2 * channels)
    try:
        for sw, sh, ow, oh in [(1100, 70, 1024, 40), (40, 33, 700, 90), (300, 200, 301, 17),
                               (2, 2, 5, 16), (97, 31, 96, 33), (520, 64, 260, 32),
                               (30, 120, 20, 100)]:
            img = rng.integers(0, 256, (sh, sw, channels), dtype=np.uint8)
            for name in FILTERS:
                outs = []
                for simd in ("avx2", "generic"):
                    _resample.set_simd(simd)
                    out = np.full((oh, ow, 3), 7, np.uint8)
                    view = out[::-1, ::-1] if flip else out
                    datago.resize(img, (oh, ow), filter=name, out=view)
                    outs.append(out)
                assert np.array_equal(outs[0], outs[1]), (sw, sh, ow, oh, name)
                # the X channel is dropped, not blended in; grey fills all three
                ref = datago.resize(np.ascontiguousarray(img[:, :, :3]), (oh, ow), filter=name)
                if channels == 1:
                    ref = np.repeat(ref.reshape(oh, ow, 1), 3, axis=2)
                assert np.array_equal(outs[1][::-1, ::-1] if flip else outs[1], ref)
    finally:
        _resample.set_simd("auto")


def test_out_with_any_strides():
    img = photo(300, 200, seed=1)
    ref = datago.resize(img, (100, 150))
    # a (3, H, W) planar buffer viewed as (H, W, 3)
    planar = np.zeros((3, 100, 150), np.uint8)
    datago.resize(img, (100, 150), out=planar.transpose(1, 2, 0))
    assert np.array_equal(planar.transpose(1, 2, 0), ref)
    # a slice of a batch, and a flipped view
    batch = np.zeros((4, 100, 150, 3), np.uint8)
    datago.resize(img, (100, 150), out=batch[2])
    assert np.array_equal(batch[2], ref) and not batch[[0, 1, 3]].any()
    flipped = np.zeros((100, 150, 3), np.uint8)
    datago.resize(img, (100, 150), out=flipped[::-1, ::-1])
    assert np.array_equal(flipped[::-1, ::-1], ref)


def test_grey_source_fills_rgb_output():
    grey = photo(120, 80, seed=2)[:, :, :1].copy()
    out = np.zeros((40, 60, 3), np.uint8)
    datago.resize(grey, (40, 60), out=out)
    single = datago.resize(grey, (40, 60))
    for ch in range(3):
        assert np.array_equal(out[:, :, ch], single[:, :, 0])


def test_nearest_keeps_label_values():
    rng = np.random.default_rng(4)
    labels = rng.choice(np.array([0, 7, 19, 255], np.uint8), size=(90, 130, 1))
    out = datago.resize(labels, (41, 57), filter="nearest")
    assert set(np.unique(out)) <= {0, 7, 19, 255}
    # nearest samples the pixel under each output centre
    ys = np.clip(np.floor((np.arange(41) + 0.5) * 90 / 41).astype(int), 0, 89)
    xs = np.clip(np.floor((np.arange(57) + 0.5) * 130 / 57).astype(int), 0, 129)
    assert np.array_equal(out[:, :, 0], labels[ys][:, xs, 0])


def test_size_is_height_width():
    """``size`` is (height, width), torchvision's order: the result's shape."""
    img = photo(90, 60, seed=6)                         # (60, 90, 3)
    for h, w in [(40, 25), (25, 40), (60, 90), (90, 60), (1, 7)]:
        assert datago.resize(img, (h, w)).shape[:2] == (h, w)
        assert datago.resize(img, (h, w), filter="nearest").shape[:2] == (h, w)
        assert datago.resize(img[:, :, 0], (h, w)).shape == (h, w)
    lab = np.zeros((60, 90), np.uint16)
    assert datago.resize(lab, (40, 25), filter="nearest").shape == (40, 25)
    # a Bucket is a (height, width) size
    assert datago.resize(img, datago.Bucket(height=32, width=48)).shape == (32, 48, 3)


def test_2d_input_gives_2d_output():
    img = photo(64, 48, seed=0)[:, :, 0]
    out = datago.resize(img, (24, 32))
    assert out.shape == (24, 32)


@pytest.mark.parametrize("bad, exc, match", [
    (np.zeros((10, 10, 3), np.float32), TypeError, "uint8"),
    (np.zeros((10, 10, 2), np.uint8), ValueError, "channels"),
    (np.zeros((10,), np.uint8), TypeError, "uint8"),
])
def test_bad_arrays(bad, exc, match):
    with pytest.raises(exc, match=match):
        datago.resize(bad, (5, 5))


def test_bad_box_size_and_filter():
    img = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match="box"):
        datago.resize(img, (5, 5), box=(0, 0, 11, 10))
    with pytest.raises(ValueError, match="target height"):
        datago.resize(img, (0, 5))
    with pytest.raises(ValueError, match="target width"):
        datago.resize(img, (5, 0))
    with pytest.raises(ValueError, match=r"\(height, width\) pair"):
        datago.resize(img, (5, 5, 3))
    with pytest.raises(ValueError, match="unknown filter"):
        datago.resize(img, (5, 5), filter="cubic-spline")
    with pytest.raises(ValueError, match="out must be"):
        datago.resize(img, (5, 5), out=np.zeros((5, 6, 3), np.uint8))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_nearest_labels_any_type(dtype):
    """Label images of any supported type: values copied, same geometry as the uint8
    nearest filter; the output is never narrower than the source."""
    rng = np.random.default_rng(5)
    hi = {np.uint8: 256, np.uint16: 65536, np.int32: 2**31 - 1}[dtype]
    lab = rng.integers(0, hi, (37, 53, 2)).astype(dtype)
    box = (3.5, 1.25, 50.0, 36.0)
    got = _resample.nearest(lab, 29, 17, box=box)
    assert got.dtype == dtype and got.shape == (17, 29, 2)
    xs = np.clip(np.floor(3.5 + (np.arange(29) + 0.5) * (50.0 - 3.5) / 29).astype(int), 0, 52)
    ys = np.clip(np.floor(1.25 + (np.arange(17) + 0.5) * (36.0 - 1.25) / 17).astype(int), 0, 36)
    assert np.array_equal(got, lab[ys][:, xs])
    if dtype == np.uint8:       # the same pixels as the uint8 resampler's nearest filter
        ref = datago.resize(np.ascontiguousarray(lab[:, :, :1]), (17, 29), box=box, filter="nearest")
        assert np.array_equal(got[:, :, :1], ref)
    wide = _resample.nearest(lab, 29, 17, box=box, dtype=np.int32)
    assert wide.dtype == np.int32 and np.array_equal(wide, got.astype(np.int32))
    if dtype != np.uint8:
        with pytest.raises(ValueError, match="output of type"):
            _resample.nearest(lab, 29, 17, dtype=np.uint8)
        two_d = datago.resize(lab[:, :, 0], (17, 29), box=box, filter="nearest")
        assert two_d.dtype == dtype and np.array_equal(two_d, got[:, :, 0])
