"""``.npy`` sidecars / members become ``batch["latents"]``: stacked when every sample
of a batch has one shape and dtype, a list otherwise; the same from a folder, from
indexed WebDataset shards and from streamed shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import encode, photo
from datago import DatagoDataset
from test_webdataset import make_shards, npy_bytes as npy

IMAGE = {"crop_and_resize": True, "default_image_size": 64, "downsampling_ratio": 16}


def make_samples(root, n=12):
    """Same-size images (one bucket); every sample has a float16 ``npy`` latent
    (4, 8, 8); every third an int32 ``emb`` of a varying length; one big-endian."""
    samples, arrays = [], {}
    for i in range(n):
        key = f"s{i:02d}"
        lat = np.random.default_rng(i).standard_normal((4, 8, 8)).astype(np.float16)
        if i == 5:
            lat = lat.astype(">f2")                     # big-endian on disk
        parts = {"jpg": encode(photo(64, 64, seed=i), "JPEG"), "npy": npy(lat)}
        arrays[key] = {"npy": lat.astype(np.float16)}
        if i % 3 == 0:
            emb = np.arange(i + 1, dtype=np.int32)
            parts["emb.npy"] = npy(emb)
            arrays[key]["emb"] = emb
        samples.append((key, parts))
        for ext, data in parts.items():
            (root / f"{key}.{ext}").write_bytes(data)
    return samples, arrays


def check(batches, arrays, key_of=lambda i: i):
    seen = set()
    for b in batches:
        keys = [key_of(i) for i in b["id"]]
        lat = b["latents"]
        assert isinstance(lat["npy"], torch.Tensor) and lat["npy"].dtype == torch.float16
        assert lat["npy"].shape == (len(keys), 4, 8, 8)
        for j, k in enumerate(keys):
            assert np.array_equal(lat["npy"][j].numpy(), arrays[k]["npy"])
            emb = lat.get("emb")
            if "emb" in arrays[k]:
                assert isinstance(emb, list) and np.array_equal(emb[j].numpy(), arrays[k]["emb"])
            elif emb is not None:
                assert emb[j] is None
            seen.add(k)
    assert seen == set(arrays)


def test_folder_latents(tmp_path):
    samples, arrays = make_samples(tmp_path)
    cfg = {"source_config": {"root_path": str(tmp_path)}, "image_config": IMAGE, "batch_size": 4}
    ds = DatagoDataset(cfg)
    check(list(ds), arrays, key_of=lambda i: i.rsplit(".", 1)[0])
    assert ds.stats()["listing"]["skipped"] == {}
    # one sample at a time
    one = DatagoDataset(dict(cfg, batch_size=None))
    for item in one:
        k = item["id"].rsplit(".", 1)[0]
        assert np.array_equal(item["latents"]["npy"].numpy(), arrays[k]["npy"])
        assert ("emb" in item["latents"]) == ("emb" in arrays[k])


@pytest.mark.parametrize("streaming", [False, True])
def test_webdataset_latents(tmp_path, streaming):
    (tmp_path / "f").mkdir()
    samples, arrays = make_samples(tmp_path / "f")
    pattern = make_shards(tmp_path / "s", samples, n_shards=3)
    cfg = {"source_type": "webdataset", "image_config": IMAGE, "batch_size": 4,
           "source_config": {"url": pattern, "streaming": streaming,
                             "cache_dir": str(tmp_path / "c")}}
    check(list(DatagoDataset(cfg)), arrays)


def test_a_bad_latent_fails_its_sample_with_a_reason(tmp_path):
    samples, arrays = make_samples(tmp_path, n=6)
    (tmp_path / "s02.npy").write_bytes(b"\x93NUMPY garbage")
    (tmp_path / "s04.npy").write_bytes(npy(np.array([{"a": 1}], dtype=object)))   # a pickle
    ds = DatagoDataset({"source_config": {"root_path": str(tmp_path)}, "image_config": IMAGE,
                        "batch_size": 2})
    with pytest.warns(RuntimeWarning, match="bad_latent"):
        ids = [i for b in ds for i in b["id"]]
    assert set(ids) == {"s00.jpg", "s01.jpg", "s03.jpg", "s05.jpg"}
    assert ds.stats()["skipped"]["bad_latent"] >= 2         # (more if padding repeats them)


def safetensors_bytes(tensors: dict, bf16: tuple = ()) -> bytes:
    """A .safetensors file written by hand from the published layout (8-byte header
    length, JSON header, data); names in ``bf16`` are stored as bfloat16 (the top
    16 bits of their float32 values)."""
    import json
    header, blobs, off = {}, [], 0
    codes = {np.float16: "F16", np.float32: "F32", np.int64: "I64", np.uint8: "U8"}
    for name, arr in tensors.items():
        if name in bf16:
            raw = (np.asarray(arr, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
            dtype = "BF16"
        else:
            raw = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
            dtype = codes[arr.dtype.type]
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    head = json.dumps(header).encode()
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


def test_safetensors_and_memory_mapped_npy_latents(tmp_path):
    one = np.random.default_rng(0).standard_normal((4, 8, 8)).astype(np.float16)
    mean = np.arange(6, dtype=np.float32).reshape(2, 3) / 4        # exact in bfloat16
    for i in range(4):
        (tmp_path / f"s{i}.jpg").write_bytes(encode(photo(64, 64, seed=i), "JPEG"))
        (tmp_path / f"s{i}.safetensors").write_bytes(safetensors_bytes({"latent": one + i}))
        (tmp_path / f"s{i}.vae.safetensors").write_bytes(
            safetensors_bytes({"mean": mean * i, "ids": np.arange(i + 1, dtype=np.int64)},
                              bf16=("mean",)))
        np.save(tmp_path / f"s{i}.npy", np.full((2, 2), i, dtype=np.int32))
    cfg = {"source_config": {"root_path": str(tmp_path)}, "image_config": IMAGE, "batch_size": 4}
    (b,) = list(DatagoDataset(cfg))
    order = [int(i[1]) for i in b["id"]]
    lat = b["latents"]
    assert lat["safetensors"].dtype == torch.float16 and lat["safetensors"].shape == (4, 4, 8, 8)
    assert lat["vae/mean"].dtype == torch.float32                       # BF16 widened exactly
    assert isinstance(lat["vae/ids"], list)                             # ragged: a list
    for j, i in enumerate(order):
        assert np.array_equal(lat["safetensors"][j].numpy(), one + i)
        assert np.array_equal(lat["vae/mean"][j].numpy(), mean * i)
        assert np.array_equal(lat["vae/ids"][j].numpy(), np.arange(i + 1))
        assert np.array_equal(lat["npy"][j].numpy(), np.full((2, 2), i))   # memory-mapped read


@pytest.mark.parametrize("data, message", [
    (b"\x05\x00", "shorter than a safetensors header"),
    ((10 ** 9).to_bytes(8, "little") + b"{}", "header of 1000000000 bytes"),
    (b'\x02\x00\x00\x00\x00\x00\x00\x00[]', "not a JSON object"),
    (safetensors_bytes({"x": np.zeros(4, np.float32)})[:-4], "outside the data"),
])
def test_bad_safetensors_fail_their_sample(tmp_path, data, message):
    (tmp_path / "a.jpg").write_bytes(encode(photo(64, 64), "JPEG"))
    (tmp_path / "a.safetensors").write_bytes(data)
    cfg = {"source_config": {"root_path": str(tmp_path)}, "image_config": IMAGE,
           "on_error": "raise"}
    with pytest.raises(Exception, match=f"bad_latent.*{message}"):
        list(DatagoDataset(cfg))
