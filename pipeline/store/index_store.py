"""A built index folder: its file names, writing each file with its checksum, the done-marker last, and reading a
file back only when it is the one the marker describes."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from pipeline.io import storage
from pipeline.io.storage import StorageError

PCA_FUSED = "pca_fused.npz"
PCA_CROW = "pca_crow.npz"
INDEX_FUSED = "fused.faiss"
INDEX_CROW = "crow.faiss"
IVFDATA = {INDEX_FUSED: "fused.ivfdata", INDEX_CROW: "crow.ivfdata"}  # on-disk inverted lists of an IVF index
IDS_DIR = "ids"  # ids/<part>.parquet: image_id, uri of the part's rows, in index row order
REGIONS_DIR = "regions"  # regions/<part>.codes|.boxes|.offsets.npy: see pipeline.store.region_store
WORK_DIR = "_work"  # the build's intermediate state (trained indexes, partial indexes, task markers): resumable
RAW = "rerank_query.txt"  # which raw descriptor of a query is compared with regions
DONE = "_SUCCESS.json"  # the build's done-marker, written last: readers only trust a folder that has it


class IndexWriter:
    """Writes an index folder: removes an earlier done-marker before the first file, records each file's size and
    sha256, and writes the marker last with those and the caller's counts. A build killed mid-write therefore leaves
    no marker, and a reader never mixes files of two builds."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url, self.so = url, storage_options
        self.files: dict[str, dict[str, Any]] = {}
        fs, path = storage.url_to_fs(storage.join(url, DONE), storage_options)
        if fs.exists(path):
            fs.rm_file(path)  # first: from here on the folder is not a finished index

    def write(self, name: str, data: bytes) -> None:
        """Write one file of the folder."""
        storage.write_bytes(storage.join(self.url, name), data, self.so)
        self.files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def put_file(self, name: str, local_path: str, chunk: int = 1 << 24) -> None:
        """Copy a local file (e.g. a merged multi-GB index) into the folder in chunks, hashing while streaming: memory
        stays at one chunk whatever the file's size."""
        h, n = hashlib.sha256(), 0
        fs, path = storage.url_to_fs(storage.join(self.url, name), self.so)
        fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(local_path, "rb") as src, fs.open(path, "wb") as dst:
            while block := src.read(chunk):
                h.update(block)
                dst.write(block)
                n += len(block)
        self.files[name] = {"bytes": n, "sha256": h.hexdigest()}

    def record(self, name: str, entry: dict[str, Any]) -> None:
        """Record a file written by someone else (a build task) with its {"bytes", "sha256"}, computed as written."""
        self.files[name] = dict(entry)

    def finish(self, marker: dict[str, Any]) -> dict[str, Any]:
        """Write the done-marker (``marker`` plus the files' sizes and checksums), last.

        Returns:
            What was written.
        """
        marker = {**marker, "files": dict(self.files)}
        storage.write_json(storage.join(self.url, DONE), marker, self.so)
        return marker


class IndexReader:
    """Reads a finished index folder: the done-marker, then each file checked against the size and sha256 the marker
    recorded (markers of builds older than checksums have no ``files``: their files are read unchecked).

    Raises:
        StorageError: no done-marker (an unfinished or killed build), or a file that is not the one the marker
            describes (overwritten by a later, unfinished build).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 marker: dict[str, Any] | None = None) -> None:
        self.url, self.so = url, storage_options
        if marker is not None:  # read already by the caller (e.g. the Searcher, for its RegionStore)
            self.marker = marker
            return
        done = storage.join(url, DONE)
        fs, path = storage.url_to_fs(done, storage_options)
        if not fs.exists(path):
            raise StorageError(f"{url} holds no finished index (no {DONE}); run jobs/index.py")
        self.marker = storage.read_json(done, storage_options)

    def check_size(self, name: str) -> None:
        """Check a big file's size against the marker without reading it (files read by ranges or memory-mapped are
        not hashed at open; their sha256 in the marker serves a full check such as ``verify_all``)."""
        want = self.marker.get("files", {}).get(name)
        fs, path = storage.url_to_fs(storage.join(self.url, name), self.so)
        if want is not None and fs.size(path) != want["bytes"]:
            raise StorageError(f"{self.url}: {name} is not the file its {DONE} describes (a build overwrote it and "
                               "did not finish); rebuild the index")

    def local_path(self, name: str, cache_dir: str) -> str:
        """A local path of a file of the folder: itself when the folder is local, else a copy downloaded (streamed)
        into ``cache_dir`` (faiss memory-maps on-disk inverted lists only from local files)."""
        fs, path = storage.url_to_fs(storage.join(self.url, name), self.so)
        if storage.is_local(fs):
            return path
        dst = os.path.join(cache_dir, name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        fs.get_file(path, dst)
        return dst

    def read(self, name: str) -> bytes:
        """One file's bytes, verified."""
        data = storage.read_bytes(storage.join(self.url, name), self.so)
        want = self.marker.get("files", {}).get(name)
        if want is not None and (len(data) != want["bytes"] or hashlib.sha256(data).hexdigest() != want["sha256"]):
            raise StorageError(f"{self.url}: {name} is not the file its {DONE} describes (a build overwrote it and "
                               "did not finish); rebuild the index")
        return data
