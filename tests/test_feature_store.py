"""The extraction output's lease (pipeline/store/feature_store.py, used by pipeline/extract/driver.py), on a temp dir
and on S3 (moto on loopback): one extraction writes an output at a time; a live lease stops a second run with exit 2,
an expired one (a killed run's) is taken over, a finished or failed run leaves none, the loser of a race notices."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from _jobs import load_job

from pipeline.config import ExtractConfig, from_dict
from pipeline.extract import driver, worker
from pipeline.extract.runners import LocalRunner
from pipeline.io import storage
from pipeline.store import feature_store as fstore

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "caltech8"
IDS = ["Faces/image_0001.jpg", "Faces/image_0002.jpg"]
SMALL = {"max_side": 64, "regions": 3, "shard_size": 1, "batch_size": 1, "threads": 1}


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Two sample images and an output location: both in a temp dir, or both in a fresh moto S3 bucket."""
    local = tmp_path / "in"
    for i in IDS:
        (local / i).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLE / i, local / i)
    if request.param == "local":
        return {"input": str(local), "output": str(tmp_path / "out"), "so": {}}
    so = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    for i in IDS:
        storage.write_bytes(f"s3://{bucket}/in/{i}", (local / i).read_bytes(), so)
    return {"input": f"s3://{bucket}/in", "output": f"s3://{bucket}/out", "so": so}


def _cfg(w: dict[str, Any]) -> ExtractConfig:
    return from_dict(ExtractConfig, {"input": w["input"], "output": w["output"], **SMALL,
                                     "storage_options": json.dumps(w["so"]) if w["so"] else ""})


def _argv(w: dict[str, Any]) -> list[str]:
    argv = ["--input", w["input"], "--output", w["output"], "--in-process", "--max-side", "64", "--regions", "3"]
    return argv + (["--storage-options", json.dumps(w["so"])] if w["so"] else [])


def _rival(w: dict[str, Any], expires_in: float) -> dict[str, Any]:
    """Write the lease another run would hold (another owner, host and pid), expiring ``expires_in`` s from now."""
    t = time.time()
    held = {"owner": "rival0123", "host": "otherhost", "pid": 4242, "renewed": t, "expires": t + expires_in}
    storage.write_json(storage.join(w["output"], fstore.LEASE), held, w["so"])
    return held


def _live(w: dict[str, Any]) -> int:
    return fstore.count_live(w["output"], w["so"])


def test_a_second_run_fails_fast_while_a_live_lease_exists(where: dict[str, Any], capsys) -> None:
    held = _rival(where, expires_in=300)
    with pytest.raises(fstore.LeaseHeld, match=r"owner rival0123 on host otherhost \(pid 4242\), lease expires 20"):
        driver.run(_cfg(where), LocalRunner())
    fs, path = storage.url_to_fs(storage.join(where["output"], fstore.CONFIG), where["so"])
    assert not fs.exists(path)  # nothing written
    assert fstore.read_lease(where["output"], where["so"]) == held  # the other run's lease is left alone

    capsys.readouterr()
    assert load_job("extract").main(_argv(where)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"jobs/extract.py: error: another extraction is writing {where['output']}: owner "
                              "rival0123 on host otherhost") and not any("Traceback" in e for e in err)


def test_an_expired_lease_is_taken_over_and_a_finished_run_leaves_none(where: dict[str, Any], caplog) -> None:
    _rival(where, expires_in=-1)
    caplog.set_level(logging.WARNING)
    run = driver.run(_cfg(where), LocalRunner())
    assert run["run"]["images"] == 2 and _live(where) == 2
    assert "taking over the expired lease" in caplog.text and "rival0123" in caplog.text
    assert fstore.read_lease(where["output"], where["so"]) is None


def test_a_failed_run_leaves_no_lease(where: dict[str, Any], monkeypatch) -> None:
    def crash(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(worker, "write_shard", crash)
    with pytest.raises(RuntimeError, match="simulated failure"):
        driver.run(_cfg(where), LocalRunner())
    assert fstore.read_lease(where["output"], where["so"]) is None  # a rerun need not wait


def test_a_killed_run_blocks_a_rerun_only_until_its_lease_expires(where: dict[str, Any], monkeypatch) -> None:
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "extract.py"), *_argv(where)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "RAY_ADDRESS": ""})
    try:
        deadline = time.time() + 120
        while fstore.read_lease(where["output"], where["so"]) is None:
            assert proc.poll() is None and time.time() < deadline, "the run ended before it took its lease"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)  # no finally, no release: as when a machine is lost
        proc.wait()
    held = fstore.read_lease(where["output"], where["so"])
    assert held["pid"] == proc.pid
    with pytest.raises(fstore.LeaseHeld, match=f"pid {proc.pid}"):
        driver.run(_cfg(where), LocalRunner())

    later = held["expires"] + 1  # the clock after the killed run's lease expired
    monkeypatch.setattr(fstore, "now", lambda: later)
    assert driver.run(_cfg(where), LocalRunner())["run"]["images"] == 2 and _live(where) == 2
    assert fstore.read_lease(where["output"], where["so"]) is None


def test_the_loser_of_two_simultaneous_acquires_notices_and_fails(where: dict[str, Any], monkeypatch) -> None:
    """Both runs found no live lease; each writes its own. On S3 the last write wins (and locally a takeover of a
    stale lease is a plain write too): the run whose lease was overwritten reads the other's back and fails."""
    monkeypatch.setattr(fstore, "LEASE_SETTLE_S", 0.0)
    if not where["so"]:
        _rival(where, expires_in=-1)  # locally only a takeover writes without exclusive creation
    real_write = fstore._write_lease

    def then_the_other_writes(output: str, lease: fstore.Lease, so: Any, exclusive: bool = False) -> bool:
        ok = real_write(output, lease, so, exclusive)
        _rival(where, expires_in=300)
        return ok

    monkeypatch.setattr(fstore, "_write_lease", then_the_other_writes)
    with pytest.raises(fstore.LeaseHeld, match="took the lease on .* at the same time: owner rival0123"):
        fstore.acquire_lease(where["output"], where["so"])


def test_a_local_lease_is_created_exclusively(tmp_path: Path, monkeypatch) -> None:
    """Two local runs that both read "no lease" cannot both create one: the second finds the first's and fails."""
    w = {"output": str(tmp_path / "out"), "so": {}}
    _rival(w, expires_in=300)
    real_read = fstore.read_lease
    reads: list[int] = []

    def read_before_the_other_wrote(output: str, so: Any = None) -> dict[str, Any] | None:
        reads.append(1)
        return None if len(reads) == 1 else real_read(output, so)

    monkeypatch.setattr(fstore, "read_lease", read_before_the_other_wrote)
    with pytest.raises(fstore.LeaseHeld, match="owner rival0123"):
        fstore.acquire_lease(w["output"])
    assert real_read(w["output"])["owner"] == "rival0123"


def test_the_lease_is_renewed_and_a_run_that_lost_it_stops(where: dict[str, Any], monkeypatch) -> None:
    lease = fstore.acquire_lease(where["output"], where["so"])
    monkeypatch.setattr(fstore, "now", lambda: lease.renew_at + 1)
    renewed = fstore.renew_lease(lease, where["so"])
    assert renewed.owner == lease.owner and renewed.expires > lease.expires
    assert fstore.read_lease(where["output"], where["so"])["expires"] == renewed.expires
    fstore.release_lease(renewed, where["so"])
    assert fstore.read_lease(where["output"], where["so"]) is None
    monkeypatch.undo()

    # Mid-run, the lease is taken over (this run was too slow to renew it): the next renewal stops the run.
    real_write = worker.write_shard
    clock = {"t": time.time()}
    monkeypatch.setattr(fstore, "now", lambda: clock["t"])

    def slow_shard(*a: Any, **k: Any) -> dict[str, Any]:
        clock["t"] += fstore.LEASE_TTL_S + 1
        _rival(where, expires_in=300)
        return real_write(*a, **k)

    monkeypatch.setattr(worker, "write_shard", slow_shard)
    with pytest.raises(fstore.LeaseLost, match="lost the lease .* owner rival0123"):
        driver.run(_cfg(where), LocalRunner())
    assert fstore.read_lease(where["output"], where["so"])["owner"] == "rival0123"  # not removed by the loser
    assert _live(where) == 1  # it stopped after the shard during which it lost the lease
