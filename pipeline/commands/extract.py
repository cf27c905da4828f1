"""Extract significant-region features from an image collection into Parquet, on Ray (or in this process).

examples:
  sigregions extract --input s3://bucket/images/ --output s3://bucket/features/run1 [--backbone vgg16] [--regions 6]
  sigregions extract --in-process --input photos/ --output runs/features     # no Ray: one process
  ray job submit --working-dir . -- python jobs/extract.py --input ... --output ...

Without --input, a source checkout's embedded sample (data/caltech8) is used. Rerunning the same command processes
only unfinished shards and new or changed images; read the live rows with pipeline.store.live (see README.md).
"""

from __future__ import annotations

import dataclasses
import json

from pipeline.cli import run_job
from pipeline.commands import sample_data_or
from pipeline.config import ExtractConfig
from pipeline.extract import driver
from pipeline.extract.runners import make_runner


def extract(cfg: ExtractConfig) -> int:
    """Run one extraction and print its counts as JSON.

    Args:
        cfg: the extraction's config.

    Returns:
        The exit code.
    """
    manifest = driver.run(cfg, make_runner(cfg.in_process))  # checks input and output before Ray starts
    run = manifest["run"]
    print(json.dumps({"output": cfg.output, **{k: run[k] for k in ("images", "ok", "errors", "statuses", "regions",
                                                                   "skipped_already_done", "deleted", "elapsed_s",
                                                                   "images_per_s")}}, indent=2))
    return 0


def main(argv: list[str] | None = None, prog: str = "jobs/extract.py") -> int:
    """Parse flags and run; user errors are one line and exit code 2 (see pipeline.cli.run_job)."""
    return run_job(ExtractConfig, argv, prog, __doc__, extract,
                   resolve=lambda c: dataclasses.replace(c, input=sample_data_or(c.input, "--input")))
