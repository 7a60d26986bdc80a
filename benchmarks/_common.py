"""Helpers shared by the benchmark scripts (run as ``python benchmarks/X.py``, so
this folder is on ``sys.path``)."""

from __future__ import annotations

import os
import platform
from importlib import metadata


def cover_size(w: int, h: int, bw: int, bh: int) -> tuple[int, int]:
    """Size of the cover resize of a w x h image for a bw x bh bucket."""
    scale = max(bw / w, bh / h)
    return max(bw, round(w * scale)), max(bh, round(h * scale))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_counters() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine, from /proc/stat (0, 0 if absent).

    (bench_loader's reference-datago helper has its own copy: it runs in the
    reference's venv, where this module is not importable.)"""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    v += [0] * (8 - len(v))
    user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK


# --------------------------------------------------------------------------- memory

def _children_of(pid: int) -> list[int] | None:
    """Direct children from /proc/<pid>/task/*/children (None where the kernel lacks
    CONFIG_PROC_CHILDREN)."""
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue                  # the thread ended meanwhile
            return None
        except (OSError, ValueError):
            continue
    return kids


def _parents() -> dict[int, int]:
    """pid -> ppid of every process, from /proc/*/stat."""
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            out[int(name)] = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return out


def process_tree(root: int | None = None) -> list[int]:
    """``root`` (default: this process) and all its descendants."""
    root = os.getpid() if root is None else root
    tree, todo = [root], [root]
    use_children = _children_of(root) is not None
    if use_children:
        while todo:
            kids = _children_of(todo.pop()) or []
            tree += kids
            todo += kids
        return tree
    by_parent: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        by_parent.setdefault(ppid, []).append(pid)
    while todo:
        kids = by_parent.get(todo.pop(), [])
        tree += kids
        todo += kids
    return tree


def _kb_field(path: str, key: str) -> int | None:
    """The ``key:  N kB`` line of a /proc file, in bytes (None if absent/unreadable)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


RSS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def process_status(pid: int) -> dict[str, int] | None:
    """VmRSS, RssAnon, RssFile, RssShmem of a process in bytes, from
    /proc/<pid>/status (None if it is gone or a zombie); cheap."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in RSS_FIELDS:
                    out[key] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return out if "VmRSS" in out else None


def process_rss(pid: int) -> int | None:
    """VmRSS of a process in bytes (None if it is gone or a zombie); cheap."""
    return _kb_field(f"/proc/{pid}/status", "VmRSS:")


def process_pss(pid: int) -> int | None:
    """Pss of a process in bytes, from /proc/<pid>/smaps_rollup.  Costly: the kernel
    walks the page tables, about 6 ms of CPU per 250 MB resident."""
    return _kb_field(f"/proc/{pid}/smaps_rollup", "Pss:")


def tree_memory(root: int | None = None) -> tuple[int, int, int]:
    """(sum of VmRSS, sum of Pss, number of processes) over ``root`` (default: this
    process) and its descendants, in bytes.  RSS counts a page mapped by k processes
    k times (the shared-memory batch tensors of DataLoader workers are mapped in the
    worker and in the main process, forked workers share the parent's pages), PSS
    counts it once in all (1/k in each process)."""
    rss = pss = n = 0
    for pid in process_tree(root):
        r = process_rss(pid)
        if r is None:
            continue
        p = process_pss(pid)
        rss += r
        pss += p if p is not None else r
        n += 1
    return rss, pss, n


class TreeMemorySampler:
    """A thread that samples the memory of a process tree (``root``, default this
    process, and its descendants) and keeps the peaks of the sums::

        with TreeMemorySampler() as mem:
            ...                                   # the measured work
        mem.peak_rss, mem.peak_pss                # bytes

    Every ``interval`` seconds it finds the tree and sums VmRSS (cheap).  PSS
    (smaps_rollup) costs the kernel a page-table walk, ~25 ms of CPU per GB
    resident -- every 50 ms it would take most of a core -- so it is summed at the
    first sample, then only while the RSS sum is within ``near`` of its peak so
    far, and no more often than keeps the PSS reads under ``pss_duty`` of one core
    (``pss_duty=1``: at every sample).  ``peak_pss`` is therefore the peak over the
    ``pss_reads`` samples that read it (a lower bound of the true peak, taken where
    RSS peaks).

    ``cpu``: the sampler thread's CPU seconds (it runs in this process, so
    ``getrusage(RUSAGE_SELF)`` includes them); ``samples``; ``start_rss`` /
    ``start_pss``: the sums at the first sample; ``peak_procs``; ``start_detail``
    / ``peak_detail``: ``{pid: process_status(pid)}`` at the first sample and at
    the sample of the RSS peak."""

    def __init__(self, interval: float = 0.05, pss_duty: float = 0.05, near: float = 0.9,
                 root: int | None = None):
        import threading
        self.interval = interval
        self.pss_duty = pss_duty
        self.near = near
        self.root = os.getpid() if root is None else root
        self.peak_rss = self.peak_pss = self.peak_procs = 0
        self.start_rss = self.start_pss = 0
        self.samples = self.pss_reads = 0
        self.cpu = 0.0
        self.start_detail: dict[int, dict[str, int]] = {}
        self.peak_detail: dict[int, dict[str, int]] = {}
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._guarded, name="tree-memory", daemon=True)

    def _guarded(self) -> None:
        try:
            self._run()
        except Exception as exc:          # noqa: BLE001 - reported, never kills the run
            self.error = f"{type(exc).__name__}: {exc}"

    def _step(self) -> None:
        """One sample (the first one reads PSS too)."""
        import time
        t = time.perf_counter()
        detail = {}
        for pid in process_tree(self.root):
            st = process_status(pid)
            if st is not None:
                detail[pid] = st
        rss = sum(st["VmRSS"] for st in detail.values())
        first = self.samples == 0
        if first:
            self.start_detail = detail
        if rss > self.peak_rss or first:
            self.peak_detail = detail
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_procs = max(self.peak_procs, len(detail))
        if first or (t >= self._next_pss and rss >= self.near * self.peak_rss):
            c = time.thread_time()
            pss = 0
            for pid in detail:
                p = process_pss(pid)
                pss += p if p is not None else 0
            cost = time.thread_time() - c
            self.peak_pss = max(self.peak_pss, pss)
            self.pss_reads += 1
            if first:
                self.start_rss, self.start_pss = rss, pss
            self._next_pss = time.perf_counter() + cost / max(self.pss_duty, 1e-6) - cost
        self.samples += 1

    def _run(self) -> None:
        import time
        c0 = time.thread_time()
        while not self._stop.wait(max(0.0, self.interval - (time.perf_counter() - self._t))):
            self._t = time.perf_counter()
            self._step()
        self._step()
        self.cpu += time.thread_time() - c0

    def start(self) -> "TreeMemorySampler":
        """Take the first sample here, in the caller (so that it sees the tree as it
        is now, before the caller goes on), then start the thread."""
        import time
        c0 = time.thread_time()
        self._t = time.perf_counter()
        self._next_pss = 0.0
        try:
            self._step()
        except Exception as exc:          # noqa: BLE001 - reported, never kills the run
            self.error = f"{type(exc).__name__}: {exc}"
        self.cpu = time.thread_time() - c0
        self._thread.start()
        return self

    def stop(self) -> "TreeMemorySampler":
        self._stop.set()
        self._thread.join()
        return self

    def __enter__(self) -> "TreeMemorySampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
