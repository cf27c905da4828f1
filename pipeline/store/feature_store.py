"""The feature store an extraction writes: shard layout, done-markers (data first, marker last), the live set.

The live set (which shard holds each image's current row) is resolved per shard, never as one structure over every
id: a marker's id list is a sorted Parquet file (``ids/<shard>.parquet``, written before the marker) and the marker
records its first and last id, so a shard's live rows are its ids minus the ids of the later markers whose id range
overlaps its own (an anti-join over a few small files; see ``live_shard_refs``). Outputs written with the earlier JSON
markers (ids inline) are read the same way.
"""

from __future__ import annotations

import functools
import heapq
import io
import json
import logging
import os
import posixpath
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.storage import (StorageError, fresh, is_local, join, read_json, read_parquet, url_to_fs,
                                 write_atomic, write_bytes, write_json)
from pipeline.schema import marker_ids_schema

log = logging.getLogger(__name__)

# Output layout under an extraction URL.
IMAGES_DIR = "images"
REGIONS_DIR = "regions"
IDS_DIR = "ids"  # a marker's id list (schema.marker_ids_schema), written before the marker
DONE_DIR = "_done"
MARKER_FORMAT = 2  # 2: ids in ids/<shard>.parquet; markers without "format" (1) list their ids inline in the JSON
IDS_ROW_GROUP = 16_384  # rows per row group of an id list: a range read of a long deletion list skips the others
_SHARD_ORDER_CACHE = 64  # id-list row groups iter_live_shards keeps at most (16k ids each at most)
MANIFEST = "manifest.json"
CONFIG = "config.json"
LEASE = "_LEASE.json"  # held by the one extraction writing the output (see acquire_lease)
_SHARD_RE = re.compile(r"^g(\d{5})-(\d{6}|deleted)$")


def shard_id(generation: int, index: int) -> str:
    """Shard name: run generation and index, so later generations sort (and win) after earlier ones."""
    return f"g{generation:05d}-{index:06d}"


def shard_paths(output: str, sid: str) -> dict[str, str]:
    """The files of one shard: images and regions data, and the done-marker written after them."""
    return {
        "images": join(output, IMAGES_DIR, f"{sid}.parquet"),
        "regions": join(output, REGIONS_DIR, f"{sid}.parquet"),
        "ids": join(output, IDS_DIR, f"{sid}.parquet"),
        "done": join(output, DONE_DIR, f"{sid}.json"),
    }


def _write_ids(url: str, ids: Sequence[str] | pa.Array | pa.ChunkedArray,
               fingerprints: Sequence[str | None] | pa.Array | pa.ChunkedArray | None,
               storage_options: dict[str, Any] | None) -> pa.Table:
    """Write an id list sorted by image_id (row groups of IDS_ROW_GROUP); returns the sorted table."""
    def arrow(values: Any) -> pa.Array:
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        return values.cast(pa.string()) if isinstance(values, pa.Array) else pa.array(values, pa.string())

    fps = pa.nulls(len(ids), pa.string()) if fingerprints is None else fingerprints
    t = pa.table({"image_id": arrow(ids), "fingerprint": arrow(fps)}, schema=marker_ids_schema())
    t = t.sort_by("image_id")
    buf = io.BytesIO()
    pq.write_table(t, buf, compression="zstd", row_group_size=IDS_ROW_GROUP)
    write_bytes(url, buf.getvalue(), storage_options)
    return t


def _range_fields(t: pa.Table) -> dict[str, Any]:
    """The marker fields that summarise a sorted id list: count, first and last id."""
    ids = t.column("image_id")
    return {"count": t.num_rows, "first": ids[0].as_py() if t.num_rows else None,
            "last": ids[-1].as_py() if t.num_rows else None}


def write_data_marker(output: str, sid: str, generation: int, ids: Sequence[str], fingerprints: Sequence[str],
                      retry: Sequence[str], storage_options: dict[str, Any] | None = None,
                      **extra: Any) -> dict[str, Any]:
    """Mark a data shard done: its id list (Parquet) first, then the JSON marker. Call after the shard's data files
    are written: a shard is done exactly when its marker exists.

    Args:
        output: extraction output URL.
        sid: the shard id.
        generation: the run generation that wrote it.
        ids, fingerprints: the shard's images (one row each in ``images/<sid>.parquet``).
        retry: ids whose rows failed transiently (not live; redone by the next run). Kept inline: at most a shard.
        storage_options: fsspec options.
        **extra: more marker fields (``stats``, ``finished``, ...).

    Returns:
        The marker written.
    """
    t = _write_ids(shard_paths(output, sid)["ids"], ids, fingerprints, storage_options)
    marker = {"shard": sid, "generation": generation, "kind": "data", "format": MARKER_FORMAT,
              **_range_fields(t), "retry": list(retry), **extra}
    return _write_marker(output, marker, storage_options)


def _write_marker(output: str, marker: dict[str, Any], storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Write a marker's JSON (last: the shard is done from here on); returns it as read_done_markers gives it."""
    paths = shard_paths(output, marker["shard"])
    write_json(paths["done"], marker, storage_options)
    return {**marker, "_url": paths["done"], "_ids_url": paths["ids"]}


def write_deletions(output: str, generation: int, image_ids: Sequence[str] | pa.Array,
                    storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record that a run's generation removed these ids from the live set (a done-marker of kind ``deleted``;
    its id list is Parquet, written first).

    Returns:
        The marker written.
    """
    sid = f"g{generation:05d}-deleted"
    t = _write_ids(shard_paths(output, sid)["ids"], image_ids, None, storage_options)
    marker = {"shard": sid, "generation": generation, "kind": "deleted", "format": MARKER_FORMAT, **_range_fields(t)}
    return _write_marker(output, marker, storage_options)


def read_done_markers(output: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """All complete done-markers under an output, sorted by shard id (a half-written marker is not done).

    Args:
        output: extraction output URL.
        storage_options: fsspec options.

    Returns:
        Marker dicts (``shard``, ``generation``, ``kind``, ``retry``: ids to redo, ``stats``, ...; format 2:
        ``count``, ``first``, ``last`` with the ids in ``ids/<shard>.parquet``; format 1: ``images``:
        [[id, fingerprint], ...] inline). Each also gets ``_url``, the marker's own URL (not stored). Memory: the
        markers' JSON, O(shards) for format 2.
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
            m["_url"] = join(output, DONE_DIR, posixpath.basename(p))
            m["_ids_url"] = shard_paths(output, m["shard"])["ids"]
            markers.append(m)
    markers.sort(key=lambda m: m["shard"])
    return markers


def live_images(markers: Sequence[dict[str, Any]],
                storage_options: dict[str, Any] | None = None) -> dict[str, tuple[str, str]]:
    """Resolve which shard holds each image's current row: the latest generation wins; deletions remove ids.

    The reference resolution: one dict over every id (O(corpus) memory). The jobs use the per-shard resolution
    (``live_shard_refs``, ``live_ids``, ``iter_live_ids``); this stays for tests and small outputs.

    Args:
        markers: from read_done_markers (sorted by shard id, i.e. by generation); format 2 markers' id lists are
            read from storage.
        storage_options: fsspec options (to read format 2 id lists).

    Returns:
        image_id -> (shard id, fingerprint). Ids marked for retry (transient read errors) are not live.
    """
    live: dict[str, tuple[str, str]] = {}
    for m in markers:
        t = _marker_table(m, storage_options)
        if m.get("kind") == "deleted":
            for image_id in t.column("image_id").to_pylist():
                live.pop(image_id, None)
            continue
        retry = set(m.get("retry", ()))
        for image_id, fp in zip(t.column("image_id").to_pylist(), t.column("fingerprint").to_pylist()):
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
    listings stay clean. Only call this holding the output's lease (``acquire_lease``): another extraction's shards
    in progress look exactly like a crashed run's.

    Returns:
        Number of files removed.
    """
    fs, root = url_to_fs(output, storage_options)
    done = {m["shard"] for m in markers}
    removed = 0
    for sub in (IMAGES_DIR, REGIONS_DIR, IDS_DIR):
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


# ---- the live set, shard by shard ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MarkerIds:
    """Where one done-marker's id list is and what range it spans (what a per-shard resolution needs to know).

    Attributes:
        shard: the marker's shard id (``g00001-000000``, ``g00002-deleted``); later shard ids win.
        kind: "data" or "deleted".
        count: ids in the list.
        first, last: smallest and largest id (None when empty).
        url: the Parquet id list (format 2) or the JSON marker holding the ids inline (format 1); None when the
            ids were given in memory (``inline``).
        retry: a data shard's ids that are not live in it (transient failures); at most a shard's size.
        inline: the id list itself, for markers given in memory without a URL (tests, format 1 dicts).
    """

    shard: str
    kind: str
    count: int
    first: str | None
    last: str | None
    url: str | None
    retry: tuple[str, ...] = ()
    inline: pa.Table | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class LiveShardRef:
    """One done data shard and what resolving its live rows reads, on its own (a distributed task gets one).

    Its live rows are its ids, less its ``retry`` ids, less every id of the ``later`` markers (later shard ids,
    data or deleted) whose id range overlaps its own: only those can hold a newer row or a deletion of one of its
    ids. Reading them holds this shard's id list plus the overlapping part of each later list, so a task's memory
    is bounded by the shard size times the number of later generations that rewrote its range, never by the corpus.

    Attributes:
        output: the extraction output URL.
        shard: the shard id.
        ids: this shard's id list.
        later: the later markers whose range overlaps this one's, in shard order.
    """

    output: str
    shard: str
    ids: MarkerIds
    later: tuple[MarkerIds, ...]

    def path(self, kind: str) -> str:
        """The URL of this shard's data file of ``kind`` ("images" or "regions")."""
        return shard_paths(self.output, self.shard)[kind]


def marker_ids(marker: dict[str, Any]) -> MarkerIds:
    """The id-list summary of a marker (from read_done_markers, or a format 1 dict given in memory)."""
    sid, kind = marker["shard"], marker.get("kind", "data")
    retry = tuple(marker.get("retry", ())) if kind == "data" else ()
    if marker.get("format", 1) >= 2:
        if "_ids_url" not in marker:
            raise ValueError(f"marker {sid} has no _ids_url: read it with read_done_markers")
        return MarkerIds(sid, kind, int(marker["count"]), marker["first"], marker["last"], marker["_ids_url"], retry)
    t = _inline_table(marker)
    ids = t.column("image_id")
    first = pc.min(ids).as_py() if len(ids) else None
    last = pc.max(ids).as_py() if len(ids) else None
    if "_url" in marker:
        return MarkerIds(sid, kind, len(ids), first, last, marker["_url"], retry)
    return MarkerIds(sid, kind, len(ids), first, last, None, retry, t)


def _inline_table(marker: dict[str, Any]) -> pa.Table:
    """A format 1 marker's inline ids as an id-list table (unsorted, as written)."""
    if marker.get("kind") == "deleted":
        return pa.table({"image_id": pa.array(marker["images"], pa.string()),
                         "fingerprint": pa.nulls(len(marker["images"]), pa.string())}, schema=marker_ids_schema())
    pairs = marker["images"]
    return pa.table({"image_id": pa.array([p[0] for p in pairs], pa.string()),
                     "fingerprint": pa.array([p[1] for p in pairs], pa.string())}, schema=marker_ids_schema())


def _marker_table(marker: dict[str, Any], storage_options: dict[str, Any] | None) -> pa.Table:
    """All ids of one marker (either format)."""
    return read_marker_ids(marker_ids(marker), storage_options)


@functools.lru_cache(maxsize=4)
def _json_ids(url: str, options: str) -> pa.Table:
    """A format 1 marker's ids, parsed once: every shard's resolution may read a long legacy deletion list, and a
    marker never changes once written (shard ids carry their generation). Only older outputs pay this memory."""
    return _inline_table(read_json(url, json.loads(options)))


def read_marker_ids(entry: MarkerIds, storage_options: dict[str, Any] | None = None, lo: str | None = None,
                    hi: str | None = None) -> pa.Table:
    """A marker's id list, optionally only the ids in ``[lo, hi]`` (format 2 reads only the row groups whose
    statistics overlap the range).

    Args:
        entry: the marker's id-list summary.
        storage_options: fsspec options.
        lo, hi: inclusive id range (None: unbounded).

    Returns:
        Table of schema.marker_ids_schema() (``image_id``, ``fingerprint``).
    """
    if entry.inline is not None:
        t = entry.inline
    elif entry.url is None or entry.count == 0:
        return marker_ids_schema().empty_table()
    elif entry.url.endswith(".json"):
        t = _json_ids(entry.url, json.dumps(storage_options or {}, sort_keys=True))
    else:
        fs, path = url_to_fs(entry.url, storage_options)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            groups = []
            for i in range(pf.num_row_groups):
                st = pf.metadata.row_group(i).column(0).statistics
                if st is not None and st.has_min_max and ((lo is not None and st.max < lo)
                                                          or (hi is not None and st.min > hi)):
                    continue  # no id of this group is in range
                groups.append(i)
            t = pf.read_row_groups(groups) if groups else marker_ids_schema().empty_table()
        t = t.cast(marker_ids_schema())
    if lo is not None or hi is not None:
        ids = t.column("image_id")
        mask = None
        if lo is not None:
            mask = pc.greater_equal(ids, lo)
        if hi is not None:
            m2 = pc.less_equal(ids, hi)
            mask = m2 if mask is None else pc.and_(mask, m2)
        t = t.filter(mask)
    return t


def live_shard_refs(output: str, storage_options: dict[str, Any] | None = None,
                    markers: Sequence[dict[str, Any]] | None = None) -> list[LiveShardRef]:
    """One ref per done data shard, each enough to resolve and read that shard's live rows alone
    (``live_ids``, ``read_live_shard``), e.g. in a distributed task.

    Which later markers can touch a shard is found from the markers' id ranges alone (a sweep over ranges sorted
    by first id): no id list is read here. Memory: O(markers + overlapping pairs), not O(images).

    Args:
        output: extraction output URL.
        storage_options: fsspec options.
        markers: the done-markers if already read (read_done_markers of ``output``).

    Returns:
        Refs in shard order (a shard whose rows are all superseded resolves to no live row).
    """
    if markers is None:
        markers = read_done_markers(output, storage_options)
    entries = [marker_ids(m) for m in sorted(markers, key=lambda m: m["shard"])]
    later: list[list[int]] = [[] for _ in entries]
    # Sweep by first id; ``active`` holds (last, index) of the ranges still open at the current first id.
    order = sorted((i for i, e in enumerate(entries) if e.count), key=lambda i: entries[i].first)  # type: ignore
    active: list[tuple[str, int]] = []
    for i in order:
        e = entries[i]
        while active and active[0][0] < e.first:  # type: ignore[operator]
            heapq.heappop(active)
        for _, j in active:  # every open range overlaps this one: the later of the two touches the earlier
            if j < i:
                later[j].append(i)
            else:
                later[i].append(j)
        heapq.heappush(active, (e.last, i))  # type: ignore[arg-type]
    return [LiveShardRef(output, e.shard, e, tuple(entries[j] for j in sorted(later[i])))
            for i, e in enumerate(entries) if e.kind == "data" and e.count]


def live_ids(ref: LiveShardRef, storage_options: dict[str, Any] | None = None,
             _cache: dict[tuple[str, int], tuple[str, Any]] | None = None) -> pa.Table:
    """The ids (and fingerprints) whose current row is in this shard.

    Memory: the shard's id list plus the in-range row groups of each overlapping later list (the later ids are
    probed against a hash of this shard's ids only).

    Args:
        ref: from live_shard_refs.
        storage_options: fsspec options.

    Returns:
        Table (``image_id``, ``fingerprint``) sorted by image_id.
    """
    own = read_marker_ids(ref.ids, storage_options)
    own_ids = own.column("image_id").combine_chunks()
    later = [pa.array(ref.ids.retry, pa.string())]
    for e in ref.later:
        later.extend(_later_ids(e, ref.ids.first, ref.ids.last, storage_options, _cache))
    gone = pa.concat_arrays(later)
    if len(gone) and len(own_ids):
        hit = np.zeros(len(own_ids), dtype=bool)
        hit[pc.index_in(gone, value_set=own_ids).drop_null().to_numpy()] = True
        if hit.any():
            own = own.filter(pa.array(~hit))
    return own.sort_by("image_id")


def _later_ids(e: MarkerIds, lo: str | None, hi: str | None, storage_options: dict[str, Any] | None,
               cache: dict[tuple[str, int], tuple[str, Any]] | None) -> list[pa.Array]:
    """The ids of a later marker that may fall in ``[lo, hi]`` (whole row groups when cached).

    ``cache`` (the sweep's, see iter_live_ids) maps (shard, row group) -> (its largest id, its ids), and
    (shard, -1) -> (largest id, row-group ranges) for a Parquet list; (shard, -2) holds a whole format 1 list.
    """
    if cache is None:
        return [read_marker_ids(e, storage_options, lo, hi).column("image_id").combine_chunks()]
    if e.inline is not None or e.url is None or e.url.endswith(".json"):
        key = (e.shard, -2)
        if key not in cache:
            cache[key] = (e.last or "", read_marker_ids(e, storage_options).column("image_id").combine_chunks())
        return [cache[key][1]]
    meta = (e.shard, -1)
    fs = path = None
    if meta not in cache:
        fs, path = url_to_fs(e.url, storage_options)
        with fs.open(path, "rb") as f:
            md = pq.ParquetFile(f).metadata
        ranges = []
        for i in range(md.num_row_groups):
            st = md.row_group(i).column(0).statistics
            ranges.append((st.min, st.max) if st is not None and st.has_min_max else (None, None))
        cache[meta] = (e.last or "", ranges)
    ranges = cache[meta][1]
    need = [i for i, (mn, mx) in enumerate(ranges)
            if mn is None or not ((lo is not None and mx < lo) or (hi is not None and mn > hi))]
    missing = [i for i in need if (e.shard, i) not in cache]
    if missing:
        if fs is None:
            fs, path = url_to_fs(e.url, storage_options)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            for i in missing:
                ids = pf.read_row_group(i, columns=["image_id"]).column("image_id").combine_chunks()
                cache[(e.shard, i)] = (ranges[i][1] if ranges[i][1] is not None else e.last or "", ids)
    return [cache[(e.shard, i)][1] for i in need]


def iter_live_ids(refs: Sequence[LiveShardRef], storage_options: dict[str, Any] | None = None
                  ) -> Iterator[tuple[LiveShardRef, pa.Table]]:
    """``live_ids`` of every ref, visited in order of first id so each row group of a later id list is read once
    and dropped as soon as the sweep passes its last id.

    Memory: the later id lists' row groups whose ranges overlap the sweep position (with shards cut from sorted
    listings, as runs and compaction cut them: about one shard per generation, and one row group per deletion
    list), plus one ref's resolution; never a structure over every id.

    Yields:
        (ref, its live ids table), every ref once (also those with no live row).
    """
    cache: dict[tuple[str, int], tuple[str, Any]] = {}
    for ref in sorted(refs, key=lambda r: (r.ids.first, r.shard)):  # type: ignore[arg-type, return-value]
        for key in [k for k, (last, _) in cache.items() if last < ref.ids.first]:  # type: ignore[operator]
            del cache[key]  # the sweep is past it: no later ref can overlap it
        yield ref, live_ids(ref, storage_options, cache)


def count_live(output: str, storage_options: dict[str, Any] | None = None,
               markers: Sequence[dict[str, Any]] | None = None) -> int:
    """How many images are live (bounded memory, see ``iter_live_ids``)."""
    return sum(t.num_rows for _, t in iter_live_ids(live_shard_refs(output, storage_options, markers),
                                                    storage_options))


def read_live_shard(ref: LiveShardRef, kind: str, columns: Sequence[str] | None = None,
                    storage_options: dict[str, Any] | None = None, keep: pa.Table | None = None) -> pa.Table:
    """The live rows of one shard of one kind, read on their own (a distributed task's unit).

    Memory: one shard's data file (the columns asked) plus its ``live_ids`` resolution.

    Args:
        ref: from live_shard_refs.
        kind: "images" or "regions".
        columns: columns to read (``image_id`` is always read); None = all.
        storage_options: fsspec options.
        keep: its live_ids if already resolved (else resolved here).

    Returns:
        The shard's rows whose image the shard currently owns, in file order.
    """
    if kind not in (IMAGES_DIR, REGIONS_DIR):
        raise ValueError(f"kind must be {IMAGES_DIR!r} or {REGIONS_DIR!r}, got {kind!r}")
    if keep is None:
        keep = live_ids(ref, storage_options)
    cols = None if columns is None else list(dict.fromkeys(["image_id", *columns]))
    t = read_parquet(ref.path(kind), storage_options, cols)
    if keep.num_rows == ref.ids.count and not ref.ids.retry:
        return t  # nothing superseded: every row is live
    return t.filter(pc.is_in(t.column("image_id"), value_set=keep.column("image_id").combine_chunks()))


def iter_live_shards(output: str, storage_options: dict[str, Any] | None = None,
                     columns: dict[str, Sequence[str] | None] | None = None) -> Iterator[dict[str, pa.Table]]:
    """Stream the live rows of an extraction, one done shard at a time (the driver never holds the whole corpus).

    Each shard is resolved on its own (``live_shard_refs`` + ``read_live_shard``): memory is one shard's data
    plus its resolution and at most 64 cached row groups of later id lists, whatever the number of images.

    Args:
        output: extraction output URL.
        storage_options: fsspec options.
        columns: per kind ("images", "regions") the columns to read (``image_id`` is always read); the kinds named
            are the kinds read. Default: all columns of both.

    Yields:
        Per shard with live rows, in shard order, kind -> table filtered to the rows whose image the shard
        currently owns.
    """
    columns = columns or {IMAGES_DIR: None, REGIONS_DIR: None}
    # Consecutive shards of a generation cover consecutive id ranges, so they share the later lists' row groups:
    # keep those read, dropping the ones the shard order has passed, and all of them past a small cap.
    cache: dict[tuple[str, int], tuple[str, Any]] = {}
    for ref in live_shard_refs(output, storage_options):
        for key in [k for k, (last, _) in cache.items() if last < ref.ids.first]:  # type: ignore[operator]
            del cache[key]
        if len(cache) > _SHARD_ORDER_CACHE:
            cache.clear()
        keep = live_ids(ref, storage_options, cache)
        if not keep.num_rows:
            continue
        yield {kind: read_live_shard(ref, kind, cols, storage_options, keep) for kind, cols in columns.items()}


def iter_live_tables(output: str, kind: str, storage_options: dict[str, Any] | None = None,
                     columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
    """Stream the live rows of one kind ("images" or "regions"), one done shard at a time."""
    for shard in iter_live_shards(output, storage_options, {kind: columns}):
        yield shard[kind]


def read_live_table(output: str, kind: str, storage_options: dict[str, Any] | None = None,
                    columns: Sequence[str] | None = None) -> pa.Table:
    """All live rows of an extraction as one table, sorted by image_id (and rank for regions). Memory: the
    result (use iter_live_shards for bounded memory)."""
    tables = list(iter_live_tables(output, kind, storage_options, columns))
    if not tables:
        raise StorageError(f"no completed shards under {output}")
    t = pa.concat_tables(tables)
    keys = [("image_id", "ascending")] + ([("rank", "ascending")] if kind == REGIONS_DIR and "rank" in t.column_names else [])
    return t.sort_by(keys)


def now() -> float:
    """Wall-clock seconds (one place to stub in tests)."""
    return time.time()


# ---- the output's lease: one extraction writes an output at a time ---------------------------------------------------

LEASE_TTL_S = 600.0  # a lease not renewed for this long is stale: its run died (killed, machine lost) and is taken over
# Seconds between writing a lease and reading it back. An object store keeps the last of two concurrent writes, so
# both writers may read their own lease if each reads straight after its write; waiting longer than the gap between
# the other's check and its write (one request) lets the first writer see the second's lease and back off.
LEASE_SETTLE_S = 1.0


class LeaseHeld(StorageError):
    """Another extraction holds a live lease on the output."""


class LeaseLost(StorageError):
    """This run's lease was taken over (it was not renewed in time) or overwritten: it must stop writing."""


@dataclass(frozen=True)
class Lease:
    """A lease this process holds on an extraction output (the contents of ``<output>/_LEASE.json``).

    Attributes:
        output: the extraction output URL.
        owner: a random id of this run.
        host: this machine's name.
        pid: this process.
        renewed: when it was written last (``now()`` seconds).
        expires: when another run may take it over.
    """

    output: str
    owner: str
    host: str
    pid: int
    renewed: float
    expires: float

    @property
    def renew_at(self) -> float:
        """When to renew it: half its time has passed."""
        return self.renewed + (self.expires - self.renewed) / 2

    def as_dict(self) -> dict[str, Any]:
        """What the lease file holds."""
        return {"owner": self.owner, "host": self.host, "pid": self.pid, "renewed": self.renewed,
                "expires": self.expires}


def _describe(held: dict[str, Any]) -> str:
    """A lease file's holder for a message: owner, host, pid and expiry."""
    exp = held.get("expires")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(exp)) if isinstance(exp, (int, float)) else "?"
    return f"owner {held.get('owner')} on host {held.get('host')} (pid {held.get('pid')}), lease expires {when}"


def read_lease(output: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The lease file of an output, or None when there is none.

    Raises:
        StorageError: the file exists but is not a lease (it is never guessed to be stale: delete it by hand).
    """
    fs, root = url_to_fs(output, storage_options)
    path = posixpath.join(root, LEASE)
    fresh(fs, path)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        held = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        held = None
    if not isinstance(held, dict) or "owner" not in held or not isinstance(held.get("expires"), (int, float)):
        raise StorageError(f"{join(output, LEASE)} is not a lease file; delete it if no extraction is writing "
                           f"{output}")
    return held


def _write_lease(output: str, lease: Lease, storage_options: dict[str, Any] | None, exclusive: bool = False) -> bool:
    """Write a lease file whole. Locally through a temporary file and a rename, so a reader never sees half of
    it; ``exclusive`` creates it only if there is none (atomic, local only). Object-store writes are atomic.

    Returns:
        False when ``exclusive`` and a lease file already exists.
    """
    data = json.dumps(lease.as_dict(), indent=2, sort_keys=True).encode()
    fs, root = url_to_fs(output, storage_options)
    if not (exclusive and is_local(fs)):
        write_atomic(join(output, LEASE), data, storage_options)
        return True
    path = posixpath.join(root, LEASE)
    fs.makedirs(root, exist_ok=True)
    tmp = f"{path}.{lease.owner}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, path)  # fails if the path exists: two runs cannot both create it
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def acquire_lease(output: str, storage_options: dict[str, Any] | None = None,
                  ttl_s: float = LEASE_TTL_S) -> Lease:
    """Take the output's lease before writing anything there; take over a stale one (with a warning).

    The lease is written, then read back after ``LEASE_SETTLE_S``: on an object store two runs that both found no
    lease both write one and the last write wins, so the other run must notice here and fail.

    Args:
        output: extraction output URL.
        storage_options: fsspec options.
        ttl_s: seconds until the lease expires unless renewed (``renew_lease``).

    Returns:
        The lease (release it with ``release_lease``).

    Raises:
        LeaseHeld: another run holds a live lease, or won the race to write it; the message names it.
    """
    fs, _ = url_to_fs(output, storage_options)
    t = now()
    lease = Lease(output, uuid.uuid4().hex, socket.gethostname(), os.getpid(), t, t + ttl_s)
    held = read_lease(output, storage_options)
    if held is not None and held["expires"] > t:
        raise LeaseHeld(f"another extraction is writing {output}: {_describe(held)}; wait for it to finish, or "
                        f"delete {join(output, LEASE)} if that run is dead")
    if held is None and is_local(fs):
        if not _write_lease(output, lease, storage_options, exclusive=True):
            return acquire_lease(output, storage_options, ttl_s)  # another run created it just now: look again
        return lease  # exclusive creation: no other run can also have it
    if held is not None:
        log.warning("taking over the expired lease on %s of %s", output, _describe(held))
    _write_lease(output, lease, storage_options)
    time.sleep(LEASE_SETTLE_S)
    held = read_lease(output, storage_options)
    if held is None or held["owner"] != lease.owner:
        raise LeaseHeld(f"another extraction took the lease on {output} at the same time: "
                        f"{_describe(held or {})}; not writing")
    return lease


def renew_lease(lease: Lease, storage_options: dict[str, Any] | None = None, ttl_s: float = LEASE_TTL_S) -> Lease:
    """Extend a lease this run holds, after checking that it still holds it.

    Returns:
        The renewed lease.

    Raises:
        LeaseLost: the lease file names another owner (ours expired and was taken over) or is gone.
    """
    held = read_lease(lease.output, storage_options)
    if held is None or held["owner"] != lease.owner:
        raise LeaseLost(f"lost the lease on {lease.output} (not renewed within {ttl_s:.0f} s?): "
                        f"{_describe(held) if held else 'no lease file'}; stopping so two runs never write it")
    t = now()
    renewed = Lease(lease.output, lease.owner, lease.host, lease.pid, t, t + ttl_s)
    _write_lease(lease.output, renewed, storage_options)
    return renewed


def release_lease(lease: Lease, storage_options: dict[str, Any] | None = None) -> None:
    """Remove the lease file if this run still holds it (a lease taken over by another run is left to it)."""
    held = read_lease(lease.output, storage_options)
    if held is None or held["owner"] != lease.owner:
        log.warning("not releasing the lease on %s: it is no longer ours (%s)", lease.output,
                    _describe(held) if held else "no lease file")
        return
    fs, root = url_to_fs(lease.output, storage_options)
    fs.rm_file(posixpath.join(root, LEASE))
