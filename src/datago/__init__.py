"""datago: fast image data loading for PyTorch training.

The image core (``datago.image``) decodes JPEG and PNG with libjpeg-turbo and
libspng and crops/resizes into aspect-ratio buckets with the GIL released;
``DatagoDataset`` streams a folder of images as sharded, bucket-batched tensors.
"""

from datago.buckets import make_buckets, nearest_bucket
from datago.client import (DatagoClient, ImagePayload, LatentPayload, Sample, initialize_logging,
                           live_cleanup_threads)
from datago.config import DatagoConfig, FileSourceConfig, ImageConfig, LoaderConfig
from datago.dataset import DataLoader, DatagoDataset, DatagoMapDataset
from datago.errors import (ConfigError, DatagoError, DecodeError, ImageTooLargeError,
                           MaskMismatchError, SharedMemoryError, WorkerError)
from datago.image import (DEFAULT_MAX_PIXELS, BucketResult, ImageInfo, decode,
                          decode_to_bucket, read_header, resize)
from datago.sharding import ShardDetector, ShardInfo

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_PIXELS",
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
