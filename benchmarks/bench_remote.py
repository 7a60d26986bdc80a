#!/usr/bin/env python
"""Remote sources (issue 9): DatagoDataset over nginx on loopback -- the corpus as
files (``source_type: "index"``) and as 20 WebDataset shards -- against the local
folder, the reference Rust datago's webdataset source, a plain httpx + Pillow
loop, and the index source behind 50 ms of injected latency.

    python benchmarks/bench_remote.py CORPUS_DIR [--limit N] [--rounds R]
                                      [--io-concurrency K] [--latency-ms 50]
                                      [--ref-venv /tmp/datago_ref] [--no-ref]
                                      [--variants L,W,R,C] [--out FILE.md]

The images are the .jpg/.jpeg/.png files under CORPUS_DIR (recursive, sorted,
hidden files skipped; ``--limit`` keeps the first N, for every variant; read once
before timing, which also warms the page cache).  Buckets
``make_buckets(512, 16, 0.5, 2.0)``, batches of 32 images of one bucket.  Set-up,
untimed, in a temporary folder:

* ``index.csv``: ``url,width,height`` per image, the URL on nginx serving
  CORPUS_DIR, width/height the displayed size (after EXIF orientation) from
  ``datago.read_header(...).display_size`` (what the sizes scan stores);
  ``index_nosize.csv`` (``url`` only), and one ``url,width,height`` CSV per fault
  server;
* ``shards/shard-000000.tar`` .. ``shard-000019.tar``: the N images in sorted
  order, cut into 20 contiguous runs (plain ustar tars written with ``tarfile``;
  member name = the corpus-relative path, i.e. ``<key>.<ext>`` with the key the
  path without its extension), and each shard's index written next to it by
  ``datago.sources.webdataset.write_index`` (``<shard>.idx.json``, which nginx
  serves too);
* servers: two ``tests/servers.Nginx`` (a real nginx, one process, sendfile),
  one serving CORPUS_DIR, one the shards; two ``tests/servers.FaultServer``
  (Python, threaded, HTTP/1.1 keep-alive) serving CORPUS_DIR, one with
  ``latency_s=0``, one with ``latency_s=0.05`` (``--latency-ms``) before every
  response.  The fault servers run in subprocesses of their own, so that their
  Python threads do not share this process's GIL with the loader.

Variants (one pass = the whole list once):

(L) local folder: DatagoDataset ``source_type: "file"`` over the N files (the
    corpus folder, or a folder of symlinks to the first N), DataLoader(batch_size=
    None, num_workers=0);
(N) index over nginx: DatagoDataset ``source_type: "index"`` on ``index.csv``
    (``url_column: "url"``; sizes from the CSV, so no header is read at
    construction), ``io_concurrency`` K (``--io-concurrency``; default: the
    config's default, 64), DataLoader(batch_size=None, num_workers=0): one GET per
    image through datago's fetch layer (``datago.fetch``, its pooled keep-alive
    connections), on IO threads separate from the decode threads;
(W) WebDataset over nginx: DatagoDataset ``source_type: "webdataset"``, ``url``
    ``http://127.0.0.1:PORT/shard-{000000..000019}.tar``, the same K, num_workers=0:
    the 20 ``.idx.json`` are fetched at construction, then each member is one HTTP
    Range request;
(R) the reference Rust datago (PyPI), in its own venv (``--ref-venv``; ``--no-ref``
    skips it), run as a subprocess with bench_loader's helper: DatagoClient with
    ``source_type: "webdataset"`` on the same shard URL pattern
    (``reference_image_type: "jpg"``, ``random_sampling: false``, rank 0 of 1,
    ``concurrent_downloads`` left at its default), the same image_config as
    bench_loader gives it, ``limit`` = N; every sample converted with
    ``s.image.to_numpy_array()``; it times itself from its first get_sample() to
    the N-th sample (import, DatagoClient() and start() excluded);
(H) plain httpx + Pillow: bench_loader's Pillow dataset (Image.open, exif_transpose,
    convert("RGB"), LANCZOS cover resize, centre crop, CHW uint8 tensor) over the
    URLs of ``index.csv``, each image fetched by ``httpx.Client.get`` (one client
    per DataLoader worker, made on first use), bench_loader's bucket batch sampler
    (buckets from the headers, untimed), DataLoader(num_workers=2), default collate;
(F0), (F50) index over the fault server with 0 / 50 ms latency per request: (N)'s
    config on the fault servers' CSVs;
(C) the core's ceiling, no loader: the images of one (L) epoch as its plan has
    them (every slot of every step, padded repeats included, in plan order), each
    file read from the page cache and ``datago.decode_to_bucket``-ed into a
    preallocated array of its planned bucket (the loader's filter and
    max_pixels), on ``default_num_threads(1)`` threads taking 16 images at a
    time; no batches, plan, IO pool, fetch or tensors.  What any loader built on
    this core could reach on this machine: C/R bounds W/R, and W/C says how much
    of it the remote loader gets.

``--variants`` runs a subset (comma-separated names; default all).

Before each pass of (N), (W), (F0), (F50) the dataset's ``Fetcher`` is closed
(untimed), so that the pass starts with an empty connection pool: the servers
close connections idle for 60 s, other passes keep them idle longer than that,
and datago's HTTP transport retries a request that fails on a stale pooled
connection on another pooled one, just as stale, so the failure reaches the
fetch layer as ``reset`` and costs a backoff (a datago bug, see RESULTS.md).

The machine is shared and noisy, so variants are interleaved: R rounds, each
running every variant once in an order that rotates between rounds; every
variant gets an untimed warm-up (two batches; the reference: 32 samples) before
the first round.  Reported: median img/s per variant (min..max), and each ratio
computed per round, then its median, against its target: N/L and W/L >= 0.9
("from nginx >= 0.9x the local-folder speed"), W/R >= 2, F50/F0 >= 0.8 (IO
concurrency hides latency).  Once, untimed: the construction time of (N) when
the CSV has no width/height (``index_nosize.csv``, ``sizes_cache: false``: every
header is read through HTTP, 64 KiB Range requests), checked against the CSV's
sizes; and the fetch layer alone: every main image of (N) and of (W) read by the
dataset's own ``Fetcher`` from ``io_concurrency`` threads, nothing decoded (req/s,
CPU ms per request of this process).

Checks (anything off is listed under "Problems"): (L)/(N)/(W)/(F*) with
bench_loader's ``Bench.pass_datago``: every expected sample delivered at least
once and no other, delivered = N + ``stats()["padded"]`` (``remainder="pad"``
completes each bucket's last batch), repeats == padded == the plan's padded
slots, ``stats()["skipped"]`` empty, batch["step"] 0..len(ds)-1 in order, each
batch's shape and bucket against the headers of its images; (H): the sample
count and each batch's shape; (R): N samples, no duplicates, every id a corpus
image; and no fetch retried by datago's ``Fetcher`` (``fetcher.retried``): these
servers inject no faults.

Also per pass: cores used by this process and its DataLoader workers (ours; for
(R) the reference's process), by the servers (nginx / fault server processes,
from /proc/<pid>/stat), by everything else (others) and stolen (steal); HTTP
requests nginx logged during the pass; for datago, ``stats()["seconds"]``
divided by the pass's wall time: ``read`` sums each sample's fetch time, so
read/wall is the average number of fetches in flight, decode/wall the average
number of decodes running; CPU ms per image = ours x wall / images delivered.
Memory: bench_loader's sampler (``_common.TreeMemorySampler``, peak of the summed
RSS / PSS of this process and its descendants every 50 ms), with the server
processes left out of the tree and children read from each process's main thread
only (see ``loader_tree``, ``_common.leader_tree``).
"""

from __future__ import annotations

import csv
import functools
import gc
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional

import numpy as np
from torch.utils.data import DataLoader

from _common import (PassCost, cpu_ms_of, is_disturbed, leader_tree, measure_pass, own_cpu,
                     proc_cpu, rate_of, reported_cores, version)
from _report import (FIRST, PADDED, PSS, RSS, SAMPLES, Column, Report, add_corpus_args,
                     add_out_arg, add_ref_args, check_corpus_args, command_line, cpu_line,
                     datago_line, distinct, disturbed_column, disturbed_rule, make_parser, med,
                     memory_note, problem_lines, rate_columns, ratio_header, ratio_rows,
                     reference_line, run_rounds, runtime_line, seconds_notes, stack_line,
                     variant_table, verdict_lines)
from bench_loader import (BATCH, HANG_DUMP_S, MEM_INTERVAL, PIL_WORKERS, PSS_DUTY,
                          PILBucketDataset, SourcesBench, open_corpus, open_reference,
                          ref_config)

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
from servers import HOST, Nginx, find_nginx          # noqa: E402

SIZE, RATIO = 512, 16
SHARDS = 20
WARMUP_BATCHES = 2
WARMUP_REF = 32

VARIANT_NAMES = ("L", "N", "W", "WS", "R", "H", "F0", "F50", "C")

# (label, numerator, denominator, target or None)
RATIOS = [
    ("N/L", "N", "L", 0.9),
    ("W/L", "W", "L", 0.9),
    ("W/R", "W", "R", 2.0),
    ("WS/L", "WS", "L", 0.9),
    ("WS/R", "WS", "R", 2.0),
    ("F50/F0", "F50", "F0", 0.8),
    ("N/H", "N", "H", None),
    ("W/H", "W", "H", None),
    ("W/N", "W", "N", None),
    ("F0/N", "F0", "N", None),
    ("R/L", "R", "L", None),
    ("H/L", "H", "L", None),
    ("C/R", "C", "R", None),
    ("W/C", "W", "C", None),
    ("L/C", "L", "C", None),
]


def variants(latency_ms: float) -> Dict[str, str]:
    return {
        "L": "local folder: DatagoDataset file source, DataLoader(num_workers=0)",
        "N": "nginx, index source (CSV url,width,height), num_workers=0",
        "W": f"nginx, webdataset source ({SHARDS} shards, Range reads), num_workers=0",
        "WS": f"nginx, webdataset source streamed (streaming: true, {SHARDS} GETs), "
              "num_workers=0",
        "R": "reference datago (Rust, PyPI), webdataset source, same shard URLs, subprocess",
        "H": f"httpx + Pillow, DataLoader(num_workers={PIL_WORKERS})",
        "F0": "fault server 0 ms, index source, num_workers=0",
        "F50": f"fault server {latency_ms:g} ms per request, index source, num_workers=0",
        "C": "core ceiling: (L)'s planned slots, file read + decode_to_bucket on "
             "default_num_threads(1) threads, no loader",
    }


# --------------------------------------------------------------------------- servers

FAULT_HOST = r'''
import sys
sys.path.insert(0, sys.argv[1])
from servers import FaultServer
srv = FaultServer(sys.argv[2], latency_s=float(sys.argv[3]))
print(srv.port, flush=True)
sys.stdin.read()                 # until the benchmark closes the pipe (or dies)
srv.close()
'''


class FaultProcess:
    """``tests/servers.FaultServer(root, latency_s)`` in a subprocess of its own."""

    def __init__(self, root: Path, latency_s: float):
        self.proc = subprocess.Popen([sys.executable, "-c", FAULT_HOST, str(TESTS), str(root),
                                      repr(latency_s)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError(f"FaultServer subprocess did not start (printed {line!r})")
        self.port = int(line)
        self.url = f"http://{HOST}:{self.port}"
        self.pid = self.proc.pid

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


SERVER_PIDS: set = set()

# The process tree the memory sampler sums: this process and its descendants,
# without the server processes (our children, but not the loader), children read
# from each process's main thread only (every process this benchmark starts --
# DataLoader workers, the reference's subprocess -- is started from its main thread).
loader_tree = functools.partial(leader_tree, skip=SERVER_PIDS)


def servers_cpu() -> float:
    return sum(proc_cpu(p) for p in SERVER_PIDS)


def nginx_requests(ng: Nginx) -> int:
    """Requests nginx has logged (lines of its access log)."""
    try:
        with open(ng.dir / "access.log", "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0


# --------------------------------------------------------------------------- (H) httpx + Pillow

_HTTP: dict = {"pid": None, "client": None}


def _http_client():
    """One httpx.Client per process (each DataLoader worker makes its own)."""
    if _HTTP["pid"] != os.getpid():
        import httpx
        _HTTP["client"] = httpx.Client(timeout=30.0)
        _HTTP["pid"] = os.getpid()
    return _HTTP["client"]


class URLFiles:
    """URLs whose items are the fetched bytes as file objects, so that bench_loader's
    ``PILBucketDataset`` (``Image.open(self.files[i])``) reads them unchanged."""

    def __init__(self, urls: List[str]):
        self.urls = urls

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, i: int) -> io.BytesIO:
        resp = _http_client().get(self.urls[i])
        resp.raise_for_status()
        return io.BytesIO(resp.content)


# --------------------------------------------------------------------------- set-up

def key_of(rel: str) -> str:
    """WebDataset key of a member named ``rel``: its path up to the first dot of the
    file name (see datago.sources.webdataset)."""
    folder, _, base = rel.rpartition("/")
    stem = base.partition(".")[0]
    return f"{folder}/{stem}" if folder else stem


def write_csv(path: Path, urls: List[str], sizes: Optional[List[tuple]]) -> Path:
    """A CSV index of ``urls``, with width and height columns from ``sizes``
    ((height, width) pairs, as ``display_size``) when given."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "width", "height"] if sizes else ["url"])
        for k, u in enumerate(urls):
            w.writerow([u, sizes[k][1], sizes[k][0]] if sizes else [u])
    return path


def write_shards(root: Path, rel: List[str], out: Path, count: int) -> List[Path]:
    """``count`` ustar shards of the files ``rel`` (sorted, contiguous runs), member
    name = the relative path; each shard's index written next to it."""
    from datago.sources.webdataset import write_index
    out.mkdir(parents=True)
    paths = []
    for s, idx in enumerate(np.array_split(np.arange(len(rel)), count)):
        path = out / f"shard-{s:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in idx:
                src = (root / rel[i]).resolve()
                ti = tar.gettarinfo(str(src), arcname=rel[i])
                ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = int(ti.mtime), 0, 0, "", ""
                with open(src, "rb") as f:
                    tar.addfile(ti, f)
        write_index(str(path))
        paths.append(path)
    return paths


class Pass(NamedTuple):
    """One timed pass.  ``ours``/``servers``/``others``/``steal``: cores used on
    average by this process and its workers (for (R): the reference's process), by
    the server processes, by everything else, and stolen by the hypervisor.
    ``requests``: HTTP requests nginx logged (None: not nginx).  ``inflight``:
    (fetches, decodes) running on average, from ``stats()["seconds"]`` (datago only).
    ``rss``/``pss``: peaks of the loader's process tree (bytes)."""
    wall: float
    n: int
    mp: float
    ours: float
    servers: float
    others: float
    steal: float
    first: float
    rss: int
    pss: int
    padded: Optional[int]
    requests: Optional[int]
    inflight: Optional[tuple]
    mem_cpu: float = 0.0

    rate = property(rate_of)
    disturbed = property(is_disturbed)
    cpu_ms = property(cpu_ms_of)          # of the loader's processes per delivered image


class RemoteBench(SourcesBench):
    """bench_loader's SourcesBench (its (L) dataset is ``self.ds``; its checks) plus
    the remote variants.  Sample ids of (N)/(F*) are URLs and of (W) keys, aliases
    of the relative paths."""

    def __init__(self, corpus, n, data_root, ref, workdir: Path, io_concurrency, latency_s):
        super().__init__(corpus, n, data_root, ref, "L", SIZE)
        self.workdir = workdir
        self._relabel: Optional[tuple] = None
        self.io_concurrency = io_concurrency
        self.latency_s = latency_s
        self.nginx: Dict[str, Nginx] = {}
        self.faults: Dict[str, FaultProcess] = {}
        self.fetch_cpu_ms: Dict[str, float] = {}

    # ---------------------------------------------------------------- set-up
    def problem(self, text: str) -> None:
        if self._relabel and text.startswith(self._relabel[0]):
            text = self._relabel[1] + text[len(self._relabel[0]):]
        super().problem(text)

    def source_cfg(self, **kw) -> dict:
        if self.io_concurrency is not None:
            kw["io_concurrency"] = self.io_concurrency
        return kw

    def setup(self, names: List[str]) -> None:
        c, rel = self.corpus, self.rel
        sizes = [c.infos[r].display_size for r in rel]
        ng = self.nginx["corpus"] = Nginx(c.root).start()
        SERVER_PIDS.add(ng.proc.pid)
        urls = {f"{ng.url}/{r}": r for r in rel}
        csv_path = write_csv(self.workdir / "index.csv", list(urls), sizes)
        self.nosize_csv = write_csv(self.workdir / "index_nosize.csv", list(urls), None)
        self.expected_ids["N"] = self.expected_ids["H"] = self.alias(urls)
        self.datasets["N"] = self.build("N", "index", self.source_cfg(
            index=str(csv_path), url_column="url"))
        # (H): bench_loader's Pillow dataset over the same URLs, same batches as (a)
        self.h_ds = PILBucketDataset(URLFiles(list(urls)), self.buckets)
        # shards
        t0 = time.perf_counter()
        shard_dir = self.workdir / "shards"
        k = min(SHARDS, self.n)
        self.shard_paths = write_shards(c.root, rel, shard_dir, k)
        self.t_shards = time.perf_counter() - t0
        ngs = self.nginx["shards"] = Nginx(shard_dir).start()
        SERVER_PIDS.add(ngs.proc.pid)
        self.shard_url = f"{ngs.url}/shard-{{{0:06d}..{k - 1:06d}}}.tar"
        self.expected_ids["W"] = self.alias({key_of(r): r for r in rel})
        self.datasets["W"] = self.build("W", "webdataset", self.source_cfg(
            url=self.shard_url, reference_image_type="jpg"))
        if "WS" in names:
            self.expected_ids["WS"] = self.expected_ids["W"]
            self.datasets["WS"] = self.build("WS", "webdataset", self.source_cfg(
                url=self.shard_url, reference_image_type="jpg", streaming=True))
        self.stem_of = {}
        for r in rel:                                  # the reference's sample id
            self.stem_of.setdefault(key_of(r).rsplit("/", 1)[-1], []).append(r)
        # fault servers
        for name, lat in (("F0", 0.0), ("F50", self.latency_s)):
            if name not in names:
                continue
            fp = self.faults[name] = FaultProcess(c.root, lat)
            SERVER_PIDS.add(fp.pid)
            furls = {f"{fp.url}/{r}": r for r in rel}
            fcsv = write_csv(self.workdir / f"index_{name}.csv", list(furls), sizes)
            self.expected_ids[name] = self.alias(furls)
            self.datasets[name] = self.build(name, "index", self.source_cfg(
                index=str(fcsv), url_column="url"))
        self.check_listings(skip=("WS",))           # (WS) lists nothing: it streams

    def check_retries(self, names: Iterable[str]) -> None:
        """A retried fetch of these variants' datasets (whole run) is a problem: the
        servers inject no faults."""
        for k in names:
            ds = self.datasets.get(k)
            if ds is not None and ds.fetcher.retried:
                self.problem(f"({k}) datago's Fetcher retried {dict(ds.fetcher.retried)} "
                             f"fetches (whole run) from a loopback server that injects no "
                             f"faults (no sample was lost: see the checks)")

    def close(self) -> None:
        for fp in self.faults.values():
            fp.close()
        for ng in self.nginx.values():
            ng.close()

    def header_scan(self) -> str:
        """(N) built from the CSV without sizes: every header read through HTTP."""
        cfg = self.source_cfg(index=str(self.nosize_csv), url_column="url", sizes_cache=False)
        before = nginx_requests(self.nginx["corpus"])
        s0 = servers_cpu()
        c0 = own_cpu()
        try:
            ds = self.build("N (header scan)", "index", cfg)
        except Exception as exc:                                  # noqa: BLE001
            self.problem(f"(N) construction with a header scan raised {type(exc).__name__}: {exc}")
            return "header scan failed (see Problems)"
        t = self.t_build["N (header scan)"]
        cpu = own_cpu() - c0
        reqs = nginx_requests(self.nginx["corpus"]) - before
        want = [self.corpus.infos[r].display_size for r in self.rel]       # (h, w)
        got = list(zip(ds.sizes.height.tolist(), ds.sizes.width.tolist()))
        bad = [(self.rel[i], got[i], want[i]) for i in range(self.n) if got[i] != want[i]]
        if bad:
            self.problem(f"(N) header scan: {len(bad)} sizes differ from read_header's "
                         f"display_size, e.g. {bad[:3]}")
        st = ds.stats().get("index", {})
        return (f"(N) construction when the CSV has no width/height (sizes_cache off, "
                f"io_concurrency {ds.config.source.io_concurrency}): {t:.2f} s for {self.n} "
                f"headers = {self.n / t:.0f} headers/s ({reqs} requests to nginx, "
                f"{st.get('scanned')} scanned, {st.get('unreadable')} unreadable; "
                f"this process {cpu / t:.2f} cores, nginx "
                f"{(servers_cpu() - s0) / t:.2f}); the sizes equal read_header's "
                f"display_size for {self.n - len(bad)} of {self.n}; with width/height in "
                f"the CSV: {self.t_build['N'] * 1e3:.0f} ms")

    def fetch_only(self, name: str) -> str:
        """Every main image of (N) or (W) read by the dataset's own ``Fetcher`` from
        ``io_concurrency`` threads (as its IO pool does), nothing decoded: the CPU
        cost of the fetch layer alone."""
        ds = self.datasets[name]
        locs = [ds.listing.main_location(i) for i in range(len(ds.listing))]
        k = ds.config.source.io_concurrency
        ng = self.nginx["shards" if name == "W" else "corpus"]
        gc.collect()
        req0, s0, c0 = nginx_requests(ng), servers_cpu(), own_cpu()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(k, thread_name_prefix="fetch-only") as ex:
            nbytes = sum(len(b) for b in ex.map(ds.fetcher.read, locs))
        wall = time.perf_counter() - t0
        cpu, srv = own_cpu() - c0, servers_cpu() - s0
        self.fetch_cpu_ms[name] = cpu / len(locs) * 1e3
        return (f"({name}) fetch layer alone ({'Range reads of the members' if name == 'W' else 'GETs'}, "
                f"{k} threads, no decode): {len(locs) / wall:.0f} req/s, "
                f"{nbytes / wall / 1e6:.0f} MB/s, {self.fetch_cpu_ms[name]:.2f} ms CPU per request "
                f"in this process ({cpu / wall:.2f} cores), nginx {srv / wall:.2f} cores, "
                f"{nginx_requests(ng) - req0} requests")

    # ---------------------------------------------------------------- passes
    def pass_remote_datago(self, name: str) -> dict:
        r = self.pass_source(name)
        secs = self.seconds[name][-1]
        r["inflight"] = (secs["read"] / r["wall"], secs["decode"] / r["wall"])
        return r

    def pass_h(self) -> dict:
        self._relabel = ("(a)", "(H)")
        try:
            return self.pass_a(self.h_ds)
        finally:
            self._relabel = None

    def ref_cfg(self, n: int) -> dict:
        cfg = ref_config(self.data_root, SIZE, RATIO, n)   # image_config as bench_loader's
        cfg["source_type"] = "webdataset"
        cfg["source_config"] = {"url": self.shard_url, "reference_image_type": "jpg",
                                "random_sampling": False, "rank": 0, "world_size": 1}
        return cfg

    def run_ref(self, n: Optional[int], known: set, unknown_ids: str) -> tuple:
        """The reference over the first ``n`` samples (all when None) with ``ref_cfg``;
        checks their count, duplicates and ids (``known``; the others are reported as
        "ids {unknown_ids}").  Returns (its JSON, its subprocess's seconds, the tag
        of its problems, the sample ids)."""
        n_want = n or self.n
        out, total = self.ref.run(self.ref_cfg(n_want), n_want, self.workdir)
        tag = "(R)" if n is None else "(R) warm-up"
        ids = [s[0] for s in out["samples"]]
        unknown = [i for i in ids if i not in known]
        if out["n"] != n_want:
            self.problem(f"{tag} reference delivered {out['n']} samples, want {n_want}")
        if len(set(ids)) != len(ids):
            self.problem(f"{tag} reference delivered {len(ids) - len(set(ids))} duplicates")
        if unknown:
            self.problem(f"{tag} reference delivered {len(unknown)} ids {unknown_ids}, e.g. "
                         f"{unknown[:3]}")
        return out, total, tag, ids

    @staticmethod
    def ref_result(out: dict, total: float, mp: float) -> dict:
        """A pass of (R) for ``timed``: the reference measured itself."""
        return dict(wall=out["wall"], n=out["n"], mp=mp, first=out["first"] or out["wall"],
                    ours=out["ours"], busy=out["busy"], steal=out["steal"], total=total,
                    padded=None)

    def pass_r(self, n: Optional[int] = None) -> dict:
        out, total, _, ids = self.run_ref(n, self.stem_of, "that are no corpus image's stem")
        samples = out["samples"]
        rels = [self.stem_of[i][0] for i in ids if i in self.stem_of]
        empty = [s for s in samples if s[1] == 0 or s[2] == 0]
        off = [s for s in samples if s[0] in self.stem_of and s[1] and
               (s[1], s[2]) != self.bucket_of[self.stem_of[s[0]][0]]]
        out.update(_total=total, _empty=len(empty),
                   _empty_png=sum(1 for s in empty if s[0] in self.stem_of and
                                  self.corpus.infos[self.stem_of[s[0]][0]].format == "png"),
                   _off_bucket=len(off), _pngs=sum(1 for r in rels
                                                   if self.corpus.infos[r].format == "png"))
        self.last_r = out
        return self.ref_result(out, total, sum(self.mp_of[r] for r in rels))

    # ---------------------------------------------------------------- timing
    def ceiling_jobs(self) -> list:
        """(C)'s work: (file, bucket) for every slot of (L)'s epoch plan, in order."""
        ds = self.ds
        plan = ds.plan()
        buckets, samples, _ = plan.rank(0)
        valid = plan.valid()[:, 0]
        jobs = []
        for t in range(plan.num_steps):
            bucket = tuple(ds.buckets[int(buckets[t])])
            for k in np.flatnonzero(valid[t]):
                jobs.append((str(ds.listing.main_location(int(samples[t, k]))), bucket))
        return jobs

    def pass_c(self) -> dict:
        import threading
        from datago import decode_to_bucket
        from datago.dataset import default_num_threads
        jobs = self._ceiling = getattr(self, "_ceiling", None) or self.ceiling_jobs()
        cfg = self.ds.config.image
        local = threading.local()
        t0 = time.perf_counter()
        first: List[float] = []

        def work(chunk) -> float:
            outs = getattr(local, "outs", None)
            if outs is None:
                outs = local.outs = {}
            mp = 0.0
            for path, bucket in chunk:
                out = outs.get(bucket)
                if out is None:
                    out = outs[bucket] = np.empty((bucket[0], bucket[1], 3), np.uint8)
                with open(path, "rb") as f:
                    data = f.read()
                res = decode_to_bucket(data, bucket=bucket, out=out, filter=cfg.filter,
                                       max_pixels=cfg.max_pixels)
                h, w = res.original_size
                mp += h * w / 1e6
            if not first:
                first.append(time.perf_counter() - t0)
            return mp

        chunks = [jobs[i:i + 16] for i in range(0, len(jobs), 16)]
        with ThreadPoolExecutor(default_num_threads(1), thread_name_prefix="ceiling") as ex:
            mp = sum(ex.map(work, chunks))
        wall = time.perf_counter() - t0
        return dict(wall=wall, n=len(jobs), mp=mp, first=first[0] if first else wall,
                    padded=self.ds.plan().num_padded(0))

    def run_variant(self, name: str) -> dict:
        if name == "C":
            return self.pass_c()
        if name == "H":
            return self.pass_h()
        if name == "R":
            return self.pass_r()
        if name == "WS":
            return self.pass_stream(name)
        return self.pass_remote_datago(name)

    def pass_stream(self, name: str) -> dict:
        """One pass of a streaming dataset (one rank: one pass over the shards, every
        sample once, partial batches at the end); checked after the timed loop."""
        ds = self.datasets[name]
        ds.reset_stats()
        t0 = time.perf_counter()
        got, first, ids, bad = 0, None, [], []
        for batch in DataLoader(ds, batch_size=None, num_workers=0):
            if first is None:
                first = time.perf_counter() - t0
            img, bid = batch["image"], batch["id"]
            h, w = batch["bucket"]
            if tuple(img.shape) != (len(bid), 3, h, w) or any(
                    self.bucket_of.get(i) != (h, w) for i in bid):
                bad.append((tuple(img.shape), (h, w), bid[:2]))
            got += img.shape[0]
            ids.extend(bid)
        wall = time.perf_counter() - t0
        st = ds.stats()
        want = self.expected_ids[name]
        if len(ids) != len(set(ids)) or set(ids) != want:
            self.problem(f"({name}) delivered {len(ids)} samples, {len(set(ids))} distinct, "
                         f"want each of {len(want)} once; missing {len(want - set(ids))}")
        if bad:
            self.problem(f"({name}) {len(bad)} batches whose shape/bucket disagree with the "
                         f"files' headers, first: {bad[0]}")
        if st["skipped_total"] or st["streaming"]["shards_failed"] or st["samples"] != got:
            self.problem(f"({name}) stats: samples {st['samples']} (delivered {got}), skipped "
                         f"{st['skipped']}, streaming {st['streaming']}")
        self.seconds.setdefault(name, []).append(st["seconds"])
        return dict(wall=wall, n=got, mp=sum(self.mp_of[i] for i in ids), first=first or wall,
                    padded=0,
                    inflight=(st["seconds"]["read"] / wall, st["seconds"]["decode"] / wall))

    def timed(self, name: str) -> Optional[Pass]:
        def empty_pool() -> None:
            if name in self.datasets and name != "L":
                # start with an empty connection pool (untimed): the servers close
                # connections idle for 60 s, longer than a round's other passes leave
                # them, and datago retries a request that fails on a stale pooled
                # connection on another pooled one, just as stale, then backs off (see
                # RESULTS.md, issue 9) -- which would be timed here
                self.datasets[name].fetcher.close()
        ng = self.nginx["shards" if name in ("W", "WS", "R") else "corpus"]
        req0 = nginx_requests(ng)
        got = measure_pass(lambda: self.run_variant(name), self.problem, name,
                           interval=MEM_INTERVAL, pss_duty=PSS_DUTY, hang_dump_s=HANG_DUMP_S,
                           before=empty_pool, server_cpu=servers_cpu, tree=loader_tree)
        if got is None:
            return None
        r, cost = got
        return self.to_pass(name, r, cost,
                            None if name in ("F0", "F50", "C") else nginx_requests(ng) - req0)

    def to_pass(self, name: str, r: dict, cost: PassCost, requests: Optional[int]) -> Pass:
        """The timed pass of variant ``name`` that returned ``r`` and cost ``cost``."""
        wall = r["wall"]
        if name == "R":
            # the reference measured its own CPU and the machine's over its timed wall;
            # the servers' CPU is known only over the whole subprocess: its average there
            servers = cost.server / max(r["total"], 1e-9)
            ours, others, steal = reported_cores(r, servers)
        else:
            servers = cost.server / wall
            ours, others, steal = cost.cores(wall)
        return Pass(wall, r["n"], r["mp"], ours, servers, others, steal, r["first"],
                    cost.mem.peak_rss, cost.mem.peak_pss, r.get("padded"), requests,
                    r.get("inflight"), cost.mem.cpu / wall)

    def warm_up(self, names: List[str]) -> List[str]:
        """Two batches of each datago variant, the first batch of (H), 32 samples of
        (R); returns the variants that failed (dropped from the rounds)."""
        failed = []
        for name in names:
            try:
                if name == "R":
                    self.pass_r(WARMUP_REF)
                    continue
                if name == "C":
                    self._ceiling = self.ceiling_jobs()
                    continue
                if name == "H":
                    loader = DataLoader(self.h_ds, batch_sampler=self.pil_sampler,
                                        num_workers=PIL_WORKERS)
                else:
                    loader = DataLoader(self.datasets[name], batch_size=None, num_workers=0)
                it = iter(loader)
                for _ in zip(range(1 if name == "H" else WARMUP_BATCHES), it):
                    pass
                del it, loader
            except Exception as exc:                              # noqa: BLE001
                self.problem(f"({name}) warm-up raised {type(exc).__name__}: {exc}\n"
                             + "".join(traceback.format_exc().splitlines(True)[-8:]))
                failed.append(name)
        return failed


# --------------------------------------------------------------------------- reporting

def round_summary(passes: Dict[str, Optional[Pass]]) -> str:
    """A round's line: img/s and cores (ours/servers/others) per variant."""
    return "  ".join(
        f"{k} FAILED" if p is None else
        f"{k} {p.rate:.1f}{'!' if p.disturbed else ''}"
        f" ({p.ours:.2f}/{p.servers:.2f}/{p.others:.2f} cores)"
        for k, p in passes.items()) + "  [img/s (cores ours/servers/others)]"


INFLIGHT = Column("fetches / decodes in flight", lambda _, ok: (
    f"{med(t.inflight[0] for t in ok):.1f} / {med(t.inflight[1] for t in ok):.2f}"
    if ok[0].inflight is not None else "-"))
CPU_MS = Column("CPU ms / img (ours)", lambda _, ok: f"{med(t.cpu_ms for t in ok):.1f}")


def cores_column(servers: str) -> Column:
    return Column(f"cores: ours / {servers} (median) / others, steal (max)", lambda _, ok: (
        f"{med(t.ours for t in ok):.2f} / {med(t.servers for t in ok):.2f} / "
        f"{max(t.others for t in ok):.2f}, {max(t.steal for t in ok):.2f}"))


def tables(bench: RemoteBench, names: List[str], times: Dict[str, list], rounds: int,
           latency_ms: float) -> tuple:
    requests = Column("HTTP requests", lambda _, ok: (
        distinct(t.requests for t in ok) if ok[0].requests is not None else "-"))
    columns = (rate_columns(rounds) + [SAMPLES, PADDED, FIRST, requests, INFLIGHT, CPU_MS, RSS,
                                       PSS, cores_column("servers"), disturbed_column(rounds)])
    lines = variant_table(columns, names, times, variants(latency_ms))
    rows, verdicts = ratio_rows(RATIOS, times, rounds)
    return lines + [""] + ratio_header() + rows, verdicts


def cpu_per_image(times: Dict[str, list]) -> Dict[str, float]:
    """CPU ms per delivered image of each variant that ran (median)."""
    return {k: med(t.cpu_ms for t in v if t is not None)
            for k, v in times.items() if any(t is not None for t in v)}


def cpu_per_image_note(med_cpu: Dict[str, float]) -> str:
    return "CPU per delivered image (loader processes, median): " + ", ".join(
        f"({k}) {v:.1f} ms" + (f" ({v - med_cpu['L']:+.1f} vs (L))" if k != "L" else "")
        for k, v in med_cpu.items())


def ref_pass_note(lr: dict, empty_note: str = "") -> str:
    """(R)'s last pass: what it delivered, outside its timed wall (``empty_note``
    follows the count of empty images)."""
    return (f"(R) last pass: {lr['n']} samples consumed, then {lr['extra']} more delivered "
            f"({'stream exhausted' if lr['exhausted'] else 'still delivering after the drain'}); "
            f"channels {lr['channels']}; {lr['_empty']} samples with an empty (0x0) image "
            f"({lr['_empty_png']} of them PNG; {lr['_pngs']} PNG samples delivered){empty_note}; "
            f"{lr['_off_bucket']} non-empty samples in another bucket than datago's (it "
            f"ignores EXIF orientation and matches aspect ratios linearly); outside its wall: "
            f"import {lr['t_import']:.2f} s, DatagoClient() + start() {lr['t_start']:.3f} s; "
            f"whole subprocess {lr['_total']:.1f} s")


def notes(bench: RemoteBench, names: List[str], times: Dict[str, list],
          once: List[str]) -> List[str]:
    out = list(once)
    out.append("construction (untimed), ms: " + ", ".join(
        f"({k}) {v * 1e3:.0f}" for k, v in bench.t_build.items() if k != "N (header scan)")
        + f"; (L) {bench.t_ds * 1e3:.0f} (sizes from its cache); (W) fetches the "
        f"{len(bench.shard_paths)} .idx.json from nginx; writing the shards and their "
        f"indexes took {bench.t_shards:.1f} s")
    out += seconds_notes(names, bench.seconds, times)
    med_cpu = cpu_per_image(times)
    if "L" in med_cpu:
        out.append(cpu_per_image_note(med_cpu)
                   + ("; the fetch layer alone: " + ", ".join(
                       f"({k}) {v:.2f} ms per request" for k, v in bench.fetch_cpu_ms.items())
                      if bench.fetch_cpu_ms else ""))
    lr = getattr(bench, "last_r", None)
    if lr:
        ok = [t for t in times.get("R", []) if t is not None]
        out.append(ref_pass_note(lr, ": with reference_image_type 'jpg' it does not decode a "
                                     "sample's PNG, so it does less work than (W) on those")
                   + ("; its servers column is nginx's CPU over the whole subprocess"
                      if ok else ""))
    retried = {k: dict(ds.fetcher.retried) for k, ds in bench.datasets.items() if k != "L"}
    out.append("retried fetches (datago's Fetcher, whole run, warm-up included): "
               + ", ".join(f"({k}) {v or 0}" for k, v in retried.items()))
    out.append(memory_note("this process and its descendants (DataLoader workers, the "
                           "reference's subprocess), the nginx and fault-server processes "
                           "left out", times))
    out.append("cores: 'servers' is the CPU of the nginx / fault-server processes during the "
               "pass; 'others' everything else on the machine (the memory sampler's own CPU "
               f"excluded); '!' after a rate marks a disturbed pass ({disturbed_rule()})")
    return out


def environment(bench: RemoteBench, ref_line: str, io_conc: str) -> List[str]:
    c, rel = bench.corpus, bench.rel
    nbytes = sum((c.root / r).stat().st_size for r in rel)
    shard_bytes = sum(p.stat().st_size for p in bench.shard_paths)
    try:
        ngv = subprocess.run([find_nginx(), "-v"], capture_output=True, text=True).stderr.strip()
    except Exception:                                             # noqa: BLE001
        ngv = "nginx (version unknown)"
    return [
        cpu_line(),
        f"{stack_line()}, httpx {version('httpx')}; {ngv} (one process, sendfile, keep-alive)",
        f"{datago_line()}, io_concurrency {io_conc} (IO threads and pooled connections, "
        f"(N)/(W)/(F*)); batch {BATCH}, remainder 'pad', prefetch_batches "
        f"{bench.ds.config.loader.prefetch_batches}",
        f"- {ref_line}",
        bench.corpus_line(f", {nbytes / 1e6:.1f} MB; {len(bench.shard_paths)} shards, "
                          f"{shard_bytes / 1e6:.1f} MB; buckets {bench.buckets_text()}; page "
                          f"cache warm (files read once before timing, shards just written)"),
    ]


# --------------------------------------------------------------------------- main

def summary(ref, venv: Path, ran_ref: bool, ref_why: Optional[str], verdicts: list,
            problems: List[str], t_start: float) -> List[str]:
    """The Summary section (bench_remote's and bench_db's)."""
    tail = ["## Summary", ""]
    info = ref.info if ref is not None else None
    if info:
        tail.append(reference_line(info, venv))
    if not ran_ref:
        tail.append(f"- (R) reference datago not run: {ref_why}")
    return tail + verdict_lines(verdicts) + problem_lines(problems) + [runtime_line(t_start)]


def main(argv=None) -> int:
    ap = make_parser(__doc__)
    add_corpus_args(ap)
    ap.add_argument("--io-concurrency", type=int, default=None,
                    help="io_concurrency of (N), (W), (F0), (F50) (default: the config's)")
    ap.add_argument("--latency-ms", type=float, default=50.0,
                    help="latency per request of the (F50) fault server (default 50)")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated subset of {','.join(VARIANT_NAMES)} (default all)")
    add_ref_args(ap, "R")
    add_out_arg(ap)
    args = ap.parse_args(argv)
    check_corpus_args(ap, args)
    pick = list(VARIANT_NAMES)
    if args.variants:
        pick = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in pick if v not in VARIANT_NAMES]
        if unknown:
            ap.error(f"--variants: unknown {', '.join(unknown)} (known: "
                     f"{', '.join(VARIANT_NAMES)})")
    if args.io_concurrency is not None and not 1 <= args.io_concurrency <= 1024:
        ap.error("--io-concurrency must be in 1..1024")

    # a plain kill runs the clean-up below (servers, temporary folder)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.perf_counter()
    corpus, n, workdir, data_root = open_corpus(args.corpus, args.limit, "bench_remote_")
    ref, ref_why = open_reference(args.no_ref, args.ref_venv, workdir)
    names = [v for v in VARIANT_NAMES if v in pick and (v != "R" or ref is not None)]
    bench = RemoteBench(corpus, n, data_root, ref, workdir, args.io_concurrency,
                        args.latency_ms / 1e3)
    report = Report()
    verdicts: list = []
    try:
        bench.setup(names)
        io_conc = str(bench.datasets["N"].config.source.io_concurrency)
        failed = bench.warm_up(names)
        if "R" in failed:
            ref_why = f"warm-up failed: {bench.problems[-1]}"
        names = [x for x in names if x not in failed]
        scan_note = bench.header_scan()
        fetch_notes = [bench.fetch_only(x) for x in ("N", "W") if x in names]
        ref_line = (f"reference datago: {args.ref_venv}, webdataset source on "
                    f"{bench.shard_url}, limit = {n}, to_numpy_array() per sample"
                    if "R" in names else f"reference datago (R): NOT RUN: {ref_why}")
        report.add(["## Environment", ""] + environment(bench, ref_line, io_conc)
                   + [command_line("bench_remote.py", argv), ""], gap=False)
        t_rounds = time.perf_counter()
        times = run_rounds(bench.timed, names, args.rounds, round_summary)
        elapsed = time.perf_counter() - t_rounds
        bench.check_retries(list(bench.datasets))
        table, verdicts = tables(bench, names, times, args.rounds, args.latency_ms)
        section = [f"## Remote sources, buckets {SIZE} ({n} images, {args.rounds} rounds)", ""]
        section += [f"- {s}" for s in notes(bench, names, times, [scan_note] + fetch_notes)]
        section += [f"- timed passes took {elapsed:.0f} s", ""] + table + [""]
        report.add(section)
    finally:
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    report.add(summary(ref, args.ref_venv, "R" in names, ref_why, verdicts, bench.problems,
                       t_start))
    report.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
