"""Entry-point plumbing (pipeline/cli.py): every job answers --help, and user errors are one line with exit code 2."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _jobs import REPO, load_job

from pipeline.cli import COMMANDS as COMMANDS_BY_NAME
from pipeline.cli import EXIT_USER_ERROR, build_parser, run_job, split_doc, version
from pipeline.cli import main as cli_main
from pipeline.config import ConfigError, _opt
from pipeline.io.storage import StorageError
from pipeline.store.live import live_files

JOBS = sorted(p.stem for p in (REPO / "jobs").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("name", JOBS)
def test_every_job_answers_help(name: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        load_job(name).main(["--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_a_percent_sign_in_a_help_text_is_printed_not_formatted(capsys) -> None:
    @dataclasses.dataclass(frozen=True)
    class C:
        share: float = _opt(0.5, "keep 50% of it")

    with pytest.raises(SystemExit):
        build_parser(C, "prog", "d").parse_args(["--help"])
    assert "keep 50% of it" in capsys.readouterr().out


@dataclasses.dataclass(frozen=True)
class _Cfg:
    where: str = _opt("x", "a location")

    def validate(self) -> None:
        """Nothing to check."""


@pytest.mark.parametrize("error", [ConfigError("bad value"), StorageError("cannot reach s3://b/x"),
                                   pickle.UnpicklingError("refused global posix.system")])
def test_user_errors_are_one_line_and_exit_2(error: Exception, capsys) -> None:
    def body(cfg: _Cfg) -> int:
        raise error

    assert run_job(_Cfg, [], "jobs/x.py", "d", body) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"jobs/x.py: error: {error}" and not any("Traceback" in line for line in err)


def test_a_bug_is_not_hidden_as_a_user_error() -> None:
    def body(cfg: _Cfg) -> int:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        run_job(_Cfg, [], "jobs/x.py", "d", body)


def test_index_job_on_missing_features_is_a_user_error(tmp_path: Path, capsys) -> None:
    code = load_job("index").main(["--features", str(tmp_path / "none"), "--output", str(tmp_path / "idx")])
    assert code == EXIT_USER_ERROR
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("jobs/index.py: error: ")


def test_a_refused_ground_truth_pickle_is_a_user_error(tmp_path: Path, capsys) -> None:
    """A gnd file that would run code is the user's to replace: one line and exit 2, not a traceback."""
    dataset = tmp_path / "roxford5k"
    dataset.mkdir()
    (dataset / "gnd_roxford5k.pkl").write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [], "x": os.system}))
    code = load_job("benchmark").main(["--dataset", str(dataset), "--protocol", "revisited",
                                       "--report", str(tmp_path / "report")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USER_ERROR and not any("Traceback" in line for line in err)
    assert err[-1].startswith("jobs/benchmark.py: error: ") and "system" in err[-1]


# ---- the `sigregions` console script, help texts, --version, --verbose ------------------------------------------

COMMANDS = sorted(COMMANDS_BY_NAME)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_answers_help_through_the_dispatcher(name: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli_main([name, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: sigregions {name} ")
    module = importlib.import_module(f"pipeline.commands.{COMMANDS_BY_NAME[name]}")
    description, examples = split_doc(module.__doc__)
    assert description in out and not description.startswith("Entry point")
    assert examples and examples in out  # the docstring's usage examples, as written
    assert "(default: )" not in out and f"sigregions {name} --" in examples


def test_the_command_list_names_each_command_with_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli_main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for name in COMMANDS:
        assert any(line.split() and line.split()[0] == name and len(line.split()) > 3 for line in out.splitlines())


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["--frobnicate"]])
def test_no_or_an_unknown_command_is_a_usage_error(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2 and capsys.readouterr().err.startswith("usage: sigregions")


def test_an_empty_default_is_not_shown_but_a_meaningful_one_is(capsys) -> None:
    @dataclasses.dataclass(frozen=True)
    class C:
        where: str = _opt("", "a location")
        size: int = _opt(0, "a size")
        flag: bool = _opt(False, "a switch")

    with pytest.raises(SystemExit):
        build_parser(C, "prog", "d").parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "a location --size" in out and "a size (default: 0)" in out and "a switch (default: False)" in out


@pytest.mark.parametrize("argv", [["--version"], ["index", "--version"], ["draw", "--version"]])
def test_version(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"sigregions{' ' + argv[0] if len(argv) > 1 else ''} {version()}"
    assert version() == re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)


@pytest.mark.parametrize("flags,level", [([], logging.INFO), (["--verbose"], logging.DEBUG)])
def test_verbose_logs_at_debug_and_stays_out_of_the_config(flags: list[str], level: int) -> None:
    seen = []

    def body(cfg: _Cfg) -> int:
        seen.append((cfg, logging.getLogger().getEffectiveLevel()))
        return 0

    assert run_job(_Cfg, ["--where", "y", *flags], "jobs/x.py", "d", body) == 0
    assert seen == [(_Cfg(where="y"), level)]  # the config (so its hash and config.json) is the same either way


def test_without_sample_data_extract_asks_for_input(tmp_path: Path, monkeypatch, capsys) -> None:
    import pipeline.commands as commands

    monkeypatch.setattr(commands, "SAMPLE_DATA", tmp_path / "data" / "caltech8")  # as in a wheel install
    assert cli_main(["extract", "--in-process", "--output", str(tmp_path / "out")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sigregions extract: error: pass --input: the embedded sample data (data/caltech8) comes only with "
                   "a source checkout, and there is none here"]
    assert not (tmp_path / "out").exists()


# ---- a wheel: the installed command runs the demo path from the wheel's own code ---------------------------------

def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_wheel_installs_a_working_sigregions_command(tmp_path: Path) -> None:
    # Build from a copy of the sources, so the checkout gets no build/ or egg-info and nothing else is packed.
    src = tmp_path / "src"
    shutil.copytree(REPO / "pipeline", src / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", ".",
                  "-w", str(tmp_path / "dist")], src, env)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("sigregions-*.whl")
    site = tmp_path / "site"
    installed = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site),
                      str(wheel)], tmp_path, env)
    assert installed.returncode == 0, installed.stderr[-2000:]
    assert not (site / "jobs").exists() and not (site / "data").exists()

    env["PYTHONPATH"] = str(site)
    where = _run([sys.executable, "-c", "import pipeline.commands; print(pipeline.commands.__file__)"], tmp_path, env)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr
    script = site / "bin" / "sigregions"
    helped = _run([sys.executable, str(script), "--help"], tmp_path, env)
    assert helped.returncode == 0 and "extract" in helped.stdout and "draw" in helped.stdout, helped.stderr
    images = tmp_path / "images" / "watch"
    images.mkdir(parents=True)
    for f in sorted((REPO / "data" / "caltech8" / "watch").glob("*.jpg"))[:5]:
        shutil.copy(f, images / f.name)
    no_input = _run([sys.executable, str(script), "extract", "--in-process", "--output", str(tmp_path / "x")],
                    tmp_path, env)
    assert no_input.returncode == 2 and no_input.stderr.strip().splitlines()[-1].startswith(
        "sigregions extract: error: pass --input")
    ran = _run([sys.executable, str(script), "extract", "--in-process", "--input", str(images.parent), "--output",
                str(tmp_path / "features"), "--max-side", "64", "--regions", "3", "--shard-size", "4",
                "--batch-size", "4"], tmp_path, env)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert json.loads(ran.stdout)["ok"] == 5
    assert len(live_files(str(tmp_path / "features"), "images")) == 2
