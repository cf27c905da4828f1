"""Test helper: import a job entry point (jobs/<name>.py) as a module, so its parser and ``main(argv)`` can be used."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def load_job(name: str) -> Any:
    """Import jobs/<name>.py (with jobs/ on sys.path while it imports, as when run as a script)."""
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        return mod
    finally:
        sys.path.remove(str(REPO / "jobs"))
