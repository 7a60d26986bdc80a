"""Helpers shared by the benchmark scripts (run as ``python benchmarks/X.py``, so
this folder is on ``sys.path``): the corpus, CPU and memory accounting, the
measurement of one timed pass (``measure_pass``), and helper scripts run by
another venv's Python (``VenvHelper``).  What the scripts print is formatted by
``_report``."""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, List, NamedTuple, Optional, Tuple


# --------------------------------------------------------------------------- corpus

EXTENSIONS = {".jpg", ".jpeg", ".png"}


def find_images(root: Path) -> List[Path]:
    """The .jpg/.jpeg/.png files under ``root`` (recursive; hidden files and folders
    skipped), unsorted: the scripts sort them their own way (paths or strings)."""
    return [p for p in root.rglob("*")
            if p.is_file() and p.suffix.lower() in EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(root).parts)]


def link_view(folder: Path, root: Path, rel: Iterable[str]) -> Path:
    """A folder of symlinks to ``root / r`` for every ``r`` in ``rel``, at the same
    relative paths (so DatagoDataset's sample ids are the same)."""
    for r in rel:
        link = folder / r
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(root / r, link)
    return folder


def client_config(root: Path, size: int, ratio: int, limit: int, min_ar: float,
                  max_ar: float, buffer: int) -> dict:
    """A DatagoClient config in the reference datago's schema: the file source over
    ``root``, in order, rank 0 of 1, buckets ``size``/``ratio``, arrays not encoded."""
    return {"source_type": "file",
            "source_config": {"root_path": str(root), "random_sampling": False,
                              "rank": 0, "world_size": 1},
            "image_config": {"crop_and_resize": True, "default_image_size": size,
                             "downsampling_ratio": ratio, "min_aspect_ratio": min_ar,
                             "max_aspect_ratio": max_ar, "pre_encode_images": False},
            "limit": limit, "samples_buffer_size": buffer}


def cover_size(w: int, h: int, bw: int, bh: int) -> tuple[int, int]:
    """Size of the cover resize of a w x h image for a bw x bh bucket."""
    scale = max(bw / w, bh / h)
    return max(bw, round(w * scale)), max(bh, round(h * scale))


# --------------------------------------------------------------------------- machine

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


# --------------------------------------------------------------------------- CPU

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_counters() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine, from /proc/stat (0, 0 if absent).

    (bench_loader's reference-datago helper and bench_formats' helper have their own
    copy, ``counters()``: they run in other venvs, as self-contained scripts.)"""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    v += [0] * (8 - len(v))
    user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK


def own_cpu() -> float:
    """CPU seconds of this process and its reaped children (DataLoader workers)."""
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a live process, from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        rest = stat[stat.rindex(")") + 2:].split()
        return (int(rest[11]) + int(rest[12])) / _TICK
    except (OSError, ValueError, IndexError):
        return 0.0


# A pass is "disturbed" when, on average over it, other processes used more cores
# than this or the hypervisor stole more than that.


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


_LEADER_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def leader_tree(root: int | None = None, skip: Iterable[int] = ()) -> list[int]:
    """``root`` (default: this process) and its descendants, leaving out the
    processes in ``skip`` (read at each call: a live set may grow) and theirs.

    Children are read from each process's main thread only, so it finds the
    processes started from a main thread (DataLoader workers, the scripts'
    subprocesses): ``process_tree`` reads one ``children`` file per thread, which
    with datago's ~65 IO threads cost a 50 ms sampler ~0.14 cores and the loader
    the GIL.  Without CONFIG_PROC_CHILDREN: ``process_tree`` less ``skip``."""
    root = os.getpid() if root is None else root
    if not _LEADER_CHILDREN:
        return [p for p in process_tree(root) if p not in skip]
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in skip:
            continue
        tree.append(pid)
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                todo += [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            pass
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

    Every ``interval`` seconds it finds the tree (``tree(root)``; default
    ``process_tree``, ``leader_tree`` is cheaper) and sums VmRSS (cheap).  PSS
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
                 root: int | None = None, tree: Callable[[int], list[int]] | None = None):
        import threading
        self.interval = interval
        self.tree = tree
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
        for pid in (self.tree or process_tree)(self.root):
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


# --------------------------------------------------------------------------- one timed pass

def malloc_trim() -> None:
    """Give freed heap back to the OS (glibc), so that a pass does not start with the
    previous passes' freed-but-kept memory -- forked DataLoader workers would count
    it again in their RSS."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


DISTURBED_OTHERS = 0.30
DISTURBED_STEAL = 0.10


# The derived measures of a timed pass, for the scripts' pass records (NamedTuples
# with ``n`` items in ``wall`` seconds, ``ours``/``others``/``steal`` cores):
# ``rate = property(rate_of)`` and so on.

def rate_of(p) -> float:
    """Items per second."""
    return p.n / p.wall


def is_disturbed(p) -> bool:
    return p.others > DISTURBED_OTHERS or p.steal > DISTURBED_STEAL


def cpu_ms_of(p) -> float:
    """CPU milliseconds of the measured processes per item."""
    return p.ours * p.wall / p.n * 1e3 if p.n else float("nan")


class PassCost(NamedTuple):
    """What one pass cost besides its wall time, measured around it by
    ``measure_pass``: CPU seconds the whole machine was busy (``busy``) and stolen
    (``steal``), of this process and its reaped children (``own``, the sampler
    thread's included), of the server processes (``server``); the memory
    sampler (``mem``) and the seconds it ran (``seconds``)."""
    busy: float
    steal: float
    own: float
    server: float
    seconds: float
    mem: TreeMemorySampler

    def cores(self, wall: float) -> Tuple[float, float, float]:
        """(ours, others, steal): cores used on average over ``wall`` seconds by this
        process and its workers, by everything else but the servers, and stolen;
        the sampler thread's CPU is in neither ours nor others."""
        ours = max(0.0, self.own - self.mem.cpu) / wall
        others = max(0.0, (self.busy - self.mem.cpu - self.server) / wall - ours)
        return ours, others, self.steal / wall

    @property
    def mem_cores(self) -> float:
        """Cores the memory sampler used, over the time it ran."""
        return self.mem.cpu / self.seconds if self.seconds > 0 else 0.0


def reported_cores(out: dict, servers: float = 0.0) -> Tuple[float, float, float]:
    """(ours, others, steal) of a subprocess that measured itself over its own timed
    loop (``out["ours"]``, ``out["busy"]``, ``out["steal"]``: cores), the servers'
    ``servers`` cores left out of others."""
    ours = out["ours"]
    return ours, max(0.0, out["busy"] - ours - servers), out["steal"]


def measure_pass(work: Callable[[], dict], problem: Callable[[str], None], name: str, *,
                 interval: float, pss_duty: float, hang_dump_s: float,
                 before: Optional[Callable[[], None]] = None,
                 server_cpu: Optional[Callable[[], float]] = None,
                 tree: Optional[Callable[[int], list[int]]] = None
                 ) -> Optional[Tuple[dict, PassCost]]:
    """Run one timed pass, ``work()``, and measure what it cost.

    Untimed first: ``gc.collect()``, ``malloc_trim()``, a stack dump armed for
    ``hang_dump_s`` seconds, then ``before()`` (e.g. closing a connection pool).
    Around ``work()``: the machine's CPU counters, ``server_cpu()`` (CPU seconds of
    the servers, when given), this process's CPU, and a ``TreeMemorySampler``
    (``interval``, ``pss_duty``, ``tree``) of this process's tree.  Returns
    ``(work's result, PassCost)``, or None when ``work`` raised: the error and the
    end of its traceback go to ``problem`` as "(name) raised ...", as does a
    failure of the memory sampler."""
    gc.collect()
    malloc_trim()
    faulthandler.dump_traceback_later(hang_dump_s, exit=False)
    if before is not None:
        before()
    mem = TreeMemorySampler(interval, pss_duty, tree=tree)
    busy0, steal0 = cpu_counters()
    s0 = server_cpu() if server_cpu is not None else 0.0
    c0 = own_cpu()
    t0 = time.perf_counter()
    mem.start()
    try:
        r = work()
    except Exception as exc:                                      # noqa: BLE001
        problem(f"({name}) raised {type(exc).__name__}: {exc}\n"
                + "".join(traceback.format_exc().splitlines(True)[-8:]))
        return None
    finally:
        mem.stop()
        faulthandler.cancel_dump_traceback_later()
    seconds = time.perf_counter() - t0
    busy1, steal1 = cpu_counters()
    server = server_cpu() - s0 if server_cpu is not None else 0.0
    own = own_cpu() - c0
    if mem.error:
        problem(f"({name}) memory sampler failed: {mem.error}")
    return r, PassCost(busy1 - busy0, steal1 - steal0, own, server, seconds, mem)


# --------------------------------------------------------------------------- other venvs

def text_tail(text: Optional[str], n: int = 600) -> str:
    """The end of a subprocess's output, for a message."""
    text = (text or "").strip()
    return text if len(text) <= n else "..." + text[-n:]


def clean_env() -> dict:
    """This process's environment without what would make another venv's Python
    import this project's packages (PYTHONPATH, PYTHONHOME, VIRTUAL_ENV)."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


class VenvHelper:
    """A helper script run by the Python of another venv (``venv``: the reference
    datago's, or one with packages this environment must not get), isolated
    (``-I``, ``clean_env()``), one subprocess per ``call``; its last line of output
    is JSON."""

    label = "venv"                    # in the message when the venv is created
    packages: Tuple[str, ...] = ()    # what a new venv gets from pip

    def __init__(self, venv: Path, helper: Path, text: str):
        self.venv = venv
        self.python = venv / "bin" / "python"
        self.helper = helper
        self.helper.write_text(text)

    def create(self) -> Optional[str]:
        """Create the venv (``python -m venv``, then ``pip install`` its packages) if it
        is missing; None when done or not needed, else why it failed."""
        if self.python.exists():
            return None
        print(f"{self.label} {self.venv} missing: creating it (python -m venv, pip install "
              f"{' '.join(self.packages)})", flush=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True,
                           capture_output=True, text=True, timeout=300)
            subprocess.run([str(self.venv / "bin" / "pip"), "install", "-q", *self.packages],
                           check=True, capture_output=True, text=True, timeout=900)
        except subprocess.CalledProcessError as exc:
            return (f"creating {self.venv} failed: {' '.join(map(str, exc.cmd))} exited "
                    f"{exc.returncode}: {text_tail(exc.stderr or exc.stdout)}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"creating {self.venv} failed: {type(exc).__name__}: {exc}"
        return None

    def call(self, arg: str, timeout: float, what: str) -> Tuple[dict, float]:
        """Run the helper with ``arg``; returns (its JSON, the subprocess's wall
        seconds).  RuntimeError ("``what`` helper ...") if it fails or prints no JSON."""
        env = clean_env()
        t0 = time.perf_counter()
        proc = subprocess.run([str(self.python), "-I", str(self.helper), arg],
                              capture_output=True, text=True, env=env,
                              cwd=tempfile.gettempdir(), timeout=timeout)
        total = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{what} helper exited {proc.returncode}: "
                               f"{text_tail(proc.stderr or proc.stdout)}")
        try:
            return json.loads(proc.stdout.strip().splitlines()[-1]), total
        except (ValueError, IndexError):
            raise RuntimeError(f"{what} helper printed no JSON: stdout "
                               f"{text_tail(proc.stdout)!r}, stderr {text_tail(proc.stderr)!r}"
                               ) from None
