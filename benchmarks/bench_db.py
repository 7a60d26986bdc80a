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
subprocess (bench_remote's ``loader_tree``, which reads children from each
process's main thread only; the server and the reference are started from the
main thread); the server's own RSS at that peak is shown too.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import signal
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import urlencode

from _common import measure_pass, own_cpu, proc_cpu, process_status, version
from _report import (FIRST, PADDED, PSS, SAMPLES, Column, Report, add_corpus_args, add_out_arg,
                     add_ref_args, check_corpus_args, command_line, cpu_line, datago_line,
                     disturbed_column, disturbed_rule, make_parser, mb, med, memory_note,
                     rate_columns, ratio_header, ratio_rows, run_rounds, seconds_notes,
                     stack_line, variant_table)
from bench_loader import (BATCH, HANG_DUMP_S, MEM_INTERVAL, PSS_DUTY, open_corpus,
                          open_reference, ref_config)
from bench_remote import (CPU_MS, INFLIGHT, RATIO, SIZE, Pass, RemoteBench, cores_column,
                          cpu_per_image, cpu_per_image_note, loader_tree, ref_pass_note,
                          round_summary, summary)

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
    st = process_status(pid)
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
        return proc_cpu(self.serve_pid) if self.serve_pid else 0.0

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
        s0, c0 = self.server_cpu(), own_cpu()
        ds = self.datasets["D"] = self.build("D", "db", {
            "sources": SOURCE_NAME, "page_size": self.page_size,
            "api_url": self.serve.api_url, "api_key": TOKEN})
        t = self.t_build["D"]
        srv, cpu = self.server_cpu() - s0, own_cpu() - c0
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
            f"{mb(self.serve_start_rss)} MB after start")
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
        s0, c0 = self.server_cpu(), own_cpu()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(k, thread_name_prefix="fetch-only") as ex:
            nbytes = sum(len(b) for b in ex.map(ds.fetcher.read, locs))
        wall = time.perf_counter() - t0
        cpu, srv = own_cpu() - c0, self.server_cpu() - s0
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
        out, total, tag, ids = self.run_ref(n, self.expected,
                                            "that are not the API's ids of the corpus images")
        samples = out["samples"]
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
        return self.ref_result(out, total, sum(self.mp_of.get(i, 0.0) for i in ids))

    # ---------------------------------------------------------------- timing
    def timed(self, name: str) -> Optional[Pass]:
        # (D) starts with an empty pool (see the docstring)
        got = measure_pass(lambda: self.run_variant(name), self.problem, name,
                           interval=MEM_INTERVAL, pss_duty=PSS_DUTY, hang_dump_s=HANG_DUMP_S,
                           before=self.datasets[name].fetcher.close if name == "D" else None,
                           server_cpu=self.server_cpu, tree=loader_tree)
        if got is None:
            return None
        r, cost = got
        self.srv_secs.setdefault(name, []).append(cost.server)
        self.srv_rss_at_peak.setdefault(name, []).append(
            cost.mem.peak_detail.get(self.serve_pid, {}).get("VmRSS", 0))
        return self.to_pass(name, r, cost, None)


# --------------------------------------------------------------------------- reporting

def tables(bench: DBBench, names: List[str], times: Dict[str, list], rounds: int) -> tuple:
    def server_cpu(name, _):
        return (f"{med(bench.srv_secs.get(name, [])):.2f}"
                f"{' (whole subprocess)' if name == 'R' else ''}")

    def rss(name, ok):
        srv_rss = bench.srv_rss_at_peak.get(name, [])
        return f"{mb(med(t.rss for t in ok))} ({mb(med(srv_rss)) if srv_rss else '-'})"

    columns = rate_columns(rounds) + [
        SAMPLES, PADDED, FIRST, INFLIGHT, CPU_MS, Column("server CPU s / pass", server_cpu),
        Column("peak tree RSS MB (server)", rss), PSS, cores_column("server"),
        disturbed_column(rounds)]
    lines = variant_table(columns, names, times, variants(bench.page_size))
    rows, verdicts = ratio_rows(RATIOS, times, rounds)
    return lines + [""] + ratio_header() + rows, verdicts


def notes(bench: DBBench, names: List[str], times: Dict[str, list],
          once: List[str]) -> List[str]:
    out = list(bench.setup_notes) + list(once)
    out += seconds_notes(names, bench.seconds, times)
    med_cpu = cpu_per_image(times)
    if "L" in med_cpu:
        out.append(cpu_per_image_note(med_cpu))
    if "D" in times:
        ok = [t for t in times["D"] if t is not None]
        if ok:
            srv_ms = med(t.servers * t.wall / t.n for t in ok) * 1e3
            d_ms = med(t.cpu_ms for t in ok)
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
        out.append(ref_pass_note(lr))
    ds = bench.datasets.get("D")
    if ds is not None:
        out.append(f"retried fetches (datago's Fetcher of (D), whole run, warm-up and fetch "
                   f"layer alone included): {dict(ds.fetcher.retried) or 0}")
    out.append(memory_note("the whole process tree (this process, the `datago serve` "
                           "subprocess, the reference's subprocess; in brackets the server's "
                           "RSS at that peak)", times))
    out.append("cores: 'server' is the `datago serve` process's CPU during the pass (for (R): "
               "over its whole subprocess); 'others' everything else on the machine (the memory "
               "sampler's own CPU excluded); '!' after a rate marks a disturbed pass "
               f"({disturbed_rule()})")
    return out


def environment(bench: DBBench, ref_line: str) -> List[str]:
    c, rel = bench.corpus, bench.rel
    nbytes = sum((c.root / r).stat().st_size for r in rel)
    ds = bench.datasets["D"]
    return [
        cpu_line(),
        f"{stack_line()}, httpx {version('httpx')}; server: `datago serve` (starlette "
        f"{version('starlette')}, uvicorn {version('uvicorn')}, one process, keep-alive 5 s), "
        f"{bench.serve.api_url}",
        f"{datago_line()}, io_concurrency {ds.config.source.io_concurrency} ((D): IO threads "
        f"and pooled connections), page_prefetch {ds.config.source.page_prefetch}; batch "
        f"{BATCH}, remainder 'pad', prefetch_batches {bench.ds.config.loader.prefetch_batches}",
        f"- {ref_line}",
        bench.corpus_line(f", {nbytes / 1e6:.1f} MB, served from {bench.data_root}; buckets "
                          f"{bench.buckets_text()}; page cache warm (files read once before "
                          f"timing)"),
    ]


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = make_parser(__doc__)
    add_corpus_args(ap)
    ap.add_argument("--page-size", type=int, default=PAGE_SIZE,
                    help=f"page_size of (D) and (R) (default {PAGE_SIZE}; the server caps 2000)")
    add_ref_args(ap, "R")
    add_out_arg(ap)
    args = ap.parse_args(argv)
    check_corpus_args(ap, args)
    if not 1 <= args.page_size <= 2000:
        ap.error("--page-size must be in 1..2000")

    # a plain kill runs the clean-up below (server, temporary folder)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.perf_counter()
    corpus, n, workdir, data_root = open_corpus(args.corpus, args.limit, "bench_db_")
    ref, ref_why = open_reference(args.no_ref, args.ref_venv, workdir)
    names = [v for v in VARIANT_NAMES if v != "R" or ref is not None]
    bench = DBBench(corpus, n, data_root, ref, workdir, args.page_size)
    report = Report()
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
        report.add(["## Environment", ""] + environment(bench, ref_line)
                   + [command_line("bench_db.py", argv), ""], gap=False)
        t_rounds = time.perf_counter()
        times = run_rounds(bench.timed, names, args.rounds, round_summary)
        elapsed = time.perf_counter() - t_rounds
        bench.check_retries(["D"])
        table, verdicts = tables(bench, names, times, args.rounds)
        section = [f"## db source over `datago serve`, buckets {SIZE} ({n} images, "
                   f"{args.rounds} rounds)", ""]
        section += [f"- {s}" for s in notes(bench, names, times, paging)]
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
