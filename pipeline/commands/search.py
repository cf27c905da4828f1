"""Search a built index with a query image; optional region re-ranking and query expansion.

examples:
  sigregions search --index runs/demo/index --image photo.jpg --top-k 10 --rerank 100 --qe 5 [--json]
  sigregions search --index s3://bucket/sigregions --image photo.jpg    # a `sigregions reindex` root: its CURRENT
"""

from __future__ import annotations

import dataclasses
import json

from pipeline.bench.report import markdown_table
from pipeline.cli import run_job
from pipeline.config import SearchConfig
from pipeline.retrieval.search import Searcher
from pipeline.store.versions import resolve_index


def search(cfg: SearchConfig) -> int:
    """Answer one query and print the ranking (a Markdown table, or JSON with --json).

    Args:
        cfg: the search's config.

    Returns:
        The exit code.
    """
    so = cfg.fs_options
    searcher = Searcher(resolve_index(cfg.index, so), so)  # a re-index root: the version its CURRENT names
    hits = searcher.search([cfg.image], top_k=cfg.top_k, rerank=cfg.rerank, qe=cfg.qe, space=cfg.space)[0]
    rows = [dataclasses.asdict(h) for h in hits]
    print(json.dumps(rows, indent=2) if cfg.json else markdown_table(rows, ["rank", "image_id", "uri", "score"]))
    return 0


def main(argv: list[str] | None = None, prog: str = "jobs/search.py") -> int:
    """Parse flags and run; user errors are one line and exit code 2 (see pipeline.cli.run_job)."""
    return run_job(SearchConfig, argv, prog, __doc__, search)
