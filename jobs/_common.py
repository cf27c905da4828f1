"""Shared entry-point plumbing: logging setup, config logging, importing the project from a source checkout."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

# Let `python jobs/x.py` work from a checkout (and under `ray job submit --working-dir .`) without installing.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.config import public_dict  # noqa: E402


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr with timestamps."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "s3fs", "aiobotocore", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_config(name: str, cfg: Any) -> None:
    """Log a job's config at start (secrets redacted)."""
    logging.getLogger(name).info("config: %s", json.dumps(public_dict(cfg), sort_keys=True))
