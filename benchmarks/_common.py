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
