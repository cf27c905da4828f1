"""Tests for pipeline.schema: the Parquet schemas, building tables from numpy, and reading vectors back without per-row
Python."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.schema import (
    GLOBAL_KINDS,
    VECTOR_COLUMNS,
    column_to_numpy,
    images_schema,
    regions_schema,
    to_table,
    vectors_to_arrow,
)

DIMS = {k: 8 for k in VECTOR_COLUMNS} | {"global": 5, "local": 6}


def _roundtrip(table: pa.Table) -> pa.Table:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return pq.read_table(io.BytesIO(buf.getvalue()))


def _images_rows(n: int, rng: np.random.Generator, missing: set[int] = frozenset()) -> dict[str, list]:
    rows: dict[str, list] = {
        "image_id": [f"img{i}" for i in range(n)], "uri": [f"file:///x/img{i}" for i in range(n)],
        "fingerprint": ["1-2"] * n, "width": [10 + i for i in range(n)], "height": [20] * n,
        "status": ["ok" if i not in missing else "truncated" for i in range(n)],
        "error": [None if i not in missing else "cut" for i in range(n)], "n_regions": [3] * n,
        "model": ["m"] * n, "config_hash": ["abc"] * n,
    }
    for k in VECTOR_COLUMNS:
        rows[k] = [None if i in missing else rng.standard_normal(DIMS[k]).astype(np.float32) for i in range(n)]
    return rows


def test_images_schema_has_the_required_columns_as_fixed_size_lists():
    s = images_schema(DIMS)
    for name in ("image_id", "uri", "fingerprint", "width", "height", "status", "error", "n_regions", "model",
                 "config_hash"):
        assert name in s.names
    assert {"global", "crow", "local"} <= set(s.names) and set(GLOBAL_KINDS) <= set(s.names)
    for k in VECTOR_COLUMNS:
        assert pa.types.is_fixed_size_list(s.field(k).type)
        assert s.field(k).type.value_type == pa.float32()
        assert s.field(k).type.list_size == DIMS[k]
    assert not s.field("image_id").nullable and not s.field("status").nullable and s.field("error").nullable
    assert images_schema(DIMS, float16=True).field("crow").type.value_type == pa.float16()


def test_regions_schema():
    s = regions_schema(6)
    assert s.names == ["image_id", "rank", "box", "score", "descriptor"]
    assert s.field("box").type == pa.list_(pa.float32(), 4)
    assert s.field("descriptor").type.list_size == 6 and s.field("rank").type == pa.int32()
    assert regions_schema(6, float16=True).field("descriptor").type.value_type == pa.float16()
    assert regions_schema(6, float16=True).field("box").type.value_type == pa.float32()  # boxes stay exact


@pytest.mark.parametrize("float16", [False, True])
def test_images_table_roundtrips_through_parquet_with_nulls_for_failed_images(float16):
    rng = np.random.default_rng(0)
    rows = _images_rows(5, rng, missing={1, 3})
    t = _roundtrip(to_table(rows, images_schema(DIMS, float16)))
    assert t.schema == images_schema(DIMS, float16)
    assert t.column("crow").null_count == 2
    with pytest.raises(ValueError, match="null"):
        column_to_numpy(t, "crow")
    ok = t.filter(pa.compute.equal(t.column("status"), "ok"))
    for k in VECTOR_COLUMNS:
        got = column_to_numpy(ok, k)
        want = np.stack([rows[k][i] for i in (0, 2, 4)])
        assert got.shape == (3, DIMS[k]) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-3 if float16 else 0, atol=1e-3 if float16 else 0)


def test_regions_table_from_2d_arrays():
    rng = np.random.default_rng(1)
    desc = rng.standard_normal((7, 6)).astype(np.float32)
    boxes = rng.uniform(0, 100, (7, 4)).astype(np.float32)
    rows = {"image_id": ["a"] * 3 + ["b"] * 4, "rank": [0, 1, 2, 0, 1, 2, 3], "box": boxes,
            "score": rng.uniform(size=7).tolist(), "descriptor": desc}
    t = _roundtrip(to_table(rows, regions_schema(6)))
    np.testing.assert_array_equal(column_to_numpy(t, "descriptor"), desc)
    np.testing.assert_array_equal(column_to_numpy(t, "box"), boxes)
    empty = to_table({"image_id": [], "rank": [], "box": np.zeros((0, 4)), "score": [], "descriptor": np.zeros((0, 6))},
                     regions_schema(6))
    assert empty.num_rows == 0 and column_to_numpy(empty, "descriptor").shape == (0, 6)


def test_vectors_of_the_wrong_dimension_are_rejected():
    typ = pa.list_(pa.float32(), 4)
    with pytest.raises(ValueError):
        vectors_to_arrow(np.zeros((2, 6), np.float32), typ)  # 12 values: would silently become 3 rows of 4
    with pytest.raises(ValueError):
        vectors_to_arrow([np.zeros(4), np.zeros(1)], typ)  # would silently broadcast one value
    with pytest.raises(ValueError):
        vectors_to_arrow([np.zeros(5)], typ)
    assert len(vectors_to_arrow([np.ones(4), None], typ)) == 2


def test_column_to_numpy_handles_chunks_and_slices():
    rng = np.random.default_rng(2)
    mats = [rng.standard_normal((n, 16)).astype(np.float32) for n in (5, 0, 7)]
    schema = pa.schema([pa.field("v", pa.list_(pa.float32(), 16))])
    t = pa.concat_tables([pa.Table.from_arrays([vectors_to_arrow(m, schema.field("v").type)], schema=schema)
                          for m in mats])
    assert t.column("v").num_chunks == 3
    full = np.concatenate(mats)
    np.testing.assert_array_equal(column_to_numpy(t, "v"), full)
    sliced = t.slice(3, 6)  # offsets inside the first and second chunks
    np.testing.assert_array_equal(column_to_numpy(sliced, "v"), full[3:9])
    assert column_to_numpy(t, "v", dtype=np.float64).dtype == np.float64


def test_column_to_numpy_is_fast_on_many_rows():
    """No per-row Python: 100k x 128 read back in well under a second (to_pylist-based code takes many seconds)."""
    import time

    mat = np.random.default_rng(3).standard_normal((100_000, 128)).astype(np.float32)
    t = pa.table({"v": vectors_to_arrow(mat, pa.list_(pa.float32(), 128))})
    t0 = time.perf_counter()
    out = column_to_numpy(t, "v")
    assert time.perf_counter() - t0 < 1.0
    np.testing.assert_array_equal(out, mat)
