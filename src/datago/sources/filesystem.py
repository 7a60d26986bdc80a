"""Local folders: a recursive, sorted, compact listing of samples.

Samples and sidecars (WebDataset convention)
--------------------------------------------
The *key* of a file is its path relative to the root up to the first dot of its
name: ``a/b/cat01.jpg``, ``a/b/cat01.mask.png`` and ``a/b/cat01.txt`` share the key
``a/b/cat01`` and form one sample:

* the main image is the file named ``<key>.<ext>`` with an image extension (jpg,
  jpeg, png, webp, bmp, gif; any case); if there are several (``cat01.jpg`` and
  ``cat01.png``), the first in that order is the main one and the others become
  additional images named by their extension;
* ``<key>.mask.<img>`` and ``<key>.seg.<img>`` are masks, keyed ``"mask"``/``"seg"``;
* ``<key>.<name>.<img>`` is an additional image keyed ``name``;
* ``<key>.json`` is parsed and, when it is an object, merged into the sample's
  attributes; ``<key>.txt`` becomes ``attributes["txt"]``; ``<key>.<name>.txt`` /
  ``<key>.<name>.json`` become ``attributes[name]``;
* a group with no ``<key>.<ext>`` image but other images takes the first of them
  (in name order, masks excepted) as its main image, so multi-dot names such as
  ``photo.v2.jpg`` are never lost; a group with no image at all is counted as
  orphan sidecars.

The sample id is the main image's path relative to the root, ``/``-separated.

Order, scale, robustness
------------------------
Folders and files are visited in sorted name order (byte order of the names), so
every rank on every node lists the same sequence.  The walk streams the tree with
``os.scandir`` and keeps only a byte blob of keys, offsets and a small per-sample
pattern index (~60 bytes per sample): a million files list in seconds and tens of
MB.  Symlinked files and folders are followed; a folder reached twice (a symlink
loop, or two links to one folder) is walked once.  Hidden files (leading dot),
unreadable folders and files with other extensions are skipped and counted.
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

__all__ = ["FileListing", "SampleRef", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
TEXT_EXTENSIONS = ("txt", "json")
MASK_NAMES = ("mask", "seg")

# A pattern describes a sample's files by their suffix after the key.
# (main_suffix, ((kind, name, suffix), ...)) with kind in "mask", "image", "text".
Pattern = Tuple[str, Tuple[Tuple[str, str, str], ...]]


@dataclass(frozen=True)
class SampleRef:
    """One sample of a listing: its id and the absolute paths of its files."""

    id: str
    path: str
    masks: Tuple[Tuple[str, str], ...] = ()
    images: Tuple[Tuple[str, str], ...] = ()
    texts: Tuple[Tuple[str, str], ...] = ()      # (attribute name or "" to merge, path)


def _split(name: str) -> Tuple[str, str]:
    key, _, rest = name.partition(".")
    return key, rest


def _pattern(files: List[str]) -> Optional[Pattern]:
    """Pattern of one key's files (their suffixes after the key), or None if no image."""
    mains, sidecars = [], []
    images = []
    for rest in files:
        ext = rest.rsplit(".", 1)[-1].lower()
        if ext in IMAGE_EXTENSIONS:
            if "." not in rest:
                mains.append(rest)
            else:
                images.append(rest)
        else:
            sidecars.append(rest)
    if not mains:
        candidates = [r for r in images if r.rsplit(".", 1)[0].lower() not in MASK_NAMES]
        if not candidates:
            return None
        mains = [candidates[0]]
        images.remove(candidates[0])
    mains.sort(key=lambda r: IMAGE_EXTENSIONS.index(r.lower()) if r.lower() in IMAGE_EXTENSIONS else 99)
    main = mains[0]
    parts = []
    for rest in mains[1:]:
        parts.append(("image", rest.lower(), rest))
    for rest in images:
        middle = rest.rsplit(".", 1)[0]
        parts.append(("mask" if middle.lower() in MASK_NAMES else "image", middle, rest))
    for rest in sidecars:
        middle, _, ext = rest.rpartition(".")
        if middle:
            parts.append(("text", middle, rest))
        else:
            parts.append(("text", "txt" if ext.lower() == "txt" else "", rest))
    return main, tuple(parts)


class FileListing:
    """Sorted samples of a folder (see the module docstring); index with ``ref(i)``."""

    def __init__(self, root: str):
        self.root = os.path.abspath(str(root))
        self._blob = bytearray()
        self._offsets = array("q", [0])
        self._pattern_idx = array("i")
        self._patterns: List[Pattern] = []
        self.skipped: Dict[str, int] = {}
        self._scan()
        self._blob_bytes = bytes(self._blob)
        del self._blob

    # ------------------------------------------------------------------ walk
    def _count(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def _scan(self) -> None:
        try:
            st = os.stat(self.root)
        except OSError as e:
            raise FileNotFoundError(f"cannot read {self.root}: {e}") from None
        walk = _Walk(self, {(st.st_dev, st.st_ino)})
        walk.run(self.root)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self._pattern_idx)

    def key(self, i: int) -> str:
        o = self._offsets
        return self._blob_bytes[o[i]:o[i + 1]].decode("utf-8", "surrogateescape")

    def sample_id(self, i: int) -> str:
        return f"{self.key(i)}.{self._patterns[self._pattern_idx[i]][0]}"

    def ids(self):
        """All sample ids, in listing order (a generator)."""
        for i in range(len(self)):
            yield self.sample_id(i)

    def ref(self, i: int) -> SampleRef:
        key = self.key(i)
        main, parts = self._patterns[self._pattern_idx[i]]
        base = os.path.join(self.root, key)
        masks, images, texts = [], [], []
        for kind, name, suffix in parts:
            p = f"{base}.{suffix}"
            (masks if kind == "mask" else images if kind == "image" else texts).append((name, p))
        return SampleRef(f"{key}.{main}", f"{base}.{main}", tuple(masks), tuple(images), tuple(texts))

    def memory_bytes(self) -> int:
        """Approximate memory held by the listing."""
        return (len(self._blob_bytes) + self._offsets.itemsize * len(self._offsets)
                + self._pattern_idx.itemsize * len(self._pattern_idx) + 200 * len(self._patterns))


class _Walk:
    """Iterative depth-first walk appending samples to a FileListing in name order.

    A frame is one folder: its files (grouped by key) and subfolders, merged in
    name order; a subfolder is walked completely before the next item of its
    parent, so the order is the sorted order of path components.
    """

    def __init__(self, listing: FileListing, seen_dirs: set):
        self.l = listing
        self.seen_dirs = seen_dirs
        self.pattern_ids: Dict[Pattern, int] = {}

    def run(self, root: str) -> None:
        frames = [self._frame(root, "")]
        while frames:
            items, rel, groups = frames[-1]
            try:
                name, d = next(items)
            except StopIteration:
                frames.pop()
                continue
            if d is None:
                _add_group(self.l, rel, name, groups[name], self.pattern_ids)
            else:
                frames.append(self._frame(d.path, f"{rel}{d.name}/"))

    def _frame(self, path: str, rel: str):
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            self.l._count("unreadable_folder")
            return iter(()), rel, {}
        groups, subdirs = _classify(self.l, entries, self.seen_dirs)
        items = [(k, None) for k in groups] + [(d.name, d) for d in subdirs]
        items.sort(key=lambda kv: kv[0])
        return iter(items), rel, groups


def _classify(l: FileListing, entries, seen_dirs):
    groups: Dict[str, List[str]] = {}
    subdirs = []
    for e in entries:
        if e.name.startswith("."):
            l._count("hidden")
            continue
        try:
            if e.is_dir():
                s = e.stat()
                ident = (s.st_dev, s.st_ino)
                if ident in seen_dirs:
                    l._count("folder_seen_twice")
                    continue
                seen_dirs.add(ident)
                subdirs.append(e)
                continue
            if not e.is_file():
                l._count("not_a_file")
                continue
        except OSError:
            l._count("unreadable_entry")
            continue
        key, rest = _split(e.name)
        if not rest:
            l._count("no_extension")
            continue
        groups.setdefault(key, []).append(rest)
    return groups, subdirs


def _add_group(l: FileListing, rel: str, name: str, files: List[str], pattern_ids) -> None:
    pat = _pattern(files)
    if pat is None:
        l._count("orphan_sidecars", len(files))
        return
    pid = pattern_ids.get(pat)
    if pid is None:
        pid = pattern_ids[pat] = len(l._patterns)
        l._patterns.append(pat)
    n_ignored = sum(1 for r in files
                    if r.rsplit(".", 1)[-1].lower() not in IMAGE_EXTENSIONS + TEXT_EXTENSIONS)
    if n_ignored:
        l._count("other_extension", n_ignored)
    l._blob += f"{rel}{name}".encode("utf-8", "surrogateescape")
    l._offsets.append(len(l._blob))
    l._pattern_idx.append(pid)
