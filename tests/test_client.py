"""DatagoClient: the reference datago's Python API over DatagoDataset (passes,
threads, payloads, orders, config keys, environment, every source)."""

import io
import json
import logging
import tarfile
import threading
import time
import weakref
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import datago
import datago.client as client_mod
from datago import DatagoClient, ImagePayload, LatentPayload, Sample
from datago.fetch import FetchError
from conftest import bounded, encode, photo
from servers import FaultServer
from test_dataset import make_tree

REF_IMAGE_CONFIG = {"crop_and_resize": True, "default_image_size": 128, "downsampling_ratio": 16,
                    "min_aspect_ratio": 0.5, "max_aspect_ratio": 2.0}


def ref_config(root, **extra):
    cfg = {"source_type": "file",
           "source_config": {"root_path": str(root), "random_sampling": False, "rank": 0,
                             "world_size": 0},
           "image_config": dict(REF_IMAGE_CONFIG), "samples_buffer_size": 8}
    cfg.update(extra)
    return json.dumps(cfg)


def drain(client):
    out = []
    while (s := client.get_sample()) is not None:
        out.append(s)
    return out


def small_tree(root, n, size=(24, 20)):
    """n tiny JPEGs, ids "0000.jpg"..."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        (root / f"{i:04d}.jpg").write_bytes(encode(arr, "JPEG", quality=70))
    return [f"{i:04d}.jpg" for i in range(n)]


@pytest.fixture(scope="module")
def thousand(tmp_path_factory):
    root = tmp_path_factory.mktemp("thousand")
    return root, small_tree(root, 1000)


# ---------------------------------------------------------------------------- passes

def test_one_pass_then_none_then_a_new_pass(tmp_path):
    ids = make_tree(tmp_path, n=10)
    c = DatagoClient(ref_config(tmp_path))
    samples = drain(c)
    assert [s.id for s in samples] == ids
    assert c.get_sample() is None and c.get_sample() is None
    c.start()
    assert [s.id for s in drain(c)] == ids
    c.stop()
    assert c.get_sample() is None


def test_start_during_a_pass_continues_it_and_stop_ends_it(tmp_path):
    """As the reference: start() while reading does not restart; after stop(),
    None until start()."""
    ids = small_tree(tmp_path, 12)
    c = DatagoClient(ref_config(tmp_path))
    c.start()
    first = [c.get_sample().id for _ in range(5)]
    c.start()
    c.start()
    assert first + [s.id for s in drain(c)] == ids
    c.start()
    assert c.get_sample().id == ids[0]
    c.stop()
    assert c.get_sample() is None and c.get_sample() is None
    c.start()
    assert [s.id for s in c] == ids                # __iter__: one pass
    c.stop()


def test_start_after_reading_every_sample_begins_the_next_pass(tmp_path):
    """A pass whose samples were all read is over even before a caller saw None."""
    ids = small_tree(tmp_path, 4)
    c = DatagoClient(ref_config(tmp_path))
    assert [c.get_sample().id for _ in range(4)] == ids
    deadline = time.monotonic() + 10               # the reader queues the end
    while c._pass.running and time.monotonic() < deadline:
        time.sleep(0.01)
    c.start()
    assert [s.id for s in drain(c)] == ids


def test_stop_before_any_read_means_no_lazy_start(tmp_path):
    small_tree(tmp_path, 3)
    c = DatagoClient(ref_config(tmp_path))
    c.stop()
    assert c.get_sample() is None
    c.start()
    assert len(drain(c)) == 3


def test_threads_share_one_client(thousand):
    """Eight threads over 1,000 samples: each sample to exactly one thread, then
    None for every thread (and again on later calls)."""
    root, ids = thousand
    c = DatagoClient(json.dumps({"source_type": "file", "source_config": {"root_path": str(root)},
                                 "image_config": {"crop_and_resize": True,
                                                  "default_image_size": 32,
                                                  "downsampling_ratio": 16},
                                 "samples_buffer_size": 16}))
    got = [[] for _ in range(8)]
    ends = [[] for _ in range(8)]
    errors = []
    barrier = threading.Barrier(8)

    def reader(k):
        try:
            barrier.wait()
            while (s := c.get_sample()) is not None:
                assert s.image.to_numpy_array().shape[2] == 3
                got[k].append(s.id)
            ends[k] = [c.get_sample(), c.get_sample()]
        except BaseException as e:              # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    counts = Counter(i for g in got for i in g)
    assert sorted(counts) == ids and set(counts.values()) == {1}
    assert sum(1 for g in got if g) > 1             # the work was shared
    assert all(e == [None, None] for e in ends)
    assert c.get_sample() is None
    c.start()                                      # and a second pass, in one thread
    assert len(drain(c)) == 1000


def test_a_failing_pass_raises_to_every_caller(tmp_path):
    small_tree(tmp_path, 4)
    (tmp_path / "0002.jpg").write_bytes(b"not an image at all")
    c = DatagoClient(ref_config(tmp_path, on_error="raise"))
    with pytest.raises(datago.DatagoError, match="0002.jpg"):
        drain(c)
    for _ in range(2):                              # not a silent None later either
        with pytest.raises(datago.DatagoError, match="0002.jpg"):
            c.get_sample()
    c.start()                                       # a new pass reads again
    with pytest.raises(datago.DatagoError):
        drain(c)


def test_the_reader_holds_no_sample_once_the_end_is_visible():
    """The end of a pass is published after the reader closed the dataset's
    iterator and let go of every sample: a torch tensor freed by the (daemon)
    reader thread while the interpreter exits aborts the process."""
    refs = []

    class Marker:
        pass

    class SlowToClose:
        def __init__(self):
            self.left = 30

        def __iter__(self):
            return self

        def __next__(self):
            if not self.left:
                raise StopIteration
            self.left -= 1
            m = Marker()
            refs.append(weakref.ref(m))
            return m

        def close(self):
            time.sleep(0.2)

    class Dataset:
        def __iter__(self):
            return SlowToClose()

    p = client_mod._Pass(Dataset(), 4)
    while p.get() is not None:
        pass
    assert len(refs) == 30 and all(r() is None for r in refs)


# ---------------------------------------------------------------------------- fields

def test_sample_fields_and_payloads(tmp_path):
    arr = photo(200, 120, seed=1)
    (tmp_path / "a.jpg").write_bytes(encode(arr, "JPEG"))
    (tmp_path / "a.json").write_text(json.dumps({"caption": "a cat", "score": 0.5}))
    labels = np.zeros((120, 200), np.uint8)
    labels[:, 100:] = 7
    (tmp_path / "a.mask.png").write_bytes(encode(labels, "PNG"))
    np.save(tmp_path / "a.npy", np.arange(6, dtype=np.float16).reshape(2, 3))
    with DatagoClient(ref_config(tmp_path, limit=1)) as c:
        s = c.get_sample()
    assert s.id == "a.jpg" and s.source == "filesystem" and s.duplicate_state == 0
    assert s.attributes == {"caption": "a cat", "score": 0.5}      # values, not JSON text
    assert s.tags == [] and s.coca_embedding == []
    lat = s.latents["npy"]
    assert isinstance(lat, LatentPayload) and isinstance(lat.data, bytes)
    assert lat.len == len(lat.data)
    back = np.load(io.BytesIO(lat.data))
    assert back.dtype == np.float16 and np.array_equal(back, np.arange(6).reshape(2, 3))
    ref = datago.decode_to_bucket((tmp_path / "a.jpg").read_bytes(),
                                  datago.make_buckets(128, 16, 0.5, 2.0))
    img = s.image.to_numpy_array()
    assert np.array_equal(img, ref.image) and not img.flags.writeable
    p = s.image.get_payload()
    assert (p.width, p.height, p.channels, p.bit_depth, p.is_encoded) == \
        (ref.bucket.width, ref.bucket.height, 3, 8, False)
    assert (p.original_width, p.original_height) == (200, 120)
    assert (s.original_width, s.original_height) == (200, 120)
    assert len(p.data) == ref.image.size and p.data == ref.image.tobytes()
    pil = s.image.to_pil_image()
    assert pil.size == (ref.bucket.width, ref.bucket.height) and pil.mode == "RGB" == s.image.mode
    assert np.array_equal(np.asarray(s.image), ref.image)
    m = s.masks["mask"].to_numpy_array()
    assert m.shape == (*ref.bucket, 1) and set(np.unique(m)) <= {0, 7}
    assert s.masks["mask"].to_pil_image().mode == "L" == s.masks["mask"].mode


def test_field_types_are_the_references(tmp_path):
    """The types of section 2 of the reference notes (attributes: a dict here)."""
    make_tree(tmp_path, n=2)
    s = DatagoClient(ref_config(tmp_path)).get_sample()
    assert isinstance(s, Sample)
    for name, kind in (("id", str), ("source", str), ("attributes", dict),
                       ("duplicate_state", int), ("image", ImagePayload), ("masks", dict),
                       ("additional_images", dict), ("latents", dict),
                       ("coca_embedding", list), ("tags", list)):
        assert isinstance(getattr(s, name), kind), name
    p = s.image.get_payload()
    for name, kind in (("data", bytes), ("width", int), ("height", int),
                       ("original_width", int), ("original_height", int), ("channels", int),
                       ("bit_depth", int), ("is_encoded", bool)):
        assert isinstance(getattr(p, name), kind), name


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_pre_encoded_payloads_still_convert(tmp_path, fmt):
    (tmp_path / "a.png").write_bytes(encode(photo(150, 150, seed=2), "PNG"))
    labels = np.zeros((150, 150), np.uint8)
    labels[40:, :] = 3
    (tmp_path / "a.mask.png").write_bytes(encode(labels, "PNG"))
    c = DatagoClient(ref_config(tmp_path, image_config={**REF_IMAGE_CONFIG,
                                                        "pre_encode_images": True,
                                                        "encode_format": fmt}))
    s = c.get_sample()
    assert s.image.is_encoded and s.image.channels == -1 and s.image.bit_depth == 8
    assert s.image.data[:4] == (b"\x89PNG" if fmt == "png" else b"\xff\xd8\xff\xe0")
    arr = s.image.to_numpy_array()                 # the reference raises here
    assert arr.shape == (128, 128, 3) and arr.dtype == np.uint8
    pil = s.image.to_pil_image()
    assert isinstance(pil, Image.Image) and pil.size == (128, 128) and s.image.mode == "RGB"
    mask = s.masks["mask"]                         # masks stay PNG (lossless) either way
    assert mask.data[:4] == b"\x89PNG" and set(np.unique(mask.to_numpy_array())) <= {0, 3}
    assert mask.to_numpy_array().shape == (128, 128, 1) and mask.mode == "L"


def test_16bit_raw_payloads():
    grey = (np.arange(30 * 40, dtype=np.uint32).reshape(30, 40) * 53 % 65536).astype(np.uint16)
    p = ImagePayload(grey)
    assert (p.width, p.height, p.channels, p.bit_depth, p.is_encoded) == (40, 30, 1, 16, False)
    assert len(p.data) == 30 * 40 * 2
    a = p.to_numpy_array()
    assert a.dtype == np.uint16 and a.shape == (30, 40, 1) and np.array_equal(a[:, :, 0], grey)
    pil = p.to_pil_image()                         # the reference fails here
    assert pil.mode == "I;16" == p.mode and np.array_equal(np.asarray(pil), grey)
    rgb = np.stack([grey, 65535 - grey, grey // 2], axis=2)
    q = ImagePayload(rgb)
    assert q.to_numpy_array().dtype == np.uint16 and q.bit_depth == 16 and q.channels == 3
    pil = q.to_pil_image()
    assert pil.mode == "RGB" == q.mode
    assert np.array_equal(np.asarray(pil), np.rint(rgb / 257).astype(np.uint8))
    rgba = ImagePayload(np.dstack([rgb, np.full_like(grey, 65535)]))
    assert rgba.to_pil_image().mode == "RGBA" == rgba.mode


def _png16_rgb(arr: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one)."""
    import struct
    import zlib
    h, w, _ = arr.shape

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16bit_encoded_payloads():
    grey = (np.arange(24 * 32, dtype=np.uint32).reshape(24, 32) * 97 % 65536).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, "PNG")
    p = ImagePayload(encoded=buf.getvalue(), width=32, height=24, bit_depth=16)
    assert p.channels == -1 and p.is_encoded and p.bit_depth == 16
    a = p.to_numpy_array()                          # 16 bits kept
    assert a.dtype == np.uint16 and a.shape == (24, 32, 1) and np.array_equal(a[:, :, 0], grey)
    assert p.to_pil_image().size == (32, 24) and p.mode in ("I;16", "I")
    rgb = np.stack([grey, 65535 - grey, grey // 3], axis=2)
    q = ImagePayload(encoded=_png16_rgb(rgb), width=32, height=24, encoded_channels=3,
                     bit_depth=16)
    b = q.to_numpy_array()                          # 8 bits: no 16-bit colour decoder
    assert b.shape == (24, 32, 3) and b.dtype == np.uint8
    assert np.abs(b.astype(int) - np.rint(rgb / 257)).max() <= 1
    assert q.to_pil_image().mode == "RGB"


def test_unknown_attributes_come_from_one_cached_pil_image(tmp_path, monkeypatch):
    make_tree(tmp_path, n=2)
    s = DatagoClient(ref_config(tmp_path)).get_sample()
    calls = []
    real = ImagePayload.to_pil_image

    def counting(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(ImagePayload, "to_pil_image", counting)
    assert s.image.mode == "RGB" and s.image.size == (s.image.width, s.image.height)
    assert calls == []                              # answered without converting
    arr = s.image.to_numpy_array()
    assert s.image.getpixel((0, 0)) == tuple(int(v) for v in arr[0, 0])
    assert s.image.getpixel((1, 0)) == tuple(int(v) for v in arr[0, 1])
    assert s.image.format is None and isinstance(s.image.info, dict)
    assert calls == [1]                             # converted once (the reference: every time)
    with pytest.raises(AttributeError, match="no_such_thing"):
        s.image.no_such_thing


def test_latent_payload():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    p = LatentPayload(array=arr)
    assert p.len == len(p.data) and np.array_equal(np.load(io.BytesIO(p.data)), arr)
    assert p.array is arr
    q = LatentPayload(b"raw bytes")
    assert q.data == b"raw bytes" and q.len == 9 and q.array is None
    with pytest.raises(ValueError):
        LatentPayload()


def test_auto_convert(tmp_path):
    make_tree(tmp_path, n=3)
    (tmp_path / "part0" / "g0" / "img000.json").write_text(json.dumps({"caption": "cap 0",
                                                                      "score": 0.5}))
    np.save(tmp_path / "part0" / "g0" / "img000.npy", np.ones(3, np.float32))
    c = DatagoClient(ref_config(tmp_path))
    d = c.get_sample_auto_convert()
    assert list(d) == ["id", "source", "duplicate_state", "attributes", "tags",
                       "coca_embedding", "latents", "image", "masks", "additional_images"]
    assert isinstance(d["image"], Image.Image)
    assert d["attributes"] == {"caption": "cap 0", "score": 0.5}
    lat = d["latents"]["npy"]
    assert set(lat) == {"data", "len"} and lat["len"] == len(lat["data"])
    assert np.array_equal(np.load(io.BytesIO(lat["data"])), np.ones(3, np.float32))
    assert (d["tags"], d["coca_embedding"], d["masks"], d["duplicate_state"]) == ([], [], {}, 0)


# ---------------------------------------------------------------------------- order

def _order(root, **extra):
    return [s.id for s in drain(DatagoClient(ref_config(root, **extra)))]


def test_random_sampling_fresh_order_per_client_unless_seeded(tmp_path, caplog):
    ids = small_tree(tmp_path, 40)
    cfg = {"source_type": "file", "image_config": None, "samples_buffer_size": 8,
           "source_config": {"root_path": str(tmp_path), "random_sampling": True}}
    with caplog.at_level(logging.INFO, logger="datago"):
        a = DatagoClient(json.dumps(cfg))
    seeds = [r for r in caplog.records if "seed" in r.getMessage()]
    assert len(seeds) == 1 and seeds[0].levelno == logging.INFO
    b = DatagoClient(json.dumps(cfg))
    oa, ob = [s.id for s in drain(a)], [s.id for s in drain(b)]
    assert sorted(oa) == sorted(ob) == ids and oa != ob and oa != ids
    # the logged seed replays the order
    seed = a.config.loader.seed
    assert f"seed {seed}" in seeds[0].getMessage()
    assert [s.id for s in drain(DatagoClient(json.dumps({**cfg, "seed": seed})))] == oa
    # with a seed: the same order every time, and each pass its own
    s1 = DatagoClient(json.dumps({**cfg, "seed": 7}))
    s2 = DatagoClient(json.dumps({**cfg, "seed": 7}))
    p1, p2 = [s.id for s in drain(s1)], [s.id for s in drain(s2)]
    assert p1 == p2 and p1 != ids
    s1.start()
    s2.start()
    q1, q2 = [s.id for s in drain(s1)], [s.id for s in drain(s2)]
    assert q1 == q2 and q1 != p1 and sorted(q1) == ids


def test_no_random_sampling_keeps_the_listing_order(tmp_path):
    ids = small_tree(tmp_path, 10)
    assert _order(tmp_path) == _order(tmp_path) == ids


# ---------------------------------------------------------------------------- config

def test_limit_and_bad_config(tmp_path):
    make_tree(tmp_path, n=10)
    assert len(drain(DatagoClient(ref_config(tmp_path, limit=4)))) == 4
    with pytest.raises(datago.ConfigError, match="random_samplng.*did you mean"):
        DatagoClient(json.dumps({"source_type": "file",
                                 "source_config": {"root_path": str(tmp_path),
                                                   "random_samplng": True}}))
    with pytest.raises(datago.ConfigError, match="not valid JSON"):
        DatagoClient("{")
    with pytest.raises(datago.ConfigError, match="batch_size"):
        DatagoClient(ref_config(tmp_path, batch_size=4))
    with pytest.raises(datago.ConfigError, match="rank"):
        DatagoClient(json.dumps({"source_type": "file", "source_config": {
            "root_path": str(tmp_path), "rank": 2, "world_size": 2}}))
    with pytest.raises(datago.ConfigError, match="not an existing folder"):
        DatagoClient(json.dumps({"source_type": "file",
                                 "source_config": {"root_path": str(tmp_path / "nope")}}))


def test_a_config_without_source_type(tmp_path, monkeypatch):
    """The reference's default source_type is "db"; folder, WebDataset and index
    configs are recognised by their keys."""
    small_tree(tmp_path, 2)
    c = DatagoClient(json.dumps({"source_config": {"root_path": str(tmp_path)}}))
    assert c.config.source_type == "file" and len(drain(c)) == 2
    monkeypatch.delenv("DATAROOM_API_URL", raising=False)
    with pytest.raises(datago.ConfigError, match="DATAROOM_API_URL"):
        DatagoClient(json.dumps({"source_config": {"sources": "S", "page_size": 10},
                                 "limit": 10, "samples_buffer_size": 8}))


@pytest.mark.parametrize("where, key", [("", "prefetch_buffer_size"), ("", "concurrency"),
                                        ("source_config", "page_size"),
                                        ("source_config", "prefetch_buffer_size")])
def test_readme_keys_are_accepted_with_a_deprecation_warning(tmp_path, where, key):
    """Keys the reference's READMEs still show warn (pointing at the caller's
    line), never raise."""
    small_tree(tmp_path, 3)
    cfg = json.loads(ref_config(tmp_path, limit=3))
    (cfg[where] if where else cfg)[key] = 64
    with pytest.warns(DeprecationWarning, match=f"{key} is ignored") as rec:
        c = DatagoClient(json.dumps(cfg))
    assert rec[0].filename == __file__
    assert len(drain(c)) == 3


def test_env_max_tasks_and_max_retries(tmp_path, monkeypatch):
    small_tree(tmp_path, 3)
    monkeypatch.setenv("DATAGO_MAX_TASKS", "3")
    monkeypatch.setenv("DATAGO_MAX_RETRIES", "1")
    c = DatagoClient(ref_config(tmp_path))
    assert c.config.loader.num_threads == 3
    assert c._dataset.fetcher.config.retries == 1
    assert len(drain(c)) == 3
    assert DatagoClient(ref_config(tmp_path, num_threads=2)).config.loader.num_threads == 2
    monkeypatch.setenv("DATAGO_MAX_TASKS", "0")                 # serial, as the reference
    assert DatagoClient(ref_config(tmp_path)).config.loader.num_threads == 1
    monkeypatch.setenv("DATAGO_MAX_TASKS", "many")
    with pytest.raises(datago.ConfigError, match="DATAGO_MAX_TASKS"):
        DatagoClient(ref_config(tmp_path))


def test_env_max_retries_counts_at_construction(tmp_path, monkeypatch):
    """DATAGO_MAX_RETRIES holds for the index file read when the client is built:
    below the failures it raises naming the reason, at or above them it reads; a
    mix of sources takes it too (each source's fetcher)."""
    ids = small_tree(tmp_path, 3)
    (tmp_path / "list.txt").write_text("\n".join(ids))
    with FaultServer(tmp_path) as srv:
        cfg = json.dumps({"source_config": {"index": f"{srv.url}/list.txt"},
                          "image_config": REF_IMAGE_CONFIG, "samples_buffer_size": 4})
        srv.add_fault("/list.txt", "503", times=2)
        monkeypatch.setenv("DATAGO_MAX_RETRIES", "1")
        with pytest.raises(FetchError, match="HTTP 503") as e:
            DatagoClient(cfg)
        assert (e.value.reason, e.value.attempts) == ("http_5xx", 2)
        srv.add_fault("/list.txt", "503", times=2)
        monkeypatch.setenv("DATAGO_MAX_RETRIES", "2")
        c = DatagoClient(cfg)
        assert c.config.source_type == "index" and c._dataset.fetcher.config.retries == 2
        assert sorted(s.id for s in drain(c)) == ids
        assert len(srv.requests("/list.txt")) == 2 + 3
        mix = DatagoClient(json.dumps({"sources": [
            {"weight": 1, "source_type": "index",
             "source_config": {"index": f"{srv.url}/list.txt"}},
            {"weight": 1, "source_type": "file", "source_config": {"root_path": str(tmp_path)}}],
            "image_config": None, "seed": 1}))
        assert [f.config.retries for f in mix._dataset.fetcher.fetchers] == [2, 2]


# ---------------------------------------------------------------------------- logging

def test_retries_key_through_the_client(tmp_path, monkeypatch):
    """A ``retries`` key of the config holds in the client (compat mode keeps it:
    a key the source knows); DATAGO_MAX_RETRIES, when set, overrides it (it is
    DatagoDataset's ``fetch_retries``)."""
    ids = small_tree(tmp_path, 3)
    (tmp_path / "list.txt").write_text("\n".join(ids))
    monkeypatch.delenv("DATAGO_MAX_RETRIES", raising=False)
    with FaultServer(tmp_path) as srv:
        raw = {"source_config": {"index": f"{srv.url}/list.txt", "retries": 2},
               "image_config": REF_IMAGE_CONFIG, "samples_buffer_size": 4}
        for compat in (False, True):
            srv.add_fault("/list.txt", "503", times=2)
            c = DatagoClient(json.dumps(raw), compat=compat)
            assert c._dataset.fetcher.config.retries == 2
            assert sorted(s.id for s in drain(c)) == ids
        assert len(srv.requests("/list.txt")) == 2 * 3
        monkeypatch.setenv("DATAGO_MAX_RETRIES", "0")
        srv.add_fault("/list.txt", "503", times=1)
        with pytest.raises(FetchError, match="HTTP 503") as e:
            DatagoClient(json.dumps(raw))
        assert e.value.attempts == 1 and len(srv.requests("/list.txt")) == 2 * 3 + 1


@pytest.fixture
def fresh_logging(monkeypatch):
    log = logging.getLogger("datago")
    level, handlers = log.level, list(log.handlers)
    monkeypatch.setattr(client_mod, "_log_initialized", False)
    monkeypatch.delenv("RUST_LOG", raising=False)
    yield log
    log.setLevel(level)
    log.handlers[:] = handlers


def test_initialize_logging(fresh_logging, monkeypatch):
    log = fresh_logging
    assert datago.initialize_logging() is True              # None: warn
    assert log.level == logging.WARNING
    assert datago.initialize_logging("warn") is False       # already initialised, as the reference
    for name, level in (("ERROR", logging.ERROR), ("Info", logging.INFO), ("debug", logging.DEBUG),
                        ("trace", 5), ("warning", logging.WARNING)):
        assert datago.initialize_logging(log_level=name) is False
        assert log.level == level
    datago.initialize_logging("off")
    assert not log.isEnabledFor(logging.CRITICAL)
    with pytest.raises(ValueError, match="verbose"):
        datago.initialize_logging("verbose")
    monkeypatch.setenv("RUST_LOG", "warn,datago=debug")     # RUST_LOG wins, as in the reference
    datago.initialize_logging("error")
    assert log.level == logging.DEBUG
    monkeypatch.setenv("RUST_LOG", "info")
    datago.initialize_logging()
    assert log.level == logging.INFO


def test_rust_log_initialises_logging_when_a_client_is_built(fresh_logging, monkeypatch,
                                                              tmp_path):
    small_tree(tmp_path, 2)
    monkeypatch.setenv("RUST_LOG", "debug")
    DatagoClient(ref_config(tmp_path))
    assert client_mod._log_initialized and fresh_logging.level == logging.DEBUG


# ---------------------------------------------------------------------------- sources

def test_webdataset_samples_name_their_shard(tmp_path):
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for k in range(3):
            for ext, data in (("jpg", encode(photo(90, 60, seed=k), "JPEG")),
                              ("txt", f"caption {k}".encode()),
                              ("npy", _npy(np.full(4, k, np.float32)))):
                info = tarfile.TarInfo(f"s{k}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    c = DatagoClient(json.dumps({"source_type": "webdataset",
                                 "source_config": {"url": str(shard)},
                                 "image_config": REF_IMAGE_CONFIG}))
    got = drain(c)
    assert [s.id for s in got] == ["s0", "s1", "s2"]
    for k, s in enumerate(got):
        assert s.source == str(shard) and s.duplicate_state == 0
        assert s.attributes == {"txt": f"caption {k}"}
        assert np.array_equal(np.load(io.BytesIO(s.latents["npy"].data)), np.full(4, k))
        assert s.image.to_numpy_array().shape[2] == 3


def _wds_shards(folder, n_shards=4, per_shard=3):
    """Small tar shards (a JPEG and a caption per sample); returns (brace pattern,
    {shard number: [sample keys]})."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = {}
    for s in range(n_shards):
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tar:
            for k in range(per_shard):
                key = f"s{s}k{k}"
                keys.setdefault(s, []).append(key)
                for ext, data in (("jpg", encode(photo(40 + 8 * k, 32, seed=s * 10 + k),
                                                 "JPEG")),
                                  ("txt", key.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"shard-{{000..{n_shards - 1:03d}}}.tar"), keys


def test_streamed_webdataset_passes_end_and_never_hang(tmp_path):
    """DatagoClient over streamed WebDataset shards (``streaming: true``, one
    sample at a time: the path whose prefetch thread once left a ``next`` waiting
    forever after the end): reads after the end, after stop(), after a damaged
    shard (skipped or raised), start() again and a ``limit`` all return, each
    bounded by a thread join."""
    pattern, keys = _wds_shards(tmp_path / "shards")
    every = sorted(k for ks in keys.values() for k in ks)

    def client(**extra):
        src = {"url": extra.pop("url", pattern), "streaming": True}
        return DatagoClient(json.dumps({"source_type": "webdataset", "source_config": src,
                                        "image_config": REF_IMAGE_CONFIG,
                                        "samples_buffer_size": 2, **extra}))

    def passes():
        c = client()
        got = [sorted(s.id for s in drain(c))]
        ends = [c.get_sample(), c.get_sample()]
        c.start()
        got.append(sorted(s.id for s in drain(c)))
        ends.append(c.get_sample())
        c.start()                                       # a pass stopped early
        first = [c.get_sample(), c.get_sample()]
        c.stop()
        ends += [c.get_sample(), c.get_sample()]
        c.start()
        got.append(sorted(s.id for s in drain(c)))
        c.stop()
        c.stop()
        return got, ends, first

    got, ends, first = bounded(passes)
    assert got == [every] * 3 and ends == [None] * 5 and all(s is not None for s in first)

    limited = client(limit=5)           # (not applied to streamed shards yet: see
    got = bounded(lambda: [len(drain(limited)), limited.get_sample(),   # test_wds_stream)
                            (limited.start(), len(drain(limited)))[1], limited.get_sample()])
    assert got[0] >= 5 and got[1:] == [None, got[0], None]

    damaged = tmp_path / "damaged"                      # shard 2 cut in its middle
    damaged.mkdir()
    for s in range(4):
        data = (tmp_path / "shards" / f"shard-{s:03d}.tar").read_bytes()
        (damaged / f"shard-{s:03d}.tar").write_bytes(data if s != 2 else data[:len(data) // 2])
    url = str(damaged / "shard-{000..003}.tar")
    skip = client(url=url)

    def skipped():
        with pytest.warns(RuntimeWarning, match="shard 2 failed"):
            ids = sorted(s.id for s in drain(skip))
        ends = [skip.get_sample(), skip.get_sample()]
        skip.start()
        with pytest.warns(RuntimeWarning, match="shard 2 failed"):
            again = sorted(s.id for s in drain(skip))
        return ids, ends, again, skip.get_sample()

    ids, ends, again, last = bounded(skipped)
    assert set(ids) >= {k for s in (0, 1, 3) for k in keys[s]} and set(ids) < set(every)
    assert again == ids and ends == [None, None] and last is None

    raising = client(url=url, on_error="raise")

    def raised():
        errors = []
        for _ in range(2):                             # the pass, then start() again
            read = []
            try:
                while (s := raising.get_sample()) is not None:
                    read.append(s.id)
            except datago.DatagoError as e:
                errors.append(str(e))
            for _ in range(2):                         # the error again, never a hang
                try:
                    raising.get_sample()
                except datago.DatagoError as e:
                    errors.append(str(e))
            raising.start()
        raising.stop()
        return errors, raising.get_sample()

    errors, last = bounded(raised)
    assert len(errors) == 6 and all("not a readable tar shard" in e for e in errors), errors
    assert last is None


def test_streamed_webdataset_over_http_stops_in_a_stalled_read(tmp_path):
    """Streamed shards over HTTP: stop() while the shard reader is stuck in a stalled
    body returns within its grace period, the next pass reads everything, the
    stopped pass's reader ends once its read times out, and a dead shard (404) is
    skipped with a warning; every step bounded."""
    pattern, keys = _wds_shards(tmp_path / "shards")
    every = sorted(k for ks in keys.values() for k in ks)
    with FaultServer(tmp_path / "shards") as srv:
        cfg = json.dumps({"source_type": "webdataset",
                          "source_config": {"url": f"{srv.url}/shard-{{000..003}}.tar",
                                            "streaming": True, "timeout_s": 3.0},
                          "image_config": REF_IMAGE_CONFIG, "samples_buffer_size": 2})
        c = DatagoClient(cfg)                          # (probes the shard sizes)
        srv.add_fault("/shard-001.tar", "stall_body", times=1, stall_s=60, fraction=0.5)

        def stalled():
            first = [c.get_sample().id for _ in range(2)]
            deadline = time.monotonic() + 20
            while not [r for r in srv.requests("/shard-001.tar") if r.range is None]:
                assert time.monotonic() < deadline, "shard 1 never requested"
                time.sleep(0.05)
            t0 = time.monotonic()
            c.stop()
            took = time.monotonic() - t0
            after = c.get_sample()
            c.start()
            return first, took, after, sorted(s.id for s in drain(c)), c.get_sample()

        first, took, after, again, end = bounded(stalled)
        assert set(first) <= set(keys[0]) and took < 10 and after is None
        assert again == every and end is None
        # the stopped pass's shard reader (a thread of its own, stuck in the stall)
        # ends once its read times out and resumes (the stall was once): before
        # the server goes, or it would go on to fail every shard left, warning
        assert _readers_end(30), "a stopped pass's shard reader is still running"
        srv.add_fault("/shard-002.tar", "404", times=None)

        def dead():
            with pytest.warns(RuntimeWarning, match="shard 2 failed.*HTTP 404"):
                ids = sorted(s.id for s in drain(c))
            return ids, c.get_sample()

        c.start()
        ids, end = bounded(dead)
        assert ids == sorted(k for s in (0, 1, 3) for k in keys[s]) and end is None
        assert _readers_end(30)


def _readers_end(timeout_s: float) -> bool:
    """Whether every client reader and shard-stream thread has ended within
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not client_mod.live_cleanup_threads() and not [
                t for t in threading.enumerate() if t.name == "datago-stream" and t.is_alive()]:
            return True
        time.sleep(0.05)
    return False


def test_a_mix_of_sources(tmp_path, monkeypatch):
    """datago's own mixed sources (top-level "sources") work through the client."""
    a, b = tmp_path / "a", tmp_path / "b"
    ids_a, ids_b = small_tree(a, 6), small_tree(b, 6)
    monkeypatch.setenv("DATAGO_MAX_TASKS", "2")
    c = DatagoClient(json.dumps({
        "sources": [{"weight": 1, "source_type": "file", "source_config": {"root_path": str(a)}},
                    {"weight": 1, "source_type": "file", "source_config": {"root_path": str(b)}}],
        "image_config": None, "seed": 1}))
    got = drain(c)
    assert got and {s.id for s in got} <= set(ids_a) | set(ids_b)
    assert {s.source for s in got} == {"filesystem"} and c.config.loader.num_threads == 2


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_db_rows_become_reference_samples(monkeypatch):
    """tags, source, duplicate_state (-1 when absent), coca_embedding, masks,
    additional images and raw latents of dataroom rows, from a canned API page."""
    img = encode(photo(80, 64, seed=3), "JPEG")
    mask = encode(np.full((64, 80), 5, np.uint8), "PNG")
    extra = encode(photo(80, 64, seed=4), "PNG")
    vae = _npy(np.arange(8, dtype=np.float16))
    srv = FaultServer({"/f/a.jpg": img, "/f/b.jpg": img, "/f/a.mask.png": mask,
                       "/f/a.extra.png": extra, "/f/a.npy": vae})

    def row(i, **kw):
        return {"id": i, "source": "SRC", "image_direct_url": f"{srv.url}/f/{i}.jpg",
                "width": 80, "height": 64, "attributes": {"caption": f"c-{i}"}, **kw}

    page = json.dumps({"next": None, "results": [
        row("a", tags=["t1", "t2"], duplicate_state=2, coca_embedding={"vector": [0.5, -0.25]},
            latents=[{"latent_type": "segmentation_mask", "is_mask": True,
                      "file_direct_url": f"{srv.url}/f/a.mask.png"},
                     {"latent_type": "masked_image", "is_mask": False,
                      "file_direct_url": f"{srv.url}/f/a.extra.png"},
                     {"latent_type": "latent_vae", "is_mask": False,
                      "file_direct_url": f"{srv.url}/f/a.npy"}]),
        row("b")]}).encode()
    real = srv._lookup
    srv._lookup = lambda path: page if path.startswith("/api/images") else real(path)
    monkeypatch.setenv("DATAROOM_API_URL", srv.url + "/api/")
    monkeypatch.setenv("DATAROOM_API_KEY", "test-key-123")
    monkeypatch.setenv("DATAGO_MAX_TASKS", "3")            # a remote source: requests too
    monkeypatch.setenv("DATAGO_MAX_RETRIES", "2")
    with srv:
        c = DatagoClient(json.dumps({"source_config": {"sources": "SRC", "page_size": 10,
                                                       "require_embeddings": True},
                                     "image_config": REF_IMAGE_CONFIG, "limit": 2,
                                     "samples_buffer_size": 4}))      # db: the default
        got = {s.id: s for s in drain(c)}
    assert c.config.source_type == "db"
    assert (c.config.loader.num_threads, c.config.source.io_concurrency) == (3, 3)
    assert c._dataset.fetcher.config.retries == 2
    a, b = got["a"], got["b"]
    assert (a.source, a.tags, a.duplicate_state) == ("SRC", ["t1", "t2"], 2)
    assert (b.source, b.tags, b.duplicate_state) == ("SRC", [], -1)
    assert a.coca_embedding == [0.5, -0.25] and b.coca_embedding == []
    assert "coca_embedding" not in a.latents
    assert a.attributes == {"caption": "c-a"}
    assert list(a.masks) == ["segmentation_mask"] and list(a.additional_images) == ["masked_image"]
    assert set(np.unique(a.masks["segmentation_mask"].to_numpy_array())) == {5}
    assert np.array_equal(np.load(io.BytesIO(a.latents["latent_vae"].data)),
                          np.arange(8, dtype=np.float16))
    assert a.latents["latent_vae"].len == len(vae)


def test_16_bit_masks_come_out_as_16_bit_payloads(tmp_path):
    """The dataset gives 16-bit label masks as int32; the client's payload is the
    reference's 16-bit form, values kept."""
    from datago import DatagoClient
    from conftest import encode, photo
    (tmp_path / "a.jpg").write_bytes(encode(photo(64, 64), "JPEG"))
    labels = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 13) % 60000
    from PIL import Image
    Image.fromarray(labels).save(tmp_path / "a.mask.png")
    client = DatagoClient({"source_type": "file", "source_config": {"root_path": str(tmp_path)},
                           "image_config": {"crop_and_resize": True, "default_image_size": 64,
                                            "downsampling_ratio": 16}})
    s = client.get_sample()
    m = s.masks["mask"]
    assert m.get_payload().bit_depth == 16
    got = m.to_numpy_array()
    assert got.dtype == np.uint16 and np.array_equal(got[:, :, 0], labels)
    client.stop()
