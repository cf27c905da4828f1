"""Compaction (pipeline/store/compact.py, `sigregions compact`): the live rows are unchanged and the mostly dead
shards are gone; killed at any step (an exception, or SIGKILL of a subprocess), readers see every live image exactly
once with its current row, and a rerun finishes the job; retry ids never come back to life; on S3 too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _history import Event, random_history, reference_live, write_history
from _jobs import load_job

from pipeline.extract.plan import plan_shards
from pipeline.io import listing, storage
from pipeline.store import compact as compaction
from pipeline.store import feature_store as fstore

REPO = Path(__file__).resolve().parents[1]


def _rows(out: str, so: dict[str, Any] | None = None) -> dict[str, list]:
    """The live images (id, fingerprint, original shard tag) and regions (id, rank, tag) an output reads back."""
    images = fstore.read_live_table(out, "images", so, ["fingerprint", "tag"])
    regions = fstore.read_live_table(out, "regions", so, ["rank", "tag"])
    return {"images": list(zip(*[images.column(c).to_pylist() for c in ("image_id", "fingerprint", "tag")])),
            "regions": list(zip(*[regions.column(c).to_pylist() for c in ("image_id", "rank", "tag")]))}


def _expected(events: list[Event]) -> dict[str, list]:
    live = reference_live(events)
    return {"images": [(i, live[i][1], live[i][0]) for i in sorted(live)],
            "regions": [(i, r, live[i][0]) for i in sorted(live) for r in (0, 1)]}


def _history(tmp_path: Path, seed: int = 1, legacy_until: int = 1) -> tuple[str, list[Event]]:
    events = random_history(seed, n_ids=150, generations=5)
    out = str(tmp_path / "out")
    write_history(out, events, legacy_until)
    return out, events


def _fractions(out: str) -> dict[str, float]:
    return {ref.shard: t.num_rows / ref.ids.count for ref, t in fstore.iter_live_ids(fstore.live_shard_refs(out))}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_compaction_keeps_the_live_rows_and_removes_the_mostly_dead_shards(tmp_path: Path, seed: int) -> None:
    out, events = _history(tmp_path, seed, legacy_until=seed % 3)
    before = _fractions(out)
    victims = sorted(s for s, f in before.items() if f <= 0.5)
    assert victims and len(victims) < len(before)  # the history has both kinds
    done = compaction.compact(out, shard_size=8)
    assert sorted(done["rewritten"]) == victims and done["written"]
    assert done["rows_copied"] + done["rows_dropped"] == sum(
        len(e.ids) for e in events if e.shard in victims)
    assert _rows(out) == _expected(events)  # the same rows, read from the new shards
    after = _fractions(out)
    assert not set(victims) & set(after) and all(after[s] > 0.5 for s in after if s in before)
    assert all(f == 1.0 for s, f in after.items() if s.startswith(f"g{done['generation']:05d}"))
    for sid in victims:  # every file of a rewritten shard is gone
        assert not any(Path(p).exists() for p in fstore.shard_paths(out, sid).values())
    assert fstore.read_lease(out) is None
    again = compaction.compact(out, shard_size=8)  # nothing left to do
    assert again["rewritten"] == [] and again["generation"] is None and _rows(out) == _expected(events)


def test_a_retry_whose_last_mention_is_rewritten_stays_dead(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    events = [Event("g00001-000000", 1, "data", ("a", "c", "x"), ("1", "1", "1")),
              Event("g00002-000000", 2, "data", ("b", "x"), ("2", "2"), retry=("x",))]
    write_history(out, events)
    assert sorted(reference_live(events)) == ["a", "b", "c"]  # x failed transiently in generation 2: not live
    done = compaction.compact(out, max_live_fraction=0.5)
    assert done["rewritten"] == ["g00002-000000"] and done["tombstones"] == 1
    assert _rows(out) == _expected(events)  # x did not come back from g00001-000000
    # The next extraction retries x, as it would have before compaction.
    recs = [listing.ImageRecord(i, f"file:///{i}", fp) for i, fp in (("a", "1"), ("b", "2"), ("c", "1"), ("x", "1"))]
    plan = plan_shards(recs, fstore.read_done_markers(out), 10)
    assert [r.image_id for s in plan.shards for r in s.records] == ["x"] and plan.deleted == []


def test_planning_after_compaction_skips_the_copied_images(tmp_path: Path) -> None:
    out, events = _history(tmp_path)
    live = reference_live(events)
    recs = [listing.ImageRecord(i, f"file:///{i}", fp) for i, (_, fp) in sorted(live.items())]
    compaction.compact(out, max_live_fraction=1.0)  # every shard with a superseded row
    plan = plan_shards(recs, fstore.read_done_markers(out), 10)
    assert plan.shards == [] and plan.deleted == [] and plan.skipped == len(live)


class Killed(BaseException):
    """Stands in for the process dying (not an Exception: nothing may catch it)."""


def _die_on_call(monkeypatch: pytest.MonkeyPatch, obj: Any, name: str, call: int, before: bool = True) -> None:
    real = getattr(obj, name)
    calls = [0]

    def wrapped(*a: Any, **k: Any) -> Any:
        calls[0] += 1
        if calls[0] == call and before:
            raise Killed(name)
        out = real(*a, **k)
        if calls[0] == call:
            raise Killed(name)
        return out

    monkeypatch.setattr(obj, name, wrapped)


def _remove_marker_only(output: str, sid: str, so: Any = None) -> None:
    """Dies after deleting the marker of a shard, before its files."""
    fs, path = storage.url_to_fs(fstore.shard_paths(output, sid)["done"], so)
    fs.rm_file(path)
    raise Killed("after the marker")


@pytest.mark.parametrize("step", ["mid_data", "after_first_marker", "before_tombstones", "first_removal",
                                  "marker_removed", "third_removal"])
def test_killed_at_any_step_readers_see_each_image_once_and_a_rerun_finishes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    out, events = _history(tmp_path, seed=2)
    expected = _expected(events)
    with monkeypatch.context() as m:
        if step == "mid_data":  # a new shard's images file written, its regions file not
            _die_on_call(m, compaction, "write_parquet", 2)
        elif step == "after_first_marker":
            _die_on_call(m, fstore, "write_data_marker", 1, before=False)
        elif step == "before_tombstones":
            _die_on_call(m, fstore, "write_deletions", 1)
        elif step == "first_removal":
            _die_on_call(m, compaction, "remove_shard", 1)
        elif step == "marker_removed":
            m.setattr(compaction, "remove_shard", _remove_marker_only)
        else:
            _die_on_call(m, compaction, "remove_shard", 3)
        with pytest.raises(Killed):
            compaction.compact(out, shard_size=8)
    fs_lease = Path(out, fstore.LEASE)
    if fs_lease.exists():  # a killed process leaves its lease; the next run would wait for it to expire
        fs_lease.unlink()
    assert _rows(out) == expected  # each live image once, its current row
    done = compaction.compact(out, shard_size=8)
    assert _rows(out) == expected
    assert all(f > 0.5 for f in _fractions(out).values())
    leftovers = [p for sub in (fstore.IMAGES_DIR, fstore.REGIONS_DIR, fstore.IDS_DIR)
                 for p in Path(out, sub).glob("*.parquet")]
    done_shards = {m["shard"] for m in fstore.read_done_markers(out)}
    assert {p.stem for p in leftovers} <= done_shards  # no orphan files remain
    assert done["generation"] is not None or step == "third_removal"


KILL_SCRIPT = """
import os, signal, sys
from pipeline.store import compact, feature_store as fstore
real, calls = fstore.write_data_marker, [0]
def marker(*a, **k):
    out = real(*a, **k)
    calls[0] += 1
    if calls[0] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
fstore.write_data_marker = marker
compact.compact(sys.argv[1], shard_size=8)
"""


def test_sigkill_mid_compaction_then_the_job_resumes(tmp_path: Path, capsys) -> None:
    out, events = _history(tmp_path, seed=3)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", KILL_SCRIPT, out], env=env, capture_output=True, timeout=300)
    assert p.returncode == -9, p.stderr.decode()[-2000:]
    assert fstore.read_lease(out) is not None  # the killed run's lease is left
    assert _rows(out) == _expected(events)
    job = load_job("compact")
    capsys.readouterr()
    assert job.main(["--features", out, "--shard-size", "8"]) == 2  # the lease is live: refused, one line
    assert "another extraction is writing" in capsys.readouterr().err
    Path(out, fstore.LEASE).unlink()  # as the message says, once that run is known dead
    assert job.main(["--features", out, "--shard-size", "8"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["shards_rewritten"] >= 1 and printed["generation"] is not None
    assert _rows(out) == _expected(events) and all(f > 0.5 for f in _fractions(out).values())


def test_s3_compaction_round_trip(s3_server: dict, s3_bucket: str) -> None:
    events = random_history(4, n_ids=60, generations=3)
    out = f"s3://{s3_bucket}/features"
    write_history(out, events, legacy_until=1, storage_options=s3_server)
    done = compaction.compact(out, s3_server, shard_size=8)
    assert done["rewritten"]
    assert _rows(out, s3_server) == _expected(events)
    fs, root = storage.url_to_fs(out, s3_server)
    for sid in done["rewritten"]:
        assert not fs.exists(f"{root}/{fstore.DONE_DIR}/{sid}.json")
    assert fstore.read_lease(out, s3_server) is None
