"""Entry-point plumbing: CLI flags from a config dataclass, logging, one error policy, and the `sigregions` command."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import pickle
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from pipeline.config import ConfigError, from_dict, public_dict
from pipeline.io.storage import StorageError

T = TypeVar("T")

# What a user can cause and fix (a bad value, an unreachable or unwritable location): one line on stderr and exit 2,
# like argparse's own usage errors, never a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, StorageError, pickle.UnpicklingError)  # a refused pickle
EXIT_USER_ERROR = 2

# `sigregions <command>` -> the module under pipeline/commands/ whose main() runs it.
COMMANDS = {"extract": "extract", "index": "index", "search": "search", "benchmark": "benchmark",
            "reindex": "reindex", "train": "train_regions", "draw": "draw_regions", "compact": "compact"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description and epilog (usage examples) as written, and shows a flag's default only when it says
    something: not for empty strings, None or required flags."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        default = action.default
        # A store_true switch's False only repeats that the switch is off.
        switch_off = default is False and not isinstance(action, argparse.BooleanOptionalAction)
        meaningless = default is None or default is argparse.SUPPRESS or default == "" or action.required or switch_off
        if "%(default)" in help_text or meaningless or not action.option_strings:
            return action.help
        return f"{help_text} (default: %(default)s)"


def version() -> str:
    """The version of the code running: a source checkout's pyproject.toml, else the installed distribution's.

    A checkout is read first: a venv may also hold an install of another revision, whose metadata would then
    name the wrong code.

    Returns:
        The version string ("unknown" when neither is found).
    """
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.is_file():
        text = pyproject.read_text(encoding="utf-8")
        # A line-based read: tomllib is Python 3.11+, and this file's [project] table names the version once.
        if re.search(r'^name\s*=\s*"sigregions"', text, re.M):
            m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
            if m:
                return m.group(1)
    try:
        return importlib.metadata.version("sigregions")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def add_common_flags(p: argparse.ArgumentParser) -> None:
    """Flags every command has besides its config's: --version and --verbose (run-time only, never in a config)."""
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    p.add_argument("--verbose", action="store_true", help="log at DEBUG level instead of INFO")


def split_doc(doc: str) -> tuple[str, str]:
    """A command module's docstring as --help's description (its first line) and epilog (the rest: examples)."""
    first, _, rest = inspect.cleandoc(doc or "").partition("\n")
    return first, rest.strip("\n")


def build_parser(cls: type, prog: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field (``--max-side``), help and choices from metadata,
    plus --version and --verbose.

    Args:
        cls: the config dataclass.
        prog: program name for --help.
        description: one line above the flags.
        epilog: text below the flags, printed as written (usage examples).

    Returns:
        The parser.
    """
    # allow_abbrev=False: a misspelt or shortened flag (--max-s, --shard) is an error, not a silent prefix match.
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog or None, allow_abbrev=False,
                                formatter_class=HelpFormatter)
    add_common_flags(p)
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


RUNTIME_FLAGS = ("verbose",)  # flags every command has that are not config fields (see add_common_flags)


def config_values(ns: argparse.Namespace) -> dict[str, Any]:
    """A parsed namespace's config fields: everything but the run-time flags every command has."""
    return {k: v for k, v in vars(ns).items() if k not in RUNTIME_FLAGS}


def _parse(cls: type[T], argv: Sequence[str] | None, prog: str, doc: str) -> tuple[T, bool]:
    """Parse flags into a validated config and the --verbose switch (kept out of the config and its hash)."""
    parser = build_parser(cls, prog, *split_doc(doc))
    ns = parser.parse_args(argv)
    try:
        return from_dict(cls, config_values(ns)), bool(ns.verbose)
    except ConfigError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def parse_args(cls: type[T], argv: Sequence[str] | None, prog: str, description: str) -> T:
    """Parse CLI flags into a validated config; argparse rejects unknown flags, validation the rest.

    Args:
        cls: the config dataclass.
        argv: arguments (None = sys.argv[1:]).
        prog: program name for --help.
        description: --help text (first line; later lines are the epilog).

    Returns:
        The validated config.
    """
    return _parse(cls, argv, prog, description)[0]


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr with timestamps at INFO (DEBUG when verbose); quiet the storage clients' chatter."""
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # basicConfig changes nothing once the root logger has a handler (an embedding app, pytest): set the level anyway.
    logging.getLogger().setLevel(level)
    for noisy in ("botocore", "s3fs", "aiobotocore", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_config(name: str, cfg: Any) -> None:
    """Log a job's config at start (secrets redacted)."""
    logging.getLogger(name).info("config: %s", json.dumps(public_dict(cfg), sort_keys=True))


def run_job(cls: type[T], argv: Sequence[str] | None, prog: str, doc: str, body: Callable[[T], int],
            resolve: Callable[[T], T] | None = None) -> int:
    """Every command's ``main``: parse its config, set up logging, log the config, run the body, and turn user
    errors into one line on stderr with exit code 2.

    Args:
        cls: the command's config dataclass.
        argv: arguments (None = sys.argv[1:]).
        prog: program name (``jobs/extract.py``, ``sigregions extract``), also the prefix of error lines.
        doc: the command's docstring: its first line is --help's description, the rest (examples) its epilog.
        body: the command itself, given the config; returns the exit code.
        resolve: fills defaults that depend on the environment (e.g. the embedded sample data) before logging;
            may raise a user error.

    Returns:
        The exit code.
    """
    cfg, verbose = _parse(cls, argv, prog, doc)
    setup_logging(verbose)
    try:
        if resolve is not None:
            cfg = resolve(cfg)
        log_config(prog.split()[-1].rsplit("/", 1)[-1].removesuffix(".py"), cfg)  # "extract" from either prog
        return body(cfg)
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


def command_summary(name: str) -> str:
    """A command's one-line summary: its module docstring's first line, read without importing the module (the
    list in ``sigregions --help`` should not import torch and Ray)."""
    spec = importlib.util.find_spec(f"pipeline.commands.{COMMANDS[name]}")
    source = Path(spec.origin).read_text(encoding="utf-8")  # type: ignore[union-attr, arg-type]
    return split_doc(ast.get_docstring(ast.parse(source)) or "")[0]


def main(argv: Sequence[str] | None = None) -> int:
    """The ``sigregions`` console script: ``sigregions <command> [flags]`` runs that command's ``main``.

    Args:
        argv: arguments (None = sys.argv[1:]).

    Returns:
        The command's exit code.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    width = max(map(len, COMMANDS)) + 2
    listing = "\n".join(f"  {name:<{width}}{command_summary(name)}" for name in COMMANDS)
    p = argparse.ArgumentParser(
        prog="sigregions", formatter_class=HelpFormatter,
        description="Significant-region image retrieval on Ray: extraction, indexes, search, benchmarks.",
        epilog=f"commands:\n{listing}\n\n`sigregions <command> --help` lists a command's flags.")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    p.add_argument("command", choices=list(COMMANDS), metavar="command", help="a command listed below")
    # Only the command name is parsed here: everything after it belongs to the command's own parser.
    name = p.parse_args(argv[:1]).command
    module = importlib.import_module(f"pipeline.commands.{COMMANDS[name]}")
    return module.main(argv[1:], prog=f"sigregions {name}")


if __name__ == "__main__":
    sys.exit(main())
