"""The live rows of an extraction for other readers (duckdb, pyarrow, Ray Data): which file holds which live ids.

An incremental rerun writes a changed image's new row into a new shard and leaves the superseded row where it was
(shards are immutable once their done-marker exists), so reading every file under ``images/`` or ``regions/``
gives stale duplicates. The done-markers say which shard owns each image now; this module turns that into a file
list and a per-file id filter (resolved shard by shard, feature_store.iter_live_ids), or a Ray Dataset whose read
tasks each resolve one shard (feature_store.live_shard_refs / read_live_shard). Rows superseded in bulk are
rewritten away by pipeline.store.compact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import pyarrow as pa

from pipeline.io.storage import StorageError
from pipeline.store.feature_store import IMAGES_DIR, REGIONS_DIR, iter_live_ids, live_shard_refs, read_live_shard

if TYPE_CHECKING:
    import ray.data

KINDS = (IMAGES_DIR, REGIONS_DIR)


def live_files(features: str, kind: str = IMAGES_DIR,
               storage_options: dict[str, Any] | None = None) -> list[tuple[str, list[str]]]:
    """The files holding live rows of one kind, each with the image ids whose rows in it are live.

    Args:
        features: extraction output URL.
        kind: "images" (one row per image) or "regions" (one row per region of an image).
        storage_options: fsspec options.

    Returns:
        [(file URL, sorted live image ids in it)], in shard order; files holding no live row are left out. The
        result names every live id (O(images)); it is built shard by shard, with no other structure over all ids.

    Raises:
        ValueError: an unknown kind.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    files = [(ref.shard, ref.path(kind), t.column("image_id").to_pylist())
             for ref, t in iter_live_ids(live_shard_refs(features, storage_options), storage_options) if t.num_rows]
    return [(url, ids) for _, url, ids in sorted(files)]


def live_keys(features: str, kind: str = IMAGES_DIR, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """The live (file, image_id) pairs as a table, to join against rows read with their file name (duckdb's
    ``read_parquet(files, filename = true)``): a row is live iff its pair is here.

    Args:
        features: extraction output URL.
        kind: "images" or "regions".
        storage_options: fsspec options.

    Returns:
        A table with string columns ``file`` (the URL as ``live_files`` gives it) and ``image_id``.
    """
    files = live_files(features, kind, storage_options)
    return pa.table({"file": pa.array([url for url, ids in files for _ in ids], pa.string()),
                     "image_id": pa.array([i for _, ids in files for i in ids], pa.string())})


def to_ray_dataset(features: str, kind: str = IMAGES_DIR, storage_options: dict[str, Any] | None = None,
                   columns: Sequence[str] | None = None) -> ray.data.Dataset:
    """Exactly the live rows as a Ray Dataset: one read task per done shard, each resolving that shard's live ids
    and reading its file (``feature_store.read_live_shard``). Reading is lazy and distributed; the driver holds
    only the refs (O(shards)), a task one shard.

    Args:
        features: extraction output URL (local, file://, s3://; read through the same fsspec options as the jobs).
        kind: "images" or "regions".
        storage_options: fsspec options.
        columns: columns to read (``image_id`` is always read); None = all.

    Returns:
        The dataset (rows in no particular order).

    Raises:
        StorageError: no completed shard under ``features``; ValueError: an unknown kind.
    """
    import ray.data

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    refs = live_shard_refs(features, storage_options)
    if not refs:
        raise StorageError(f"no completed shards under {features}")

    def read(batch: dict[str, Any]) -> pa.Table:
        # One read task per shard resolves that shard's live ids itself: the driver ships only the refs.
        return pa.concat_tables([read_live_shard(ref, kind, columns, storage_options) for ref in batch["item"]])

    ds = ray.data.from_items(refs, override_num_blocks=len(refs))
    return ds.map_batches(read, batch_size=1, batch_format="numpy")
