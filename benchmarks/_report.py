"""What the benchmark scripts print, shared: the variant and ratio tables, the notes
that read the same in several scripts, the environment lines, the summary, the
command line and ``--out``.  (What they measure is in ``_common``.)

A script builds its report as lines of markdown, printed as they come and written
whole with ``--out``::

    report = Report()
    report.add(["## Environment", "", cpu_line(), ...], gap=False)
    report.add(section)                  # printed after an empty line
    report.write(args.out)

Tables are built from the passes of each variant, ``times[name]``: one entry per
round, None where the pass failed.  A pass is any object with the fields the
columns read (``rate``, ``n``, ``wall``, ``rss``, ``pss``, ``disturbed``, ...).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from operator import attrgetter
from pathlib import Path
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from _common import DISTURBED_OTHERS, DISTURBED_STEAL, cpu_model

# --------------------------------------------------------------------------- numbers


def mb(x: float) -> str:
    """Bytes as whole MB (10^6)."""
    return f"{x / 1e6:.0f}"


def med(xs: Iterable[float]) -> float:
    return statistics.median(xs)


def span(xs: Sequence[float], digits: int = 1) -> str:
    """``min..max``."""
    return f"{min(xs):.{digits}f}..{max(xs):.{digits}f}"


def distinct(values: Iterable) -> str:
    """The distinct values, sorted, ``/``-separated (e.g. sample counts over rounds)."""
    return "/".join(str(c) for c in sorted(set(values)))


def disturbed_rule() -> str:
    return f"others > {DISTURBED_OTHERS} or steal > {DISTURBED_STEAL} cores"


# --------------------------------------------------------------------------- variant tables

class Column(NamedTuple):
    """A column of a variant table: its heading, its cell from the variant's name and
    its passes that ran (at least one), and its markdown alignment."""
    heading: str
    cell: Callable[[str, list], str]
    align: str = "---:"


def variant_table(columns: List[Column], names: Iterable[str], times: Dict[str, list],
                  desc: Dict[str, str]) -> List[str]:
    """A row per variant, ``(name) desc`` then the columns; ``FAILED`` where none of
    its passes ran."""
    lines = ["| variant | " + " | ".join(c.heading for c in columns) + " |",
             "|---|" + "|".join(c.align for c in columns) + "|"]
    for name in names:
        ok = [t for t in times[name] if t is not None]
        label = f"({name}) {desc[name]}"
        if not ok:
            lines.append(f"| {label} | FAILED |" + " |" * (len(columns) - 1))
            continue
        lines.append(f"| {label} | " + " | ".join(c.cell(name, ok) for c in columns) + " |")
    return lines


def rate_columns(rounds: int) -> List[Column]:
    """img/s (median), source MP/s (median), img/s min..max."""
    return [Column(f"img/s (median of {rounds})", lambda _, ok: f"{med(t.rate for t in ok):.1f}"),
            Column("source MP/s", lambda _, ok: f"{med(t.mp / t.wall for t in ok):.1f}"),
            Column("img/s min..max", lambda _, ok: span([t.rate for t in ok]))]


SAMPLES = Column("samples", lambda _, ok: distinct(t.n for t in ok))
PADDED = Column("padded", lambda _, ok: (distinct(t.padded for t in ok)
                                         if ok[0].padded is not None else "-"))
FIRST = Column("first batch s", lambda _, ok: f"{med(t.first for t in ok):.2f}")
RSS = Column("peak tree RSS MB", lambda _, ok: mb(med(t.rss for t in ok)))
PSS = Column("peak tree PSS MB", lambda _, ok: mb(med(t.pss for t in ok)))


def disturbed_column(rounds: int) -> Column:
    """Disturbed passes / passes that ran, and how many failed."""
    return Column("disturbed", lambda _, ok: (
        f"{sum(t.disturbed for t in ok)}/{len(ok)}"
        f"{'' if len(ok) == rounds else f' ({rounds - len(ok)} failed)'}"))


# --------------------------------------------------------------------------- ratio tables

class Verdict(NamedTuple):
    """A target's outcome: ``result`` "PASS"/"FAIL", None when it was not run."""
    label: str
    target: str
    result: Optional[str]
    median: Optional[float] = None


def target_text(target: Optional[float]) -> str:
    return f">= {target}" if target is not None else "-"


def ratio_header(first: str = "ratio") -> List[str]:
    return [f"| {first} | median | min..max | rounds | target | result |",
            "|---|---:|---:|---:|---:|---|"]


def per_round(times: Dict[str, list], num: str, den: str, rounds: int,
              value: Callable = attrgetter("rate")) -> List[float]:
    """``value`` of ``num``'s pass over ``den``'s, for each round where both ran."""
    return [value(times[num][r]) / value(times[den][r]) for r in range(rounds)
            if num in times and den in times
            and times[num][r] is not None and times[den][r] is not None]


def ratio_row(label: str, values: List[float], target: Optional[float] = None,
              digits: int = 2) -> Tuple[str, Optional[Verdict]]:
    """The row of a ratio measured per round (at least one), against ``target``
    (a lower bound; None: information), and its verdict (None without a target)."""
    m = med(values)
    ttext = target_text(target)
    result = "info" if target is None else ("PASS" if m >= target else "FAIL")
    row = (f"| {label} | {m:.{digits}f} | {span(values, digits)} | {len(values)} | {ttext} "
           f"| {result} |")
    return row, (Verdict(label, ttext, result, m) if target is not None else None)


def not_run_row(label: str, ttext: str, result: str) -> str:
    return f"| {label} | - | - | 0 | {ttext} | {result} |"


def ratio_rows(ratios: Iterable[tuple], times: Dict[str, list], rounds: int,
               digits: int = 2) -> Tuple[List[str], List[Verdict]]:
    """Rows for ``(label, numerator, denominator, target or None)`` ratios of img/s
    per round: a target whose variants did not run is NOT RUN, an info ratio
    without passes is left out."""
    rows, verdicts = [], []
    for label, num, den, target in ratios:
        values = per_round(times, num, den, rounds)
        if not values:
            if target is not None:
                missing = "/".join(x for x in (num, den) if x not in times) or "passes failed"
                rows.append(not_run_row(label, target_text(target), f"NOT RUN ({missing})"))
                verdicts.append(Verdict(label, target_text(target), None))
            continue
        row, verdict = ratio_row(label, values, target, digits)
        rows.append(row)
        if verdict is not None:
            verdicts.append(verdict)
    return rows, verdicts


# --------------------------------------------------------------------------- notes

def seconds_notes(names: Iterable[str], seconds: Dict[str, List[dict]],
                  times: Dict[str, list], digits: int = 1) -> List[str]:
    """Per datago variant, its ``stats()["seconds"]`` (read, decode, consumer wait;
    ``digits`` for read and wait) summed over a pass, median over rounds."""
    out = []
    for name in names:
        secs = seconds.get(name)
        ok = [t for t in times.get(name, []) if t is not None]
        if secs and ok:
            out.append(f"({name}) stats()['seconds'] summed over the pass (median): read "
                       f"{med(s['read'] for s in secs):.{digits}f}, decode "
                       f"{med(s['decode'] for s in secs):.1f}, consumer wait "
                       f"{med(s['wait'] for s in secs):.{digits}f}; wall "
                       f"{med(t.wall for t in ok):.1f} s")
    return out


def memory_note(tree: str, times: Dict[str, list]) -> str:
    """What the peak RSS / PSS columns sum (``tree``) and the sampler's own CPU."""
    runs = {k: [t for t in v if t is not None] for k, v in times.items()}
    return (f"memory: peak over a pass of the summed RSS / PSS of {tree}; median over "
            "rounds; the sampler thread used "
            + ", ".join(f"({k}) {med(t.mem_cpu for t in v):.3f}" for k, v in runs.items() if v)
            + " cores (median; not in 'ours' or 'others')")


# --------------------------------------------------------------------------- environment

def cpu_line() -> str:
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return (f"- CPU: {cpu_model()}, {cores} logical cores ({usable} usable); load average at "
            f"start {os.getloadavg()[0]:.2f}")


def stack_line(torch_note: str = "") -> str:
    """``- Python ..., torch ...{torch_note}, numpy ..., Pillow ...``."""
    import numpy as np
    import PIL
    import torch
    return (f"- Python {platform.python_version()}, torch {torch.__version__}{torch_note}, "
            f"numpy {np.__version__}, Pillow {PIL.__version__}")


def source_tree() -> str:
    """The git commit of the datago imported, and its uncommitted changes under src."""
    import datago
    src = Path(datago.__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True).stdout.split("\n")
        dirty = [d[3:] for d in dirty if d.strip()]
        return f"git {head}" + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")
    except OSError:
        return "git state unknown"


def core_versions() -> Optional[str]:
    """The native core's libraries (None where it cannot tell)."""
    try:
        from datago._core import _jpeg, _png, _resample
        return (f"libjpeg-turbo {_jpeg.version()}, libspng {_png.version()}, "
                f"resample SIMD {_resample.simd()}")
    except Exception:                                             # noqa: BLE001
        return None


def datago_line() -> str:
    """``- datago V (its git state): its core's libraries; num_threads N (decode)``."""
    import datago
    from datago.dataset import default_num_threads
    return (f"- datago {datago.__version__} ({source_tree()}): "
            f"{core_versions() or 'core versions unknown'}; num_threads "
            f"{default_num_threads(1)} (decode)")


def tally(values: Iterable[str]) -> str:
    """``"38 jpeg, 2 png"``: how many of each value, sorted by value."""
    counts: Dict[str, int] = {}
    for f in values:
        counts[f] = counts.get(f, 0) + 1
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))


def command_line(script: str, argv: Optional[List[str]]) -> str:
    return (f"- command: `python benchmarks/{script} "
            f"{' '.join(sys.argv[1:] if argv is None else argv)}`")


# --------------------------------------------------------------------------- summary

def reference_line(info: dict, venv: Path) -> str:
    return (f"- reference datago {info['version']} (Python {info['python']}, numpy "
            f"{info['numpy']}, DATAGO_MAX_TASKS={info['max_tasks']}), from {venv}")


def verdict_lines(verdicts: Iterable[Verdict], digits: Optional[int] = None) -> List[str]:
    """``- label target: result`` (with the median to ``digits`` when given)."""
    return [f"- {v.label} {v.target}: {v.result or 'NOT RUN'}"
            + (f" ({v.median:.{digits}f})" if digits is not None and v.median is not None
               else "")
            for v in verdicts]


def problem_lines(problems: List[str]) -> List[str]:
    return ([f"- problems: {len(problems)}" + (":" if problems else "")]
            + [f"  - {p}" for p in problems])


def runtime_line(t_start: float) -> str:
    return f"- total runtime: {time.perf_counter() - t_start:.0f} s"


class Report:
    """The markdown a script prints as it goes, kept to be written with ``--out``."""

    def __init__(self) -> None:
        self.lines: List[str] = []

    def add(self, lines: List[str], gap: bool = True) -> None:
        """Print ``lines`` (after an empty line when ``gap``) and keep them."""
        print(("\n" if gap else "") + "\n".join(lines), flush=True)
        self.lines += lines

    def write(self, path: Optional[Path]) -> None:
        if path:
            path.write_text("\n".join(self.lines) + "\n")
            print(f"wrote {path}")


# --------------------------------------------------------------------------- arguments

def make_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of the script's docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_corpus_args(ap: argparse.ArgumentParser, rounds: int = 3,
                    rounds_help: Optional[str] = None) -> None:
    """CORPUS, ``--limit``, ``--rounds`` (checked by ``check_corpus_args``)."""
    ap.add_argument("corpus", type=Path, help="folder searched recursively for .jpg/.jpeg/.png")
    ap.add_argument("--limit", type=int, default=None,
                    help="use the first N images (sorted), for every variant")
    ap.add_argument("--rounds", type=int, default=rounds,
                    help=rounds_help or f"timed rounds (default {rounds})")


def add_ref_args(ap: argparse.ArgumentParser, variant: str) -> None:
    """``--ref-venv`` and ``--no-ref`` (skipping the reference's ``variant``)."""
    ap.add_argument("--ref-venv", type=Path, default=Path("/tmp/datago_ref"),
                    help="venv of the reference datago (created when missing)")
    ap.add_argument("--no-ref", action="store_true",
                    help=f"skip the reference variant ({variant})")


def add_out_arg(ap: argparse.ArgumentParser, what: str = "tables") -> None:
    ap.add_argument("--out", type=Path, default=None, help=f"also write the {what} to this .md")


def check_corpus_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be >= 1")


# --------------------------------------------------------------------------- rounds

def run_rounds(timed: Callable[[str], Optional[object]], names: List[str], rounds: int,
               summary: Callable[[Dict[str, object]], str], tag: str = "",
               more: str = "") -> Dict[str, list]:
    """``rounds`` rounds, each timing every variant once (``timed(name)``: a pass or
    None) in an order that rotates between rounds; after each, a line with
    ``summary({name: its pass of the round})``, and after the first an estimate
    of the rest (``tag`` starts both lines, ``more`` ends the estimate)."""
    times: Dict[str, list] = {k: [] for k in names}
    for r in range(rounds):
        t_round = time.perf_counter()
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(timed(name))
        took = time.perf_counter() - t_round
        print(f"  {tag}round {r + 1}/{rounds} ({' '.join(order)}) {took:.0f} s: "
              + summary({k: times[k][-1] for k in names}), flush=True)
        if r == 0 and rounds > 1:
            print(f"  {tag}estimated {took * (rounds - 1):.0f} s more{more}", flush=True)
    return times
