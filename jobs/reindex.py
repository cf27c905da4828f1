"""Runs `sigregions reindex` as `python jobs/reindex.py [flags]` from a checkout or under `ray job submit`."""

import sys

import _common  # noqa: F401  (puts the checkout on sys.path)

from pipeline.commands.reindex import main

if __name__ == "__main__":
    sys.exit(main())
