"""Entry-point plumbing (pipeline/cli.py): every job answers --help, and user errors are one line with exit code 2."""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import pytest
from _jobs import REPO, load_job

from pipeline.cli import EXIT_USER_ERROR, build_parser, run_job
from pipeline.config import ConfigError, _opt
from pipeline.io.storage import StorageError

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
