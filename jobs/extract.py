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
from pipeline.extract.ray_runner import init_ray, run_ray
from pipeline.extract.worker import preflight, run_local


def extract(cfg: ExtractConfig) -> int:
    preflight(cfg, cfg.fs_options)  # unreachable input / unwritable output: before Ray
    if cfg.in_process:
        manifest = run_local(cfg)
    else:
        init_ray()
        manifest = run_ray(cfg)
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
