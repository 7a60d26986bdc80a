"""datago: fast image data loading for PyTorch training.

The image core (``datago.image``) decodes JPEG and PNG with libjpeg-turbo and
libspng and crops/resizes into aspect-ratio buckets with the GIL released.
"""

from datago.buckets import make_buckets, nearest_bucket
from datago.errors import ConfigError, DatagoError, DecodeError, ImageTooLargeError
from datago.image import (DEFAULT_MAX_PIXELS, BucketResult, ImageInfo, decode,
                          decode_to_bucket, read_header, resize)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "BucketResult",
    "ConfigError",
    "DatagoError",
    "DecodeError",
    "ImageInfo",
    "ImageTooLargeError",
    "decode",
    "decode_to_bucket",
    "make_buckets",
    "nearest_bucket",
    "read_header",
    "resize",
]
