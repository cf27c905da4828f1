"""A built index folder: its file names, writing each file with its checksum, the done-marker last, and reading a
file back only when it is the one the marker describes."""

from __future__ import annotations

import hashlib
from typing import Any

from pipeline.io import storage
from pipeline.io.storage import StorageError

PCA_FUSED = "pca_fused.npz"
PCA_CROW = "pca_crow.npz"
INDEX_FUSED = "fused.faiss"
INDEX_CROW = "crow.faiss"
IDS = "ids.parquet"
REGIONS = "regions.npy"  # float16 (R, D): every image's region descriptors, L2-normalised, in index row order
OFFSETS = "region_offsets.npy"  # int64 (N + 1,)
BOXES = "region_boxes.npy"  # float32 (R, 4): each region's x1, y1, x2, y2 in its image's original pixels, as REGIONS
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

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url, self.so = url, storage_options
        done = storage.join(url, DONE)
        fs, path = storage.url_to_fs(done, storage_options)
        if not fs.exists(path):
            raise StorageError(f"{url} holds no finished index (no {DONE}); run jobs/index.py")
        self.marker: dict[str, Any] = storage.read_json(done, storage_options)

    def read(self, name: str) -> bytes:
        """One file's bytes, verified."""
        data = storage.read_bytes(storage.join(self.url, name), self.so)
        want = self.marker.get("files", {}).get(name)
        if want is not None and (len(data) != want["bytes"] or hashlib.sha256(data).hexdigest() != want["sha256"]):
            raise StorageError(f"{self.url}: {name} is not the file its {DONE} describes (a build overwrote it and "
                               "did not finish); rebuild the index")
        return data
