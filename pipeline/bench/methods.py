"""The compared retrieval methods, in one place: each method's database vectors and its ranker over a corpus."""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from pipeline.bench.corpus import Corpus, Queries, corpus_queries
from pipeline.bench.diffusion import dba, diffusion_ranking
from pipeline.bench.kreciprocal import k_reciprocal_ranking
from pipeline.bench.metrics import rank_by_similarity
from pipeline.config import BenchmarkConfig
from pipeline.reduce.pca import PCA, fuse_vectors, l2n
from pipeline.retrieval.rerank import average_query_expansion, rerank_regions_top, rerank_top
from pipeline.schema import GLOBAL_KINDS

# The global descriptors of one forward pass, each ranked on its own (the classic baselines and the paper's global).
DESCRIPTOR_METHODS = GLOBAL_KINDS
ALL_METHODS = ("bow",) + DESCRIPTOR_METHODS + ("ours", "ours+qe", "crow+rerank", "crow+rerank+qe", "crow+regions",
                                                "crow+regions+qe")
# On top of `ours`: database-side augmentation (alone and with AQE) and diffusion over a kNN graph of the database.
ALL_METHODS += ("ours+dba", "ours+dba+qe", "ours+diffusion")
# On top of `ours`: k-reciprocal re-ranking (Jaccard distance of k-reciprocal neighbour sets).
ALL_METHODS += ("ours+kr",)


def select_methods(methods: str) -> list[str]:
    """The methods a benchmark runs, in the order given.

    Args:
        methods: comma-separated method names; empty = every method (``ALL_METHODS``).

    Returns:
        The method names.

    Raises:
        ValueError: on an unknown method.
    """
    wanted = [m.strip() for m in methods.split(",") if m.strip()] or list(ALL_METHODS)
    unknown = set(wanted) - set(ALL_METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {ALL_METHODS}")
    return wanted


def method_vectors(c: Corpus, cfg: BenchmarkConfig) -> dict[str, np.ndarray]:
    """L2-normalised database vectors of each descriptor method and of ``ours`` (paper 2.4: PCA + L2 of the fused
    global + local vector, fused as the index build fuses it, ``pca.fuse_vectors`` with ``--fuse-global``; PCA is
    fitted on the database itself, unsupervised)."""
    out = {m: l2n(c.vectors[m]) for m in DESCRIPTOR_METHODS}
    fused = fuse_vectors(c.vectors, cfg.fuse_global, cfg.local_weight)
    out["ours"] = PCA.fit(fused, cfg.pca_dim).transform(fused)
    return out


def rerank_ranking(c: Corpus, vec: dict[str, np.ndarray], q: Queries, qcrow: np.ndarray, depth: int, n: int,
                   qe: int, mode: str = "gem") -> np.ndarray:
    """CroW initial ranking, top-N re-ranked by regions (paper 2.5); with ``qe`` > 0 the CroW query is then expanded
    with its top ``qe`` re-ranked results other than its own image (AQE), and ranked and re-ranked again.

    ``mode="gem"``: the query's global GeM (pooled like the regions) against each candidate's regions
    (``rerank_top``); ``mode="regions"``: the query's own significant regions against the candidate's regions
    (``rerank_regions_top``: the mean over query regions of their best match, descriptors centred on the
    database's mean region). ``qcrow``: the queries' CroW
    vectors as ``vec["crow"]`` holds the database's."""
    crow = vec["crow"]
    qc = qcrow
    qg = l2n(q.vectors["gem"])
    center = c.region_desc.mean(axis=0) if mode == "regions" and len(c.region_desc) else None

    def rerank(first: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        if mode == "gem":
            return rerank_top(qg, *first, c.region_desc, c.offsets, n)[0]
        return rerank_regions_top(q.region_desc, q.offsets, *first, c.region_desc, c.offsets, n, center=center)[0]

    ids = rerank(rank_by_similarity(qc, crow, depth, with_scores=True))
    if qe > 0:
        q2 = average_query_expansion(qc, crow, expansion_neighbours(ids, q.self_rows, qe), qe)
        ids = rerank(rank_by_similarity(q2, crow, depth, with_scores=True))
    return ids


def expansion_neighbours(ids: np.ndarray, qrows: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` results of each query that are not the query's own row: the set that AQE averages in.

    The query stays in the database for ranking, so it usually ranks first; averaging it in again would give
    ``l2n(2q + ...)`` instead of ``l2n(q + k neighbours)``.

    Args:
        ids: ``(Q, M)`` ranking, best first.
        qrows: ``(Q,)`` database row of each query.
        k: neighbours wanted.

    Returns:
        ``(Q, k)`` ``int64`` ids in rank order, ``-1`` (which AQE ignores) where fewer than ``k`` others exist.
    """
    ids = np.asarray(ids, dtype=np.int64)
    other = ids != np.asarray(qrows, dtype=np.int64)[:, None]
    order = np.argsort(~other, axis=1, kind="stable")  # the others first, in rank order
    picked = np.take_along_axis(np.where(other, ids, -1), order, axis=1)[:, :k]
    return np.pad(picked, ((0, 0), (0, k - picked.shape[1])), constant_values=-1)


def _bow_image(root: str, path: str, box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """An image (or its region ``box``, original pixels) as the BoW baseline sees it: RGB, fitted into 300 x 300."""
    from PIL import Image, ImageOps

    with Image.open(os.path.join(root, path)) as im:
        im = ImageOps.exif_transpose(im).convert("RGB") if box is not None else im.convert("RGB")
        if box is not None:
            im = im.crop(tuple(int(round(v)) for v in box))
        im.thumbnail((300, 300))
        return np.asarray(im)


def bow_vectors(c: Corpus, cfg: BenchmarkConfig, with_model: bool = False) -> Any:
    """SIFT bag-of-words tf-idf vectors of every database image (the paper's traditional baseline); with
    ``with_model`` also the fitted ``BowModel``."""
    from pipeline.bench.bow import BowModel, extract_sift_many

    sift = extract_sift_many((_bow_image(c.root, p) for p in c.paths), workers=os.cpu_count() or 1)
    model = BowModel.fit(sift, k=cfg.bow_words, seed=cfg.seed)
    return (model.encode(sift), model) if with_model else model.encode(sift)


def bow_crop_vectors(c: Corpus, crops: list[tuple[str, tuple[float, float, float, float]]], model: Any) -> np.ndarray:
    """BoW vectors of query regions: SIFT of each crop, encoded with the database's vocabulary."""
    from pipeline.bench.bow import extract_sift_many

    sift = extract_sift_many((_bow_image(c.root, p, b) for p, b in crops), workers=os.cpu_count() or 1)
    return model.encode(sift)


def query_method_vectors(c: Corpus, cfg: BenchmarkConfig, q: Queries) -> dict[str, np.ndarray]:
    """The queries' vectors of each descriptor method and of ``ours`` (projected by the PCA fitted on the database,
    as ``method_vectors`` does for the database)."""
    out = {m: l2n(q.vectors[m]) for m in DESCRIPTOR_METHODS}
    fused = fuse_vectors(c.vectors, cfg.fuse_global, cfg.local_weight)
    out["ours"] = PCA.fit(fused, cfg.pca_dim).transform(fuse_vectors(q.vectors, cfg.fuse_global, cfg.local_weight))
    return out


def method_rankers(c: Corpus, cfg: BenchmarkConfig, qrows: np.ndarray,
                   depth: int, queries: Queries | None = None) -> dict[str, Callable[[], np.ndarray]]:
    """One ranker per method in ``ALL_METHODS``; each returns the ``(Q, depth)`` ranking of the queries.

    The query's own image stays in the database; the protocols remove it where they should.

    Args:
        c: the corpus.
        cfg: the benchmark config (PCA dimension, local weight, re-rank and QE depths, BoW vocabulary, seed).
        qrows: ``(Q,)`` database rows of the queries (used when ``queries`` is None).
        depth: ranking depth (clipped to the database size).
        queries: the queries' features when they are not corpus rows (e.g. query regions described by the model).

    Returns:
        Method name -> a ranker run on demand (BoW's vocabulary, for one, is only built when asked for).
    """
    vec = method_vectors(c, cfg)
    q = corpus_queries(c, qrows) if queries is None else queries
    qvec = ({m: v[qrows] for m, v in vec.items()} if queries is None else query_method_vectors(c, cfg, queries))

    def descriptor(m: str) -> np.ndarray:
        """Rank by one method's vectors."""
        return rank_by_similarity(qvec[m], vec[m], depth)

    def ours_qe() -> np.ndarray:
        """``ours`` with AQE over its top ``qe`` results other than the query's own image."""
        ours = vec["ours"]
        first = rank_by_similarity(qvec["ours"], ours, cfg.qe + 1)  # one more: the query is usually among them
        q2 = average_query_expansion(qvec["ours"], ours, expansion_neighbours(first, q.self_rows, cfg.qe), cfg.qe)
        return rank_by_similarity(q2, ours, depth)

    def bow() -> np.ndarray:
        """Rank by SIFT BoW tf-idf vectors (cropped queries: SIFT of the crop, encoded by the database's vocabulary)."""
        b, model = bow_vectors(c, cfg, with_model=True)
        if q.crops is None:
            return rank_by_similarity(b[qrows], b, depth)
        return rank_by_similarity(bow_crop_vectors(c, q.crops, model), b, depth)

    rankers: dict[str, Callable[[], np.ndarray]] = {m: (lambda m=m: descriptor(m))
                                                    for m in (*DESCRIPTOR_METHODS, "ours")}
    rankers["ours+qe"] = ours_qe
    rankers["crow+rerank"] = lambda: rerank_ranking(c, vec, q, qvec["crow"], depth, cfg.rerank, 0)
    rankers["crow+rerank+qe"] = lambda: rerank_ranking(c, vec, q, qvec["crow"], depth, cfg.rerank, cfg.qe)
    rankers["crow+regions"] = lambda: rerank_ranking(c, vec, q, qvec["crow"], depth, cfg.rerank, 0, "regions")
    rankers["crow+regions+qe"] = lambda: rerank_ranking(c, vec, q, qvec["crow"], depth, cfg.rerank, cfg.qe,
                                                        "regions")
    rankers["bow"] = bow

    def ours_dba(qe: int) -> np.ndarray:
        """``ours`` against a DBA'd database (the query keeps its own vector: a new image has no DBA vector); with
        ``qe`` > 0, AQE over the DBA'd vectors of its top ``qe`` results other than the query's own image."""
        db = dba(vec["ours"], cfg.dba_k, cfg.dba_alpha)
        qv = qvec["ours"]
        if qe > 0:
            first = rank_by_similarity(qv, db, qe + 1)
            qv = average_query_expansion(qv, db, expansion_neighbours(first, q.self_rows, qe), qe)
        return rank_by_similarity(qv, db, depth)

    rankers["ours+dba"] = lambda: ours_dba(0)
    rankers["ours+dba+qe"] = lambda: ours_dba(cfg.qe)
    rankers["ours+diffusion"] = lambda: diffusion_ranking(
        vec["ours"], qvec["ours"], depth, k=cfg.diffusion_k, alpha=cfg.diffusion_alpha, seeds=cfg.diffusion_seeds)
    # Corpus-row queries are encoded with the database (they are database rows); described queries (crops) with it.
    rankers["ours+kr"] = lambda: k_reciprocal_ranking(
        vec["ours"], qvec["ours"], depth, k1=cfg.kr_k1, k2=cfg.kr_k2, lam=cfg.kr_lambda,
        q_rows=qrows if queries is None else None)
    return rankers
