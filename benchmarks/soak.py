#!/usr/bin/env python
"""Soak test: many epochs of a corpus through DatagoDataset + DataLoader with
worker processes; memory, file descriptors and threads must stay flat.

    python benchmarks/soak.py CORPUS [--samples 100000] [--workers 2] [--every 5000]
                              [--warmup 10000] [--batch 32] [--size 512] [--limit N]
                              [--no-persistent] [--out FILE.md]

The images are the files under CORPUS (``source_type: "file"``, the whole folder;
``--limit N`` caps the samples per epoch), buckets ``make_buckets(SIZE, SIZE/32,
0.5, 2.0)``, batches of ``--batch`` images of one bucket, ``random_sampling``
(each epoch reshuffled), ``DataLoader(batch_size=None, num_workers=W,
persistent_workers=True)`` (``--no-persistent``: fresh workers every epoch), one
epoch after the other (``set_epoch``) until ``--samples`` samples were consumed.
The loop touches every batch (sums a byte per image) and drops it.

Every ``--every`` samples (default 5,000) it records, for the whole process tree
(this process and its DataLoader workers, ``_common.process_tree``): the summed
RSS and PSS (``_common.tree_memory``), and per process its RSS, open file
descriptors (``/proc/PID/fd``) and threads (``Threads:`` in ``/proc/PID/status``).
A ``_common.TreeMemorySampler`` (every 200 ms) gives the peak tree RSS between
rows.

Targets (PASS/FAIL lines at the end): after the warm-up (``--warmup`` samples,
default 10,000), the tree's RSS stays within +-5% of its value at the first row
after the warm-up (``--rss-tolerance``); file descriptors and threads do not grow:
per process (and summed over the tree), the floor -- the lowest count seen after
any batch between two rows, counted after every batch -- has a median over the
last third of the rows after the warm-up no higher than its maximum over the
first third.  Counts that move with what is in flight (decode threads between
epochs) are not growth; a leak, which raises the floor, is.  Descriptors of
/dev/shm segments (torch keeps one per shared storage: a worker's pool of batch
buffers, which fills up as new bucket sizes come, and batches in flight) are
counted apart and must stay under ``SHM_BOUND`` per process.  Exit status 0 when
all pass.

Short check: ``--samples 3000 --every 200 --warmup 1000``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import (TreeMemorySampler, cpu_model, process_status,  # noqa: E402
                     process_tree, tree_memory, version)

MB = 1 << 20


SHM_BOUND = 48
"""Most /dev/shm descriptors a process may hold: a worker's pool keeps up to
``datago._shm.LIMIT`` (32) segments, and batches in flight hold a few more."""


def fd_count(pid: int) -> Optional[tuple]:
    """(descriptors other than shared memory, /dev/shm descriptors) of ``pid``:
    torch's file_descriptor sharing keeps one open per shared tensor storage."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    shm = 0
    for fd in names:
        try:
            shm += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/dev/shm/")
        except OSError:
            pass
    return len(names) - shm, shm


def thread_count(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def counts(roles: Dict[int, str]) -> Dict[str, tuple]:
    """role -> (fds but shared memory, shared-memory fds, threads) of every process
    in the tree now (cheap)."""
    out = {}
    for pid in process_tree():
        fds, thr = fd_count(pid), thread_count(pid)
        if fds is not None and thr is not None:
            out[roles.get(pid, f"pid {pid}")] = (*fds, thr)
    return out


class Window:
    """The lowest and highest fd and thread counts per process between two rows:
    batches in flight hold descriptors (shared-memory segments) and threads come
    and go with the epoch's phase, so a row keeps the range; a leak raises the
    floor."""

    def __init__(self):
        self.lo: Dict[str, list] = {}
        self.hi: Dict[str, list] = {}

    def add(self, now: Dict[str, tuple]) -> None:
        for role, v in now.items():
            lo, hi = self.lo.setdefault(role, list(v)), self.hi.setdefault(role, list(v))
            for i in range(len(v)):
                lo[i], hi[i] = min(lo[i], v[i]), max(hi[i], v[i])


def snapshot(roles: Dict[int, str], window: Window) -> dict:
    """The tree now: summed RSS/PSS, per process (role) its RSS and the fd and
    thread ranges of the window; tree sums of the floors."""
    rss, pss, n = tree_memory()
    window.add(counts(roles))
    procs = {}
    for pid in process_tree():
        st = process_status(pid)
        role = roles.get(pid, f"pid {pid}")
        if st is None or role not in window.lo:
            continue
        (flo, slo, tlo), (fhi, shi, thi) = window.lo[role], window.hi[role]
        procs[role] = {"pid": pid, "rss": st["VmRSS"], "fds": flo, "fds_max": fhi,
                       "shm": slo, "shm_max": shi, "threads": tlo, "threads_max": thi}
    return {"rss": rss, "pss": pss, "procs": n, "per": procs,
            "fds": sum(p["fds"] for p in procs.values()),
            "threads": sum(p["threads"] for p in procs.values())}


def _roles(it) -> Dict[int, str]:
    roles = {os.getpid(): "main"}
    for k, w in enumerate(getattr(it, "_workers", []) or []):
        if w.pid is not None:
            roles[w.pid] = f"w{k}"
    return roles


def run(corpus: Path, samples: int, workers: int, every: int, batch: int, size: int,
        limit: Optional[int], persistent: bool, log=print) -> dict:
    from torch.utils.data import DataLoader
    import datago
    cfg = {"source_type": "file",
           "source_config": {"root_path": str(corpus), "random_sampling": True},
           "image_config": {"crop_and_resize": True, "default_image_size": size,
                            "downsampling_ratio": max(1, size // 32), "min_aspect_ratio": 0.5,
                            "max_aspect_ratio": 2.0},
           "batch_size": batch, "seed": 0}
    if limit:
        cfg["limit"] = limit
    t_build = time.perf_counter()
    ds = datago.DatagoDataset(cfg)
    t_build = time.perf_counter() - t_build
    n_files = len(ds.listing)
    log(f"{n_files} samples listed, {len(ds)} batches per epoch "
        f"(dataset built in {t_build:.1f} s)")
    loader = DataLoader(ds, batch_size=None, num_workers=workers,
                        persistent_workers=persistent and workers > 0)
    rows: List[dict] = []
    seen = 0
    epoch = 0
    next_row = every
    t0 = time.perf_counter()
    touch = 0
    sampler = TreeMemorySampler(interval=0.2, pss_duty=0.02).start()
    window = Window()
    try:
        while seen < samples:
            ds.set_epoch(epoch)
            it = iter(loader)
            roles = _roles(it)
            for b in it:
                touch += int(b["image"][:, 0, 0, 0].sum())     # read the batch, then drop it
                seen += len(b["id"])
                del b
                window.add(counts(roles))
                if seen >= next_row or seen >= samples:
                    snap = snapshot(roles, window)
                    window = Window()
                    snap.update(samples=seen, epoch=epoch,
                                seconds=time.perf_counter() - t0,
                                peak_rss=max(sampler.peak_rss, snap["rss"]))
                    sampler.peak_rss = 0                  # the peak between rows
                    rows.append(snap)
                    per = "  ".join(f"{r}: {p['rss'] / MB:.0f} MB {p['fds']}-{p['fds_max']} fd "
                                    f"+{p['shm']}-{p['shm_max']} shm "
                                    f"{p['threads']}-{p['threads_max']} thr"
                                    for r, p in sorted(snap["per"].items()))
                    log(f"{seen:>8,} samples  epoch {epoch:>3}  {snap['seconds']:7.1f} s  "
                        f"tree RSS {snap['rss'] / MB:7.1f} MB  PSS {snap['pss'] / MB:7.1f} MB  "
                        f"| {per}")
                    next_row += every
                if seen >= samples:
                    break
            del it
            epoch += 1
    finally:
        sampler.stop()
        del loader
    stats = ds.stats()
    return {"rows": rows, "epochs": epoch, "seconds": time.perf_counter() - t0,
            "files": n_files, "stats": stats, "build_seconds": t_build,
            "sampler_error": sampler.error}


def checks(rows: List[dict], warmup: int, tol: float) -> List[tuple]:
    """[(name, ok, detail)]: RSS flat after the warm-up, no fd / thread growth."""
    after = [r for r in rows if r["samples"] >= warmup]
    out = []
    if len(after) < 2:
        return [("enough rows after the warm-up", False,
                 f"{len(after)} row(s) at or after {warmup:,} samples: run longer or lower --every")]
    ref = after[0]["rss"]
    lo, hi = min(r["rss"] for r in after), max(r["rss"] for r in after)
    worst = max(hi / ref - 1, 1 - lo / ref)
    out.append((f"tree RSS within +-{tol:.0%} after {warmup:,} samples", worst <= tol,
                f"reference {ref / MB:.1f} MB at {after[0]['samples']:,}; range "
                f"{lo / MB:.1f}..{hi / MB:.1f} MB ({(lo / ref - 1):+.1%}..{(hi / ref - 1):+.1%})"))
    third = max(1, len(after) // 3)
    first, last = after[:third], after[-third:]
    roles = sorted({k for r in after for k in r["per"] if k == "main" or k.startswith("w")})
    for metric in ("fds", "threads"):
        grew = []
        for role in roles + ["tree"]:
            def val(r):
                return r[metric] if role == "tree" else r["per"].get(role, {}).get(metric)
            a = [v for v in map(val, first) if v is not None]
            b = sorted(v for v in map(val, last) if v is not None)
            if a and b and b[len(b) // 2] > max(a):
                grew.append(f"{role}: at most {max(a)} in the first third, median "
                            f"{b[len(b) // 2]} in the last")
        end = after[-1]
        out.append((f"no {'file descriptor' if metric == 'fds' else 'thread'} growth"
                    + (" (shared-memory segments apart)" if metric == "fds" else ""), not grew,
                    "; ".join(grew) if grew else
                    f"tree {after[0][metric]} -> {end[metric]} "
                    f"({', '.join(f'{k} {v[metric]}' for k, v in sorted(end['per'].items()))})"))
    over = [f"{role} {r['per'][role]['shm_max']} at {r['samples']:,}" for r in after
             for role in roles if r["per"].get(role, {}).get("shm_max", 0) > SHM_BOUND]
    out.append((f"shared-memory descriptors bounded (at most {SHM_BOUND} per process)", not over,
                "; ".join(over[:5]) if over else "max " + ", ".join(
                    f"{role} {max(r['per'].get(role, {}).get('shm_max', 0) for r in after)}"
                    for role in roles)))
    return out


def report(res: dict, args, argv: List[str]) -> str:
    import datago
    rows = res["rows"]
    roles = sorted({k for r in rows for k in r["per"]}, key=lambda k: (k != "main", k))
    head = ["samples", "epoch", "s", "samples/s", "tree RSS MB", "tree PSS MB", "peak RSS MB",
            "procs"] + [f"{k} RSS MB" for k in roles] + [f"{k} fds" for k in roles] + \
        [f"{k} threads" for k in roles]
    md = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    prev_s, prev_t = 0, 0.0
    for r in rows:
        rate = (r["samples"] - prev_s) / max(1e-9, r["seconds"] - prev_t)
        prev_s, prev_t = r["samples"], r["seconds"]
        cells = [f"{r['samples']:,}", str(r["epoch"]), f"{r['seconds']:.0f}", f"{rate:.0f}",
                 f"{r['rss'] / MB:.1f}", f"{r['pss'] / MB:.1f}", f"{r['peak_rss'] / MB:.1f}",
                 str(r["procs"])]
        cells += [f"{r['per'][k]['rss'] / MB:.1f}" if k in r["per"] else "-" for k in roles]
        cells += [f"{r['per'][k]['fds']}-{r['per'][k]['fds_max']} "
                  f"+{r['per'][k]['shm']}-{r['per'][k]['shm_max']}" if k in r["per"] else "-"
                  for k in roles]
        cells += [f"{r['per'][k]['threads']}-{r['per'][k]['threads_max']}" if k in r["per"]
                  else "-" for k in roles]
        md.append("| " + " | ".join(cells) + " |")
    st = res["stats"]
    env = [f"- command: `python benchmarks/soak.py {' '.join(argv)}`",
           f"- {res['files']} files, {res['epochs']} epoch(s), {rows[-1]['samples'] if rows else 0:,} "
           f"samples in {res['seconds']:.0f} s; workers {args.workers} "
           f"({'persistent' if args.persistent else 'fresh each epoch'}), batch {args.batch}, "
           f"buckets {args.size}; skipped {st.get('skipped_total', 0)}",
           f"- datago {datago.__version__}, torch {torch.__version__}, Python "
           f"{sys.version.split()[0]}, {os.cpu_count()} CPUs ({cpu_model()}), "
           f"numpy {version('numpy')}",
           "- RSS sums VmRSS over the tree (shared pages counted in every process that maps "
           "them); PSS counts them once; peak RSS: the highest tree RSS the 200 ms sampler saw "
           "since the previous row; fds and threads: lowest-highest count after each batch since "
           "the previous row (the growth checks use the lowest); fds as `other +shm`: "
           "descriptors other than shared memory, then /dev/shm segments (torch keeps one open "
           "per shared storage: the worker's pool, batches in flight)"]
    return "\n".join(env + [""] + md)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", type=Path, help="image folder (source_type file)")
    ap.add_argument("--samples", type=int, default=100_000, help="samples in all (default 100,000)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    ap.add_argument("--every", "--interval", dest="every", type=int, default=5000,
                    help="samples between rows (default 5,000)")
    ap.add_argument("--warmup", type=int, default=10_000,
                    help="samples before the flatness reference (default 10,000)")
    ap.add_argument("--rss-tolerance", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=512, help="bucket size (default 512)")
    ap.add_argument("--limit", type=int, default=None, help="samples per epoch (default all)")
    ap.add_argument("--no-persistent", dest="persistent", action="store_false",
                    help="fresh workers every epoch")
    ap.add_argument("--out", type=Path, default=None, help="also write the report to this .md")
    args = ap.parse_args(argv)
    if not args.corpus.is_dir():
        ap.error(f"{args.corpus}: not a folder")
    res = run(args.corpus, args.samples, args.workers, args.every, args.batch, args.size,
              args.limit, args.persistent, log=lambda s: print(s, flush=True))
    md = report(res, args, argv)
    results = checks(res["rows"], args.warmup, args.rss_tolerance)
    lines = [f"{'PASS' if ok else 'FAIL'}: {name}: {detail}" for name, ok, detail in results]
    text = md + "\n\n" + "\n".join(f"- {line}" for line in lines)
    print("\n" + md + "\n")
    for line in lines:
        print(line)
    if res["sampler_error"]:
        print(f"(memory sampler: {res['sampler_error']})")
    if args.out:
        args.out.write_text(text + "\n")
        print(f"wrote {args.out}")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
