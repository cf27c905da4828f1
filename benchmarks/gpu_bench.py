"""GPU throughput of the region model: the bare model loop and the in-process shard pipeline, images/s per GPU.

    python benchmarks/gpu_bench.py --images DIR [--n 2000] [--max-side 448] [--batch-size 64] [--regions 6]

Prints a Markdown table. Also checks that CUDA and CPU outputs agree on a few images.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ExtractConfig, ModelConfig  # noqa: E402
from pipeline.extract import driver  # noqa: E402
from pipeline.extract.runners import LocalRunner  # noqa: E402
from pipeline.io.images import decode_image  # noqa: E402
from pipeline.model.region_model import RegionModel  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--max-side", type=int, default=448)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--regions", type=int, default=6)
    args = p.parse_args()
    files = sorted(Path(args.images).rglob("*.jpg"))[: args.n]
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"device: {dev}; torch {torch.__version__}; {len(files)} images; max_side {args.max_side}")
    cfg = ModelConfig(max_side=args.max_side, regions=args.regions)

    # 1. CUDA vs CPU agreement on a few same-size images.
    small = [decode_image(f.read_bytes(), max_side=args.max_side) for f in files[:4]]
    cpu = RegionModel(cfg, device="cpu")
    gpu = RegionModel(cfg, device="cuda")
    for d in small:
        a = cpu([d.array], [(d.width, d.height)])[0]
        b = gpu([d.array], [(d.width, d.height)])[0]
        for k in ("global", "crow", "local"):
            rel = float(np.abs(a[k] - b[k]).max() / (np.abs(a[k]).max() + 1e-12))
            assert rel < 1e-2, (k, rel)
    print("cuda == cpu within 1e-2 relative: ok")

    # 2. Bare model loop: decode with 16 threads ahead, model in batches.
    with ThreadPoolExecutor(16) as pool:
        t0 = time.perf_counter()
        decoded = list(pool.map(lambda f: decode_image(f.read_bytes(), max_side=args.max_side), files))
        t_dec = time.perf_counter() - t0
    ok = [d for d in decoded if d.ok]
    ok.sort(key=lambda d: d.array.shape[:2])
    gpu([d.array for d in ok[:8]], [(d.width, d.height) for d in ok[:8]])  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(ok), args.batch_size):
        b = ok[i: i + args.batch_size]
        gpu([d.array for d in b], [(d.width, d.height) for d in b])
    torch.cuda.synchronize()
    t_model = time.perf_counter() - t0

    # 3. The shard pipeline in-process (fetch + decode threads, model, Parquet writes, markers).
    with tempfile.TemporaryDirectory() as out:
        ecfg = ExtractConfig(input=args.images, output=out, max_side=args.max_side, regions=args.regions,
                             batch_size=args.batch_size, shard_size=512)
        t0 = time.perf_counter()
        m = driver.run(ecfg, LocalRunner())
        t_pipe = time.perf_counter() - t0
    n_pipe = m["run"]["images"]
    print()
    print("| stage | images | seconds | images/s |")
    print("|---|---|---|---|")
    print(f"| decode (16 threads) | {len(files)} | {t_dec:.2f} | {len(files) / t_dec:.1f} |")
    print(f"| model only, batch {args.batch_size} | {len(ok)} | {t_model:.2f} | {len(ok) / t_model:.1f} |")
    print(f"| in-process shard pipeline (decode+model+Parquet) | {n_pipe} | {t_pipe:.2f} | {n_pipe / t_pipe:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
