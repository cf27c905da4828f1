"""Versioned indexes under one root: build into a new version folder, publish by rewriting a small pointer last.

Layout under a root URL (any fsspec location: local path, ``file://``, ``s3://``):

    <root>/features/                 the incremental extraction (jobs/extract.py output)
    <root>/versions/<version>/       one index build each (jobs/index.py output; complete once _SUCCESS.json exists)
    <root>/versions/<version>/_SOURCE.json   what the build was made from (written before the build starts)
    <root>/CURRENT                   {"version": ..., "path": "versions/<version>", ...}: the one a search uses

A search resolves ``CURRENT`` and opens that version, which is complete before ``CURRENT`` ever names it (the pointer
is written last, in one put: atomic on object stores, a rename on local disks), so a reader never sees a half-built
index; the versions a pointer recently named are kept, so a reader that resolved the pointer just before a publish
still finds its version. Runs over one root must not overlap (a scheduler runs one at a time).
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
import time
from typing import Any

from pipeline.config import MIN_KEEP  # defined with the --keep flag it bounds
from pipeline.io import storage
from pipeline.io.storage import StorageError
from pipeline.store import feature_store as fstore
from pipeline.store import index_store as layout

log = logging.getLogger(__name__)

FEATURES = "features"
VERSIONS = "versions"
POINTER = "CURRENT"
SOURCE = "_SOURCE.json"

_VERSION_RE = re.compile(r"^v(\d{6})-(\d{8}T\d{6}Z)$")


class PublishError(StorageError):
    """A version cannot be published or rolled back to."""


def features_url(root: str) -> str:
    """The extraction output under a root."""
    return storage.join(root, FEATURES)


def version_url(root: str, version: str) -> str:
    """A version's folder (an index output)."""
    return storage.join(root, VERSIONS, version)


def _exists(url: str, so: dict[str, Any] | None) -> bool:
    # storage.url_to_fs never caches remote listings, so a version another process just wrote is seen.
    fs, path = storage.url_to_fs(url, so)
    return bool(fs.exists(path))


def list_versions(root: str, storage_options: dict[str, Any] | None = None) -> list[tuple[str, bool]]:
    """Version folders under a root, oldest first.

    Args:
        root: the root URL.
        storage_options: fsspec options.

    Returns:
        (version name, complete) pairs; complete means the build's done-marker exists.
    """
    fs, vdir = storage.url_to_fs(storage.join(root, VERSIONS), storage_options)
    if not fs.exists(vdir):
        return []
    names = sorted(n for n in (posixpath.basename(p.rstrip("/")) for p in fs.ls(vdir, detail=False))
                   if _VERSION_RE.match(n))
    return [(n, _exists(storage.join(version_url(root, n), layout.DONE), storage_options)) for n in names]


def new_version(root: str, storage_options: dict[str, Any] | None = None) -> str:
    """A fresh version name: one past the largest counter under the root, and the UTC time (names sort by age).

    Args:
        root: the root URL.
        storage_options: fsspec options.

    Returns:
        E.g. ``v000004-20261127T221500Z``.
    """
    counters = [int(n[1:7]) for n, _ in list_versions(root, storage_options)]  # names match _VERSION_RE
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(fstore.now()))
    return f"v{1 + max(counters, default=0):06d}-{stamp}"


def current(root: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The pointer's content, or None when nothing was published under the root.

    Returns:
        ``{"version", "path" (relative to the root), "published", "images", ...}``.
    """
    url = storage.join(root, POINTER)
    if not _exists(url, storage_options):
        return None
    return storage.read_json(url, storage_options)


def _write_pointer(root: str, pointer: dict[str, Any], so: dict[str, Any] | None) -> None:
    """Replace the pointer in one step: readers see the old content or the new, never a partial file."""
    storage.write_atomic(storage.join(root, POINTER), json.dumps(pointer, indent=2, sort_keys=True).encode(), so)


def publish(root: str, version: str, storage_options: dict[str, Any] | None = None,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Point the root at a complete version (the last write of a re-index).

    Args:
        root: the root URL.
        version: a version name under ``<root>/versions/``.
        storage_options: fsspec options.
        extra: more fields for the pointer.

    Returns:
        The pointer written.

    Raises:
        PublishError: the version has no done-marker (missing, still building, or crashed).
    """
    done = storage.join(version_url(root, version), layout.DONE)
    if not _exists(done, storage_options):
        raise PublishError(f"version {version} under {root} is not a finished index (no {layout.DONE}); not published")
    marker = storage.read_json(done, storage_options)
    prev = current(root, storage_options)
    pointer = {"version": version, "path": f"{VERSIONS}/{version}", "published": fstore.now(),
               "images": marker.get("images"), "previous": prev["version"] if prev else None, **(extra or {})}
    _write_pointer(root, pointer, storage_options)
    log.info("published %s under %s (%s images; previous %s)", version, root, pointer["images"], pointer["previous"])
    return pointer


def rollback(root: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Point the root back at the newest complete version older than the current one.

    Rolling back twice goes back two versions. A later re-index publishes again only when the features changed
    after the newest build (see ``is_up_to_date``), so a rollback holds until new images arrive.

    Returns:
        The pointer written.

    Raises:
        PublishError: nothing is published, or no complete older version is left.
    """
    cur = current(root, storage_options)
    if cur is None:
        raise PublishError(f"nothing is published under {root}; nothing to roll back")
    older = [n for n, complete in list_versions(root, storage_options) if complete and n < cur["version"]]
    if not older:
        raise PublishError(f"no complete version older than {cur['version']} under {root}")
    return publish(root, older[-1], storage_options, {"rolled_back_from": cur["version"]})


def prune(root: str, keep: int, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Delete old versions: keep the ``keep`` newest complete ones, the current one, and anything newer than the
    newest complete one (a build may be running there); delete every other version older than the oldest kept.

    Args:
        root: the root URL.
        keep: complete versions kept (at least ``MIN_KEEP``).
        storage_options: fsspec options.

    Returns:
        The versions deleted.

    Raises:
        ValueError: ``keep`` below ``MIN_KEEP``.
    """
    if keep < MIN_KEEP:
        raise ValueError(f"keep must be >= {MIN_KEEP} (the version just replaced may still be being read)")
    versions = list_versions(root, storage_options)
    complete = [n for n, ok in versions if ok]
    if not complete:
        return []
    kept = set(complete[-keep:])
    cur = current(root, storage_options)
    if cur:
        kept.add(cur["version"])
    oldest_kept = min(kept)
    doomed = [n for n, _ in versions if n < oldest_kept and n not in kept]
    for n in doomed:
        fs, path = storage.url_to_fs(version_url(root, n), storage_options)
        fs.rm(path, recursive=True)
        log.info("pruned version %s under %s", n, root)
    return doomed


def resolve_index(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """The index a search should open: the version ``<url>/CURRENT`` names when there is one, else ``url`` itself
    (a plain jobs/index.py output).

    Args:
        url: a re-index root or an index output.
        storage_options: fsspec options.

    Returns:
        An index output URL.
    """
    pointer = current(url, storage_options)
    return storage.join(url, pointer["path"]) if pointer else url


def features_state(features: str, storage_options: dict[str, Any] | None = None) -> str:
    """A short fingerprint of an extraction's content: its done-markers (every finished shard or deletion).

    Equal fingerprints mean the same live rows, so an index built from them is still current.
    """
    shards = sorted(m["shard"] for m in fstore.read_done_markers(features, storage_options))
    return hashlib.sha256("\n".join(shards).encode()).hexdigest()[:16]


def write_source(root: str, version: str, info: dict[str, Any], storage_options: dict[str, Any] | None = None) -> None:
    """Record what a version is built from (before the build, so a crashed build still says what it was)."""
    storage.write_json(storage.join(version_url(root, version), SOURCE), info, storage_options)


def is_up_to_date(root: str, state: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The newest complete version when it was built from features in this state (nothing to rebuild), else None."""
    complete = [n for n, ok in list_versions(root, storage_options) if ok]
    if not complete:
        return None
    src = storage.join(version_url(root, complete[-1]), SOURCE)
    if not _exists(src, storage_options):
        return None
    return complete[-1] if storage.read_json(src, storage_options).get("features_state") == state else None
