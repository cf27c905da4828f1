"""Entry-point plumbing shared by every job: CLI flags from a config dataclass, logging, and one error policy."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pickle
import sys
import typing
from typing import Any, Callable, Sequence, TypeVar

from pipeline.config import ConfigError, from_dict, public_dict
from pipeline.io.storage import StorageError

T = TypeVar("T")

# What a user can cause and fix (a bad value, an unreachable or unwritable location): one line on stderr and exit 2,
# like argparse's own usage errors, never a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, StorageError, pickle.UnpicklingError)  # a refused pickle
EXIT_USER_ERROR = 2


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field (``--max-side``), help and choices from metadata."""
    # allow_abbrev=False: a misspelt or shortened flag (--max-s, --shard) is an error, not a silent prefix match.
    p = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        typ = hints[f.name]
        # argparse %-formats help texts: a literal "%" in a field's help (say "90% of pixels") must be escaped.
        help_text = (meta.get("help") or "").replace("%", "%%") or None
        if typ is bool:
            # BooleanOptionalAction reads any "--no-..." flag as the negation: a field named no_x could never be set.
            assert not f.name.startswith("no_"), f"boolean field {f.name} would be unreachable as --{f.name}"
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            p.add_argument(flag, dest=f.name, type=typ, default=f.default, choices=meta.get("choices"),
                           required=bool(meta.get("required")), help=help_text)
    return p


def parse_args(cls: type[T], argv: Sequence[str] | None, prog: str, description: str) -> T:
    """Parse CLI flags into a validated config; argparse rejects unknown flags, validation the rest.

    Args:
        cls: the config dataclass.
        argv: arguments (None = sys.argv[1:]).
        prog: program name for --help.
        description: --help text.

    Returns:
        The validated config.
    """
    parser = build_parser(cls, prog, description)
    ns = parser.parse_args(argv)
    try:
        return from_dict(cls, vars(ns))
    except ConfigError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr with timestamps; quiet the storage clients' chatter."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "s3fs", "aiobotocore", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_config(name: str, cfg: Any) -> None:
    """Log a job's config at start (secrets redacted)."""
    logging.getLogger(name).info("config: %s", json.dumps(public_dict(cfg), sort_keys=True))


def run_job(cls: type[T], argv: Sequence[str] | None, prog: str, description: str, body: Callable[[T], int],
            resolve: Callable[[T], T] | None = None) -> int:
    """Every job's ``main``: parse its config, set up logging, log the config, run the body, and turn user errors
    into one line on stderr with exit code 2.

    Args:
        cls: the job's config dataclass.
        argv: arguments (None = sys.argv[1:]).
        prog: program name (``jobs/extract.py``), also the prefix of error lines.
        description: --help text.
        body: the job itself, given the config; returns the exit code.
        resolve: fills defaults that depend on the environment (e.g. the embedded sample data) before logging.

    Returns:
        The exit code.
    """
    cfg = parse_args(cls, argv, prog, description)
    if resolve is not None:
        cfg = resolve(cfg)
    setup_logging()
    log_config(prog.rsplit("/", 1)[-1].removesuffix(".py"), cfg)
    try:
        return body(cfg)
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
