"""datago.sources.filesystem.FileListing against its module docstring (the contract).

Trees are made of tiny files in tmp_path: the listing never decodes anything.
"""

from __future__ import annotations

import os
import random
import sys
import tracemalloc

import pytest

from conftest import bounded
from datago.sources.filesystem import IMAGE_EXTENSIONS, FileListing, SampleRef


# --------------------------------------------------------------------- helpers
def make(root, *relpaths: str) -> None:
    """Create small files (and their folders) under root."""
    for rel in relpaths:
        p = os.path.join(str(root), rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(b"x")


def ids(listing: FileListing) -> list:
    return list(listing.ids())


def refs(listing: FileListing) -> dict:
    return {listing.ref(i).id: listing.ref(i) for i in range(len(listing))}


def listed_within(root, seconds: float = 10.0) -> FileListing:
    """FileListing(root), failing (instead of hanging) if the walk does not end."""
    return bounded(lambda: FileListing(root), seconds, f"FileListing({root!r})")


def contract_order(root: str) -> list:
    """Reference walk: folders and files in byte order of their names, depth-first."""
    out = []

    def walk(d, rel):
        for name in sorted(os.listdir(d), key=os.fsencode):
            p = os.path.join(d, name)
            if os.path.isdir(p):
                walk(p, f"{rel}{name}/")
            else:
                out.append(f"{rel}{name}")

    walk(root, "")
    return out


# --------------------------------------------------------------------- order
def test_order_nested_and_unicode(tmp_path):
    make(tmp_path, "b/2.jpg", "b/10.jpg", "b/1.jpg", "a/y/w.gif", "a/z.png", "a/x/v.png",
         "B.PNG", "z.jpg", "zèbre/ñ.png", "été.jpg", "日本/写真.webp", "c/d/e/f.bmp",
         "c/c.jpg", "c/e.jpg", "Z/0.jpeg")
    expected = ["B.PNG", "Z/0.jpeg",
                "a/x/v.png", "a/y/w.gif", "a/z.png",
                "b/1.jpg", "b/10.jpg", "b/2.jpg",          # names, not numbers
                "c/c.jpg", "c/d/e/f.bmp", "c/e.jpg",
                "z.jpg", "zèbre/ñ.png", "été.jpg", "日本/写真.webp"]
    listing = FileListing(tmp_path)
    assert ids(listing) == expected
    assert [listing.ref(i).id for i in range(len(listing))] == expected
    assert len(listing) == len(expected)
    assert listing.skipped == {}


def test_order_names_sharing_a_prefix(tmp_path):
    """``a.jpg``, ``a-1.jpg``, folders ``a`` and ``a0``: sorted by *name*, not by key.

    Byte order: "a" < "a-1.jpg" ('-' 0x2d) < "a.jpg" ('.' 0x2e) < "a0" ('0' 0x30).
    """
    make(tmp_path, "a.jpg", "a-1.jpg", "a0/x.jpg", "a/z.png", "B.PNG", "a_b.jpg",
         "ab.jpg", "a/a.jpg", "a/a-b.jpg")
    expected = ["B.PNG", "a/a-b.jpg", "a/a.jpg", "a/z.png", "a-1.jpg", "a.jpg",
                "a0/x.jpg", "a_b.jpg", "ab.jpg"]
    assert expected == contract_order(str(tmp_path))       # the hand-written list is right
    assert ids(FileListing(tmp_path)) == expected


def test_order_matches_contract_on_random_tree(tmp_path):
    rng = random.Random(1234)
    dirs = ["", "a/", "a0/", "a-1/", "A/", "a/a/", "a/a0/", "b_/", "a-1/a/"]
    stems = ["a", "a-1", "a0", "a_", "A", "b", "ab", "a-", "0", "_", "~"]
    files = set()
    for d in dirs:
        for s in rng.sample(stems, 6):
            files.add(f"{d}{s}.{rng.choice(['jpg', 'png', 'webp'])}")
    make(tmp_path, *sorted(files))
    expected = contract_order(str(tmp_path))
    assert sorted(expected) == sorted(files)
    assert ids(FileListing(tmp_path)) == expected


@pytest.mark.skipif(sys.getfilesystemencoding().lower() not in ("utf-8", "utf8"),
                    reason="needs a UTF-8 file system encoding")
def test_order_is_byte_order_with_undecodable_names(tmp_path):
    base = os.fsencode(str(tmp_path))
    for name in (b"\xff.jpg", "\ue000.jpg".encode(), b"z.jpg", b"\xc3\xa9.jpg"):
        os.close(os.open(base + b"/" + name, os.O_CREAT | os.O_WRONLY))
    listing = FileListing(tmp_path)
    # byte order: z (7a) < é (c3 a9) < U+E000 (ee 80 80) < 0xff
    assert ids(listing) == ["z.jpg", "é.jpg", "\ue000.jpg", "\udcff.jpg"]
    for i in range(len(listing)):
        assert os.path.isfile(listing.ref(i).path)


def test_two_listings_are_identical(tmp_path):
    rng = random.Random(7)
    files = [f"d{rng.randrange(5)}/s{rng.randrange(3)}/img_{rng.randrange(10_000):05d}"
             f"{rng.choice(['.jpg', '.png', '.txt', '.mask.png', '.JPEG'])}" for _ in range(400)]
    make(tmp_path / "one", *files)
    make(tmp_path / "two", *reversed(files))          # other creation order on disk
    a, b, c = FileListing(tmp_path / "one"), FileListing(tmp_path / "one"), FileListing(tmp_path / "two")
    assert len(a) > 100
    assert ids(a) == ids(b) == ids(c)
    assert [a.ref(i) for i in range(len(a))] == [b.ref(i) for i in range(len(b))]
    assert a.skipped == b.skipped == c.skipped
    rel = lambda r, root: (r.id, r.path[len(str(root)):],
                           tuple((n, p[len(str(root)):]) for n, p in r.masks + r.images + r.texts))
    assert ([rel(a.ref(i), tmp_path / "one") for i in range(len(a))]
            == [rel(c.ref(i), tmp_path / "two") for i in range(len(c))])
    assert a.memory_bytes() == c.memory_bytes()


# --------------------------------------------------------------------- extensions
def test_image_extensions_any_case(tmp_path):
    names = ["p01.jpg", "p02.JPG", "p03.jpeg", "p04.JPEG", "p05.png", "p06.Png", "p07.webp",
             "p08.WEBP", "p09.bmp", "p10.BmP", "p11.gif", "p12.GIF"]
    make(tmp_path, *names)
    listing = FileListing(tmp_path)
    assert ids(listing) == names
    assert listing.skipped == {}
    assert set(IMAGE_EXTENSIONS) == {"jpg", "jpeg", "png", "webp", "bmp", "gif"}


def test_other_extensions_are_not_samples(tmp_path):
    make(tmp_path, "ok.jpg", "doc.pdf", "pic.tiff", "pic2.heic", "clip.mp4")
    listing = FileListing(tmp_path)
    assert ids(listing) == ["ok.jpg"]
    # each ignored file is counted once (as other_extension or, with no image in
    # its group, as an orphan sidecar)
    assert sum(listing.skipped.values()) == 4
    assert set(listing.skipped) <= {"other_extension", "orphan_sidecars"}


def test_other_extension_next_to_an_image_is_ignored_and_counted(tmp_path):
    make(tmp_path, "k.jpg", "k.tiff", "k.xyz", "k.raw.bin")
    listing = FileListing(tmp_path)
    assert ids(listing) == ["k.jpg"]
    assert listing.skipped == {"other_extension": 3}
    # ignored files must not be handed out as sidecars (a text "" is parsed as JSON)
    assert listing.ref(0) == SampleRef("k.jpg", str(tmp_path / "k.jpg"))


def test_no_extension_is_counted(tmp_path):
    make(tmp_path, "README", "x.jpg", "Makefile")
    listing = FileListing(tmp_path)
    assert ids(listing) == ["x.jpg"]
    assert listing.skipped == {"no_extension": 2}


# --------------------------------------------------------------------- sidecars
def test_sidecars_attached_to_the_right_sample(tmp_path):
    make(tmp_path, "k.jpg", "k.txt", "k.json", "k.mask.png", "k.seg.png", "k.depth.jpg",
         "k.caption.txt", "k.meta.json",
         "kk.jpg", "kk.txt",                     # a key that starts with "k"
         "k-2.png",
         "sub/k.jpg", "sub/k.mask.png")          # same key in another folder
    listing = FileListing(tmp_path)
    # (the order of these ids is tested by test_order_names_sharing_a_prefix)
    assert sorted(ids(listing)) == ["k-2.png", "k.jpg", "kk.jpg", "sub/k.jpg"]
    assert listing.skipped == {}
    r = refs(listing)
    t = str(tmp_path)
    k = r["k.jpg"]
    assert k.id == "k.jpg" and k.path == f"{t}/k.jpg"
    assert sorted(k.masks) == [("mask", f"{t}/k.mask.png"), ("seg", f"{t}/k.seg.png")]
    assert sorted(k.images) == [("depth", f"{t}/k.depth.jpg")]
    assert sorted(k.texts) == [("", f"{t}/k.json"), ("caption", f"{t}/k.caption.txt"),
                               ("meta", f"{t}/k.meta.json"), ("txt", f"{t}/k.txt")]
    assert r["kk.jpg"] == SampleRef("kk.jpg", f"{t}/kk.jpg", texts=(("txt", f"{t}/kk.txt"),))
    assert r["k-2.png"] == SampleRef("k-2.png", f"{t}/k-2.png")
    assert r["sub/k.jpg"] == SampleRef("sub/k.jpg", f"{t}/sub/k.jpg",
                                       masks=(("mask", f"{t}/sub/k.mask.png"),))


def test_sidecar_extensions_any_case(tmp_path):
    make(tmp_path, "k.JPG", "k.TXT", "k.Json", "k.mask.PNG")
    listing = FileListing(tmp_path)
    t = str(tmp_path)
    r = listing.ref(0)
    assert (len(listing), r.id, r.path) == (1, "k.JPG", f"{t}/k.JPG")
    assert sorted(r.texts) == [("", f"{t}/k.Json"), ("txt", f"{t}/k.TXT")]
    assert r.masks == (("mask", f"{t}/k.mask.PNG"),)
    assert r.images == ()


def test_mask_names_any_case(tmp_path):
    """Masks are recognised in any case; the docstring keys them "mask" / "seg"."""
    make(tmp_path, "k.jpg", "k.MASK.png", "k.Seg.png")
    t = str(tmp_path)
    r = FileListing(tmp_path).ref(0)
    assert sorted(r.masks) == [("mask", f"{t}/k.MASK.png"), ("seg", f"{t}/k.Seg.png")]
    assert r.images == ()


def test_two_main_candidates(tmp_path):
    make(tmp_path, "k.jpg", "k.png", "m.PNG", "m.JPEG", "m.jpg", "g.gif", "g.webp", "g.bmp")
    listing = FileListing(tmp_path)
    t = str(tmp_path)
    assert ids(listing) == ["g.webp", "k.jpg", "m.jpg"]
    r = refs(listing)
    assert r["k.jpg"] == SampleRef("k.jpg", f"{t}/k.jpg", images=(("png", f"{t}/k.png"),))
    assert r["m.jpg"].path == f"{t}/m.jpg"
    assert sorted(r["m.jpg"].images) == [("jpeg", f"{t}/m.JPEG"), ("png", f"{t}/m.PNG")]
    # order jpg, jpeg, png, webp, bmp, gif: webp wins over bmp and gif
    assert r["g.webp"].path == f"{t}/g.webp"
    assert sorted(r["g.webp"].images) == [("bmp", f"{t}/g.bmp"), ("gif", f"{t}/g.gif")]
    assert listing.skipped == {}


def test_multi_dot_names_without_plain_main(tmp_path):
    make(tmp_path, "photo.v2.jpg",
         "x.v1.png", "x.mask.png",
         "y.a.png", "y.b.png",
         "z.final.edit.jpg")
    listing = FileListing(tmp_path)
    t = str(tmp_path)
    assert ids(listing) == ["photo.v2.jpg", "x.v1.png", "y.a.png", "z.final.edit.jpg"]
    r = refs(listing)
    assert r["photo.v2.jpg"] == SampleRef("photo.v2.jpg", f"{t}/photo.v2.jpg")
    assert r["x.v1.png"] == SampleRef("x.v1.png", f"{t}/x.v1.png",
                                      masks=(("mask", f"{t}/x.mask.png"),))
    assert r["y.a.png"] == SampleRef("y.a.png", f"{t}/y.a.png", images=(("b", f"{t}/y.b.png"),))
    assert r["z.final.edit.jpg"].path == f"{t}/z.final.edit.jpg"
    assert listing.skipped == {}


def test_orphan_sidecars(tmp_path):
    make(tmp_path, "o.mask.png", "t.txt", "u.seg.png", "u.txt", "j.json", "c.caption.txt",
         "keep.jpg")
    listing = FileListing(tmp_path)
    assert ids(listing) == ["keep.jpg"]
    assert listing.skipped == {"orphan_sidecars": 6}


# --------------------------------------------------------------------- hidden files
def test_hidden_files_and_folders(tmp_path):
    make(tmp_path, ".hidden.jpg", ".git/x.jpg", ".git/deep/y.jpg", "sub/.DS_Store",
         "sub/ok.jpg", "sub/.ok.txt", "._ok.jpg", "sub/.cache/z.png")
    listing = FileListing(tmp_path)
    assert ids(listing) == ["sub/ok.jpg"]
    assert listing.ref(0).texts == ()
    assert listing.skipped == {"hidden": 6}


# --------------------------------------------------------------------- symlinks
def test_symlinked_file_is_followed_with_the_links_path(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    make(root, "real/a.jpg")
    make(outside, "o.png")
    os.symlink("../real/a.jpg", root / "real" / "b.jpg")
    os.symlink(outside / "o.png", root / "ext.png")
    listing = FileListing(root)
    assert ids(listing) == ["ext.png", "real/a.jpg", "real/b.jpg"]
    r = refs(listing)
    assert r["real/b.jpg"].path == f"{root}/real/b.jpg"
    assert r["ext.png"].path == f"{root}/ext.png"
    assert listing.skipped == {}


def test_symlinked_folder_is_followed(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    make(elsewhere, "1.jpg", "sub/2.png", "sub/2.txt")
    make(root, "x.jpg")
    os.symlink(elsewhere, root / "data")
    listing = listed_within(root)
    assert ids(listing) == ["data/1.jpg", "data/sub/2.png", "x.jpg"]
    r = refs(listing)
    assert r["data/sub/2.png"] == SampleRef("data/sub/2.png", f"{root}/data/sub/2.png",
                                            texts=(("txt", f"{root}/data/sub/2.txt"),))
    assert listing.skipped == {}


def test_symlink_loop_terminates(tmp_path):
    make(tmp_path, "d/x.jpg", "y.jpg")
    os.symlink("..", tmp_path / "d" / "loop")
    os.symlink(".", tmp_path / "d" / "self")
    listing = listed_within(tmp_path)
    assert ids(listing) == ["d/x.jpg", "y.jpg"]
    assert listing.skipped == {"folder_seen_twice": 2}


def test_folder_reached_twice_is_walked_once(tmp_path):
    make(tmp_path, "real/x.jpg")
    os.symlink("real", tmp_path / "l1")
    os.symlink("real", tmp_path / "l2")
    listing = listed_within(tmp_path)
    # "l1" < "l2" < "real": the first one in name order is walked
    assert ids(listing) == ["l1/x.jpg"]
    assert listing.skipped == {"folder_seen_twice": 2}


def test_broken_symlink_and_fifo_are_not_files(tmp_path):
    make(tmp_path, "ok.jpg")
    os.symlink(tmp_path / "missing.jpg", tmp_path / "broken.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    listing = FileListing(tmp_path)
    assert ids(listing) == ["ok.jpg"]
    assert listing.skipped == {"not_a_file": 2}


# --------------------------------------------------------------------- unreadable folders
def test_unreadable_folder_chmod(tmp_path):
    make(tmp_path, "a/1.jpg", "locked/2.jpg", "z/3.jpg")
    locked = tmp_path / "locked"
    os.chmod(locked, 0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running with permission override (root): chmod 000 stays readable")
        listing = FileListing(tmp_path)
        assert ids(listing) == ["a/1.jpg", "z/3.jpg"]
        assert listing.skipped == {"unreadable_folder": 1}
    finally:
        os.chmod(locked, 0o755)


def test_unreadable_folder_simulated(tmp_path, monkeypatch):
    """Same as above without needing a non-root user: scandir fails on one folder."""
    make(tmp_path, "a/1.jpg", "locked/2.jpg", "locked/deeper/4.jpg", "z/3.jpg")
    locked = str(tmp_path / "locked")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    listing = FileListing(tmp_path)
    assert ids(listing) == ["a/1.jpg", "z/3.jpg"]
    assert listing.skipped == {"unreadable_folder": 1}


# --------------------------------------------------------------------- roots
def test_empty_root(tmp_path):
    listing = FileListing(tmp_path)
    assert len(listing) == 0
    assert ids(listing) == []
    assert listing.skipped == {}
    with pytest.raises(IndexError):
        listing.ref(0)


def test_root_with_only_skipped_files(tmp_path):
    make(tmp_path, ".x.jpg", "notes.txt", "sub/README")
    listing = FileListing(tmp_path)
    assert len(listing) == 0
    assert listing.skipped == {"hidden": 1, "orphan_sidecars": 1, "no_extension": 1}


def test_file_as_root_raises(tmp_path):
    make(tmp_path, "a.jpg")
    with pytest.raises((NotADirectoryError, ValueError)):
        FileListing(tmp_path / "a.jpg")


def test_missing_root_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        FileListing(tmp_path / "nope")


def test_relative_root_gives_absolute_paths(tmp_path, monkeypatch):
    make(tmp_path, "data/s/a.jpg", "data/s/a.txt")
    monkeypatch.chdir(tmp_path)
    listing = FileListing("data")
    assert listing.ref(0) == SampleRef("s/a.jpg", f"{tmp_path}/data/s/a.jpg",
                                       texts=(("txt", f"{tmp_path}/data/s/a.txt"),))


# --------------------------------------------------------------------- access API
def test_ids_is_a_lazy_generator(tmp_path):
    make(tmp_path, "a.jpg", "b.jpg")
    listing = FileListing(tmp_path)
    it = listing.ids()
    assert iter(it) is it and not isinstance(it, (list, tuple))
    assert next(it) == "a.jpg" and next(it) == "b.jpg"
    with pytest.raises(StopIteration):
        next(it)


def test_ref_out_of_range(tmp_path):
    make(tmp_path, "a.jpg", "b/c.png")
    listing = FileListing(tmp_path)
    with pytest.raises(IndexError):
        listing.ref(2)
    # Python sequence convention: -1 is the last sample, or an IndexError; never a bogus ref
    try:
        last = listing.ref(-1)
    except IndexError:
        return
    assert last == listing.ref(1)


def test_memory_bytes(tmp_path):
    n_dirs, n_files = 20, 100
    make(tmp_path, *[f"d{d:03d}/img_{i:06d}.jpg" for d in range(n_dirs) for i in range(n_files)])
    make(tmp_path, *[f"d{d:03d}/img_{i:06d}.txt" for d in range(n_dirs) for i in range(0, n_files, 10)])
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        listing = FileListing(tmp_path)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    n = len(listing)
    assert n == n_dirs * n_files
    mb = listing.memory_bytes()
    key_bytes = n * len("d000/img_000000")
    # the keys themselves cannot take less; the docstring says ~60 bytes a sample
    assert key_bytes <= mb <= 64 * n + 4096, mb
    # and the estimate is about what the listing really holds
    assert held <= 2 * mb + 64 * 1024, (held, mb)
    assert FileListing(tmp_path / "d000").memory_bytes() < mb
