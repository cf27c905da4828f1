"""A benchmark corpus: a dataset's images aligned row by row with their extracted vectors and region descriptors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc

from pipeline.io import images as imgs
from pipeline.reduce.build import regions_in_order
from pipeline.reduce.pca import l2n
from pipeline.schema import VECTOR_COLUMNS, column_to_numpy
from pipeline.store import feature_store as fstore


@dataclass
class Corpus:
    """A dataset's images with their extracted features, aligned row by row."""

    root: str
    paths: list[str]  # relative to root; database row order
    labels: np.ndarray | None  # int label per row (category / labels protocols)
    vectors: dict[str, np.ndarray]  # method input -> (N, d) float32
    region_desc: np.ndarray  # (R, D) L2-normalised region descriptors
    offsets: np.ndarray  # (N + 1,)
    missing: list[str]  # dataset images without an ok extraction row


def load_corpus(features: str, root: str, paths: list[str], labels: np.ndarray | None,
                so: dict[str, Any], regions: int | None = None) -> Corpus:
    """Read an extraction and align it with the dataset's paths (ids are paths relative to the dataset root).

    Args:
        features: extraction URL.
        root: dataset root.
        paths: dataset paths, relative to root.
        labels: label per path, or None.
        so: storage options.
        regions: use only each image's top-K stored regions, and recompute the local feature from them (eq. 1-2),
            so one extraction with many regions measures every smaller K. None = all stored regions.

    Returns:
        The corpus, restricted to images with an ok row (the others are listed in ``missing``).
    """
    t = fstore.read_live_table(features, "images", so, ["status", *VECTOR_COLUMNS])
    t = t.filter(pc.equal(t.column("status"), imgs.OK))
    row_of = {i: k for k, i in enumerate(t.column("image_id").to_pylist())}
    keep = [k for k, p in enumerate(paths) if p in row_of]
    missing = [p for p in paths if p not in row_of]
    take = np.array([row_of[paths[k]] for k in keep], dtype=np.int64)
    vectors = {m: column_to_numpy(t, m)[take] for m in VECTOR_COLUMNS}
    r = fstore.read_live_table(features, "regions", so, ["rank", "descriptor"])
    kept_paths = [paths[k] for k in keep]
    if regions is not None:
        r = r.filter(pc.less(r.column("rank"), regions))
    counts, desc = regions_in_order(r, kept_paths)
    if regions is not None:
        vectors["local"] = _local_feature(counts, desc)
    offsets = np.zeros(len(kept_paths) + 1, np.int64)
    offsets[1:] = np.cumsum(counts)
    return Corpus(root, kept_paths, None if labels is None else labels[keep], vectors, l2n(desc), offsets, missing)


def _local_feature(counts: np.ndarray, desc: np.ndarray) -> np.ndarray:
    """Paper eq. (1)-(2) over each image's run of regions: f = sum_k r_k, then f / ||f||_1 (zero without regions)."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sums = np.zeros((len(counts), desc.shape[1]), np.float64)
    nz = counts > 0
    if nz.any():
        sums[nz] = np.add.reduceat(desc.astype(np.float64), starts[nz], axis=0)
    return (sums / np.maximum(np.abs(sums).sum(1, keepdims=True), 1e-12)).astype(np.float32)
