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
