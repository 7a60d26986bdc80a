"""Exception hierarchy of datago.

Every error raised on purpose by datago derives from :class:`DatagoError`, and
also from the builtin that best describes it, so ``except ValueError`` keeps
working for code that does not know about datago.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DatagoError", "DecodeError", "ImageTooLargeError",
           "MaskMismatchError", "SharedMemoryError", "WorkerError"]


class DatagoError(Exception):
    """Base class of every error datago raises on purpose."""


class DecodeError(DatagoError, ValueError):
    """Image bytes that cannot be decoded: corrupt, truncated, empty or unsupported.

    The message names the format (``JPEG``, ``PNG``, ...) and the cause.
    """


class ImageTooLargeError(DecodeError):
    """The header announces more pixels than ``max_pixels`` (decompression-bomb guard).

    Raised from the header, before any pixel buffer is allocated.
    """


class ConfigError(DatagoError, ValueError):
    """An invalid configuration; the message names the offending key path."""


class MaskMismatchError(DatagoError, ValueError):
    """A mask that cannot be aligned with its image or read as labels: an aspect ratio
    more than 1% off the image's, a colour missing from the configured palette, or a
    source that cannot be read the way asked (the loader counts ``mask_mismatch``)."""


class SharedMemoryError(DatagoError, RuntimeError):
    """A batch could not be allocated in shared memory (``/dev/shm`` full or too
    small); the message names the size needed and the fixes."""


class WorkerError(DatagoError, RuntimeError):
    """A DataLoader worker of a ``DatagoDataset`` died: torch's message, then which
    worker it was and how far it had got (raised by ``datago.dataset.DataLoader``)."""
