"""Sample sources (one module per kind of storage)."""

from datago.sources.filesystem import FileListing, SampleRef

__all__ = ["FileListing", "SampleRef"]
