"""source_type "tfrecord": CRC-32C, the Example reader, the writer, and TFRecord
files read by record offset (local, gzip, over nginx) against the folder source.

No TensorFlow: the reference record below is built by hand (protobuf bytes written
out field by field, CRC-32C by a bitwise reference implementation in this file)."""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np
import pytest

from conftest import encode, photo
from datago import DatagoDataset
from datago._core import _crc32c
from datago.fetch import FetchError, Member
from datago.sources import tfrecord as T
from datago.sources.tfrecord import (TFRecordWriter, encode_example, parse_example,
                                     read_records, record_feature, write_index)
from servers import Nginx

IMAGE = {"crop_and_resize": True, "default_image_size": 64, "downsampling_ratio": 16}


# ---------------------------------------------------------------------- references
def ref_crc32c(data: bytes, crc: int = 0) -> int:
    """Bitwise CRC-32C (reflected 0x82F63B78): the definition, slow."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def ref_masked(data: bytes) -> int:
    c = ref_crc32c(data)
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def ref_frame(data: bytes) -> bytes:
    head = struct.pack("<Q", len(data))
    return head + struct.pack("<I", ref_masked(head)) + data + struct.pack("<I", ref_masked(data))


def varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = b""
    while True:
        b, v = v & 0x7F, v >> 7
        if v:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def ld(field: int, payload: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def entry(key: str, feature: bytes) -> bytes:
    return ld(1, ld(1, key.encode()) + ld(2, feature))


# Example{features{feature{key:"image/encoded" value{bytes_list{value:"abc"}}}
#                  feature{key:"label" value{int64_list{value:7}}}}}, written out by hand
HAND_EXAMPLE = bytes.fromhex(
    "0a2a"                                   # Example.features, 42 bytes
    "0a18" "0a0d" + b"image/encoded".hex() + "1207" "0a05" "0a03" + b"abc".hex()
    + "0a0e" "0a05" + b"label".hex() + "1205" "1a03" "0a0107")


def npy_bytes(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def by_id(ds):
    """{id: (bucket, image, original_size, crop, attributes, masks, latents)} over an epoch."""
    out = {}
    for b in ds:
        for j, sid in enumerate(b["id"]):
            masks = {k: v[j].numpy().tobytes() for k, v in b["masks"].items()}
            masks.update({f"image/{k}": v[j].numpy().tobytes()
                          for k, v in b["additional_images"].items()})
            masks.update({f"present/{k}": bool(v[j]) for k, v in b.get("present", {}).items()})
            lat = {}
            for k, v in b.get("latents", {}).items():
                x = v[j] if not isinstance(v, list) else v[j]
                lat[k] = None if x is None else (tuple(x.shape), x.numpy().tobytes())
            out[sid] = (tuple(b["bucket"]), b["image"][j].numpy().tobytes(),
                        tuple(b["original_size"][j].tolist()),
                        tuple(b["crop_coords"][j].tolist()), b["attributes"][j], masks, lat)
    return out


def tf_cfg(path, **kw):
    src = {"path": path if isinstance(path, (str, list)) else str(path)}
    src.update(kw.pop("source", {}))
    return {"source_type": "tfrecord", "source_config": src, "image_config": IMAGE,
            "batch_size": 4, "seed": 3, **kw}


# ---------------------------------------------------------------------- the data
N = 18


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same samples as a folder (json/mask/npy sidecars) and as two TFRecord files."""
    base = tmp_path_factory.mktemp("tfrecord")
    folder = base / "folder"
    rng = np.random.default_rng(5)
    samples = []
    for i in range(N):
        w = int(rng.integers(40, 200))
        h = max(8, int(w / np.exp(rng.uniform(np.log(0.5), np.log(2.0)))))
        png = i % 5 == 0
        name = f"g{i % 2}/s{i:03d}.{'png' if png else 'jpg'}"
        img = encode(photo(w, h, seed=i), "PNG") if png else \
            encode(photo(w, h, seed=i), "JPEG", quality=90)
        feats = {"image/encoded": img, "image/filename": name, "caption": f"caption {i} é",
                 "label": i, "score": i / 4}
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(img)
        stem = str(folder / name).rsplit(".", 1)[0]
        with open(stem + ".json", "w") as f:
            json.dump({"caption": f"caption {i} é", "label": i, "score": i / 4}, f)
        if i % 3 == 0:
            m = (photo(w, h, seed=100 + i)[..., 0] > 128).astype(np.uint8) * 255
            feats["mask/encoded"] = encode(m, "PNG")
            with open(stem + ".mask.png", "wb") as f:
                f.write(feats["mask/encoded"])
        if i % 4 == 1:
            feats["depth/encoded"] = encode(photo(w, h, seed=200 + i), "PNG")
            with open(stem + ".depth.png", "wb") as f:
                f.write(feats["depth/encoded"])
        emb = rng.standard_normal(8).astype(np.float32)
        feats["emb"] = emb
        np.save(stem + ".emb.npy", emb)
        samples.append((name, feats))
    files = []
    for k in range(2):
        path = base / "records" / f"part-{k}.tfrecord"
        with TFRecordWriter(path) as w:
            for _, feats in samples[k::2]:
                w.write_example(feats)
        files.append(path)
    return base, folder, samples, files


def folder_cfg(root):
    return {"source_config": {"root_path": str(root)}, "image_config": IMAGE,
            "batch_size": 4, "seed": 3}


@pytest.fixture(scope="module")
def folder_result(data):
    return by_id(DatagoDataset(folder_cfg(data[1])))


# ---------------------------------------------------------------------- CRC-32C
def test_crc32c_known_vectors():
    for fn in (_crc32c.crc32c, _crc32c.crc32c_table, ref_crc32c):
        assert fn(b"123456789") == 0xE3069283
        assert fn(b"") == 0
        assert fn(bytes(32)) == 0x8A9136AA                      # RFC 3720 B.4
        assert fn(b"\xff" * 32) == 0x62A8AB43
        assert fn(bytes(range(32))) == 0x46DD794E
        assert fn(bytes(range(31, -1, -1))) == 0x113FDB5C
    assert _crc32c.KERNEL in ("sse4.2", "table")
    assert T.masked_crc32c(b"123456789") == ref_masked(b"123456789")
    c = 0xE3069283
    assert T.masked_crc32c(b"123456789") == \
        ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def test_crc32c_kernels_agree_on_all_lengths_and_alignments():
    rng = np.random.default_rng(0)
    blob = rng.integers(0, 256, 300, dtype=np.uint8).tobytes()
    for start in range(9):
        for n in list(range(0, 40)) + [63, 64, 65, 129, 250]:
            piece = blob[start:start + n]
            want = ref_crc32c(piece)
            assert _crc32c.crc32c(piece) == want
            assert _crc32c.crc32c_table(piece) == want
            assert _crc32c.crc32c(memoryview(blob)[start:start + n]) == want
            cut = n // 3
            assert _crc32c.crc32c(piece[cut:], _crc32c.crc32c(piece[:cut])) == want
    big = rng.integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()   # the nogil path
    assert _crc32c.crc32c(big) == _crc32c.crc32c_table(big)
    assert _crc32c.crc32c(bytearray(b"123456789")) == 0xE3069283


# ---------------------------------------------------------------------- records
def test_hand_built_record_is_read():
    framed = ref_frame(HAND_EXAMPLE)
    assert T.frame(HAND_EXAMPLE) == framed                     # the writer frames alike
    assert record_feature(framed, "image/encoded") == b"abc"
    assert np.load(io.BytesIO(record_feature(framed, "label"))).tolist() == [7]
    feats = parse_example(HAND_EXAMPLE)
    assert feats["image/encoded"] == [b"abc"] and feats["label"].tolist() == [7]
    # our encoder writes the same bytes for the same features
    assert encode_example({"image/encoded": b"abc", "label": 7}) == HAND_EXAMPLE


def test_writer_output_is_framed_by_the_reference(tmp_path):
    path = tmp_path / "w.tfrecord"
    with TFRecordWriter(path) as w:
        w.write(b"first")
        w.write_example({"image/encoded": b"abc", "label": 7})
    assert path.read_bytes() == ref_frame(b"first") + ref_frame(HAND_EXAMPLE)
    assert list(read_records(str(path))) == [b"first", HAND_EXAMPLE]
    assert w.offsets == [(0, 21), (21, len(HAND_EXAMPLE) + 16)]


def kinds_example() -> bytes:
    """An Example with every feature kind, packed and unpacked values, unknown fields
    at each level, an empty and a kindless feature and a duplicate key."""
    floats_packed = ld(1, struct.pack("<3f", 1.5, -2.0, 0.25))
    floats_unpacked = b"".join(varint(1 << 3 | 5) + struct.pack("<f", v) for v in (3.0, 4.5))
    ints_unpacked = b"".join(varint(1 << 3 | 0) + varint(v) for v in (5, -1, 2 ** 40))
    ints_packed = ld(1, b"".join(varint(v) for v in (-(2 ** 63), 0, 2 ** 63 - 1)))
    unknown = varint(9 << 3 | 0) + varint(99) + varint(10 << 3 | 1) + bytes(8) + \
        varint(11 << 3 | 5) + bytes(4) + ld(12, b"junk")
    return ld(1, entry("fp", ld(2, floats_packed)) + entry("fu", ld(2, floats_unpacked))
              + entry("mixed", ld(2, floats_packed + floats_unpacked))
              + entry("iu", ld(3, ints_unpacked)) + entry("ip", ld(3, ints_packed))
              + entry("b", ld(1, ld(1, b"x") + ld(1, b"") + ld(1, b"\xff")))
              + entry("empty", ld(3, b"")) + entry("none", b"")
              + entry("dup", ld(1, ld(1, b"old"))) + unknown
              + entry("dup", ld(3, ld(1, varint(3))))) + unknown


BAD_EXAMPLES = (b"\x0a\x05\x01", b"\x0b", b"\x0a\x80",
                ld(1, ld(1, ld(1, b"k") + ld(2, ld(2, b"abc")))))


def test_example_parsing_of_all_feature_kinds():
    f = parse_example(kinds_example())
    assert f["fp"].dtype == np.float32 and f["fp"].tolist() == [1.5, -2.0, 0.25]
    assert f["fu"].tolist() == [3.0, 4.5]
    assert f["mixed"].tolist() == [1.5, -2.0, 0.25, 3.0, 4.5]
    assert f["iu"].dtype == np.int64 and f["iu"].tolist() == [5, -1, 2 ** 40]
    assert f["ip"].tolist() == [-(2 ** 63), 0, 2 ** 63 - 1]
    assert f["b"] == [b"x", b"", b"\xff"]
    assert f["empty"].tolist() == [] and "none" not in f
    assert f["dup"].tolist() == [3]                           # the last map entry wins
    for bad in BAD_EXAMPLES:
        with pytest.raises(ValueError):
            parse_example(bad)


def round_trip_features() -> dict:
    return {"s": "héllo", "b": b"\x00\xff", "i": -3, "f": 0.5, "il": [1, 2, 3],
            "fl": [1, 2.5], "sl": ["a", b"b"], "arr": np.arange(12, dtype=np.float32).reshape(3, 4),
            "u8": np.arange(4, dtype=np.uint8), "one": np.array([7]), "skip": None, "flag": True}


def raw_array_features() -> dict:
    raw = np.arange(6, dtype=np.float16).reshape(2, 3)
    return {"lat": raw.tobytes(), "lat/shape": [2, 3], "lat/dtype": "float16"}


def test_writer_round_trip_of_values_and_arrays():
    feats = round_trip_features()
    arr = feats["arr"]
    ex = encode_example(feats)
    f = parse_example(ex)
    assert f["s"] == ["héllo".encode()] and f["b"] == [b"\x00\xff"] and f["i"].tolist() == [-3]
    assert f["f"].tolist() == [0.5] and f["il"].tolist() == [1, 2, 3]
    assert f["fl"].tolist() == [1.0, 2.5] and f["sl"] == [b"a", b"b"] and f["flag"].tolist() == [1]
    assert f["arr"].tolist() == arr.reshape(-1).tolist() and f["arr/shape"].tolist() == [3, 4]
    assert f["u8"].dtype == np.int64 and "u8/shape" not in f
    assert f["one/shape"].tolist() == [1] and "skip" not in f
    framed = T.frame(ex)
    got = np.load(io.BytesIO(record_feature(framed, "arr")))
    assert got.dtype == np.float32 and np.array_equal(got, arr)
    assert np.load(io.BytesIO(record_feature(framed, "one"))).tolist() == [7]
    # a raw-bytes array with shape and dtype companions
    raw = np.arange(6, dtype=np.float16).reshape(2, 3)
    framed = T.frame(encode_example(raw_array_features()))
    got = np.load(io.BytesIO(record_feature(framed, "lat")))
    assert got.dtype == np.float16 and np.array_equal(got, raw)
    with pytest.raises(TypeError):
        encode_example({"x": object()})


def convention_features() -> dict:
    png = encode(photo(20, 10, seed=1), "PNG")
    jpg = encode(photo(30, 16, seed=2), "JPEG")
    return {
        "image/encoded": jpg, "id": 42, "mask/encoded": png, "seg/encoded": png,
        "image/mask": png, "alpha/mask/encoded": png, "depth/encoded": png, "thumb": jpg,
        "bmp/encoded": b"BM not checked", "caps": ["a", "b"],
        "small_bin": b"\xff\x01", "big_bin": b"\xff" * 5000, "empty": [],
        "raw": np.arange(4, dtype=np.uint8).tobytes(), "raw/shape": [2, 2],
        "emb": np.ones(3, np.float32), "one": [2.5], "x/dtype": "float16", "x": 1}


def test_feature_conventions():
    feats = convention_features()
    png, jpg = feats["mask/encoded"], feats["image/encoded"]
    ex = encode_example(feats)
    d = T._describe(ex, "image/encoded", "id")
    assert d["id"] == "42" and (d["w"], d["h"]) == (30, 16)
    masks, images, arrays = d["p"]
    assert masks == [["mask", "mask/encoded"], ["seg", "seg/encoded"], ["image", "image/mask"],
                     ["alpha", "alpha/mask/encoded"]]
    assert images == [["depth", "depth/encoded"], ["thumb", "thumb"], ["bmp", "bmp/encoded"]]
    assert arrays == [["raw", "raw"], ["emb", "emb"]]
    assert d["a"] == {"caps": ["a", "b"], "small_bin": {"b64": "/wE="}, "empty": [],
                      "one": 2.5, "x/dtype": "float16", "x": 1}
    framed = T.frame(ex)
    assert np.load(io.BytesIO(record_feature(framed, "raw"))).tolist() == [[0, 1], [2, 3]]
    assert record_feature(framed, "seg/encoded") == png
    assert T._describe(encode_example({"other": jpg}), "image/encoded", None) == {"bad": "no_image"}


ERRORS_FEATURES = {"image/encoded": b"abcdef", "label": 1}


def test_record_feature_errors_have_reasons(monkeypatch):
    framed = bytearray(T.frame(encode_example(ERRORS_FEATURES)))
    m = Member("f.tfrecord", 0, len(framed), "x.jpg", "tfrecord:image/encoded")
    with pytest.raises(FetchError) as e:
        record_feature(bytes(framed), "nope", m)
    assert e.value.reason == "bad_member" and "nope" in str(e.value)
    bad = bytearray(framed)
    bad[20] ^= 0x01                                             # in the data
    with monkeypatch.context() as mp:                           # never parsed
        mp.setattr(T, "_find", lambda *a: pytest.fail("a record with a bad CRC was parsed"))
        with pytest.raises(FetchError) as e:
            record_feature(bytes(bad), "image/encoded", m)
    assert e.value.reason == "crc_mismatch"
    bad = bytearray(framed)
    bad[3] ^= 0x01                                              # in the length
    with pytest.raises(FetchError) as e:
        record_feature(bytes(bad), "image/encoded", m)
    assert e.value.reason == "crc_mismatch"
    with pytest.raises(FetchError) as e:
        record_feature(bytes(framed[:-3]), "image/encoded", m)   # not the indexed length
    assert e.value.reason == "bad_member"
    with pytest.raises(FetchError) as e:
        record_feature(b"short", "image/encoded", m)
    assert e.value.reason == "bad_member"


def test_an_int64_past_64_bits_is_a_bad_example_not_a_crash():
    """A 10-byte varint holding 2**64 + 2**63 + 1 in an int64_list is no int64: the
    Example is bad (``ExampleError``, a ValueError), so the index counts the record
    as ``bad_member`` -- it was NumPy's OverflowError, which ended the index build."""
    def ld(field: int, payload: bytes) -> bytes:
        return varint(field << 3 | 2) + varint(len(payload)) + payload

    huge = b"\x81" + b"\x80" * 8 + b"\x03"                # 2**64 + 2**63 + 1
    feature = ld(3, b"\x08" + huge)                       # int64_list { value: huge }
    bad = ld(1, ld(1, ld(1, b"label") + ld(2, feature)))  # Example.features.feature
    record = encode_example(ERRORS_FEATURES) + bad         # (the maps merge)
    with pytest.raises(ValueError, match="an int64 list value past 64 bits"):
        parse_example(record)
    assert T._entry(0, len(record), record, None, "image/encoded", None)["bad"] == \
        "bad_member"
    framed = T.frame(record)
    m = Member("f.tfrecord", 0, len(framed), "x.jpg", "tfrecord:image/encoded")
    assert record_feature(framed, "image/encoded", m) == b"abcdef"   # not asked: not read


# ---------------------------------------------------------------------- the source
def test_equals_the_folder_source(data, folder_result, tmp_path, monkeypatch):
    base, _, samples, files = data
    import datago.dataset as dataset_mod

    def no_scan(*a, **k):
        raise AssertionError("the index has every size: no header scan")
    monkeypatch.setattr(dataset_mod, "scan_source", no_scan)
    cfg = tf_cfg(str(base / "records" / "part-*.tfrecord"),
                 source={"id_key": "image/filename", "cache_dir": str(tmp_path / "c")})
    ds = DatagoDataset(cfg)
    assert ds.listing.built == 2 and len(ds.listing) == N and ds.mode == "plan"
    got = by_id(ds)
    assert set(got) == {name for name, _ in samples}
    assert got == folder_result                 # pixels, sizes, crops, attributes, masks, latents
    assert got["g0/s000.png"][4] == {"caption": "caption 0 é", "label": 0, "score": 0.0}
    assert "mask" in got["g0/s000.png"][5] and got["g1/s001.jpg"][6]["emb"][0] == (8,)
    assert got["g1/s001.jpg"][5]["present/image/depth"]
    st = ds.stats()
    assert st["skipped_total"] == 0 and st["index"]["scanned"] == 0
    # the second time the cached indexes are used
    ds2 = DatagoDataset(cfg)
    assert ds2.listing.built == 0 and by_id(ds2) == got


def test_default_ids_and_attributes(data, tmp_path):
    _, _, samples, files = data
    ds = DatagoDataset(tf_cfg(str(files[0]), source={"cache_dir": str(tmp_path / "c")},
                              batch_size=None, image_config=None))
    assert list(ds.listing.ids()) == [f"part-0.tfrecord:{k}" for k in range(len(samples[0::2]))]
    ref = ds.listing.ref(1)
    assert ref.attributes["image/filename"] == samples[2][0]
    assert ref.path.codec == "tfrecord:image/encoded" and ref.path.name.endswith(".jpg")
    assert [n for n, _ in ref.latents] == ["emb"]
    items = {it["id"]: it for it in ds}
    assert len(items) == len(samples[0::2])
    lat = items["part-0.tfrecord:1"]["latents"]["emb"]
    assert np.array_equal(np.asarray(lat), samples[2][1]["emb"])


def test_corrupt_record_is_counted_never_decoded(data, tmp_path):
    _, _, samples, files = data
    path = tmp_path / "c.tfrecord"
    path.write_bytes(files[0].read_bytes())
    write_index(str(path), id_key="image/filename")          # indexed while intact
    idx = json.loads((tmp_path / "c.tfrecord.tfidx.json").read_text())
    victim = idx["records"][2]
    raw = bytearray(path.read_bytes())
    raw[victim["o"] + victim["n"] // 2] ^= 0x40               # bit rot inside the record
    path.write_bytes(bytes(raw))
    one = {"batch_size": None, "image_config": None}          # every sample read once
    ds = DatagoDataset(tf_cfg(str(path), source={"id_key": "image/filename",
                                                 "cache_dir": str(tmp_path / "c")}, **one))
    assert ds.listing.built == 0 and len(ds.listing) == len(samples[0::2])
    with pytest.warns(RuntimeWarning, match="crc_mismatch"):
        got = sorted(it["id"] for it in ds)
    st = ds.stats()
    assert st["skipped"] == {"crc_mismatch": 1}
    assert victim["id"] not in got and len(got) == len(samples[0::2]) - 1
    # a fresh index (the cache, no index beside the file) finds it while indexing
    os.unlink(tmp_path / "c.tfrecord.tfidx.json")
    ds = DatagoDataset(tf_cfg(str(path), source={"id_key": "image/filename",
                                                 "cache_dir": str(tmp_path / "c2")}, **one))
    assert ds.listing.skipped == {"crc_mismatch": 1} and sorted(ds.listing.ids()) == got
    assert sorted(it["id"] for it in ds) == got and ds.stats()["skipped_total"] == 0


def test_bad_length_crc_and_truncated_file(data, tmp_path):
    _, _, samples, files = data
    raw = files[0].read_bytes()
    offsets = [o for o, _ in T._read_text_index(
        "".join(f"{r['o']} {r['n']}\n" for r in T.build_index(str(files[0]))["records"]).encode())]
    broken = bytearray(raw)
    broken[offsets[3] + 2] ^= 0x01                            # the 4th record's length
    (tmp_path / "len.tfrecord").write_bytes(bytes(broken))
    (tmp_path / "cut.tfrecord").write_bytes(raw[:offsets[5] + 40])   # inside the 6th record
    for name, reason, kept in (("len", "crc_mismatch", 3), ("cut", "truncated", 5)):
        with pytest.warns(RuntimeWarning, match="not read"):
            ds = DatagoDataset(tf_cfg(str(tmp_path / f"{name}.tfrecord"),
                                      source={"cache_dir": str(tmp_path / name)}))
        assert ds.listing.skipped == {reason: 1} and len(ds.listing) == kept
        assert len(by_id(ds)) == kept
    # cut after indexing: the records past the end are counted when read, no hang
    path = tmp_path / "late.tfrecord"
    path.write_bytes(raw)
    write_index(str(path))
    path.write_bytes(raw[:offsets[5] + 40])
    with pytest.warns(RuntimeWarning) as caught:
        ds = DatagoDataset(tf_cfg(str(path), source={"cache_dir": str(tmp_path / "late")}))
    assert any("stale" in str(w.message) for w in caught)
    assert len(ds.listing) == 5                               # size changed: re-indexed
    idx = T.build_index(str(files[0]))
    (tmp_path / "x").mkdir()
    idx.pop("size")                                           # an index that cannot tell
    (tmp_path / "x" / "late.tfrecord.tfidx.json").write_text(json.dumps(idx))
    ds = DatagoDataset(tf_cfg(str(path), batch_size=None, image_config=None,
                              source={"index_dir": str(tmp_path / "x")}))
    assert len(ds.listing) == len(samples[0::2])
    with pytest.warns(RuntimeWarning, match="truncated"):
        got = [it["id"] for it in ds]
    assert len(got) == 5 and ds.stats()["skipped"] == {"truncated": len(samples[0::2]) - 5}


def test_gzip_files(data, folder_result, tmp_path):
    _, _, samples, _ = data
    paths = []
    for k in range(2):
        p = tmp_path / f"z-{k}.tfrecord.gz"
        with TFRecordWriter(p, gzip=True) as w:
            for _, feats in samples[k::2]:
                w.write_example(feats)
        paths.append(str(p))
    assert open(paths[0], "rb").read(2) == b"\x1f\x8b"
    cache = tmp_path / "cache"
    cfg = tf_cfg(paths, source={"id_key": "image/filename", "cache_dir": str(cache)})
    ds = DatagoDataset(cfg)
    assert ds.listing.built == 2 and not ds._remote
    copies = sorted(cache.glob("tfrecord/*.tfrecord"))
    assert len(copies) == 2 and all(loc.startswith(str(cache)) for loc in ds.listing._locs)
    assert by_id(ds) == folder_result
    assert DatagoDataset(cfg).listing.built == 0
    for c in copies:                                          # a copy that went missing
        c.unlink()
    ds = DatagoDataset(cfg)
    assert ds.listing.built == 2 and by_id(ds) == folder_result
    # compression: "gzip" for a name without .gz
    plain = tmp_path / "noext.tfr"
    plain.write_bytes(open(paths[0], "rb").read())
    ds = DatagoDataset(tf_cfg(str(plain), source={"compression": "gzip", "cache_dir": str(cache)},
                              batch_size=None, image_config=None))
    assert len(ds.listing) == len(samples[0::2]) and len(list(ds)) == len(samples[0::2])
    with pytest.raises(Exception, match="gzip"):
        DatagoDataset(tf_cfg(str(data[3][0]), source={"compression": "gzip",
                                                      "cache_dir": str(cache)}))


def test_text_index_of_the_tfrecord_package(data, tmp_path):
    _, _, samples, files = data
    path = tmp_path / "t.tfrecord"
    path.write_bytes(files[1].read_bytes())
    spans = [(r["o"], r["n"]) for r in T.build_index(str(path))["records"]]
    # an index that leaves record 2 out: used as it is (records read by offset)
    text = "".join(f"{o} {n}\n" for k, (o, n) in enumerate(spans) if k != 2)
    (tmp_path / "t.index").write_text(text)
    ds = DatagoDataset(tf_cfg(str(path), source={"id_key": "image/filename",
                                                 "cache_dir": str(tmp_path / "c")}))
    want = [name for k, (name, _) in enumerate(samples[1::2]) if k != 2]
    assert ds.listing.built == 1 and sorted(ds.listing.ids()) == sorted(want)
    assert set(by_id(ds)) == set(want) and ds.sizes.scanned == 0
    # in index_dir as <name>.index
    (tmp_path / "t.index").unlink()
    (tmp_path / "ix").mkdir()
    (tmp_path / "ix" / "t.tfrecord.index").write_text("".join(f"{o} {n}\n" for o, n in spans[:3]))
    ds = DatagoDataset(tf_cfg(str(path), source={"index_dir": str(tmp_path / "ix"),
                                                 "cache_dir": str(tmp_path / "c2")}))
    assert len(ds.listing) == 3
    # a record at a wrong offset is counted, not fatal
    (tmp_path / "ix" / "t.tfrecord.index").write_text(f"{spans[0][0]} {spans[0][1]}\n"
                                                       f"{spans[1][0] + 1} {spans[1][1]}\n")
    ds = DatagoDataset(tf_cfg(str(path), source={"index_dir": str(tmp_path / "ix"),
                                                 "cache_dir": str(tmp_path / "c3")}))
    assert len(ds.listing) == 1 and ds.listing.skipped == {"crc_mismatch": 1}


def test_over_nginx_one_range_request_per_sample(data, folder_result, tmp_path):
    base, _, samples, files = data
    served = tmp_path / "served"
    served.mkdir()
    for f in files:
        (served / f.name).write_bytes(f.read_bytes())
    write_index(str(served / files[0].name), id_key="image/filename")   # one with an index
    with Nginx(served) as n:
        urls = [f"{n.url}/{f.name}" for f in files]
        ds = DatagoDataset(tf_cfg(urls, source={"id_key": "image/filename",
                                                "cache_dir": str(tmp_path / "c")}))
        assert ds._remote and ds.listing.built == 1               # the other one streamed
        got = by_id(ds)
        ds = DatagoDataset(tf_cfg(urls, source={"id_key": "image/filename",
                                                "cache_dir": str(tmp_path / "c")},
                                  batch_size=None, image_config=None))
        before = len(n.access_log())
        assert len(list(ds)) == N                              # each sample once
        log = n.access_log()[before:]
    assert got == folder_result
    # one ranged read per record; a mask, an additional image or an array (emb, in
    # every sample) reads the record again
    parts = sum(("mask/encoded" in feats) + ("depth/encoded" in feats) for _, feats in samples)
    assert all(" 206 " in line for line in log)
    assert len(log) == N + parts + N


def test_over_nginx_without_parts_is_one_request_per_sample(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    with TFRecordWriter(served / "p.tfrecord") as w:
        for i in range(10):
            w.write_example({"image/encoded": encode(photo(40 + 4 * i, 48, seed=i), "JPEG"),
                             "label": i})
    raw = (served / "p.tfrecord").read_bytes()
    import gzip
    (served / "z.tfrecord.gz").write_bytes(gzip.compress(raw))
    (served / "q.tfrecord").write_bytes(raw)
    spans = [(r["o"], r["n"]) for r in T.build_index(str(served / "q.tfrecord"))["records"]]
    (served / "q.index").write_text("".join(f"{o} {k}\n" for o, k in spans))
    with Nginx(served) as n:
        # gzip: streamed once into a local copy, samples read from it
        ds = DatagoDataset(tf_cfg(f"{n.url}/z.tfrecord.gz", batch_size=None, image_config=None,
                                  source={"cache_dir": str(tmp_path / "c")}))
        assert not ds._remote and len(list(ds)) == 10
        # a .index beside the file: records read by Range to build the index
        before = len(n.access_log())
        ds = DatagoDataset(tf_cfg(f"{n.url}/q.tfrecord", batch_size=None, image_config=None,
                                  source={"cache_dir": str(tmp_path / "c")}))
        log = n.access_log()[before:]
        assert len(ds.listing) == 10 and ds.listing.built == 1
        assert sum("GET /q.tfrecord " in line and " 206 " in line for line in log) == 10
        assert not any("GET /q.tfrecord " in line and " 200 " in line for line in log)
        ds = DatagoDataset(tf_cfg(f"{n.url}/p.tfrecord", source={"cache_dir": str(tmp_path / "c")},
                                  batch_size=None))
        before = len(n.access_log())
        got = {it["id"]: it["attributes"] for it in ds}
        log = n.access_log()[before:]
        # the index is cached: a second dataset reads no record to list
        before = len(n.access_log())
        ds2 = DatagoDataset(tf_cfg(f"{n.url}/p.tfrecord", source={"cache_dir": str(tmp_path / "c")}))
        listing_log = n.access_log()[before:]
    assert got == {f"p.tfrecord:{i}": {"label": i} for i in range(10)}
    assert len(log) == 10 and all(" 206 " in line for line in log)
    assert ds2.listing.built == 0
    assert all(".tfidx.json" in line or ".index" in line for line in listing_log)


def test_writer_is_atomic_and_config_keys(tmp_path):
    path = tmp_path / "a.tfrecord"
    with pytest.raises(RuntimeError):
        with TFRecordWriter(path) as w:
            w.write(b"x")
            raise RuntimeError("interrupted")
    assert not path.exists() and not list(tmp_path.iterdir())
    from datago import ConfigError
    with pytest.raises(ConfigError, match="compression"):
        DatagoDataset(tf_cfg(str(path), source={"compression": "zstd"}))
    with pytest.raises(ConfigError, match="is not a file"):
        DatagoDataset(tf_cfg(str(path)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with TFRecordWriter(path) as w:
            w.write_example({"image/encoded": encode(photo(32, 32), "PNG")})
        w.write_index()
    assert (tmp_path / "a.tfrecord.index").read_text() == f"0 {path.stat().st_size}\n"


def test_dataloader_workers(data, tmp_path):
    from torch.utils.data import DataLoader
    _, _, samples, files = data
    ds = DatagoDataset(tf_cfg([str(f) for f in files],
                              source={"id_key": "image/filename", "cache_dir": str(tmp_path / "c")}))
    ids = sorted(i for b in DataLoader(ds, batch_size=None, num_workers=2) for i in b["id"])
    assert set(ids) == {name for name, _ in samples} and ds.stats()["skipped_total"] == 0


def test_files_sharing_a_base_name_get_distinct_ids(data, tmp_path):
    _, _, samples, files = data
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.tfrecord").write_bytes(files[0].read_bytes())
    ds = DatagoDataset(tf_cfg([str(tmp_path / "a" / "x.tfrecord"), str(tmp_path / "b" / "x.tfrecord")],
                              source={"cache_dir": str(tmp_path / "c")}))
    n = len(samples[0::2])
    assert len(ds.listing) == 2 * n and ds.listing.built == 2 and not ds.listing.skipped
    assert ds.listing.sample_id(n) == f"{tmp_path / 'b' / 'x.tfrecord'}:0"


# ---------------------------------------------------------------------- the walk vs its oracle
# The Example walk is Cython (datago._core._protobuf).  Its oracle: the pure-Python
# walk it replaced, copied verbatim from datago/sources/tfrecord.py at 6323cd9
# (parse_example renamed py_parse_example, _find py_find; _Bad is the exception the
# source raises).  The Cython walk must give the same values, or the same exception
# type and message, on every input.
_Bad = T._Bad


def _varint(b, pos: int, end: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _Bad("truncated varint")
        c = b[pos]
        pos += 1
        result |= (c & 0x7F) << shift
        if c < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Bad("varint longer than 10 bytes")


def _fields(b, pos: int, end: int) -> Iterator[Tuple[int, int, int, int]]:
    """(field number, wire type, a, b) of a message: a varint's value (b = -1), else
    the span [a, b) of the field's bytes."""
    while pos < end:
        tag, pos = _varint(b, pos, end)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(b, pos, end)
            yield field, 0, value, -1
            continue
        if wire == 2:
            n, pos = _varint(b, pos, end)
            stop = pos + n
        elif wire == 1:
            stop = pos + 8
        elif wire == 5:
            stop = pos + 4
        else:
            raise _Bad(f"unsupported protobuf wire type {wire}")
        if stop > end:
            raise _Bad("a field runs past the end of its message")
        yield field, wire, pos, stop
        pos = stop


def _skip(b, pos: int, end: int, wire: int) -> int:
    """The position after a value of wire type ``wire`` that starts at ``pos``."""
    if wire == 0:
        return _varint(b, pos, end)[1]
    if wire == 2:
        n, pos = _varint(b, pos, end)
        stop = pos + n
    elif wire == 1:
        stop = pos + 8
    elif wire == 5:
        stop = pos + 4
    else:
        raise _Bad(f"unsupported protobuf wire type {wire}")
    if stop > end:
        raise _Bad("a field runs past the end of its message")
    return stop


def _tag(b, pos: int, end: int) -> Tuple[int, int]:
    """A varint (a tag or a length), the one-byte case inline."""
    if pos >= end:
        raise _Bad("truncated varint")
    c = b[pos]
    return (c, pos + 1) if c < 0x80 else _varint(b, pos, end)


def _span(b, pos: int, end: int) -> Tuple[int, int]:
    """(start, end) of the length-delimited value whose length is at ``pos``."""
    n, start = _tag(b, pos, end)
    stop = start + n
    if stop > end:
        raise _Bad("a field runs past the end of its message")
    return start, stop


def _entries(b, pos: int, end: int) -> List[Tuple[bytes, int, int]]:
    """(key, start, end) of each ``Features.feature`` map entry's ``Feature`` in the
    Example at ``b[pos:end]`` (start -1: no value).  The hot path of every read:
    flat loops, no generators (``_fields`` is the general walker)."""
    out = []
    while pos < end:
        tag, pos = _tag(b, pos, end)
        if tag != 0x0A:                               # not Example.features
            pos = _skip(b, pos, end, tag & 7)
            continue
        s, pos = _span(b, pos, end)
        while s < pos:
            tag, s = _tag(b, s, pos)
            if tag != 0x0A:                           # not Features.feature
                s = _skip(b, s, pos, tag & 7)
                continue
            s2, s = _span(b, s, pos)
            key, vs, ve = b"", -1, -1
            while s2 < s:
                tag, s2 = _tag(b, s2, s)
                if tag == 0x0A:                       # the map entry's key
                    ks, s2 = _span(b, s2, s)
                    key = b[ks:s2]
                elif tag == 0x12:                     # its value, a Feature
                    vs, s2 = _span(b, s2, s)
                    ve = s2
                else:
                    s2 = _skip(b, s2, s, tag & 7)
            out.append((key, vs, ve))
    return out


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _feature(b, start: int, end: int):
    """A ``Feature``'s values: ``list`` of bytes, float32 or int64 ndarray; None
    when no kind is set."""
    kind, ks, ke = 0, 0, 0
    for f, w, s, e in _fields(b, start, end):
        if w == 2 and f in (1, 2, 3):             # oneof: the last one wins
            kind, ks, ke = f, s, e
    if kind == 0:
        return None
    if kind == 1:
        return [bytes(b[s:e]) for f, w, s, e in _fields(b, ks, ke) if f == 1 and w == 2]
    if kind == 2:
        parts = []
        for f, w, s, e in _fields(b, ks, ke):
            if f != 1:
                continue
            if w == 2:
                if (e - s) % 4:
                    raise _Bad("a packed float list is not a multiple of 4 bytes")
                parts.append(np.frombuffer(b, "<f4", (e - s) // 4, s))
            elif w == 5:
                parts.append(np.frombuffer(b, "<f4", 1, s))
            else:
                raise _Bad(f"a float list value with wire type {w}")
        return (np.concatenate(parts) if parts else np.zeros(0)).astype(np.float32)
    values: List[int] = []
    for f, w, s, e in _fields(b, ks, ke):
        if f != 1:
            continue
        if w == 2:
            pos = s
            while pos < e:
                v, pos = _varint(b, pos, e)
                values.append(_signed(v))
        elif w == 0:
            values.append(_signed(s))
        else:
            raise _Bad(f"an int64 list value with wire type {w}")
    if any(not -(1 << 63) <= v < 1 << 63 for v in values):
        raise _Bad("an int64 list value past 64 bits")
    return np.array(values, dtype=np.int64)


def py_parse_example(data) -> Dict[str, Any]:
    """A serialized ``tf.train.Example`` as ``{key: values}``: a ``list`` of bytes
    (bytes_list), a float32 ndarray (float_list) or an int64 ndarray (int64_list);
    features with no kind set are left out.  ``ValueError`` when it does not parse."""
    b = data if isinstance(data, bytes) else bytes(data)
    out: Dict[str, Any] = {}
    for key, s, e in _entries(b, 0, len(b)):
        value = _feature(b, s, e) if s >= 0 else None
        name = key.decode("utf-8", "replace")
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def py_find(b: bytes, start: int, end: int, keys: Tuple[bytes, ...]) -> Dict[bytes, Any]:
    """The features named ``keys`` of the Example at ``b[start:end]`` (others are
    not decoded)."""
    spans: Dict[bytes, Tuple[int, int]] = {}
    for key, s, e in _entries(b, start, end):
        if key in keys:
            spans[key] = (s, e)
    out = {}
    for key, (s, e) in spans.items():
        value = _feature(b, s, e) if s >= 0 else None
        if value is not None:
            out[key] = value
    return out




def norm_value(v):
    if v is None:
        return None
    if type(v) is list:
        return ("list", [(type(x), x) for x in v])
    assert type(v) is np.ndarray
    return ("ndarray", v.dtype.str, v.shape, v.tobytes(), v.flags.writeable,
            v.flags.c_contiguous, v.flags.owndata)


def outcome(fn, *args):
    """A call's values (exact types, array dtype/shape/bits/flags, dict order) or
    its exception's type and message."""
    try:
        got = fn(*args)
    except Exception as e:                                     # noqa: BLE001
        return ("raises", type(e), str(e))
    assert type(got) is dict
    return ("returns", [(type(k), k, norm_value(v)) for k, v in got.items()])


def keys_of(data: bytes) -> list:
    """The raw keys of an Example's map entries (best effort, for find's key sets)."""
    try:
        return [k for k, _, _ in _entries(data, 0, len(data))]
    except ValueError:
        return []


class Differ:
    """Runs each input through both walks; counts how each ended."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.ended = {}

    def check(self, data, keys=None):
        want = outcome(py_parse_example, data)
        got = outcome(parse_example, data)
        assert got == want, f"parse_example({bytes(data)[:80]!r}...): {got} != {want}"
        how = "returns" if want[0] == "returns" else want[1:]       # (type, message)
        self.ended[how] = self.ended.get(how, 0) + 1
        b = bytes(data)
        # find() sees the Example inside a bigger buffer (a whole record), with
        # bytes around it that would change the answer if read
        pre = self.rng.integers(0, 256, int(self.rng.integers(0, 13)), dtype=np.uint8).tobytes()
        post = bytes([0x80]) * int(self.rng.integers(0, 3)) + \
            self.rng.integers(0, 256, int(self.rng.integers(0, 13)), dtype=np.uint8).tobytes()
        whole = pre + b + post
        if keys is None:
            present = keys_of(b)
            pick = [k for k in present if self.rng.random() < 0.5]
            keys = tuple(pick) + (b"absent", b"")[:int(self.rng.integers(0, 3))]
        span = (len(pre), len(pre) + len(b))
        want = outcome(py_find, whole, *span, keys)
        got = outcome(T._find, whole, *span, keys)
        assert got == want, f"_find({b[:80]!r}..., {keys}): {got} != {want}"


def existing_examples(data) -> list:
    """Every Example the other tests of this module build."""
    _, _, samples, _ = data
    out = [HAND_EXAMPLE, kinds_example(), *BAD_EXAMPLES,
           encode_example(round_trip_features()), encode_example(raw_array_features()),
           encode_example(convention_features()), encode_example(ERRORS_FEATURES),
           encode_example({"other": encode(photo(30, 16, seed=2), "JPEG")}),
           encode_example({"image/encoded": encode(photo(32, 32), "PNG")}),
           encode_example({"image/encoded": encode(photo(40, 48, seed=1), "JPEG"), "label": 1})]
    out += [encode_example(feats) for _, feats in samples]
    return out


def test_walk_equals_the_python_walk_on_the_tests_examples(data):
    d = Differ(1)
    examples = existing_examples(data)
    for ex in examples:
        d.check(ex)
    assert d.ended["returns"] == len(examples) - len(BAD_EXAMPLES)
    for ex in examples:
        for key in keys_of(ex):                 # record_feature's call, each feature
            d.check(ex, (key, key + b"/shape", key + b"/dtype"))
    # the records of the module's files, through record_feature's own call
    for path in data[3]:
        raw = path.read_bytes()
        pos = 0
        while pos < len(raw):
            (n,) = struct.unpack_from("<Q", raw, pos)
            whole = raw[pos:pos + n + 16]
            for key in (b"image/encoded", b"emb", b"nope"):
                keys = (key, key + b"/shape", key + b"/dtype")
                assert outcome(T._find, whole, 12, 12 + n, keys) == \
                    outcome(py_find, whole, 12, 12 + n, keys)
            pos += n + 16
    # other bytes-likes are copied to bytes first; non-bytes raise as bytes() does
    class Sub(bytes):
        pass
    for ex in (HAND_EXAMPLE, kinds_example()):
        for conv in (bytearray, memoryview, Sub, lambda x: np.frombuffer(x, np.uint8)):
            d.check(conv(ex))
    for odd in ("a str", None, 3, 1.5, [1, 2], object()):
        assert outcome(parse_example, odd) == outcome(py_parse_example, odd)


def random_value(rng):
    """A random feature value for encode_example."""
    kind = int(rng.integers(0, 12))
    n = int(rng.choice([0, 1, 1, 2, 3, 7, 40]))
    if kind == 0:
        return rng.integers(0, 256, int(rng.integers(0, 60)), dtype=np.uint8).tobytes()
    if kind == 1:
        return "".join(chr(int(c)) for c in rng.integers(32, 0x3000, int(rng.integers(0, 12))))
    if kind == 2:                                   # int64 edges, negatives, huge
        pool = [0, 1, -1, 127, 128, -128, 2 ** 31, -(2 ** 31), 2 ** 62, 2 ** 63 - 1,
                -(2 ** 63), -(2 ** 63) + 1, 2 ** 63, 2 ** 64 - 1]
        return [int(rng.choice(pool)) if rng.random() < 0.5 else
                int(rng.integers(-(2 ** 63), 2 ** 63 - 1)) for _ in range(n)]
    if kind == 3:
        return int(rng.integers(-(2 ** 63), 2 ** 63 - 1))
    if kind == 4:                                   # floats: NaN (payloads too), inf, -0
        bits = rng.integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32)
        special = np.array([0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x7F800000, 0xFF800000,
                            0x80000000, 0x00000001, 0x7F7FFFFF], np.uint32)
        pick = rng.random(n) < 0.3
        bits[pick] = rng.choice(special, int(pick.sum()))
        return bits.view(np.float32)
    if kind == 5:
        return [float(x) for x in rng.choice([0.5, -1e30, float("inf"), float("-inf"),
                                              float("nan"), 3.25], max(n, 1))]
    if kind == 6:
        return float(rng.standard_normal())
    if kind == 7:
        return []
    if kind == 8:
        shape = tuple(int(x) for x in rng.integers(1, 4, int(rng.integers(0, 3))))
        return rng.integers(-1000, 1000, shape).astype(rng.choice(["int8", "int64", "uint16"]))
    if kind == 9:
        return [rng.integers(0, 256, int(rng.integers(0, 9)), dtype=np.uint8).tobytes()
                for _ in range(n)] or [b""]
    if kind == 10:
        return bool(rng.random() < 0.5)
    return np.zeros(0, np.float32)


def random_key(rng) -> str:
    pool = ["image/encoded", "image/filename", "label", "emb", "emb/shape", "mask/encoded",
            "", "é/ü", "x" * 200, "a\x00b"]
    if rng.random() < 0.5:
        return str(rng.choice(pool))
    return "k" + "".join(chr(int(c)) for c in rng.integers(33, 0x800, int(rng.integers(0, 8))))


def random_features(rng) -> dict:
    n = int(rng.choice([0, 1, 2, 5, 10, 60]))
    return {random_key(rng): random_value(rng) for _ in range(n)}


def test_walk_equals_the_python_walk_on_random_examples():
    rng = np.random.default_rng(11)
    d = Differ(2)
    for i in range(3000):
        ex = encode_example(random_features(rng))
        if i % 10 == 0:                      # two Examples concatenated: a merged map
            ex += encode_example(random_features(rng))     # (duplicate keys: the last wins)
        d.check(ex)
    assert d.ended["returns"] == 3000


# a protobuf writer with every freedom encode_example does not take
def raw_varint(rng, v: int) -> bytes:
    """``v`` (< 2**70) as a varint, now and then in a longer-than-needed encoding."""
    out = bytearray()
    while True:
        out.append(v & 0x7F)
        v >>= 7
        if not v:
            break
        out[-1] |= 0x80
    if len(out) < 10 and rng.random() < 0.1:
        pad = int(rng.integers(1, 11 - len(out)))
        out[-1] |= 0x80
        out += b"\x80" * (pad - 1) + b"\x00"
    return bytes(out)


def raw_field(rng, field: int, wire: int, payload=b"") -> bytes:
    tag = raw_varint(rng, field << 3 | wire)
    if wire == 0:
        return tag + raw_varint(rng, payload)
    if wire == 2:
        return tag + raw_varint(rng, len(payload)) + payload
    return tag + payload


def raw_unknown(rng, avoid=()) -> bytes:
    while True:
        field = int(rng.choice([0, 1, 2, 3, 4, 15, 16, 2 ** 28, 2 ** 61 - 1]))
        wire = int(rng.choice([0, 1, 2, 5]))
        if (field, wire) not in avoid:
            break
    payload = {0: int(rng.integers(0, 2 ** 63)), 1: bytes(rng.integers(0, 256, 8, dtype=np.uint8)),
               2: bytes(rng.integers(0, 256, int(rng.integers(0, 6)), dtype=np.uint8)),
               5: bytes(rng.integers(0, 256, 4, dtype=np.uint8))}[wire]
    return raw_field(rng, field, wire, payload)


def raw_int(rng) -> int:
    r = rng.random()
    if r < 0.05:                                         # past 64 bits: a bad Example
        return int(rng.integers(1, 64)) << 64 | int(rng.integers(0, 2 ** 63))
    if r < 0.1:                                          # 2**64 + small: fits, as Python did it
        return 1 << 64 | int(rng.integers(0, 2 ** 62))
    return int(rng.integers(0, 2 ** 63)) * int(rng.choice([1, 2])) + int(rng.integers(0, 2))


def raw_list(rng, kind: int) -> bytes:
    parts = []
    for _ in range(int(rng.integers(0, 5))):
        r = rng.random()
        if r < 0.15:
            parts.append(raw_unknown(rng, avoid={(1, 2), (1, 0), (1, 5), (1, 1)}))
        elif kind == 1:
            parts.append(raw_field(rng, 1, 2, bytes(rng.integers(0, 256, int(rng.integers(0, 9)),
                                                                 dtype=np.uint8)))
                         if r < 0.9 else raw_field(rng, 1, 0, 5))      # (a varint: ignored)
        elif kind == 2:
            if r < 0.55:
                parts.append(raw_field(rng, 1, 2, rng.integers(0, 256, 4 * int(rng.integers(0, 5)),
                                                               dtype=np.uint8).tobytes()))
            else:
                parts.append(raw_field(rng, 1, 5,
                                       rng.integers(0, 256, 4, dtype=np.uint8).tobytes()))
        else:
            if r < 0.55:
                parts.append(raw_field(rng, 1, 2, b"".join(raw_varint(rng, raw_int(rng))
                                                          for _ in range(int(rng.integers(0, 5))))))
            else:
                parts.append(raw_field(rng, 1, 0, raw_int(rng)))
    return b"".join(parts)


def raw_feature(rng) -> bytes:
    parts = []
    for _ in range(int(rng.choice([0, 1, 1, 1, 2, 3]))):     # several kinds: the last wins
        if rng.random() < 0.15:
            parts.append(raw_unknown(rng, avoid={(1, 2), (2, 2), (3, 2)}))
        else:
            kind = int(rng.integers(1, 4))
            parts.append(raw_field(rng, kind, 2, raw_list(rng, kind)))
    return b"".join(parts)


def raw_example(rng) -> bytes:
    out = []
    for _ in range(int(rng.choice([0, 1, 1, 1, 2]))):        # Example.features, repeated
        entries = []
        for _ in range(int(rng.choice([0, 1, 2, 4, 8]))):
            fields = []
            r = rng.random()
            keys = 0 if r < 0.05 else 2 if r < 0.1 else 1     # no key, two keys
            for _ in range(keys):
                fields.append(raw_field(rng, 1, 2, str(rng.choice(["a", "b", "c", "é", "\udcff"]),
                                                       ).encode("utf-8", "surrogatepass")))
            values = 0 if rng.random() < 0.05 else 2 if rng.random() < 0.05 else 1
            for _ in range(values):
                fields.append(raw_field(rng, 2, 2, raw_feature(rng)))
            if rng.random() < 0.1:
                fields.insert(int(rng.integers(0, len(fields) + 1)),
                              raw_unknown(rng, avoid={(1, 2), (2, 2)}))
            if rng.random() < 0.2:
                rng.shuffle(fields)              # the value before the key
            entries.append(raw_field(rng, 1, 2, b"".join(fields)))
            if rng.random() < 0.05:
                entries.append(raw_unknown(rng, avoid={(1, 2)}))
        out.append(raw_field(rng, 1, 2, b"".join(entries)))
        if rng.random() < 0.1:
            out.append(raw_unknown(rng, avoid={(1, 2)}))
    return b"".join(out)


def test_walk_equals_the_python_walk_on_every_protobuf_freedom():
    """Overlong varints, unknown fields everywhere, oneof and key/value repeats,
    packed and unpacked values, keys that are no UTF-8, int64 varints past 64 bits."""
    rng = np.random.default_rng(12)
    d = Differ(3)
    for _ in range(3000):
        d.check(raw_example(rng))
    assert d.ended["returns"] > 2000
    assert d.ended[(_Bad, "an int64 list value past 64 bits")] > 50


# crafted: each rule's error at each level
def crafted() -> list:
    v10 = bytes([0xFF] * 9 + [0x01])                     # 2**64 - 1
    big = bytes([0xFF] * 9 + [0x7F])                     # 2**70 - 1
    over = bytes([0x80] * 9 + [0x02])                    # 2**64: low 64 bits 0
    tag_big = bytes([0x8A] + [0x80] * 8 + [0x02])        # 2**64 + 0x0A (low bits: field 1, wire 2)
    eleven = bytes([0x80] * 10 + [0x00])
    feature = ld(2, ld(2, struct.pack("<f", 1.0)))
    cases = []

    def at_levels(inner: bytes):
        """``inner`` as a whole Example, Features, map entry, Feature and list."""
        return [inner, ld(1, inner), ld(1, ld(1, inner)), ld(1, entry_raw(ld(2, inner))),
                ld(1, entry_raw(ld(2, ld(1, inner)))), ld(1, entry_raw(ld(2, ld(2, inner)))),
                ld(1, entry_raw(ld(2, ld(3, inner))))]

    def entry_raw(rest: bytes) -> bytes:
        return ld(1, ld(1, b"k") + rest)

    for bad in (b"\x80", b"\xff" * 9, eleven, b"\x80" * 10, bytes([0x08]) + b"\x80",
                bytes([0x08]) + eleven, bytes([0x0A]) + b"\x80", bytes([0x0A]) + v10,
                bytes([0x0A]) + big, bytes([0x0A]) + over, bytes([0x0A, 0x05]) + b"abc",
                bytes([0x09]) + bytes(7), bytes([0x0D]) + bytes(3), bytes([0x09]) + bytes(8),
                bytes([0x0D]) + bytes(4), tag_big + bytes([0x00]), tag_big + b"\x03abc",
                bytes([0x0B]), bytes([0x0C]), bytes([0x0E]), bytes([0x0F]), bytes([0x1B]),
                bytes([0x8B, 0x80, 0x00]), bytes([0x08, 0x00]), bytes([0x10]) + big,
                bytes([0x0A, 0x00]), bytes([0x12, 0x00]), bytes([0x1A, 0x00]), b""):
        cases += at_levels(bad)
        cases += at_levels(bad + feature)
        cases += at_levels(feature + bad)
    for w in range(8):                                   # every wire type of list field 1
        tag = bytes([1 << 3 | w])
        for body in (b"", bytes(1), bytes(4), bytes(8), b"\x04" + bytes(4), b"\x03" + bytes(3),
                     b"\x02\x80\x01", b"\x01\x80"):
            for kind in (1, 2, 3):
                cases.append(ld(1, entry("k", ld(kind, tag + body))))
    for v in (big, over, v10, bytes([0x80] * 9 + [0x03]), bytes([0xFF] * 8 + [0x7F, 0x01]),
              bytes([0xFF] * 9 + [0x03])):                    # int64 varints past 64 bits
        cases.append(ld(1, entry("i", ld(3, b"\x08" + v))))
        cases.append(ld(1, entry("i", ld(3, ld(1, v + b"\x01")))))
        cases.append(ld(1, entry("i", ld(3, ld(1, v) + b"\x0B")) + entry("j", ld(3, b"\x0B"))))
        cases.append(ld(1, entry("i", ld(3, ld(1, v)))) + b"\x0B")
    # the first error in walk order wins: map structure before any Feature
    cases.append(ld(1, entry("a", ld(2, ld(1, b"abc"))) + ld(1, b"\x0a\x80")))
    cases.append(ld(1, entry("a", ld(3, b"\x0B")) + entry("b", ld(2, b"\x08\x01"))))
    cases.append(ld(1, entry("a", ld(1, b"\x0B")) + entry("a", ld(1, ld(1, b"ok")))))
    return cases


def test_walk_equals_the_python_walk_on_crafted_bad_input():
    d = Differ(4)
    cases = crafted()
    for bad in cases:
        d.check(bad)
    ended = set(d.ended)
    for message in ("truncated varint", "varint longer than 10 bytes",
                    "a field runs past the end of its message",
                    "a packed float list is not a multiple of 4 bytes",
                    *(f"unsupported protobuf wire type {w}" for w in (3, 4, 6, 7)),
                    *(f"a float list value with wire type {w}" for w in (0, 1)),
                    *(f"an int64 list value with wire type {w}" for w in (1, 5))):
        assert (_Bad, message) in ended, message
    assert (_Bad, "an int64 list value past 64 bits") in ended
    assert "returns" in ended


def test_walk_equals_the_python_walk_on_truncated_and_flipped_input(data):
    rng = np.random.default_rng(13)
    d = Differ(5)
    small = [HAND_EXAMPLE, kinds_example(), encode_example(round_trip_features()),
             encode_example(random_features(rng)), raw_example(rng), raw_example(rng)]
    for ex in small:                                     # every truncation
        for n in range(len(ex) + 1):
            d.check(ex[:n])
    pool = small + [encode_example(random_features(rng)) for _ in range(30)] + \
        [raw_example(rng) for _ in range(30)] + [encode_example(data[2][0][1])[:3000]]
    for _ in range(4000):                                # random byte flips, cuts, splices
        ex = bytearray(pool[int(rng.integers(0, len(pool)))])
        if not ex:
            continue
        r = rng.random()
        if r < 0.6:
            for _ in range(int(rng.integers(1, 4))):
                i = int(rng.integers(0, len(ex)))
                if rng.random() < 0.5:
                    ex[i] = int(rng.integers(0, 256))
                else:
                    ex[i] ^= 1 << int(rng.integers(0, 8))
        elif r < 0.8:
            i = int(rng.integers(0, len(ex)))
            del ex[i:i + int(rng.integers(1, 4))]
        else:
            i = int(rng.integers(0, len(ex) + 1))
            ex[i:i] = rng.integers(0, 256, int(rng.integers(1, 4)), dtype=np.uint8).tobytes()
        d.check(bytes(ex))
    for _ in range(1000):                                # plain random bytes
        d.check(rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes())
    assert d.ended["returns"] > 500 and len(d.ended) > 8


def test_find_needs_a_span_of_the_bytes_given():
    b = kinds_example()
    for start, end in ((-1, 3), (0, len(b) + 1), (5, 4)):
        with pytest.raises(IndexError):
            T._find(b, start, end, (b"fp",))
    with pytest.raises(TypeError):
        T._find(bytearray(b), 0, len(b), (b"fp",))
    assert T._find(b, 0, 0, (b"fp",)) == {}


def test_walk_values_are_new_objects():
    ex = encode_example({"b": [b"abc"], "f": np.arange(3, dtype=np.float32), "i": [1, 2]})
    f = parse_example(bytearray(ex))
    del ex
    import gc
    gc.collect()
    assert f["b"] == [b"abc"] and f["f"].tolist() == [0, 1, 2] and f["i"].tolist() == [1, 2]
    assert all(v.flags.owndata and v.flags.writeable for k, v in f.items() if k != "b")


def test_walk_threads_agree():
    """Numeric lists of 64 KiB and more are read without the GIL: 8 threads over
    the same Examples give what one thread gives."""
    from concurrent.futures import ThreadPoolExecutor
    rng = np.random.default_rng(14)
    exs = [encode_example({"f": rng.standard_normal(20000 + i).astype(np.float32),
                           "i": rng.integers(-2 ** 63, 2 ** 63 - 1, 9000 + i)}) for i in range(8)]
    want = [outcome(py_parse_example, ex) for ex in exs]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            assert list(pool.map(lambda ex: outcome(parse_example, ex), exs)) == want
