"""Compaction of an extraction output: shards whose rows are mostly superseded or deleted are rewritten into new ones.

An incremental rerun leaves a changed image's old row in place (shards are immutable once done) and a deletion only
records the ids, so after many runs the output holds rows no reader wants. Compaction copies the live rows of the
shards that are mostly dead into new shards of a new generation, writes their done-markers, and only then removes the
old shards (marker first, data after). Every step leaves an output whose live set is unchanged:

- before a new shard's marker exists, the old shards own its rows; once it exists, it is the later shard and owns
  them, and the old copies are superseded (a reader sees each image once, never none);
- a retry id (a transient failure) whose last mention is an old shard hides older copies of that image; before that
  shard goes, a deletion marker of the new generation records the id, so no older copy comes back to life;
- removing an old shard's marker before its files leaves at worst orphan files, which ``remove_orphans`` deletes.

A killed compaction is resumed by running it again: the old shards it had not removed are now (more) superseded and
are picked again. It holds the output's lease throughout, like an extraction.
"""

from __future__ import annotations

import logging
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io.storage import StorageError, url_to_fs, write_parquet
from pipeline.store import feature_store as fstore

log = logging.getLogger(__name__)

MAX_LIVE_FRACTION = 0.5  # a shard whose live rows are at most this share of its rows is rewritten


def compact(output: str, storage_options: dict[str, Any] | None = None, max_live_fraction: float = MAX_LIVE_FRACTION,
            shard_size: int = 0, lease: fstore.Lease | None = None) -> dict[str, Any]:
    """Rewrite the shards whose rows are mostly superseded or deleted, crash-safely (see the module docstring).

    Memory: one ref per done shard (O(shards)), the resolution sweep of ``feature_store.iter_live_ids``, and the
    rows of at most one new shard plus one old shard being copied; never a structure over every image.

    Args:
        output: extraction output URL.
        storage_options: fsspec options.
        max_live_fraction: rewrite data shards with at most this share of live rows (0 = only fully dead ones;
            1 = every shard with a superseded row).
        shard_size: images per new shard; 0 = the largest shard already there.
        lease: the output's lease if the caller holds it; else it is taken (and released) here.

    Returns:
        What was done: ``generation`` (of the new shards, None when nothing was rewritten), ``rewritten`` (old
        shard ids removed), ``written`` (new shard ids), ``rows_copied``, ``rows_dropped`` (superseded rows gone),
        ``tombstones`` (retry ids recorded as deleted).

    Raises:
        fstore.LeaseHeld: another extraction or compaction is writing the output.
        ValueError: a bad ``max_live_fraction`` or ``shard_size``.
    """
    if not 0 <= max_live_fraction <= 1 or shard_size < 0:
        raise ValueError(f"max_live_fraction must be in [0, 1] and shard_size >= 0, got {max_live_fraction}, "
                         f"{shard_size}")
    held = lease if lease is not None else fstore.acquire_lease(output, storage_options)
    try:
        return _compact(output, storage_options, max_live_fraction, shard_size, [held])
    finally:
        if lease is None:
            fstore.release_lease(held, storage_options)


def _compact(output: str, so: dict[str, Any] | None, max_live_fraction: float, shard_size: int,
             lease: list[fstore.Lease]) -> dict[str, Any]:
    """The body of ``compact``, holding the lease (``lease[0]``, renewed in place)."""
    markers = fstore.read_done_markers(output, so)
    removed = fstore.remove_orphans(output, markers, so)  # a killed run's or compaction's leftovers
    if removed:
        log.info("removed %d files of shards that never finished", removed)
    refs = fstore.live_shard_refs(output, so, markers)
    victims = [ref for ref, live in fstore.iter_live_ids(refs, so)
               if live.num_rows <= max_live_fraction * ref.ids.count]
    result: dict[str, Any] = {"generation": None, "rewritten": [], "written": [], "rows_copied": 0,
                              "rows_dropped": 0, "tombstones": 0}
    if not victims:
        return result
    gen = fstore.next_generation(markers)
    size = shard_size or max(int(m.get("count", len(m.get("images", ())))) for m in markers if m["kind"] == "data")
    writer = _ShardWriter(output, gen, size, so, lease)
    tombstones: list[pa.Array] = []
    for ref, live in fstore.iter_live_ids(victims, so):
        tombstones.append(_orphaned_retries(ref, so))
        if live.num_rows:
            writer.add(ref.shard, live, fstore.read_live_shard(ref, fstore.IMAGES_DIR, None, so, live),
                       fstore.read_live_shard(ref, fstore.REGIONS_DIR, None, so, live))
        result["rows_dropped"] += ref.ids.count - live.num_rows
    writer.flush(final=True)
    tomb = pa.concat_arrays(tombstones) if tombstones else pa.array([], pa.string())
    if len(tomb):
        # Written before any old shard goes: from here the retry ids stay hidden whichever old shards remain.
        fstore.write_deletions(output, gen, tomb, so)
    for ref in victims:
        _renew(lease, so)
        remove_shard(output, ref.shard, so)
    result.update(generation=gen, rewritten=[r.shard for r in victims], written=writer.written,
                  rows_copied=writer.rows, tombstones=len(tomb))
    log.info("compacted %s: %d shards rewritten into %d (%d rows copied, %d superseded rows dropped)", output,
             len(victims), len(writer.written), writer.rows, result["rows_dropped"])
    return result


def _orphaned_retries(ref: fstore.LiveShardRef, so: dict[str, Any] | None) -> pa.Array:
    """The retry ids whose last mention is this shard: removing it would bring an older copy of them back."""
    retry = pa.array(ref.ids.retry, pa.string())
    if not len(retry):
        return retry
    for e in ref.later:
        later = fstore.read_marker_ids(e, so, ref.ids.first, ref.ids.last).column("image_id").combine_chunks()
        retry = retry.filter(pc.invert(pc.is_in(retry, value_set=later)))
    return retry


def _renew(lease: list[fstore.Lease], so: dict[str, Any] | None) -> None:
    """Renew the lease when half its time has passed (raises LeaseLost if another run took it)."""
    if fstore.now() >= lease[0].renew_at:
        lease[0] = fstore.renew_lease(lease[0], so)


def remove_shard(output: str, sid: str, storage_options: dict[str, Any] | None = None) -> None:
    """Remove a done shard: its marker first (from then on it is not done), then its id list and data files.

    Only call it for a shard whose live rows exist elsewhere, holding the output's lease.
    """
    paths = fstore.shard_paths(output, sid)
    for key in ("done", "ids", "images", "regions"):
        fs, path = url_to_fs(paths[key], storage_options)
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass  # removed by an earlier, interrupted compaction
        if key == "done":
            fs.invalidate_cache(posixpath.dirname(path))


class _ShardWriter:
    """Collects live rows copied from old shards and writes them as new shards of ``size`` images each (data
    files, then the marker). Holds at most one new shard's rows plus one old shard's."""

    def __init__(self, output: str, generation: int, size: int, so: dict[str, Any] | None,
                 lease: list[fstore.Lease]) -> None:
        self.output, self.generation, self.size, self.so, self.lease = output, generation, size, so, lease
        self.ids: list[pa.Table] = []
        self.images: list[pa.Table] = []
        self.regions: list[pa.Table] = []
        self.sources: list[str] = []
        self.pending = 0
        self.written: list[str] = []
        self.rows = 0

    def add(self, source: str, live: pa.Table, images: pa.Table, regions: pa.Table) -> None:
        """Queue one old shard's live rows (its live id list and their rows); write full new shards.

        Raises:
            StorageError: the shard's images file does not hold exactly one row per live id.
        """
        if images.num_rows != live.num_rows:
            raise StorageError(f"shard {source}: {images.num_rows} live image rows for {live.num_rows} live ids")
        self.ids.append(live)
        self.images.append(images)
        self.regions.append(regions)
        self.sources.append(source)
        self.pending += images.num_rows
        self.flush()

    def flush(self, final: bool = False) -> None:
        """Write new shards while at least ``size`` rows are queued (all of them when ``final``)."""
        while self.pending >= self.size or (final and self.pending):
            ids = pa.concat_tables(self.ids).sort_by("image_id")
            images = pa.concat_tables(self.images).sort_by("image_id")
            regions = pa.concat_tables(self.regions)
            head, rest = images.slice(0, self.size), images.slice(self.size)
            in_head = pc.is_in(regions.column("image_id"), value_set=head.column("image_id").combine_chunks())
            self._write(ids.slice(0, self.size), head, regions.filter(in_head))
            self.ids, self.images, self.regions = [ids.slice(self.size)], [rest], [regions.filter(pc.invert(in_head))]
            self.pending = rest.num_rows
            self.sources = self.sources[-1:] if rest.num_rows else []

    def _write(self, ids: pa.Table, images: pa.Table, regions: pa.Table) -> None:
        """One new shard: data files, then its id list and marker (it is done, and owns its rows, from there)."""
        _renew(self.lease, self.so)
        sid = fstore.shard_id(self.generation, len(self.written))
        keys = [("image_id", "ascending")] + ([("rank", "ascending")] if "rank" in regions.column_names else [])
        regions = regions.sort_by(keys)
        paths = fstore.shard_paths(self.output, sid)
        write_parquet(paths["images"], images, self.so)
        write_parquet(paths["regions"], regions, self.so)
        statuses: dict[str, int] = {}
        if "status" in images.column_names:
            for s in images.column("status").to_pylist():
                statuses[s] = statuses.get(s, 0) + 1
        fstore.write_data_marker(
            self.output, sid, self.generation, ids.column("image_id"), ids.column("fingerprint"), [], self.so,
            stats={"images": images.num_rows, "ok": statuses.get("ok", 0), "statuses": statuses,
                   "regions": regions.num_rows, "compacted_from": sorted(set(self.sources))},
            finished=fstore.now())
        self.written.append(sid)
        self.rows += images.num_rows
