"""Re-index on a schedule: incremental extraction, an index build into a new version, an atomic publish.

examples:
  sigregions reindex --input s3://bucket/images/ --root s3://bucket/sigregions [--keep 3] [model flags]
  sigregions reindex --root s3://bucket/sigregions --rollback
  ray job submit --working-dir . -- python jobs/reindex.py --input ... --root ...

Under --root: features/ (only new or changed images are processed; removed ones are dropped), versions/<v>/
(one index build per run that changed something), CURRENT (written last; `sigregions search --index <root>`
follows it). The --keep newest complete versions are kept; --rollback points CURRENT at the one before.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.cli import run_job
from pipeline.config import ReindexConfig
from pipeline.extract.runners import make_runner
from pipeline.reindex import reindex as reindex_root
from pipeline.store import versions as pub


def reindex(cfg: ReindexConfig) -> int:
    """Run one re-index (or a rollback) and print what it did as JSON.

    Args:
        cfg: the re-index's config.

    Returns:
        The exit code.
    """
    if cfg.rollback:
        out: dict[str, Any] = {"root": cfg.root, "current": pub.rollback(cfg.root, cfg.fs_options)}
    else:
        out = reindex_root(cfg, make_runner(cfg.in_process))
    print(json.dumps(out, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None, prog: str = "jobs/reindex.py") -> int:
    """Parse flags and run; user errors are one line and exit code 2 (see pipeline.cli.run_job)."""
    return run_job(ReindexConfig, argv, prog, __doc__, reindex)
