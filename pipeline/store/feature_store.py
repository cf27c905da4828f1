"""The feature store an extraction writes: shard layout, done-markers (data first, marker last), the live set."""

from __future__ import annotations

import json
import posixpath
import re
import time
from typing import Any, Iterator, Sequence

import pyarrow as pa

from pipeline.io.storage import StorageError, fresh, join, read_parquet, url_to_fs, write_json

# Output layout under an extraction URL.
IMAGES_DIR = "images"
REGIONS_DIR = "regions"
DONE_DIR = "_done"
MANIFEST = "manifest.json"
CONFIG = "config.json"
_SHARD_RE = re.compile(r"^g(\d{5})-(\d{6}|deleted)$")


def shard_id(generation: int, index: int) -> str:
    """Shard name: run generation and index, so later generations sort (and win) after earlier ones."""
    return f"g{generation:05d}-{index:06d}"


def shard_paths(output: str, sid: str) -> dict[str, str]:
    """The files of one shard: images and regions data, and the done-marker written after them."""
    return {
        "images": join(output, IMAGES_DIR, f"{sid}.parquet"),
        "regions": join(output, REGIONS_DIR, f"{sid}.parquet"),
        "done": join(output, DONE_DIR, f"{sid}.json"),
    }


def write_deletions(output: str, generation: int, image_ids: Sequence[str],
                    storage_options: dict[str, Any] | None = None) -> None:
    """Record that a run's generation removed these ids from the live set (a done-marker of kind ``deleted``)."""
    sid = f"g{generation:05d}-deleted"
    write_json(shard_paths(output, sid)["done"],
               {"shard": sid, "generation": generation, "kind": "deleted", "images": list(image_ids)}, storage_options)


def read_done_markers(output: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """All complete done-markers under an output, sorted by shard id (a half-written marker is not done).

    Args:
        output: extraction output URL.
        storage_options: fsspec options.

    Returns:
        Marker dicts (``shard``, ``generation``, ``images``: [[id, fingerprint], ...], ``retry``: ids to redo, ...).
    """
    fs, root = url_to_fs(output, storage_options)
    done_dir = posixpath.join(root, DONE_DIR)
    fresh(fs, done_dir)
    if not fs.exists(done_dir):
        return []
    markers = []
    paths = sorted(p for p in fs.ls(done_dir, detail=False) if p.endswith(".json"))
    contents = fs.cat(paths) if paths else {}
    for p in paths:
        try:
            m = json.loads(contents[p])
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # interrupted while writing the marker: the shard is not done
        if isinstance(m, dict) and _SHARD_RE.match(str(m.get("shard", ""))):
            markers.append(m)
    markers.sort(key=lambda m: m["shard"])
    return markers


def live_images(markers: Sequence[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """Resolve which shard holds each image's current row: the latest generation wins; deletions remove ids.

    Args:
        markers: from read_done_markers (sorted by shard id, i.e. by generation).

    Returns:
        image_id -> (shard id, fingerprint). Ids marked for retry (transient read errors) are not live.
    """
    live: dict[str, tuple[str, str]] = {}
    for m in markers:
        if m.get("kind") == "deleted":
            for image_id in m["images"]:
                live.pop(image_id, None)
            continue
        retry = set(m.get("retry", ()))
        for image_id, fp in m["images"]:
            if image_id in retry:
                live.pop(image_id, None)
            else:
                live[image_id] = (m["shard"], fp)
    return live


def next_generation(markers: Sequence[dict[str, Any]]) -> int:
    """The generation number of a new run: one past the largest done."""
    return 1 + max((int(m["generation"]) for m in markers), default=0)


def remove_orphans(output: str, markers: Sequence[dict[str, Any]], storage_options: dict[str, Any] | None = None) -> int:
    """Delete data files of shards that never got a done-marker (a crashed run's leftovers), so readers and
    listings stay clean. Only call this when no other extraction is writing to ``output``.

    Returns:
        Number of files removed.
    """
    fs, root = url_to_fs(output, storage_options)
    done = {m["shard"] for m in markers}
    removed = 0
    for sub in (IMAGES_DIR, REGIONS_DIR):
        d = posixpath.join(root, sub)
        fresh(fs, d)
        if not fs.exists(d):
            continue
        for p in fs.ls(d, detail=False):
            sid = posixpath.basename(p).rsplit(".", 1)[0]
            if sid not in done:
                fs.rm_file(p)
                removed += 1
    return removed


def iter_live_shards(output: str, storage_options: dict[str, Any] | None = None,
                     columns: dict[str, Sequence[str] | None] | None = None) -> Iterator[dict[str, pa.Table]]:
    """Stream the live rows of an extraction, one done shard at a time (the driver never holds the whole corpus).

    Args:
        output: extraction output URL.
        storage_options: fsspec options.
        columns: per kind ("images", "regions") the columns to read (``image_id`` is always read); the kinds named
            are the kinds read. Default: all columns of both.

    Yields:
        Per shard, kind -> table filtered to the rows whose image the shard currently owns.
    """
    import pyarrow.compute as pc

    columns = columns or {IMAGES_DIR: None, REGIONS_DIR: None}
    markers = read_done_markers(output, storage_options)
    by_shard: dict[str, list[str]] = {}
    for image_id, (sid, _) in live_images(markers).items():
        by_shard.setdefault(sid, []).append(image_id)
    for m in markers:
        sid = m["shard"]
        if sid not in by_shard:
            continue
        keep = pa.array(by_shard[sid], type=pa.string())
        out = {}
        for kind, cols in columns.items():
            cols = None if cols is None else list(dict.fromkeys(["image_id", *cols]))
            t = read_parquet(shard_paths(output, sid)[kind], storage_options, cols)
            out[kind] = t.filter(pc.is_in(t.column("image_id"), value_set=keep))
        yield out


def iter_live_tables(output: str, kind: str, storage_options: dict[str, Any] | None = None,
                     columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
    """Stream the live rows of one kind ("images" or "regions"), one done shard at a time."""
    for shard in iter_live_shards(output, storage_options, {kind: columns}):
        yield shard[kind]


def read_live_table(output: str, kind: str, storage_options: dict[str, Any] | None = None,
                    columns: Sequence[str] | None = None) -> pa.Table:
    """All live rows of an extraction as one table, sorted by image_id (and rank for regions)."""
    tables = list(iter_live_tables(output, kind, storage_options, columns))
    if not tables:
        raise StorageError(f"no completed shards under {output}")
    t = pa.concat_tables(tables)
    keys = [("image_id", "ascending")] + ([("rank", "ascending")] if kind == REGIONS_DIR and "rank" in t.column_names else [])
    return t.sort_by(keys)


def now() -> float:
    """Wall-clock seconds (one place to stub in tests)."""
    return time.time()
