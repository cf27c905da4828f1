"""The live-rows reader (pipeline/store/live.py): after an incremental rerun that superseded rows, the file list and
per-file ids (and the Ray Dataset built on them) give exactly the rows feature_store.read_live_table gives."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.config import SAMPLE_DATA, ExtractConfig
from pipeline.extract import driver
from pipeline.extract.runners import LocalRunner
from pipeline.io.storage import StorageError, read_parquet
from pipeline.store import feature_store as fstore
from pipeline.store.live import live_files, live_keys, to_ray_dataset

# The columns compared: plain values (joins here do not carry list columns), enough to tell rows apart.
COLUMNS = {"images": ["image_id", "fingerprint", "n_regions"], "regions": ["image_id", "rank", "score"]}
SORT = {"images": ["image_id"], "regions": ["image_id", "rank"]}
CHANGED, DELETED = "watch/image_0002.jpg", "Leopards/image_0003.jpg"


def _sorted(t: pa.Table, kind: str) -> dict[str, list]:
    """The compared columns' values in key order (values only: nullability flags differ between readers)."""
    return t.select(COLUMNS[kind]).sort_by([(k, "ascending") for k in SORT[kind]]).to_pydict()


def _expected(features: str, kind: str) -> dict[str, list]:
    return _sorted(fstore.read_live_table(features, kind, columns=COLUMNS[kind]), kind)


@pytest.fixture(scope="module")
def rerun(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An extraction of 6 images in shards of 4, then an incremental rerun after one image changed and one was
    deleted: the first run's shards still hold the changed image's old rows and the deleted image's rows."""
    src = tmp_path_factory.mktemp("live_images")
    for cls in ("Leopards", "watch"):
        (src / cls).mkdir()
        for f in sorted((SAMPLE_DATA / cls).glob("*.jpg"))[:3]:
            shutil.copy(f, src / cls / f.name)
    out = str(tmp_path_factory.mktemp("live_features") / "features")
    cfg = ExtractConfig(input=str(src), output=out, max_side=64, regions=3, shard_size=4, batch_size=4)
    driver.run(cfg, LocalRunner())
    (src / CHANGED).write_bytes((SAMPLE_DATA / "watch" / "image_0009.jpg").read_bytes())
    (src / DELETED).unlink()
    driver.run(cfg, LocalRunner())
    return out


def _read(url: str, kind: str, ids: list[str] | None = None) -> pa.Table:
    t = read_parquet(url, None, COLUMNS[kind])
    return t if ids is None else t.filter(pc.is_in(t["image_id"], value_set=pa.array(ids, pa.string())))


def test_the_files_hold_superseded_rows(rerun: str) -> None:
    ids = pa.concat_tables(_read(str(p), "images") for p in sorted(Path(rerun, "images").glob("*.parquet")))
    ids = ids["image_id"].to_pylist()
    assert ids.count(CHANGED) == 2 and DELETED in ids  # what a plain reader of every file sees: stale rows


@pytest.mark.parametrize("kind", ["images", "regions"])
def test_live_files_and_their_ids_give_exactly_the_live_rows(rerun: str, kind: str) -> None:
    files = live_files(rerun, kind)
    assert [Path(url).parent.name for url, _ in files] == [kind] * 3  # both first-run shards hold live rows still
    got = pa.concat_tables(_read(url, kind, ids) for url, ids in files)
    assert _sorted(got, kind) == _expected(rerun, kind)
    assert got["image_id"].to_pylist().count(CHANGED) == (1 if kind == "images" else 3)
    assert DELETED not in got["image_id"].to_pylist()


@pytest.mark.parametrize("kind", ["images", "regions"])
def test_live_keys_joined_like_the_readme_duckdb_query(rerun: str, kind: str) -> None:
    # README: read_parquet(files, filename = true) JOIN keys ON (filename, image_id); the same inner join in pyarrow.
    keys = live_keys(rerun, kind)
    assert keys.num_rows == len(set(zip(keys["file"].to_pylist(), keys["image_id"].to_pylist())))
    rows = pa.concat_tables(t.append_column("filename", pa.array([f] * t.num_rows, pa.string()))
                            for f in keys["file"].unique().to_pylist() for t in [_read(f, kind)])
    joined = rows.join(keys, keys=["filename", "image_id"], right_keys=["file", "image_id"], join_type="inner")
    assert _sorted(joined, kind) == _expected(rerun, kind)


def test_an_unknown_kind_and_an_empty_output(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        live_files(str(tmp_path), "pictures")
    assert live_files(str(tmp_path), "images") == [] and live_keys(str(tmp_path)).num_rows == 0
    with pytest.raises(StorageError):
        to_ray_dataset(str(tmp_path), "images")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["images", "regions"])
def test_the_ray_dataset_gives_exactly_the_live_rows(rerun: str, kind: str, ray_local: str) -> None:
    ds = to_ray_dataset(rerun, kind, columns=COLUMNS[kind])
    got = pa.Table.from_pylist(ds.take_all())
    assert sorted(got.column_names) == sorted(COLUMNS[kind])  # Ray's path column is dropped
    assert _sorted(got, kind) == _expected(rerun, kind)
