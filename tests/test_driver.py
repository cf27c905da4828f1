"""The extraction driver's progress (pipeline/extract/driver.py): image by image, with images/s and an ETA, as a bar
on a terminal and as log lines; through a real in-process run, batch by batch."""

from __future__ import annotations

import io
import logging
import re
import shutil
import time
from pathlib import Path

from pipeline.config import ExtractConfig
from pipeline.extract import driver
from pipeline.extract.plan import Plan, Shard
from pipeline.extract.runners import LocalRunner
from pipeline.io.listing import ImageRecord
from pipeline.store.feature_store import Lease

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "caltech8"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _plan(images: int) -> Plan:
    recs = [ImageRecord(f"{i}.jpg", f"/x/{i}.jpg", "fp") for i in range(images)]
    return Plan(1, [Shard("g00001-000000", 1, recs)], [], 0, [])


def _lease() -> Lease:
    return Lease("out", "me", "host", 1, time.time(), time.time() + 3600)  # no renewal due in a test


def test_a_bar_on_a_terminal_with_rate_and_eta() -> None:
    term = _Terminal()
    p = driver.Progress(_plan(10), time.perf_counter() - 2.0, 60.0, _lease(), stream=term)
    p.add(4)
    p([])
    assert re.search(r"\r\[#{12}\.{18}\] 4/10 images, \d+\.\d/s, ETA 0:00:0\d, 0 errors$", term.getvalue())
    p.add(6)
    p([], final=True)
    assert term.getvalue().endswith("10/10 images, " + term.getvalue().rsplit("10/10 images, ", 1)[1])
    assert term.getvalue().endswith("\n")


def test_log_lines_count_images_not_shards(caplog) -> None:
    plain = io.StringIO()  # not a terminal: no bar, log lines only
    p = driver.Progress(_plan(10), time.perf_counter() - 1.0, 0.0, _lease(), stream=plain)
    with caplog.at_level(logging.INFO, logger="pipeline.extract.driver"):
        p.add(3)
        p([])
    assert plain.getvalue() == ""
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert re.match(r"progress: 3/10 images, \d+\.\d images/s, ETA 0:00:0\d, 0/1 shards, 0 errors$", line)


def test_counts_never_exceed_the_plan_nor_lag_the_finished_shards() -> None:
    term = _Terminal()
    p = driver.Progress(_plan(10), time.perf_counter() - 1.0, 60.0, _lease(), stream=term)
    p.add(25)  # a retried shard counted twice
    p([])
    assert term.getvalue().rsplit("\r", 1)[1].startswith("[" + "#" * 30 + "] 10/10 images")
    p.counted = 0  # the workers' reports lag: the finished shards' markers say more
    p.drawn = float("-inf")
    p([{"stats": {"images": 7, "regions": 0, "statuses": {"ok": 6, "decode_error": 1}}}])
    assert " 7/10 images" in term.getvalue().rsplit("\r", 1)[1] and "1 errors" in term.getvalue()


def test_an_in_process_run_reports_progress_batch_by_batch(tmp_path: Path, caplog) -> None:
    src = tmp_path / "images"
    src.mkdir()
    for f in sorted((SAMPLE / "Faces").glob("*.jpg"))[:6]:
        shutil.copy(f, src / f.name)
    cfg = ExtractConfig(input=str(src), output=str(tmp_path / "out"), max_side=64, regions=3, shard_size=100,
                        batch_size=2, threads=1)
    with caplog.at_level(logging.INFO, logger="pipeline.extract.driver"):
        driver.run(cfg, LocalRunner(), progress_every_s=0.0)
    counts = [int(m.group(1)) for r in caplog.records
              if (m := re.match(r"progress: (\d+)/6 images", r.getMessage()))]
    # One shard of six images in batches of two: progress moves inside the shard, not only when it ends.
    assert counts[:3] == [2, 4, 6] and counts[-1] == 6


class _Recording(LocalRunner):
    """The in-process runner, recording when the driver starts and closes it."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def start(self, cfg: ExtractConfig) -> None:
        self.calls.append("start")

    def run(self, cfg, shards, progress):
        self.calls.append(f"run {len(shards)}")
        return super().run(cfg, shards, progress)

    def close(self) -> None:
        self.calls.append("close")


def test_the_runner_starts_before_listing_and_is_closed_in_every_case(tmp_path: Path, monkeypatch) -> None:
    """The runner is started before the input is listed (its models load meanwhile) and closed at the end: after a
    run, after a run with nothing to do, and after a failure; the manifest has the per-stage seconds."""
    src = tmp_path / "images"
    src.mkdir()
    for f in sorted((SAMPLE / "Faces").glob("*.jpg"))[:3]:
        shutil.copy(f, src / f.name)
    cfg = ExtractConfig(input=str(src), output=str(tmp_path / "out"), max_side=64, regions=3, batch_size=2, threads=1)
    calls: list[str] = []
    listed = driver.listing.list_images

    def list_images(*a, **k):
        calls.append("list")
        return listed(*a, **k)

    monkeypatch.setattr(driver.listing, "list_images", list_images)
    manifest = driver.run(cfg, _Recording(calls))
    assert calls == ["start", "list", "run 1", "close"]
    stages = manifest["run"]["stage_seconds_summed"]
    assert set(stages) == {"read_s", "fetch_s", "decode_s", "infer_s", "write_s"}
    assert all(v > 0 for v in stages.values()), stages
    assert stages["fetch_s"] + stages["decode_s"] <= stages["read_s"] * 1.5 + 0.05  # one thread per image here

    calls.clear()
    driver.run(cfg, _Recording(calls))  # nothing left to do
    assert calls == ["start", "list", "close"]

    def broken(*a, **k):
        raise OSError("listing failed")

    calls.clear()
    monkeypatch.setattr(driver.listing, "list_images", broken)
    try:
        driver.run(cfg, _Recording(calls))
    except OSError:
        pass
    assert calls == ["start", "close"]
