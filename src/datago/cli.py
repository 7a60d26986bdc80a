"""Command line.

``datago bench [ROOT]`` runs the data loader (DatagoDataset in a DataLoader) over
the images under ROOT with a progress bar and prints a summary: images/s, MB/s,
samples skipped by reason, and the bucket histogram.

``datago core [ROOT]`` measures decode-to-bucket throughput and prints a table
comparing datago, with one thread and with N threads, against a Pillow baseline
written the usual way (open, EXIF transpose, RGB, LANCZOS cover-resize, crop).

``datago`` alone runs both on a generated sample corpus (cached in ~/.cache/datago).

``datago convert SRC DST --format bins|webdataset|tfrecord`` rewrites a dataset
(see ``datago.convert``).

``datago serve ROOT`` serves a folder as a read-only, dataroom-compatible metadata
API plus its files (see ``datago.serve``).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from datago._progress import Progress as _Progress
from datago.buckets import make_buckets, nearest_bucket
from datago.sharding import available_cpus
from datago.errors import DecodeError
from datago.image import decode_to_bucket, read_header



def _sample_images() -> int:
    """Size of the generated sample corpus ($DATAGO_SAMPLE_IMAGES, default 200)."""
    try:
        return max(1, int(os.environ.get("DATAGO_SAMPLE_IMAGES", "200")))
    except ValueError:
        return 200


def _list_images(root: Path, limit: Optional[int]) -> List[Path]:
    """The samples' main images, as the folder source lists them (masks,
    additional images and sidecars are parts of a sample, not samples)."""
    from datago.sources.filesystem import FileListing
    listing = FileListing(str(root))
    n = min(len(listing), limit) if limit else len(listing)
    return [Path(listing.main_location(i)) for i in range(n)]


def _pillow_to_bucket(data: bytes, buckets) -> np.ndarray:
    from PIL import Image, ImageOps
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    w, h = im.size                                  # Pillow's (width, height)
    bh, bw = nearest_bucket(h, w, buckets)
    s = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * s)), max(bh, round(h * s))
    im = im.resize((rw, rh), Image.LANCZOS)
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return np.asarray(im.crop((left, top, left + bw, top + bh)))


def _timed(fn: Callable[[], int], min_seconds: float) -> tuple:
    """Run fn (returns images done) until min_seconds have passed; (images, seconds)."""
    done, t0 = 0, time.perf_counter()
    while True:
        done += fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return done, elapsed


def run_core(root: Optional[str], size: int, ratio: int, threads: int, limit: Optional[int],
             filter: str, seconds: float, out=None) -> int:
    out = out or sys.stdout
    if root is None:
        from datago.corpus import make_sample_corpus
        print("generating the sample corpus (first run only) ...", file=out, flush=True)
        root_path = make_sample_corpus(n=_sample_images())
    else:
        root_path = Path(root)
        if not root_path.is_dir():
            print(f"datago: {root} is not a directory", file=sys.stderr)
            return 2
    files = _list_images(root_path, limit)
    if not files:
        from datago.sources.filesystem import IMAGE_EXTENSIONS
        print(f"datago: no images ({', '.join('.' + e for e in IMAGE_EXTENSIONS)}) under "
              f"{root_path}", file=sys.stderr)
        return 2
    # the files are read as they are used (streamed), never all in memory at once
    datas, skipped, pixels, nbytes = [], {}, 0, 0
    for p in files:
        b = p.read_bytes()
        try:
            info = read_header(b)
        except DecodeError as e:
            skipped[str(e).split(":")[0]] = skipped.get(str(e).split(":")[0], 0) + 1
            continue
        datas.append(p)
        pixels += info.width * info.height
        nbytes += len(b)
    if not datas:
        print("datago: no decodable image", file=sys.stderr)
        return 1
    buckets = make_buckets(size, ratio, 0.5, 2.0)
    mb = nbytes / 1e6
    print(f"corpus: {root_path}  {len(datas)} images, {mb:.1f} MB, "
          f"{pixels / len(datas) / 1e6:.2f} MP mean"
          + (f", skipped {sum(skipped.values())} unreadable" if skipped else ""), file=out)
    print(f"buckets: {len(buckets)} ({size}/{ratio}, AR 0.5-2.0), filter={filter}, "
          f"{available_cpus()} CPUs available", file=out, flush=True)

    def ours_one() -> int:
        for p in datas:
            decode_to_bucket(p.read_bytes(), buckets, filter=filter)
        return len(datas)

    pool = ThreadPoolExecutor(threads)

    def ours_many() -> int:
        for _ in pool.map(lambda p: decode_to_bucket(p.read_bytes(), buckets, filter=filter),
                          datas, chunksize=8):
            pass
        return len(datas)

    def pillow() -> int:
        n = max(1, len(datas) // 4)          # the baseline is slow: a quarter is plenty
        for p in datas[:n]:
            _pillow_to_bucket(p.read_bytes(), buckets)
        return n

    rows = []
    try:
        for name, fn in (("Pillow (open, RGB, LANCZOS cover-resize, crop)", pillow),
                         ("datago decode_to_bucket, 1 thread", ours_one),
                         (f"datago decode_to_bucket, {threads} threads", ours_many)):
            n, secs = _timed(fn, seconds)
            rows.append((name, n / secs))
    finally:
        pool.shutdown()
    base = rows[0][1]
    width = max(len(r[0]) for r in rows)
    print(f"\n| {'variant':<{width}} | img/s  | MP/s  | vs Pillow |", file=out)
    print(f"|{'-' * (width + 2)}|--------|-------|-----------|", file=out)
    mp = pixels / len(datas) / 1e6
    for name, rate in rows:
        print(f"| {name:<{width}} | {rate:6.1f} | {rate * mp:5.0f} | {rate / base:8.2f}x |", file=out)
    print("\n(one noisy run on a shared machine: compare the ratios, see benchmarks/ for the "
          "controlled comparison)", file=out)
    return 0


def run_bench(root: Optional[str], size: int, ratio: int, batch: int, threads: Optional[int],
              workers: int, limit: Optional[int], out=None) -> int:
    out = out or sys.stdout
    from torch.utils.data import DataLoader
    from datago.config import DatagoConfig
    from datago.dataset import DatagoDataset
    from datago.errors import ConfigError
    if root is None:
        from datago.corpus import make_sample_corpus
        print("generating the sample corpus (first run only) ...", file=out, flush=True)
        root = str(make_sample_corpus(n=_sample_images()))
    try:
        cfg = DatagoConfig.from_dict({
            "source_type": "file", "source_config": {"root_path": root},
            "image_config": {"crop_and_resize": True, "default_image_size": size,
                             "downsampling_ratio": ratio, "min_aspect_ratio": 0.5,
                             "max_aspect_ratio": 2.0},
            "batch_size": batch, "num_threads": threads, "limit": limit})
    except ConfigError as e:
        print(f"datago: {e}", file=sys.stderr)
        return 2
    t_list = time.perf_counter()
    ds = DatagoDataset(cfg)
    t_list = time.perf_counter() - t_list
    try:
        n = len(ds) * batch                    # planned batches (the last one may be cut)
        if limit:
            n = min(n, limit)
    except TypeError:
        n = min(len(ds.listing), limit) if limit else len(ds.listing)
    print(f"{root}: {len(ds.listing)} samples listed in {t_list:.2f} s; buckets {size}/{ratio} "
          f"({len(ds.buckets)}), batch {batch}, {workers} DataLoader workers x "
          f"{threads or 'auto'} threads", file=out, flush=True)
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    hist: dict = {}
    bar = _Progress(n)
    t0 = time.perf_counter()
    for b in loader:
        k = len(b["id"])
        hist[b["bucket"]] = hist.get(b["bucket"], 0) + k
        bar.update(k)
    secs = time.perf_counter() - t0
    bar.close()
    st = ds.stats()
    done = st["samples"]
    print(f"\n{done} images in {secs:.2f} s: {done / secs:.1f} img/s, "
          f"{st['bytes_read'] / secs / 1e6:.1f} MB/s read, {st['batches']} batches", file=out)
    if st["padded"] or st["dropped_remainder"]:
        print(f"remainder policy: {st['padded']} repeats padded the last batch of a bucket, "
              f"{st['dropped_remainder']} dropped", file=out)
    skipped = st["skipped"]
    print("skipped: " + (", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none")
          + (f"; dropped by drop_last: {st['dropped_last']}" if st["dropped_last"] else ""),
          file=out)
    if st.get("index", {}).get("unreadable"):
        print(f"left out of the plan: {st['index']['unreadable']} files whose header could "
              "not be read", file=out)
    if st["listing"]["skipped"]:
        print("not listed: " + ", ".join(f"{k} {v}" for k, v in sorted(st["listing"]["skipped"].items())),
              file=out)
    print("\nbucket (H x W)   images", file=out)
    top = max(hist.values()) if hist else 1
    for (h, w), c in sorted(hist.items(), key=lambda kv: kv[0][1] / kv[0][0]):
        print(f"  {h:4d} x {w:<4d}  {c:6d}  {'#' * max(1, round(40 * c / top))}", file=out)
    return 0


def run_index(urls: Sequence[str], out_dir: Optional[str], reference_image_type: str,
              jobs: int = 8) -> int:
    """``datago index``: one index file per shard, ``jobs`` shards at a time; a
    summary line per shard, in the shards' order."""
    import json as _json
    from datago.errors import DatagoError
    from datago.sources.webdataset import expand_urls, write_index
    try:
        shards = expand_urls(list(urls))
    except DatagoError as e:
        print(f"datago: {e}", file=sys.stderr)
        return 2

    def one(shard: str) -> str:
        try:
            path = write_index(shard, out_dir, reference_image_type=reference_image_type)
            with open(path) as f:
                idx = _json.load(f)
        except (DatagoError, OSError) as e:
            return f"datago: {e}"
        n = len(idx["samples"])
        sized = sum(1 for s in idx["samples"] if s["width"] > 0)
        return f"{path}: {n} samples ({sized} with sizes), {idx['ignored']} members ignored"

    failed = 0
    with ThreadPoolExecutor(max(1, min(jobs, len(shards)))) as pool:
        for line in pool.map(one, shards):
            failed += line.startswith("datago: ")
            print(line, file=sys.stderr if line.startswith("datago: ") else sys.stdout,
                  flush=True)
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="datago", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    bench = sub.add_parser("bench", help="run the data loader over a folder, with a summary")
    bench.add_argument("root", nargs="?", help="folder of images (default: generated sample corpus)")
    bench.add_argument("--size", type=int, default=512, help="default_image_size (512)")
    bench.add_argument("--ratio", type=int, default=16, help="downsampling_ratio (16)")
    bench.add_argument("--batch", type=int, default=32, help="batch size (32)")
    bench.add_argument("--threads", type=int, default=None,
                       help="decode threads per worker (default: CPUs / workers)")
    bench.add_argument("--workers", type=int, default=0, help="DataLoader workers (0)")
    bench.add_argument("--limit", type=int, default=None, help="stop after N images")
    core = sub.add_parser("core", help="decode-to-bucket throughput vs Pillow")
    core.add_argument("root", nargs="?", help="folder of images (default: generated sample corpus)")
    core.add_argument("--size", type=int, default=512, help="default_image_size (512)")
    core.add_argument("--ratio", type=int, default=16, help="downsampling_ratio (16)")
    core.add_argument("--threads", type=int, default=available_cpus(), help="threads for the parallel row")
    core.add_argument("--limit", type=int, default=None, help="use the first N images")
    core.add_argument("--filter", default="triangle", help="resampling filter (triangle)")
    core.add_argument("--seconds", type=float, default=3.0, help="minimum time per row (3)")
    index = sub.add_parser("index", help="write the index of WebDataset tar shards "
                           "(member offsets, image sizes) for planned, resumable reading")
    index.add_argument("url", nargs="+", help="shards: paths, URLs, brace patterns, globs")
    index.add_argument("--out", default=None,
                       help="folder for the indexes (default: next to each local shard)")
    index.add_argument("--reference-image-type", default="jpg",
                       help="extension of the main image (jpg)")
    index.add_argument("--jobs", type=int, default=8,
                       help="shards indexed at once (8): each streams its shard")
    conv = sub.add_parser("convert", help="rewrite a dataset (folder, index, webdataset, zip, "
                          "tfrecord, bins, db) as split bins, WebDataset shards or TFRecords")
    conv.add_argument("src", help="a folder of images, a bins folder, or a JSON config file")
    conv.add_argument("dst", help="the output folder")
    conv.add_argument("--format", required=True, choices=("bins", "webdataset", "tfrecord"),
                      help="output format")
    conv.add_argument("--reencode", default=None,
                      help="re-encode main images: jpeg:Q, webp:Q or png (default: keep the bytes)")
    conv.add_argument("--workers", type=int, default=None,
                      help="reading processes (default: CPUs, at most 8; 1: none)")
    conv.add_argument("--splits", type=int, default=128, help="bins: number of bins (128)")
    conv.add_argument("--shard-size", type=int, default=1000,
                      help="webdataset/tfrecord: samples per shard (1000)")
    conv.add_argument("--limit", type=int, default=None, help="the first N samples only")
    conv.add_argument("--resume", action="store_true",
                      help="continue an interrupted conversion into DST")
    conv.add_argument("--overwrite", action="store_true",
                      help="replace a finished conversion already in DST")
    conv.add_argument("--quiet", action="store_true", help="no progress bar")
    srv = sub.add_parser("serve", help="serve a folder (or a config's source) as a read-only, "
                         "dataroom-compatible metadata API plus its files")
    srv.add_argument("root", nargs="?", help="folder of images (or give --config)")
    srv.add_argument("--config", default=None,
                     help="a datago config (JSON) whose source lists samples (index, webdataset)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (8000; 0: any free port)")
    srv.add_argument("--token", default=None,
                     help="API token (default $DATAGO_SERVE_TOKEN; none: open, with a warning)")
    srv.add_argument("--source", default=None,
                     help="source name (default: the folder's name, or the config file's stem)")
    srv.add_argument("--page-size-max", type=int, default=2000, help="largest page_size (2000)")
    srv.add_argument("--cache-dir", default=None, help="folder of the image sizes cache")
    args = parser.parse_args(argv)
    if args.command == "serve":
        if (args.root is None) == (args.config is None):
            parser.error("serve: give a folder or --config FILE.json (one of them)")
        if args.page_size_max < 1:
            parser.error("--page-size-max must be at least 1")
        if not 0 <= args.port <= 65535:
            parser.error("--port must be in [0, 65535]")
        from datago.serve import serve
        return serve(args.root, config=args.config, host=args.host, port=args.port,
                     token=args.token, source=args.source, page_size_max=args.page_size_max,
                     cache_dir=args.cache_dir)
    if args.command == "index":
        if args.jobs < 1:
            parser.error("--jobs must be >= 1")
        return run_index(args.url, args.out, args.reference_image_type, args.jobs)
    if args.command == "convert":
        from datago.convert import run_convert
        return run_convert(args)
    if args.command is None:
        rc = run_bench(None, 512, 16, 32, None, 0, None)
        if rc == 0:
            print("\n--- decode-to-bucket, datago vs Pillow ---", flush=True)
            rc = run_core(None, 512, 16, available_cpus(), None, "triangle", 3.0)
        return rc
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.command == "bench":
        if args.workers < 0:
            parser.error("--workers must be >= 0")
        return run_bench(args.root, args.size, args.ratio, args.batch, args.threads,
                         args.workers, args.limit)
    return run_core(args.root, args.size, args.ratio, args.threads, args.limit, args.filter,
                    args.seconds)


if __name__ == "__main__":      # pragma: no cover
    sys.exit(main())
