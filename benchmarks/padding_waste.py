"""Padding waste of a corpus's batches: today's size-sorted batches against padded-size buckets.

For each shard (``--shard-size`` images in listing order), images resized to ``--max-side`` are cut into batches by
``pipeline.extract.worker.plan_batches`` without buckets and with buckets of each ``--steps`` pixels; prints the
share of padded pixels no image fills and the number of distinct padded batch shapes (each costs a cuDNN autotuning
on a GPU).

    python benchmarks/padding_waste.py --images /work/shared/datasets/caltech101 --max-side 448 --batch-size 64
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.extract.worker import padding_waste, plan_batches
from pipeline.io.images import resize_max_side
from pipeline.io.listing import IMAGE_EXTS
from pipeline.model.transform import padded_size


def main_batches(shapes: list[tuple[int, int]], batch_size: int) -> list[tuple[list[int], None]]:
    """The batches main's ``run_model_on_shard`` made: sorted by (height, width), cut every batch_size."""
    order = sorted(range(len(shapes)), key=lambda i: shapes[i])
    return [(order[b:b + batch_size], None) for b in range(0, len(order), batch_size)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True, help="a local folder of images (sizes read from their headers)")
    p.add_argument("--max-side", type=int, default=448)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--stride", type=int, default=32, help="the backbone's stride (MobileNetV2 32, VGG16 16)")
    p.add_argument("--steps", default="32,64,96")
    args = p.parse_args()
    files = sorted(f for f in Path(args.images).rglob("*") if f.suffix.lower() in IMAGE_EXTS)
    shapes = []
    for f in files:
        with Image.open(f) as im:
            w, h = resize_max_side(*im.size, args.max_side)
        shapes.append((h, w))
    shards = [shapes[i:i + args.shard_size] for i in range(0, len(shapes), args.shard_size)]
    print(f"{len(shapes)} images, {len(shards)} shards of {args.shard_size}, max_side {args.max_side}, "
          f"batch {args.batch_size}, stride {args.stride}")
    print("| batching | padding waste | batches | distinct batch shapes (H, W) | distinct (B, H, W) |")
    print("|---|---|---|---|---|")
    rows = [("main: sorted by (height, width), each batch padded to its largest image", "main", None)]
    rows += [("aspect-sorted, each batch padded to its largest image", "new", None)]
    rows += [(f"aspect-sorted, padded to buckets of {s} px", "new", int(s)) for s in args.steps.split(",")]
    for name, how, step in rows:
        bucket = functools.partial(padded_size, max_side=args.max_side, stride=args.stride, step=step) if step else None
        padded = used = n = 0
        hw, bhw = set(), set()
        for sh in shards:
            batches = main_batches(sh, args.batch_size) if how == "main" else plan_batches(sh, args.batch_size, bucket)
            for idx, size in batches:
                size = size or (-(-max(sh[i][0] for i in idx) // args.stride) * args.stride,
                                -(-max(sh[i][1] for i in idx) // args.stride) * args.stride)
                hw.add(size)
                bhw.add((len(idx), *size))
                n += 1
            area = len(sh) and sum(h * w for h, w in sh)
            waste = padding_waste(sh, batches, args.stride)  # weighted by the shard's padded pixels below
            padded += area / (1 - waste)
            used += area
        print(f"| {name} | {100 * (1 - used / padded):.1f}% | {n} | {len(hw)} | {len(bhw)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
