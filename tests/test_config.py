"""datago.config: parsing the reference JSON schema, validation, round-trips.

Every rejection is checked for its exception type (``ConfigError``, a ValueError)
and for the exact key path that starts its message.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re

import pytest

import datago
from datago import (ConfigError, DatagoConfig, FileSourceConfig, ImageConfig,
                    LoaderConfig, make_buckets)

TOP_KEYS = ["source_type", "source_config", "image_config", "batch_size", "num_threads",
            "samples_buffer_size", "limit", "seed", "drop_last", "on_error", "sync_buckets",
            "remainder", "prefetch_batches", "max_open_batches", "shared_pool_bytes", "steps_per_epoch"]
SOURCE_KEYS = ["root_path", "random_sampling", "rank", "world_size", "scan_sizes", "cache_dir",
               "sizes_cache"]
IMAGE_KEYS = ["crop_and_resize", "default_image_size", "downsampling_ratio",
              "min_aspect_ratio", "max_aspect_ratio", "pre_encode_images", "image_to_rgb8",
              "encode_format", "jpeg_quality", "filter", "max_pixels", "mask_palette"]


# --------------------------------------------------------------------- helpers
@pytest.fixture
def root(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    return str(d)


def full_config(root: str) -> dict:
    """Every key of the schema, none at its default."""
    return {
        "source_type": "file",
        "source_config": {"root_path": root, "random_sampling": True, "rank": 1,
                          "world_size": 4, "scan_sizes": False, "cache_dir": root + "/cache",
                          "sizes_cache": False},
        "image_config": {"crop_and_resize": True, "default_image_size": 1024,
                         "downsampling_ratio": 32, "min_aspect_ratio": 0.25,
                         "max_aspect_ratio": 4.0, "pre_encode_images": True,
                         "image_to_rgb8": True, "encode_format": "jpeg",
                         "jpeg_quality": 80, "filter": "lanczos", "max_pixels": 100_000_000,
                         "mask_palette": {"seg": [[0, 0, 0], [255, 0, 0]]}},
        "limit": 1000,
        "samples_buffer_size": 32,
        "batch_size": 8,
        "num_threads": 3,
        "seed": 7,
        "drop_last": True,
        "on_error": "raise",
        "sync_buckets": False,
        "remainder": "drop",
        "prefetch_batches": 3,
        "max_open_batches": 4,
        "shared_pool_bytes": 1000,
        "steps_per_epoch": 50,
    }


def set_key(d: dict, path: str, value) -> dict:
    """Copy of ``d`` with the dotted key ``path`` set to ``value``."""
    d = copy.deepcopy(d)
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    node[last] = value
    return d


def del_key(d: dict, path: str) -> dict:
    d = copy.deepcopy(d)
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    del node[last]
    return d


def raises_at(path: str, fragment: str = ""):
    """pytest.raises(ConfigError) whose message starts with ``path: `` and contains fragment."""
    return pytest.raises(ConfigError, match="^" + re.escape(f"{path}: ") + ".*" + re.escape(fragment))


# --------------------------------------------------------------------- valid configs
def test_full_config_parses_to_expected_dataclasses(root):
    cfg = DatagoConfig.from_dict(full_config(root))
    assert cfg == DatagoConfig(
        source=FileSourceConfig(root_path=root, random_sampling=True, rank=1, world_size=4,
                                scan_sizes=False, cache_dir=root + "/cache", sizes_cache=False),
        image=ImageConfig(crop_and_resize=True, default_image_size=1024, downsampling_ratio=32,
                          min_aspect_ratio=0.25, max_aspect_ratio=4.0, pre_encode_images=True,
                          image_to_rgb8=True, encode_format="jpeg", jpeg_quality=80,
                          filter="lanczos", max_pixels=100_000_000,
                          mask_palette={"seg": ((0, 0, 0), (255, 0, 0))}),
        loader=LoaderConfig(batch_size=8, num_threads=3, samples_buffer_size=32, limit=1000,
                            seed=7, drop_last=True, on_error="raise", sync_buckets=False,
                            remainder="drop", prefetch_batches=3, max_open_batches=4,
                            shared_pool_bytes=1000, steps_per_epoch=50),
        source_type="file")
    # field by field, so a wrong equality cannot hide a mismatch
    assert (cfg.source.root_path, cfg.source.random_sampling, cfg.source.rank,
            cfg.source.world_size) == (root, True, 1, 4)
    assert cfg.image.default_image_size == 1024 and cfg.image.downsampling_ratio == 32
    assert (cfg.image.min_aspect_ratio, cfg.image.max_aspect_ratio) == (0.25, 4.0)
    assert (cfg.image.encode_format, cfg.image.jpeg_quality, cfg.image.filter) == ("jpeg", 80, "lanczos")
    assert cfg.image.max_pixels == 100_000_000
    assert (cfg.loader.batch_size, cfg.loader.num_threads, cfg.loader.samples_buffer_size,
            cfg.loader.limit, cfg.loader.seed, cfg.loader.drop_last,
            cfg.loader.on_error) == (8, 3, 32, 1000, 7, True, "raise")
    assert cfg.crop_and_resize is True


def test_reference_style_config(root):
    """What a reference-datago user writes: world_size 0 (its default) means detect."""
    text = json.dumps({
        "source_type": "file",
        "source_config": {"root_path": root, "random_sampling": False, "rank": 0,
                          "world_size": 0},
        "image_config": {"crop_and_resize": True, "default_image_size": 512,
                         "downsampling_ratio": 16, "min_aspect_ratio": 0.5,
                         "max_aspect_ratio": 2.0, "pre_encode_images": False},
        "limit": 10,
        "samples_buffer_size": 64,
    })
    cfg = DatagoConfig.from_json(text)
    assert cfg.source == FileSourceConfig(root, False, 0, None)
    assert cfg.source.world_size is None
    assert cfg.image == ImageConfig()
    assert cfg.loader == LoaderConfig(limit=10, samples_buffer_size=64)
    assert cfg.buckets == make_buckets(512, 16, 0.5, 2.0)
    assert len(cfg.buckets) == 27


def test_minimal_config_defaults(root):
    cfg = DatagoConfig.from_dict({"source_config": {"root_path": root}})
    assert cfg.source_type == "file"
    assert cfg.source == FileSourceConfig(root, False, None, None)
    assert cfg.image is None                      # absent image_config: no processing
    assert cfg.crop_and_resize is False and cfg.buckets is None
    assert cfg.loader == LoaderConfig()
    assert DatagoConfig.from_dict({"source_config": {"root_path": root},
                                   "image_config": None}).image is None
    assert DatagoConfig.from_dict({"source_config": {"root_path": root},
                                   "image_config": {}}).image == ImageConfig()


def test_dataclass_defaults_match_the_documented_ones(root):
    img = ImageConfig()
    assert dataclasses.astuple(img) == (True, 512, 16, 0.5, 2.0, False, False, "png", 92,
                                        "triangle", datago.DEFAULT_MAX_PIXELS, None)
    assert dataclasses.astuple(LoaderConfig()) == (None, None, 64, None, 0, False, "skip",
                                                   True, "pad", 2, 8, 256 << 20, None)
    src = FileSourceConfig(root)
    assert dataclasses.astuple(src) == (root, False, None, None, True, None, True)
    cfg = DatagoConfig(src)
    assert cfg.image == ImageConfig() and cfg.loader == LoaderConfig()
    assert cfg.source_type == "file"


def test_world_size_zero_means_detect(root):
    assert FileSourceConfig(root, world_size=0).world_size is None
    # rank is then not compared with a world size of 0
    assert FileSourceConfig(root, rank=3, world_size=0) == FileSourceConfig(root, rank=3)


def test_root_path_accepts_pathlike(tmp_path):
    cfg = DatagoConfig(FileSourceConfig(tmp_path))
    assert cfg.to_dict()["source_config"]["root_path"] == str(tmp_path)


def test_dataclasses_are_frozen(root):
    cfg = DatagoConfig.from_dict(full_config(root))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.image.default_image_size = 256
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.loader.batch_size = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.source.rank = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.image = None


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ConfigError, datago.DatagoError)


# --------------------------------------------------------------------- round trips
def test_to_dict_exact_and_round_trips(root):
    d = full_config(root)
    cfg = DatagoConfig.from_dict(d)
    out = cfg.to_dict()
    assert out == d                               # every key present, same values
    assert DatagoConfig.from_dict(out) == cfg
    assert DatagoConfig.from_json(json.dumps(out)) == cfg


def test_to_dict_round_trips_without_image_config(root):
    cfg = DatagoConfig.from_dict({"source_config": {"root_path": root, "world_size": 0}})
    out = cfg.to_dict()
    assert out == {"source_type": "file",
                   "source_config": {"root_path": root, "random_sampling": False,
                                     "rank": None, "world_size": None, "scan_sizes": True,
                                     "cache_dir": None, "sizes_cache": True},
                   "image_config": None,
                   "batch_size": None, "num_threads": None, "samples_buffer_size": 64,
                   "limit": None, "seed": 0, "drop_last": False, "on_error": "skip",
                   "sync_buckets": True, "remainder": "pad", "prefetch_batches": 2,
                   "max_open_batches": 8, "shared_pool_bytes": 256 << 20,
                   "steps_per_epoch": None}
    assert DatagoConfig.from_json(json.dumps(out)) == cfg


def test_to_dict_round_trips_direct_construction(root):
    cfg = DatagoConfig(FileSourceConfig(root, rank=0, world_size=2),
                       ImageConfig(crop_and_resize=False, filter="box"),
                       LoaderConfig(num_threads=2, on_error="raise"))
    assert DatagoConfig.from_dict(cfg.to_dict()) == cfg


# --------------------------------------------------------------------- malformed input
@pytest.mark.parametrize("text", ["{", "", "not json", "{'single': 'quotes'}",
                                  '{"source_config": {"root_path": "x",}}'])
def test_from_json_invalid_json(text):
    with pytest.raises(ConfigError, match="^config is not valid JSON"):
        DatagoConfig.from_json(text)


@pytest.mark.parametrize("text", ["[]", "1", '"file"', "null"])
def test_from_json_not_an_object(text):
    with pytest.raises(ConfigError, match="^config must be a JSON object"):
        DatagoConfig.from_json(text)


@pytest.mark.parametrize("section,value,type_name", [
    ("source_config", "/data", "str"),
    ("source_config", None, "NoneType"),
    ("source_config", ["/data"], "list"),
    ("image_config", [512], "list"),
    ("image_config", True, "bool"),
])
def test_section_not_an_object(root, section, value, type_name):
    with raises_at(section, f"must be an object, got {type_name}"):
        DatagoConfig.from_dict(set_key(full_config(root), section, value))


# --------------------------------------------------------------------- unknown keys
@pytest.mark.parametrize("path,suggestion", [
    ("sample_buffer_size", "samples_buffer_size"),
    ("source_confg", "source_config"),
    ("image_confg", "image_config"),
    ("droplast", "drop_last"),
    ("batchsize", "batch_size"),
    ("source_config.random_sampeling", "random_sampling"),
    ("source_config.root", "root_path"),
    ("source_config.world_szie", "world_size"),
    ("image_config.min_aspect_ration", "min_aspect_ratio"),
    ("image_config.crop_resize", "crop_and_resize"),
    ("image_config.jpg_quality", "jpeg_quality"),
])
def test_misspelt_key_suggests(root, path, suggestion):
    with pytest.raises(ConfigError) as exc:
        DatagoConfig.from_dict(set_key(full_config(root), path, 1))
    assert str(exc.value) == f"{path}: unknown key; did you mean {suggestion!r}?"


@pytest.mark.parametrize("section,valid", [("", TOP_KEYS),
                                           ("source_config", SOURCE_KEYS),
                                           ("image_config", IMAGE_KEYS)])
def test_nonsense_key_lists_valid_keys(root, section, valid):
    path = f"{section}.zzzqqq" if section else "zzzqqq"
    with pytest.raises(ConfigError) as exc:
        DatagoConfig.from_dict(set_key(full_config(root), path, 1))
    assert str(exc.value) == f"{path}: unknown key; valid keys: {', '.join(valid)}"


@pytest.mark.parametrize("path", ["prefetch_buffer_size", "page_size",
                                  "source_config.page_size", "source_config.prefetch_buffer_size"])
def test_legacy_keys_warn_and_are_ignored(root, path):
    d = full_config(root)
    with pytest.warns(DeprecationWarning, match="^" + re.escape(f"{path} is ignored")):
        cfg = DatagoConfig.from_dict(set_key(d, path, 10))
    assert cfg == DatagoConfig.from_dict(d)


# --------------------------------------------------------------------- wrong types
BOOL_KEYS = ["source_config.random_sampling", "image_config.crop_and_resize",
             "image_config.pre_encode_images", "image_config.image_to_rgb8", "drop_last",
             "sync_buckets", "source_config.scan_sizes", "source_config.sizes_cache"]
INT_KEYS = ["source_config.rank", "source_config.world_size",
            "image_config.default_image_size", "image_config.downsampling_ratio",
            "image_config.jpeg_quality", "image_config.max_pixels",
            "batch_size", "num_threads", "samples_buffer_size", "limit", "seed",
            "prefetch_batches", "max_open_batches", "shared_pool_bytes", "steps_per_epoch"]
FLOAT_KEYS = ["image_config.min_aspect_ratio", "image_config.max_aspect_ratio"]
CHOICE_KEYS = ["image_config.encode_format", "image_config.filter", "on_error", "remainder"]


@pytest.mark.parametrize("path", BOOL_KEYS)
@pytest.mark.parametrize("value", [1, 0, "true", "false", None, 1.0])
def test_bool_wrong_type(root, path, value):
    with raises_at(path, f"must be true or false, got {value!r}"):
        DatagoConfig.from_dict(set_key(full_config(root), path, value))


@pytest.mark.parametrize("path", INT_KEYS)
@pytest.mark.parametrize("value", [1.5, 2.0, "512", True, False, [1]])
def test_int_wrong_type(root, path, value):
    with raises_at(path, f"must be an integer, got {value!r}"):
        DatagoConfig.from_dict(set_key(full_config(root), path, value))


@pytest.mark.parametrize("path", FLOAT_KEYS)
@pytest.mark.parametrize("value", ["0.5", math.nan, math.inf, -math.inf, True, None, [1.0]])
def test_float_wrong_type(root, path, value):
    with raises_at(path, f"must be a number, got {value!r}"):
        DatagoConfig.from_dict(set_key(full_config(root), path, value))


@pytest.mark.parametrize("path", FLOAT_KEYS)
def test_float_from_json_nan_and_overflow(root, path):
    """NaN and 1e400 (= inf) are what a JSON file can smuggle in."""
    for literal, shown in (("NaN", "nan"), ("Infinity", "inf"), ("1e400", "inf")):
        text = json.dumps(set_key(full_config(root), path, 12345.5)).replace("12345.5", literal)
        with raises_at(path, f"must be a number, got {shown}"):
            DatagoConfig.from_json(text)


@pytest.mark.parametrize("path", FLOAT_KEYS)
def test_float_huge_integer_is_a_config_error(root, path):
    """A 400-digit integer literal is valid JSON: it must give ConfigError, not OverflowError."""
    text = json.dumps(set_key(full_config(root), path, 7777777)).replace("7777777", "9" * 400)
    with raises_at(path):
        DatagoConfig.from_json(text)


def test_float_accepts_integers(root):
    cfg = DatagoConfig.from_dict(set_key(set_key(full_config(root),
                                                 "image_config.min_aspect_ratio", 1),
                                         "image_config.max_aspect_ratio", 3))
    assert (cfg.image.min_aspect_ratio, cfg.image.max_aspect_ratio) == (1, 3)


@pytest.mark.parametrize("path", CHOICE_KEYS + ["source_type"])
@pytest.mark.parametrize("value", [1, None, True])
def test_choice_wrong_type(root, path, value):
    with raises_at(path, f"got {value!r}"):
        DatagoConfig.from_dict(set_key(full_config(root), path, value))


@pytest.mark.parametrize("value,shown", [(5, "5"), ("", "''"), (None, "None"), (True, "True")])
def test_root_path_wrong_type(root, value, shown):
    with raises_at("source_config.root_path", f"must be a folder path, got {shown}"):
        DatagoConfig.from_dict(set_key(full_config(root), "source_config.root_path", value))


# --------------------------------------------------------------------- impossible values
@pytest.mark.parametrize("changes,path,message", [
    ({"source_config.rank": 4}, "source_config.rank", "must be < world_size (4), got 4"),
    ({"source_config.rank": 9}, "source_config.rank", "must be < world_size (4), got 9"),
    ({"source_config.rank": -1}, "source_config.rank", "must be >= 0, got -1"),
    ({"source_config.world_size": -2}, "source_config.world_size", "must be >= 0, got -2"),
    ({"source_config.rank": 1, "source_config.world_size": 1}, "source_config.rank",
     "must be < world_size (1), got 1"),
    ({"image_config.min_aspect_ratio": 2.0, "image_config.max_aspect_ratio": 0.5},
     "image_config.min_aspect_ratio", "2.0 is larger than max_aspect_ratio 0.5"),
    ({"image_config.min_aspect_ratio": 0}, "image_config.min_aspect_ratio", "must be > 0, got 0"),
    ({"image_config.min_aspect_ratio": -0.5}, "image_config.min_aspect_ratio",
     "must be > 0, got -0.5"),
    ({"image_config.max_aspect_ratio": 0.0}, "image_config.max_aspect_ratio",
     "must be > 0, got 0.0"),
    ({"image_config.default_image_size": 0}, "image_config.default_image_size",
     "must be >= 1, got 0"),
    ({"image_config.default_image_size": -512}, "image_config.default_image_size",
     "must be >= 1, got -512"),
    ({"image_config.downsampling_ratio": 0}, "image_config.downsampling_ratio",
     "must be >= 1, got 0"),
    ({"image_config.downsampling_ratio": -16}, "image_config.downsampling_ratio",
     "must be >= 1, got -16"),
    ({"image_config.default_image_size": 512, "image_config.downsampling_ratio": 1024},
     "image_config.downsampling_ratio", "1024 is larger than default_image_size 512"),
    ({"image_config.jpeg_quality": 101}, "image_config.jpeg_quality", "must be <= 100, got 101"),
    ({"image_config.jpeg_quality": -1}, "image_config.jpeg_quality", "must be >= 0, got -1"),
    ({"image_config.max_pixels": 0}, "image_config.max_pixels", "must be >= 1, got 0"),
    ({"image_config.filter": "cubic"}, "image_config.filter",
     "must be one of 'triangle', 'bicubic', 'lanczos', 'box', got 'cubic'"),
    ({"image_config.filter": "Lanczos"}, "image_config.filter",
     "must be one of 'triangle', 'bicubic', 'lanczos', 'box', got 'Lanczos'"),
    ({"image_config.encode_format": "webp"}, "image_config.encode_format",
     "must be one of 'png', 'jpeg', got 'webp'"),
    ({"on_error": "ignore"}, "on_error", "must be one of 'skip', 'raise', got 'ignore'"),
    ({"limit": 0}, "limit", "must be >= 1, got 0"),
    ({"limit": -5}, "limit", "must be >= 1, got -5"),
    ({"samples_buffer_size": 0}, "samples_buffer_size", "must be >= 1, got 0"),
    ({"batch_size": 0}, "batch_size", "must be >= 1, got 0"),
    ({"num_threads": 0}, "num_threads", "must be >= 1, got 0"),
    ({"seed": -1}, "seed", "must be >= 0, got -1"),
    ({"source_type": "ftp"}, "source_type", "must be one of 'file', 'index', 'webdataset', 'db', 'zip', 'tfrecord', 'bins', got 'ftp'"),
])
def test_impossible_values(root, changes, path, message):
    d = full_config(root)
    for k, v in changes.items():
        d = set_key(d, k, v)
    with pytest.raises(ConfigError) as exc:
        DatagoConfig.from_dict(d)
    assert str(exc.value) == f"{path}: {message}"


def test_db_config_needs_url_and_key(root, monkeypatch):
    monkeypatch.delenv("DATAROOM_API_URL", raising=False)
    monkeypatch.delenv("DATAROOM_API_KEY", raising=False)
    d = {"source_type": "db", "source_config": {"sources": "S"}}
    with pytest.raises(ConfigError) as exc:
        DatagoConfig.from_dict(d)
    assert str(exc.value).startswith("source_config.api_url: no API URL: set DATAROOM_API_URL")
    monkeypatch.setenv("DATAROOM_API_URL", "http://127.0.0.1:9/api")
    with pytest.raises(ConfigError) as exc:
        DatagoConfig.from_dict(d)
    assert str(exc.value).startswith("source_config.api_key: no API key: set DATAROOM_API_KEY")
    monkeypatch.setenv("DATAROOM_API_KEY", "s3cret-key")
    cfg = DatagoConfig.from_dict(d)
    assert cfg.source.api_url == "http://127.0.0.1:9/api/"        # the slash the API needs
    assert cfg.source.api_key == "s3cret-key"
    assert "s3cret" not in repr(cfg)
    cfg = DatagoConfig.from_dict({"source_type": "db", "source_config": {
        "sources": ["A", "B"], "tags": "x, y", "api_url": "https://h/api/", "api_key": "k"}})
    assert (cfg.source.sources, cfg.source.tags) == ("A,B", "x,y")
    with pytest.raises(ConfigError, match=r"source_config.api_url: must be an http\(s\):// URL"):
        DatagoConfig.from_dict({"source_type": "db", "source_config": {
            "sources": "A", "api_url": "ftp://h/?token=zz", "api_key": "k"}})
    with pytest.raises(ConfigError, match="source_config.sources: must name at least one"):
        DatagoConfig.from_dict({"source_type": "db", "source_config": {"sources": " , "}})


def test_missing_source_config(root):
    with pytest.raises(ConfigError) as exc:
        DatagoConfig.from_dict(del_key(full_config(root), "source_config"))
    assert str(exc.value).startswith("source_config: missing")


def test_missing_root_path(root):
    with pytest.raises(ConfigError) as exc:
        DatagoConfig.from_dict(del_key(full_config(root), "source_config.root_path"))
    assert str(exc.value) == "source_config.root_path: missing"


def test_root_path_does_not_exist(root, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError) as exc:
        DatagoConfig.from_dict(set_key(full_config(root), "source_config.root_path", missing))
    assert str(exc.value) == f"source_config.root_path: {missing!r} is not an existing folder"


def test_root_path_is_a_file(root, tmp_path):
    f = tmp_path / "file.jpg"
    f.write_bytes(b"x")
    with pytest.raises(ConfigError) as exc:
        DatagoConfig.from_dict(set_key(full_config(root), "source_config.root_path", str(f)))
    assert str(exc.value) == f"source_config.root_path: {str(f)!r} is not an existing folder"


@pytest.mark.parametrize("image_config", [{"crop_and_resize": False}, None, "absent"])
def test_batch_size_needs_crop_and_resize(root, image_config):
    d = full_config(root)
    d = del_key(d, "image_config") if image_config == "absent" else set_key(d, "image_config", image_config)
    with raises_at("batch_size", "crop_and_resize"):
        DatagoConfig.from_dict(d)
    # the same without batch_size is fine: per-sample mode
    cfg = DatagoConfig.from_dict(del_key(d, "batch_size"))
    assert cfg.loader.batch_size is None and cfg.buckets is None


# --------------------------------------------------------------------- direct construction
@pytest.mark.parametrize("make,path,message", [
    (lambda r: ImageConfig(min_aspect_ratio=-1), "image_config.min_aspect_ratio",
     "must be > 0, got -1"),
    (lambda r: ImageConfig(default_image_size="512"), "image_config.default_image_size",
     "must be an integer, got '512'"),
    (lambda r: ImageConfig(crop_and_resize=1), "image_config.crop_and_resize",
     "must be true or false, got 1"),
    (lambda r: ImageConfig(max_aspect_ratio=math.nan), "image_config.max_aspect_ratio",
     "must be a number, got nan"),
    (lambda r: ImageConfig(jpeg_quality=101), "image_config.jpeg_quality",
     "must be <= 100, got 101"),
    (lambda r: ImageConfig(filter="cubic"), "image_config.filter",
     "must be one of 'triangle', 'bicubic', 'lanczos', 'box', got 'cubic'"),
    (lambda r: ImageConfig(default_image_size=8), "image_config.downsampling_ratio",
     "16 is larger than default_image_size 8"),
    (lambda r: FileSourceConfig(r, rank=2, world_size=2), "source_config.rank",
     "must be < world_size (2), got 2"),
    (lambda r: FileSourceConfig(r, random_sampling="yes"), "source_config.random_sampling",
     "must be true or false, got 'yes'"),
    (lambda r: FileSourceConfig(r + "/missing"), "source_config.root_path", "is not an existing folder"),
    (lambda r: LoaderConfig(batch_size=0), "batch_size", "must be >= 1, got 0"),
    (lambda r: LoaderConfig(limit=0), "limit", "must be >= 1, got 0"),
    (lambda r: LoaderConfig(on_error="ignore"), "on_error",
     "must be one of 'skip', 'raise', got 'ignore'"),
    (lambda r: LoaderConfig(drop_last="true"), "drop_last", "must be true or false, got 'true'"),
    (lambda r: DatagoConfig(source=r), "source_config", "must be a FileSourceConfig for source_type 'file', got str"),
    (lambda r: DatagoConfig(FileSourceConfig(r), image={}), "image_config",
     "must be an ImageConfig or None, got dict"),
    (lambda r: DatagoConfig(FileSourceConfig(r), loader=None), "loader",
     "must be a LoaderConfig, got NoneType"),
    (lambda r: DatagoConfig(FileSourceConfig(r), source_type="ftp"), "source_type",
     "must be one of 'file', 'index', 'webdataset', 'db', 'zip', 'tfrecord', 'bins', got 'ftp'"),
    (lambda r: DatagoConfig(FileSourceConfig(r), ImageConfig(crop_and_resize=False),
                            LoaderConfig(batch_size=4)), "batch_size", "crop_and_resize"),
    (lambda r: DatagoConfig(FileSourceConfig(r), None, LoaderConfig(batch_size=4)),
     "batch_size", "crop_and_resize"),
])
def test_direct_construction_validates(root, make, path, message):
    with pytest.raises(ConfigError) as exc:
        make(root)
    text = str(exc.value)
    assert text.startswith(f"{path}: "), text
    assert message in text, text


# --------------------------------------------------------------------- buckets
@pytest.mark.parametrize("size,ratio,lo,hi", [(512, 16, 0.5, 2.0), (1024, 32, 0.25, 4.0),
                                              (256, 8, 1.0, 1.0), (768, 64, 0.8, 1.25)])
def test_buckets_match_make_buckets(root, size, ratio, lo, hi):
    img = ImageConfig(default_image_size=size, downsampling_ratio=ratio,
                      min_aspect_ratio=lo, max_aspect_ratio=hi)
    expected = make_buckets(size, ratio, lo, hi)
    assert img.buckets == expected
    assert DatagoConfig(FileSourceConfig(root), img).buckets == expected


def test_default_buckets(root):
    buckets = DatagoConfig(FileSourceConfig(root)).buckets
    assert buckets == make_buckets(512, 16, 0.5, 2.0)
    # (height, width): the reference's 352x720, 512x512 and 720x352
    assert (len(buckets), buckets[0], buckets[13], buckets[-1]) == (27, (720, 352), (512, 512),
                                                                   (352, 720))


def test_no_buckets_without_crop_and_resize(root):
    assert DatagoConfig(FileSourceConfig(root), ImageConfig(crop_and_resize=False)).buckets is None
    assert DatagoConfig(FileSourceConfig(root), None).buckets is None


# --------------------------------------------------------------------- remote keys
REMOTE_SOURCES = {"index": {"index": "x.csv"}, "webdataset": {"url": "x.tar"},
                  "db": {"sources": "S", "api_url": "http://h/api/", "api_key": "k"},
                  "zip": {"path": "x.zip"}, "tfrecord": {"path": "x.tfrecord"},
                  "bins": {"path": "http://h/bins"}}


@pytest.mark.parametrize("source_type", sorted(REMOTE_SOURCES))
def test_retries_is_a_key_of_every_remote_source(source_type):
    """``retries`` sits with ``timeout_s``: default the fetch layer's, an integer
    >= 0, round-tripped, and the source's fetcher takes it (an explicit
    ``retries`` of ``make_source``, i.e. ``fetch_retries=``, wins)."""
    from datago.fetch import FetchConfig
    from datago.sources import _fetcher

    def cfg(**src):
        return DatagoConfig.from_dict({"source_type": source_type,
                                       "source_config": {**REMOTE_SOURCES[source_type], **src}})

    default = cfg()
    assert default.source.retries == FetchConfig().retries == 5
    assert _fetcher(default.source).config.retries == 5
    for n in (0, 2, 50):
        c = cfg(retries=n, timeout_s=3.0)
        assert c.source.retries == n and DatagoConfig.from_dict(c.to_dict()) == c
        assert (_fetcher(c.source).config.retries, _fetcher(c.source).config.timeout_s) == (n, 3.0)
        assert _fetcher(c.source, retries=7).config.retries == 7
    for bad, shown in [(-1, "must be >= 0, got -1"), (2.0, "must be an integer, got 2.0"),
                       ("3", "must be an integer, got '3'"), (True, "must be an integer, got True"),
                       (None, "must be an integer, got None")]:
        with pytest.raises(ConfigError) as exc:
            cfg(retries=bad)
        assert str(exc.value) == f"source_config.retries: {shown}"


@pytest.mark.parametrize("source_type", sorted(REMOTE_SOURCES))
def test_max_object_bytes_is_a_key_of_every_remote_source(source_type):
    """``max_object_bytes``: default the fetch layer's (1 GiB), an integer >= 1,
    round-tripped, and the source's fetcher takes it."""
    from datago.fetch import FetchConfig
    from datago.sources import _fetcher

    def cfg(**src):
        return DatagoConfig.from_dict({"source_type": source_type,
                                       "source_config": {**REMOTE_SOURCES[source_type], **src}})

    assert cfg().source.max_object_bytes == FetchConfig().max_object_bytes == 1 << 30
    c = cfg(max_object_bytes=12345)
    assert DatagoConfig.from_dict(c.to_dict()) == c
    assert _fetcher(c.source).config.max_object_bytes == 12345
    for bad, shown in [(0, "must be >= 1, got 0"), (1.5, "must be an integer, got 1.5"),
                       (None, "must be an integer, got None")]:
        with pytest.raises(ConfigError) as exc:
            cfg(max_object_bytes=bad)
        assert str(exc.value) == f"source_config.max_object_bytes: {shown}"


def test_retries_is_not_a_folder_key(root):
    """A local folder has no remote keys: ``retries`` is an unknown key there, as
    ``timeout_s`` is."""
    for key in ("retries", "timeout_s"):
        with raises_at(f"source_config.{key}", "unknown key"):
            DatagoConfig.from_dict({"source_config": {"root_path": root, key: 1}})


def test_retries_of_a_mixed_source_names_its_entry(root):
    d = {"sources": [{"weight": 1, "source_config": {"root_path": root}},
                     {"weight": 1, "source_type": "index",
                      "source_config": {"index": "x.csv", "retries": -2}}]}
    with raises_at("sources[1].source_config.retries", "must be >= 0, got -2"):
        DatagoConfig.from_dict(d)
    d["sources"][1]["source_config"]["retries"] = 1
    cfg = DatagoConfig.from_dict(d)
    assert cfg.source.sources[1][2].retries == 1 and DatagoConfig.from_dict(cfg.to_dict()) == cfg
