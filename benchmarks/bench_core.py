#!/usr/bin/env python
"""Decode-to-bucket throughput: datago's Cython core against plain-Python stacks.

    python benchmarks/bench_core.py CORPUS_DIR [--limit N] [--rounds R]
                                    [--sizes 512,1024] [--out FILE.md]

Variant (b) needs OpenCV and PyTurboJPEG: ``pip install -e '.[bench]'``.

Every .jpg/.jpeg/.png under CORPUS_DIR (recursive, sorted; ``--limit`` keeps the
first N) is read into memory first, so file IO is not measured.  For each bucket
size (``make_buckets(512, 16, 0.5, 2.0)``, ``make_buckets(1024, 32, 0.5, 2.0)``)
four variants do the same job -- decode, EXIF orientation, nearest bucket, cover
resize, centre crop to an (H, W, 3) uint8 array -- side by side in one process:

(a) naive Pillow: open, exif_transpose, alpha over grey 128, RGB, LANCZOS cover
    resize at full size, crop, np.asarray;
(b) best plain Python: PyTurboJPEG DCT-scaled decode (PNG: cv2.imdecode),
    orientation with numpy, cv2.resize INTER_AREA, crop (cv2 on 1 thread);
(c) datago.decode_to_bucket, 1 thread;
(d) datago.decode_to_bucket over a 2-thread ThreadPoolExecutor.

(An earlier variant (e), datago's decode-only ceiling, stopped (c) after the
DCT-scaled decode through a test-only switch of the core; the switch is gone, and
the variant with it: benchmarks/RESULTS.md.)

The machine this runs on is usually shared and noisy, so the variants are
interleaved: R rounds, each running every variant once over the whole list in an
order that rotates between rounds.  Reported: median img/s per variant, and each
ratio computed per round, then its median (min..max across rounds).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import PIL
from PIL import Image, ImageOps
from turbojpeg import TJPF_RGB, TurboJPEG

import datago
from _common import cover_size, cpu_counters, cpu_model, version
from datago._core import _jpeg, _png, _resample

EXTENSIONS = {".jpg", ".jpeg", ".png"}
DOWNSAMPLING = {512: 16, 1024: 32}        # bucket size -> VAE factor / patch size
WARMUP_IMAGES = 20
SANITY_IMAGES = 20
THREADS = 2
CHUNK = 16                                # images per task in variant (d)
GREY = (128, 128, 128)

# name, description; (c) must stay the reference of the ratios below
VARIANTS = [
    ("a", "Pillow naive (LANCZOS, full-size decode)"),
    ("b", "TurboJPEG scaled / cv2 + cv2 INTER_AREA, 1 thread"),
    ("c", "datago.decode_to_bucket, 1 thread"),
    ("d", f"datago.decode_to_bucket, {THREADS} threads"),
]
RATIOS = [  # (label, numerator, denominator, target)
    ("c/a", "c", "a", 3.0),
    ("c/b", "c", "b", 1.15),
    ("d/c", "d", "c", 1.8),
]

tj = TurboJPEG()
_TJ_FACTORS = sorted(tj.scaling_factors, key=lambda f: f[0] / f[1])


# --------------------------------------------------------------------------- helpers

def centre_crop(arr: np.ndarray, bw: int, bh: int) -> np.ndarray:
    h, w = arr.shape[:2]
    x0, y0 = (w - bw) // 2, (h - bh) // 2
    return arr[y0:y0 + bh, x0:x0 + bw]


def orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to a stored-orientation (H, W, C) array (a view)."""
    if orientation == 1:
        return arr
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    if orientation == 5:
        return arr.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(arr, -1)
    if orientation == 7:
        return np.rot90(arr, 2).transpose(1, 0, 2)
    return np.rot90(arr, 1)                                  # 8


def tj_factor(scale: float) -> tuple[int, int]:
    """Smallest TurboJPEG scaling factor >= scale; full size when upscaling."""
    if scale >= 1.0:
        return (1, 1)
    for f in _TJ_FACTORS:
        if f[0] / f[1] >= scale:
            return f
    return (1, 1)


# --------------------------------------------------------------------------- variants

def variant_a(data: bytes, buckets) -> np.ndarray:
    """Naive Pillow: full decode, alpha over grey, LANCZOS cover resize, crop."""
    im = Image.open(BytesIO(data))
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, GREY + (255,)), im)
    im = im.convert("RGB")
    w, h = im.size                                  # Pillow's (width, height)
    bh, bw = datago.nearest_bucket(h, w, buckets)
    im = im.resize(cover_size(w, h, bw, bh), Image.LANCZOS)
    x0, y0 = (im.width - bw) // 2, (im.height - bh) // 2
    return np.asarray(im.crop((x0, y0, x0 + bw, y0 + bh)))


def variant_b(data: bytes, buckets) -> np.ndarray:
    """Best plain Python: DCT-scaled TurboJPEG (PNG: cv2), numpy orientation, cv2 INTER_AREA."""
    info = datago.read_header(data)
    dh, dw = info.display_size
    bh, bw = datago.nearest_bucket(dh, dw, buckets)
    if info.format == "jpeg":
        factor = tj_factor(max(bw / dw, bh / dh))
        arr = tj.decode(data, pixel_format=TJPF_RGB, scaling_factor=factor)
    else:
        # IGNORE_ORIENTATION: orientation is applied below, from the same header read
        arr = cv2.imdecode(np.frombuffer(data, np.uint8),
                           cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    if info.orientation != 1:
        arr = np.ascontiguousarray(orient(arr, info.orientation))
    h, w = arr.shape[:2]
    arr = cv2.resize(arr, cover_size(w, h, bw, bh), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(centre_crop(arr, bw, bh))


FILTER = datago.image.DEFAULT_FILTER     # --filter


def variant_c(data: bytes, buckets) -> np.ndarray:
    """datago, public API (default filter unless --filter)."""
    return datago.decode_to_bucket(data, buckets, filter=FILTER).image


# --------------------------------------------------------------------------- harness

class FileError(RuntimeError):
    pass


def run_serial(fn, datas, paths, buckets) -> None:
    i = -1
    try:
        for i, d in enumerate(datas):
            fn(d, buckets)
    except Exception as exc:
        raise FileError(f"{fn.__name__} failed on {paths[i]}: {type(exc).__name__}: {exc}") from exc


def run_threaded(ex: ThreadPoolExecutor, datas, paths, buckets) -> None:
    """Variant (d): chunks of CHUNK images per task (Executor.map ignores chunksize
    for threads), so the per-task overhead is paid once per chunk."""
    def work(start: int) -> None:
        run_serial(variant_c, datas[start:start + CHUNK], paths[start:start + CHUNK], buckets)
    for _ in ex.map(work, range(0, len(datas), CHUNK)):
        pass



class Run(NamedTuple):
    """One timed pass: wall seconds and the cores used, on average, by this process
    (``ours``), by everything else on the machine (``others``) and stolen by the
    hypervisor (``steal``) -- the noise the interleaving is there to even out."""
    wall: float
    ours: float
    others: float
    steal: float


def timed(run) -> Run:
    gc.collect()
    busy0, steal0 = cpu_counters()
    c0 = time.process_time()
    t0 = time.perf_counter()
    run()
    wall = time.perf_counter() - t0
    ours = time.process_time() - c0
    busy1, steal1 = cpu_counters()
    return Run(wall, ours / wall, max(0.0, busy1 - busy0 - ours) / wall, (steal1 - steal0) / wall)


def sanity_check(datas, paths, infos, buckets) -> list[str]:
    """(a), (b), (c) give the bucket shape on a spread of images (incl. rotated and PNG);
    also report how far apart their pixels are (mean |diff|, 0..255)."""
    n = len(datas)
    idx = set(np.linspace(0, n - 1, min(n, SANITY_IMAGES - 8)).astype(int).tolist())
    idx |= set([i for i in range(n) if infos[i].orientation != 1][:4])
    idx |= set([i for i in range(n) if infos[i].format == "png"][:4])
    idx = sorted(idx)
    diffs_ab, diffs_ac = [], []
    for i in idx:
        d, info = datas[i], infos[i]
        bh, bw = datago.nearest_bucket(*info.display_size, buckets)
        want = (bh, bw, 3)
        outs = {}
        for name, fn in (("a", variant_a), ("b", variant_b), ("c", variant_c)):
            try:
                outs[name] = fn(d, buckets)
            except Exception as exc:
                raise FileError(f"sanity: variant {name} failed on {paths[i]}: "
                                f"{type(exc).__name__}: {exc}") from exc
            if outs[name].shape != want or outs[name].dtype != np.uint8:
                raise AssertionError(f"sanity: variant {name} gave {outs[name].shape} "
                                     f"{outs[name].dtype} for {paths[i]}, want {want} uint8")
        a = outs["a"].astype(np.int16)
        diffs_ab.append(float(np.abs(outs["b"] - a).mean()))
        diffs_ac.append(float(np.abs(outs["c"] - a).mean()))
    worst_b = int(np.argmax(diffs_ab))
    worst_c = int(np.argmax(diffs_ac))
    return [f"sanity check: {len(idx)} images (incl. EXIF-rotated and PNG), (a) (b) (c) all "
            f"give the bucket shape (H, W, 3) uint8",
            f"mean |pixel diff| vs (a): (b) {np.mean(diffs_ab):.2f} (max {max(diffs_ab):.2f}, "
            f"{paths[idx[worst_b]]}), (c) {np.mean(diffs_ac):.2f} "
            f"(max {max(diffs_ac):.2f}, {paths[idx[worst_c]]})"]


def bench_size(size: int, datas, paths, infos, rounds: int, ex) -> tuple[list[str], list[str]]:
    """Time the variants for one bucket size; returns (notes, markdown table lines)."""
    ratio = DOWNSAMPLING.get(size, max(1, size // 32))
    buckets = datago.make_buckets(size, ratio, 0.5, 2.0)
    runs = {
        "a": lambda ds, ps: run_serial(variant_a, ds, ps, buckets),
        "b": lambda ds, ps: run_serial(variant_b, ds, ps, buckets),
        "c": lambda ds, ps: run_serial(variant_c, ds, ps, buckets),
        "d": lambda ds, ps: run_threaded(ex, ds, ps, buckets),
    }
    notes = [f"buckets: make_buckets({size}, {ratio}, 0.5, 2.0), {len(buckets)} buckets"]
    notes += sanity_check(datas, paths, infos, buckets)
    w = min(WARMUP_IMAGES, len(datas))
    for name in runs:                                         # warm-up
        runs[name](datas[:w], paths[:w])

    n = len(datas)
    names = [v[0] for v in VARIANTS]
    times = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(timed(lambda: runs[name](datas, paths)))
        print(f"  [{size}] round {r + 1}/{rounds} ({' '.join(order)}): "
              + "  ".join(f"{k} {n / times[k][-1].wall:.1f}" for k in names)
              + " img/s; cores ours/others/steal: "
              + "  ".join(f"{k} {times[k][-1].ours:.2f}/{times[k][-1].others:.2f}"
                          f"/{times[k][-1].steal:.2f}" for k in names), flush=True)

    mp = sum(i.width * i.height for i in infos) / 1e6
    lines = [f"| variant | img/s (median of {rounds}) | source MP/s | img/s min..max "
             f"| cores: ours (median) / others, steal (max) |",
             "|---|---:|---:|---:|---:|"]
    for name, desc in VARIANTS:
        rates = [n / t.wall for t in times[name]]
        med = statistics.median(rates)
        cpu = (statistics.median(t.ours for t in times[name]),
               max(t.others for t in times[name]), max(t.steal for t in times[name]))
        lines.append(f"| ({name}) {desc} | {med:.1f} | {med * mp / n:.1f} | "
                     f"{min(rates):.1f}..{max(rates):.1f} | "
                     f"{cpu[0]:.2f} / {cpu[1]:.2f} / {cpu[2]:.2f} |")
    lines += ["", "| ratio | median | min..max | target | result |", "|---|---:|---:|---:|---|"]
    for label, num, den, target in RATIOS:
        per_round = [times[den][r].wall / times[num][r].wall for r in range(rounds)]
        med = statistics.median(per_round)
        lines.append(f"| {label} | {med:.2f} | {min(per_round):.2f}..{max(per_round):.2f} | "
                     f">= {target} | {'PASS' if med >= target else 'FAIL'} |")
    return notes, lines


# --------------------------------------------------------------------------- setup

def load_corpus(root: Path, limit: int | None):
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if limit:
        paths = paths[:limit]
    if not paths:
        sys.exit(f"no .jpg/.jpeg/.png files under {root}")
    datas = [p.read_bytes() for p in paths]
    infos = []
    for p, d in zip(paths, datas):
        try:
            infos.append(datago.read_header(d))
        except Exception as exc:
            raise FileError(f"read_header failed on {p}: {type(exc).__name__}: {exc}") from exc
    return [str(p.relative_to(root)) for p in paths], datas, infos


def environment(paths, datas, infos) -> list[str]:
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    n = len(datas)
    mps = [i.width * i.height / 1e6 for i in infos]
    fmts = {f: sum(1 for i in infos if i.format == f) for f in sorted({i.format for i in infos})}
    rotated = sum(1 for i in infos if i.orientation != 1)
    return [
        f"- CPU: {cpu_model()}, {cores} logical cores ({usable} usable)",
        f"- Python {platform.python_version()}, numpy {np.__version__}, Pillow {PIL.__version__}, "
        f"cv2 {cv2.__version__} (cv2.setNumThreads(1): (b) is single-threaded), "
        f"PyTurboJPEG {version('PyTurboJPEG')}, torch {version('torch')}",
        f"- datago {datago.__version__}: libjpeg-turbo {_jpeg.version()}, libspng {_png.version()}, "
        f"resample SIMD {_resample.simd()}, filter {FILTER!r} for (c) and (d)",
        f"- corpus: {n} images ({', '.join(f'{v} {k}' for k, v in fmts.items())}; "
        f"{rotated} with EXIF orientation != 1), {sum(map(len, datas)) / 1e6:.1f} MB, "
        f"mean {statistics.mean(mps):.3f} MP (median {statistics.median(mps):.3f}, "
        f"max {max(mps):.2f})",
        "- (a) composites RGBA over grey 128 like datago; (b) PNG: cv2.IMREAD_COLOR drops alpha "
        "without compositing, orientation applied from datago.read_header",
        f"- (d): ThreadPoolExecutor({THREADS}), {CHUNK} images per task",
        "- cores: average CPUs busy during a timed pass with this process (ours), with other "
        "processes (others) and stolen by the hypervisor (steal), from /proc/stat; "
        "others/steal well above 0 mean the pass was disturbed",
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", type=Path, help="folder searched recursively for .jpg/.jpeg/.png")
    ap.add_argument("--limit", type=int, default=None, help="use the first N images (sorted)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per size (default 3)")
    ap.add_argument("--sizes", default="512,1024", help="bucket sizes (default 512,1024)")
    ap.add_argument("--out", type=Path, default=None, help="also write the tables to this .md")
    ap.add_argument("--filter", default=datago.image.DEFAULT_FILTER,
                    help=f"datago's resampling filter for (c) and (d) (default {datago.image.DEFAULT_FILTER})")
    args = ap.parse_args(argv)
    global FILTER
    FILTER = args.filter
    _resample.filter_id(FILTER)                 # fail early on a bad name
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")

    cv2.setNumThreads(1)
    t_start = time.perf_counter()
    paths, datas, infos = load_corpus(args.corpus, args.limit)
    md = ["## Environment", ""] + environment(paths, datas, infos)
    md += [f"- command: `python benchmarks/bench_core.py {' '.join(sys.argv[1:])}`", ""]
    print("\n".join(md), flush=True)

    with ThreadPoolExecutor(THREADS) as ex:
        for size in sizes:
            notes, table = bench_size(size, datas, paths, infos, args.rounds, ex)
            section = [f"## Buckets {size} ({len(datas)} images, {args.rounds} rounds)", ""]
            section += [f"- {s}" for s in notes] + [""] + table + [""]
            print("\n" + "\n".join(section), flush=True)
            md += section
    total = time.perf_counter() - t_start
    md.append(f"Total runtime: {total:.0f} s")
    print(md[-1])
    if args.out:
        args.out.write_text("\n".join(md) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
