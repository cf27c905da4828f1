"""Listing an input image collection: a directory/prefix walked recursively, or a Parquet/CSV manifest."""

from __future__ import annotations

import csv
import os
import posixpath
import stat
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow.parquet as pq

from pipeline.io.storage import StorageError, fresh, unstrip, url_to_fs

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageRecord:
    """One input image: a stable id (path relative to the input root), where to read it, and a change fingerprint.

    ``error`` is set when the listing found the entry itself broken (a manifest row without a uri): the extraction
    then writes it as a failed row without reading anything.
    """

    image_id: str
    uri: str
    fingerprint: str
    label: str = ""
    error: str = ""


def _fingerprint(info: dict[str, Any]) -> str:
    """A change fingerprint from listing metadata: size plus ETag or modification time (whatever the store gives)."""
    size = info.get("size", "")
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("last_modified") or ""
    if hasattr(tag, "timestamp"):
        tag = tag.timestamp()
    return f"{size}-{str(tag).strip(chr(34))}"


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
        fresh(fs, root)
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
            if not path.lower().endswith(IMAGE_EXTS) or not _is_regular_file(path, info):
                continue
            rel = posixpath.relpath(path, root)
            records.append(ImageRecord(rel, unstrip(fs, path), _fingerprint(info)))
    records.sort(key=lambda r: r.image_id)
    for a, b in zip(records, records[1:]):
        if a.image_id == b.image_id:
            raise StorageError(f"duplicate image id {a.image_id!r} in {input_url}")
    return records


def _is_regular_file(path: str, info: dict[str, Any]) -> bool:
    """Whether a listed entry is a regular file, following symlinks: a FIFO blocks its reader forever and a link to a
    device such as /dev/zero never ends, so neither is an image (fsspec's local listings call both, and every link,
    "other")."""
    if info.get("type") == "file":
        return True
    if info.get("islink"):
        try:
            return stat.S_ISREG(os.stat(path).st_mode)
        except OSError:  # a dangling link
            return False
    return False


def _read_manifest(fs: fsspec.AbstractFileSystem, path: str) -> list[ImageRecord]:
    """Read a Parquet or CSV manifest of image URIs (no code from the input is ever executed: plain tables only)."""
    if path.lower().endswith(".parquet"):
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        cols = {c: table.column(c).to_pylist() for c in table.column_names}
    else:
        # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first column's name.
        with fs.open(path, "rt", newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
        cols = {c: [r[c] for r in rows] for c in header}
    uri_col = next((c for c in ("uri", "url", "path") if c in cols), None)
    if uri_col is None:
        raise StorageError(f"manifest {path} needs a 'uri', 'url' or 'path' column; has {sorted(cols)}")
    if not cols[uri_col]:
        raise StorageError(f"manifest {path} has no rows")
    base = posixpath.dirname(path)
    name = posixpath.basename(path)
    out = []
    for i, uri in enumerate(cols[uri_col]):
        given_id = _cell(cols, "image_id", i)
        if not _cell(cols, uri_col, i).strip():
            # A null (Parquet) or empty (CSV) uri: a row that names nothing to read. It becomes a failed row, never
            # a read of the manifest's folder, nor the id "None"; its id stays stable across runs so it is not redone.
            row = f"{name}#row-{i + 1}"
            out.append(ImageRecord(given_id or row, "", _cell(cols, "fingerprint", i), _cell(cols, "label", i),
                                   error=f"manifest {path} row {i + 1} has no {uri_col}"))
            continue
        uri = str(uri)
        if "://" not in uri and not uri.startswith("/"):
            full = unstrip(fs, posixpath.join(base, uri))
            default_id = uri
        else:
            full = uri
            default_id = uri.split("://", 1)[-1].lstrip("/")
        fp = _cell(cols, "fingerprint", i) or uri
        out.append(ImageRecord(given_id or default_id, full, fp, _cell(cols, "label", i)))
    return out


def _cell(cols: dict[str, list[Any]], name: str, i: int) -> str:
    """A manifest cell as text: "" for a missing column, a null (Parquet) or an empty cell (CSV), never "None"."""
    v = cols[name][i] if name in cols else None
    return "" if v is None else str(v)
