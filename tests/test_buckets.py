"""Bucket construction (reference-compatible) and nearest-bucket matching."""

import math
import pickle

import pytest

import datago
from datago import Bucket, ConfigError, make_buckets, nearest_bucket

# the reference datago's list for 512/16/0.5/2.0, as it reports it: (width, height)
REFERENCE_512_WH = [
    (352, 720), (368, 704), (368, 688), (384, 672), (384, 656), (400, 640), (416, 624),
    (416, 608), (432, 592), (448, 576), (464, 560), (480, 544), (496, 528), (512, 512),
    (528, 496), (544, 480), (560, 464), (576, 448), (592, 432), (608, 416), (624, 416),
    (640, 400), (656, 384), (672, 384), (688, 368), (704, 368), (720, 352)]


def test_reference_list_512():
    # the same sizes in the same (aspect ratio) order, written (height, width)
    assert make_buckets(512, 16, 0.5, 2.0) == [(h, w) for w, h in REFERENCE_512_WH]


def test_reference_list_1024_is_512_doubled():
    assert make_buckets(1024, 32, 0.5, 2.0) == [(2 * h, 2 * w) for w, h in REFERENCE_512_WH]


def test_reference_counts():
    assert len(make_buckets(224, 16, 0.5, 2.0)) == 11
    assert make_buckets(224, 16, 0.5, 2.0)[0] == Bucket(height=304, width=160)     # 160x304
    assert make_buckets(224, 16, 0.5, 2.0)[-1] == Bucket(height=160, width=304)    # 304x160
    assert len(make_buckets(1024, 16, 0.25, 4.0)) == 129


def test_buckets_are_height_width():
    buckets = make_buckets(512, 16, 0.5, 2.0)
    assert Bucket(height=720, width=352) in buckets              # the reference's 352x720
    assert buckets[0] == Bucket(height=720, width=352)           # tallest first
    assert buckets[-1] == Bucket(height=352, width=720)          # widest last
    for b in buckets:
        assert type(b) is Bucket and b == (b.height, b.width)
        assert b.height * b.width <= 512 ** 2
        assert b.aspect_ratio == b.width / b.height
    assert [b.aspect_ratio for b in buckets] == sorted(b.aspect_ratio for b in buckets)
    assert datago.Bucket is Bucket


def test_bucket_pickles_and_unpacks():
    b = Bucket(height=720, width=352)
    assert pickle.loads(pickle.dumps(b)) == b and type(pickle.loads(pickle.dumps(b))) is Bucket
    h, w = b
    assert (h, w) == (720, 352)
    assert b == (720, 352) and hash(b) == hash((720, 352))


@pytest.mark.parametrize("size,ratio,lo,hi", [
    (size, ratio, lo, hi)
    for size in (128, 256, 384, 512, 768, 1024)
    for ratio in (8, 16, 32, 64)
    for lo, hi in ((0.5, 2.0), (0.25, 4.0), (0.8, 1.25), (1.0, 1.0), (0.33, 1.0))
    if size // ratio >= 2
])
def test_properties(size, ratio, lo, hi):
    buckets = make_buckets(size, ratio, lo, hi)
    p = size // ratio
    assert buckets, "at least one bucket"
    ars = [w / h for h, w in buckets]
    assert ars == sorted(ars)
    assert len({f"{a:.3f}" for a in ars}) == len(ars)            # merged duplicates
    for h, w in buckets:
        assert w % ratio == 0 and h % ratio == 0
        assert w * h <= size * size
        # area within one row/column of patches of the budget
        assert (w // ratio) * (h // ratio) > p * p - 2 * max(w // ratio, h // ratio)
    # the range is covered up to one patch step at each end, in both directions
    step_lo = 3 / math.sqrt(p * p * lo)          # relative AR change of one patch column
    step_hi = 3 / math.sqrt(p * p / hi)
    assert lo * (1 - step_lo) <= min(ars) <= lo * (1 + step_lo)
    assert hi * (1 - step_hi) <= max(ars) <= hi * (1 + step_hi)


@pytest.mark.parametrize("args, key", [
    ((0, 16, 0.5, 2.0), "default_image_size"),
    ((512, 0, 0.5, 2.0), "downsampling_ratio"),
    ((512, 16.0, 0.5, 2.0), "downsampling_ratio"),
    ((512, 16, 0, 2.0), "min_aspect_ratio"),
    ((512, 16, 0.5, float("nan")), "max_aspect_ratio"),
    ((512, 16, 2.0, 0.5), "larger than max_aspect_ratio"),
    ((16, 32, 0.5, 2.0), "larger than default_image_size"),
])
def test_bad_arguments_name_the_parameter(args, key):
    with pytest.raises(ConfigError, match=key):
        make_buckets(*args)


def test_nearest_reference_examples():
    b = make_buckets(224, 16, 0.5, 2.0)
    # the reference's own tests: closest(200, 100) = "1.900", closest(100, 200) = "0.526"
    # (its arguments are width, height; ours are height, width)
    for metric in ("log", "linear"):
        assert nearest_bucket(100, 200, b, metric=metric) == (160, 304)
        assert nearest_bucket(200, 100, b, metric=metric) == (304, 160)


def test_nearest_exact_and_clamped():
    b = make_buckets(512, 16, 0.5, 2.0)
    for h, w in b:
        assert nearest_bucket(h * 3, w * 3, b) == (h, w)
    assert nearest_bucket(10, 10000, b) == (352, 720)
    assert nearest_bucket(10000, 10, b) == (720, 352)


def test_nearest_tall_and_wide():
    b = make_buckets(512, 16, 0.5, 2.0)
    tall = nearest_bucket(1200, 800, b)           # 800 wide, 1200 high
    wide = nearest_bucket(800, 1200, b)           # 1200 wide, 800 high
    assert type(tall) is Bucket and type(wide) is Bucket
    assert tall.height > tall.width and tall == (624, 416)
    assert wide.width > wide.height and wide == (416, 624)
    # buckets given as plain (height, width) tuples give Buckets too
    assert nearest_bucket(1200, 800, [tuple(x) for x in b]) == tall
    assert type(nearest_bucket(1200, 800, [(600, 400), (400, 600)])) is Bucket


def test_log_metric_minimises_cropped_area():
    b = make_buckets(512, 16, 0.5, 2.0)
    for w in range(300, 2000, 7):
        h = 1000
        best = max(b, key=lambda bk: min(w / h, bk[1] / bk[0]) / max(w / h, bk[1] / bk[0]))
        got = nearest_bucket(h, w, b)
        kept = lambda bk: min(w / h, bk[1] / bk[0]) / max(w / h, bk[1] / bk[0])
        assert kept(got) == pytest.approx(kept(best))


def test_log_and_linear_differ_near_midpoints():
    b = [(100, 100), (100, 200)]          # AR 1 and 2: linear midpoint 1.5, log midpoint 1.414
    assert nearest_bucket(100, 145, b, metric="linear") == (100, 100)
    assert nearest_bucket(100, 145, b, metric="log") == (100, 200)


def test_ties_go_to_the_wider_bucket():
    b = [(100, 100), (100, 300)]          # linear midpoint at AR 2
    assert nearest_bucket(100, 200, b, metric="linear") == (100, 300)
    b = [(100, 100), (100, 400)]          # log midpoint at AR 2
    assert nearest_bucket(100, 200, b, metric="log") == (100, 400)


def test_nearest_bad_input():
    b = make_buckets(512, 16, 0.5, 2.0)
    with pytest.raises(ValueError, match="positive"):
        nearest_bucket(0, 10, b)
    with pytest.raises(ValueError, match="metric"):
        nearest_bucket(10, 10, b, metric="euclid")
    with pytest.raises(ValueError, match="empty"):
        nearest_bucket(10, 10, [])
    with pytest.raises(ValueError, match=r"\(height, width\) pair"):
        nearest_bucket(10, 10, [(10, 0)])
    with pytest.raises(ValueError, match="height=0, width=10"):
        nearest_bucket(0, 10, b)
