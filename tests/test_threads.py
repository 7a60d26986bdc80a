"""Thread safety: per-thread decoders, GIL released, arrays that own their memory."""

import gc
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import datago
from conftest import encode, photo

BUCKETS = datago.make_buckets(256, 16, 0.5, 2.0)


def _corpus():
    files = []
    for i, (w, h) in enumerate([(640, 480), (480, 640), (900, 300), (333, 777), (1024, 700),
                                (512, 512), (200, 150), (1200, 500)]):
        arr = photo(w, h, seed=i)
        files.append(encode(arr, "JPEG", quality=85 + i, subsampling=i % 3))
        files.append(encode(arr, "PNG"))
    rgba = np.dstack([photo(300, 200, seed=99), np.full((200, 300), 100, np.uint8)])
    files.append(encode(rgba, "PNG"))
    files.append(encode(photo(300, 200, seed=98)[:, :, 0], "JPEG"))   # grey
    return files


def _work(data):
    return (datago.decode_to_bucket(data, BUCKETS).image,
            datago.decode_to_bucket(data, BUCKETS, filter="lanczos").image,
            datago.decode(data))


def test_sixteen_threads_match_one_thread():
    files = _corpus()
    expected = [_work(d) for d in files]
    jobs = files * 6
    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(_work, jobs))
    for i, got in enumerate(results):
        for a, b in zip(got, expected[i % len(files)]):
            assert a.dtype == b.dtype and np.array_equal(a, b)


def test_each_thread_has_its_own_decoder_state():
    from datago._core import _pipeline
    files = _corpus()[:4]
    seen = []
    barrier = threading.Barrier(8)

    def run():
        for d in files:
            datago.decode_to_bucket(d, BUCKETS)
        seen.append(id(_pipeline._local.state))
        barrier.wait()                   # all alive at once: ids cannot be recycled

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 8


def test_returned_arrays_outlive_their_sources():
    data = bytearray(encode(photo(400, 300, seed=5), "JPEG"))
    ref = datago.decode(bytes(data))
    arr = datago.decode(data)
    res = datago.decode_to_bucket(data, BUCKETS)
    img = res.image
    del data, res
    gc.collect()
    # the decoder's scratch is reused by the next calls: results must not alias it
    for d in _corpus()[:6]:
        datago.decode_to_bucket(d, BUCKETS)
        datago.decode(d)
    gc.collect()
    assert np.array_equal(arr, ref)
    assert img.flags.owndata and arr.flags.writeable
    assert np.array_equal(img, datago.decode_to_bucket(encode(photo(400, 300, seed=5), "JPEG"),
                                                       BUCKETS).image)
