"""Every Parquet schema of the project, defined once; writers cast to these, readers get numpy without per-row work."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pyarrow as pa

# Global descriptors computed in the same forward pass (paper 2.4 / 2.5 and the classic baselines).
GLOBAL_KINDS = ("global", "spoc", "mac", "rmac", "gem", "crow")
VECTOR_COLUMNS = GLOBAL_KINDS + ("local",)


def _vec(dim: int, float16: bool) -> pa.DataType:
    """A fixed-size list of floats: one contiguous buffer per column, read back with one reshape."""
    return pa.list_(pa.float16() if float16 else pa.float32(), dim)


def images_schema(dims: Mapping[str, int], float16: bool = False) -> pa.Schema:
    """Schema of ``images/*.parquet``: one row per input image, ok or not.

    Args:
        dims: vector dimension of each column in VECTOR_COLUMNS.
        float16: store vectors as float16.

    Returns:
        The Arrow schema.
    """
    fields = [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("n_regions", pa.int32()),
    ]
    fields += [pa.field(name, _vec(dims[name], float16)) for name in VECTOR_COLUMNS]
    fields += [pa.field("model", pa.string(), nullable=False), pa.field("config_hash", pa.string(), nullable=False)]
    return pa.schema(fields)


def regions_schema(dim: int, float16: bool = False) -> pa.Schema:
    """Schema of ``regions/*.parquet``: one row per kept region, ``rank`` 0 = highest score.

    Args:
        dim: region descriptor dimension.
        float16: store descriptors as float16.

    Returns:
        The Arrow schema.
    """
    return pa.schema([
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("box", pa.list_(pa.float32(), 4), nullable=False),  # x1, y1, x2, y2 in original-image pixels
        pa.field("score", pa.float32(), nullable=False),
        pa.field("descriptor", _vec(dim, float16), nullable=False),
    ])


def marker_ids_schema() -> pa.Schema:
    """Schema of ``ids/<shard>.parquet``: the id list of one done-marker, written before the marker, sorted by
    ``image_id`` (a data shard's images with their change fingerprints; a deletion's ids with a null fingerprint).

    Returns:
        The Arrow schema.
    """
    return pa.schema([
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string()),
    ])


def search_results_schema() -> pa.Schema:
    """Schema of batch search results (``jobs/search.py --queries ... --output``): one row per (query, rank).

    ``query_id`` is the query's path relative to the queries folder (or its manifest id), ``query_box`` the region
    searched with (null: the whole image), ``rank`` 1 = best, ``matched_box`` the hit's region that matched best
    (null when unknown); boxes are x1, y1, x2, y2 in the respective image's original pixels.
    """
    box = pa.list_(pa.float32(), 4)
    return pa.schema([
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("query_box", box),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("matched_box", box),
    ])


def to_table(rows: Mapping[str, list], schema: pa.Schema) -> pa.Table:
    """Build a table from column lists and cast it to ``schema`` (vectors given as 2-D numpy arrays or lists).

    Args:
        rows: column name -> values; a vector column may be a (n, d) numpy array or a list of arrays/None.
        schema: the target schema.

    Returns:
        A table with exactly ``schema``.
    """
    arrays = []
    for f in schema:
        vals = rows[f.name]
        if pa.types.is_fixed_size_list(f.type):
            arrays.append(vectors_to_arrow(vals, f.type))
        else:
            arrays.append(pa.array(vals, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def vectors_to_arrow(vals: object, typ: pa.FixedSizeListType) -> pa.Array:
    """Vectors (a 2-D array, or a list of 1-D arrays / None for missing) -> a FixedSizeListArray, no per-value work."""
    d = typ.list_size
    np_dtype = np.float16 if typ.value_type == pa.float16() else np.float32
    if isinstance(vals, np.ndarray):
        # Strict shape: reshape(-1, d) alone would silently turn (2, 6) into three rows of 4.
        if not (vals.ndim == 2 and vals.shape[1] == d) and vals.size != 0:
            raise ValueError(f"expected vectors of shape (n, {d}), got {vals.shape}")
        mat = np.ascontiguousarray(vals, dtype=np_dtype).reshape(-1, d)
        return pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1)), d)
    items = list(vals)  # type: ignore[arg-type]
    mask = np.array([v is None for v in items], dtype=bool)
    mat = np.zeros((len(items), d), dtype=np_dtype)
    for i, v in enumerate(items):
        if v is not None:
            if np.shape(v) != (d,):  # no silent broadcasting of a scalar or a length-1 vector
                raise ValueError(f"expected a vector of length {d}, got shape {np.shape(v)}")
            mat[i] = v
    arr = pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1)), d, mask=pa.array(mask) if mask.any() else None)
    return arr


def column_to_numpy(table: pa.Table, column: str, dtype: type = np.float32) -> np.ndarray:
    """A fixed-size-list column with no nulls -> a (n, d) numpy array, with one buffer copy at most.

    Args:
        table: the table (filter out rows with null vectors first).
        column: the vector column.
        dtype: output dtype.

    Returns:
        (n, d) array.

    Raises:
        ValueError: when the column holds nulls.
    """
    col = table.column(column)
    if col.null_count:
        raise ValueError(f"column {column!r} has {col.null_count} null vectors; filter status == 'ok' first")
    d = col.type.list_size
    if table.num_rows == 0:
        return np.zeros((0, d), dtype=dtype)
    arr = col.combine_chunks()
    flat = arr.flatten()  # respects slice offsets
    return flat.to_numpy(zero_copy_only=False).reshape(-1, d).astype(dtype, copy=False)
