"""Memory is bounded by prefetch_batches, not by the number of buckets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import encode, photo

_PROBE = textwrap.dedent("""
    import json, sys
    from datago import DatagoDataset

    def status_kb(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])

    root, lo, hi, scan, max_open, keep = sys.argv[1], float(sys.argv[2]), \\
        float(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5]), int(sys.argv[6])
    ds = DatagoDataset({
        "source_config": {"root_path": root, "scan_sizes": scan},
        "image_config": {"crop_and_resize": True, "default_image_size": 384,
                         "downsampling_ratio": 8, "min_aspect_ratio": lo,
                         "max_aspect_ratio": hi},
        "batch_size": 16, "num_threads": 2, "max_open_batches": max_open, "remainder": "pad"})
    before = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:     # VmHWM := VmRSS: the peak of what follows
        f.write("5")
    kept, n = [], 0
    for b in ds:
        n += len(b["id"])
        if len(kept) < keep:                          # (the control: batches held)
            kept.append(b)
    peak = status_kb("VmHWM")
    print(json.dumps({"buckets": len(ds.buckets), "growth_mb": (peak - before) / 1024, "n": n}))
""")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """600 small images whose aspect ratios spread over 0.25..4."""
    root = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(0)
    for i in range(600):
        ar = float(np.exp(rng.uniform(np.log(0.25), np.log(4.0))))
        w = 48
        h = max(8, int(w / ar))
        (root / f"{i:04d}.jpg").write_bytes(encode(photo(w, h, seed=i % 50), "JPEG", quality=80))
    return root


# glibc keeps freed memory in per-thread arenas and raises its mmap threshold as
# big blocks are freed, so a process's peak RSS also counts what the allocator
# chose to keep -- 40-60 MB that came and went with thread timing here.  The probe
# fixes those choices (big blocks mmapped and returned at once, two arenas), so
# that the peak measures the loader's live memory.
_LIVE_MEMORY = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "65536",
                "MALLOC_TRIM_THRESHOLD_": "1048576"}


def probe(root, lo, hi, scan=True, max_open=8, keep=0):
    r = subprocess.run([sys.executable, "-c", _PROBE, str(root), str(lo), str(hi),
                        "1" if scan else "0", str(max_open), str(keep)],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **_LIVE_MEMORY})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_peak_memory_does_not_grow_with_bucket_count(wide):
    few = probe(wide, 0.85, 1 / 0.85)
    many = probe(wide, 0.25, 4.0)
    assert few["buckets"] <= 9 and many["buckets"] >= 80 and many["n"] >= 600
    # a batch at 384 is 16 x ~384 x 384 x 3 = 7 MB; 80 open buckets would be ~560 MB
    assert many["growth_mb"] < few["growth_mb"] + 40, (few, many)
    # streaming mode: samples wait for their bucket's batch undecoded (their JPEG
    # bytes), and only complete batches are decoded, so even with no cap on the
    # waiting ones (max_open_batches 1000) memory does not grow with the buckets
    unbounded = probe(wide, 0.25, 4.0, scan=False, max_open=1000)
    assert unbounded["n"] == 600
    assert unbounded["growth_mb"] < many["growth_mb"] + 40, (many, unbounded)
    # the control: 30 batches held by the consumer (~210 MB) do show, so the probe
    # sees growth
    held = probe(wide, 0.25, 4.0, keep=30)
    assert held["growth_mb"] > many["growth_mb"] + 150, (many, held)
