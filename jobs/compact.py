"""Runs `sigregions compact` as `python jobs/compact.py [flags]` from a checkout or under `ray job submit`."""

import sys

import _common  # noqa: F401  (puts the checkout on sys.path)

from pipeline.commands.compact import main

if __name__ == "__main__":
    sys.exit(main())
