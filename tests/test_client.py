"""DatagoClient: the reference datago's Python API over DatagoDataset."""

import json

import numpy as np
import pytest
from PIL import Image

import datago
from datago import DatagoClient
from conftest import encode, photo
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


def test_sample_fields_and_payloads(tmp_path):
    arr = photo(200, 120, seed=1)
    (tmp_path / "a.jpg").write_bytes(encode(arr, "JPEG"))
    (tmp_path / "a.json").write_text(json.dumps({"caption": "a cat", "score": 0.5}))
    labels = np.zeros((120, 200), np.uint8)
    labels[:, 100:] = 7
    (tmp_path / "a.mask.png").write_bytes(encode(labels, "PNG"))
    with DatagoClient(ref_config(tmp_path, limit=1)) as c:
        s = c.get_sample()
    assert s.id == "a.jpg" and s.source == "filesystem" and s.duplicate_state == 0
    assert s.attributes == {"caption": "a cat", "score": 0.5}      # values, not JSON text
    assert s.tags == [] and s.coca_embedding == [] and s.latents == {}
    ref = datago.decode_to_bucket((tmp_path / "a.jpg").read_bytes(),
                                  datago.make_buckets(128, 16, 0.5, 2.0))
    img = s.image.to_numpy_array()
    assert np.array_equal(img, ref.image) and not img.flags.writeable
    p = s.image.get_payload()
    assert (p.width, p.height, p.channels, p.bit_depth, p.is_encoded) == \
        (ref.bucket[0], ref.bucket[1], 3, 8, False)
    assert (s.original_width, s.original_height) == (200, 120)
    assert len(p.data) == ref.image.size
    pil = s.image.to_pil_image()
    assert pil.size == ref.bucket and pil.mode == "RGB"
    m = s.masks["mask"].to_numpy_array()
    assert m.shape == (ref.bucket[1], ref.bucket[0], 1) and set(np.unique(m)) <= {0, 7}
    assert s.masks["mask"].to_pil_image().mode == "L"


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_pre_encoded_payloads_still_convert(tmp_path, fmt):
    (tmp_path / "a.png").write_bytes(encode(photo(150, 150, seed=2), "PNG"))
    c = DatagoClient(ref_config(tmp_path, image_config={**REF_IMAGE_CONFIG,
                                                        "pre_encode_images": True,
                                                        "encode_format": fmt}))
    s = c.get_sample()
    assert s.image.is_encoded and s.image.channels == -1
    assert s.image.data[:4] == (b"\x89PNG" if fmt == "png" else b"\xff\xd8\xff\xe0")
    arr = s.image.to_numpy_array()                 # the reference raises here
    assert arr.shape == (128, 128, 3)
    assert isinstance(s.image.to_pil_image(), Image.Image)


def test_auto_convert(tmp_path):
    make_tree(tmp_path, n=3)
    c = DatagoClient(ref_config(tmp_path))
    d = c.get_sample_auto_convert()
    assert isinstance(d["image"], Image.Image) and d["attributes"] == {}
    assert set(d) >= {"id", "source", "duplicate_state", "attributes", "tags", "coca_embedding",
                      "latents", "image", "masks", "additional_images"}


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
