"""Region-to-region re-ranking study: a grid of (weight, alpha, tau) for `crow+regions` on full-image or cropped
queries, with the described crops cached so that the grid costs no model time.

examples:
  python benchmarks/rerank_study.py --dataset ../shared/datasets/paris6k-subset5 --features runs/paris-ms/features \
      --query-boxes benchmarks/paris6k-subset5_crops_seed1.csv --cache /tmp/crops1.pkl --center --alphas 1,2 --taus=-inf
  python benchmarks/rerank_study.py --dataset ../shared/datasets/caltech101 --protocol category \
      --queries ../shared/datasets/caltech101/queries_5pct_seed0.txt --features runs/caltech101-ms/features
"""

from __future__ import annotations

import argparse
import itertools
import os
import pickle
import sys

import numpy as np

from pipeline.bench.corpus import corpus_queries, described_queries, load_corpus
from pipeline.bench.methods import method_vectors, query_method_vectors
from pipeline.bench.metrics import rank_by_similarity
from pipeline.bench.protocols import PROTOCOLS
from pipeline.bench.runner import describe_crops
from pipeline.config import BenchmarkConfig, from_dict
from pipeline.retrieval.rerank import rerank_regions_top, rerank_top


def main(argv: list[str] | None = None) -> int:
    """Parse flags, describe (or load) the queries, print one line per grid point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--features", required=True)
    p.add_argument("--protocol", default="labels")
    p.add_argument("--queries", default="")
    p.add_argument("--query-boxes", default="")
    p.add_argument("--cache", default="", help="pickle of the described crops (written when absent)")
    p.add_argument("--weights", default="0.5")
    p.add_argument("--alphas", default="1,2,3")
    p.add_argument("--taus", default="-1,0,0.3,0.5")
    p.add_argument("--center", action="store_true", help="centre descriptors on the database's mean region")
    p.add_argument("--first", default="crow", choices=("crow", "ours"), help="the first-pass ranking re-ranked")
    a = p.parse_args(argv)
    cfg = from_dict(BenchmarkConfig, {"dataset": a.dataset, "features": a.features, "protocol": a.protocol,
                                      "queries": a.queries, "query_boxes": a.query_boxes, "report": "/tmp/unused"})
    proto = PROTOCOLS[cfg.protocol](cfg)
    paths, labels = proto.ground_truth()
    c = load_corpus(cfg.features, cfg.dataset, paths, labels, {}, regions=cfg.regions)
    qrows, _ = proto.queries(c)
    if proto.crops is None:
        q = corpus_queries(c, qrows)
    else:
        if a.cache and os.path.exists(a.cache):
            with open(a.cache, "rb") as f:
                outs = pickle.load(f)
        else:
            outs = describe_crops(cfg.features, cfg.dataset, proto.crops, {})
            if a.cache:
                with open(a.cache, "wb") as f:
                    pickle.dump(outs, f)
        q = described_queries(outs, proto.self_rows, proto.crops, cfg.regions)
    vec = method_vectors(c, cfg)
    qvec = {m: v[qrows] for m, v in vec.items()} if proto.crops is None else query_method_vectors(c, cfg, q)
    depth = proto.depth(len(c.paths))
    first = rank_by_similarity(qvec[a.first], vec[a.first], depth, with_scores=True)
    print(f"{a.first} {proto.score(first[0])['score']:.4f}")
    gem = rerank_top(q.vectors["gem"] / np.linalg.norm(q.vectors["gem"], axis=1, keepdims=True), *first,
                     c.region_desc, c.offsets, cfg.rerank)[0]
    print(f"{a.first}+rerank (gem) {proto.score(gem)['score']:.4f}")
    center = c.region_desc.mean(axis=0) if a.center else None
    for w, al, tau in itertools.product(*(map(float, s.split(",")) for s in (a.weights, a.alphas, a.taus))):
        ids = rerank_regions_top(q.region_desc, q.offsets, *first, c.region_desc, c.offsets, cfg.rerank, w, al, tau,
                                 center)[0]
        print(f"{a.first}+regions weight={w} alpha={al} tau={tau} center={a.center} {proto.score(ids)['score']:.4f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
