"""Entry point: build PCA + faiss indexes and the region store from an extraction's Parquet features.

    python jobs/index.py --features s3://bucket/features/run1 --output s3://bucket/index/run1
"""

from __future__ import annotations

import json
import sys

import _common

from pipeline.config import IndexConfig, parse_args
from pipeline.reduce.build import build


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(IndexConfig, argv, "jobs/index.py", __doc__.splitlines()[0])
    _common.setup_logging()
    _common.log_config("index", cfg)
    marker = build(cfg)
    print(json.dumps({k: marker[k] for k in ("images", "regions", "factory", "dims", "seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
