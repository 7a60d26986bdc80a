#!/usr/bin/env python
"""Storage formats (issue 11): the same images as a folder, a ZIP archive, TFRecord
files, split bins and WebDataset shards, read by DatagoDataset at 512 buckets side
by side; random access on bins (decoded, and raw bytes against ``splitdataloader``);
TFRecord reading against the ``tfrecord`` package.

    python benchmarks/bench_formats.py CORPUS_DIR [--limit N] [--rounds R]
                                       [--venv /tmp/bench_formats_venv] [--no-ext]
                                       [--no-deflate] [--variants F,B,W] [--out FILE.md]

The images are the .jpg/.jpeg/.png files under CORPUS_DIR (recursive, sorted,
hidden files skipped; ``--limit`` keeps the first N, for every variant; read once
before timing, which also warms the page cache).  The folder variant reads exactly
those N files (CORPUS_DIR itself, or a folder of symlinks mirroring the first N).

Set-up (untimed, each step's time reported), in a temporary folder:

* ``zip/stored.zip``: the N files as members named by their corpus-relative path,
  sorted, ``zipfile.ZIP_STORED`` (JPEGs do not compress); ``zip/deflate.zip``
  (unless ``--no-deflate``): the same with ``ZIP_DEFLATED`` (zlib level 6);
* ``tfrecord/``: ``datago.convert.convert(folder, ..., "tfrecord")`` (one process,
  bytes kept): ``shard-*.tfrecord`` of ``tf.train.Example`` records written by
  ``datago.sources.tfrecord.TFRecordWriter`` (``image/encoded`` the file's bytes,
  ``image/filename`` the relative path), 4 shards, each with its
  ``.tfidx.json`` index;
* ``bins/``: ``convert(..., "bins")``: ``datago.bins`` with the default 128
  splits (ids = relative paths; sizes in the index);
* ``wds/``: ``convert(..., "webdataset")``: 8 ustar shards, member
  ``<wds_key(id)>.<ext>``, each shard's ``.idx.json`` written next to it;
* ``sdl/`` (unless ``--no-ext``): ``splitdataloader.write_split_data(dir, bytes,
  splits=128)`` of the same N images' bytes, in the bins listing's order (so
  index i is the same image in both), run in the separate venv (``--venv``,
  created with ``python -m venv`` + ``pip install splitdataloader tfrecord numpy``
  when missing; nothing is installed into the project's environment).

Variants (one round = every variant once):

img/s at 512 buckets -- DatagoDataset with bench_loader's ``datago_config``:
``make_buckets(512, 16, 0.5, 2.0)``, crop_and_resize, batch 32, remainder "pad",
``samples_buffer_size`` 64, DataLoader(batch_size=None, num_workers=0), decode
threads ``default_num_threads(1)`` (all usable cores); one pass = the whole epoch
(N images + the padded slots that complete each bucket's last batch; img/s counts
delivered images), checked by bench_loader's ``Bench.pass_datago`` (every sample
once plus exactly the plan's padding, batch shapes and buckets against the
images' headers, steps in order, no skipped sample):

(F)  folder: ``source_type: "file"`` over the N files (the baseline);
(Z)  zip, stored members: ``{"source_type": "zip", "source_config": {"path":
     "zip/stored.zip"}}`` -- one seek + read of the member's bytes per sample;
(Zd) zip, deflate members: the same over ``deflate.zip`` -- plus zlib inflate
     (info only: no target);
(T)  tfrecord: ``{"source_type": "tfrecord", "source_config": {"path":
     "tfrecord/shard-*.tfrecord", "id_key": "image/filename"}}`` -- per sample a
     read of its whole record, both CRC-32C checked, the Example parsed for
     ``image/encoded``;
(B)  bins: ``{"source_type": "bins", "source_config": {"path": "bins"}}``;
(W)  webdataset: ``{"source_type": "webdataset", "source_config": {"url":
     "wds/shard-{000000..000007}.tar"}}`` (indexes next to the shards: a read of
     the member per sample).

Random access (a random permutation of the N indices, seeded):

(M)  decoded, bins: ``datago.dataset.DatagoMapDataset(cfg)[i]`` for every i of
     the permutation (cfg: the same image_config, bins source, no batch_size):
     one blocking read + decode + crop/resize on the calling thread; samples/s;
(Mf) decoded, folder: the same over the file source (info: what (M) would be
     without the bins layer);
(Rb) raw bytes, ours: ``datago.sources.bins.BinsSource(dir)[i]`` -- the sample
     dict (main image bytes, attributes, size) from one read of its span;
     ``--raw-accesses`` accesses (default max(N, 20000)): successive seeded
     permutations of the N indices;
(Rs) raw bytes, ``splitdataloader.SplitDataLoader(dir)[i]`` (PyPI; its own
     format, written from the same bytes) for the same index sequence, in a
     subprocess of the separate venv that times its own loop (import and
     construction excluded).

TFRecord reading (the files of (T); every record once, file by file, the image
bytes taken out, nothing decoded; records/s):

(To) ours, random-access path: ``TFRecordSource`` (its ``.tfidx.json`` index),
     ``fetcher.read(source.main_location(i))`` for i in listing order -- the
     record read by offset, both CRC-32C checked, the Example scanned for the
     image feature (what (T) does per sample before decoding);
(Ts) ours, streamed: ``datago.sources.tfrecord.read_records(file)`` (CRCs
     checked) + ``parse_example(record)["image/encoded"][0]`` (every feature
     parsed, as the package does);
(Tp) the ``tfrecord`` package (PyPI): ``tfrecord.reader.tfrecord_loader(file,
     None, {"image/encoded": "byte"})`` per file, in a subprocess of the separate
     venv timing its own loop.  It checks no CRC and parses the Example with
     ``protobuf`` (its implementation is reported).

The untimed warm-up (two batches of each loader variant, 256 accesses of (M),
(Mf), (Rb), (Rs), a whole pass of (To), (Ts), (Tp)) also checks the bytes: (Rb)
and (Rs) return the same bytes as the corpus files for the first 256 accesses
(CRC-32 compared), (To)/(Ts)/(Tp) the same N images (count, bytes and a sum of
CRC-32s).  During every timed pass (M)/(Mf) check each sample's id and shape
against its header's bucket, after the loop.

The machine is shared and noisy, so variants are interleaved: R rounds, each
running every variant once in an order that rotates between rounds.  Reported:
median rate per variant (min..max), and each ratio computed per round, then its
median, against its target: Z/F, T/F, B/F, W/F >= 0.95 ("every format >= 0.95x
the folder"); the others are information.  Also per round, for each loader
variant X, the folder's CPU milliseconds per image over X's ("CPU ms/img F/X",
information): the machine is shared, and CPU per image moves much less than
img/s with other people's load.  Once, untimed, the read layer alone: CPU
microseconds per sample of ``listing.ref(i)`` + ``fetcher.read(ref.path)`` for
each loader variant (one thread, best of 3), i.e. what a format adds before the
decode.  Per pass: cores used by this process
(for (Rs)/(Tp): the subprocess, as it measured itself), by everything else
(others), stolen (steal), CPU ms per item, and the peak of the summed RSS / PSS
of this process and its descendants (``_common.TreeMemorySampler``, every 50 ms;
for (Rs)/(Tp) the tree includes the subprocess; this process holds torch and the
datasets, so the in-process variants' RSS starts near 1 GB and is not the
format's cost: compare the same kind of variant only).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import traceback
import zipfile
import zlib
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import numpy as np
from torch.utils.data import DataLoader

from _common import (VenvHelper, cpu_ms_of, is_disturbed, leader_tree, measure_pass,
                     reported_cores, version)
from _report import (PADDED, PSS, RSS, SAMPLES, Column, Report, add_corpus_args, add_out_arg,
                     check_corpus_args, command_line, cpu_line, datago_line, disturbed_column,
                     disturbed_rule, make_parser, med, memory_note, per_round, problem_lines,
                     ratio_header, ratio_row, ratio_rows, run_rounds, runtime_line, seconds_notes,
                     span, stack_line, variant_table, verdict_lines)
from bench_loader import (BATCH, HANG_DUMP_S, MEM_INTERVAL, PSS_DUTY, SourcesBench,
                          open_corpus)
from datago.convert import convert, wds_key
from datago.dataset import DatagoMapDataset
from datago.sources import make_source
from datago.config import DatagoConfig
from datago.sources.bins import BinsSource
from datago.sources.tfrecord import parse_example, read_records

SIZE, RATIO = 512, 16
SPLITS = 128                  # datago.bins' default; splitdataloader written with the same
TFR_SHARDS = 4
WDS_SHARDS = 8
WARMUP_BATCHES = 2
WARMUP_ACCESSES = 256
SEED = 1234
TARGET = 0.95

LOADERS = ("F", "Z", "Zd", "T", "B", "W")
RANDOM = ("M", "Mf", "Rb", "Rs")
TFR = ("To", "Ts", "Tp")
EXTERNAL = ("Rs", "Tp")       # run in the separate venv

DESC = {
    "F": "folder, file source",
    "Z": "zip, stored members",
    "Zd": "zip, deflate members",
    "T": "tfrecord (4 files, id_key image/filename)",
    "B": f"bins ({SPLITS} splits)",
    "W": f"webdataset ({WDS_SHARDS} shards + .idx.json)",
    "M": "DatagoMapDataset(bins)[i], decoded",
    "Mf": "DatagoMapDataset(folder)[i], decoded",
    "Rb": "BinsSource[i], raw bytes (ours)",
    "Rs": "splitdataloader SplitDataLoader[i], raw bytes (subprocess)",
    "To": "ours: TFRecordSource refs via the fetcher (CRCs checked)",
    "Ts": "ours: read_records + parse_example, streamed (CRCs checked)",
    "Tp": "tfrecord package: tfrecord_loader (no CRC check, subprocess)",
}
UNIT = {**{k: "img/s" for k in LOADERS}, **{k: "samples/s" for k in RANDOM},
        **{k: "records/s" for k in TFR}}

# (label, numerator, denominator, target or None)
RATIOS = [
    ("Z/F", "Z", "F", TARGET),
    ("T/F", "T", "F", TARGET),
    ("B/F", "B", "F", TARGET),
    ("W/F", "W", "F", TARGET),
    ("Zd/F", "Zd", "F", None),
    ("M/Mf", "M", "Mf", None),
    ("Rb/Rs", "Rb", "Rs", None),
    ("To/Tp", "To", "Tp", None),
    ("Ts/Tp", "Ts", "Tp", None),
]


# --------------------------------------------------------------------------- the other venv

EXT_HELPER = r'''
import json, os, sys, time, zlib
t_proc = time.perf_counter()
args = json.loads(sys.argv[1])
mode = args["mode"]
TICK = os.sysconf("SC_CLK_TCK")
def counters():
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    v += [0] * (8 - len(v))
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / TICK, v[7] / TICK

def versions():
    from importlib import metadata
    out = {"python": sys.version.split()[0]}
    for d in ("splitdataloader", "tfrecord", "numpy", "protobuf", "crc32c"):
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            out[d] = None
    try:
        from google.protobuf.internal import api_implementation
        out["protobuf_impl"] = api_implementation.Type()
    except Exception:
        out["protobuf_impl"] = None
    return out

if mode == "versions":
    print(json.dumps(versions()))
    sys.exit(0)

if mode == "sdl_write":
    from splitdataloader import write_split_data
    with open(args["list"]) as f:
        paths = json.load(f)
    def data():
        for p in paths:
            with open(p, "rb") as f:
                yield f.read()
    t0 = time.perf_counter()
    write_split_data(args["dir"], data(), splits=args["splits"], start_clean=True)
    print(json.dumps({"seconds": time.perf_counter() - t0}))
    sys.exit(0)

check = args.get("check", 0)
crcs, crc_sum, n, nbytes = [], 0, 0, 0
if mode == "sdl_read":
    import numpy as np
    from splitdataloader import SplitDataLoader
    idx = np.load(args["indices"]).tolist()
    if args.get("count"):
        idx = idx[:args["count"]]
    loader = SplitDataLoader(args["dir"])
    length = len(loader)
    busy0, steal0 = counters()
    c0 = time.process_time()
    t1 = time.perf_counter()
    for i in idx:
        data = loader[i]
        n += 1
        nbytes += len(data)
        if check:
            crcs.append(zlib.crc32(data))
    wall = time.perf_counter() - t1
elif mode == "tfr_read":
    from tfrecord.reader import tfrecord_loader
    length = None
    busy0, steal0 = counters()
    c0 = time.process_time()
    t1 = time.perf_counter()
    for path in args["files"]:
        for rec in tfrecord_loader(path, None, {"image/encoded": "byte"}):
            data = rec["image/encoded"]
            n += 1
            nbytes += len(data)
            if check:
                crc_sum = (crc_sum + zlib.crc32(data)) & 0xFFFFFFFF
    wall = time.perf_counter() - t1
else:
    raise SystemExit(f"unknown mode {mode}")
ours = time.process_time() - c0
busy1, steal1 = counters()
print(json.dumps({"n": n, "bytes": nbytes, "wall": wall, "length": length,
                  "ours": ours / wall if wall else 0.0,
                  "busy": (busy1 - busy0) / wall if wall else 0.0,
                  "steal": (steal1 - steal0) / wall if wall else 0.0,
                  "crcs": crcs, "crc_sum": crc_sum,
                  "t_before": t1 - t_proc}))
'''


class External(VenvHelper):
    """``splitdataloader`` and ``tfrecord`` in their own venv, run as subprocesses."""

    packages = ("splitdataloader", "tfrecord", "numpy")

    def __init__(self, venv: Path, workdir: Path):
        super().__init__(venv, workdir / "ext_helper.py", EXT_HELPER)
        self.versions: dict = {}

    def ensure(self) -> Optional[str]:
        """Create the venv if missing; None when usable, else why not."""
        why = self.create()
        if why:
            return why
        try:
            self.versions = self.run({"mode": "versions"})
        except RuntimeError as exc:
            return str(exc)
        missing = [d for d in ("splitdataloader", "tfrecord", "numpy") if not self.versions.get(d)]
        if missing:
            return f"{self.python}: {', '.join(missing)} not installed"
        return None

    def run(self, args: dict, timeout: float = 600) -> dict:
        return self.call(json.dumps(args), timeout, args["mode"])[0]


# --------------------------------------------------------------------------- passes

class Pass(NamedTuple):
    """One timed pass: ``n`` items (images delivered, samples accessed, records read)
    in ``wall`` seconds; ``ours``/``others``/``steal``: cores used by the measured
    process (this one and its workers, or the subprocess as it measured itself),
    by everything else, stolen; ``rss``/``pss``: peaks of the process tree (bytes);
    ``mem_cpu``: cores used by the memory sampler (not in ``ours``)."""
    wall: float
    n: int
    nbytes: int
    ours: float
    others: float
    steal: float
    first: Optional[float]
    rss: int
    pss: int
    padded: Optional[int]
    mem_cpu: float

    @property
    def rate(self) -> float:
        return self.n / self.wall if self.wall > 0 else float("nan")

    disturbed = property(is_disturbed)
    cpu_ms = property(cpu_ms_of)


class FormatsBench(SourcesBench):
    """bench_loader's SourcesBench (its folder dataset is ``self.ds``, its checks)
    plus the other formats, the random-access and the TFRecord variants."""

    def __init__(self, corpus, n, data_root, workdir: Path, ext: Optional[External],
                 deflate: bool, raw_accesses: int):
        super().__init__(corpus, n, data_root, None, "F", SIZE)
        self.workdir = workdir
        self.ext = ext
        self.deflate = deflate
        self.raw_accesses = raw_accesses
        self.t_convert: Dict[str, float] = {}
        self.disk: Dict[str, int] = {}
        self.t_build["F"] = self.t_ds
        self.checks: List[str] = []

    # ---------------------------------------------------------------- set-up
    def map_config(self, source_type: str, source_config: dict) -> dict:
        cfg = self.config(source_type, source_config)
        cfg.pop("batch_size")
        return cfg

    def write_zip(self, path: Path, method: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(path, "w", compression=method, allowZip64=True) as zf:
            for r in self.rel:
                zf.write(str((self.corpus.root / r).resolve()), arcname=r)

    def convert_to(self, fmt: str, dst: Path, **kw) -> dict:
        s = convert(str(self.data_root), str(dst), fmt, workers=1, progress=False,
                    durable=False, **kw)
        if s["samples"] != self.n or s["failed"]:
            self.problem(f"convert to {fmt}: {s['samples']} samples written of {self.n}, "
                         f"failed {s['failed']} (e.g. {s['failed_ids'][:3]})")
        return s

    def setup(self, names: List[str]) -> None:
        w = self.workdir
        # --- conversions (untimed)
        t0 = time.perf_counter()
        self.write_zip(w / "zip" / "stored.zip", zipfile.ZIP_STORED)
        self.t_convert["zip stored"] = time.perf_counter() - t0
        self.disk["zip stored"] = (w / "zip" / "stored.zip").stat().st_size
        if "Zd" in names:
            t0 = time.perf_counter()
            self.write_zip(w / "zip" / "deflate.zip", zipfile.ZIP_DEFLATED)
            self.t_convert["zip deflate"] = time.perf_counter() - t0
            self.disk["zip deflate"] = (w / "zip" / "deflate.zip").stat().st_size
        t0 = time.perf_counter()
        self.convert_to("tfrecord", w / "tfrecord", shard_samples=-(-self.n // TFR_SHARDS))
        self.t_convert["tfrecord"] = time.perf_counter() - t0
        self.tfr_files = sorted(str(p) for p in (w / "tfrecord").glob("shard-*.tfrecord"))
        self.disk["tfrecord"] = sum(os.path.getsize(p) for p in self.tfr_files)
        t0 = time.perf_counter()
        self.convert_to("bins", w / "bins", splits=SPLITS)
        self.t_convert["bins"] = time.perf_counter() - t0
        self.disk["bins"] = sum(p.stat().st_size for p in (w / "bins").glob("bin-*.bin"))
        t0 = time.perf_counter()
        s = self.convert_to("webdataset", w / "wds", shard_samples=-(-self.n // WDS_SHARDS))
        self.t_convert["webdataset"] = time.perf_counter() - t0
        self.wds_url = s["pattern"]
        self.disk["webdataset"] = sum(p.stat().st_size for p in (w / "wds").glob("shard-*.tar"))
        # --- datasets
        self.expected_ids["Z"] = self.expected_ids["Zd"] = self.expected
        self.expected_ids["T"] = self.expected_ids["B"] = self.expected
        self.datasets["Z"] = self.build("Z", "zip", {"path": str(w / "zip" / "stored.zip")})
        if "Zd" in names:
            self.datasets["Zd"] = self.build("Zd", "zip",
                                             {"path": str(w / "zip" / "deflate.zip")})
        self.tfr_cfg = {"path": str(w / "tfrecord" / "shard-*.tfrecord"),
                        "id_key": "image/filename"}
        self.datasets["T"] = self.build("T", "tfrecord", self.tfr_cfg)
        self.datasets["B"] = self.build("B", "bins", {"path": str(w / "bins")})
        self.expected_ids["W"] = self.alias({wds_key(r): r for r in self.rel})
        self.datasets["W"] = self.build("W", "webdataset", {"url": self.wds_url})
        self.check_listings()
        # --- random access
        t0 = time.perf_counter()
        self.map_b = DatagoMapDataset(self.map_config("bins", {"path": str(w / "bins")}))
        self.map_f = DatagoMapDataset(self.map_config("file", {"root_path": str(self.data_root)}))
        self.t_build["M + Mf"] = time.perf_counter() - t0
        self.bins_src = BinsSource(str(w / "bins"))
        self.bins_ids = [self.bins_src.sample_id(i) for i in range(len(self.bins_src))]
        rng = np.random.default_rng(SEED)
        self.perm = rng.permutation(len(self.bins_src)).tolist()
        reps = -(-self.raw_accesses // max(1, len(self.bins_src)))
        self.raw_idx = np.concatenate([rng.permutation(len(self.bins_src))
                                       for _ in range(reps)])[:self.raw_accesses].astype(np.int64)
        self.raw_idx_path = w / "raw_indices.npy"
        np.save(self.raw_idx_path, self.raw_idx)
        self.raw_list = self.raw_idx.tolist()
        if self.ext is not None:
            lst = w / "sdl_files.json"
            lst.write_text(json.dumps([str((self.corpus.root / r).resolve())
                                       for r in self.bins_ids]))
            out = self.ext.run({"mode": "sdl_write", "list": str(lst), "dir": str(w / "sdl"),
                                "splits": SPLITS}, timeout=1800)
            self.t_convert["splitdataloader"] = out["seconds"]
            self.disk["splitdataloader"] = sum(p.stat().st_size
                                               for p in (w / "sdl").glob("bin*.dat"))
        # --- TFRecord reading, ours
        t0 = time.perf_counter()
        cfg = DatagoConfig.from_dict({"source_type": "tfrecord", "source_config": self.tfr_cfg})
        self.tfr_fetcher, self.tfr_src = make_source(cfg)
        self.t_build["To (TFRecordSource)"] = time.perf_counter() - t0
        self.tfr_locs = [self.tfr_src.main_location(i) for i in range(len(self.tfr_src))]

    def read_layer(self, names: List[str], repeats: int = 3) -> str:
        """Untimed: CPU microseconds per sample of what a loader variant does before
        the decode -- ``listing.ref(i)`` and ``fetcher.read(ref.path)`` for every
        sample, single-threaded, the best of ``repeats`` (process CPU time, so
        other people's load hardly moves it)."""
        parts = []
        for name in names:
            if name not in LOADERS or name not in self.datasets:
                continue
            ds = self.datasets[name]
            listing, read = ds.listing, ds.fetcher.read
            best_ref = best_read = float("inf")
            for _ in range(repeats):
                c = time.process_time()
                refs = [listing.ref(i) for i in range(len(listing))]
                c1 = time.process_time()
                for r in refs:
                    read(r.path)
                c2 = time.process_time()
                best_ref, best_read = min(best_ref, c1 - c), min(best_read, c2 - c1)
            k = max(1, len(refs))
            parts.append(f"({name}) {best_ref / k * 1e6:.0f} + {best_read / k * 1e6:.0f}")
        return ("read layer alone (untimed; CPU us per sample, listing.ref(i) + "
                "fetcher.read(ref.path) of the main image, one thread, best of "
                f"{repeats}): " + ", ".join(parts))

    # ---------------------------------------------------------------- passes
    def pass_map(self, name: str, count: Optional[int] = None) -> dict:
        ds = self.map_b if name == "M" else self.map_f
        idx = self.perm[:count] if count else self.perm
        got = []
        t0 = time.perf_counter()
        for i in idx:
            s = ds[i]
            got.append((s["id"], tuple(s["image"].shape)))
        wall = time.perf_counter() - t0
        ids = self.bins_ids if name == "M" else None
        bad = []
        for i, (sid, shape) in zip(idx, got):
            want_id = ids[i] if ids is not None else ds.sample_id(i)
            h, w = self.bucket_of.get(want_id, (None, None))
            if sid != want_id or shape != (3, h, w):
                bad.append((i, sid, shape, want_id, (h, w)))
        if bad:
            self.problem(f"({name}) {len(bad)} samples with another id or shape than their "
                         f"index's header bucket, first (i, id, shape, want id, bucket): {bad[0]}")
        return dict(wall=wall, n=len(got), nbytes=0, first=None, padded=None)

    def pass_raw_ours(self, count: Optional[int] = None, check: bool = False) -> dict:
        src = self.bins_src
        idx = self.raw_list[:count] if count else self.raw_list
        n = nbytes = 0
        crcs = []
        t0 = time.perf_counter()
        for i in idx:
            data = src[i]["image"]
            n += 1
            nbytes += len(data)
            if check:
                crcs.append(zlib.crc32(data))
        wall = time.perf_counter() - t0
        return dict(wall=wall, n=n, nbytes=nbytes, first=None, padded=None, crcs=crcs)

    def pass_ext(self, name: str, check: bool = False, count: Optional[int] = None) -> dict:
        if name == "Rs":
            args = {"mode": "sdl_read", "dir": str(self.workdir / "sdl"),
                    "indices": str(self.raw_idx_path), "check": check, "count": count}
        else:
            args = {"mode": "tfr_read", "files": self.tfr_files, "check": check}
        t0 = time.perf_counter()
        out = self.ext.run(args)
        out["total"] = time.perf_counter() - t0
        return dict(wall=out["wall"], n=out["n"], nbytes=out["bytes"], first=None,
                    padded=None, ours=out["ours"], busy=out["busy"], steal=out["steal"],
                    out=out)

    def pass_tfr_ours(self, check: bool = False) -> dict:
        read = self.tfr_fetcher.read
        n = nbytes = crc = 0
        t0 = time.perf_counter()
        for loc in self.tfr_locs:
            data = read(loc)
            n += 1
            nbytes += len(data)
            if check:
                crc = (crc + zlib.crc32(data)) & 0xFFFFFFFF
        wall = time.perf_counter() - t0
        return dict(wall=wall, n=n, nbytes=nbytes, first=None, padded=None, crc_sum=crc)

    def pass_tfr_stream(self, check: bool = False) -> dict:
        fetcher = self.tfr_fetcher
        n = nbytes = crc = 0
        t0 = time.perf_counter()
        for path in self.tfr_files:
            for rec in read_records(path, fetcher):
                data = parse_example(rec)["image/encoded"][0]
                n += 1
                nbytes += len(data)
                if check:
                    crc = (crc + zlib.crc32(data)) & 0xFFFFFFFF
        wall = time.perf_counter() - t0
        return dict(wall=wall, n=n, nbytes=nbytes, first=None, padded=None, crc_sum=crc)

    def run_variant(self, name: str) -> dict:
        if name in LOADERS:
            return self.pass_source(name)
        if name in ("M", "Mf"):
            return self.pass_map(name)
        if name == "Rb":
            return self.pass_raw_ours()
        if name in EXTERNAL:
            return self.pass_ext(name)
        if name == "To":
            return self.pass_tfr_ours()
        return self.pass_tfr_stream()

    def timed(self, name: str) -> Optional[Pass]:
        # the tree of this process (and of the subprocess of (Rs)/(Tp)), children read
        # from each process's main thread only, as bench_remote does
        got = measure_pass(lambda: self.run_variant(name), self.problem, name,
                           interval=MEM_INTERVAL, pss_duty=PSS_DUTY, hang_dump_s=HANG_DUMP_S,
                           tree=leader_tree)
        if got is None:
            return None
        r, cost = got
        wall = r["wall"]
        # (Rs)/(Tp): the subprocess measured itself over its own loop
        ours, others, steal = reported_cores(r) if name in EXTERNAL else cost.cores(wall)
        return Pass(wall, r["n"], r.get("nbytes", 0), ours, others, steal, r.get("first"),
                    cost.mem.peak_rss, cost.mem.peak_pss, r.get("padded"), cost.mem_cores)

    # ---------------------------------------------------------------- warm-up + checks
    def warm_up(self, names: List[str]) -> List[str]:
        """Untimed: two batches of each loader variant, WARMUP_ACCESSES of the random
        access variants, a whole pass of the TFRecord ones; the bytes checks (see
        the module docstring).  Returns the variants that failed."""
        failed = []
        k = min(WARMUP_ACCESSES, len(self.raw_list))
        want_raw = [zlib.crc32((self.corpus.root / self.bins_ids[i]).read_bytes())
                    for i in self.raw_list[:k]]
        files_crc = 0
        for r in self.rel:
            files_crc = (files_crc + zlib.crc32((self.corpus.root / r).read_bytes())) & 0xFFFFFFFF
        files_bytes = sum((self.corpus.root / r).stat().st_size for r in self.rel)
        tfr: Dict[str, tuple] = {}
        for name in names:
            try:
                if name in LOADERS:
                    it = iter(DataLoader(self.datasets[name], batch_size=None, num_workers=0))
                    for _ in zip(range(WARMUP_BATCHES), it):
                        pass
                    del it
                elif name in ("M", "Mf"):
                    self.pass_map(name, WARMUP_ACCESSES)
                elif name == "Rb":
                    got = self.pass_raw_ours(k, check=True)["crcs"]
                    ok = got == want_raw
                    self.checks.append(f"(Rb) the first {k} accesses give the corpus files' "
                                       f"bytes: {ok}")
                    if not ok:
                        self.problem(f"(Rb) bytes differ from the corpus files in "
                                     f"{sum(a != b for a, b in zip(got, want_raw))} of {k}")
                elif name == "Rs":
                    r = self.pass_ext("Rs", check=True, count=k)
                    got = r["out"]["crcs"]
                    ok = got == want_raw and r["out"]["length"] == len(self.bins_src)
                    self.checks.append(f"(Rs) splitdataloader: len() {r['out']['length']}, the "
                                       f"first {k} accesses give the corpus files' bytes "
                                       f"(the same images as (Rb)'s): {ok}")
                    if not ok:
                        self.problem(f"(Rs) len() {r['out']['length']} (want "
                                     f"{len(self.bins_src)}), bytes differ in "
                                     f"{sum(a != b for a, b in zip(got, want_raw))} of {k}")
                else:
                    r = (self.pass_ext(name, check=True) if name == "Tp" else
                         self.pass_tfr_ours(True) if name == "To" else self.pass_tfr_stream(True))
                    crc = r["out"]["crc_sum"] if name == "Tp" else r["crc_sum"]
                    tfr[name] = (r["n"], r["nbytes"], crc)
            except Exception as exc:                              # noqa: BLE001
                self.problem(f"({name}) warm-up raised {type(exc).__name__}: {exc}\n"
                             + "".join(traceback.format_exc().splitlines(True)[-8:]))
                failed.append(name)
        want = (self.n, files_bytes, files_crc)
        for name, got in tfr.items():
            ok = got == want
            self.checks.append(f"({name}) records, image bytes, sum of CRC-32s = the corpus "
                               f"files': {ok} ({got[0]} records, {got[1] / 1e6:.1f} MB)")
            if not ok:
                self.problem(f"({name}) read (records, bytes, crc sum) {got}, the corpus "
                             f"files {want}")
        return failed


# --------------------------------------------------------------------------- rounds + report

def round_summary(passes: Dict[str, Optional[Pass]]) -> str:
    return "  ".join(f"{k} FAILED" if p is None else f"{k} {p.rate:.1f}{'!' if p.disturbed else ''}"
                     for k, p in passes.items())


def columns(rounds: int) -> List[Column]:
    return [
        Column(f"rate (median of {rounds})", lambda _, ok: f"{med(t.rate for t in ok):.1f}"),
        Column("unit", lambda name, _: UNIT[name], "---"),
        Column("min..max", lambda _, ok: span([t.rate for t in ok])),
        SAMPLES._replace(heading="items"), PADDED,
        Column("MB/s", lambda _, ok: (f"{med(t.nbytes / t.wall / 1e6 for t in ok):.0f}"
                                      if ok[0].nbytes else "-")),
        Column("CPU ms / item", lambda _, ok: f"{med(t.cpu_ms for t in ok):.2f}"), RSS, PSS,
        Column("cores: ours (median) / others, steal (max)", lambda _, ok: (
            f"{med(t.ours for t in ok):.2f} / {max(t.others for t in ok):.2f}, "
            f"{max(t.steal for t in ok):.2f}")),
        disturbed_column(rounds)]


def ratio_table(times: Dict[str, list], rounds: int) -> tuple:
    lines = ratio_header()
    for x in LOADERS[1:]:                 # CPU per image: robust to other people's load
        values = per_round(times, "F", x, rounds, lambda t: t.cpu_ms)
        if values:
            lines.append(ratio_row(f"CPU ms/img F/{x}", values, digits=3)[0])
    rows, verdicts = ratio_rows(RATIOS, times, rounds, digits=3)
    return lines + rows, verdicts


def notes(bench: FormatsBench, names: List[str], times: Dict[str, list]) -> List[str]:
    out = ["conversion (untimed, one process): " + ", ".join(
        f"{k} {v:.1f} s ({bench.disk.get(k, 0) / 1e6:.1f} MB)" for k, v in bench.t_convert.items())
        + f"; the files: {bench.corpus_bytes / 1e6:.1f} MB"]
    out.append("construction (untimed), ms: " + ", ".join(
        f"({k}) {v * 1e3:.0f}" for k, v in bench.t_build.items())
        + " -- (F) reads its sizes cache; (Z)/(Zd) scan the members' headers (the archives "
          "are new each run, so the dataset's sizes cache misses); (T)/(W) read the indexes "
          "convert wrote; (B) reads index.jsonl")
    out += bench.checks
    out += seconds_notes(names, bench.seconds, times, digits=2)
    out.append(memory_note("this process and its descendants ((Rs)/(Tp): with their "
                           "subprocess)", times))
    out.append(f"cores: 'others' is everything else on the machine (the memory sampler's "
               f"own CPU excluded); a pass is disturbed when {disturbed_rule()}")
    return out


def environment(bench: FormatsBench, ext_line: str) -> List[str]:
    return [
        cpu_line(),
        f"{stack_line()}, xxhash {version('xxhash')}",
        f"{datago_line()}; batch {BATCH}, remainder 'pad', prefetch_batches "
        f"{bench.ds.config.loader.prefetch_batches}",
        f"- {ext_line}",
        bench.corpus_line(f", {bench.corpus_bytes / 1e6:.1f} MB; buckets {bench.buckets_text()}; "
                          f"formats in {bench.workdir} (same disk); page cache warm (files read "
                          f"before timing, the formats just written and read by the warm-up)"),
    ]


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = make_parser(__doc__)
    add_corpus_args(ap, rounds=5)
    ap.add_argument("--raw-accesses", type=int, default=None,
                    help="random accesses per pass of (Rb)/(Rs) (default max(N, 20000))")
    ap.add_argument("--venv", type=Path, default=Path("/tmp/bench_formats_venv"),
                    help="venv with splitdataloader and tfrecord (created when missing)")
    ap.add_argument("--no-ext", action="store_true",
                    help="skip (Rs) and (Tp) (splitdataloader, tfrecord package)")
    ap.add_argument("--no-deflate", action="store_true", help="skip (Zd)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated subset to time, e.g. F,B,W (default: all)")
    add_out_arg(ap, "report")
    args = ap.parse_args(argv)
    check_corpus_args(ap, args)
    if args.raw_accesses is not None and args.raw_accesses < 1:
        ap.error("--raw-accesses must be >= 1")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))       # clean up on kill
    t_start = time.perf_counter()
    corpus, n, workdir, data_root = open_corpus(args.corpus, args.limit, "bench_formats_")
    ext, ext_why = None, None
    if args.no_ext:
        ext_why = "--no-ext given"
    else:
        ext = External(args.venv, workdir)
        ext_why = ext.ensure()
        if ext_why:
            ext = None
    names = [v for v in LOADERS + RANDOM + TFR
             if (v not in EXTERNAL or ext is not None) and (v != "Zd" or not args.no_deflate)]
    if args.variants:
        pick = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in pick if v not in DESC]
        if unknown:
            ap.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(DESC)})")
        names = [v for v in names if v in pick]
    raw = args.raw_accesses or max(n, 20000)
    bench = FormatsBench(corpus, n, data_root, workdir, ext, not args.no_deflate, raw)
    bench.corpus_bytes = sum((corpus.root / r).stat().st_size for r in corpus.rel[:n])
    report = Report()
    verdicts: list = []
    try:
        print(f"converting {n} images (untimed) in {workdir} ...", flush=True)
        bench.setup(names)
        failed = bench.warm_up(names)
        names = [x for x in names if x not in failed]
        bench.checks.append(bench.read_layer(names))
        if ext is not None:
            v = ext.versions
            ext_line = (f"separate venv {args.venv} (Python {v.get('python')}): splitdataloader "
                        f"{v.get('splitdataloader')}, tfrecord {v.get('tfrecord')}, protobuf "
                        f"{v.get('protobuf')} ({v.get('protobuf_impl')} implementation), numpy "
                        f"{v.get('numpy')}, crc32c {v.get('crc32c')}")
        else:
            ext_line = f"(Rs), (Tp) NOT RUN: {ext_why}"
        report.add(["## Environment", ""] + environment(bench, ext_line)
                   + [command_line("bench_formats.py", argv), ""], gap=False)
        t_rounds = time.perf_counter()
        times = run_rounds(bench.timed, names, args.rounds, round_summary)
        elapsed = time.perf_counter() - t_rounds
        rtable, verdicts = ratio_table(times, args.rounds)
        cols = columns(args.rounds)

        def table(group):
            return variant_table(cols, [x for x in names if x in group], times, DESC)
        section = [f"## Formats, buckets {SIZE} ({n} images, {args.rounds} rounds)", ""]
        section += [f"- {s}" for s in notes(bench, names, times)]
        section += [f"- timed passes took {elapsed:.0f} s", "",
                    "### img/s at 512 buckets (DatagoDataset, DataLoader(num_workers=0))", ""]
        section += table(LOADERS)
        section += ["", f"### Random access ({len(bench.perm)} decoded samples per pass of "
                        f"(M)/(Mf), {raw} raw accesses per pass of (Rb)/(Rs))", ""]
        section += table(RANDOM)
        section += ["", f"### TFRecord reading ({len(bench.tfr_files)} files, {n} records, "
                        f"image bytes out, no decode)", ""]
        section += table(TFR)
        section += ["", "### Ratios (per round, then the median)", ""] + rtable + [""]
        report.add(section)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    tail = ["## Summary", ""] + verdict_lines(verdicts, digits=3)
    if ext is None:
        tail.append(f"- (Rs), (Tp) not run: {ext_why}")
    tail += problem_lines(bench.problems) + [runtime_line(t_start)]
    report.add(tail)
    report.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
