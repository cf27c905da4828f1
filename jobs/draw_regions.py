"""Runs `sigregions draw` as `python jobs/draw_regions.py [flags]` from a checkout or under `ray job submit`."""

import sys

import _common  # noqa: F401  (puts the checkout on sys.path)

from pipeline.commands.draw_regions import main

if __name__ == "__main__":
    sys.exit(main())
