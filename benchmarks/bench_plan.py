"""Benchmark: planning an epoch with ``datago.plan.plan_epoch`` -- time and memory
at a million samples, and what the remainder policy costs on a real corpus.

    python benchmarks/bench_plan.py [--n 1000000] [--repeats 3]
                                    [--corpus DIR] [--skip-million]

Part 1, "Planning a million": ``--n`` synthetic samples -- random uint64 id hashes
and bucket labels over the 27 buckets of ``make_buckets(512, 16, 0.5, 2.0)``,
drawn from a skewed aspect-ratio mix (mostly 3:2, 4:3, 2:3, 1:1, 16:9 photos with a
little crop jitter, plus a broad lognormal tail), mapped to the nearest bucket in
log aspect ratio like ``nearest_bucket``.  ``plan_epoch`` runs for world size 8,
batch 32 with ``remainder="pad"`` and ``sync_buckets=True`` (the defaults; the
headline), and also with ``sync_buckets=False`` and ``remainder="drop"``.  Each
configuration is measured in its own fresh Python process (data generated and
datago imported first, then ``gc.collect()``):

* ``RSS growth``: ``VmHWM`` after the first call minus ``VmRSS`` just before it,
  the peak having been reset to the current RSS through ``/proc/self/clear_refs``
  (``5``); where that is refused the value is marked ``(<=)``: an upper bound
  against the process's earlier peak;
* ``wall s``: best of ``--repeats`` further calls (the first call, which pays page
  faults on fresh memory, is shown separately);
* ``tracemalloc peak``: the peak of Python and NumPy allocations during one more
  call (tracemalloc started right before it, so the inputs are not counted);
* ``plan MB``: the arrays of the returned ``EpochPlan``.

Targets: under 2 s and under 100 MB extra (both the RSS growth and the
tracemalloc peak); a PASS/FAIL row per configuration.

Part 2, "What the remainder policy costs" (only with ``--corpus``): a
``DatagoDataset`` is built on the folder once per batch size (the header scan is
cached on disk, so the second construction is fast), then ``plan_epoch`` is called
directly on the dataset's readable samples (``ds._hashes[ds._items]``,
``ds._bucket_of[ds._items]``, 27 buckets, seed 0, epoch 0) for world sizes 1, 8, 64,
batch sizes 16, 32, ``remainder`` pad/drop and ``sync_buckets`` on/off.  Per row:
steps per rank, samples delivered per epoch (all ranks, repeats included),
distinct samples delivered, samples repeated (``plan.num_padded()``) and dropped
(``plan.dropped.sum()``), the last two also as a % of the readable corpus.
Unreadable headers never enter a plan and are counted separately.
``sync_buckets=False`` with ``pad`` raises ``ValueError`` when a rank gets no
sample at all (fewer samples than ranks in every bucket): shown as ``n/a``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from _common import cpu_model, version

MB = 1024 * 1024
TARGET_S = 2.0
TARGET_MB = 100.0

# (world_size, batch_size, remainder, sync_buckets); the first one is the headline
MILLION_CONFIGS = [
    (8, 32, "pad", True),
    (8, 32, "pad", False),
    (8, 32, "drop", True),
    (8, 32, "drop", False),
]

# part 2
WORLD_SIZES = (1, 8, 64)
BATCH_SIZES = (16, 32)
REMAINDERS = ("pad", "drop")
SYNCS = (True, False)

# aspect ratio (w / h) mix of the synthetic corpus: (ratio, share); the rest is
# a broad lognormal tail around 1:1
AR_MIX = [(3 / 2, 0.30), (4 / 3, 0.14), (2 / 3, 0.15), (3 / 4, 0.08), (1.0, 0.10),
          (16 / 9, 0.08), (9 / 16, 0.03)]
TAIL_SIGMA = 0.45
JITTER_SIGMA = 0.03


# --------------------------------------------------------------------- synthetic data
def synthetic(n: int, seed: int = 0):
    """(hashes uint64 (n,), bucket_of int64 (n,), buckets): a skewed mix of
    aspect ratios mapped to the nearest of the 27 buckets in log aspect ratio."""
    from datago.buckets import make_buckets
    buckets = make_buckets(512, 16, 0.5, 2.0)
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64,
                          endpoint=True)
    ratios = np.array([r for r, _ in AR_MIX] + [1.0])
    shares = np.array([s for _, s in AR_MIX])
    shares = np.append(shares, 1.0 - shares.sum())
    kind = rng.choice(len(ratios), size=n, p=shares)
    sigma = np.where(kind == len(ratios) - 1, TAIL_SIGMA, JITTER_SIGMA)
    log_ar = np.log(ratios[kind]) + rng.standard_normal(n) * sigma
    del kind, sigma
    # nearest bucket in log aspect ratio (nearest_bucket's default metric); ties
    # (measure zero here) would go to the wider bucket there, to the narrower here
    order = sorted(range(len(buckets)), key=lambda i: buckets[i].aspect_ratio)
    log_b = np.log([buckets[i].aspect_ratio for i in order])
    mid = (log_b[1:] + log_b[:-1]) / 2
    pos = np.searchsorted(mid, log_ar)                     # index into `order`
    bucket_of = np.asarray(order, dtype=np.int64)[pos]
    return hashes, bucket_of, buckets


# --------------------------------------------------------------------- part 1 (child)
def _status_kb(*keys: str) -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(n: int, world_size: int, batch_size: int, remainder: str, sync: bool,
            repeats: int, seed: int) -> dict:
    """Runs in a fresh process: RSS growth, wall times and tracemalloc of plan_epoch."""
    import tracemalloc

    from datago.plan import plan_epoch

    hashes, bucket_of, buckets = synthetic(n, seed)
    kw = dict(num_buckets=len(buckets), seed=0, epoch=0, world_size=world_size,
              batch_size=batch_size, remainder=remainder, sync_buckets=sync)
    counts = np.bincount(bucket_of, minlength=len(buckets))
    gc.collect()

    # 1. peak RSS growth of the first call in this process
    exact = _reset_peak()
    before = _status_kb("VmRSS", "VmHWM")
    t0 = time.perf_counter()
    plan = plan_epoch(hashes, bucket_of, **kw)
    first = time.perf_counter() - t0
    after = _status_kb("VmRSS", "VmHWM")
    base = before["VmRSS"] if exact else max(before["VmRSS"], before["VmHWM"])
    info = {"num_steps": plan.num_steps, "num_padded": plan.num_padded(),
            "dropped": int(plan.dropped.sum()),
            "delivered": int(plan.valid().sum()),
            "plan_bytes": sum(a.nbytes for a in (plan.bucket, plan.samples, plan.padded,
                                                 plan.count, plan.dropped))}
    del plan
    gc.collect()

    # 2. wall time, best of `repeats`
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        plan = plan_epoch(hashes, bucket_of, **kw)
        times.append(time.perf_counter() - t0)
        del plan
        gc.collect()

    # 3. tracemalloc peak (inputs allocated before start are not traced)
    tracemalloc.start()
    tracemalloc.reset_peak()
    t_base = tracemalloc.get_traced_memory()[0]
    plan = plan_epoch(hashes, bucket_of, **kw)
    cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del plan

    return {"n": n, "world_size": world_size, "batch_size": batch_size,
            "remainder": remainder, "sync": sync, "first_s": first, "times": times,
            "best_s": min(times), "rss_growth": after["VmHWM"] - base,
            "rss_retained": after["VmRSS"] - before["VmRSS"], "rss_exact": exact,
            "tm_peak": peak - t_base, "tm_retained": cur - t_base,
            "bucket_counts": counts.tolist(), **info}


def measure_in_subprocess(n: int, cfg: tuple, repeats: int, seed: int) -> dict:
    w, b, rem, sync = cfg
    cmd = [sys.executable, os.path.abspath(__file__), "--_measure",
           json.dumps([n, w, b, rem, sync, repeats, seed])]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"measurement {cfg} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def million_tables(rows: list) -> str:
    lines = ["| ranks | batch | remainder | sync_buckets | steps / rank | wall s (best) | "
             "first call s | RSS growth MB | tracemalloc peak MB | plan MB | "
             "repeated | dropped |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rss = f"{r['rss_growth'] / MB:.1f}" + ("" if r["rss_exact"] else " (<=)")
        lines.append(
            f"| {r['world_size']} | {r['batch_size']} | {r['remainder']} | "
            f"{'on' if r['sync'] else 'off'} | {r['num_steps']:,} | {r['best_s']:.3f} | "
            f"{r['first_s']:.3f} | {rss} | {r['tm_peak'] / MB:.1f} | "
            f"{r['plan_bytes'] / MB:.1f} | {r['num_padded']:,} | {r['dropped']:,} |")
    lines += ["", "| check (ranks 8, batch 32) | value | target | result |",
              "|---|---:|---:|---|"]
    for i, r in enumerate(rows):
        name = (f"{r['remainder']}, sync {'on' if r['sync'] else 'off'}"
                + (" (headline)" if i == 0 else ""))
        mem = max(r["rss_growth"], r["tm_peak"]) / MB
        lines.append(f"| {name}: wall s | {r['best_s']:.3f} | < {TARGET_S:g} | "
                     f"{'PASS' if r['best_s'] < TARGET_S else 'FAIL'} |")
        lines.append(f"| {name}: extra MB (max of RSS growth, tracemalloc peak) | {mem:.1f} | "
                     f"< {TARGET_MB:g} | {'PASS' if mem < TARGET_MB else 'FAIL'} |")
    return "\n".join(lines)


def part_million(n: int, repeats: int, seed: int) -> None:
    print(f"## Planning a million ({n:,} synthetic samples)\n", flush=True)
    rows = []
    for cfg in MILLION_CONFIGS:
        r = measure_in_subprocess(n, cfg, repeats, seed)
        print(f"  ranks {cfg[0]}, batch {cfg[1]}, {cfg[2]}, sync {'on' if cfg[3] else 'off'}: "
              f"{r['best_s']:.3f} s, RSS +{r['rss_growth'] / MB:.1f} MB, "
              f"tracemalloc {r['tm_peak'] / MB:.1f} MB", flush=True)
        rows.append(r)
    counts = np.array(rows[0]["bucket_counts"])
    share = np.sort(counts)[::-1] / counts.sum() * 100
    print()
    print(f"buckets: {np.count_nonzero(counts)} of {len(counts)} used; largest "
          f"{share[0]:.1f}%, top 3 {share[:3].sum():.1f}%, smallest "
          f"{counts.min():,} samples ({share[-1]:.3f}%)")
    print()
    print(million_tables(rows))
    print()
    print(f"wall s = best of {repeats} calls after the first; first call s = the call "
          "measured for RSS (first in its process: page faults on fresh memory).  RSS "
          "growth = VmHWM after the first call - VmRSS before it, VmHWM reset just before "
          "(/proc/self/clear_refs); '(<=)': reset refused, upper bound.  tracemalloc "
          "peak: one more call, inputs not counted.  plan MB: arrays of the EpochPlan.")
    print()


# --------------------------------------------------------------------- part 2
def corpus_config(root: str, batch_size: int) -> dict:
    return {"source_config": {"root_path": root},
            "image_config": {"crop_and_resize": True, "default_image_size": 512,
                             "downsampling_ratio": 16, "min_aspect_ratio": 0.5,
                             "max_aspect_ratio": 2.0},
            "batch_size": batch_size}


def _pct(v: int, n: int) -> str:
    return f"{v / n * 100:.2f}%" if n else "-"


def part_corpus(root: str) -> None:
    from datago.dataset import DatagoDataset
    from datago.plan import plan_epoch

    print(f"## What the remainder policy costs ({root})\n", flush=True)
    datasets = {}
    for b in BATCH_SIZES:
        t0 = time.perf_counter()
        ds = DatagoDataset(corpus_config(root, b))
        dt = time.perf_counter() - t0
        idx = ds.stats().get("index", {})
        print(f"  batch {b}: DatagoDataset built in {dt:.2f} s (headers scanned "
              f"{idx.get('scanned', '?')}, cached {idx.get('cached', '?')})", flush=True)
        datasets[b] = ds
    ds0 = datasets[BATCH_SIZES[0]]
    st = ds0.stats()
    listed = st["listing"]["samples"]
    unreadable = st.get("index", {}).get("unreadable", 0)
    n = len(ds0._items)
    counts = np.bincount(ds0._bucket_of[ds0._items], minlength=len(ds0.buckets))
    print()
    print(f"corpus: {listed:,} images listed, {unreadable:,} unreadable headers "
          f"({_pct(unreadable, listed)} of the listing; in no plan), {n:,} planned; "
          f"{np.count_nonzero(counts)} of {len(ds0.buckets)} buckets used, largest "
          f"{counts.max():,} samples, smallest used {counts[counts > 0].min():,}")
    print()

    lines = ["| ranks | batch | remainder | sync_buckets | steps / rank | delivered (all ranks) | "
             "distinct | repeated | repeated % | dropped | dropped % |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    checks = []
    for w in WORLD_SIZES:
        for b in BATCH_SIZES:
            ds = datasets[b]
            hashes = ds._hashes[ds._items]
            bucket_of = ds._bucket_of[ds._items]
            for rem in REMAINDERS:
                for sync in SYNCS:
                    head = f"| {w} | {b} | {rem} | {'on' if sync else 'off'} |"
                    try:
                        p = plan_epoch(hashes, bucket_of, num_buckets=len(ds.buckets),
                                       seed=0, epoch=0, world_size=w, batch_size=b,
                                       remainder=rem, sync_buckets=sync)
                    except ValueError as e:
                        lines.append(head + " n/a |" * 7)
                        checks.append(f"ranks {w}, batch {b}, {rem}, sync "
                                      f"{'on' if sync else 'off'}: n/a ({e})")
                        continue
                    valid = p.valid()
                    delivered = int(valid.sum())
                    distinct = len(np.unique(p.samples[valid]))
                    rep, drop = p.num_padded(), int(p.dropped.sum())
                    # every readable sample is delivered or dropped, never both
                    assert distinct + drop == n, (w, b, rem, sync, distinct, drop, n)
                    assert delivered == distinct + rep, (w, b, rem, sync, delivered, rep)
                    lines.append(f"{head} {p.num_steps:,} | {delivered:,} | {distinct:,} | "
                                 f"{rep:,} | {_pct(rep, n)} | {drop:,} | {_pct(drop, n)} |")
                    if rem == ds.config.loader.remainder and sync == ds.config.loader.sync_buckets:
                        checks.append(_agrees(ds, w, p))
    print("\n".join(lines))
    print()
    print(f"% of the {n:,} planned (readable) samples.  delivered = slots filled per epoch "
          "over all ranks = distinct + repeated; distinct + dropped = planned.  "
          "n/a: sync_buckets off with pad needs a sample on every rank.")
    for c in checks:
        print(f"  {c}")
    print()


def _agrees(ds, w: int, p) -> str:
    """Cross-check against the dataset's own plan (its config: seed, shuffle)."""
    try:
        q = ds.plan(epoch=0, world_size=w)
    except Exception as e:                               # noqa: BLE001 (report only)
        return f"ds.plan(0, {w}) failed: {type(e).__name__}: {e}"
    same = (q.num_steps, q.num_padded(), int(q.dropped.sum())) == \
        (p.num_steps, p.num_padded(), int(p.dropped.sum()))
    return (f"ranks {w}, batch {p.batch_size}: ds.plan() (its config: "
            f"{ds.config.loader.remainder}, sync {ds.config.loader.sync_buckets}) "
            f"{'agrees' if same else 'DISAGREES'} on steps, repeated, dropped")


# --------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="synthetic samples (part 1)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls; the best is kept")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    ap.add_argument("--corpus", help="image folder for part 2 (skipped without it)")
    ap.add_argument("--skip-million", action="store_true", help="skip part 1")
    ap.add_argument("--_measure", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a._measure:
        n, w, b, rem, sync, repeats, seed = json.loads(a._measure)
        print(json.dumps(measure(n, w, b, rem, sync, repeats, seed)))
        return

    print(f"python {platform.python_version()}, numpy {version('numpy')}, "
          f"datago {version('datago')}; {cpu_model()}, {os.cpu_count()} CPUs\n", flush=True)
    if not a.skip_million:
        part_million(a.n, a.repeats, a.seed)
    if a.corpus:
        part_corpus(os.path.abspath(a.corpus))


if __name__ == "__main__":
    main()
