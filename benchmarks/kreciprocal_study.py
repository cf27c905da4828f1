"""k-reciprocal re-ranking settings on top of `ours`, under the tune-on-one/report-on-many protocol: the corpus loaded
once, every (k1, k2) encoding built once, every lambda mixed from it; rows as in the benchmark's report (tune score,
report mean/std, paired gains with bootstrap intervals over `global` and the best descriptor of the tune list).

Usage: .venv/bin/python benchmarks/kreciprocal_study.py --dataset ../shared/datasets/caltech101 --protocol category \
           --features runs/caltech101-ms/features [--k1 10,20,30] [--k2 1,3,6] [--lam 0.1,0.3,0.6]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.bench.corpus import load_corpus  # noqa: E402
from pipeline.bench.kreciprocal import _distances, jaccard_distances, k_reciprocal_encoding  # noqa: E402
from pipeline.bench.methods import DESCRIPTOR_METHODS, method_vectors  # noqa: E402
from pipeline.bench.metrics import rank_by_similarity  # noqa: E402
from pipeline.bench.paired import holdout_rows  # noqa: E402
from pipeline.bench.protocols import PROTOCOLS  # noqa: E402
from pipeline.config import BenchmarkConfig  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--features", required=True)
    ap.add_argument("--protocol", default="category")
    ap.add_argument("--tune-seed", type=int, default=0)
    ap.add_argument("--report-seeds", default="1,2,3,4,5")
    ap.add_argument("--k1", default="10,20,30")
    ap.add_argument("--k2", default="1,3,6")
    ap.add_argument("--lam", default="0.1,0.3,0.6")
    a = ap.parse_args()
    cfg = BenchmarkConfig(dataset=a.dataset, features=a.features, protocol=a.protocol, report="-",
                          tune_seed=a.tune_seed, report_seeds=a.report_seeds)
    cfg.validate()
    protocol = PROTOCOLS[cfg.protocol](cfg)
    paths, labels = protocol.ground_truth()
    t0 = time.perf_counter()
    c = load_corpus(a.features, a.dataset, paths, labels, {}, regions=cfg.regions)
    qrows, _ = protocol.queries(c)
    depth = protocol.depth(len(c.paths))
    vec = method_vectors(c, cfg)
    print(f"loaded {len(c.paths)} images, {len(qrows)} queries in {time.perf_counter() - t0:.0f}s "
          f"(fuse_global {cfg.fuse_global})", flush=True)
    per: dict[str, np.ndarray] = {}
    cost: dict[str, float] = {}
    for m in ("global", "rmac", "ours"):
        per[m] = protocol.per_query(rank_by_similarity(vec[m][qrows], vec[m], depth))
    db = vec["ours"]
    q = db[qrows]
    n = len(db)
    orig = np.concatenate([_distances(q[b:b + 256], db) for b in range(0, len(q), 256)])
    first = rank_by_similarity(q, db, n)
    orig_sorted = np.take_along_axis(orig, first, axis=1)
    for k1 in _ints(a.k1):
        for k2 in _ints(a.k2):
            t = time.perf_counter()
            v = k_reciprocal_encoding(db, k1, k2)
            jac = np.take_along_axis(jaccard_distances(v[qrows], v), first, axis=1)
            base = time.perf_counter() - t
            for lam in [float(x) for x in a.lam.split(",") if x.strip()]:
                t = time.perf_counter()
                final = (1.0 - lam) * jac + lam * orig_sorted
                rk = np.take_along_axis(first, np.argsort(final, axis=1, kind="stable")[:, :depth], axis=1)
                name = f"ours+kr k1={k1} k2={k2} lambda={lam}"
                per[name] = protocol.per_query(rk)
                cost[name] = 1000 * (base + time.perf_counter() - t) / len(qrows)
                row = holdout_rows({m: per[m] for m in ("global", name)}, protocol.list_pos,
                                   next(iter(protocol.lists)), boot=0)[0][-1]
                print(f"  {name}: tune {row['tune']:.4f}, report mean {row['mean']:.4f}, "
                      f"{cost[name]:.2f} ms/query (encoding {base:.1f}s)", flush=True)
    rows, best = holdout_rows(per, protocol.list_pos, next(iter(protocol.lists)), DESCRIPTOR_METHODS)
    print(f"| variant | tune | report mean | std | vs global | vs {best} | vs ours | ms/query |\n"
          "|---|---|---|---|---|---|---|---|")
    ours = {r["method"]: r for r in rows}["ours"]
    for row in rows:
        std = f"{row['std']:.4f}" if row.get("std") is not None and np.isfinite(row.get("std", np.nan)) else ""
        g = [f"{100 * row['gain_' + b]:+.2f} [{100 * row['gain_' + b + '_lo']:+.2f}, "
             f"{100 * row['gain_' + b + '_hi']:+.2f}]" if "gain_" + b in row else "" for b in ("global", best)]
        print(f"| {row['method']} | {row['tune']:.4f} | {row['mean']:.4f} | {std} | {g[0]} | {g[1]} | "
              f"{100 * (row['mean'] - ours['mean']):+.2f} | {cost.get(row['method'], 0):.2f} |", flush=True)


if __name__ == "__main__":
    main()
