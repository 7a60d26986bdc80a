"""Decode speed of libjpeg-turbo at each DCT scaling factor m/8 (why datago skips 5/8-7/8).

    python benchmarks/bench_dct_scales.py CORPUS_DIR [--limit 200] [--rounds 3]

Decodes the corpus's JPEGs with TurboJPEG (through PyTurboJPEG, the same system
library datago links) at every factor m/8 and prints img/s, interleaving factors
across rounds and reporting medians.  On libjpeg-turbo 2.1 the scaled IDCTs for
m = 5, 6, 7 have no SIMD, so decoding at those factors is slower than at 8/8.
"""

import argparse
import statistics
import time
from fractions import Fraction
from pathlib import Path

from turbojpeg import TJPF_RGBX, TurboJPEG


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tj = TurboJPEG()
    files = sorted(Path(args.corpus).rglob("*.jpg"))[:args.limit]
    datas = [p.read_bytes() for p in files]
    factors = list(range(1, 9))
    rates = {m: [] for m in factors}
    for r in range(args.rounds):
        for m in factors[r % len(factors):] + factors[:r % len(factors)]:
            f = Fraction(m, 8)
            sf = None if m == 8 else (f.numerator, f.denominator)
            t = time.perf_counter()
            for d in datas:
                tj.decode(d, pixel_format=TJPF_RGBX, scaling_factor=sf)
            rates[m].append(len(datas) / (time.perf_counter() - t))
    print(f"{len(datas)} JPEGs from {args.corpus}, {args.rounds} rounds, RGBX output\n")
    print("| factor | img/s (median) | vs 8/8 |")
    print("|---|---:|---:|")
    full = statistics.median(rates[8])
    for m in factors:
        v = statistics.median(rates[m])
        print(f"| {m}/8 | {v:.0f} | {v / full:.2f} |")


if __name__ == "__main__":
    main()
