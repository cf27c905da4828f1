"""Search: query images (or regions of them) -> the model -> faiss top-k -> region re-ranking (paper 2.5), query
expansion, and the candidate region each hit matched."""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from pipeline.config import FUSE_GLOBALS, Box, ModelConfig
from pipeline.io import storage
from pipeline.io.images import OK, Decoded, decode_image, resize_max_side
from pipeline.reduce import faiss_index as fx
from pipeline.reduce.pca import PCA, fuse_columns, fuse_vectors, l2n
from pipeline.retrieval.rerank import match_regions, rerank_regions_top, rerank_top
from pipeline.store import index_store as layout
from pipeline.store.region_store import RegionStore

log = logging.getLogger(__name__)


# Re-ranking modes: "regions" matches the query's own significant regions with each candidate's regions
# (rerank.match_regions); "gem" compares the query's whole-image GeM with each candidate's regions (the paper's 2.5).
RERANK_MODES = ("regions", "gem")

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
    """One search result; ``matched_box`` is the candidate region that matched the query best (x1, y1, x2, y2 in the
    candidate's original pixels; None when the candidate has no regions or the index predates stored boxes)."""

    rank: int
    image_id: str
    uri: str
    score: float
    matched_box: tuple[float, float, float, float] | None = None


def decode_query(data: bytes, max_side: int, box: Box | None = None) -> Decoded:
    """Decode a query image, or only its region ``box``, the way the corpus images were decoded.

    With a box the image is decoded at full size (EXIF orientation applied), cropped to the box (clipped to the image,
    outward to whole pixels), and the crop resized so its longer side is ``max_side``: the crop is described exactly
    as an image file holding only that region would be. ``width``/``height`` of the result are the crop's.

    Args:
        data: encoded image bytes.
        max_side: the model's input size (longer side).
        box: ``(x1, y1, x2, y2)`` in original pixels, or None for the whole image.

    Returns:
        The decoded image or crop (a failed ``Decoded`` when the bytes are not a decodable image).

    Raises:
        ValueError: the box lies outside the image.
    """
    d = decode_image(data, max_side=max_side)
    if box is None or not d.ok:
        return d
    x1, y1 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    x2, y2 = min(d.width, int(np.ceil(box[2]))), min(d.height, int(np.ceil(box[3])))
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"box {tuple(box)} lies outside the {d.width}x{d.height} image")
    full = decode_image(data, max_side=max(d.width, d.height))  # original pixels, oriented
    if not full.ok:
        return full
    crop = Image.fromarray(full.array[y1:y2, x1:x2])
    target = resize_max_side(x2 - x1, y2 - y1, max_side)
    if crop.size != target:
        crop = crop.resize(target, Image.Resampling.BILINEAR)
    return Decoded(np.array(crop, dtype=np.uint8), x2 - x1, y2 - y1, OK, "")


def describe_images(model: Any, datas: Sequence[bytes], boxes: Sequence[Box | None] | None = None,
                    names: Sequence[str] | None = None, batch_size: int = 16) -> list[dict[str, np.ndarray]]:
    """Run the region model on query images or query regions: the one path search and the benchmarks share.

    Args:
        model: a ``RegionModel`` (its ``config.max_side`` sets the input size).
        datas: encoded images.
        boxes: per image a region ``(x1, y1, x2, y2)`` in original pixels to describe instead of the whole image,
            or None; default: whole images.
        names: per image a name for error messages.
        batch_size: images per forward pass.

    Returns:
        One model output per image (see ``RegionModel``); region boxes are in the crop's pixels when a box was given.

    Raises:
        ValueError: an image cannot be decoded, or its box lies outside it.
    """
    boxes = list(boxes) if boxes is not None else [None] * len(datas)
    names = list(names) if names is not None else [f"#{i}" for i in range(len(datas))]
    if len(boxes) != len(datas) or len(names) != len(datas):
        raise ValueError(f"{len(datas)} images but {len(boxes)} boxes and {len(names)} names")
    outs: list[dict[str, np.ndarray]] = []
    for b0 in range(0, len(datas), batch_size):
        decoded = []
        for k in range(b0, min(b0 + batch_size, len(datas))):
            try:
                d = decode_query(datas[k], model.config.max_side, boxes[k])
            except ValueError as e:
                raise ValueError(f"query {names[k]}: {e}") from None
            if not d.ok:
                raise ValueError(f"query {names[k]}: {d.status}: {d.error}")
            decoded.append(d)
        outs += model([d.array for d in decoded], [(d.width, d.height) for d in decoded])
    return outs


def query_regions(outs: Sequence[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The queries' own significant regions, stacked: ``(regions (Rq, D) L2-normalised, offsets (Q + 1,))``."""
    counts = [len(o["regions"]) for o in outs]
    offsets = np.zeros(len(outs) + 1, np.int64)
    offsets[1:] = np.cumsum(counts)
    dim = outs[0]["gem"].shape[-1] if outs else 0
    regions = l2n(np.concatenate([o["regions"] for o in outs])) if offsets[-1] else np.zeros((0, dim), np.float32)
    return regions.astype(np.float32), offsets


class Searcher:
    """Loads a published index (``jobs/index.py`` output) and answers queries in batches.

    Args:
        index_url: the index output URL (must hold the done-marker).
        storage_options: fsspec options.
        model: a RegionModel to describe query images (default: built from the index's model config on first use).
        cache_dir: where IVF indexes of a remote folder are copied to be memory-mapped (default: a temp dir).
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
        # Queries are fused as the index's images were; an index built before the option existed fused the global one.
        self.fuse_global = self.meta["config"].get("fuse_global", "global")
        if self.fuse_global not in FUSE_GLOBALS:
            raise storage.StorageError(f"{index_url}: unknown fuse_global {self.fuse_global!r} in its {layout.DONE}")
        self.pca = {"fused": PCA.from_bytes(files.read(layout.PCA_FUSED)),
                    "crow": PCA.from_bytes(files.read(layout.PCA_CROW))}
        self._cache_dir = cache_dir
        self.index = {"fused": self._load_index(layout.INDEX_FUSED), "crow": self._load_index(layout.INDEX_CROW)}
        # Only the parts' names and first rows are held; a part's ids are read when one of its rows is a hit.
        self.parts = self.meta["parts"]
        self.row0 = np.array([p["row0"] for p in self.parts], np.int64)
        self._ids: OrderedDict[int, tuple[list[str], list[str]]] = OrderedDict()
        self.regions = RegionStore(index_url, so, marker=self.meta)  # read by candidate rows, never whole
        n = int(self.meta["images"])
        if not (self.index["fused"].ntotal == self.index["crow"].ntotal == n
                == sum(p["images"] for p in self.parts)
                and sum(p["regions"] for p in self.parts) == int(self.meta["regions"])):
            raise storage.StorageError(f"{index_url}: the index files disagree with their {layout.DONE} "
                                       f"({n} images, {self.meta['regions']} regions); rebuild the index")
        self._model = model

    def _load_index(self, name: str) -> Any:
        """A faiss index of the folder, searched with PCA outputs: IVF indexes with on-disk inverted lists are
        memory-mapped from a local copy (the folder itself when local), others read whole. The published file holds
        the index behind its PCA (``IndexPreTransform``, for standard faiss tooling); the Searcher applies the PCA
        itself (query expansion adds PCA-space vectors) and searches the index inside. Files of builds before that
        hold the bare index."""
        import faiss

        ivfdata = layout.IVFDATA[name]
        if ivfdata not in self.meta.get("files", {}):
            return fx.unwrap(fx.index_from_bytes(self.files.read(name)))
        self.files.check_size(ivfdata)
        cache = self._cache_dir or tempfile.mkdtemp(prefix="sigregions-index-")
        path = self.files.local_path(name, cache)
        self.files.local_path(ivfdata, cache)
        if self.files.marker["files"][name]["sha256"] != _sha256_file(path):
            raise storage.StorageError(f"{self.url}: {name} is not the file its {layout.DONE} describes (a build "
                                       "overwrote it and did not finish); rebuild the index")
        return fx.unwrap(faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR))

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

    def describe(self, image_uris: Sequence[str], boxes: Sequence[Box | None] | None = None,
                 batch_size: int = 16) -> list[dict[str, np.ndarray]]:
        """Run the model on query images (paths or URLs), or on the regions ``boxes`` of them (see
        ``describe_images``).

        Raises:
            ValueError: when a query image cannot be decoded or its box lies outside it.
        """
        datas = [storage.read_bytes(uri, self.so) for uri in image_uris]
        return describe_images(self.model, datas, boxes, names=list(image_uris), batch_size=batch_size)

    def _candidate_regions(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any]:
        """The regions of the candidates ``ids`` (Q, N), fetched once each.

        Returns:
            (ids as positions in the batch (-1 kept), the index row of each position, the ``RegionBatch``).
        """
        valid = ids >= 0
        uniq, inv = np.unique(ids[valid], return_inverse=True)
        local = np.full(ids.shape, -1, np.int64)
        local[valid] = inv
        return local, uniq, self.regions.fetch(uniq)

    def search_vectors(self, outs: Sequence[dict[str, np.ndarray]], top_k: int = 10, rerank: int = 0, qe: int = 0,
                       space: str = "fused", mode: str = "regions") -> tuple[np.ndarray, np.ndarray]:
        """Batch search with already-described queries (vectorised over queries).

        Scoring: the first pass ranks by inner product in ``space`` (fused global + local after PCA + L2, or CroW
        after PCA + L2). With ``qe`` = k, the query vector is replaced by L2(q + sum of its top-k vectors) and searched
        again (average query expansion). With ``rerank`` = N, the top-N are re-ranked by
        ``0.5 * region similarity + 0.5 * first-pass score``; the region similarity is, with ``mode="regions"``, the
        mean over the query's significant regions of their best match among the candidate's regions, all descriptors
        centred on the index's mean region (``rerank.match_regions``), and with ``mode="gem"`` ``max_j cos(q_gem, r_j)``, where q_gem
        is the query's global GeM descriptor (pooled like the candidate's region descriptors r_j).

        Returns:
            (ids (Q, top_k) int64 database rows, scores (Q, top_k) float32).
        """
        if mode not in RERANK_MODES:
            raise ValueError(f"mode must be one of {RERANK_MODES}, got {mode!r}")
        if space == "fused":
            q = fuse_vectors({c: np.stack([o[c] for o in outs]) for c in fuse_columns(self.fuse_global)},
                             self.fuse_global, self.local_weight)
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
            ids, scores = self.rerank(outs, ids, scores, rerank, mode)
        return ids[:, :top_k], scores[:, :top_k]

    def rerank(self, outs: Sequence[dict[str, np.ndarray]], ids: np.ndarray, scores: np.ndarray, n: int,
               mode: str = "regions") -> tuple[np.ndarray, np.ndarray]:
        """Re-rank the top ``n`` of a ranking by regions, reading only those candidates' regions (one
        ``RegionStore.fetch`` of the distinct candidates).

        Args:
            outs: the queries' model outputs.
            ids: ``(Q, k)`` index rows (``-1`` padding), best first.
            scores: ``(Q, k)`` first-pass scores.
            n: how many of the top are re-ranked.
            mode: see ``search_vectors``.

        Returns:
            (ids, scores) with the top ``n`` re-ordered and re-scored, the rest as given.
        """
        n = min(n, ids.shape[1])
        local, rows, batch = self._candidate_regions(ids[:, :n])
        if mode == "gem":
            qg = l2n(np.stack([o["gem"] for o in outs]))
            top, top_sc = rerank_top(qg, local, scores[:, :n], batch.desc, batch.offsets, n)
        else:
            top, top_sc = rerank_regions_top(*query_regions(outs), local, scores[:, :n], batch.desc,
                                             batch.offsets, n, center=self.regions.center)
        top = np.where(top >= 0, rows[np.maximum(top, 0)], -1) if len(rows) else top  # positions -> index rows
        return (np.concatenate([top, ids[:, n:]], axis=1),
                np.concatenate([top_sc, np.asarray(scores[:, n:], top_sc.dtype)], axis=1))

    def matched_boxes(self, outs: Sequence[dict[str, np.ndarray]], ids: np.ndarray,
                      mode: str = "regions") -> np.ndarray:
        """For each hit, the box of the candidate region that matched the query best.

        With ``mode="regions"`` that is the candidate region of the best (query region, candidate region) pair, with
        ``mode="gem"`` the candidate region most similar to the query's whole GeM (``rerank.match_regions``).

        Args:
            outs: the queries' model outputs.
            ids: ``(Q, k)`` hits (index rows, ``-1`` padding).
            mode: as in ``search_vectors``.

        Returns:
            ``(Q, k, 4)`` float32 boxes in each hit's original pixels, NaN where unknown.
        """
        local, _, batch = self._candidate_regions(np.asarray(ids, dtype=np.int64))
        if mode == "gem":
            qr = l2n(np.stack([o["gem"] for o in outs]))
            _, best = match_regions(qr, np.arange(len(outs) + 1), local, batch.desc, batch.offsets, 1.0, -np.inf)
        else:
            _, best = match_regions(*query_regions(outs), local, batch.desc, batch.offsets,
                                    center=self.regions.center)
        out = np.full((*best.shape, 4), np.nan, np.float32)
        out[best >= 0] = batch.boxes[best[best >= 0]]
        return out

    def search(self, image_uris: Sequence[str], top_k: int = 10, rerank: int = 0, qe: int = 0, space: str = "fused",
               boxes: Sequence[Box | None] | None = None, mode: str = "regions") -> list[list[Hit]]:
        """Search with query images, or with regions of them; one ranked list of hits per query.

        Args:
            image_uris: query images (paths or URLs).
            top_k: hits per query.
            rerank: re-rank the top-N by regions (0 = off).
            qe: average query expansion depth (0 = off).
            space: "fused" or "crow".
            boxes: per query a region ``(x1, y1, x2, y2)`` in original pixels to search with, or None (whole image).
            mode: the re-rank's region similarity (see ``search_vectors``); also how ``matched_box`` is chosen.

        Returns:
            Per query its hits, best first.
        """
        outs = self.describe(image_uris, boxes)
        return self.hits(outs, *self.search_vectors(outs, top_k, rerank, qe, space, mode), mode=mode)

    def hits(self, outs: Sequence[dict[str, np.ndarray]], ids: np.ndarray, scores: np.ndarray,
             mode: str = "regions") -> list[list[Hit]]:
        """Rankings -> hits with their ids, uris and matched region boxes."""
        mb = self.matched_boxes(outs, ids, mode)
        out = []
        for qi, (row, srow) in enumerate(zip(ids, scores)):
            keep = [(r, i, s) for r, (i, s) in enumerate(zip(row, srow)) if i >= 0]
            names = self.resolve(np.array([i for _, i, _ in keep], np.int64))
            out.append([Hit(r + 1, iid, uri, float(s), _box_or_none(mb[qi, r]))
                        for (r, _, s), (iid, uri) in zip(keep, names)])
        return out


def _box_or_none(b: np.ndarray) -> tuple[float, float, float, float] | None:
    """A box as a tuple of floats, or None when unknown (NaN)."""
    return None if np.isnan(b).any() else tuple(round(float(v), 1) for v in b)  # type: ignore[return-value]


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
