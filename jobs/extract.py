"""Entry point: extract significant-region features from an image collection into Parquet, on Ray.

    python jobs/extract.py --input s3://bucket/images/ --output s3://bucket/features/run1
    ray job submit --working-dir . -- python jobs/extract.py --input ... --output ...
"""

from __future__ import annotations

import dataclasses
import json
import sys

import _common  # noqa: F401  (puts the checkout on sys.path)

from pipeline.cli import run_job
from pipeline.config import SAMPLE_DATA, ExtractConfig
from pipeline.extract import driver
from pipeline.extract.runners import make_runner


def extract(cfg: ExtractConfig) -> int:
    manifest = driver.run(cfg, make_runner(cfg.in_process))  # checks input and output before Ray starts
    run = manifest["run"]
    print(json.dumps({"output": cfg.output, **{k: run[k] for k in ("images", "ok", "errors", "statuses", "regions",
                                                                   "skipped_already_done", "deleted", "elapsed_s",
                                                                   "images_per_s")}}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(ExtractConfig, argv, "jobs/extract.py", __doc__.splitlines()[0], extract,
                   resolve=lambda c: c if c.input else dataclasses.replace(c, input=str(SAMPLE_DATA)))


if __name__ == "__main__":
    sys.exit(main())
