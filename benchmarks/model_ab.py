"""A/B throughput of the bare model loop between two checkouts (e.g. main and a branch), interleaved in one run.

Each measurement is a fresh process with one checkout first on ``PYTHONPATH``: it loads the default model, decodes the
committed sample (data/caltech8, 80 photos, replicated to ``--n``), runs one warm-up batch, then times the model over
all images in size-sorted batches (as a shard is run). Rounds alternate A, B, B, A, ... so slow drifts of the load
of a shared machine hit both alike; prints per-round images/s, the B/A ratio of each round, their median and spread,
and the load average around each measurement.

    python benchmarks/model_ab.py --a /work/wt-i17-old --b /work/wt-i17 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
from pipeline.config import SAMPLE_DATA, ModelConfig
from pipeline.io.images import decode_image
from pipeline.model.region_model import RegionModel
n, side, bs, threads, scales = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(threads)
m = RegionModel(ModelConfig(max_side=side, region_scales=scales), device="cpu", threads=threads)
paths = sorted(SAMPLE_DATA.glob("*/*.jpg"))
dec = [decode_image(paths[i % len(paths)].read_bytes(), max_side=side) for i in range(n)]
dec.sort(key=lambda d: d.array.shape[:2])
m([d.array for d in dec[:2]], [(d.width, d.height) for d in dec[:2]])
t0, c0 = time.perf_counter(), time.process_time()
for b in range(0, n, bs):
    batch = dec[b:b + bs]
    m([d.array for d in batch], [(d.width, d.height) for d in batch])
dt, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"images": n, "seconds": dt, "images_per_s": n / dt, "cpu_s_per_image": cpu / n,
                  "module": sys.modules["pipeline"].__file__}))
"""


def measure(checkout: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": checkout}
    load = os.getloadavg()[0]
    out = subprocess.run([sys.executable, "-c", CHILD, str(args.n), str(args.max_side), str(args.batch_size),
                          str(args.threads), args.scales], env=env, cwd=checkout, capture_output=True, text=True,
                         check=True)  # cwd: "python -c" puts it first on sys.path
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["module"].startswith(str(Path(checkout).resolve())), (r["module"], checkout)
    r["load_1m"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", required=True, help="checkout A (the reference, e.g. a worktree of main)")
    p.add_argument("--b", required=True, help="checkout B")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--n", type=int, default=80)
    p.add_argument("--max-side", type=int, default=448)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scales", default="0.7,1")
    args = p.parse_args()
    print(f"# model_ab: A={args.a} B={args.b}, {args.n} images, max_side {args.max_side}, scales {args.scales}, "
          f"batch {args.batch_size}, {args.threads} threads, {os.cpu_count()} cores", flush=True)
    ratios: list[float] = []
    cpu_ratios: list[float] = []  # A's CPU seconds per image over B's: with one thread, little moved by other jobs
    for r in range(args.rounds):
        order = ("a", "b") if r % 2 == 0 else ("b", "a")
        res = {w: measure(getattr(args, w), args) for w in order}
        ratio = res["b"]["images_per_s"] / res["a"]["images_per_s"]
        cpu_ratio = res["a"]["cpu_s_per_image"] / res["b"]["cpu_s_per_image"]
        ratios.append(ratio)
        cpu_ratios.append(cpu_ratio)
        print(f"round {r} ({'-'.join(order).upper()}): A {res['a']['images_per_s']:.2f} img/s, "
              f"{res['a']['cpu_s_per_image']:.3f} CPU s/img (load {res['a']['load_1m']}), B "
              f"{res['b']['images_per_s']:.2f} img/s, {res['b']['cpu_s_per_image']:.3f} CPU s/img (load "
              f"{res['b']['load_1m']}), B/A wall {ratio:.3f}, B/A by CPU time {cpu_ratio:.3f}", flush=True)
    for name, rs in (("wall", ratios), ("CPU time", cpu_ratios)):
        print(f"B/A by {name}: median {statistics.median(rs):.3f}, min {min(rs):.3f}, max {max(rs):.3f} over "
              f"{len(rs)} rounds; {time.strftime('%H:%M:%S')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
