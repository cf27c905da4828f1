"""Entry point: scheduled re-indexing: incremental extraction, an index build into a new version, an atomic publish.

    python jobs/reindex.py --input s3://bucket/images/ --root s3://bucket/sigregions [--keep 3] [model flags]
    python jobs/reindex.py --root s3://bucket/sigregions --rollback
    ray job submit --working-dir . -- python jobs/reindex.py --input ... --root ...

Under --root: ``features/`` (only new or changed images are processed; removed ones are dropped), ``versions/<v>/``
(one index build per run that changed something), ``CURRENT`` (written last; ``jobs/search.py --index <root>``
follows it). The --keep newest complete versions are kept; --rollback points CURRENT at the one before.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import _common  # noqa: F401  (puts the checkout on sys.path)

from pipeline.cli import run_job
from pipeline.config import ReindexConfig
from pipeline.extract.runners import make_runner
from pipeline.reindex import reindex as reindex_root
from pipeline.store import versions as pub


def reindex(cfg: ReindexConfig) -> int:
    if cfg.rollback:
        out: dict[str, Any] = {"root": cfg.root, "current": pub.rollback(cfg.root, cfg.fs_options)}
    else:
        out = reindex_root(cfg, make_runner(cfg.in_process))
    print(json.dumps(out, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(ReindexConfig, argv, "jobs/reindex.py", __doc__.splitlines()[0], reindex)


if __name__ == "__main__":
    sys.exit(main())
