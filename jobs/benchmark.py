"""Entry point: offline retrieval benchmark (category, oxford, revisited or labels protocol) -> report.json.

    python jobs/benchmark.py --dataset ../shared/datasets/caltech101 --protocol category \
        --queries ../shared/datasets/caltech101/queries_5pct_seed0.txt --report runs/caltech101
"""

from __future__ import annotations

import dataclasses
import sys

import _common  # noqa: F401  (puts the checkout on sys.path)

from pipeline.bench.runner import run
from pipeline.cli import run_job
from pipeline.config import SAMPLE_DATA, BenchmarkConfig
from pipeline.extract.runners import RayRunner


def benchmark(cfg: BenchmarkConfig) -> int:
    report = run(cfg, RayRunner())  # extracts on Ray (RAY_ADDRESS or a local instance) unless --features is given
    print(f"\n{report['dataset']} ({report['protocol']} protocol, {report['images']} images, {report['queries']} queries)")
    print(f"metric: {report['metric']}\n")
    print(report["table"])
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(BenchmarkConfig, argv, "jobs/benchmark.py", __doc__.splitlines()[0], benchmark,
                   resolve=lambda c: c if c.dataset else dataclasses.replace(c, dataset=str(SAMPLE_DATA)))


if __name__ == "__main__":
    sys.exit(main())
