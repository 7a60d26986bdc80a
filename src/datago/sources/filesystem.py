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
* ``<key>.<name>.<img>`` is an additional image keyed ``name`` (mask names are
  matched in any case and keyed in lower case);
* ``<key>.json`` is parsed and, when it is an object, merged into the sample's
  attributes; ``<key>.txt`` becomes ``attributes["txt"]``; ``<key>.<name>.txt`` /
  ``<key>.<name>.json`` become ``attributes[name]``;
* ``<key>.npy`` / ``<key>.<name>.npy`` (and ``.safetensors``) are latents (NumPy
  arrays; a safetensors file of several tensors gives ``<name>/<tensor>``) named ``"npy"`` /
  ``name`` (``batch["latents"]``);
* a group with no ``<key>.<ext>`` image but other images takes the first of them
  (in name order, masks excepted) as its main image, so multi-dot names such as
  ``photo.v2.jpg`` are never lost; a group with no image at all is counted as
  orphan sidecars.

The sample id is the main image's path relative to the root, ``/``-separated.

Order, scale, robustness
------------------------
Folders and files are visited in sorted name order (byte order of the names; a
sample sorts by the name of its main image, a folder's contents at the folder's
name), depth first, so every rank on every node lists the same sequence.  The walk streams the tree with
``os.scandir`` and keeps only a byte blob of keys, offsets and a small per-sample
pattern index (~60 bytes per sample): a million files list in seconds and tens of
MB.  Symlinked files and folders are followed; a folder reached twice (a symlink
loop, or two links to one folder) is walked once.  Hidden files (leading dot),
unreadable folders and files with other extensions (even next to an image) are
skipped and counted.
"""

from __future__ import annotations

import os
from array import array
from typing import Dict, List, Optional, Tuple

from datago.sources.base import SampleRef, Source

__all__ = ["FileListing", "SampleRef", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
TEXT_EXTENSIONS = ("txt", "json")
LATENT_EXTENSIONS = ("npy", "safetensors")
MASK_NAMES = ("mask", "seg")

# A pattern describes a sample's files by their suffix after the key.
# (main_suffix, ((kind, name, suffix), ...)) with kind in "mask", "image", "text", "latent".
Pattern = Tuple[str, Tuple[Tuple[str, str, str], ...]]


def _pattern(files: Tuple[str, ...]) -> Tuple[Optional[Pattern], int]:
    """Pattern of one key's files (their suffixes after the key) and the number of files
    it ignores (other extensions); the pattern is None when there is no image."""
    mains, images, texts, latents = [], [], [], []
    ignored = 0
    for rest in files:
        ext = rest.rsplit(".", 1)[-1].lower()
        if ext in IMAGE_EXTENSIONS:
            (images if "." in rest else mains).append(rest)
        elif ext in TEXT_EXTENSIONS:
            texts.append(rest)
        elif ext in LATENT_EXTENSIONS:
            latents.append(rest)
        else:
            ignored += 1
    if not mains:
        candidates = [r for r in images if r.rsplit(".", 1)[0].lower() not in MASK_NAMES]
        if not candidates:
            return None, ignored
        mains = [candidates[0]]
        images.remove(candidates[0])
    mains.sort(key=lambda r: IMAGE_EXTENSIONS.index(r.lower()) if r.lower() in IMAGE_EXTENSIONS else 99)
    parts = [("image", rest.lower(), rest) for rest in mains[1:]]
    for rest in images:
        middle = rest.rsplit(".", 1)[0]
        if middle.lower() in MASK_NAMES:
            parts.append(("mask", middle.lower(), rest))
        else:
            parts.append(("image", middle, rest))
    for rest in texts:
        middle, _, ext = rest.rpartition(".")
        parts.append(("text", middle if middle else ("txt" if ext.lower() == "txt" else ""), rest))
    for rest in latents:
        middle, _, ext = rest.rpartition(".")
        parts.append(("latent", middle or ext.lower(), rest))
    return (mains[0], tuple(parts)), ignored


class FileListing(Source):
    """Sorted samples of a folder (see the module docstring); index with ``ref(i)``."""

    kind = "file"

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
        if not os.path.isdir(self.root):
            raise NotADirectoryError(f"{self.root} is not a folder")
        walk = _Walk(self, {(st.st_dev, st.st_ino)})
        walk.run(self.root)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self._pattern_idx)

    def _index(self, i: int) -> int:
        n = len(self._pattern_idx)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples")
        return i + n if i < 0 else i

    def key(self, i: int) -> str:
        i = self._index(i)
        o = self._offsets
        return self._blob_bytes[o[i]:o[i + 1]].decode("utf-8", "surrogateescape")

    def sample_id(self, i: int) -> str:
        i = self._index(i)
        return f"{self.key(i)}.{self._patterns[self._pattern_idx[i]][0]}"

    def ids(self):
        """All sample ids, in listing order (a generator)."""
        for i in range(len(self)):
            yield self.sample_id(i)

    def ref(self, i: int) -> SampleRef:
        i = self._index(i)
        key = self.key(i)
        main, parts = self._patterns[self._pattern_idx[i]]
        base = os.path.join(self.root, key)
        groups: Dict[str, list] = {"mask": [], "image": [], "text": [], "latent": []}
        for kind, name, suffix in parts:
            groups[kind].append((name, f"{base}.{suffix}"))
        return SampleRef(f"{key}.{main}", f"{base}.{main}", tuple(groups["mask"]),
                         tuple(groups["image"]), tuple(groups["text"]),
                         latents=tuple(groups["latent"]))

    def memory_bytes(self) -> int:
        """Approximate memory held by the listing."""
        return (len(self._blob_bytes) + self._offsets.itemsize * len(self._offsets)
                + self._pattern_idx.itemsize * len(self._pattern_idx) + 200 * len(self._patterns))


class _Walk:
    """Iterative depth-first walk appending samples to a FileListing.

    A frame is one folder: its samples and subfolders merged in byte order of their
    names (a sample sorts by its main image's file name), a subfolder walked
    completely before the next item of its parent.
    """

    def __init__(self, listing: FileListing, seen_dirs: set):
        self.l = listing
        self.seen_dirs = seen_dirs
        self.pattern_ids: Dict[Pattern, int] = {}
        self.cache: Dict[Tuple[str, ...], Tuple[Optional[Pattern], int]] = {}

    def run(self, root: str) -> None:
        frames = [self._frame(root, "")]
        blob, offsets, pidx = self.l._blob, self.l._offsets, self.l._pattern_idx
        while frames:
            items, rel = frames[-1]
            try:
                _, key, pid, d = next(items)
            except StopIteration:
                frames.pop()
                continue
            if d is None:
                blob += f"{rel}{key}".encode("utf-8", "surrogateescape")
                offsets.append(len(blob))
                pidx.append(pid)
            else:
                frames.append(self._frame(d.path, f"{rel}{d.name}/"))

    def _frame(self, path: str, rel: str):
        l = self.l
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError:
            l._count("unreadable_folder")
            return iter(()), rel
        groups: Dict[str, List[str]] = {}
        items = []
        for e in entries:
            name = e.name
            if name.startswith("."):
                l._count("hidden")
                continue
            try:
                if e.is_dir():
                    st = e.stat()
                    ident = (st.st_dev, st.st_ino)
                    if ident in self.seen_dirs:
                        l._count("folder_seen_twice")
                        continue
                    self.seen_dirs.add(ident)
                    items.append((os.fsencode(name), name, -1, e))
                    continue
                if not e.is_file():
                    l._count("not_a_file")          # broken symlink, socket, ...
                    continue
            except OSError:
                l._count("unreadable_entry")
                continue
            key, _, rest = name.partition(".")
            if not rest:
                l._count("no_extension")
                continue
            g = groups.get(key)
            if g is None:
                groups[key] = [rest]
            else:
                g.append(rest)
        for key, files in groups.items():
            files_t = tuple(sorted(files))
            hit = self.cache.get(files_t)
            if hit is None:
                hit = self.cache[files_t] = _pattern(files_t)
            pat, ignored = hit
            if ignored:
                l._count("other_extension", ignored)
            if pat is None:
                l._count("orphan_sidecars", len(files) - ignored)
                continue
            pid = self.pattern_ids.get(pat)
            if pid is None:
                pid = self.pattern_ids[pat] = len(l._patterns)
                l._patterns.append(pat)
            items.append((os.fsencode(f"{key}.{pat[0]}"), key, pid, None))
        items.sort(key=lambda t: t[0])
        return iter(items), rel
