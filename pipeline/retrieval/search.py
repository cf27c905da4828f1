"""Search: query images -> the model -> faiss top-k -> optional region re-ranking (paper 2.5) and query expansion."""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections import OrderedDict
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
from pipeline.store.region_store import RegionStore

log = logging.getLogger(__name__)

_ID_PARTS_CACHED = 64  # id-map parts a Searcher keeps (a part is one feature shard's rows)


def _sha256_file(path: str, chunk: int = 1 << 24) -> str:
    """sha256 of a local file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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

    def __init__(self, index_url: str, storage_options: dict[str, Any] | None = None, model: Any = None,
                 cache_dir: str | None = None) -> None:
        so = storage_options or {}
        self.so = so
        self.url = index_url
        files = layout.IndexReader(index_url, so)  # refuses an unfinished build and files a later build overwrote
        self.files = files
        self.meta = files.marker
        if "parts" not in self.meta:
            raise storage.StorageError(f"{index_url}: an index of an older layout (one id map and region store); "
                                       "rebuild it with jobs/index.py")
        self.local_weight = float(self.meta["config"]["local_weight"])
        self.pca = {"fused": PCA.from_bytes(files.read(layout.PCA_FUSED)),
                    "crow": PCA.from_bytes(files.read(layout.PCA_CROW))}
        self._cache_dir = cache_dir
        self.index = {"fused": self._load_index(layout.INDEX_FUSED), "crow": self._load_index(layout.INDEX_CROW)}
        # Only the parts' names and first rows are held; a part's ids are read when one of its rows is a hit.
        self.parts = self.meta["parts"]
        self.row0 = np.array([p["row0"] for p in self.parts], np.int64)
        self._ids: OrderedDict[int, tuple[list[str], list[str]]] = OrderedDict()
        self.regions = RegionStore(index_url, so, marker=self.meta)
        n = int(self.meta["images"])
        if not (self.index["fused"].ntotal == self.index["crow"].ntotal == n
                == sum(p["images"] for p in self.parts)
                and sum(p["regions"] for p in self.parts) == int(self.meta["regions"])):
            raise storage.StorageError(f"{index_url}: the index files disagree with their {layout.DONE} "
                                       f"({n} images, {self.meta['regions']} regions); rebuild the index")
        self._model = model

    def _load_index(self, name: str) -> Any:
        """A faiss index of the folder: IVF indexes with on-disk inverted lists are memory-mapped from a local copy
        (the folder itself when local), others read whole."""
        import faiss

        ivfdata = layout.IVFDATA[name]
        if ivfdata not in self.meta.get("files", {}):
            return fx.index_from_bytes(self.files.read(name))
        self.files.check_size(ivfdata)
        cache = self._cache_dir or tempfile.mkdtemp(prefix="sigregions-index-")
        path = self.files.local_path(name, cache)
        self.files.local_path(ivfdata, cache)
        if self.files.marker["files"][name]["sha256"] != _sha256_file(path):
            raise storage.StorageError(f"{self.url}: {name} is not the file its {layout.DONE} describes (a build "
                                       "overwrote it and did not finish); rebuild the index")
        return faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR)

    def resolve(self, rows: np.ndarray) -> list[tuple[str, str]]:
        """(image_id, uri) of index rows, reading only the id-map parts that hold them (a few parts are cached).

        Args:
            rows: ``(n,)`` index rows (>= 0).

        Returns:
            One (image_id, uri) per row, in order.
        """
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if rows.size and (rows.min() < 0 or rows.max() >= int(self.meta["images"])):
            raise IndexError(f"rows out of range for {self.meta['images']} images")
        part = np.searchsorted(self.row0, rows, side="right") - 1
        out = []
        for r, k in zip(rows, part):
            ids, uris = self._part_ids(int(k))
            i = int(r - self.row0[k])
            out.append((ids[i], uris[i]))
        return out

    def _part_ids(self, k: int) -> tuple[list[str], list[str]]:
        """One id-map part (verified against the marker), kept in a small LRU cache."""
        if k in self._ids:
            self._ids.move_to_end(k)
            return self._ids[k]
        t = storage.parquet_from_bytes(self.files.read(f"{layout.IDS_DIR}/{self.parts[k]['name']}.parquet"))
        self._ids[k] = (t.column("image_id").to_pylist(), t.column("uri").to_pylist())
        if len(self._ids) > _ID_PARTS_CACHED:
            self._ids.popitem(last=False)
        return self._ids[k]

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
            ids, scores = self.rerank(qg, ids, scores, rerank)
        return ids[:, :top_k], scores[:, :top_k]

    def rerank(self, qg: np.ndarray, ids: np.ndarray, scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Re-rank the top ``n`` of a ranking by regions, reading only those candidates' regions (RegionStore.fetch).

        Returns:
            (ids, scores) as ``rerank_top``.
        """
        n = min(n, ids.shape[1])
        top = ids[:, :n]
        batch = self.regions.fetch(top.ravel())
        # rerank_top sees the fetched batch as its whole store: candidate k of the batch is local id k.
        local = np.where(top >= 0, np.arange(top.size).reshape(top.shape), -1)
        new_local, new_scores = rerank_top(qg, local, scores[:, :n], batch.desc, batch.offsets, n)
        new_ids = np.where(new_local >= 0, top.ravel()[np.maximum(new_local, 0)], -1)
        return (np.concatenate([new_ids, ids[:, n:]], axis=1),
                np.concatenate([new_scores, np.asarray(scores[:, n:], new_scores.dtype)], axis=1))

    def search(self, image_uris: Sequence[str], top_k: int = 10, rerank: int = 0, qe: int = 0,
               space: str = "fused") -> list[list[Hit]]:
        """Search with query images; one ranked list of hits per query (see ``search_vectors`` for the scoring)."""
        ids, scores = self.search_vectors(self.describe(image_uris), top_k, rerank, qe, space)
        names = self.resolve(ids[ids >= 0])
        out, k = [], 0
        for row, srow in zip(ids, scores):
            hits = []
            for r, (i, s) in enumerate(zip(row, srow)):
                if i >= 0:
                    hits.append(Hit(r + 1, names[k][0], names[k][1], float(s)))
                    k += 1
            out.append(hits)
        return out


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
