#!/usr/bin/env python
"""The dataroom API source (issue 10): DatagoDataset ``source_type: "db"`` reading
from ``datago serve`` on loopback, against the same images read from the local
folder, the reference Rust datago's db source reading from the same server, and
the server's paging alone.

    python benchmarks/bench_db.py CORPUS_DIR [--limit N] [--rounds R]
                                  [--page-size P] [--ref-venv /tmp/datago_ref]
                                  [--no-ref] [--out FILE.md]

The images are the .jpg/.jpeg/.png files under CORPUS_DIR (recursive, sorted,
hidden files skipped; ``--limit`` keeps the first N, for every variant, through a
folder of symlinks to them at the same relative paths, as bench_loader does; all
of them read once before timing, which also warms the page cache).  Buckets
``make_buckets(512, 16, 0.5, 2.0)``, batches of 32 images of one bucket,
``remainder: "pad"``.

Set-up, untimed: ``datago serve`` on that folder (``tests/servers.DatagoServe``:
``python -m datago serve ROOT --host 127.0.0.1 --port P --token T --source
bench --cache-dir WORKDIR/serve_cache``; a subprocess of its own, uvicorn +
starlette, one process; its start-up reads every image's header, with an empty
sizes cache, and is reported).  ``DATAROOM_API_URL`` (``http://127.0.0.1:P/api/``)
and ``DATAROOM_API_KEY`` are set in this process's environment, which the
reference's subprocess inherits.  Sample ids are the API's ``id``: the image's
path relative to the folder, the same ids as the folder source's.

Variants (one pass = the whole selection once):

(L) local folder: DatagoDataset ``source_type: "file"`` over the N files,
    DataLoader(batch_size=None, num_workers=0) -- exactly bench_remote's (L)
    (bench_loader's ``datago_config``, ``Bench.pass_datago``);
(D) our db source reading from ``datago serve``: DatagoDataset ``{"source_type":
    "db", "source_config": {"sources": "bench", "page_size": P, "api_url": ...,
    "api_key": ...}}`` (``--page-size``, default 500), the same image_config,
    batch size and DataLoader as (L), listing mode: the whole selection is paged
    once, at construction (untimed; its time, pages and rows/s are reported, with
    the server's CPU over it), and width/height come from the API, so no image
    header is read by the client; a pass is then one GET per image
    (``image_direct_url``, ``/files/{i}/image/{name}?s=<sig>``, a starlette
    ``FileResponse``) through datago's fetch layer (pooled keep-alive
    connections, ``io_concurrency`` 64 IO threads, separate from the decode
    threads);
(R) the reference Rust datago (PyPI), in its own venv (``--ref-venv``; ``--no-ref``
    skips it), run as a subprocess with bench_loader's helper (``Reference``):
    DatagoClient with ``{"source_type": "db", "source_config": {"sources":
    "bench", "page_size": P, "require_images": true, "rank": 0, "world_size": 1},
    "image_config": <bench_loader's ref_config image_config>, "limit": N,
    "samples_buffer_size": 64}``, the API URL and key from the environment; every
    sample converted with ``s.image.to_numpy_array()``; it times itself from its
    first get_sample() to the N-th sample (interpreter start, import,
    DatagoClient() and start() excluded, and whatever its background paging and
    downloads did before the first get_sample());
(P) the server alone (untimed relative to the others, reported separately):
    metadata rows/s of ``GET /api/images/`` with one ``httpx.Client``, following
    ``next`` over the whole selection, the query the db client sends
    (``datago.sources.db.query_params``: its ``fields``, ``sources``) at
    ``page_size`` 100 and 2000, each response parsed with ``json``; 3 repeats
    each, median (min..max), with the server's and this process's CPU.

Once, untimed, after the warm-up: the fetch layer alone -- every main image of
(D) read by (D)'s own ``Fetcher`` from ``io_concurrency`` threads (as its IO pool
does), nothing decoded, checked against the files' byte count: req/s, MB/s, CPU
ms per request of this process and of the server.  With the passes' CPU per
image, the notes give loader + server CPU per image of (D) against (L)'s: where
the cores are all busy (the server runs on the loader's machine here), D/L
cannot exceed their ratio.

Before each pass of (D) the dataset's ``Fetcher`` is closed (untimed), so that
the pass starts with an empty connection pool: uvicorn closes connections idle
for 5 s, other passes keep them idle longer, and datago's HTTP transport retries
a request that fails on a stale pooled connection on another one, just as
stale, which costs a backoff (see bench_remote and RESULTS.md, issue 9).

The machine is shared and noisy, so variants are interleaved: R rounds, each
running every variant once in an order that rotates between rounds; every
variant gets an untimed warm-up first (two batches; the reference: 32 samples).
Reported: median img/s per variant (min..max), and each ratio computed per round,
then its median, against its target: D/R >= 2.0, D/L >= 0.85.

Checks (anything off is listed under "Problems"): the db listing (at
construction) holds exactly the N expected ids, each once, with the width/height
of the image's displayed size (``datago.read_header(...).display_size``); (L)/(D)
with bench_loader's ``Bench.pass_datago``: every expected sample delivered at
least once and no other, delivered = N + ``stats()["padded"]``, repeats ==
padded == the plan's padded slots, nothing skipped, batch["step"] 0..len(ds)-1 in
order, each batch's shape and bucket against the headers of its images; (R): N
samples, N distinct ids, exactly the expected ids; (P): every page 200, N rows,
N distinct ids; no fetch retried by (D)'s ``Fetcher`` (the server injects no
faults).

Also per pass: cores used by this process (for (R): the reference's process), by
the server (its CPU from ``/proc/<pid>/stat``: "server CPU s" is its CPU seconds
over the pass -- for (R) over the reference's whole subprocess, start-up and
drain included -- and the cores column divides it by the wall), by everything
else (others) and stolen (steal); for datago, ``stats()["seconds"]`` divided by
the wall: fetches / decodes in flight on average; CPU ms per image = ours x wall /
images delivered.  Memory: ``_common.TreeMemorySampler`` (every 50 ms), the peak
of the summed RSS / PSS of the whole process tree: this process, its DataLoader
workers (none here), the ``datago serve`` subprocess and the reference's
subprocess (bench_remote's ``_loader_tree``, which reads children from each
process's main thread only; the server and the reference are started from the
main thread); the server's own RSS at that peak is shown too.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import urlencode

import numpy as np
import PIL
import torch

import _common
from _common import TreeMemorySampler, cpu_counters, cpu_model, version
from bench_loader import (BATCH, DISTURBED_OTHERS, DISTURBED_STEAL, HANG_DUMP_S,
                          MEM_INTERVAL, PSS_DUTY, Reference, _malloc_trim, _mb, _own_cpu,
                          datago, default_num_threads, link_view, load_corpus, ref_config)
from bench_remote import RATIO, SIZE, Pass, RemoteBench, _proc_cpu, run_rounds

TESTS = Path(__file__).resolve().parents[1] / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
from servers import DatagoServe                        # noqa: E402

SOURCE_NAME = "bench"
TOKEN = "bench-db-token-0123456789abcdef"
PAGE_SIZE = 500
PAGING_SIZES = (100, 2000)
PAGING_REPEATS = 3

VARIANT_NAMES = ("L", "D", "R")

# (label, numerator, denominator, target or None)
RATIOS = [
    ("D/R", "D", "R", 2.0),
    ("D/L", "D", "L", 0.85),
    ("R/L", "R", "L", None),
]


def variants(page_size: int) -> Dict[str, str]:
    return {
        "L": "local folder: DatagoDataset file source, DataLoader(num_workers=0)",
        "D": f"datago serve, DatagoDataset db source (listing, page_size {page_size}), "
             "num_workers=0",
        "R": f"reference datago (Rust, PyPI), db source (page_size {page_size}), same server, "
             "subprocess",
    }


def _status_rss(pid: int) -> int:
    st = _common.process_status(pid)
    return st["VmRSS"] if st else 0


# --------------------------------------------------------------------------- the bench

class DBBench(RemoteBench):
    """bench_remote's RemoteBench (bench_loader's Bench: (L) is ``self.ds``, the
    checks of ``pass_datago``; the warm-up; ``pass_remote_datago``) with ``datago
    serve`` instead of nginx, (D) and a db (R)."""

    def __init__(self, corpus, n, data_root, ref, workdir: Path, page_size: int):
        super().__init__(corpus, n, data_root, ref, workdir, None, 0.0)
        self.page_size = page_size
        self.serve: Optional[DatagoServe] = None
        self.serve_pid: Optional[int] = None
        self.srv_secs: Dict[str, List[float]] = {}
        self.srv_rss_at_peak: Dict[str, List[int]] = {}
        self.setup_notes: List[str] = []

    # ---------------------------------------------------------------- set-up
    def server_cpu(self) -> float:
        return _proc_cpu(self.serve_pid) if self.serve_pid else 0.0

    def setup(self, names: List[str]) -> None:
        t0 = time.perf_counter()
        self.serve = DatagoServe(self.data_root, token=TOKEN, source=SOURCE_NAME,
                                 cache_dir=self.workdir / "serve_cache").start()
        self.t_serve = time.perf_counter() - t0
        self.serve_pid = self.serve.proc.pid
        self.serve_start_cpu = self.server_cpu()
        self.serve_start_rss = _status_rss(self.serve_pid)
        os.environ["DATAROOM_API_URL"] = self.serve.api_url
        os.environ["DATAROOM_API_KEY"] = TOKEN
        # (D): construction pages the whole selection (untimed, reported)
        s0, c0 = self.server_cpu(), _own_cpu()
        ds = self.datasets["D"] = self.build("D", "db", {
            "sources": SOURCE_NAME, "page_size": self.page_size,
            "api_url": self.serve.api_url, "api_key": TOKEN})
        t = self.t_build["D"]
        srv, cpu = self.server_cpu() - s0, _own_cpu() - c0
        src = ds.listing
        self.expected_ids["D"] = self.expected
        lst = [src.sample_id(i) for i in range(len(src))]
        if len(lst) != self.n or set(lst) != self.expected:
            self.problem(f"(D) the db listing has {len(lst)} rows ({len(set(lst))} distinct), "
                         f"{len(set(lst) - self.expected)} unexpected, "
                         f"{len(self.expected - set(lst))} missing; skipped "
                         f"{dict(src.skipped)}")
        got = list(zip(ds.sizes.height.tolist(), ds.sizes.width.tolist()))   # display_size's order
        bad = [(lst[i], got[i], self.corpus.infos[lst[i]].display_size)
               for i in range(len(lst)) if lst[i] in self.expected
               and tuple(got[i]) != tuple(self.corpus.infos[lst[i]].display_size)]
        if bad:
            self.problem(f"(D) {len(bad)} API sizes differ from read_header's display_size, "
                         f"e.g. {bad[:3]}")
        self.setup_notes.append(
            f"`datago serve` start-up (catalog: header scan of {self.n} images, empty sizes "
            f"cache): {self.t_serve:.2f} s, server CPU {self.serve_start_cpu:.2f} s, RSS "
            f"{_mb(self.serve_start_rss)} MB after start")
        self.setup_notes.append(
            f"(D) construction (untimed): {t:.2f} s = DatagoDataset() paging the whole "
            f"selection ({src.pages} pages of page_size {self.page_size}, {len(lst)} rows: "
            f"{src.pages / t:.1f} pages/s, {len(lst) / t:.0f} rows/s, construction overhead "
            f"included), this process {cpu:.2f} s CPU, server {srv:.2f} s CPU; listing order "
            f"= the sorted file list: {lst == self.rel}; sizes from the API equal "
            f"read_header's display_size for {len(lst) - len(bad)} of {len(lst)}; listing "
            f"{src.memory_bytes() / 1e3:.0f} kB in memory")

    def close(self) -> None:
        super().close()
        if self.serve is not None:
            self.serve.close()

    # ---------------------------------------------------------------- (P)
    def paging(self, page_size: int) -> str:
        """``GET /api/images/`` with one httpx client, following ``next``; the db
        client's query (``query_params``) at ``page_size``."""
        import httpx
        from datago.sources.db import query_params
        cfg = dataclasses.replace(self.datasets["D"].config.source, page_size=page_size)
        first = f"{self.serve.api_url}images/?{urlencode(query_params(cfg))}"
        headers = {"Authorization": f"Token {TOKEN}", "Accept": "application/json"}
        runs = []
        with httpx.Client(timeout=120.0) as client:
            for rep in range(PAGING_REPEATS):
                url, rows, pages, nbytes, ids = first, 0, 0, 0, set()
                s0, c0 = self.server_cpu(), time.process_time()
                t0 = time.perf_counter()
                while url:
                    r = client.get(url, headers=headers)
                    if r.status_code != 200:
                        self.problem(f"(P) page_size {page_size}: page {pages + 1} HTTP "
                                     f"{r.status_code}: {r.text[:200]}")
                        return f"(P) page_size {page_size}: FAILED (see Problems)"
                    page = json.loads(r.content)
                    nbytes += len(r.content)
                    pages += 1
                    rows += len(page["results"])
                    ids.update(x["id"] for x in page["results"])
                    url = page["next"]
                wall = time.perf_counter() - t0
                srv, cpu = self.server_cpu() - s0, time.process_time() - c0
                if rows != self.n or ids != self.expected:
                    self.problem(f"(P) page_size {page_size}: {rows} rows, {len(ids)} distinct "
                                 f"ids, want the {self.n} expected once each")
                runs.append((rows / wall, pages, nbytes, srv, cpu, wall))
        rates = [x[0] for x in runs]
        med = sorted(runs, key=lambda x: x[0])[(len(runs) - 1) // 2]
        _, pages, nbytes, srv, cpu, wall = med
        return (f"(P) server paging alone, page_size {page_size}: "
                f"{statistics.median(rates):.0f} rows/s ({min(rates):.0f}..{max(rates):.0f}, "
                f"{len(runs)} repeats; median run: {pages} pages, {wall * 1e3:.0f} ms, "
                f"{pages / wall:.1f} pages/s, {nbytes / pages / 1e3:.0f} kB/page, server "
                f"{srv / self.n * 1e6:.0f} us CPU per row ({srv / wall:.2f} cores), client "
                f"(httpx + json) {cpu / self.n * 1e6:.0f} us CPU per row)")

    def fetch_only(self, name: str = "D") -> str:
        """Every main image of (D) read by the dataset's own ``Fetcher`` from
        ``io_concurrency`` threads (as its IO pool does), nothing decoded: what
        serving a file costs the server, and fetching it the client."""
        ds = self.datasets[name]
        locs = [ds.listing.main_location(i) for i in range(len(ds.listing))]
        k = ds.config.source.io_concurrency
        want = sum((self.corpus.root / r).stat().st_size for r in self.rel)
        ds.fetcher.close()
        gc.collect()
        s0, c0 = self.server_cpu(), _own_cpu()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(k, thread_name_prefix="fetch-only") as ex:
            nbytes = sum(len(b) for b in ex.map(ds.fetcher.read, locs))
        wall = time.perf_counter() - t0
        cpu, srv = _own_cpu() - c0, self.server_cpu() - s0
        ds.fetcher.close()
        if nbytes != want:
            self.problem(f"({name}) fetch layer alone: read {nbytes} bytes, the files hold {want}")
        self.fetch_ms = (cpu / len(locs) * 1e3, srv / len(locs) * 1e3)
        return (f"({name}) fetch layer alone (GETs of image_direct_url, {k} threads, no "
                f"decode): {len(locs) / wall:.0f} req/s, {nbytes / wall / 1e6:.0f} MB/s, "
                f"{self.fetch_ms[0]:.2f} ms CPU per request in this process ({cpu / wall:.2f} "
                f"cores), server {self.fetch_ms[1]:.2f} ms CPU per request ({srv / wall:.2f} "
                f"cores)")

    # ---------------------------------------------------------------- (R)
    def ref_cfg(self, n: int) -> dict:
        cfg = ref_config(self.data_root, SIZE, RATIO, n)   # image_config as bench_loader's
        cfg["source_type"] = "db"
        cfg["source_config"] = {"sources": SOURCE_NAME, "page_size": self.page_size,
                                "require_images": True, "rank": 0, "world_size": 1}
        return cfg

    def pass_r(self, n: Optional[int] = None) -> dict:
        n_want = n or self.n
        out, total = self.ref.run(self.ref_cfg(n_want), n_want, self.workdir)
        tag = "(R)" if n is None else "(R) warm-up"
        samples = out["samples"]
        ids = [s[0] for s in samples]
        unknown = [i for i in ids if i not in self.expected]
        if out["n"] != n_want:
            self.problem(f"{tag} reference delivered {out['n']} samples, want {n_want}")
        if len(set(ids)) != len(ids):
            self.problem(f"{tag} reference delivered {len(ids) - len(set(ids))} duplicates")
        if unknown:
            self.problem(f"{tag} reference delivered {len(unknown)} ids that are not the API's "
                         f"ids of the corpus images, e.g. {unknown[:3]}")
        if n is None and set(ids) != self.expected:
            self.problem(f"{tag} reference missed {len(self.expected - set(ids))} of the "
                         f"{self.n} expected ids")
        empty = [s for s in samples if s[1] == 0 or s[2] == 0]
        off = [s for s in samples if s[0] in self.bucket_of and s[1]
               and (s[1], s[2]) != self.bucket_of[s[0]]]
        out.update(_total=total, _empty=len(empty),
                   _empty_png=sum(1 for s in empty if s[0] in self.expected
                                  and self.corpus.infos[s[0]].format == "png"),
                   _off_bucket=len(off),
                   _pngs=sum(1 for i in ids if i in self.expected
                             and self.corpus.infos[i].format == "png"))
        self.last_r = out
        return dict(wall=out["wall"], n=out["n"], mp=sum(self.mp_of.get(i, 0.0) for i in ids),
                    first=out["first"] or out["wall"], ours=out["ours"], busy=out["busy"],
                    steal=out["steal"], total=total, padded=None)

    # ---------------------------------------------------------------- timing
    def timed(self, name: str) -> Optional[Pass]:
        import faulthandler
        gc.collect()
        _malloc_trim()
        faulthandler.dump_traceback_later(HANG_DUMP_S, exit=False)
        if name == "D":
            self.datasets[name].fetcher.close()   # an empty pool (see the docstring)
        mem = TreeMemorySampler(MEM_INTERVAL, PSS_DUTY)
        busy0, steal0 = cpu_counters()
        s0 = self.server_cpu()
        c0 = _own_cpu()
        mem.start()
        try:
            r = self.run_variant(name)
        except Exception as exc:                                  # noqa: BLE001
            self.problem(f"({name}) raised {type(exc).__name__}: {exc}\n"
                         + "".join(traceback.format_exc().splitlines(True)[-8:]))
            return None
        finally:
            mem.stop()
            faulthandler.cancel_dump_traceback_later()
        busy1, steal1 = cpu_counters()
        srv = self.server_cpu() - s0
        if mem.error:
            self.problem(f"({name}) memory sampler failed: {mem.error}")
        self.srv_secs.setdefault(name, []).append(srv)
        self.srv_rss_at_peak.setdefault(name, []).append(
            mem.peak_detail.get(self.serve_pid, {}).get("VmRSS", 0))
        wall = r["wall"]
        if name == "R":
            # the reference measured its own CPU and the machine's over its timed wall;
            # the server's CPU is known only over the whole subprocess: its average there
            servers = srv / max(r["total"], 1e-9)
            ours, steal = r["ours"], r["steal"]
            others = max(0.0, r["busy"] - ours - servers)
        else:
            servers = srv / wall
            ours = max(0.0, _own_cpu() - c0 - mem.cpu) / wall
            steal = (steal1 - steal0) / wall
            others = max(0.0, (busy1 - busy0 - mem.cpu - srv) / wall - ours)
        return Pass(wall, r["n"], r["mp"], ours, servers, others, steal, r["first"],
                    mem.peak_rss, mem.peak_pss, r.get("padded"), None, r.get("inflight"),
                    mem.cpu / wall)


# --------------------------------------------------------------------------- reporting

def tables(bench: DBBench, names: List[str], times: Dict[str, list], rounds: int) -> tuple:
    desc = variants(bench.page_size)
    lines = [f"| variant | img/s (median of {rounds}) | source MP/s | img/s min..max | samples "
             f"| padded | first batch s | fetches / decodes in flight | CPU ms / img (ours) "
             f"| server CPU s / pass | peak tree RSS MB (server) | peak tree PSS MB "
             f"| cores: ours / server (median) / others, steal (max) | disturbed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        ok = [t for t in times[name] if t is not None]
        if not ok:
            lines.append(f"| ({name}) {desc[name]} | FAILED |" + " |" * 12)
            continue
        rates = [t.rate for t in ok]
        counts = "/".join(str(c) for c in sorted({t.n for t in ok}))
        padded = ("/".join(str(c) for c in sorted({t.padded for t in ok}))
                  if ok[0].padded is not None else "-")
        infl = (f"{statistics.median(t.inflight[0] for t in ok):.1f} / "
                f"{statistics.median(t.inflight[1] for t in ok):.2f}"
                if ok[0].inflight is not None else "-")
        srv = bench.srv_secs.get(name, [])
        srv_rss = bench.srv_rss_at_peak.get(name, [])
        lines.append(
            f"| ({name}) {desc[name]} | {statistics.median(rates):.1f} | "
            f"{statistics.median(t.mp / t.wall for t in ok):.1f} | "
            f"{min(rates):.1f}..{max(rates):.1f} | {counts} | {padded} | "
            f"{statistics.median(t.first for t in ok):.2f} | {infl} | "
            f"{statistics.median(t.cpu_ms for t in ok):.1f} | "
            f"{statistics.median(srv):.2f}{' (whole subprocess)' if name == 'R' else ''} | "
            f"{_mb(statistics.median(t.rss for t in ok))} "
            f"({_mb(statistics.median(srv_rss)) if srv_rss else '-'}) | "
            f"{_mb(statistics.median(t.pss for t in ok))} | "
            f"{statistics.median(t.ours for t in ok):.2f} / "
            f"{statistics.median(t.servers for t in ok):.2f} / "
            f"{max(t.others for t in ok):.2f}, {max(t.steal for t in ok):.2f} | "
            f"{sum(t.disturbed for t in ok)}/{len(ok)}"
            f"{'' if len(ok) == rounds else f' ({rounds - len(ok)} failed)'} |")
    lines += ["", "| ratio | median | min..max | rounds | target | result |",
              "|---|---:|---:|---:|---:|---|"]
    verdicts = []
    for label, num, den, target in RATIOS:
        ttext = f">= {target}" if target is not None else "-"
        per_round = [times[num][r].rate / times[den][r].rate for r in range(rounds)
                     if num in times and den in times
                     and times[num][r] is not None and times[den][r] is not None]
        if not per_round:
            if target is not None:
                missing = "/".join(x for x in (num, den) if x not in times) or "passes failed"
                lines.append(f"| {label} | - | - | 0 | {ttext} | NOT RUN ({missing}) |")
                verdicts.append((label, ttext, None))
            continue
        med = statistics.median(per_round)
        result = "info" if target is None else ("PASS" if med >= target else "FAIL")
        lines.append(f"| {label} | {med:.2f} | {min(per_round):.2f}..{max(per_round):.2f} | "
                     f"{len(per_round)} | {ttext} | {result} |")
        if target is not None:
            verdicts.append((label, ttext, result))
    return lines, verdicts


def notes(bench: DBBench, names: List[str], times: Dict[str, list],
          once: List[str]) -> List[str]:
    out = list(bench.setup_notes) + list(once)
    for name in names:
        secs = bench.seconds.get(name)
        ok = [t for t in times.get(name, []) if t is not None]
        if secs and ok:
            out.append(f"({name}) stats()['seconds'] summed over the pass (median): read "
                       f"{statistics.median(s['read'] for s in secs):.1f}, decode "
                       f"{statistics.median(s['decode'] for s in secs):.1f}, consumer wait "
                       f"{statistics.median(s['wait'] for s in secs):.1f}; wall "
                       f"{statistics.median(t.wall for t in ok):.1f} s")
    med_cpu = {k: statistics.median(t.cpu_ms for t in v if t is not None)
               for k, v in times.items() if any(t is not None for t in v)}
    if "L" in med_cpu:
        out.append("CPU per delivered image (loader processes, median): " + ", ".join(
            f"({k}) {v:.1f} ms" + (f" (+{v - med_cpu['L']:.1f} vs (L))" if k != "L" else "")
            for k, v in med_cpu.items()))
    if "D" in times:
        ok = [t for t in times["D"] if t is not None]
        if ok:
            srv_ms = statistics.median(t.servers * t.wall / t.n for t in ok) * 1e3
            d_ms = statistics.median(t.cpu_ms for t in ok)
            line = (f"(D) server CPU per image served (median): {srv_ms:.2f} ms; loader + "
                    f"server {d_ms + srv_ms:.1f} ms per image")
            if "L" in med_cpu:
                line += (f" against (L)'s {med_cpu['L']:.1f} ms: where CPU is the limit "
                         f"(server and loader on the same busy cores, both passes equally "
                         f"disturbed), D/L tends to their ratio, "
                         f"{med_cpu['L'] / (d_ms + srv_ms):.2f}")
            out.append(line)
    lr = getattr(bench, "last_r", None)
    if lr:
        out.append(
            f"(R) last pass: {lr['n']} samples consumed, then {lr['extra']} more delivered "
            f"({'stream exhausted' if lr['exhausted'] else 'still delivering after the drain'}); "
            f"channels {lr['channels']}; {lr['_empty']} samples with an empty (0x0) image "
            f"({lr['_empty_png']} of them PNG; {lr['_pngs']} PNG samples delivered); "
            f"{lr['_off_bucket']} non-empty samples in another bucket than datago's (it "
            f"ignores EXIF orientation and matches aspect ratios linearly); outside its wall: "
            f"import {lr['t_import']:.2f} s, DatagoClient() + start() {lr['t_start']:.3f} s; "
            f"whole subprocess {lr['_total']:.1f} s")
    ds = bench.datasets.get("D")
    if ds is not None:
        out.append(f"retried fetches (datago's Fetcher of (D), whole run, warm-up and fetch "
                   f"layer alone included): {dict(ds.fetcher.retried) or 0}")
    runs = {k: [t for t in v if t is not None] for k, v in times.items()}
    out.append("memory: peak over a pass of the summed RSS / PSS of the whole process tree "
               "(this process, the `datago serve` subprocess, the reference's subprocess; "
               "in brackets the server's RSS at that peak); median over rounds; the sampler "
               "thread used " + ", ".join(f"({k}) {statistics.median(t.mem_cpu for t in v):.3f}"
                                          for k, v in runs.items() if v)
               + " cores (median; not in 'ours' or 'others')")
    out.append("cores: 'server' is the `datago serve` process's CPU during the pass (for (R): "
               "over its whole subprocess); 'others' everything else on the machine (the memory "
               "sampler's own CPU excluded); '!' after a rate marks a disturbed pass (others > "
               f"{DISTURBED_OTHERS} or steal > {DISTURBED_STEAL} cores)")
    return out


def environment(bench: DBBench, ref_line: str) -> List[str]:
    c, rel = bench.corpus, bench.rel
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    fmts: Dict[str, int] = {}
    for r in rel:
        fmts[c.infos[r].format] = fmts.get(c.infos[r].format, 0) + 1
    nbytes = sum((c.root / r).stat().st_size for r in rel)
    src = Path(datago.__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True).stdout.split("\n")
        dirty = [d[3:] for d in dirty if d.strip()]
        tree = f"git {head}" + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")
    except OSError:
        tree = "git state unknown"
    try:
        from datago._core import _jpeg, _png, _resample
        core = (f"libjpeg-turbo {_jpeg.version()}, libspng {_png.version()}, "
                f"resample SIMD {_resample.simd()}")
    except Exception:                                             # noqa: BLE001
        core = "core versions unknown"
    ds = bench.datasets["D"]
    return [
        f"- CPU: {cpu_model()}, {cores} logical cores ({usable} usable); load average at "
        f"start {os.getloadavg()[0]:.2f}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, numpy "
        f"{np.__version__}, Pillow {PIL.__version__}, httpx {version('httpx')}; server: "
        f"`datago serve` (starlette {version('starlette')}, uvicorn {version('uvicorn')}, one "
        f"process, keep-alive 5 s), {bench.serve.api_url}",
        f"- datago {datago.__version__} ({tree}): {core}; num_threads {default_num_threads(1)} "
        f"(decode), io_concurrency {ds.config.source.io_concurrency} ((D): IO threads and "
        f"pooled connections), page_prefetch {ds.config.source.page_prefetch}; batch {BATCH}, "
        f"remainder 'pad', prefetch_batches {bench.ds.config.loader.prefetch_batches}",
        f"- {ref_line}",
        f"- corpus: {c.root}, {bench.n} images of {len(c.rel)} "
        f"({', '.join(f'{v} {k}' for k, v in sorted(fmts.items()))}), {nbytes / 1e6:.1f} MB, "
        f"served from {bench.data_root}; buckets make_buckets({SIZE}, {RATIO}, 0.5, 2.0) "
        f"({len(bench.buckets)}, {len({bench.bucket_of[r] for r in rel})} used); page cache "
        f"warm (files read once before timing)",
    ]


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", type=Path, help="folder searched recursively for .jpg/.jpeg/.png")
    ap.add_argument("--limit", type=int, default=None,
                    help="use the first N images (sorted), for every variant")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    ap.add_argument("--page-size", type=int, default=PAGE_SIZE,
                    help=f"page_size of (D) and (R) (default {PAGE_SIZE}; the server caps 2000)")
    ap.add_argument("--ref-venv", type=Path, default=Path("/tmp/datago_ref"),
                    help="venv of the reference datago (created when missing)")
    ap.add_argument("--no-ref", action="store_true", help="skip the reference variant (R)")
    ap.add_argument("--out", type=Path, default=None, help="also write the tables to this .md")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be >= 1")
    if not 1 <= args.page_size <= 2000:
        ap.error("--page-size must be in 1..2000")

    # a plain kill runs the clean-up below (server, temporary folder)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.perf_counter()
    root = args.corpus.resolve()
    corpus = load_corpus(root)
    n = min(args.limit, len(corpus.rel)) if args.limit else len(corpus.rel)
    workdir = Path(tempfile.mkdtemp(prefix="bench_db_"))
    data_root = (root if n == len(corpus.rel)
                 else link_view(workdir / "first_n", root, corpus.rel[:n]))
    ref, ref_why = None, None
    if args.no_ref:
        ref_why = "--no-ref given"
    else:
        ref = Reference(args.ref_venv, workdir)
        ref_why = ref.ensure()
        if ref_why:
            ref = None
    names = [v for v in VARIANT_NAMES if v != "R" or ref is not None]
    bench = DBBench(corpus, n, data_root, ref, workdir, args.page_size)
    md: List[str] = []
    verdicts: list = []
    try:
        bench.setup(names)
        failed = bench.warm_up(names)
        if "R" in failed:
            ref_why = f"warm-up failed: {bench.problems[-1]}"
        names = [x for x in names if x not in failed]
        paging = [bench.paging(p) for p in PAGING_SIZES]
        if "D" in names:
            paging.append(bench.fetch_only("D"))
        ref_line = (f"reference datago: {args.ref_venv}, db source on {bench.serve.api_url} "
                    f"(sources {SOURCE_NAME!r}, page_size {args.page_size}), limit = {n}, "
                    f"to_numpy_array() per sample"
                    if "R" in names else f"reference datago (R): NOT RUN: {ref_why}")
        md = ["## Environment", ""] + environment(bench, ref_line)
        md += [f"- command: `python benchmarks/bench_db.py "
               f"{' '.join(sys.argv[1:] if argv is None else argv)}`", ""]
        print("\n".join(md), flush=True)
        t_rounds = time.perf_counter()
        times = run_rounds(bench, names, args.rounds)
        elapsed = time.perf_counter() - t_rounds
        ds = bench.datasets.get("D")
        if ds is not None and ds.fetcher.retried:
            bench.problem(f"(D) datago's Fetcher retried {dict(ds.fetcher.retried)} fetches "
                          f"(whole run) from a loopback server that injects no faults (no "
                          f"sample was lost: see the checks)")
        table, verdicts = tables(bench, names, times, args.rounds)
        section = [f"## db source over `datago serve`, buckets {SIZE} ({n} images, "
                   f"{args.rounds} rounds)", ""]
        section += [f"- {s}" for s in notes(bench, names, times, paging)]
        section += [f"- timed passes took {elapsed:.0f} s", ""] + table + [""]
        print("\n" + "\n".join(section), flush=True)
        md += section
    finally:
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    info = ref.info if ref is not None else None
    tail = ["## Summary", ""]
    if info:
        tail.append(f"- reference datago {info['version']} (Python {info['python']}, numpy "
                    f"{info['numpy']}, DATAGO_MAX_TASKS={info['max_tasks']}), from "
                    f"{args.ref_venv}")
    if "R" not in names:
        tail.append(f"- (R) reference datago not run: {ref_why}")
    for label, target, result in verdicts:
        tail.append(f"- {label} {target}: {result or 'NOT RUN'}")
    tail.append(f"- problems: {len(bench.problems)}" + (":" if bench.problems else ""))
    tail += [f"  - {p}" for p in bench.problems]
    tail.append(f"- total runtime: {time.perf_counter() - t_start:.0f} s")
    print("\n" + "\n".join(tail), flush=True)
    md += tail
    if args.out:
        args.out.write_text("\n".join(md) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
