"""Runs `sigregions benchmark` as `python jobs/benchmark.py [flags]` from a checkout or under `ray job submit`."""

import sys

import _common  # noqa: F401  (puts the checkout on sys.path)

from pipeline.commands.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
