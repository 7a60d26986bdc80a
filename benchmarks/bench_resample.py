"""The resampler alone: ns per output pixel by filter, scale and kernel build.

    python benchmarks/bench_resample.py [--reps 30]

Same source (a smooth image with detail), resized with datago.resize for the
cases that dominate decode_to_bucket (mild downscale at 1024 buckets, the
residual downscale after DCT scaling at 512), with the baseline (SSE2) and
AVX2+FMA kernel builds, next to Pillow (BILINEAR, LANCZOS: the same filters) and
OpenCV (INTER_AREA, INTER_LANCZOS4) on the same arrays.  Best of --reps runs.
"""

import argparse
import time

import numpy as np

import datago
from datago._core import _resample

CASES = [((1200, 900), (1152, 864), "mild downscale (1024 buckets)"),
         ((640, 480), (544, 416), "residual after DCT scaling (512 buckets)"),
         ((1600, 1200), (576, 448), "2.8x downscale, no DCT scaling (PNG)")]


def best(fn, reps):
    t = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    builds = ["generic"] + (["avx2"] if _resample.set_simd("auto") == "avx2" else [])
    try:
        import cv2
        cv2.setNumThreads(1)
    except ImportError:
        cv2 = None
    from PIL import Image
    print("| case | filter | " + " | ".join(f"datago {b} ns/px" for b in builds)
          + " | Pillow ns/px | OpenCV ns/px |")
    print("|---|---|" + "---:|" * (len(builds) + 2))
    for (sw, sh), (ow, oh), label in CASES:
        yy, xx = np.mgrid[0:sh, 0:sw]
        src = (128 + 60 * np.sin(xx / 7.0)[..., None] * np.cos(yy / 5.0)[..., None]
               + rng.normal(0, 8, (sh, sw, 3))).clip(0, 255).astype(np.uint8)
        out = np.empty((oh, ow, 3), np.uint8)
        pil = Image.fromarray(src)
        # antialiased peers: Pillow's BILINEAR/LANCZOS and OpenCV's INTER_AREA; OpenCV's
        # INTER_LANCZOS4 has a fixed 8x8 kernel (no antialiasing when downscaling)
        for filt, pil_f, cv_f in (("triangle", Image.BILINEAR, "INTER_AREA"),
                                  ("lanczos", Image.LANCZOS, "INTER_LANCZOS4")):
            row = []
            for b in builds:
                _resample.set_simd(b)
                row.append(best(lambda: datago.resize(src, (oh, ow), filter=filt, out=out),
                                args.reps))
            t_pil = best(lambda: pil.resize((ow, oh), pil_f), max(3, args.reps // 5))
            t_cv = best(lambda: cv2.resize(src, (ow, oh), interpolation=getattr(cv2, cv_f)),
                        args.reps) if cv2 else float("nan")
            px = ow * oh / 1e9
            print(f"| {sw}x{sh} -> {ow}x{oh} {label} | {filt} | "
                  + " | ".join(f"{t / px:.2f}" for t in row)
                  + f" | {t_pil / px:.2f} ({'BILINEAR' if filt == 'triangle' else 'LANCZOS'})"
                  + f" | {t_cv / px:.2f} ({cv_f}) |")
    _resample.set_simd("auto")


if __name__ == "__main__":
    main()
