#!/usr/bin/env python
"""Memory and time of building an index source from a large index file.

    python benchmarks/bench_index.py [--rows 1000000,10000000] [--formats csv,parquet]

For each row count and format, writes an index of ``https://`` URLs with width,
height and a caption column (CSV: ~75 bytes per row; Parquet: row groups of
1M rows), then builds ``datago.sources.index.IndexSource`` from it in a fresh
subprocess and reports: seconds, the process's peak RSS minus its RSS after
``import datago`` (``VmHWM`` / ``VmRSS``), the source's own ``memory_bytes()``,
both per row, and the file's size.  "Flat" means the peak stays a small multiple
of what the source keeps (no copy of the file, no Python object per row).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
def vm(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
from datago.sources.index import IndexSource
base = vm("VmRSS")
open("/proc/self/clear_refs", "w").write("5")          # reset VmHWM
t = time.perf_counter()
src = IndexSource(sys.argv[1])
secs = time.perf_counter() - t
print(json.dumps({"rows": len(src), "seconds": secs, "peak_growth": vm("VmHWM") - base,
                  "held": src.memory_bytes(), "rss_after": vm("VmRSS") - base}))
"""


def write_csv(path: str, n: int) -> None:
    with open(path, "w") as f:
        f.write("url,width,height,caption\n")
        for i in range(n):
            f.write(f"https://cdn.example.com/images/{i:09d}.jpg,{640 + i % 7},480,"
                    f"a photo number {i}\n")


def write_parquet(path: str, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    step = 1_000_000
    schema = pa.schema([("url", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                        ("caption", pa.string())])
    with pq.ParquetWriter(path, schema) as w:
        for a in range(0, n, step):
            ids = range(a, min(n, a + step))
            w.write_table(pa.table({
                "url": [f"https://cdn.example.com/images/{i:09d}.jpg" for i in ids],
                "width": [640 + i % 7 for i in ids], "height": [480] * len(ids),
                "caption": [f"a photo number {i}" for i in ids]}, schema=schema))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1000000,10000000")
    ap.add_argument("--formats", default="csv,parquet")
    args = ap.parse_args()
    print("| format | rows | file MB | seconds | peak growth MB | held MB | peak B/row | held B/row |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats.split(","):
            for n in (int(x) for x in args.rows.split(",")):
                path = os.path.join(tmp, f"index-{n}.{fmt}")
                (write_csv if fmt == "csv" else write_parquet)(path, n)
                out = subprocess.run([sys.executable, "-c", CHILD, path], check=True,
                                     capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                assert r["rows"] == n, r
                mb = 1e6
                print(f"| {fmt} | {n:,} | {os.path.getsize(path) / mb:.0f} | {r['seconds']:.1f} | "
                      f"{r['peak_growth'] / mb:.0f} | {r['held'] / mb:.0f} | "
                      f"{r['peak_growth'] / n:.0f} | {r['held'] / n:.0f} |", flush=True)
                os.unlink(path)


if __name__ == "__main__":
    main()
