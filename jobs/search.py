"""Entry point: search a built index with a query image; optional region re-ranking and query expansion.

    python jobs/search.py --index runs/demo/index --image photo.jpg --top-k 10 --rerank 100 --qe 5 [--json]
    python jobs/search.py --index s3://bucket/sigregions --image photo.jpg   # a jobs/reindex.py root: its CURRENT
"""

from __future__ import annotations

import dataclasses
import json
import sys

import _common  # noqa: F401  (puts the checkout on sys.path)

from pipeline.bench.report import markdown_table
from pipeline.cli import run_job
from pipeline.config import SearchConfig
from pipeline.retrieval.search import Searcher
from pipeline.store.versions import resolve_index


def search(cfg: SearchConfig) -> int:
    so = cfg.fs_options
    searcher = Searcher(resolve_index(cfg.index, so), so)  # a re-index root: the version its CURRENT names
    hits = searcher.search([cfg.image], top_k=cfg.top_k, rerank=cfg.rerank, qe=cfg.qe, space=cfg.space)[0]
    rows = [dataclasses.asdict(h) for h in hits]
    print(json.dumps(rows, indent=2) if cfg.json else markdown_table(rows, ["rank", "image_id", "uri", "score"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(SearchConfig, argv, "jobs/search.py", __doc__.splitlines()[0], search)


if __name__ == "__main__":
    sys.exit(main())
