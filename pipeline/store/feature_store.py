"""The feature store an extraction writes: shard layout, done-markers (data first, marker last), the live set."""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import pyarrow as pa

from pipeline.io.storage import StorageError, fresh, is_local, join, read_parquet, url_to_fs, write_atomic, write_json

log = logging.getLogger(__name__)

# Output layout under an extraction URL.
IMAGES_DIR = "images"
REGIONS_DIR = "regions"
DONE_DIR = "_done"
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
    listings stay clean. Only call this holding the output's lease (``acquire_lease``): another extraction's shards
    in progress look exactly like a crashed run's.

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
