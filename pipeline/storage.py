"""fsspec URL handling: listing image collections and manifests, shard layout, done-markers (data first, marker last)."""

from __future__ import annotations

import csv
import io
import json
import posixpath
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# Output layout under an extraction URL.
IMAGES_DIR = "images"
REGIONS_DIR = "regions"
DONE_DIR = "_done"
MANIFEST = "manifest.json"
CONFIG = "config.json"

_SHARD_RE = re.compile(r"^g(\d{5})-(\d{6}|deleted)$")


class StorageError(RuntimeError):
    """A location cannot be read or written."""


@dataclass(frozen=True)
class ImageRecord:
    """One input image: a stable id (path relative to the input root), where to read it, and a change fingerprint."""

    image_id: str
    uri: str
    fingerprint: str
    label: str = ""


def url_to_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve a URL (local path, file://, s3://, ...) to a filesystem and a path on it.

    Args:
        url: the URL.
        storage_options: fsspec options for the protocol (credentials, endpoint).

    Returns:
        (filesystem, path).
    """
    opts = dict(storage_options or {})
    if (fsspec.core.split_protocol(url)[0] or "file") not in ("file", "local"):
        # Other processes (Ray workers, a concurrent run) write under the same prefixes: a cached listing would hide
        # their objects, both from later listings and from reads (s3fs answers FileNotFoundError for any key that a
        # cached listing of its folder lacks). Listings are therefore never cached unless the caller asks for it.
        opts.setdefault("use_listings_cache", False)
    fs, path = fsspec.core.url_to_fs(url, **opts)
    return fs, path.rstrip("/") if path not in ("/", "") else path


def join(url: str, *parts: str) -> str:
    """Join URL parts with '/', keeping the protocol."""
    return "/".join([url.rstrip("/")] + [p.strip("/") for p in parts])


def _fingerprint(info: dict[str, Any]) -> str:
    """A change fingerprint from listing metadata: size plus ETag or modification time (whatever the store gives)."""
    size = info.get("size", "")
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("last_modified") or ""
    if hasattr(tag, "timestamp"):
        tag = tag.timestamp()
    return f"{size}-{str(tag).strip(chr(34))}"


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local filesystem (the only one here whose folders must exist before a write)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


def _fresh(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Drop fsspec's cached listings of ``path`` (s3fs keeps a per-instance directory cache that never sees objects
    written by other processes, e.g. Ray workers; a stale listing would hide done-markers)."""
    try:
        fs.invalidate_cache(path)
    except Exception:  # noqa: BLE001 - a cache that cannot be dropped is not an error
        pass


def _unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path on ``fs`` back to a URL that fsspec opens."""
    return fs.unstrip_protocol(path)


def check_readable(input_url: str, storage_options: dict[str, Any] | None = None
                   ) -> tuple[fsspec.AbstractFileSystem, str]:
    """Fail fast when an input location is unreachable or missing (one request, no listing).

    Args:
        input_url: directory/prefix or manifest URL.
        storage_options: fsspec options.

    Returns:
        (filesystem, path) of the input.

    Raises:
        StorageError: with the reason, before any work starts.
    """
    try:
        fs, root = url_to_fs(input_url, storage_options)
        _fresh(fs, root)
        exists = fs.exists(root)
    except Exception as e:  # noqa: BLE001 - any backend error is "unreachable"
        raise StorageError(f"cannot reach input {input_url}: {type(e).__name__}: {e}") from None
    if not exists:
        raise StorageError(f"input {input_url} does not exist")
    return fs, root


def list_images(input_url: str, storage_options: dict[str, Any] | None = None) -> list[ImageRecord]:
    """List an image collection: a directory/prefix (recursively) or a manifest file (.parquet or .csv).

    A manifest has a ``uri`` (or ``url``/``path``) column, optional ``image_id``, ``label`` and ``fingerprint``;
    relative URIs are resolved against the manifest's folder. Without ids, the id is the URI relative to that folder.

    Args:
        input_url: directory URL or manifest URL.
        storage_options: fsspec options.

    Returns:
        Records sorted by image_id; ids are unique.

    Raises:
        StorageError: when the input cannot be listed or holds duplicate ids.
    """
    fs, root = check_readable(input_url, storage_options)
    if fs.isfile(root) and root.lower().endswith((".parquet", ".csv")):
        records = _read_manifest(fs, root)
    else:
        found = fs.find(root, detail=True)
        records = []
        for path, info in found.items():
            if not path.lower().endswith(IMAGE_EXTS) or info.get("type") == "directory":
                continue
            rel = posixpath.relpath(path, root)
            records.append(ImageRecord(rel, _unstrip(fs, path), _fingerprint(info)))
    records.sort(key=lambda r: r.image_id)
    for a, b in zip(records, records[1:]):
        if a.image_id == b.image_id:
            raise StorageError(f"duplicate image id {a.image_id!r} in {input_url}")
    return records


def _read_manifest(fs: fsspec.AbstractFileSystem, path: str) -> list[ImageRecord]:
    """Read a Parquet or CSV manifest of image URIs (no code from the input is ever executed: plain tables only)."""
    if path.lower().endswith(".parquet"):
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        cols = {c: table.column(c).to_pylist() for c in table.column_names}
    else:
        with fs.open(path, "rt", newline="") as f:
            rows = list(csv.DictReader(f))
        cols = {c: [r[c] for r in rows] for c in (rows[0].keys() if rows else [])}
    uri_col = next((c for c in ("uri", "url", "path") if c in cols), None)
    if uri_col is None:
        raise StorageError(f"manifest {path} needs a 'uri', 'url' or 'path' column; has {sorted(cols)}")
    base = posixpath.dirname(path)
    out = []
    for i, uri in enumerate(cols[uri_col]):
        uri = str(uri)
        if "://" not in uri and not uri.startswith("/"):
            full = _unstrip(fs, posixpath.join(base, uri))
            default_id = uri
        else:
            full = uri
            default_id = uri.split("://", 1)[-1].lstrip("/")
        image_id = str(cols["image_id"][i]) if "image_id" in cols else default_id
        fp = str(cols["fingerprint"][i]) if "fingerprint" in cols else uri
        label = str(cols["label"][i]) if "label" in cols else ""
        out.append(ImageRecord(image_id, full, fp, label))
    return out


def check_writable(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Fail fast when an output location cannot be written: write and delete a small probe object.

    Args:
        url: output URL.
        storage_options: fsspec options.

    Raises:
        StorageError: with the reason, before any work starts.
    """
    try:
        fs, root = url_to_fs(url, storage_options)
        if _is_local(fs):
            fs.makedirs(root, exist_ok=True)  # object stores have no folders; never create a missing bucket
        probe = posixpath.join(root, f"_probe-{uuid.uuid4().hex}")
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except Exception as e:  # noqa: BLE001 - translate any backend error into one clear message
        raise StorageError(f"cannot write to output {url}: {type(e).__name__}: {e}") from None


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """Read a whole object."""
    fs, path = url_to_fs(uri, storage_options)
    return fs.cat_file(path)


def write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write a whole object (creating parent folders on local filesystems)."""
    fs, path = url_to_fs(url, storage_options)
    parent = posixpath.dirname(path)
    if parent and _is_local(fs):
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)


def write_json(url: str, obj: Any, storage_options: dict[str, Any] | None = None) -> None:
    """Write an object as indented JSON."""
    write_bytes(url, json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), storage_options)


def read_json(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    """Read a JSON object."""
    return json.loads(read_bytes(url, storage_options))


def write_parquet(url: str, table: pa.Table, storage_options: dict[str, Any] | None = None) -> None:
    """Write a table as one Parquet file (zstd) through fsspec."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(url, buf.getvalue(), storage_options)


def read_parquet(url: str, storage_options: dict[str, Any] | None = None, columns: Sequence[str] | None = None) -> pa.Table:
    """Read one Parquet file through fsspec."""
    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=list(columns) if columns else None)


# ---- shards and done-markers -------------------------------------------------------------------------------------


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
    _fresh(fs, done_dir)
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
        _fresh(fs, d)
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
