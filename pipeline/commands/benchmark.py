"""Benchmark retrieval on a dataset under a protocol (category, oxford, revisited, labels) into report.json.

examples:
  sigregions benchmark --dataset ../shared/datasets/caltech101 --protocol category \
      --queries ../shared/datasets/caltech101/queries_5pct_seed0.txt --report runs/caltech101
  sigregions benchmark --protocol labels --features runs/demo/features --report runs/demo/report  # sample data

Without --dataset, a source checkout's embedded sample (data/caltech8) is used. Without --features, the dataset is
extracted first, on Ray (RAY_ADDRESS or a local instance).
"""

from __future__ import annotations

import dataclasses

from pipeline.bench.runner import run
from pipeline.cli import run_job
from pipeline.commands import sample_data_or
from pipeline.config import BenchmarkConfig
from pipeline.extract.runners import RayRunner


def benchmark(cfg: BenchmarkConfig) -> int:
    """Run one benchmark and print its results table.

    Args:
        cfg: the benchmark's config.

    Returns:
        The exit code.
    """
    report = run(cfg, RayRunner())  # extracts on Ray (RAY_ADDRESS or a local instance) unless --features is given
    print(f"\n{report['dataset']} ({report['protocol']} protocol, {report['images']} images, "
          f"{report['queries']} queries)")
    print(f"metric: {report['metric']}\n")
    print(report["table"])
    return 0


def main(argv: list[str] | None = None, prog: str = "jobs/benchmark.py") -> int:
    """Parse flags and run; user errors are one line and exit code 2 (see pipeline.cli.run_job)."""
    return run_job(BenchmarkConfig, argv, prog, __doc__, benchmark,
                   resolve=lambda c: dataclasses.replace(c, dataset=sample_data_or(c.dataset, "--dataset")))
