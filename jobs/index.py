"""Entry point: build PCA + faiss indexes and the region store from an extraction's Parquet features.

    python jobs/index.py --features s3://bucket/features/run1 --output s3://bucket/index/run1
"""

from __future__ import annotations

import json
import sys

import _common  # noqa: F401  (puts the checkout on sys.path)

from pipeline.cli import run_job
from pipeline.config import IndexConfig
from pipeline.reduce.build import build


def index(cfg: IndexConfig) -> int:
    marker = build(cfg)
    print(json.dumps({k: marker[k] for k in ("images", "regions", "factory", "dims", "seconds")}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(IndexConfig, argv, "jobs/index.py", __doc__.splitlines()[0], index)


if __name__ == "__main__":
    sys.exit(main())
