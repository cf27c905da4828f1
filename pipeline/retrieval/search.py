"""Search: query images -> the model -> faiss top-k -> optional region re-ranking (paper 2.5) and query expansion."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pipeline.config import ModelConfig
from pipeline.io import storage
from pipeline.io.images import decode_image
from pipeline.reduce import faiss_index as fx
from pipeline.reduce.pca import PCA, fuse, l2n
from pipeline.retrieval.rerank import rerank_top
from pipeline.store import index_store as layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    """One search result."""

    rank: int
    image_id: str
    uri: str
    score: float


class Searcher:
    """Loads a published index (``jobs/index.py`` output) and answers queries in batches.

    Args:
        index_url: the index output URL (must hold the done-marker).
        storage_options: fsspec options.
        model: a RegionModel to describe query images (default: built from the index's model config on first use).
    """

    def __init__(self, index_url: str, storage_options: dict[str, Any] | None = None, model: Any = None) -> None:
        so = storage_options or {}
        self.so = so
        files = layout.IndexReader(index_url, so)  # refuses an unfinished build and files a later build overwrote
        self.meta = files.marker
        self.local_weight = float(self.meta["config"]["local_weight"])
        self.pca = {"fused": PCA.from_bytes(files.read(layout.PCA_FUSED)),
                    "crow": PCA.from_bytes(files.read(layout.PCA_CROW))}
        self.index = {"fused": fx.index_from_bytes(files.read(layout.INDEX_FUSED)),
                      "crow": fx.index_from_bytes(files.read(layout.INDEX_CROW))}
        t = storage.parquet_from_bytes(files.read(layout.IDS))
        self.ids = t.column("image_id").to_pylist()
        self.uris = t.column("uri").to_pylist()
        self.regions = storage.npy_from_bytes(files.read(layout.REGIONS))
        self.offsets = storage.npy_from_bytes(files.read(layout.OFFSETS))
        n = int(self.meta["images"])
        if not (len(self.ids) == self.index["fused"].ntotal == self.index["crow"].ntotal == len(self.offsets) - 1 == n
                and int(self.offsets[-1]) == len(self.regions) == int(self.meta["regions"])):
            raise storage.StorageError(f"{index_url}: the index files disagree with their {layout.DONE} "
                                       f"({n} images, {self.meta['regions']} regions); rebuild the index")
        self._model = model

    @property
    def model(self) -> Any:
        """The region model that describes queries exactly as the corpus was described."""
        if self._model is None:
            from pipeline.model.region_model import RegionModel

            # Indexes written before region pyramids existed described their corpus at one scale.
            self._model = RegionModel(ModelConfig(**{"region_scales": "1", **self.meta["model"]}),
                                      storage_options=self.so)
        return self._model

    def describe(self, image_uris: Sequence[str]) -> list[dict[str, np.ndarray]]:
        """Run the model on query images (paths or URLs).

        Raises:
            ValueError: when a query image cannot be decoded.
        """
        decoded = []
        for uri in image_uris:
            d = decode_image(storage.read_bytes(uri, self.so), max_side=self.model.config.max_side)
            if not d.ok:
                raise ValueError(f"query {uri}: {d.status}: {d.error}")
            decoded.append(d)
        return self.model([d.array for d in decoded], [(d.width, d.height) for d in decoded])

    def search_vectors(self, outs: Sequence[dict[str, np.ndarray]], top_k: int = 10, rerank: int = 0, qe: int = 0,
                       space: str = "fused") -> tuple[np.ndarray, np.ndarray]:
        """Batch search with already-described queries (vectorised over queries).

        Scoring: the first pass ranks by inner product in ``space`` (fused global + local after PCA + L2, or CroW
        after PCA + L2). With ``qe`` = k, the query vector is replaced by L2(q + sum of its top-k vectors) and searched
        again (average query expansion). With ``rerank`` = N, the top-N are re-ranked by
        ``0.5 * max_j cos(q_gem, r_j) + 0.5 * first-pass score``, where q_gem is the query's global GeM descriptor
        (pooled like the region descriptors r_j of the candidate, so the two live in the same space).

        Returns:
            (ids (Q, top_k) int64 database rows, scores (Q, top_k) float32).
        """
        if space == "fused":
            q = np.stack([fuse(o["global"][None], o["local"][None], self.local_weight)[0] for o in outs])
        else:
            q = l2n(np.stack([o["crow"] for o in outs]))
        q = self.pca[space].transform(q)
        index = self.index[space]
        depth = min(max(top_k, rerank, qe), index.ntotal)
        scores, ids = fx.search(index, q, depth)
        if qe > 0:
            vecs = _reconstruct(index, ids[:, :qe])
            q = l2n(q + vecs.sum(axis=1))
            scores, ids = fx.search(index, q, depth)
        if rerank > 0:
            qg = l2n(np.stack([o["gem"] for o in outs]))
            ids, scores = rerank_top(qg, ids, scores, self.regions, self.offsets, rerank)
        return ids[:, :top_k], scores[:, :top_k]

    def search(self, image_uris: Sequence[str], top_k: int = 10, rerank: int = 0, qe: int = 0,
               space: str = "fused") -> list[list[Hit]]:
        """Search with query images; one ranked list of hits per query (see ``search_vectors`` for the scoring)."""
        ids, scores = self.search_vectors(self.describe(image_uris), top_k, rerank, qe, space)
        return [[Hit(r + 1, self.ids[i], self.uris[i], float(s)) for r, (i, s) in enumerate(zip(row, srow)) if i >= 0]
                for row, srow in zip(ids, scores)]


def _reconstruct(index: Any, ids: np.ndarray) -> np.ndarray:
    """Stored vectors of ``ids`` (Q, k) -> (Q, k, d); missing ids (-1) give zeros. Needs a reconstructable index
    (Flat, HNSW; IVF after ``make_direct_map``)."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and not ivf.direct_map.type:
        ivf.make_direct_map()
    out = np.zeros((*ids.shape, index.d), dtype=np.float32)
    for qi, row in enumerate(ids):
        for j, i in enumerate(row):
            if i >= 0:
                out[qi, j] = index.reconstruct(int(i))
    return out
