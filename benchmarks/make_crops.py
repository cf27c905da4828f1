"""Random query regions for the cropped-query benchmark: one crop of 20-40% of each image's area, seeded.

Writes a CSV ``path,x1,y1,x2,y2`` (boxes in original, EXIF-oriented pixels) that `jobs/benchmark.py --query-boxes` reads.

examples:
  python benchmarks/make_crops.py --dataset ../shared/datasets/paris6k-subset5 --seed 0 \
      --output benchmarks/paris6k-subset5_crops_seed0.csv
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import sys

from PIL import Image, ImageOps

from pipeline.bench.datasets import load_labelled_set


def crop_box(w: int, h: int, rng: random.Random, lo: float = 0.2, hi: float = 0.4) -> tuple[int, int, int, int]:
    """A box covering a fraction in [lo, hi] of a w x h image, its aspect ratio within a factor 2 of the image's,
    placed uniformly; whole pixels.

    Returns:
        (x1, y1, x2, y2).
    """
    area = rng.uniform(lo, hi)
    stretch = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    fw = min(1.0, math.sqrt(area * stretch))
    fh = min(1.0, area / fw)
    bw, bh = max(1, round(w * fw)), max(1, round(h * fh))
    x1, y1 = rng.randint(0, w - bw), rng.randint(0, h - bh)
    return x1, y1, x1 + bw, y1 + bh


def main(argv: list[str] | None = None) -> int:
    """Parse flags and write the crops CSV."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, help="labelled dataset root (class folders or labels.csv)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-area", type=float, default=0.2)
    p.add_argument("--max-area", type=float, default=0.4)
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)
    lset = load_labelled_set(a.dataset)
    rng = random.Random(a.seed)
    with open(a.output, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["path", "x1", "y1", "x2", "y2"])
        for path in lset.paths:
            with Image.open(f"{a.dataset}/{path}") as im:
                w, h = ImageOps.exif_transpose(im).size
            out.writerow([path, *crop_box(w, h, rng, a.min_area, a.max_area)])
    print(f"{len(lset.paths)} crops -> {a.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
