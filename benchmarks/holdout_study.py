"""Variants of `ours` measured under the tune-on-one/report-on-many protocol, the corpus loaded once: suppression over
the merged pyramid and per-region weights (the local feature re-pooled offline from the stored regions), the local
weight, DBA and diffusion on top. Prints one table row per variant (tune score, report mean, std, gains over global
and R-MAC in points with their bootstrap interval).

Usage: .venv/bin/python benchmarks/holdout_study.py --dataset ../shared/datasets/caltech101 --protocol category \
           --features runs/caltech101-ms/features [--tune-seed 0] [--report-seeds 1,2,3,4,5] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.bench.corpus import load_corpus  # noqa: E402
from pipeline.bench.diffusion import dba, diffusion_ranking  # noqa: E402
from pipeline.bench.methods import DESCRIPTOR_METHODS, expansion_neighbours  # noqa: E402
from pipeline.bench.metrics import rank_by_similarity  # noqa: E402
from pipeline.bench.paired import holdout_rows  # noqa: E402
from pipeline.bench.protocols import PROTOCOLS  # noqa: E402
from pipeline.bench.repool import repool_local  # noqa: E402
from pipeline.config import BenchmarkConfig  # noqa: E402
from pipeline.reduce.build import regions_in_order  # noqa: E402
from pipeline.reduce.pca import PCA, fuse, l2n  # noqa: E402
from pipeline.retrieval.rerank import average_query_expansion  # noqa: E402
from pipeline.schema import column_to_numpy  # noqa: E402
from pipeline.store import feature_store as fstore  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--features", required=True)
    ap.add_argument("--protocol", default="category")
    ap.add_argument("--tune-seed", type=int, default=0)
    ap.add_argument("--report-seeds", default="1,2,3,4,5")
    ap.add_argument("--only", default="", help="comma-separated variant groups: base,nms,weight,lw,dba,diff,qe (default: these), fuse2,dba2,diff2")
    a = ap.parse_args()
    cfg = BenchmarkConfig(dataset=a.dataset, features=a.features, protocol=a.protocol, report="-",
                          tune_seed=a.tune_seed, report_seeds=a.report_seeds)
    cfg.validate()
    protocol = PROTOCOLS[cfg.protocol](cfg)
    paths, labels = protocol.ground_truth()
    t0 = time.perf_counter()
    c = load_corpus(a.features, a.dataset, paths, labels, {})
    qrows, _ = protocol.queries(c)
    depth = protocol.depth(len(c.paths))
    r = fstore.read_live_table(a.features, "regions", {}, ["rank", "box", "score", "descriptor"])
    pos = {p: i for i, p in enumerate(c.paths)}
    where = np.array([pos.get(i, -1) for i in r.column("image_id").to_pylist()])
    keep = where >= 0
    order = np.lexsort((r.column("rank").to_numpy()[keep], where[keep]))
    boxes = column_to_numpy(r, "box")[keep][order]
    scores = r.column("score").to_numpy()[keep][order]
    counts, desc = regions_in_order(r, c.paths)
    del r
    print(f"loaded {len(c.paths)} images, {len(desc)} regions, {len(qrows)} queries in {time.perf_counter() - t0:.0f}s",
          flush=True)
    groups = set(filter(None, a.only.split(","))) or {"base", "nms", "weight", "lw", "dba", "diff", "qe"}

    per: dict[str, np.ndarray] = {}
    cost: dict[str, float] = {}

    tune = next(iter(protocol.lists))

    def score(name: str, ranking: np.ndarray, seconds: float = 0.0) -> None:
        per[name] = protocol.per_query(ranking)
        cost[name] = 1000 * seconds / len(qrows)
        # A first look as each variant finishes (the final table below has the intervals).
        some = {m: per[m] for m in dict.fromkeys(("global", "rmac", name)) if m in per}
        row = holdout_rows(some, protocol.list_pos, tune, boot=0)[0][-1]
        print(f"  {name}: tune {row['tune']:.4f}, report mean {row['mean']:.4f}, "
              f"vs global {100 * row.get('gain_global', 0):+.2f}, {cost[name]:.2f} ms/query", flush=True)

    def ours_vec(local: np.ndarray, w: float = 1.0, g: np.ndarray | None = None) -> np.ndarray:
        fused = fuse(c.vectors["global"] if g is None else g, local, w)
        return PCA.fit(fused, 512).transform(fused)

    for m in ("global", "rmac", "gem", "crow"):
        v = l2n(c.vectors[m])
        score(m, rank_by_similarity(v[qrows], v, depth))
    base_local, _ = repool_local(counts, desc, boxes, scores, 12)
    ours = ours_vec(base_local)
    score("ours", rank_by_similarity(ours[qrows], ours, depth))
    if "base" in groups:
        stored = ours_vec(c.vectors["local"])
        score("ours (stored local)", rank_by_similarity(stored[qrows], stored, depth))
    if "nms" in groups:
        for iou in (0.9, 0.7, 0.5, 0.3):
            loc, kept = repool_local(counts, desc, boxes, scores, 12, nms_iou=iou)
            v = ours_vec(loc)
            score(f"ours nms{iou} ({kept.sum() / len(counts):.1f} regions)", rank_by_similarity(v[qrows], v, depth))
    if "weight" in groups:
        for wt in ("score", "l2"):
            loc, _ = repool_local(counts, desc, boxes, scores, 12, weighting=wt)
            v = ours_vec(loc)
            score(f"ours weight={wt}", rank_by_similarity(v[qrows], v, depth))
        for k in (3, 6):
            loc, _ = repool_local(counts, desc, boxes, scores, k)
            v = ours_vec(loc)
            score(f"ours K={k}", rank_by_similarity(v[qrows], v, depth))
    if "lw" in groups:
        for w in (0.75, 1.25, 1.5):
            v = ours_vec(base_local, w)
            score(f"ours w={w}", rank_by_similarity(v[qrows], v, depth))
        g3 = np.concatenate([l2n(c.vectors["global"]), l2n(c.vectors["rmac"])], axis=1)
        v = ours_vec(base_local, 1.0, g3)
        score("ours global+rmac", rank_by_similarity(v[qrows], v, depth))
    if "qe" in groups:
        t = time.perf_counter()
        first = rank_by_similarity(ours[qrows], ours, 6)
        q2 = average_query_expansion(ours[qrows], ours, expansion_neighbours(first, qrows, 5), 5)
        score("ours+qe", rank_by_similarity(q2, ours, depth), time.perf_counter() - t)
    if "dba" in groups:
        for k, alpha in ((2, 0.0), (5, 0.0), (10, 0.0), (10, 3.0), (20, 3.0)):
            t = time.perf_counter()
            v = dba(ours, k, alpha)
            # The query keeps its own vector (a new image would have no DBA vector); the database is augmented.
            score(f"ours+dba k={k} a={alpha}", rank_by_similarity(ours[qrows], v, depth), time.perf_counter() - t)
            if k == 5 and alpha == 0.0 and "qe" in groups:
                first = rank_by_similarity(ours[qrows], v, 6)
                q2 = average_query_expansion(ours[qrows], v, expansion_neighbours(first, qrows, 5), 5)
                score("ours+dba k=5+qe", rank_by_similarity(q2, v, depth), time.perf_counter() - t)
    if "diff" in groups:
        for k, alpha, seeds in ((30, 0.9, 10), (50, 0.99, 10), (20, 0.8, 5)):
            t = time.perf_counter()
            rk = diffusion_ranking(ours, ours[qrows], depth, k=k, alpha=alpha, seeds=seeds)
            score(f"ours+diffusion k={k} a={alpha} s={seeds}", rk, time.perf_counter() - t)
    if "fuse2" in groups:
        g2 = np.concatenate([l2n(c.vectors["global"]), l2n(c.vectors["rmac"])], axis=1)
        for label, g, w in (("rmac+local", c.vectors["rmac"], 1.0), ("global+rmac w=1.5", g2, 1.5),
                            ("global+rmac+gem", np.concatenate([g2, l2n(c.vectors["gem"])], axis=1), 1.0)):
            v = ours_vec(base_local, w, g)
            score(f"ours {label}", rank_by_similarity(v[qrows], v, depth))
    if "dba2" in groups:
        for k, alpha in ((20, 3.0), (10, 3.0), (40, 3.0)):
            t = time.perf_counter()
            v = dba(ours, k, alpha)
            first = rank_by_similarity(ours[qrows], v, 6)
            q2 = average_query_expansion(ours[qrows], v, expansion_neighbours(first, qrows, 5), 5)
            score(f"ours+dba k={k} a={alpha}+qe", rank_by_similarity(q2, v, depth), time.perf_counter() - t)
    if "diff2" in groups:
        for k, alpha, seeds in ((10, 0.8, 5), (15, 0.8, 3), (20, 0.7, 5), (20, 0.8, 3), (20, 0.9, 5), (20, 0.8, 8)):
            t = time.perf_counter()
            rk = diffusion_ranking(ours, ours[qrows], depth, k=k, alpha=alpha, seeds=seeds)
            score(f"ours+diffusion k={k} a={alpha} s={seeds}", rk, time.perf_counter() - t)
    rows, best = holdout_rows(per, protocol.list_pos, tune, DESCRIPTOR_METHODS)
    print(f"| variant | tune | report mean | std | vs global | vs {best} | ms/query |\n|---|---|---|---|---|---|---|")
    for row in rows:
        g = [f"{100 * row[f'gain_{b}']:+.2f} [{100 * row[f'gain_{b}_lo']:+.2f}, {100 * row[f'gain_{b}_hi']:+.2f}]"
             for b in ("global", best)]
        std = "" if row["std"] is None else f"{row['std']:.4f}"
        print(f"| {row['method']} | {row['tune']:.4f} | {row['mean']:.4f} | {std} | {g[0]} | {g[1]} | "
              f"{cost[row['method']]:.2f} |")


if __name__ == "__main__":
    main()
