"""What every source describes: samples, their parts and where their bytes are.

A source lists samples (``len``, ``sample_id(i)``, ``ref(i)``) in a stable order
and, when it knows them, their sizes (``known_sizes()``), which is what the epoch
plan needs.  Where a source does not know sizes, the dataset reads them from the
image headers (``datago.sources.sizes``) through the same fetch layer that reads
the samples.  A part's location is a local path, an ``http(s)://`` URL or a
``datago.fetch.Member`` (a byte range of either); only ``datago.fetch`` opens
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Tuple

__all__ = ["SampleRef", "Source"]


@dataclass(frozen=True)
class SampleRef:
    """One sample: its id and the locations of its parts."""

    id: str
    path: Any                                     # main image: path, URL or Member
    masks: Tuple[Tuple[str, Any], ...] = ()       # (name, location)
    images: Tuple[Tuple[str, Any], ...] = ()      # (name, location): additional images
    texts: Tuple[Tuple[str, Any], ...] = ()       # (attribute name or "" to merge, location)
    attributes: Optional[Mapping[str, Any]] = None   # known up front (an index's columns)
    latents: Tuple[Tuple[str, Any], ...] = ()     # (name, location) of .npy arrays
    meta: Optional[Mapping[str, Any]] = None      # per-sample fields the source gives
                                                  # (db: tags, source, duplicate_state),
                                                  # passed through as batch[key] lists


class Source:
    """Base class of sources; see the module docstring."""

    kind = "source"
    root: str = ""                                # what the sizes cache is keyed by
    skipped: dict

    def __len__(self) -> int:
        raise NotImplementedError

    def sample_id(self, i: int) -> str:
        raise NotImplementedError

    def ids(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self.sample_id(i)

    def hash_keys(self) -> Iterator[str]:
        """The strings the stable id hashes (sharding, shuffling, caches) are made of."""
        return self.ids()

    def ref(self, i: int) -> SampleRef:
        raise NotImplementedError

    def main_location(self, i: int) -> Any:
        return self.ref(i).path

    def remote(self) -> bool:
        """Whether any sample's bytes are behind a URL (they then get IO threads)."""
        from datago.fetch import is_remote
        return any(is_remote(self.main_location(i)) for i in range(len(self)))

    def known_sizes(self):
        """A ``SizesIndex`` when the source knows every sample's size, else None."""
        return None
