"""Entry point: search a built index with a query image; optional region re-ranking and query expansion.

    python jobs/search.py --index runs/demo/index --image photo.jpg --top-k 10 --rerank 100 --qe 5 [--json]
    python jobs/search.py --index s3://bucket/sigregions --image photo.jpg   # a jobs/reindex.py root: its CURRENT
"""

from __future__ import annotations

import dataclasses
import json
import sys

import _common

from pipeline.bench.report import markdown_table
from pipeline.config import SearchConfig, parse_args
from pipeline.retrieval.search import Searcher
from pipeline.store.versions import resolve_index


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(SearchConfig, argv, "jobs/search.py", __doc__.splitlines()[0])
    _common.setup_logging()
    so = cfg.fs_options
    searcher = Searcher(resolve_index(cfg.index, so), so)  # a re-index root: the version its CURRENT names
    hits = searcher.search([cfg.image], top_k=cfg.top_k, rerank=cfg.rerank, qe=cfg.qe, space=cfg.space)[0]
    rows = [dataclasses.asdict(h) for h in hits]
    print(json.dumps(rows, indent=2) if cfg.json else markdown_table(rows, ["rank", "image_id", "uri", "score"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
