"""A benchmark corpus: a dataset's images aligned row by row with their extracted vectors and region descriptors;
the queries' features (corpus rows, or query regions described by the model)."""

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


@dataclass
class Queries:
    """The benchmark queries' features, row by row.

    Attributes:
        vectors: method input -> ``(Q, d)`` float32 (as ``Corpus.vectors``).
        region_desc: ``(Rq, D)`` L2-normalised significant regions of the queries.
        offsets: ``(Q + 1,)`` offsets into ``region_desc``.
        self_rows: ``(Q,)`` corpus row of each query's own image where that row is left out of its results and of
            its query expansion (the labels protocols), else -1.
        crops: per query ``(path relative to the root, box)`` when the queries are regions described by the model,
            else None (the queries are corpus rows).
    """

    vectors: dict[str, np.ndarray]
    region_desc: np.ndarray
    offsets: np.ndarray
    self_rows: np.ndarray
    crops: list[tuple[str, tuple[float, float, float, float]]] | None = None


def corpus_queries(c: Corpus, qrows: np.ndarray) -> Queries:
    """Queries that are corpus rows: their stored vectors and regions; each query's own row is ``self_rows``.

    Args:
        c: the corpus.
        qrows: ``(Q,)`` corpus rows.

    Returns:
        The queries.
    """
    qrows = np.asarray(qrows, dtype=np.int64)
    counts = c.offsets[qrows + 1] - c.offsets[qrows]
    offsets = np.zeros(len(qrows) + 1, np.int64)
    offsets[1:] = np.cumsum(counts)
    take = np.repeat(c.offsets[qrows] - offsets[:-1], counts) + np.arange(int(offsets[-1]))
    return Queries({m: v[qrows] for m, v in c.vectors.items()}, c.region_desc[take], offsets, qrows)


def described_queries(outs: list[dict[str, np.ndarray]], self_rows: np.ndarray,
                      crops: list[tuple[str, tuple[float, float, float, float]]],
                      regions: int | None = None) -> Queries:
    """Queries described by the model (``retrieval.search.describe_images``), e.g. cropped to their boxes.

    Args:
        outs: the model's output per query.
        self_rows: see ``Queries``.
        crops: per query its path and box.
        regions: keep each query's top-K regions and recompute its local feature from them, as ``load_corpus`` does
            for the corpus (None = all).

    Returns:
        The queries.
    """
    k = None if regions is None else int(regions)
    regs = [o["regions"][:k] for o in outs]
    counts = np.array([len(r) for r in regs], np.int64)
    offsets = np.zeros(len(outs) + 1, np.int64)
    offsets[1:] = np.cumsum(counts)
    desc = np.concatenate(regs).astype(np.float32) if len(outs) else np.zeros((0, 1), np.float32)
    vectors = {m: np.stack([o[m] for o in outs]).astype(np.float32) for m in VECTOR_COLUMNS}
    if regions is not None:
        vectors["local"] = _local_feature(counts, desc)
    return Queries(vectors, l2n(desc), offsets, np.asarray(self_rows, np.int64), list(crops))
