"""Benchmark: listing a big folder tree with FileListing vs glob and os.walk.

    python benchmarks/bench_listing.py [--files 1000000] [--dir /tmp/listing_tree] [--keep]

Generates ``--files`` empty images (``--per-dir`` per folder, named
``d0000/img_000123.jpg``; every 10th one also has a ``.txt`` sidecar), then, for
each method, in a fresh Python process:

* ``cold``: first call in that process (the OS dentry/inode cache is whatever the
  generation or previous runs left: usually warm; pass ``--drop-caches`` as root to
  empty it before each method);
* ``warm``: a second call in the same process;
* ``peak RSS``: ``ru_maxrss`` after the first call minus the RSS just before it
  (imports done, ``gc.collect()``ed);
* ``tracemalloc``: peak and retained Python allocations of a third call;
* bytes per sample: retained bytes (tracemalloc) / number of image samples; for
  FileListing also its own ``memory_bytes()`` estimate.

Methods: ``FileListing(root)``; ``sorted(glob.glob(root + "/**/*", recursive=True))``
(every path, folders and sidecars included, as glob returns them); ``os.walk``
collecting a sorted list of relative file paths.  The tree is deleted at the end
unless ``--keep``; an existing tree with the right manifest is reused.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

METHODS = ("FileListing", "glob", "os.walk")


# --------------------------------------------------------------------- tree
def _manifest_path(root: str) -> str:
    return root.rstrip("/") + ".manifest.json"


def _tree_spec(n_files: int, per_dir: int, sidecar_every: int) -> dict:
    return {"files": n_files, "per_dir": per_dir, "sidecar_every": sidecar_every,
            "dirs": (n_files + per_dir - 1) // per_dir}


def _make_dir(args) -> int:
    root, d, first, last, sidecar_every = args
    path = os.path.join(root, f"d{d:04d}")
    os.makedirs(path, exist_ok=True)
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    flags = os.O_CREAT | os.O_WRONLY | os.O_TRUNC
    made = 0
    try:
        for i in range(first, last):
            os.close(os.open(f"img_{i:07d}.jpg", flags, 0o644, dir_fd=dfd))
            made += 1
            if i % sidecar_every == 0:
                os.close(os.open(f"img_{i:07d}.txt", flags, 0o644, dir_fd=dfd))
                made += 1
    finally:
        os.close(dfd)
    return made


def ensure_tree(root: str, spec: dict, jobs: int) -> float:
    """Create the tree unless a complete one with the same spec exists; seconds spent."""
    mp = _manifest_path(root)
    if os.path.isdir(root) and os.path.exists(mp):
        with open(mp) as f:
            if json.load(f) == spec:
                print(f"reusing {root} ({spec['files']} images)", flush=True)
                return 0.0
    if os.path.exists(root):
        shutil.rmtree(root)
    if os.path.exists(mp):
        os.remove(mp)
    os.makedirs(root)
    n, per = spec["files"], spec["per_dir"]
    tasks = [(root, d, d * per, min(n, (d + 1) * per), spec["sidecar_every"])
             for d in range(spec["dirs"])]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(jobs) as ex:
        made = sum(ex.map(_make_dir, tasks, chunksize=8))
    dt = time.perf_counter() - t0
    with open(mp, "w") as f:
        json.dump(spec, f)
    print(f"created {made} files in {spec['dirs']} folders under {root} in {dt:.1f} s",
          flush=True)
    return dt


# --------------------------------------------------------------------- methods
def run_method(method: str, root: str):
    """(result, number of image samples, extra info) for one call of a method."""
    if method == "FileListing":
        from datago.sources.filesystem import FileListing
        listing = FileListing(root)
        return listing, len(listing), {"memory_bytes": listing.memory_bytes(),
                                       "skipped": dict(listing.skipped)}
    if method == "glob":
        import glob
        paths = sorted(glob.glob(root + "/**/*", recursive=True))
        return paths, sum(p.endswith(".jpg") for p in paths), {"entries": len(paths)}
    if method == "os.walk":
        out = []
        n = len(root) + 1
        for dirpath, _dirs, files in os.walk(root):
            rel = dirpath[n:]
            for name in files:
                out.append(f"{rel}/{name}" if rel else name)
        out.sort()
        return out, sum(p.endswith(".jpg") for p in out), {"entries": len(out)}
    raise ValueError(method)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(method: str, root: str, verify: bool) -> dict:
    """Runs in a fresh process: timings, RSS and tracemalloc of one method."""
    import tracemalloc
    if method == "FileListing":
        import datago.sources.filesystem  # noqa: F401  (imports outside the measurement)
    import glob  # noqa: F401
    gc.collect()
    rss_before = _rss_bytes()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    t0 = time.perf_counter()
    result, n, info = run_method(method, root)
    cold = time.perf_counter() - t0
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss_retained = _rss_bytes() - rss_before
    ids_sample = None
    if verify and method == "FileListing":
        ids_sample = list(result.ids())
    del result
    gc.collect()

    t0 = time.perf_counter()
    result, n2, _ = run_method(method, root)
    warm = time.perf_counter() - t0
    del result
    gc.collect()

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    result, _, _ = run_method(method, root)
    cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del result

    out = {"method": method, "samples": n, "cold_s": cold, "warm_s": warm,
           "peak_rss_growth": maxrss_after - rss_before,
           "peak_rss_exact": maxrss_after > maxrss_before,
           "rss_retained": rss_retained,
           "tm_peak": peak - base, "tm_retained": cur - base, **info}
    assert n == n2
    if ids_sample is not None:
        walk, _, _ = run_method("os.walk", root)
        expected = [p for p in walk if p.endswith(".jpg")]
        out["ids_match_sorted_walk"] = ids_sample == expected
    return out


def measure_in_subprocess(method: str, root: str, verify: bool, drop_caches: bool) -> dict:
    if drop_caches:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    cmd = [sys.executable, os.path.abspath(__file__), "--_measure", method, "--dir", root]
    if verify:
        cmd.append("--verify")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{method} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------- report
def table(rows, n_files: int) -> str:
    mb = 1024 * 1024
    lines = ["| method | items returned | cold s | warm s | peak RSS growth MB | "
             "tracemalloc peak MB | retained MB | bytes / sample | memory_bytes() / sample |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        items = r.get("entries", r["samples"])
        peak = f"{r['peak_rss_growth'] / mb:.1f}" + ("" if r["peak_rss_exact"] else " (<=)")
        own = f"{r['memory_bytes'] / r['samples']:.1f}" if "memory_bytes" in r else "-"
        lines.append(
            f"| {r['method']} | {items:,} | {r['cold_s']:.2f} | {r['warm_s']:.2f} | {peak} | "
            f"{r['tm_peak'] / mb:.1f} | {r['tm_retained'] / mb:.1f} | "
            f"{r['tm_retained'] / n_files:.1f} | {own} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=1_000_000, help="number of images")
    ap.add_argument("--per-dir", type=int, default=1000, help="images per folder")
    ap.add_argument("--sidecar-every", type=int, default=10,
                    help="every Nth image gets a .txt sidecar (10: 10%%)")
    ap.add_argument("--dir", default="/tmp/listing_tree", help="where the tree is generated")
    ap.add_argument("--keep", action="store_true", help="keep the tree for the next run")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="creation processes")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-verify", action="store_true",
                    help="skip checking FileListing ids against a sorted os.walk")
    ap.add_argument("--drop-caches", action="store_true",
                    help="echo 3 > /proc/sys/vm/drop_caches before each method (root)")
    ap.add_argument("--_measure", help=argparse.SUPPRESS)
    ap.add_argument("--verify", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    root = os.path.abspath(a.dir)

    if a._measure:
        print(json.dumps(measure(a._measure, root, a.verify)))
        return

    spec = _tree_spec(a.files, a.per_dir, a.sidecar_every)
    ensure_tree(root, spec, a.jobs)
    n_sidecars = len(range(0, a.files, a.sidecar_every))
    try:
        rows = []
        for m in a.methods.split(","):
            r = measure_in_subprocess(m, root, not a.no_verify, a.drop_caches)
            print(f"  {m}: {r['cold_s']:.2f} s cold, {r['warm_s']:.2f} s warm", flush=True)
            rows.append(r)
        print()
        print(f"{a.files:,} images + {n_sidecars:,} .txt sidecars in {spec['dirs']:,} folders; "
              f"python {sys.version.split()[0]}; {os.cpu_count()} CPUs")
        print()
        print(table(rows, a.files))
        print()
        for r in rows:
            if r["method"] == "FileListing":
                assert r["samples"] == a.files, r
                print(f"FileListing: {r['samples']:,} samples, skipped {r['skipped']}, "
                      f"memory_bytes() = {r['memory_bytes']:,}"
                      + (f", ids == sorted os.walk: {r['ids_match_sorted_walk']}"
                         if "ids_match_sorted_walk" in r else ""))
        print("bytes / sample = tracemalloc retained / images.  peak RSS growth = ru_maxrss "
              "after the first call - RSS just before it; '(<=)': the call stayed below the "
              "process's earlier peak (imports), so the value is only an upper bound.")
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
            if os.path.exists(_manifest_path(root)):
                os.remove(_manifest_path(root))
            print(f"removed {root}")


if __name__ == "__main__":
    main()
