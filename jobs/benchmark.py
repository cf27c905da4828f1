"""Entry point: offline retrieval benchmark (category, oxford, revisited or labels protocol) -> report.json.

    python jobs/benchmark.py --dataset ../shared/datasets/caltech101 --protocol category \
        --queries ../shared/datasets/caltech101/queries_5pct_seed0.txt --report runs/caltech101
"""

from __future__ import annotations

import dataclasses
import sys

import _common

from pipeline.bench.runner import run
from pipeline.config import SAMPLE_DATA, BenchmarkConfig, parse_args


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(BenchmarkConfig, argv, "jobs/benchmark.py", __doc__.splitlines()[0])
    if not cfg.dataset:
        cfg = dataclasses.replace(cfg, dataset=str(SAMPLE_DATA))
    _common.setup_logging()
    _common.log_config("benchmark", cfg)
    report = run(cfg)
    print(f"\n{report['dataset']} ({report['protocol']} protocol, {report['images']} images, {report['queries']} queries)")
    print(f"metric: {report['metric']}\n")
    print(report["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
