"""The per-shard live set (pipeline/store/feature_store.py: live_shard_refs, live_ids, iter_live_ids,
read_live_shard) and incremental planning on it (pipeline/extract/plan.py), against the reference: the old one-dict
resolution (live_images over inline JSON markers), on seeded random multi-generation histories with changed images,
retries and deletions, in both marker formats and mixed; and on S3 (moto)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from _history import live_by_shard, random_history, reference_live, universe, write_history

from pipeline.extract.plan import plan_shards
from pipeline.io import listing, storage
from pipeline.store import feature_store as fstore

SEEDS = range(8)


def _resolved(output: str, so: dict[str, Any] | None = None) -> dict[str, list[tuple[str, str]]]:
    """shard -> sorted live (id, fingerprint), resolved per shard, each ref on its own."""
    out = {}
    for ref in fstore.live_shard_refs(output, so):
        t = fstore.live_ids(ref, so)
        if t.num_rows:
            out[ref.shard] = list(zip(t.column("image_id").to_pylist(), t.column("fingerprint").to_pylist()))
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("legacy_until", [0, 2, 99])  # all Parquet id lists; older gens JSON (an upgrade); all JSON
def test_per_shard_live_set_equals_the_one_dict_resolution(tmp_path: Path, seed: int, legacy_until: int) -> None:
    events = random_history(seed, contiguous=seed % 2 == 0)
    out = str(tmp_path / "out")
    write_history(out, events, legacy_until, data=False)
    expected = live_by_shard(reference_live(events))
    assert _resolved(out) == expected
    # The sweep (shared cache of later id lists) gives the same, every ref once.
    refs = fstore.live_shard_refs(out)
    swept = {ref.shard: t for ref, t in fstore.iter_live_ids(refs)}
    assert sorted(swept) == sorted(r.shard for r in refs)
    assert {s: list(zip(t.column("image_id").to_pylist(), t.column("fingerprint").to_pylist()))
            for s, t in swept.items() if t.num_rows} == expected
    assert fstore.count_live(out) == len(reference_live(events))
    # The old function still reads both formats (it is the reference for the tests and small outputs).
    assert fstore.live_images(fstore.read_done_markers(out)) == reference_live(events)


@pytest.mark.parametrize("seed", SEEDS[:4])
def test_a_ref_names_only_later_markers_whose_range_overlaps(tmp_path: Path, seed: int) -> None:
    events = random_history(seed)
    out = str(tmp_path / "out")
    write_history(out, events, data=False)
    for ref in fstore.live_shard_refs(out):
        assert all(e.shard > ref.shard for e in ref.later)
        assert all(e.first <= ref.ids.last and e.last >= ref.ids.first for e in ref.later)  # type: ignore[operator]
    # Every later marker that holds one of a shard's ids is named by its ref (a brute-force check).
    ids = {e.shard: set(e.ids) for e in events}
    for ref in fstore.live_shard_refs(out):
        named = {e.shard for e in ref.later}
        assert {s for s, v in ids.items() if s > ref.shard and v & ids[ref.shard]} <= named


@pytest.mark.parametrize("seed", SEEDS)
def test_live_rows_read_per_shard_equal_the_reference(tmp_path: Path, seed: int) -> None:
    events = random_history(seed, n_ids=120, generations=4, contiguous=seed % 2 == 1)
    out = str(tmp_path / "out")
    write_history(out, events, legacy_until=seed % 3)
    live = reference_live(events)
    images = fstore.read_live_table(out, "images", columns=["tag", "fingerprint"])
    assert images.column("image_id").to_pylist() == sorted(live)
    assert images.column("tag").to_pylist() == [live[i][0] for i in sorted(live)]
    assert images.column("fingerprint").to_pylist() == [live[i][1] for i in sorted(live)]
    regions = fstore.read_live_table(out, "regions", columns=["rank", "tag"])
    assert list(zip(regions.column("image_id").to_pylist(), regions.column("rank").to_pylist(),
                    regions.column("tag").to_pylist())) == [(i, r, live[i][0]) for i in sorted(live) for r in (0, 1)]
    for ref in fstore.live_shard_refs(out):  # a task reads its shard alone
        t = fstore.read_live_shard(ref, "images", ["tag"])
        assert sorted(t.column("image_id").to_pylist()) == [i for i, (s, _) in sorted(live.items()) if s == ref.shard]


def _plan_reference(records: list[listing.ImageRecord], events) -> tuple[list[str], list[str], int]:
    """What plan_shards decided before: from the one live dict."""
    live = reference_live(events)
    pending = [r.image_id for r in records if live.get(r.image_id, ("", None))[1] != r.fingerprint]
    deleted = sorted(set(live) - {r.image_id for r in records})
    return pending, deleted, len(records) - len(pending)


@pytest.mark.parametrize("seed", SEEDS)
def test_incremental_plan_equals_the_one_dict_plan(tmp_path: Path, seed: int) -> None:
    import numpy as np

    events = random_history(seed)
    out = str(tmp_path / "out")
    write_history(out, events, legacy_until=seed % 3, data=False)
    rng = np.random.default_rng(100 + seed)
    live = reference_live(events)
    # A new listing: most ids, some fingerprints changed, some new ids, some gone.
    ids = sorted(set(i for i in universe(200) if rng.random() < 0.85) | {f"new/{k}" for k in range(3)})
    fp = {i: live.get(i, ("", "v0"))[1] if rng.random() < 0.8 else "changed" for i in ids}
    records = [listing.ImageRecord(i, f"file:///x/{i}", fp[i]) for i in ids]
    markers = fstore.read_done_markers(out)
    plan = plan_shards(records, markers, shard_size=7)
    pending, deleted, skipped = _plan_reference(records, events)
    assert [r.image_id for s in plan.shards for r in s.records] == pending
    assert plan.deleted == deleted and plan.skipped == skipped
    assert plan.generation == max(e.generation for e in events) + 1
    with pytest.raises(ValueError, match="sorted"):
        plan_shards(records[::-1], markers, 7)


def test_markers_keep_ids_in_parquet_sorted_with_their_range(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    m = fstore.write_data_marker(out, "g00001-000000", 1, ["c", "a", "b"], ["3", "1", "2"], ["b"])
    on_disk = json.loads(Path(fstore.shard_paths(out, "g00001-000000")["done"]).read_text())
    assert "images" not in on_disk and on_disk["format"] == fstore.MARKER_FORMAT
    assert (on_disk["count"], on_disk["first"], on_disk["last"], on_disk["retry"]) == (3, "a", "c", ["b"])
    t = storage.read_parquet(fstore.shard_paths(out, "g00001-000000")["ids"])
    assert t.column("image_id").to_pylist() == ["a", "b", "c"]
    assert t.column("fingerprint").to_pylist() == ["1", "2", "3"]
    assert m["_ids_url"] == fstore.shard_paths(out, "g00001-000000")["ids"]
    d = fstore.write_deletions(out, 2, [f"x{i:07d}" for i in range(3 * fstore.IDS_ROW_GROUP // 2)])
    entry = fstore.marker_ids({**d})
    # A range read touches only the row groups whose statistics overlap it, and returns exactly the range.
    part = fstore.read_marker_ids(entry, None, "x0000010", "x0000019")
    assert part.column("image_id").to_pylist() == [f"x{i:07d}" for i in range(10, 20)]
    assert fstore.read_marker_ids(entry).num_rows == 3 * fstore.IDS_ROW_GROUP // 2


def test_a_half_written_marker_leaves_its_id_list_an_orphan(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    fstore.write_data_marker(out, "g00001-000000", 1, ["a"], ["1"], [])
    p = fstore.shard_paths(out, "g00001-000001")
    storage.write_parquet(p["ids"], pa.table({"image_id": ["b"], "fingerprint": ["1"]}))  # killed before its marker
    markers = fstore.read_done_markers(out)
    assert [m["shard"] for m in markers] == ["g00001-000000"]
    assert fstore.remove_orphans(out, markers) == 1 and not Path(p["ids"]).exists()


def test_s3_round_trip_of_a_mixed_format_history(s3_server: dict, s3_bucket: str) -> None:
    events = random_history(3, n_ids=60, generations=3)
    out = f"s3://{s3_bucket}/features"
    write_history(out, events, legacy_until=1, storage_options=s3_server)
    live = reference_live(events)
    assert _resolved(out, s3_server) == live_by_shard(live)
    images = fstore.read_live_table(out, "images", s3_server, ["tag"])
    assert images.column("image_id").to_pylist() == sorted(live)
    assert images.column("tag").to_pylist() == [live[i][0] for i in sorted(live)]
    assert fstore.count_live(out, s3_server) == len(live)
