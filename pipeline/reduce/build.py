"""The reduce stage: stream an extraction's Parquet, fit PCA, build faiss indexes and the region store, publish."""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import IndexConfig, public_dict
from pipeline.io import images as imgs
from pipeline.io import storage
from pipeline.reduce import faiss_index as fx
from pipeline.reduce.pca import PCA, fuse, l2n
from pipeline.schema import column_to_numpy
from pipeline.store import feature_store as fstore
from pipeline.store import index_store as layout

log = logging.getLogger(__name__)


IMAGE_COLUMNS = ["image_id", "uri", "status", "global", "local", "crow", "gem"]


def fused_vectors(t: pa.Table, local_weight: float) -> np.ndarray:
    """The paper's fused vector before PCA (2.4): concat(L2(global), w * L2(local))."""
    return fuse(column_to_numpy(t, "global"), column_to_numpy(t, "local"), local_weight)


def _ok_shards(features: str, so: dict[str, Any], regions: bool = True) -> Iterator[tuple[pa.Table, pa.Table | None]]:
    """Live, successfully processed image rows (sorted by image_id) and their regions, shard by shard."""
    cols: dict[str, Any] = {fstore.IMAGES_DIR: IMAGE_COLUMNS}
    if regions:
        cols[fstore.REGIONS_DIR] = ["rank", "descriptor", "box"]
    for shard in fstore.iter_live_shards(features, so, cols):
        t = shard[fstore.IMAGES_DIR]
        t = t.filter(pc.equal(t.column("status"), imgs.OK))
        if t.num_rows:
            yield t.sort_by("image_id"), shard.get(fstore.REGIONS_DIR)


def regions_in_order(r: pa.Table, image_ids: list[str], column: str = "descriptor") -> tuple[np.ndarray, np.ndarray]:
    """Region descriptors (or another vector column, e.g. ``box``) of ``image_ids`` in that order (each image's
    regions by rank), and the count per image.

    Args:
        r: a regions table holding (at least) those images' rows.
        image_ids: the order wanted.
        column: the vector column read.

    Returns:
        (counts (n,) int64, values (sum counts, D) float32).
    """
    pos = {i: k for k, i in enumerate(image_ids)}
    img = r.column("image_id").to_pylist()
    where = np.array([pos.get(i, -1) for i in img], dtype=np.int64)
    keep = where >= 0
    rank = r.column("rank").to_numpy()
    order = np.lexsort((rank[keep], where[keep]))
    desc = column_to_numpy(r, column)[keep][order]
    counts = np.bincount(where[keep], minlength=len(image_ids)).astype(np.int64)
    return counts, desc


def _reservoir(features: str, so: dict[str, Any], size: int, local_weight: float, seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """A uniform sample of at most ``size`` fused and CroW vectors, streaming (Vitter's algorithm R per row)."""
    rng = np.random.default_rng(seed)
    fused_s: np.ndarray | None = None
    crow_s: np.ndarray | None = None
    seen = 0
    for t, _ in _ok_shards(features, so, regions=False):
        f = fused_vectors(t, local_weight)
        c = l2n(column_to_numpy(t, "crow"))
        if fused_s is None:
            fused_s = np.zeros((size, f.shape[1]), np.float32)
            crow_s = np.zeros((size, c.shape[1]), np.float32)
        for i in range(len(f)):
            j = seen if seen < size else int(rng.integers(0, seen + 1))
            if j < size:
                fused_s[j], crow_s[j] = f[i], c[i]  # type: ignore[index]
            seen += 1
    if fused_s is None:
        raise storage.StorageError(f"no successfully extracted images under {features}")
    n = min(seen, size)
    return fused_s[:n], crow_s[:n], seen  # type: ignore[index]


def build(cfg: IndexConfig) -> dict[str, Any]:
    """Build the index artifacts of an extraction and publish them with a done-marker last.

    Two passes over the features, each shard by shard: (1) a reservoir sample fits PCA for the fused vector and for
    CroW; (2) every image is projected and added to the faiss indexes, and its region descriptors appended to the
    region store. The driver holds the indexes, the id map and the region store, never the raw corpus.

    Args:
        cfg: the index config.

    Returns:
        The done-marker's content (counts, factories, timings).
    """
    so = cfg.fs_options
    storage.check_writable(cfg.output, so)
    t0 = time.perf_counter()
    fused_s, crow_s, n = _reservoir(cfg.features, so, cfg.pca_sample, cfg.local_weight)
    pca_f = PCA.fit(fused_s, cfg.pca_dim, whiten=cfg.whiten)
    pca_c = PCA.fit(crow_s, cfg.pca_dim, whiten=cfg.whiten)
    budget = int(cfg.memory_budget_gb * 2**30)
    fact_f = cfg.factory or fx.choose_factory(n, pca_f.dim, budget)
    fact_c = cfg.factory or fx.choose_factory(n, pca_c.dim, budget)
    log.info("%d images; PCA fused %d -> %d, CroW %d -> %d; indexes %s / %s", n, fused_s.shape[1], pca_f.dim,
             crow_s.shape[1], pca_c.dim, fact_f, fact_c)
    t1 = time.perf_counter()

    idx_f = fx.new_index(pca_f.dim, fact_f)
    idx_c = fx.new_index(pca_c.dim, fact_c)
    # Train on the PCA sample (projected) when the index needs it (IVF / PQ).
    if not idx_f.is_trained:
        idx_f.train(pca_f.transform(fused_s))
    if not idx_c.is_trained:
        idx_c.train(pca_c.transform(crow_s))
    del fused_s, crow_s

    ids: list[str] = []
    uris: list[str] = []
    region_chunks: list[np.ndarray] = []
    box_chunks: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    for t, r in _ok_shards(cfg.features, so):
        fx.add_chunks(idx_f, [pca_f.transform(fused_vectors(t, cfg.local_weight))])
        fx.add_chunks(idx_c, [pca_c.transform(l2n(column_to_numpy(t, "crow")))])
        shard_ids = t.column("image_id").to_pylist()
        ids.extend(shard_ids)
        uris.extend(t.column("uri").to_pylist())
        n_per, desc = regions_in_order(r, shard_ids)
        counts.append(n_per)
        region_chunks.append(l2n(desc).astype(np.float16))
        box_chunks.append(regions_in_order(r, shard_ids, column="box")[1])
    # Search-time parameters are saved inside the index file (faiss defaults to nprobe=1: poor recall).
    for idx in (idx_f, idx_c):
        fx.set_search_params(idx, nprobe=cfg.nprobe, ef_search=cfg.ef_search)
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(np.concatenate(counts))
    regions = np.concatenate(region_chunks) if region_chunks else np.zeros((0, 1), np.float16)
    boxes = np.concatenate(box_chunks) if box_chunks else np.zeros((0, 4), np.float32)
    t2 = time.perf_counter()

    # The old done-marker goes before the first file is overwritten, the new one comes last with every file's
    # checksum: a build killed in between leaves no finished index, never a mix of two builds.
    w = layout.IndexWriter(cfg.output, so)
    w.write(layout.PCA_FUSED, pca_f.to_bytes())
    w.write(layout.PCA_CROW, pca_c.to_bytes())
    w.write(layout.INDEX_FUSED, fx.index_bytes(idx_f))
    w.write(layout.INDEX_CROW, fx.index_bytes(idx_c))
    w.write(layout.IDS, storage.parquet_bytes(pa.table({"row": pa.array(np.arange(len(ids)), pa.int64()),
                                                        "image_id": ids, "uri": uris})))
    w.write(layout.REGIONS, storage.npy_bytes(regions))
    w.write(layout.OFFSETS, storage.npy_bytes(offsets))
    w.write(layout.BOXES, storage.npy_bytes(boxes.astype(np.float32)))
    features_cfg = storage.read_json(storage.join(cfg.features, fstore.CONFIG), so)
    marker = w.finish({
        "config": public_dict(cfg), "model": features_cfg["model"], "model_hash": features_cfg["model_hash"],
        "images": len(ids), "regions": int(offsets[-1]), "factory": {"fused": fact_f, "crow": fact_c},
        "dims": {"fused": pca_f.dim, "crow": pca_c.dim},
        "seconds": {"pca": round(t1 - t0, 3), "index": round(t2 - t1, 3), "write": round(time.perf_counter() - t2, 3)},
        "finished": fstore.now()})
    return marker
