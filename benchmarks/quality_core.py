"""How far decode_to_bucket is from Pillow's LANCZOS, per filter, on a corpus.

    python benchmarks/quality_core.py CORPUS_DIR [--limit 200] [--sizes 512,1024]

For each image: Pillow full decode, EXIF transpose, RGB, then the exact cover
crop resized with LANCZOS (``Image.resize(bucket, LANCZOS, box=crop_box)``) is
the reference; datago's decode_to_bucket (DCT-scaled decode + our filter) is
compared to it.  Prints the distribution of the mean absolute difference and of
the PSNR per filter, and how many images miss "MAD < 2.5 and PSNR >= 33 dB".
Also splits out the effect of DCT scaling (ours on the full decode vs Pillow).
"""

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

import datago

FILTERS = ("triangle", "bicubic", "lanczos")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--sizes", default="512,1024")
    args = ap.parse_args()
    files = sorted(p for p in Path(args.corpus).rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    files = files[:args.limit]
    print(f"{len(files)} images from {args.corpus}")
    for size in (int(s) for s in args.sizes.split(",")):
        buckets = datago.make_buckets(size, size // 32, 0.5, 2.0)
        stats = {f: [] for f in FILTERS}
        nodct = []
        for p in files:
            data = p.read_bytes()
            im = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
            if im.mode == "RGBA":     # composite like datago does
                bg = Image.new("RGBA", im.size, (128, 128, 128, 255))
                im = Image.alpha_composite(bg, im)
            im = im.convert("RGB")
            for f in FILTERS:
                r = datago.decode_to_bucket(data, buckets, filter=f)
                wh = (r.bucket.width, r.bucket.height)           # Pillow's order
                ref = np.asarray(im.resize(wh, Image.LANCZOS, box=r.crop_box), np.float64)
                d = r.image.astype(np.float64) - ref
                mse = (d ** 2).mean()
                stats[f].append((np.abs(d).mean(), 99.0 if mse == 0 else 10 * np.log10(255 ** 2 / mse)))
                if f == "lanczos":
                    full = datago.resize(np.asarray(im), r.bucket, box=r.crop_box, filter="lanczos")
                    nodct.append(np.abs(full.astype(np.float64) - ref).mean())
        print(f"\n### make_buckets({size}, {size // 32}, 0.5, 2.0)\n")
        print("| filter | MAD median | MAD p90 | MAD max | PSNR min | PSNR median | miss (MAD >= 2.5 or PSNR < 33) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for f in FILTERS:
            v = np.array(stats[f])
            miss = int(((v[:, 0] >= 2.5) | (v[:, 1] < 33)).sum())
            print(f"| {f} | {np.median(v[:, 0]):.2f} | {np.percentile(v[:, 0], 90):.2f} | "
                  f"{v[:, 0].max():.2f} | {v[:, 1].min():.1f} | {np.median(v[:, 1]):.1f} | {miss}/{len(v)} |")
        nd = np.array(nodct)
        print(f"\nlanczos without DCT scaling (our filter on Pillow's full decode): MAD median "
              f"{np.median(nd):.2f}, max {nd.max():.2f} -- the rest of the lanczos row is the DCT scaling.")


if __name__ == "__main__":
    main()
