"""The live rows of an extraction for other readers (duckdb, pyarrow, Ray Data): which file holds which live ids.

An incremental rerun writes a changed image's new row into a new shard and leaves the superseded row where it was
(shards are immutable once their done-marker exists), so reading every file under ``images/`` or ``regions/``
gives stale duplicates. The done-markers say which shard owns each image now; this module turns that into a file
list and a per-file id filter, so no second copy of the corpus (a compacted snapshot) is ever written.
"""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING, Any, Sequence

import pyarrow as pa

from pipeline.io.storage import StorageError, url_to_fs
from pipeline.store.feature_store import IMAGES_DIR, REGIONS_DIR, live_images, read_done_markers, shard_paths

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
        [(file URL, sorted live image ids in it)], in shard order; files holding no live row are left out.

    Raises:
        ValueError: an unknown kind.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    by_shard: dict[str, list[str]] = {}
    for image_id, (sid, _) in live_images(read_done_markers(features, storage_options)).items():
        by_shard.setdefault(sid, []).append(image_id)
    return [(shard_paths(features, sid)[kind], sorted(ids)) for sid, ids in sorted(by_shard.items())]


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
    """Exactly the live rows as a Ray Dataset: ``ray.data.read_parquet`` of the live files, each file's rows kept
    only for the ids it owns. Reading is lazy and distributed; the driver holds only the id lists.

    Args:
        features: extraction output URL (local, file://, s3://; read through the same fsspec options as the jobs).
        kind: "images" or "regions".
        storage_options: fsspec options.
        columns: columns to read (``image_id`` is always read); None = all.

    Returns:
        The dataset (rows in no particular order).

    Raises:
        StorageError: no completed shard under ``features``.
    """
    import pyarrow.compute as pc
    import pyarrow.fs as pafs
    import ray.data

    files = live_files(features, kind, storage_options)
    if not files:
        raise StorageError(f"no completed shards under {features}")
    fs, _ = url_to_fs(features, storage_options)
    paths = [url_to_fs(url, storage_options)[1] for url, _ in files]
    # Keyed by file name: Ray's "path" column may spell the directory differently (scheme, prefix), never the name.
    keep = {posixpath.basename(p): pa.array(ids, pa.string()) for p, (_, ids) in zip(paths, files)}

    def live_only(batch: pa.Table) -> pa.Table:
        names = batch["path"]
        parts = []
        for path in pc.unique(names).to_pylist():
            part = batch.filter(pc.equal(names, path))
            parts.append(part.filter(pc.is_in(part["image_id"], value_set=keep[posixpath.basename(path)])))
        return (pa.concat_tables(parts) if parts else batch.slice(0, 0)).drop_columns(["path"])

    cols = None if columns is None else list(dict.fromkeys(["image_id", *columns]))
    ds = ray.data.read_parquet(paths, filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)), include_paths=True)
    if cols is not None:
        ds = ds.select_columns([*cols, "path"])  # Ray pushes the projection into the Parquet reads
    return ds.map_batches(live_only, batch_format="pyarrow")
