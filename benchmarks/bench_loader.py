#!/usr/bin/env python
"""End-to-end loader throughput: DatagoDataset + DataLoader against a Pillow
DataLoader and the reference (Rust) datago from PyPI.

    python benchmarks/bench_loader.py CORPUS_DIR [--limit N] [--rounds R] [--batch B]
                                      [--sizes 512,1024] [--ref-venv /tmp/datago_ref]
                                      [--no-ref] [--d-in-order-false] [--out FILE.md]

The images are the .jpg/.jpeg/.png files under CORPUS_DIR (recursive, sorted,
hidden files skipped; ``--limit`` keeps the first N, for every variant).  Files
are read from disk by every variant (the page cache is warmed once, untimed).
For each bucket size (``make_buckets(512, 16, 0.5, 2.0)``,
``make_buckets(1024, 32, 0.5, 2.0)``), batches of B images (``--batch``,
default 32) of one bucket:

(a) Pillow, written the way a user would (bucket size 512 only, see --pil-sizes):
    a map-style Dataset over the sorted file list (Image.open, exif_transpose,
    convert("RGB"), LANCZOS cover resize, centre crop, CHW uint8 tensor), a
    bucket-aware batch sampler (every image's size read once up front with
    datago.read_header, untimed; batches of B per bucket, partial last batches
    kept), DataLoader(num_workers=2) with the default collate;
(b) the reference Rust datago from PyPI, in its own venv (--ref-venv, created with
    ``python -m venv`` + ``pip install datago numpy`` when missing; ``--no-ref``
    skips it), run as a subprocess: DatagoClient over the file source with the
    same buckets, ``limit`` = N, every sample converted with
    ``s.image.to_numpy_array()``; the subprocess times itself from the first
    get_sample() to the N-th sample consumed (interpreter start, import, client
    construction and start() are excluded and reported separately);
(c) DatagoDataset, DataLoader(batch_size=None, num_workers=0): threads only
    (``default_num_threads(1)``: all usable cores);
(d) DatagoDataset, DataLoader(batch_size=None, num_workers=2,
    persistent_workers=False), the default in_order=True, ``default_num_threads(2)``
    threads per worker: worker start-up is inside the timed pass (also reported on
    its own, with the time to the first batch).  DatagoDataset plans the epoch
    and worker w of 2 takes the plan's steps w, w + 2, ..., so both workers have
    the same work (to one batch) and the loader's strict round-robin collects them
    in plan order without stalling.  ``--d-in-order-false`` passes in_order=False
    instead (torch >= 2.6).

DatagoDataset (c, d) is built over exactly the N files (their folder when N is
all of them, else a folder of symlinks mirroring the first N), with
``remainder="pad"`` (the default, set explicitly): the last batch of each bucket
is completed by repeating samples of that bucket, so (c)/(d) deliver N + padded
images (``ds.stats()["padded"]``, shown per variant); img/s counts delivered
images (a padded slot is a real read and decode).

The machine this runs on is usually shared and noisy, so the variants are
interleaved: R rounds, each running every variant once over the whole list in an
order that rotates between rounds.  Reported: median img/s per variant, and each
ratio computed per round, then its median (min..max across rounds), against its
target.  Every pass is checked; anything off is listed under "Problems": (a) the
number of samples and each batch's shape; (c)/(d) every expected file delivered
at least once and no other, repeats == ``stats()["padded"]`` == the plan's
padded slots, ``stats()``: samples == delivered, skipped == 0,
dropped_remainder == 0, batches == ``len(ds)``; batch["step"] 0..len(ds)-1 once
each (in order unless in_order=False); each batch's shape and bucket against the
headers of its files.

Memory: during every timed pass a thread samples the whole process tree (this
process and all its descendants: DataLoader workers, the reference's
subprocess) every 50 ms and keeps the peak of the summed VmRSS and of the summed
PSS (``/proc/<pid>/smaps_rollup``; a shared-memory batch mapped by a worker and
by the trainer counts twice in RSS, once in PSS).  PSS reads cost the kernel a
page-table walk, so they are rationed (``--pss-duty``, see
``_common.TreeMemorySampler``); the sampler's CPU is excluded from "cores: ours"
and reported on its own.  Per variant: median over rounds of the per-pass peaks,
and the tree's make-up (this process / its children; anon, file, shmem) at the
RSS peak.  Before each pass: gc.collect() and glibc malloc_trim(0), so a pass
does not start with what earlier passes freed but the heap kept (forked workers
would count it again).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

import numpy as np
import PIL
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

from _common import (RSS_FIELDS, VenvHelper, client_config, cover_size, find_images,
                     is_disturbed, link_view, measure_pass, rate_of, reported_cores, text_tail)
from _report import (FIRST, PADDED, PSS, RSS, SAMPLES, Column, Report, Verdict, add_corpus_args,
                     add_out_arg, add_ref_args, check_corpus_args, command_line, core_versions,
                     cpu_line, disturbed_column, disturbed_rule, make_parser, mb, med,
                     not_run_row, problem_lines, rate_columns, ratio_header, ratio_row,
                     reference_line, run_rounds, runtime_line, stack_line, tally, variant_table,
                     verdict_lines)

DOWNSAMPLING = {512: 16, 1024: 32}        # bucket size -> VAE factor / patch size
MIN_AR, MAX_AR = 0.5, 2.0
BATCH = 32                                # --batch
BUFFER = 64                               # samples_buffer_size, datago and the reference
PIL_WORKERS = 2
D_WORKERS = 2
# DataLoader(in_order=False) exists from torch 2.6
IN_ORDER_SUPPORTED = "in_order" in inspect.signature(DataLoader.__init__).parameters
D_IN_ORDER = True                         # --d-in-order-false
MEM_INTERVAL = 0.05                       # seconds between process-tree memory samples
PSS_DUTY = 0.05                           # --pss-duty
WARMUP_IMAGES = 32
SANITY_SPREAD = 12                        # + up to 4 rotated, 4 PNG, 2 RGBA/LA/P, 2 grey
REF_DRAIN_S = 10.0                        # after N samples, count the reference's extras
HANG_DUMP_S = 900                         # dump all stacks if one pass runs this long

VARIANT_NAMES = ("a", "b", "c", "d")


def variants() -> Dict[str, str]:
    """name -> description; per bucket size (a) runs only where --pil-sizes says."""
    return {
        "a": f"Pillow Dataset + bucket batch sampler, DataLoader(num_workers={PIL_WORKERS})",
        "b": "reference datago (Rust, PyPI), DatagoClient, subprocess",
        "c": "DatagoDataset, DataLoader(num_workers=0)",
        "d": f"DatagoDataset, DataLoader(num_workers={D_WORKERS}"
             + (", in_order=False)" if not D_IN_ORDER else ")"),
    }


# (label, numerators (max of), denominator, target or None, bucket sizes it applies to);
# an info row (target None) is left out where a target row of the same label applies
RATIOS = [
    ("max(c,d)/a", ("c", "d"), "a", 3.5, (512,)),
    ("max(c,d)/b", ("c", "d"), "b", 2.0, (512,)),
    ("max(c,d)/b", ("c", "d"), "b", 1.2, (1024,)),
    ("d/c", ("d",), "c", 0.95, (512, 1024)),
    ("c/a", ("c",), "a", None, None),
    ("d/a", ("d",), "a", None, None),
    ("c/b", ("c",), "b", None, None),
    ("d/b", ("d",), "b", None, None),
    ("d/c", ("d",), "c", None, None),
]
# (label, variant, Run field, upper bound in MB, bucket sizes): median over rounds of
# the per-pass peak of the process tree's summed RSS / PSS
MEM_TARGETS = [
    ("peak tree RSS (d)", "d", "rss", 1500, (1024,)),
]


# --------------------------------------------------------------------------- datago import

def _import_datago():
    """Import datago; src/ may be being rebuilt by someone else: retry twice, 30 s apart."""
    for attempt in range(3):
        try:
            import datago                                       # noqa: F401
            from datago.dataset import DatagoDataset, default_num_threads
            return datago, DatagoDataset, default_num_threads
        except ImportError as exc:
            if attempt == 2:
                raise
            print(f"import datago failed ({type(exc).__name__}: {exc}); retrying in 30 s",
                  file=sys.stderr, flush=True)
            for name in [m for m in sys.modules if m == "datago" or m.startswith("datago.")]:
                del sys.modules[name]
            time.sleep(30)
    raise AssertionError("unreachable")


datago, DatagoDataset, default_num_threads = _import_datago()


# --------------------------------------------------------------------------- (a) Pillow

class PILBucketDataset(Dataset):
    """Map-style dataset: one file -> its bucket's (3, H, W) uint8 tensor, with Pillow."""

    def __init__(self, files: List[str], buckets):
        self.files = files
        self.buckets = buckets

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        im = Image.open(self.files[i])
        im = ImageOps.exif_transpose(im)
        im = im.convert("RGB")
        w, h = im.size                              # Pillow's (width, height)
        bh, bw = datago.nearest_bucket(h, w, self.buckets)
        nw, nh = cover_size(w, h, bw, bh)
        im = im.resize((nw, nh), Image.Resampling.LANCZOS)
        left, top = (nw - bw) // 2, (nh - bh) // 2
        im = im.crop((left, top, left + bw, top + bh))
        return torch.from_numpy(np.array(im)).permute(2, 0, 1)


class BucketBatchSampler(Sampler):
    """Batches of ``batch_size`` indices of one bucket each (partial last batches kept).

    ``bucket_of[i]`` is the bucket of sample i, from the image headers read up front."""

    def __init__(self, bucket_of: List[Tuple[int, int]], batch_size: int):
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i, b in enumerate(bucket_of):
            groups.setdefault(b, []).append(i)
        self.batches = [idx[j:j + batch_size] for idx in groups.values()
                        for j in range(0, len(idx), batch_size)]

    def __iter__(self):
        return iter([list(b) for b in self.batches])

    def __len__(self) -> int:
        return len(self.batches)


def _mark_worker_start(table: torch.Tensor, worker_id: int) -> None:
    """worker_init_fn: when this worker got going (perf_counter is system-wide on Linux)."""
    table[worker_id] = time.perf_counter()


# --------------------------------------------------------------------------- timed passes


def _split_tree(detail: Dict[int, Dict[str, int]], root: int) -> dict:
    """``{pid: process_status}`` -> {"main": fields of ``root``, "others": fields summed
    over the other processes, with "procs"}."""
    main = {k: detail.get(root, {}).get(k, 0) for k in RSS_FIELDS}
    others = {k: sum(v.get(k, 0) for p, v in detail.items() if p != root) for k in RSS_FIELDS}
    others["procs"] = sum(1 for p in detail if p != root)
    return {"main": main, "others": others}


class Run(NamedTuple):
    """One timed pass.  ``ours``/``others``/``steal``: cores used on average by this
    process and its workers (for (b): by the reference's process), by everything
    else on the machine, and stolen by the hypervisor -- the noise the interleaving
    is there to even out.  ``first``: seconds to the first batch/sample; ``startup``:
    seconds until the last DataLoader worker started (a, d), or the reference
    client's construction + start() (b, outside ``wall``).  ``rss``/``pss``: peak
    of the process tree's summed VmRSS / PSS during the pass (bytes; for (b) the
    tree holds this process and the reference's subprocess); ``padded``: repeated
    samples delivered ((c)/(d), else None); ``mem_cpu``: cores used by the memory
    sampler (not in ``ours``); ``mem_reads``: its (samples, PSS reads);
    ``at_peak``: the tree at the RSS peak, ``{"main"|"others": {field: bytes}}``
    (``_common.RSS_FIELDS`` summed, plus "procs"); ``at_start``: (RSS, PSS) of the
    tree (this process alone) as the pass began."""
    wall: float
    n: int
    mp: float
    ours: float
    others: float
    steal: float
    first: float
    startup: Optional[float]
    rss: int = 0
    pss: int = 0
    padded: Optional[int] = None
    mem_cpu: float = 0.0
    mem_reads: Tuple[int, int] = (0, 0)
    at_peak: Optional[dict] = None
    at_start: Tuple[int, int] = (0, 0)

    rate = property(rate_of)
    disturbed = property(is_disturbed)


# --------------------------------------------------------------------------- corpus

class Corpus(NamedTuple):
    root: Path
    rel: List[str]                 # every image under root, sorted (relative, "/"-separated)
    infos: Dict[str, object]       # rel -> datago ImageInfo
    modes: Dict[str, str]          # rel -> Pillow mode
    nbytes: int


def load_corpus(root: Path) -> Corpus:
    paths = sorted(find_images(root))
    if not paths:
        sys.exit(f"no .jpg/.jpeg/.png files under {root}")
    rel, infos, modes, nbytes = [], {}, {}, 0
    for p in paths:
        r = p.relative_to(root).as_posix()
        data = p.read_bytes()                    # also warms the page cache (untimed)
        nbytes += len(data)
        try:
            infos[r] = datago.read_header(data)
        except Exception as exc:
            raise RuntimeError(f"datago.read_header failed on {p}: {type(exc).__name__}: {exc}")
        with Image.open(p) as im:
            modes[r] = im.mode
        rel.append(r)
    return Corpus(root, rel, infos, modes, nbytes)


def open_corpus(path: Path, limit: Optional[int], prefix: str) -> Tuple[Corpus, int, Path, Path]:
    """(the corpus under ``path``, N: its first ``limit`` images or all of them, a new
    temporary work folder, the folder holding exactly those N: the corpus itself
    or a folder of symlinks in the work folder).  DatagoDataset is pointed at that
    folder: a config "limit" would cut its epoch plan (the first steps of the
    plan), not the sorted file list."""
    root = path.resolve()
    corpus = load_corpus(root)
    n = min(limit, len(corpus.rel)) if limit else len(corpus.rel)
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    data_root = (root if n == len(corpus.rel)
                 else link_view(workdir / "first_n", root, corpus.rel[:n]))
    return corpus, n, workdir, data_root


def expected_bucket(info, buckets) -> Tuple[int, int]:
    """(height, width) of the bucket of an image, from its displayed size."""
    return tuple(datago.nearest_bucket(*info.display_size, buckets))


def datago_config(root: Path, size: int, ratio: int, limit: Optional[int]) -> dict:
    cfg = {"source_type": "file", "source_config": {"root_path": str(root)},
           "image_config": {"crop_and_resize": True, "default_image_size": size,
                            "downsampling_ratio": ratio, "min_aspect_ratio": MIN_AR,
                            "max_aspect_ratio": MAX_AR},
           "batch_size": BATCH, "samples_buffer_size": BUFFER, "remainder": "pad"}
    if limit is not None:
        cfg["limit"] = limit
    return cfg


def ref_config(root: Path, size: int, ratio: int, limit: int) -> dict:
    return client_config(root, size, ratio, limit, MIN_AR, MAX_AR, BUFFER)


# --------------------------------------------------------------------------- (b) reference

REF_HELPER = r'''
import json, os, sys, time
t_proc = time.perf_counter()
args = json.loads(sys.argv[1])
from importlib import metadata
import numpy as np
import datago
from datago import DatagoClient
t_import = time.perf_counter() - t_proc

TICK = os.sysconf("SC_CLK_TCK")
def counters():
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    v += [0] * (8 - len(v))
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / TICK, v[7] / TICK

cfg, n_want, root = args["config"], args["n"], os.path.realpath(args["root"])
t0 = time.perf_counter()
client = DatagoClient(json.dumps(cfg))
client.start()
t_start = time.perf_counter() - t0
busy0, steal0 = counters()
c0 = time.process_time()
t1 = time.perf_counter()
n, first, samples, channels = 0, None, [], {}
owns = None
s = None
while n < n_want:
    s = client.get_sample()
    if s is None:
        break
    a = s.image.to_numpy_array()
    if first is None:
        first = time.perf_counter() - t1
        owns = bool(a.flags["OWNDATA"])
    n += 1
    c = int(a.shape[2]) if a.ndim == 3 else 1
    channels[c] = channels.get(c, 0) + 1
    samples.append((str(s.id).strip('"'), int(a.shape[0]), int(a.shape[1]), c))
wall = time.perf_counter() - t1
ours = time.process_time() - c0
busy1, steal1 = counters()
extra, exhausted = 0, s is None
if not exhausted:                          # count what it delivers beyond N (untimed)
    t2 = time.perf_counter()
    while time.perf_counter() - t2 < args["drain_s"]:
        s = client.get_sample()
        if s is None:
            exhausted = True
            break
        extra += 1
client.stop()
ids = []
for sid, h, w, c in samples:
    p = os.path.realpath(sid)
    ids.append([os.path.relpath(p, root).replace(os.sep, "/") if p.startswith(root + os.sep)
                else sid, h, w, c])
print(json.dumps({
    "version": metadata.version("datago"), "python": sys.version.split()[0],
    "numpy": np.__version__, "n": n, "wall": wall, "first": first, "t_import": t_import,
    "t_start": t_start, "ours": ours / wall if wall else 0.0,
    "busy": (busy1 - busy0) / wall if wall else 0.0,
    "steal": (steal1 - steal0) / wall if wall else 0.0,
    "extra": extra, "exhausted": exhausted, "channels": channels, "owns_data": owns,
    "samples": ids,
    "max_tasks": os.environ.get("DATAGO_MAX_TASKS"),
}))
'''


class Reference(VenvHelper):
    """The reference datago in its own venv, run as a subprocess per pass."""

    label = "reference venv"
    packages = ("datago", "numpy")

    def __init__(self, venv: Path, workdir: Path):
        super().__init__(venv, workdir / "ref_helper.py", REF_HELPER)
        self.info: Optional[dict] = None        # the last successful run's JSON

    def ensure(self) -> Optional[str]:
        """Create the venv if missing; None when usable, else why not."""
        why = self.create()
        if why:
            return why
        probe = subprocess.run([str(self.python), "-I", "-c",
                                "from datago import DatagoClient; "
                                "from importlib import metadata; print(metadata.version('datago'))"],
                               capture_output=True, text=True, cwd=tempfile.gettempdir())
        if probe.returncode != 0:
            return (f"{self.python} cannot import datago.DatagoClient: "
                    f"{text_tail(probe.stderr)}")
        return None

    def run(self, cfg: dict, n: int, root: Path) -> Tuple[dict, float]:
        """One pass; returns (the helper's JSON, the subprocess's total wall seconds)."""
        arg = json.dumps({"config": cfg, "n": n, "root": str(root), "drain_s": REF_DRAIN_S})
        out, total = self.call(arg, 120 + n * 0.5, "reference")
        self.info = out
        return out, total


def open_reference(no_ref: bool, venv: Path, workdir: Path
                   ) -> Tuple[Optional[Reference], Optional[str]]:
    """(the reference, None), or (None, why it will not run): ``--no-ref``, or its
    venv cannot be made or cannot import it."""
    if no_ref:
        return None, "--no-ref given"
    ref = Reference(venv, workdir)
    why = ref.ensure()
    return (None, why) if why else (ref, None)


# --------------------------------------------------------------------------- passes

class Bench:
    """State for one bucket size: the file list, the datasets, the checks."""

    def __init__(self, size: int, corpus: Corpus, n: int, data_root: Path,
                 ref: Optional[Reference]):
        """``data_root``: the folder DatagoDataset reads, holding exactly the first
        ``n`` files of the corpus (the corpus itself, or a folder of symlinks)."""
        self.size = size
        self.ratio = DOWNSAMPLING.get(size, max(1, size // 32))
        self.buckets = datago.make_buckets(size, self.ratio, MIN_AR, MAX_AR)
        self.corpus = corpus
        self.n = n
        self.data_root = data_root
        self.ref = ref
        self.rel = corpus.rel[:n]
        self.expected = set(self.rel)
        self.bucket_of = {r: expected_bucket(corpus.infos[r], self.buckets) for r in corpus.rel}
        self.mp_of = {r: corpus.infos[r].width * corpus.infos[r].height / 1e6 for r in corpus.rel}
        self.mp = sum(self.mp_of[r] for r in self.rel)
        self.problems: List[str] = []
        self.notes: List[str] = []
        # (a): file list + sampler from the headers (untimed setup)
        self.pil_ds = PILBucketDataset([str(corpus.root / r) for r in self.rel], self.buckets)
        self.pil_sampler = BucketBatchSampler([self.bucket_of[r] for r in self.rel], BATCH)
        self.pil_shapes = [(len(b), 3) + self.bucket_of[self.rel[b[0]]]
                           for b in self.pil_sampler.batches]
        # (c), (d): one DatagoDataset, reused across passes (its stats reset per pass)
        t0 = time.perf_counter()
        self.ds = DatagoDataset(datago_config(data_root, size, self.ratio, None))
        self.t_ds = time.perf_counter() - t0

    def problem(self, text: str) -> None:
        self.problems.append(text)
        print(f"  PROBLEM [{self.size}] {text}", flush=True)

    # ---------------------------------------------------------------- (a)
    def pass_a(self, ds=None, sampler=None, shapes=None, n=None) -> dict:
        ds, sampler = ds or self.pil_ds, sampler or self.pil_sampler
        shapes, n_want = shapes or self.pil_shapes, n or self.n
        wstart = torch.zeros(PIL_WORKERS, dtype=torch.float64).share_memory_()
        t0 = time.perf_counter()
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=PIL_WORKERS,
                            worker_init_fn=functools.partial(_mark_worker_start, wstart))
        got, first, bad = 0, None, []
        for k, batch in enumerate(loader):
            if first is None:
                first = time.perf_counter() - t0
            if tuple(batch.shape) != shapes[k] or batch.dtype != torch.uint8:
                bad.append((k, tuple(batch.shape), shapes[k]))
            got += batch.shape[0]
        wall = time.perf_counter() - t0
        if bad:
            self.problem(f"(a) {len(bad)} batches of an unexpected shape, first: batch "
                         f"{bad[0][0]} is {bad[0][1]}, want {bad[0][2]}")
        if got != n_want:
            self.problem(f"(a) delivered {got} samples, want {n_want}")
        return dict(wall=wall, n=got, mp=self.mp if n is None else 0.0, first=first or wall,
                    startup=float(wstart.max()) - t0, padded=None)

    # ---------------------------------------------------------------- (c), (d)
    def pass_datago(self, workers: int, ds=None, expected=None, label=None) -> dict:
        """One pass of (c) (``workers`` 0) or (d) over ``ds``; checks the plan semantics
        (see the module docstring) after the timed loop."""
        ds = ds or self.ds
        expected = self.expected if expected is None else expected
        label = label or ("(c)" if workers == 0 else "(d)")
        ds.reset_stats()
        in_order = D_IN_ORDER or not IN_ORDER_SUPPORTED or not workers
        wstart = torch.zeros(max(1, workers), dtype=torch.float64).share_memory_()
        init = functools.partial(_mark_worker_start, wstart) if workers else None
        t0 = time.perf_counter()
        kw = {"in_order": False} if not in_order else {}
        loader = DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=False,
                            worker_init_fn=init, **kw)
        got, first, ids, steps, bad = 0, None, [], [], []
        bucket_of = self.bucket_of
        for batch in loader:
            if first is None:
                first = time.perf_counter() - t0
            img, bid = batch["image"], batch["id"]
            h, w = batch["bucket"]
            if (img.dtype != torch.uint8 or tuple(img.shape) != (len(bid), 3, h, w)
                    or any(bucket_of.get(i) != (h, w) for i in bid)):
                bad.append((tuple(img.shape), tuple(batch["bucket"]), batch.get("step"), bid[:2]))
            got += img.shape[0]
            ids.extend(bid)
            steps.append(batch.get("step"))
        wall = time.perf_counter() - t0
        # checks (untimed)
        st = ds.stats()
        distinct = set(ids)
        repeats = len(ids) - len(distinct)
        try:
            plan = ds.plan()
            n_steps, plan_padded = plan.num_steps, plan.num_padded(0)
        except Exception as exc:                                  # noqa: BLE001
            self.problem(f"{label} ds.plan() raised {type(exc).__name__}: {exc}")
            n_steps, plan_padded = None, None
        missing, surplus = expected - distinct, distinct - expected
        if missing or surplus:
            self.problem(f"{label} files differ from the expected list: {len(missing)} of "
                         f"{len(expected)} missing (e.g. {sorted(missing)[:3]}), "
                         f"{len(surplus)} unexpected (e.g. {sorted(surplus)[:3]})")
        if repeats != st["padded"] or (plan_padded is not None and st["padded"] != plan_padded):
            counts: Dict[str, int] = {}
            for i in ids:
                counts[i] = counts.get(i, 0) + 1
            most = sorted(((c, i) for i, c in counts.items() if c > 1), reverse=True)[:3]
            self.problem(f"{label} {repeats} repeated samples delivered ({len(ids)} delivered, "
                         f"{len(distinct)} distinct; most repeated [count, id]: {most}), "
                         f"ds.stats()['padded'] {st['padded']}, the plan's padded slots "
                         f"{plan_padded}")
        if got != len(expected) + st["padded"]:
            self.problem(f"{label} delivered {got} samples, want {len(expected)} files + "
                         f"{st['padded']} padded")
        if bad:
            self.problem(f"{label} {len(bad)} batches whose shape/bucket disagree with the "
                         f"files' headers, first (shape, bucket, step, ids): {bad[0]}")
        if (st["samples"] != got or st["skipped_total"] != 0 or st["dropped_remainder"] != 0
                or st["batches"] != len(steps)):
            self.problem(f"{label} ds.stats(): samples {st['samples']} (delivered {got}), "
                         f"batches {st['batches']} (delivered {len(steps)}), skipped "
                         f"{st['skipped']}, dropped_remainder {st['dropped_remainder']}, "
                         f"dropped_last {st['dropped_last']}")
        try:
            steps_i = [int(t) for t in steps]
        except (TypeError, ValueError):
            steps_i = None
        want_steps = list(range(n_steps if n_steps is not None else len(steps)))
        if steps_i is None or (steps_i if in_order else sorted(steps_i)) != want_steps:
            first_off = (None if steps_i is None else
                         next((k for k, (x, y) in enumerate(zip(steps_i, want_steps)) if x != y),
                              min(len(steps_i), len(want_steps))))
            self.problem(f"{label} batch['step']: {len(steps)} batches, want steps 0.."
                         f"{len(want_steps) - 1} once each"
                         + (" in order" if in_order else "")
                         + f"; got {steps[:8]}{'...' if len(steps) > 8 else ''}"
                         + (f" (first difference at batch {first_off})" if steps_i else ""))
        return dict(wall=wall, n=got, mp=sum(self.mp_of.get(i, 0.0) for i in ids),
                    first=first or wall, padded=st["padded"],
                    startup=(float(wstart.max()) - t0) if workers else None)

    # ---------------------------------------------------------------- (b)
    def pass_b(self, n: Optional[int] = None) -> dict:
        n_want = n or self.n
        cfg = ref_config(self.corpus.root, self.size, self.ratio, n_want)
        out, total = self.ref.run(cfg, n_want, self.corpus.root)
        samples = out["samples"]
        ids = [s[0] for s in samples]
        known = [s for s in samples if s[0] in self.bucket_of]
        off_bucket = [s for s in known if (s[1], s[2]) != self.bucket_of[s[0]]]
        tag = "(b)" if n is None else "(b) warm-up"
        if out["n"] != n_want:
            self.problem(f"{tag} reference delivered {out['n']} samples, want {n_want} "
                         f"(get_sample() returned None early)")
        if len(set(ids)) != len(ids):
            self.problem(f"{tag} reference delivered {len(ids) - len(set(ids))} duplicates")
        if len(known) != len(samples):
            self.problem(f"{tag} reference delivered {len(samples) - len(known)} samples that "
                         f"are not corpus images, e.g. {[s[0] for s in samples if s[0] not in self.bucket_of][:3]}")
        out["_off_bucket"] = len(off_bucket)
        out["_off_bucket_eg"] = off_bucket[:2]
        out["_in_first_n"] = sum(1 for i in ids if i in self.expected)
        out["_total"] = total
        self.last_b = out
        return dict(wall=out["wall"], n=out["n"], mp=sum(self.mp_of.get(i, 0.0) for i in ids),
                    first=out["first"] or out["wall"], startup=out["t_start"],
                    ours=out["ours"], busy=out["busy"], steal=out["steal"])

    # ---------------------------------------------------------------- timing
    def timed(self, name: str) -> Optional[Run]:
        work = {"a": self.pass_a, "b": self.pass_b, "c": lambda: self.pass_datago(0)}.get(
            name, lambda: self.pass_datago(D_WORKERS))
        got = measure_pass(work, self.problem, name, interval=MEM_INTERVAL, pss_duty=PSS_DUTY,
                           hang_dump_s=HANG_DUMP_S)
        if got is None:
            return None
        r, cost = got
        mem = cost.mem
        memkw = dict(rss=mem.peak_rss, pss=mem.peak_pss, padded=r.get("padded"),
                     mem_cpu=cost.mem_cores, mem_reads=(mem.samples, mem.pss_reads),
                     at_peak=_split_tree(mem.peak_detail, mem.root),
                     at_start=(mem.start_rss, mem.start_pss))
        # (b) measured itself; the sampler thread's CPU is in getrusage(SELF): not ours
        ours, others, steal = reported_cores(r) if name == "b" else cost.cores(r["wall"])
        return Run(r["wall"], r["n"], r["mp"], ours, others, steal, r["first"], r["startup"],
                   **memkw)

    # ---------------------------------------------------------------- sanity + warm-up
    def sanity(self, names: List[str], workdir: Path) -> Optional[str]:
        """(a) and (c) give the same shapes for the same files (a spread of the list plus
        EXIF-rotated, PNG, alpha and grey images), through a folder of symlinks; the
        listing of (c)/(d) is the sorted file list; warm-up passes of every variant."""
        c = self.corpus
        used = len({self.bucket_of[r] for r in self.rel})
        self.notes.append(f"buckets: make_buckets({self.size}, {self.ratio}, {MIN_AR}, "
                          f"{MAX_AR}), {len(self.buckets)} buckets, {used} of them used by "
                          f"the {self.n} images; batch {BATCH}"
                          + (f"; (a) sampler: {len(self.pil_sampler)} batches"
                             if "a" in names else ""))
        listing = [self.ds.listing.sample_id(i) for i in range(len(self.ds.listing))]
        if listing != self.rel:
            diff = next((i for i, (x, y) in enumerate(zip(listing, self.rel)) if x != y),
                        min(len(listing), self.n))
            self.problem(f"DatagoDataset's listing differs from the sorted file list at index "
                         f"{diff} (listing has {len(listing)} samples, want {self.n})")
        view = ("" if self.data_root == c.root else
                f" over {self.data_root} (symlinks to the first {self.n} files)")
        self.notes.append(f"DatagoDataset(cfg){view} built in {self.t_ds * 1e3:.0f} ms "
                          f"(untimed): {len(listing)} samples, listing skipped "
                          f"{dict(self.ds.listing.skipped)}; = the sorted file list of (a): "
                          f"{listing == self.rel}")
        try:
            plan = self.ds.plan()
            nb = len(set(int(x) for x in plan.bucket[:, 0]))
            self.notes.append(f"DatagoDataset plan (remainder={self.ds.config.loader.remainder!r}, "
                              f"prefetch_batches={self.ds.config.loader.prefetch_batches}): "
                              f"{plan.num_steps} batches of {BATCH} in {nb} buckets = "
                              f"{int(plan.count.sum())} slots for {self.n} files, "
                              f"{plan.num_padded()} padded, {int(plan.dropped.sum())} dropped; "
                              f"(d) worker w takes steps w, w+{D_WORKERS}, ...")
        except Exception as exc:                                  # noqa: BLE001
            self.problem(f"ds.plan() raised {type(exc).__name__}: {exc}")
        # the sanity subset
        n = self.n
        idx = set(np.linspace(0, n - 1, min(n, SANITY_SPREAD)).astype(int).tolist())
        picks = [
            [i for i in range(n) if c.infos[self.rel[i]].orientation != 1][:4],
            [i for i in range(n) if c.infos[self.rel[i]].format == "png"][:4],
            [i for i in range(n) if c.modes[self.rel[i]] in ("RGBA", "LA", "P")][:2],
            [i for i in range(n) if c.modes[self.rel[i]] in ("L", "1", "I;16", "I")][:2],
        ]
        for p in picks:
            idx |= set(p)
        idx = sorted(idx)
        sdir = workdir / f"sanity_{self.size}"
        sdir.mkdir()
        link_of = {}
        for k, i in enumerate(idx):
            r = self.rel[i]
            name = f"s{k:03d}_{r.replace('/', '__')}"
            os.symlink(c.root / r, sdir / name)
            link_of[name] = r
        ds_s = DatagoDataset(datago_config(sdir, self.size, self.ratio, None))
        got = {}
        for batch in DataLoader(ds_s, batch_size=None, num_workers=0):
            for j, sid in enumerate(batch["id"]):
                got[link_of.get(sid, sid)] = batch["image"][j]
        st = ds_s.stats()
        shape_bad, diffs = [], []
        for i in idx:
            r = self.rel[i]
            a = self.pil_ds[i]
            want = (3,) + self.bucket_of[r]
            cimg = got.get(r)
            if cimg is None:
                shape_bad.append(f"{r}: (c) delivered nothing")
                continue
            if tuple(a.shape) != want or tuple(cimg.shape) != want:
                shape_bad.append(f"{r}: (a) {tuple(a.shape)}, (c) {tuple(cimg.shape)}, "
                                 f"header bucket {want}")
                continue
            diffs.append((float((a.to(torch.int16) - cimg.to(torch.int16)).abs().float().mean()), r))
        kinds = (f"{len(picks[0])} EXIF-rotated, {len(picks[1])} PNG, {len(picks[2])} with alpha, "
                 f"{len(picks[3])} grey")
        if shape_bad or len(got) != len(idx) or st["skipped_total"]:
            self.problem(f"sanity: (a)/(c) shape check failed on {len(shape_bad)} of {len(idx)} "
                         f"files: {shape_bad[:4]}; (c) delivered {len(got)}, stats {st}")
        else:
            worst = max(diffs)
            self.notes.append(f"sanity check: {len(idx)} files ({kinds}): (a) and (c) give the "
                              f"same (3, H, W) uint8 shape = the header's bucket for every file; "
                              f"mean |pixel diff| (a) vs (c) {np.mean([d for d, _ in diffs]):.2f} "
                              f"(max {worst[0]:.2f}, {worst[1]}; (a) drops alpha, datago "
                              f"composites it over grey)")
        # warm-up: every variant on the first max(WARMUP_IMAGES, BATCH) files
        w = min(max(WARMUP_IMAGES, BATCH), n)
        wrel = self.rel[:w]
        wds = PILBucketDataset([str(c.root / r) for r in wrel], self.buckets)
        wsampler = BucketBatchSampler([self.bucket_of[r] for r in wrel], BATCH)
        wshapes = [(len(b), 3) + self.bucket_of[wrel[b[0]]] for b in wsampler.batches]
        wroot = (self.data_root if w == n else
                 link_view(workdir / f"warmup_{self.size}", c.root, wrel))
        ds_w = DatagoDataset(datago_config(wroot, self.size, self.ratio, None))
        ref_failed = None
        for name in names:
            try:
                if name == "a":
                    self.pass_a(wds, wsampler, wshapes, w)
                elif name == "b":
                    self.pass_b(w)
                else:
                    self.pass_datago(0 if name == "c" else D_WORKERS, ds_w, set(wrel),
                                     f"({name}) warm-up")
            except Exception as exc:                              # noqa: BLE001
                if name == "b":
                    ref_failed = (f"reference warm-up failed at size {self.size}: "
                                  f"{type(exc).__name__}: {exc}")
                self.problem(f"({name}) warm-up raised {type(exc).__name__}: {exc}")
        return ref_failed


class SourcesBench(Bench):
    """A Bench (its folder dataset ``self.ds`` is variant ``base``) with more
    DatagoDatasets over the same images, from other sources or formats:
    ``datasets`` and the sample ids each should deliver (``expected_ids``) by
    variant, their construction times (``t_build``), and each pass's
    ``stats()["seconds"]`` (``seconds``).  Sample ids that are not the relative
    paths (URLs, WebDataset keys) are added to ``bucket_of`` / ``mp_of`` as
    aliases of them (``alias``), so that ``pass_datago`` checks them against the
    same headers."""

    def __init__(self, corpus: Corpus, n: int, data_root: Path, ref: Optional[Reference],
                 base: str, size: int = 512):
        super().__init__(size, corpus, n, data_root, ref)
        self.expected_ids: Dict[str, set] = {base: self.expected}
        self.datasets: Dict[str, DatagoDataset] = {base: self.ds}
        self.t_build: Dict[str, float] = {}
        self.seconds: Dict[str, List[dict]] = {}

    def alias(self, ids: Dict[str, str]) -> set:
        """``{new id: relative path}`` -> the set of new ids (added to the lookups)."""
        for i, r in ids.items():
            self.bucket_of[i] = self.bucket_of[r]
            self.mp_of[i] = self.mp_of[r]
        return set(ids)

    def config(self, source_type: str, source_config: dict) -> dict:
        """``datago_config`` of this size with another source."""
        cfg = datago_config(self.data_root, self.size, self.ratio, None)
        cfg["source_type"], cfg["source_config"] = source_type, source_config
        return cfg

    def build(self, name: str, source_type: str, source_config: dict) -> DatagoDataset:
        """The dataset of variant ``name`` (its construction timed into ``t_build``)."""
        cfg = self.config(source_type, source_config)
        t0 = time.perf_counter()
        ds = DatagoDataset(cfg)
        self.t_build[name] = time.perf_counter() - t0
        return ds

    def check_listings(self, skip: Iterable[str] = ()) -> None:
        """Each dataset lists exactly the N samples it should (``skip``: those that
        list nothing, e.g. streamed)."""
        for name, ds in self.datasets.items():
            if name in skip:
                continue
            lst = [ds.listing.sample_id(i) for i in range(len(ds.listing))]
            if set(lst) != self.expected_ids[name] or len(lst) != self.n:
                self.problem(f"({name}) the dataset lists {len(lst)} samples, "
                             f"{len(set(lst) - self.expected_ids[name])} of them unexpected; "
                             f"listing skipped {dict(ds.listing.skipped)}")

    def pass_source(self, name: str) -> dict:
        """One pass of variant ``name``'s dataset, ``DataLoader(num_workers=0)``."""
        ds = self.datasets[name]
        r = self.pass_datago(0, ds, self.expected_ids[name], f"({name})")
        self.seconds.setdefault(name, []).append(ds.stats()["seconds"])
        return r

    def corpus_line(self, rest: str) -> str:
        """``- corpus: ROOT, N images of M (their formats){rest}``."""
        c = self.corpus
        return (f"- corpus: {c.root}, {self.n} images of {len(c.rel)} "
                f"({tally(c.infos[r].format for r in self.rel)}){rest}")

    def buckets_text(self) -> str:
        return (f"make_buckets({self.size}, {self.ratio}, {MIN_AR}, {MAX_AR}) "
                f"({len(self.buckets)}, {len({self.bucket_of[r] for r in self.rel})} used)")


# --------------------------------------------------------------------------- reporting

def _round_summary(runs: Dict[str, Optional[Run]]) -> str:
    parts, cores, mems = [], [], []
    for k, run in runs.items():
        if run is None:
            parts.append(f"{k} FAILED")
            cores.append(f"{k} -")
            mems.append(f"{k} -")
        else:
            parts.append(f"{k} {run.rate:.1f}{'!' if run.disturbed else ''}"
                         + (f" (+{run.padded} padded)" if run.padded else ""))
            cores.append(f"{k} {run.ours:.2f}/{run.others:.2f}/{run.steal:.2f}")
            mems.append(f"{k} {mb(run.rss)}/{mb(run.pss)}")
    return ("  ".join(parts) + " img/s; cores ours/others/steal: " + "  ".join(cores)
            + "; peak tree RSS/PSS MB: " + "  ".join(mems))


def columns(rounds: int) -> List[Column]:
    def startup(_, ok):
        s = [t.startup for t in ok if t.startup is not None]
        return f"{med(s):.2f}" if s else "-"
    return rate_columns(rounds) + [
        SAMPLES, PADDED, FIRST, Column("start-up s", startup), RSS, PSS,
        Column("cores: ours (median) / others, steal (max)", lambda _, ok: (
            f"{med(t.ours for t in ok):.2f} / {max(t.others for t in ok):.2f} / "
            f"{max(t.steal for t in ok):.2f}")),
        disturbed_column(rounds)]


def bench_size(bench: Bench, names: List[str], rounds: int, workdir: Path,
               ref_why: List[str]) -> List[str]:
    size = bench.size
    why = bench.sanity(names, workdir)
    if why:
        ref_why.append(why)
        names = [x for x in names if x != "b"]
    t_size = time.perf_counter()
    times: Dict[str, List[Optional[Run]]] = run_rounds(
        bench.timed, names, rounds, _round_summary, tag=f"[{size}] ", more=" for this size")
    elapsed = time.perf_counter() - t_size

    n = bench.n
    lines = variant_table(columns(rounds), names, times, variants())
    lines += [""] + ratio_header("ratio / measure")
    verdicts = []
    targeted = {label for label, _, _, target, sizes in RATIOS
                if target is not None and (sizes is None or size in sizes)}
    for label, nums, den, target, sizes in RATIOS:
        if sizes is not None and size not in sizes:
            continue
        if target is None and label in targeted:
            continue
        ttext = f">= {target}" if target is not None else "-"
        if den not in names or not any(x in names for x in nums):
            if target is not None:
                lines.append(not_run_row(label, ttext, f"NOT RUN ("
                                         f"{den if den not in names else '/'.join(nums)} missing)"))
                verdicts.append(Verdict(label, ttext, None))
            continue
        per_round = []
        for r in range(rounds):
            d = times[den][r]
            ns = [times[x][r] for x in nums if x in names and times[x][r] is not None]
            if d is None or not ns:
                continue
            per_round.append(max(t.rate for t in ns) / d.rate)
        if not per_round:
            lines.append(not_run_row(label, ttext,
                                     "NOT RUN (passes failed)" if target else "info"))
            if target is not None:
                verdicts.append(Verdict(label, ttext, None))
            continue
        row, verdict = ratio_row(label, per_round, target)
        lines.append(row)
        if verdict is not None:
            verdicts.append(verdict)
    for label, var, field, bound, sizes in MEM_TARGETS:
        if sizes is not None and size not in sizes:
            continue
        ttext = f"<= {bound} MB"
        vals = [getattr(t, field) / 1e6 for t in times.get(var, []) if t is not None]
        if not vals:
            lines.append(not_run_row(label, ttext, "NOT RUN"))
            verdicts.append(Verdict(label, ttext, None))
            continue
        m = med(vals)
        result = "PASS" if m <= bound else "FAIL"
        lines.append(f"| {label} | {m:.0f} MB | {min(vals):.0f}..{max(vals):.0f} | "
                     f"{len(vals)} | {ttext} | {result} |")
        verdicts.append(Verdict(label, ttext, result, m))
    # notes on (b)
    if "b" in names and getattr(bench, "last_b", None):
        ok = [t for t in times["b"] if t is not None]
        lb = bench.last_b
        bench.notes.append(
            f"(b) last pass: consumed {lb['n']} samples ({lb['_in_first_n']} of them among the "
            f"first {n} sorted files; the reference walks in its own order and sees only the "
            f"first 2*limit files of its walk), then {lb['extra']} more delivered after N "
            f"({'stream exhausted' if lb['exhausted'] else f'still delivering after {REF_DRAIN_S:.0f} s'}); "
            f"channels of the arrays {lb['channels']} (the reference keeps L/RGBA sources "
            f"as 1/4 channels, datago converts to RGB); {lb['_off_bucket']} samples in another "
            f"bucket than datago.nearest_bucket picks"
            + (f" (e.g. [id, H, W, C]: {lb['_off_bucket_eg']})" if lb['_off_bucket'] else ""))
        if ok:
            bench.notes.append(
                f"(b) outside the timed wall: import {lb['t_import']:.2f} s (last pass), "
                f"DatagoClient() + start() {med(t.startup for t in ok):.3f} s; "
                f"whole subprocess {lb['_total']:.1f} s (last pass)")
    # notes on memory
    runs = {k: [t for t in times[k] if t is not None] for k in names}
    if any(runs.values()):
        bench.notes.append(
            "memory: peak over a pass of the summed RSS / PSS of this process and all its "
            "descendants (DataLoader workers; for (b) the reference's subprocess, sampled "
            "over its whole life: start-up and drain included), median over rounds; at "
            "the start of a pass (this process alone, torch imported, after gc + "
            "malloc_trim) RSS / PSS MB, median: "
            + ", ".join(f"{k} {mb(med(t.at_start[0] for t in v))}/"
                        f"{mb(med(t.at_start[1] for t in v))}"
                        for k, v in runs.items() if v)
            + f"; RSS sampled every {MEM_INTERVAL * 1e3:.0f} ms, PSS near the RSS peak within a "
            f"{PSS_DUTY:.0%} CPU budget (samples / PSS reads per pass, median: "
            + ", ".join(f"{k} {med(t.mem_reads[0] for t in v):.0f}/"
                        f"{med(t.mem_reads[1] for t in v):.0f}"
                        for k, v in runs.items() if v)
            + "); the sampler thread used "
            + ", ".join(f"{k} {med(t.mem_cpu for t in v):.3f}"
                        for k, v in runs.items() if v)
            + " cores (median), left out of 'cores: ours' and 'others' of (a), (c), (d)")
    for k, v in runs.items():
        v = [t for t in v if t.at_peak]
        if not v:
            continue
        t = sorted(v, key=lambda t: t.rss)[(len(v) - 1) // 2]      # the pass of the median peak
        m, o = t.at_peak["main"], t.at_peak["others"]
        bench.notes.append(
            f"({k}) at its RSS peak ({mb(t.rss)} MB, pass of the median peak): this process "
            f"RSS {mb(m['VmRSS'])} MB (anon {mb(m['RssAnon'])}, file {mb(m['RssFile'])}, "
            f"shmem {mb(m['RssShmem'])})"
            + (f"; {o['procs']} child processes RSS {mb(o['VmRSS'])} MB together (anon "
               f"{mb(o['RssAnon'])}, file {mb(o['RssFile'])}, shmem {mb(o['RssShmem'])}; "
               f"a forked child's RSS includes the parent's pages it still shares)"
               if o["procs"] else ""))
    bench.notes.append(f"timed passes took {elapsed:.0f} s; '!' after a rate marks a disturbed "
                       f"pass ({disturbed_rule()})")
    bench.verdicts = verdicts
    return lines


def environment(corpus: Corpus, n: int, ref_line: str) -> List[str]:
    rel = corpus.rel[:n]
    infos = [corpus.infos[r] for r in rel]
    mps = [i.width * i.height / 1e6 for i in infos]
    rotated = sum(1 for i in infos if i.orientation != 1)
    nbytes = sum((corpus.root / r).stat().st_size for r in rel)
    core = core_versions()
    return [
        cpu_line(),
        stack_line(f" (DataLoader start method {torch.multiprocessing.get_start_method()})"),
        f"- datago {datago.__version__} ({Path(datago.__file__).parent}): "
        f"{f'{core}, ' if core else ''}filter "
        f"{datago.image.DEFAULT_FILTER!r}; num_threads (c) {default_num_threads(1)}, "
        f"(d) {default_num_threads(D_WORKERS)} per worker x {D_WORKERS} workers, "
        f"in_order={D_IN_ORDER or not IN_ORDER_SUPPORTED}; batch {BATCH}, remainder 'pad'; "
        f"samples_buffer_size {BUFFER} (unused by planned batches)",
        f"- {ref_line}",
        f"- corpus: {corpus.root}, {n} images of {len(corpus.rel)} "
        f"({tally(i.format for i in infos)}; modes {tally(corpus.modes[r] for r in rel)}; "
        f"{rotated} with EXIF orientation "
        f"!= 1), {nbytes / 1e6:.1f} MB, mean {statistics.mean(mps):.3f} MP (median "
        f"{statistics.median(mps):.3f}, max {max(mps):.2f}); files read from disk by every "
        f"variant, page cache warmed once before timing",
        f"- (a): Pillow {PIL.__version__}, LANCZOS, convert('RGB') (alpha dropped, not "
        f"composited), DataLoader(batch_sampler=BucketBatchSampler, num_workers={PIL_WORKERS}), "
        f"default collate; worker start-up inside the timed pass",
        "- cores: average CPUs busy during a timed pass with this process and its DataLoader "
        "workers (ours; for (b) the reference's process), with other processes (others) and "
        "stolen by the hypervisor (steal), from /proc/stat; others/steal well above 0 mean "
        "the pass was disturbed",
        "- first batch: seconds from creating the DataLoader iterator (for (b): the first "
        "get_sample()) to the first batch (sample); start-up: (a)/(d) seconds until the last "
        "DataLoader worker ran worker_init_fn, (b) DatagoClient() + start(), not in its wall",
    ]


def main(argv=None) -> int:
    global BATCH, D_IN_ORDER, PSS_DUTY
    ap = make_parser(__doc__)
    add_corpus_args(ap, rounds_help="timed rounds per size (default 3)")
    ap.add_argument("--sizes", default="512,1024", help="bucket sizes (default 512,1024)")
    ap.add_argument("--pil-sizes", default="512",
                    help="bucket sizes where the Pillow variant (a) runs (default 512)")
    add_ref_args(ap, "b")
    ap.add_argument("--batch", type=int, default=BATCH,
                    help=f"images per batch, every variant (default {BATCH})")
    ap.add_argument("--d-in-order-false", action="store_true",
                    help="(d): DataLoader(in_order=False) instead of the default in_order=True")
    ap.add_argument("--pss-duty", type=float, default=PSS_DUTY,
                    help=f"CPU share (of one core) the PSS reads of the memory sampler may "
                         f"use (default {PSS_DUTY}; 1 reads PSS at every 50 ms sample)")
    add_out_arg(ap)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    pil_sizes = {int(s) for s in args.pil_sizes.split(",") if s.strip()}
    check_corpus_args(ap, args)
    if args.batch < 1:
        ap.error("--batch must be >= 1")
    if not 0 < args.pss_duty <= 1:
        ap.error("--pss-duty must be in (0, 1]")
    if args.d_in_order_false and not IN_ORDER_SUPPORTED:
        ap.error(f"--d-in-order-false needs torch >= 2.6 (this is {torch.__version__})")
    BATCH, D_IN_ORDER, PSS_DUTY = args.batch, not args.d_in_order_false, args.pss_duty

    t_start = time.perf_counter()
    corpus, n, workdir, data_root = open_corpus(args.corpus, args.limit, "bench_loader_")
    ref, why = open_reference(args.no_ref, args.ref_venv, workdir)
    ref_why = [why] if why else []
    if ref is not None:
        ref_line = (f"reference datago: {args.ref_venv} (version printed after its first run); "
                    f"limit = {n}; samples converted with s.image.to_numpy_array()")
    else:
        ref_line = f"reference datago (b): NOT RUN: {ref_why[0]}"
    report = Report()
    report.add(["## Environment", ""] + environment(corpus, n, ref_line)
               + [command_line("bench_loader.py", argv), ""], gap=False)

    all_problems, verdicts = [], []
    for size in sizes:
        names = [v for v in VARIANT_NAMES
                 if (v != "a" or size in pil_sizes) and (v != "b" or ref is not None)]
        bench = Bench(size, corpus, n, data_root, ref)
        table = bench_size(bench, names, args.rounds, workdir, ref_why)
        if ref is not None and any("warm-up failed" in w for w in ref_why):
            ref = None                      # do not retry a reference that fails
        section = [f"## Buckets {size} ({n} images, {args.rounds} rounds)", ""]
        section += [f"- {s}" for s in bench.notes] + [""] + table + [""]
        report.add(section)
        all_problems += [f"[{size}] {p}" for p in bench.problems]
        verdicts += [v._replace(label=f"[{size}] {v.label}")
                     for v in getattr(bench, "verdicts", [])]

    info = ref.info if ref is not None else None
    tail = ["## Summary", ""]
    if info:
        tail.append(f"{reference_line(info, args.ref_venv)}; samples converted with "
                    f"`s.image.to_numpy_array()` -> (H, W, C) uint8 ndarray (owns its data: "
                    f"{info['owns_data']})")
    elif ref_why:
        tail.append(f"- (b) reference datago not run: {'; '.join(ref_why)}")
    tail += verdict_lines(verdicts) + problem_lines(all_problems) + [runtime_line(t_start)]
    report.add(tail)
    shutil.rmtree(workdir, ignore_errors=True)
    report.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
