"""The index's region store: compressed region descriptors and boxes, one file set per part (feature shard), read by
index row ranges (ranged reads), never whole."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.io import storage
from pipeline.io.storage import StorageError
from pipeline.reduce.pca import l2n
from pipeline.store import index_store as layout

# Codecs of region descriptors (chosen by measurement, see BENCHMARKS.md "Indexing at scale"): every descriptor is
# L2-normalised after decoding, so a per-row scale need not be stored (cosine ignores it).
CODECS = {"float16": np.float16, "int8": np.int8}
BOX_DIM = 4


def encode(desc: np.ndarray, codec: str) -> np.ndarray:
    """Region descriptors -> stored codes.

    Args:
        desc: ``(R, D)`` descriptors (any float dtype).
        codec: ``"float16"`` (L2-normalised, 2 bytes a value) or ``"int8"`` (each row scaled so its largest magnitude
            is 127 and rounded: 1 byte a value).

    Returns:
        ``(R, D)`` codes of the codec's dtype.
    """
    x = l2n(desc)
    if codec == "float16":
        return x.astype(np.float16)
    if codec == "int8":
        peak = np.abs(x).max(axis=1, keepdims=True)
        return np.rint(x * (127.0 / np.maximum(peak, 1e-12))).astype(np.int8)
    raise ValueError(f"unknown region codec {codec!r}; known: {sorted(CODECS)}")


def decode(codes: np.ndarray) -> np.ndarray:
    """Stored codes (either codec) -> ``(R, D)`` float32 L2-normalised descriptors."""
    return l2n(codes.astype(np.float32))


def part_files(name: str) -> dict[str, str]:
    """File names (relative to the index folder) of one part of the region store.

    ``codes``: raw ``(R, D)`` codes, row-major, no header; ``boxes``: raw float32 ``(R, 4)``; ``offsets``: ``.npy``
    int64 ``(n + 1,)``, the part's image ``i`` owns region rows ``offsets[i]:offsets[i + 1]``.
    """
    return {"codes": f"{layout.REGIONS_DIR}/{name}.codes", "boxes": f"{layout.REGIONS_DIR}/{name}.boxes",
            "offsets": f"{layout.REGIONS_DIR}/{name}.offsets.npy"}


def write_part(url: str, name: str, counts: np.ndarray, desc: np.ndarray, boxes: np.ndarray, codec: str,
               storage_options: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Write one part of the region store (a shard's images, in index row order).

    Args:
        url: the index folder.
        name: the part's name (its feature shard id).
        counts: ``(n,)`` regions per image.
        desc: ``(sum counts, D)`` descriptors, each image's regions by rank.
        boxes: ``(sum counts, 4)`` boxes (x1, y1, x2, y2 in the image's original pixels).
        codec: see :func:`encode`.
        storage_options: fsspec options.

    Returns:
        File name -> {"bytes", "sha256"} of what was written (the index's done-marker records them).
    """
    offsets = np.zeros(len(counts) + 1, np.int64)
    offsets[1:] = np.cumsum(counts)
    if len(desc) != offsets[-1] or len(boxes) != offsets[-1]:
        raise ValueError(f"{name}: {len(desc)} descriptors and {len(boxes)} boxes for {offsets[-1]} regions")
    blobs = {"codes": np.ascontiguousarray(encode(desc, codec)).tobytes(),
             "boxes": np.ascontiguousarray(boxes, dtype=np.float32).tobytes(),
             "offsets": storage.npy_bytes(offsets)}
    files = {}
    for kind, fname in part_files(name).items():
        storage.write_bytes(storage.join(url, fname), blobs[kind], storage_options)
        files[fname] = {"bytes": len(blobs[kind]), "sha256": hashlib.sha256(blobs[kind]).hexdigest()}
    return files


@dataclass
class RegionBatch:
    """The regions of some index rows.

    Attributes:
        offsets: ``(len(rows) + 1,)`` int64; row ``k`` of the request owns ``desc[offsets[k]:offsets[k + 1]]``.
        desc: ``(R, D)`` float32 L2-normalised descriptors (decoded), each image's regions by rank.
        boxes: ``(R, 4)`` float32 x1, y1, x2, y2 in the candidate image's original pixels.
    """

    offsets: np.ndarray
    desc: np.ndarray
    boxes: np.ndarray


class RegionStore:
    """Reads the regions of given index rows from a finished index folder, with ranged reads of only those rows.

    The folder's done-marker lists the parts (``parts``: name, first row, images, regions, in row order) and the
    codec (``region_store``: codec, dim, and ``center``: the ``(D,)`` mean of every decoded region descriptor, which
    region-to-region matching subtracts). Each part's small offsets file is read (and checked against its sha256)
    the first time one of its rows is asked for, then kept.

    Args:
        index_url: the index folder.
        storage_options: fsspec options.
        marker: the folder's done-marker when the caller has read it already (else read here, refusing an
            unfinished index).
    """

    def __init__(self, index_url: str, storage_options: dict | None = None, marker: dict | None = None) -> None:
        self.reader = layout.IndexReader(index_url, storage_options, marker)
        self.url, self.so = index_url, storage_options
        meta = self.reader.marker
        info = meta.get("region_store")
        if info is None or "parts" not in meta:
            raise StorageError(f"{index_url}: an index of an older layout (no sharded region store); rebuild it")
        self.codec, self.dim = info["codec"], int(info["dim"])
        center = info.get("center")
        # The mean of every stored (decoded) region descriptor, computed by the build from its parts' sums.
        self.center: np.ndarray | None = None if center is None else np.asarray(center, np.float32)
        self.dtype = np.dtype(CODECS[self.codec])
        self.parts = meta["parts"]
        self.row0 = np.array([p["row0"] for p in self.parts], np.int64)
        self.images = int(meta["images"])
        self._offsets: dict[int, np.ndarray] = {}

    def _part_offsets(self, k: int) -> np.ndarray:
        if k not in self._offsets:
            name = self.parts[k]["name"]
            off = storage.npy_from_bytes(self.reader.read(part_files(name)["offsets"]))
            if len(off) != self.parts[k]["images"] + 1 or int(off[-1]) != self.parts[k]["regions"]:
                raise StorageError(f"{self.url}: region part {name} disagrees with its {layout.DONE}; rebuild")
            self._offsets[k] = off
        return self._offsets[k]

    def fetch(self, rows: np.ndarray) -> RegionBatch:
        """The regions of ``rows`` (index rows; ``-1``, faiss's padding, has none), in the order of ``rows``.

        Args:
            rows: ``(n,)`` int64 index rows.

        Returns:
            The batch (see :class:`RegionBatch`).

        Raises:
            IndexError: a row outside the index.
        """
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if rows.size and rows.max() >= self.images:
            raise IndexError(f"row {rows.max()} out of range for {self.images} images")
        part = np.searchsorted(self.row0, rows, side="right") - 1
        spans = np.zeros((len(rows), 2), np.int64)  # region rows inside the part: [start, end)
        for k in np.unique(part[rows >= 0]):
            sel = (part == k) & (rows >= 0)
            off = self._part_offsets(int(k))
            local = rows[sel] - self.row0[k]
            spans[sel, 0], spans[sel, 1] = off[local], off[local + 1]
        counts = spans[:, 1] - spans[:, 0]
        offsets = np.zeros(len(rows) + 1, np.int64)
        offsets[1:] = np.cumsum(counts)
        codes = np.empty((int(offsets[-1]), self.dim), self.dtype)
        boxes = np.empty((int(offsets[-1]), BOX_DIM), np.float32)
        fs, _ = storage.url_to_fs(self.url, self.so)
        want = np.flatnonzero(counts > 0)
        for kind, out, width in (("codes", codes, self.dim * self.dtype.itemsize), ("boxes", boxes, BOX_DIM * 4)):
            paths = [storage.url_to_fs(storage.join(self.url, part_files(self.parts[part[i]]["name"])[kind]),
                                       self.so)[1] for i in want]
            # One ranged read per candidate (concurrent on object stores): only these rows' bytes are read.
            blobs = fs.cat_ranges(paths, [int(spans[i, 0] * width) for i in want],
                                  [int(spans[i, 1] * width) for i in want]) if len(want) else []
            flat = out.reshape(-1).view(np.uint8)
            for i, blob in zip(want, blobs):
                if len(blob) != counts[i] * width:
                    raise StorageError(f"{self.url}: short read of {kind} for row {rows[i]}; the index is damaged")
                flat[offsets[i] * width:offsets[i + 1] * width] = np.frombuffer(blob, np.uint8)
        return RegionBatch(offsets, decode(codes), boxes)
