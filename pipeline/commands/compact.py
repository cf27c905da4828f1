"""Compact an extraction output: rewrite shards whose rows are mostly superseded or deleted, crash-safely.

examples:
  sigregions compact --features s3://bucket/features/run1 [--max-live-fraction 0.5] [--shard-size 256]
  python jobs/compact.py --features runs/features

Incremental reruns leave the old rows of changed and deleted images in their shards (readers skip them). This
copies the live rows of shards at most --max-live-fraction live into new shards, then removes the old shards; readers
see every image exactly once at every step, and a killed run is resumed by running it again. It takes the output's
lease: it never runs while an extraction writes the same output.
"""

from __future__ import annotations

import json

from pipeline.cli import run_job
from pipeline.config import CompactConfig
from pipeline.store.compact import compact as compact_output


def compact(cfg: CompactConfig) -> int:
    """Compact one output and print what was done as JSON.

    Args:
        cfg: the compaction's config.

    Returns:
        The exit code.
    """
    done = compact_output(cfg.features, cfg.fs_options, cfg.max_live_fraction, cfg.shard_size)
    print(json.dumps({"features": cfg.features, "generation": done["generation"],
                      "shards_rewritten": len(done["rewritten"]), "shards_written": len(done["written"]),
                      **{k: done[k] for k in ("rows_copied", "rows_dropped", "tombstones")}}, indent=2))
    return 0


def main(argv: list[str] | None = None, prog: str = "jobs/compact.py") -> int:
    """Parse flags and run; user errors are one line and exit code 2 (see pipeline.cli.run_job)."""
    return run_job(CompactConfig, argv, prog, __doc__, compact)
