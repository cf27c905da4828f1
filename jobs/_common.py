"""Lets `python jobs/x.py` import the project from a source checkout (and under `ray job submit --working-dir .`)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
