"""Build PCA + faiss indexes and the region store from an extraction's Parquet features (one task per feature shard).

examples:
  sigregions index --features s3://bucket/features/run1 --output s3://bucket/index/run1
  ray job submit --working-dir . -- python jobs/index.py --features ... --output ... --workers 8
  sigregions index --in-process --features runs/small/features --output runs/small/index
"""

from __future__ import annotations

import json

from pipeline.cli import run_job
from pipeline.config import IndexConfig
from pipeline.reduce.build import build


def index(cfg: IndexConfig) -> int:
    """Build one index and print its counts as JSON.

    Args:
        cfg: the index build's config.

    Returns:
        The exit code.
    """
    marker = build(cfg)
    print(json.dumps({k: marker[k] for k in ("images", "regions", "factory", "dims", "recall", "seconds")}, indent=2))
    return 0


def main(argv: list[str] | None = None, prog: str = "jobs/index.py") -> int:
    """Parse flags and run; user errors are one line and exit code 2 (see pipeline.cli.run_job)."""
    return run_job(IndexConfig, argv, prog, __doc__, index)
