"""The index's region store as search reads it: given index rows, their regions' descriptors and boxes."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pipeline.io import storage
from pipeline.store import index_store as layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegionBatch:
    """The regions of some index rows, in the order of the rows asked for.

    Attributes:
        offsets: ``(len(rows) + 1,)`` int64; row ``k``'s regions are ``desc[offsets[k]:offsets[k + 1]]``.
        desc: ``(R, D)`` float32 L2-normalised region descriptors, each image's regions by rank.
        boxes: ``(R, 4)`` float32 ``x1, y1, x2, y2`` in the image's original pixels (NaN for an index built before
            region boxes were stored).
    """

    offsets: np.ndarray
    desc: np.ndarray
    boxes: np.ndarray


class RegionStore:
    """The region store of a built index (``regions.npy``, ``region_offsets.npy``, ``region_boxes.npy``), in memory.

    Args:
        files: the index folder's reader (verifies each file against the done-marker).
        n_images: index rows, as the done-marker counts them.

    Raises:
        StorageError: the files disagree with each other or with ``n_images``.
    """

    def __init__(self, files: layout.IndexReader, n_images: int) -> None:
        self._desc = storage.npy_from_bytes(files.read(layout.REGIONS))
        self._offsets = np.asarray(storage.npy_from_bytes(files.read(layout.OFFSETS)), dtype=np.int64)
        if layout.BOXES in files.marker.get("files", {}):
            self._boxes = np.asarray(storage.npy_from_bytes(files.read(layout.BOXES)), dtype=np.float32)
        else:
            # Built before the boxes were stored: matched boxes are unknown (NaN), which search reports as null.
            log.warning("%s has no %s (built by an older version): matched region boxes are unknown; rebuild the "
                        "index to get them", files.url, layout.BOXES)
            self._boxes = np.full((len(self._desc), 4), np.nan, np.float32)
        self._center: np.ndarray | None = None
        if not (len(self._offsets) - 1 == n_images and int(self._offsets[-1]) == len(self._desc) == len(self._boxes)):
            raise storage.StorageError(f"{files.url}: the region files disagree with their {layout.DONE}; rebuild "
                                       "the index")

    @property
    def center(self) -> np.ndarray:
        """``(D,)`` float32 mean of every stored (L2-normalised) region descriptor: region matching removes it."""
        if self._center is None:
            self._center = np.asarray(self._desc, dtype=np.float32).mean(axis=0) if len(self._desc) else None
        return self._center

    def __len__(self) -> int:
        """Regions in the store."""
        return len(self._desc)

    def fetch(self, rows: np.ndarray) -> RegionBatch:
        """The regions of ``rows``.

        Args:
            rows: ``(n,)`` index rows (each in ``[0, images)``; repeats allowed).

        Returns:
            Their regions, in the order of ``rows``.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        starts, ends = self._offsets[rows], self._offsets[rows + 1]
        counts = ends - starts
        offsets = np.zeros(len(rows) + 1, np.int64)
        offsets[1:] = np.cumsum(counts)
        take = np.repeat(starts - offsets[:-1], counts) + np.arange(int(offsets[-1]))
        desc = np.asarray(self._desc[take], dtype=np.float32)
        desc /= np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), np.float32(1e-12))  # float16 -> exact unit
        return RegionBatch(offsets, desc, self._boxes[take])
