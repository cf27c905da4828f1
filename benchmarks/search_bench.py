"""Synthetic search + region re-rank benchmark: build time, QPS, re-rank latency and recall@10 per index."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import faiss
import numpy as np

# Runnable as a plain script from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.reduce.faiss_index import build_index, choose_factory, search, set_search_params  # noqa: E402
from pipeline.reduce.pca import l2n  # noqa: E402
from pipeline.retrieval.rerank import region_rerank  # noqa: E402

# Rows generated per step, so building the (N*K, D) region store never needs a float64 or float32
# copy of the whole thing.
_GEN_CHUNK = 10_000


def make_data(
    n: int, d: int, n_queries: int, n_regions: int, n_clusters: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Clustered unit-norm database/query vectors and per-image region descriptors.

    Args:
        n: database size.
        d: dimension.
        n_queries: number of queries.
        n_regions: regions per database image (``K``).
        n_clusters: Gaussian clusters; the noise has the same scale as the centres, so neighbours
            are not trivially separable.
        seed: RNG seed.

    Returns:
        ``(db, queries, region_desc, offsets)``: ``(n, d)`` and ``(Q, d)`` float32, ``(n*K, d)``
        float16 regions (each a noisy copy of its image's vector, as crops resemble the whole),
        and ``(n + 1,)`` int64 offsets.
    """
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d)).astype(np.float32)
    db = np.empty((n, d), dtype=np.float32)
    regions = np.empty((n * n_regions, d), dtype=np.float16)
    for i in range(0, n, _GEN_CHUNK):
        m = min(_GEN_CHUNK, n - i)
        db[i : i + m] = l2n(centers[rng.integers(0, n_clusters, m)] + rng.standard_normal((m, d), np.float32))
        if n_regions:
            base = np.repeat(db[i : i + m], n_regions, axis=0)
            noisy = base + 0.05 * rng.standard_normal(base.shape, np.float32)
            regions[i * n_regions : (i + m) * n_regions] = l2n(noisy)
    queries = l2n(centers[rng.integers(0, n_clusters, n_queries)] + rng.standard_normal((n_queries, d), np.float32))
    offsets = np.arange(n + 1, dtype=np.int64) * n_regions
    return db, queries, regions, offsets


def recall_at(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-``k`` found in the approximate top-``k``."""
    hits = [len(np.intersect1d(a[:k], e[:k])) for a, e in zip(approx, exact)]
    return float(np.mean(hits)) / k


def bench_index(
    name: str,
    factory: str,
    db: np.ndarray,
    queries: np.ndarray,
    regions: np.ndarray,
    offsets: np.ndarray,
    args: argparse.Namespace,
    exact_ids: np.ndarray | None,
) -> tuple[dict, np.ndarray]:
    """Build, search and re-rank with one factory; returns the table row and its top-k ids."""
    t0 = time.perf_counter()
    index = build_index(db, factory, seed=args.seed)
    build_s = time.perf_counter() - t0
    params = set_search_params(index, nprobe=args.nprobe, ef_search=args.ef_search)

    k = max(args.k, args.rerank, 10)
    t0 = time.perf_counter()
    scores, ids = search(index, queries, k)
    search_s = time.perf_counter() - t0

    n_rr = args.rerank
    t0 = time.perf_counter()
    region_rerank(queries, ids[:, :n_rr], scores[:, :n_rr], regions, offsets)
    rerank_s = time.perf_counter() - t0

    label = factory + "".join(f" {p}={v}" for p, v in params.items())
    row = {
        "size": len(db),
        "index": f"{label} ({name})",
        "build_s": build_s,
        "qps": len(queries) / search_s,
        "rerank_ms": 1000.0 * rerank_s / len(queries),
        "recall10": 1.0 if exact_ids is None else recall_at(ids, exact_ids, 10),
    }
    return row, ids


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run every size, print the Markdown table."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="database sizes")
    p.add_argument("--dim", type=int, default=256, help="descriptor dimension (global and region)")
    p.add_argument("--regions", type=int, default=10, help="regions per database image (K)")
    p.add_argument("--queries", type=int, default=1000, help="number of queries")
    p.add_argument("--rerank", type=int, default=100, help="candidates re-ranked per query (N)")
    p.add_argument("--k", type=int, default=100, help="top-k of the batch search")
    p.add_argument(
        "--memory-budget-mb",
        type=float,
        default=64.0,
        help="memory budget for choose_factory; the 64 MiB default makes 100k x 256 take the compressed path",
    )
    p.add_argument("--nprobe", type=int, default=32, help="IVF lists visited per query")
    p.add_argument("--ef-search", type=int, default=128, help="HNSW search queue size")
    p.add_argument("--clusters", type=int, default=100, help="Gaussian clusters in the synthetic data")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    budget = int(args.memory_budget_mb * 2**20)
    print(
        f"faiss {faiss.__version__}, numpy {np.__version__}, {faiss.omp_get_max_threads()} threads, "
        f"{platform.processor() or platform.machine()}; dim={args.dim}, K={args.regions}, "
        f"queries={args.queries}, N={args.rerank}, budget={args.memory_budget_mb:g} MiB",
        file=sys.stderr,
    )
    rows = []
    for n in args.sizes:
        db, queries, regions, offsets = make_data(n, args.dim, args.queries, args.regions, args.clusters, args.seed)
        flat_row, exact_ids = bench_index("exact", "Flat", db, queries, regions, offsets, args, None)
        chosen = choose_factory(n, args.dim, budget)
        if chosen == "Flat":
            flat_row["index"] = "Flat (exact, chosen)"
            rows.append(flat_row)
        else:
            rows.append(flat_row)
            row, _ = bench_index("chosen", chosen, db, queries, regions, offsets, args, exact_ids)
            rows.append(row)
        print(f"done n={n}", file=sys.stderr)

    print("| size | index | build s | QPS (batch top-100) | re-rank ms/query (N=100, K regions) | recall@10 vs exact |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['size']:,} | {r['index']} | {r['build_s']:.2f} | {r['qps']:,.0f} | "
            f"{r['rerank_ms']:.3f} | {r['recall10']:.3f} |"
        )


if __name__ == "__main__":
    main()
