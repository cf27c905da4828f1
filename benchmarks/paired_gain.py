"""How sure is a gain of `ours` over `global`? Per-query top-10 precision of both on one extraction, the paired standard
error of the difference and a bootstrap 95% interval over the queries (category protocol).

With ``--other-global URL`` (an extraction of the same images at another size) it also scores a control: the global
feature averaged over both sizes (sum of the L2-normalised vectors), and the gain of ``ours`` over that.

Usage: .venv/bin/python benchmarks/paired_gain.py --dataset ../shared/datasets/caltech101 \
           --features runs/caltech101-ms/features [--queries FILE] [--regions 12] [--local-weight 1] [--other-global URL] \
           [--fuse-global global]   # the paper's global part: the figures quoted in BENCHMARKS.md before issue 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.bench import datasets as ds  # noqa: E402
from pipeline.bench import metrics as ev  # noqa: E402
from pipeline.bench.corpus import load_corpus  # noqa: E402
from pipeline.bench.methods import method_vectors  # noqa: E402
from pipeline.bench.paired import paired_gain  # noqa: E402
from pipeline.config import FUSE_GLOBALS, BenchmarkConfig  # noqa: E402
from pipeline.reduce.pca import l2n  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--features", required=True)
    ap.add_argument("--queries", default=None, help="default: <dataset>/queries_5pct_seed0.txt")
    ap.add_argument("--regions", type=int, default=12)
    ap.add_argument("--local-weight", type=float, default=1.0)
    ap.add_argument("--fuse-global", default=BenchmarkConfig.fuse_global, choices=FUSE_GLOBALS,
                    help="global part of `ours` (default: the jobs' default)")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--other-global", default=None, help="extraction whose global feature is averaged in (control)")
    a = ap.parse_args()
    lset = ds.load_labelled_set(a.dataset, merge={"Faces_easy": "Faces"})
    c = load_corpus(a.features, a.dataset, lset.paths, lset.label_array(), {}, regions=a.regions)
    queries = ds.read_query_list(a.queries or str(Path(a.dataset) / "queries_5pct_seed0.txt"))
    row_of = {p: i for i, p in enumerate(c.paths)}
    qrows = np.array([row_of[p] for p in queries], dtype=np.int64)
    vec = method_vectors(c, BenchmarkConfig(report="-", local_weight=a.local_weight, fuse_global=a.fuse_global))
    p = {}
    for m in ("global", "ours"):
        ranks = ev.rank_by_similarity(vec[m][qrows], vec[m], 11)
        p[m] = ev.precision_at_k(ranks, c.labels, c.labels[qrows], k=10, query_db_index=qrows)
    if a.other_global:
        o = load_corpus(a.other_global, a.dataset, c.paths, c.labels, {}, regions=1)
        if o.paths != c.paths:
            raise SystemExit("--other-global lacks some of the images")
        g2 = l2n(l2n(c.vectors["global"]) + l2n(o.vectors["global"]))
        ranks = ev.rank_by_similarity(g2[qrows], g2, 11)
        p["global, both sizes"] = ev.precision_at_k(ranks, c.labels, c.labels[qrows], k=10, query_db_index=qrows)
    n = len(qrows)
    for m, v in p.items():
        print(f"{m}: {v.mean():.4f} (standard error {v.std(ddof=1) / np.sqrt(n):.4f})")
    for base in [m for m in p if m != "ours"]:
        g = paired_gain([p["ours"]], [p[base]], boot=a.boot, seed=0)  # each baseline's resamples from seed 0
        print(f"ours - {base}: {g.gain:+.4f} (paired standard error {g.se:.4f}, "
              f"bootstrap 95% interval {g.lo:+.4f} .. {g.hi:+.4f}, {g.queries} queries)")


if __name__ == "__main__":
    main()
