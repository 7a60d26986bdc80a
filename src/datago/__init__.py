"""datago: fast image data loading for PyTorch training.

The image core (``datago.image``) decodes JPEG and PNG with libjpeg-turbo and
libspng and crops/resizes into aspect-ratio buckets with the GIL released;
``DatagoDataset`` streams a folder of images as sharded, bucket-batched tensors.

``import datago`` loads the image core and the config only; the torch parts
(``DatagoDataset``, ``DatagoMapDataset``, ``DataLoader``, ``DatagoClient``, ...)
are imported on first use, so tools that only decode do not pay for torch.
"""

from datago.buckets import Bucket, make_buckets, nearest_bucket
from datago.config import DatagoConfig, FileSourceConfig, ImageConfig, LoaderConfig
from datago.errors import (ConfigError, DatagoError, DecodeError, ImageTooLargeError,
                           MaskMismatchError, SharedMemoryError, WorkerError)
from datago.image import (DEFAULT_MAX_PIXELS, BucketResult, ImageInfo, decode,
                          decode_to_bucket, read_header, resize)
from datago.sharding import ShardDetector, ShardInfo

# name -> the module that defines it (imported by __getattr__ on first use: torch)
_LAZY = {
    "DataLoader": "datago.dataset", "DatagoDataset": "datago.dataset",
    "DatagoMapDataset": "datago.dataset",
    "DatagoClient": "datago.client", "ImagePayload": "datago.client",
    "LatentPayload": "datago.client", "Sample": "datago.client",
    "initialize_logging": "datago.client", "live_cleanup_threads": "datago.client",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'datago' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "Bucket",
    "BucketResult",
    "ConfigError",
    "DataLoader",
    "DatagoClient",
    "DatagoConfig",
    "DatagoDataset",
    "DatagoMapDataset",
    "DatagoError",
    "DecodeError",
    "FileSourceConfig",
    "ImageConfig",
    "ImageInfo",
    "ImagePayload",
    "ImageTooLargeError",
    "LatentPayload",
    "LoaderConfig",
    "MaskMismatchError",
    "Sample",
    "ShardDetector",
    "ShardInfo",
    "SharedMemoryError",
    "decode",
    "decode_to_bucket",
    "initialize_logging",
    "live_cleanup_threads",
    "make_buckets",
    "nearest_bucket",
    "read_header",
    "resize",
    "WorkerError",
]
