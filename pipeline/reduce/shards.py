"""The reduce stage's view of an extraction: its done shards by name, and one shard's live rows read on their own
(so that a build task reads its own shard), without any structure over every image id."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io import storage
from pipeline.store import feature_store as fstore

# Interim: this module sits on read_done_markers' file layout (``_done/<shard>.json``, ``images`` as [[id, fp], ...],
# ``retry``, kind ``deleted``) until the extraction's live set offers a per-shard reader (issue 13, item 3).


def done_shards(features: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Names of the extraction's done-markers, sorted (= by generation), data shards and deletions alike.

    Only names are listed: the markers (with their id lists) are read by the task that needs them.
    """
    fs, root = storage.url_to_fs(features, storage_options)
    done_dir = posixpath.join(root, fstore.DONE_DIR)
    storage.fresh(fs, done_dir)
    if not fs.exists(done_dir):
        return []
    names = [posixpath.basename(p)[:-len(".json")] for p in fs.ls(done_dir, detail=False) if p.endswith(".json")]
    return sorted(n for n in names if fstore._SHARD_RE.match(n))


def is_data_shard(name: str) -> bool:
    """Whether a done-marker name is a data shard (has tables), not a deletion record."""
    return not name.endswith("-deleted")


def _marker(features: str, name: str, so: dict[str, Any] | None) -> dict[str, Any] | None:
    """One done-marker, or None when it is half-written (interrupted: the shard is not done)."""
    try:
        m = json.loads(storage.read_bytes(fstore.shard_paths(features, name)["done"], so))
    except (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError):
        return None
    return m if isinstance(m, dict) and m.get("shard") == name else None


def live_ids(features: str, name: str, later: Sequence[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """The ids whose current row is in shard ``name``: its ids not marked for retry and not named by any later
    marker (a later shard re-extracted them, marked them for retry, or a later deletion removed them), which is
    exactly ``feature_store.live_images``' rule, evaluated for one shard.

    Args:
        features: extraction URL.
        name: the shard.
        later: names of the markers after it (sorted).
        storage_options: fsspec options.

    Returns:
        The live ids (memory: this shard's ids, and one later marker at a time).
    """
    m = _marker(features, name, storage_options)
    if m is None:
        return []
    retry = set(m.get("retry", ()))
    mine = {image_id for image_id, _ in m["images"] if image_id not in retry}
    for other in later:
        o = _marker(features, other, storage_options)
        if o is None or not mine:
            continue
        for item in o["images"]:
            mine.discard(item if o.get("kind") == "deleted" else item[0])
    return sorted(mine)


def read_live_shard(features: str, name: str, later: Sequence[str], columns: dict[str, Sequence[str] | None],
                    storage_options: dict[str, Any] | None = None) -> dict[str, pa.Table]:
    """One shard's live rows, per kind (as ``feature_store.iter_live_shards`` yields them for that shard).

    Args:
        features: extraction URL.
        name: the shard.
        later: names of the markers after it.
        columns: per kind ("images", "regions") the columns to read (``image_id`` always).
        storage_options: fsspec options.

    Returns:
        kind -> the shard's live rows.
    """
    keep = pa.array(live_ids(features, name, later, storage_options), pa.string())
    out = {}
    for kind, cols in columns.items():
        cols = None if cols is None else list(dict.fromkeys(["image_id", *cols]))
        t = storage.read_parquet(fstore.shard_paths(features, name)[kind], storage_options, cols)
        out[kind] = t.filter(pc.is_in(t.column("image_id"), value_set=keep))
    return out
