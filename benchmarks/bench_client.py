#!/usr/bin/env python
"""DatagoClient against the reference datago's DatagoClient: get_sample() +
to_numpy_array() samples/s on the same files, with 1 and 4 consumer threads.

    python benchmarks/bench_client.py CORPUS --rounds R [--limit N] [--threads 1,4]
                                      [--ref-venv /tmp/datago_ref] [--out FILE.md]

The images are the .jpg/.jpeg/.png files under CORPUS (recursive, sorted, hidden
files skipped); ``--limit N`` keeps the first N, through a folder of symlinks, so
both clients see exactly those N files (the page cache is warmed once, untimed).
Both clients get the same JSON config, the reference's schema: the file source,
``random_sampling`` false, buckets ``default_image_size`` 512,
``downsampling_ratio`` 16, aspect ratios 0.5..2.0, ``limit`` N,
``samples_buffer_size`` 64.

Each pass is one subprocess running the same helper script: ours with this
interpreter, the reference with its own venv's (``--ref-venv``, default
/tmp/datago_ref, holding ``pip install datago``; it is never installed here).
The helper builds the client, calls ``start()``, then T consumer threads share
it: each loops ``s = client.get_sample()``, ``a = s.image.to_numpy_array()``
(checked: (H, W, C) uint8; the channel counts are reported: the reference keeps
grey images in 1 channel and RGBA in 4, ours gives RGB) until N samples are
consumed.  Timed: from the first ``get_sample()`` to the N-th sample consumed
(construction and ``start()`` are reported apart).  Passes are interleaved: every
round runs both clients for each thread count, their order alternating between
rounds.  Reported: median samples/s per client and thread count, the
ours/reference ratio of each round and its median (target >= 1.5), the CPU time
per sample of each client's process (its efficiency, which a busy machine
disturbs less than samples/s), and the peak RSS of each pass's process tree
(sampled every 20 ms; also the helper's own ``ru_maxrss``), median over rounds.
Checks, listed under "Problems": each pass delivered N samples, all of the N
files (ids compared as paths relative to the folder; the reference's ids are
JSON-quoted absolute paths).  The files the two clients put into different
buckets are counted in a note (a known, deliberate difference).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from _common import (TreeMemorySampler, clean_env, client_config, cpu_counters, cpu_model,
                     find_images, link_view, version)
from _report import (Report, add_out_arg, check_corpus_args, command_line, make_parser,
                     problem_lines, runtime_line)

SIZE, RATIO, MIN_AR, MAX_AR = 512, 16, 0.5, 2.0
BUFFER = 64
TARGET = 1.5
MEM_INTERVAL = 0.02

HELPER = r'''
import json, os, resource, sys, threading, time
t_proc = time.perf_counter()
args = json.loads(sys.argv[1])
from importlib import metadata
import numpy as np
from datago import DatagoClient
t_import = time.perf_counter() - t_proc
cfg, n_want, threads, root = args["config"], args["n"], args["threads"], args["root"]
t0 = time.perf_counter()
client = DatagoClient(json.dumps(cfg))
client.start()
t_start = time.perf_counter() - t0
lock = threading.Lock()
taken, done, t_end, first = [0], [0], [None], [None]
seen, bad, ended, channels = [], [], [0], {}
c0 = time.process_time()
t1 = time.perf_counter()

def consume():
    while True:
        with lock:
            if taken[0] >= n_want:
                return
            taken[0] += 1
        s = client.get_sample()
        if s is None:
            with lock:
                ended[0] += 1
            return
        a = s.image.to_numpy_array()
        now = time.perf_counter()
        ok = a.ndim == 3 and a.dtype == np.uint8
        with lock:
            if first[0] is None:
                first[0] = now - t1
            done[0] += 1
            seen.append((str(s.id), int(a.shape[0]), int(a.shape[1])))
            c = int(a.shape[2]) if a.ndim == 3 else 1
            channels[c] = channels.get(c, 0) + 1
            if not ok:
                bad.append([str(s.id), list(a.shape), str(a.dtype)])
            if done[0] == n_want:
                t_end[0] = now

workers = [threading.Thread(target=consume) for _ in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
wall = (t_end[0] or time.perf_counter()) - t1
cpu = time.process_time() - c0
client.stop()
base = os.path.normpath(os.path.abspath(root))
ids = []
for sid, h, w in seen:       # the reference's ids are JSON-quoted absolute paths
    p = os.path.normpath(os.path.join(base, sid.strip('"')))
    ids.append([os.path.relpath(p, base) if p.startswith(base + os.sep) else sid, h, w])
print(json.dumps({"version": metadata.version("datago"), "python": sys.version.split()[0],
                  "n": done[0], "wall": wall, "first": first[0], "cpu": cpu,
                  "t_import": t_import, "t_start": t_start, "ended_early": ended[0],
                  "bad": bad[:5], "samples": ids, "channels": channels,
                  "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
'''


def list_images(root: Path) -> List[str]:
    return sorted(p.relative_to(root).as_posix() for p in find_images(root))


class Runner:
    """One client flavour: a Python interpreter running the helper."""

    def __init__(self, name: str, python: Path, isolated: bool):
        self.name = name
        self.python = python
        self.isolated = isolated
        self.info: Optional[dict] = None

    def run(self, helper: Path, cfg: dict, n: int, threads: int, root: Path) -> dict:
        arg = json.dumps({"config": cfg, "n": n, "threads": threads, "root": str(root)})
        env = clean_env()
        cmd = [str(self.python)] + (["-I"] if self.isolated else []) + [str(helper), arg]
        busy0, steal0 = cpu_counters()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, cwd=tempfile.gettempdir())
        mem = TreeMemorySampler(interval=MEM_INTERVAL, pss_duty=0.01, root=proc.pid).start()
        try:
            out, err = proc.communicate(timeout=300 + n)
        finally:
            mem.stop()
            if proc.poll() is None:
                proc.kill()
        total = time.perf_counter() - t0
        busy1, steal1 = cpu_counters()
        if proc.returncode != 0:
            raise RuntimeError(f"{self.name} helper exited {proc.returncode}: {err[-800:]}")
        try:
            res = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise RuntimeError(f"{self.name} helper printed no JSON: {out[-300:]!r} "
                               f"{err[-300:]!r}") from None
        res["peak_rss"] = max(mem.peak_rss, res["maxrss"])
        res["total"] = total
        res["machine_busy"] = (busy1 - busy0) / total if total else 0.0
        res["steal"] = (steal1 - steal0) / total if total else 0.0
        self.info = res
        return res


def probe(python: Path, isolated: bool) -> Optional[str]:
    """None when ``python`` can import datago.DatagoClient, else why not."""
    if not python.exists():
        return f"{python} does not exist"
    p = subprocess.run([str(python)] + (["-I"] if isolated else []) +
                       ["-c", "from datago import DatagoClient"], capture_output=True,
                       text=True, cwd=tempfile.gettempdir())
    return None if p.returncode == 0 else f"{python} cannot import DatagoClient: {p.stderr[-300:]}"


def mb(b: float) -> str:
    return f"{b / 2**20:.0f}"


def main(argv=None) -> int:
    ap = make_parser(__doc__)
    ap.add_argument("corpus", type=Path, help="folder searched recursively for .jpg/.jpeg/.png")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--limit", type=int, default=None, help="use the first N images (sorted)")
    ap.add_argument("--threads", default="1,4", help="consumer thread counts (default 1,4)")
    ap.add_argument("--ref-venv", type=Path, default=Path("/tmp/datago_ref"),
                    help="venv holding the reference datago (pip install datago)")
    add_out_arg(ap, "report")
    args = ap.parse_args(argv)
    check_corpus_args(ap, args)
    thread_counts = [int(t) for t in args.threads.split(",") if t.strip()]
    if not thread_counts or min(thread_counts) < 1:
        ap.error("--threads must list counts >= 1")

    t_all = time.perf_counter()
    root = args.corpus.resolve()
    rel = list_images(root)
    if not rel:
        sys.exit(f"no .jpg/.jpeg/.png files under {root}")
    n = min(args.limit, len(rel)) if args.limit else len(rel)
    nbytes = 0
    for r in rel[:n]:                                  # warm the page cache (untimed)
        nbytes += len((root / r).read_bytes())
    work = Path(tempfile.mkdtemp(prefix="bench_client_"))
    data_root = root if n == len(rel) else link_view(work / "first_n", root, rel[:n])
    helper = work / "client_helper.py"
    helper.write_text(HELPER)
    cfg = client_config(data_root, SIZE, RATIO, n, MIN_AR, MAX_AR, BUFFER)

    ours = Runner("datago", Path(sys.executable), isolated=False)
    ref = Runner("reference", args.ref_venv / "bin" / "python", isolated=True)
    for r in (ours, ref):
        why = probe(r.python, r.isolated)
        if why:
            sys.exit(f"{r.name}: {why}")

    report = Report()
    report.add(["## Environment", "",
                f"- machine: {cpu_model()}, {os.cpu_count()} CPUs "
                f"({len(os.sched_getaffinity(0))} usable), {platform.system()} "
                f"{platform.release()}",
                f"- datago {version('datago')} (this checkout), numpy {version('numpy')}, "
                f"Pillow {version('pillow')}, Python {platform.python_version()}",
                f"- corpus: {root}, first {n} of {len(rel)} images, {nbytes / 1e6:.0f} MB",
                f"- config (both clients): file source, buckets {SIZE}/{RATIO}, aspect "
                f"{MIN_AR}..{MAX_AR}, limit {n}, samples_buffer_size {BUFFER}; "
                f"DATAGO_MAX_TASKS={os.environ.get('DATAGO_MAX_TASKS')}",
                command_line("bench_client.py", argv), ""], gap=False)

    results: Dict[tuple, List[dict]] = {}
    problems: List[str] = []
    shapes: Dict[str, Dict[str, tuple]] = {"datago": {}, "reference": {}}
    expected = set(rel[:n])
    for rnd in range(args.rounds):
        for k, threads in enumerate(thread_counts):
            order = [ours, ref] if (rnd + k) % 2 == 0 else [ref, ours]
            for runner in order:
                try:
                    res = runner.run(helper, cfg, n, threads, data_root)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    problems.append(f"round {rnd + 1}, {threads} threads, {runner.name}: {e}")
                    print(f"  PROBLEM {problems[-1]}", flush=True)
                    continue
                results.setdefault((runner.name, threads), []).append(res)
                got = {sid for sid, _, _ in res["samples"]}
                if res["n"] != n:
                    problems.append(f"round {rnd + 1}, {threads} threads, {runner.name}: "
                                    f"{res['n']} samples, want {n}")
                if got != expected:
                    problems.append(f"round {rnd + 1}, {threads} threads, {runner.name}: "
                                    f"{len(got - expected)} unexpected ids, "
                                    f"{len(expected - got)} files missing")
                if res["bad"]:
                    problems.append(f"{runner.name}: arrays not (H, W, C) uint8: {res['bad']}")
                for sid, h, w in res["samples"]:
                    shapes[runner.name][sid] = (h, w)
                print(f"  round {rnd + 1} threads {threads} {runner.name:9s} "
                      f"{res['n'] / res['wall']:7.1f} samples/s  wall {res['wall']:.2f} s  "
                      f"first {res['first'] or 0:.3f} s  start {res['t_start']:.2f} s  "
                      f"peak RSS {mb(res['peak_rss'])} MB  cpu {res['cpu'] / res['wall']:.2f} "
                      f"cores", flush=True)
    differ = [sid for sid in shapes["datago"].keys() & shapes["reference"].keys()
              if shapes["datago"][sid] != shapes["reference"][sid]]
    same = len(shapes["datago"].keys() & shapes["reference"].keys())
    bucket_note = (f"- buckets: {same - len(differ)} of {same} files in the same bucket as the "
                   f"reference's" + (f"; the other {len(differ)} (e.g. {differ[0]}: ours "
                                     f"{shapes['datago'][differ[0]]}, reference "
                                     f"{shapes['reference'][differ[0]]}) differ on purpose: "
                                     f"datago matches aspect ratios by log ratio and applies "
                                     f"EXIF orientation, the reference does neither"
                                     if differ else ""))

    table = ["## Throughput: get_sample() + to_numpy_array()", "",
             "| consumer threads | datago samples/s | reference samples/s | ratio per round "
             "| ratio median | target | CPU ms/sample datago / reference "
             "| peak RSS datago / reference (MB) |",
             "|---:|---:|---:|---|---:|---:|---|---|"]
    verdicts = []
    for threads in thread_counts:
        a, b = results.get(("datago", threads), []), results.get(("reference", threads), [])
        rounds = min(len(a), len(b))
        ratios = [(a[i]["n"] / a[i]["wall"]) / (b[i]["n"] / b[i]["wall"]) for i in range(rounds)]
        med = statistics.median(ratios) if ratios else float("nan")
        ok = "PASS" if ratios and med >= TARGET else "FAIL"
        verdicts.append((threads, med, ok))
        rate = (lambda rs: f"{statistics.median(r['n'] / r['wall'] for r in rs):.1f}"
                if rs else "-")
        rss = (lambda rs: mb(statistics.median(r["peak_rss"] for r in rs)) if rs else "-")
        cpu = (lambda rs: f"{statistics.median(1e3 * r['cpu'] / r['n'] for r in rs):.1f}"
               if rs else "-")
        table.append(f"| {threads} | {rate(a)} | {rate(b)} | "
                     f"{', '.join(f'{x:.2f}' for x in ratios)} | {med:.2f} | >= {TARGET} {ok} | "
                     f"{cpu(a)} / {cpu(b)} | {rss(a)} / {rss(b)} |")
    info = ref.info or {}
    table += ["", f"- reference datago {info.get('version', '?')} (Python "
              f"{info.get('python', '?')}) from {args.ref_venv}", bucket_note]
    for name in ("datago", "reference"):
        rs = [r for (nm, _), v in results.items() if nm == name for r in v]
        if rs:
            table.append(f"- {name}: client construction + start() "
                         f"{statistics.median(r['t_start'] for r in rs):.2f} s, first sample "
                         f"{statistics.median(r['first'] or 0 for r in rs):.3f} s, CPU "
                         f"{statistics.median(r['cpu'] / r['wall'] for r in rs):.2f} cores, "
                         f"machine busy {statistics.median(r['machine_busy'] for r in rs):.2f} "
                         f"cores (median over its passes; not timed); channels delivered "
                         f"{rs[-1].get('channels')}")
    table += ["", "## Summary", ""]
    table += [f"- {t} consumer thread(s): ours/reference {m:.2f} (target >= {TARGET}): {ok}"
              for t, m, ok in verdicts]
    table += problem_lines(problems) + [runtime_line(t_all)]
    report.add(table)
    report.write(args.out)
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
