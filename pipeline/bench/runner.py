"""Offline retrieval benchmarks: one extraction, every method as a row, evaluated under a protocol."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow.compute as pc

from pipeline.bench import datasets as ds
from pipeline.bench import metrics as ev
from pipeline.bench.report import markdown_table, results_sheet, save_png, to_jsonable
from pipeline.config import BenchmarkConfig, ExtractConfig, public_dict
from pipeline.extract import driver
from pipeline.extract.runners import LocalRunner, Runner
from pipeline.io import images as imgs
from pipeline.io import storage
from pipeline.reduce.build import regions_in_order
from pipeline.reduce.pca import PCA, fuse, l2n
from pipeline.retrieval.rerank import average_query_expansion, rerank_top
from pipeline.schema import column_to_numpy
from pipeline.store import feature_store as fstore

log = logging.getLogger(__name__)

DESCRIPTOR_METHODS = ("global", "spoc", "mac", "rmac", "gem", "crow")
ALL_METHODS = ("bow",) + DESCRIPTOR_METHODS + ("ours", "ours+qe", "crow+rerank", "crow+rerank+qe")
INSTANCE_ONLY = ("crow+rerank", "crow+rerank+qe")


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


def extract_dataset(cfg: BenchmarkConfig, out: str, runner: Runner) -> str:
    """Run the extraction over a dataset's images with ``runner`` (only images not already done there are processed).

    Returns:
        The features URL.
    """
    mc = cfg.model_config()
    ecfg = ExtractConfig(**dataclasses.asdict(mc), input=cfg.dataset, output=out, batch_size=cfg.batch_size,
                         shard_size=cfg.shard_size, storage_options=cfg.storage_options)
    ecfg.validate()
    driver.run(ecfg, runner)
    return out


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
    t = fstore.read_live_table(features, "images", so, ["status", *DESCRIPTOR_METHODS, "local"])
    t = t.filter(pc.equal(t.column("status"), imgs.OK))
    row_of = {i: k for k, i in enumerate(t.column("image_id").to_pylist())}
    keep = [k for k, p in enumerate(paths) if p in row_of]
    missing = [p for p in paths if p not in row_of]
    take = np.array([row_of[paths[k]] for k in keep], dtype=np.int64)
    vectors = {m: column_to_numpy(t, m)[take] for m in (*DESCRIPTOR_METHODS, "local")}
    r = fstore.read_live_table(features, "regions", so, ["rank", "descriptor"])
    kept_paths = [paths[k] for k in keep]
    if regions is not None:
        r = r.filter(pc.less(r.column("rank"), regions))
    counts, desc = regions_in_order(r, kept_paths)
    if regions is not None:
        # Paper eq. (1)-(2) over the kept regions: f = sum_k r_k, then f / ||f||_1.
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        sums = np.zeros((len(counts), desc.shape[1]), np.float64)
        nz = counts > 0
        if nz.any():
            sums[nz] = np.add.reduceat(desc.astype(np.float64), starts[nz], axis=0)
        vectors["local"] = (sums / np.maximum(np.abs(sums).sum(1, keepdims=True), 1e-12)).astype(np.float32)
    offsets = np.zeros(len(kept_paths) + 1, np.int64)
    offsets[1:] = np.cumsum(counts)
    return Corpus(root, kept_paths, None if labels is None else labels[keep], vectors, l2n(desc), offsets, missing)


def method_vectors(c: Corpus, cfg: BenchmarkConfig) -> dict[str, np.ndarray]:
    """L2-normalised database vectors of each descriptor method and of ``ours`` (paper 2.4: PCA + L2 of the fused
    global + local vector; PCA is fitted on the database itself, unsupervised)."""
    out = {m: l2n(c.vectors[m]) for m in DESCRIPTOR_METHODS}
    fused = fuse(c.vectors["global"], c.vectors["local"], cfg.local_weight)
    out["ours"] = PCA.fit(fused, cfg.pca_dim).transform(fused)
    return out


def rank_all(q: np.ndarray, db: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``depth`` inner-product ranking of every query (ids, scores)."""
    sims = q @ db.T
    depth = min(depth, db.shape[0])
    idx = np.argpartition(-sims, depth - 1, axis=1)[:, :depth]
    part = np.take_along_axis(sims, idx, 1)
    order = np.argsort(-part, axis=1, kind="stable")
    return np.take_along_axis(idx, order, 1), np.take_along_axis(part, order, 1)


def rerank_ranking(c: Corpus, vec: dict[str, np.ndarray], qrows: np.ndarray, depth: int, n: int,
                   qe: int) -> np.ndarray:
    """CroW initial ranking, top-N re-ranked by the query's global feature against each candidate's regions
    (paper 2.5); with ``qe`` > 0 the CroW query is first expanded with its top re-ranked results (AQE)."""
    crow = vec["crow"]
    q = crow[qrows]
    # The query side of region similarity: the query's descriptor pooled like the regions (GeM over the whole map).
    qg = l2n(c.vectors["gem"][qrows])
    ids, _ = rerank_top(qg, *rank_all(q, crow, depth), c.region_desc, c.offsets, n)
    if qe > 0:
        q2 = average_query_expansion(q, crow, ids, qe)
        ids, _ = rerank_top(qg, *rank_all(q2, crow, depth), c.region_desc, c.offsets, n)
    return ids


def bow_vectors(c: Corpus, cfg: BenchmarkConfig) -> np.ndarray:
    """SIFT bag-of-words tf-idf vectors of every database image (the paper's traditional baseline)."""
    from PIL import Image

    from pipeline.bench.bow import BowModel, extract_sift_many

    def load(p: str) -> np.ndarray:
        with Image.open(os.path.join(c.root, p)) as im:
            im = im.convert("RGB")
            im.thumbnail((300, 300))
            return np.asarray(im)

    sift = extract_sift_many((load(p) for p in c.paths), workers=os.cpu_count() or 1)
    model = BowModel.fit(sift, k=cfg.bow_words, seed=cfg.seed)
    return model.encode(sift)


def run(cfg: BenchmarkConfig, runner: Runner | None = None) -> dict[str, Any]:
    """Run a benchmark and write ``report.json``, ``report.md`` and ``results.png`` under ``cfg.report``.

    Args:
        cfg: the benchmark config.
        runner: what extracts the dataset when ``cfg.features`` is not given (default: this process;
            jobs/benchmark.py passes a RayRunner).

    Returns:
        The report dict.
    """
    so = cfg.fs_options
    storage.check_writable(cfg.report, so)
    t0 = time.perf_counter()
    root = cfg.dataset
    timings: dict[str, float] = {}
    extra: dict[str, Any] = {}

    # 1. Ground truth.
    if cfg.protocol in ("category", "labels"):
        merge = {"Faces_easy": "Faces"} if cfg.merge_faces else None
        lset = ds.load_labelled_set(root, merge=merge)
        paths, labels = lset.paths, lset.label_array()
    elif cfg.protocol == "oxford":
        # --dataset is the images folder; --queries the folder of official gt files (default: <dataset>/gt).
        gt = ds.read_oxford_gt(cfg.queries or os.path.join(root, "gt"))
        paths = sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*")
                       if p.suffix.lower() in ds.IMAGE_EXTS)
        labels = None
    else:
        gnd = ds.load_revisited_gnd(os.path.join(root, f"gnd_{Path(root).name}.pkl"))
        paths = [f"jpg/{i}.jpg" for i in gnd["imlist"]]
        labels = None

    # 2. Features.
    features = cfg.features or extract_dataset(cfg, storage.join(cfg.report, "features"), runner or LocalRunner())
    timings["extract_s"] = time.perf_counter() - t0
    c = load_corpus(features, root, paths, labels, so, regions=cfg.regions)
    if c.missing:
        log.warning("%d dataset images have no ok extraction row (decode errors?): %s", len(c.missing), c.missing[:5])
    row_of = {p: i for i, p in enumerate(c.paths)}

    # 3. Queries.
    if cfg.protocol in ("category", "labels"):
        if cfg.queries and cfg.protocol != "oxford":
            qpaths = ds.read_query_list(cfg.queries)
        elif cfg.protocol == "category":
            qpaths = ds.sample_queries(ds.LabelledSet(root, c.paths, [lset.labels[lset.index_of(p)] for p in c.paths]),
                                       fraction=0.05, seed=cfg.seed)
        else:
            qpaths = list(c.paths)
        qrows = np.array([row_of[p] for p in qpaths if p in row_of], dtype=np.int64)
        extra["queries_missing"] = [p for p in qpaths if p not in row_of]
    elif cfg.protocol == "oxford":
        by_id = {Path(p).stem: i for i, p in enumerate(c.paths)}
        qrows = np.array([by_id[q.image_id] for q in gt], dtype=np.int64)
    else:
        qrows = np.array([row_of[f"jpg/{q}.jpg"] for q in gnd["qimlist"]], dtype=np.int64)
    extra["queries"] = int(len(qrows))

    # 4. Methods -> rankings (the query itself stays in the database; the protocols remove it where they should).
    vec = method_vectors(c, cfg)
    n_db = len(c.paths)
    depth = n_db if cfg.protocol != "category" else min(n_db, max(cfg.k + 1, cfg.rerank, 100))
    wanted = [m.strip() for m in cfg.methods.split(",") if m.strip()] or list(ALL_METHODS)
    unknown = set(wanted) - set(ALL_METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {ALL_METHODS}")
    rankers: dict[str, Callable[[], np.ndarray]] = {m: (lambda m=m: rank_all(vec[m][qrows], vec[m], depth)[0])
                                                    for m in (*DESCRIPTOR_METHODS, "ours")}
    rankers["ours+qe"] = lambda: rank_all(average_query_expansion(vec["ours"][qrows], vec["ours"],
                                                                  rank_all(vec["ours"][qrows], vec["ours"], cfg.qe + 1)[0],
                                                                  cfg.qe + 1), vec["ours"], depth)[0]
    rankers["crow+rerank"] = lambda: rerank_ranking(c, vec, qrows, depth, cfg.rerank, 0)
    rankers["crow+rerank+qe"] = lambda: rerank_ranking(c, vec, qrows, depth, cfg.rerank, cfg.qe + 1)

    def bow_rank() -> np.ndarray:
        b = bow_vectors(c, cfg)
        return rank_all(b[qrows], b, depth)[0]

    rankers["bow"] = bow_rank

    rows = []
    rankings: dict[str, np.ndarray] = {}
    for m in wanted:
        tm = time.perf_counter()
        ranks = rankers[m]()
        rankings[m] = ranks
        row: dict[str, Any] = {"method": m}
        if cfg.protocol == "category":
            p = ev.precision_at_k(ranks, c.labels, c.labels[qrows], k=cfg.k, query_db_index=qrows)
            row["score"] = float(np.mean(p))
        elif cfg.protocol == "labels":
            res = ev.labels_eval(ranks, c.labels, qrows)
            row.update({"score": res["mAP"], **{k: v for k, v in res.items() if k != "mAP"}})
        elif cfg.protocol == "oxford":
            by_id = {Path(p).stem: i for i, p in enumerate(c.paths)}
            pos = [np.array([by_id[i] for i in q.positives if i in by_id]) for q in gt]
            junk = [np.array([by_id[i] for i in q.junk if i in by_id]) for q in gt]
            row["score"] = ev.oxford_map(ranks, pos, junk)[0]
        else:
            res = ev.revisited_map(ranks, gnd["gnd"])
            row.update({"score": res["medium"]["mAP"], "easy": res["easy"]["mAP"], "hard": res["hard"]["mAP"]})
        row["seconds"] = round(time.perf_counter() - tm, 2)
        rows.append(row)
        log.info("%s: %.4f (%.1fs)", m, row["score"], row["seconds"])
    metric = {"category": f"mean top-{cfg.k} precision (the paper's MAP@{cfg.k})", "labels": "mAP",
              "oxford": "mAP", "revisited": "mAP (medium)"}[cfg.protocol]
    timings["total_s"] = time.perf_counter() - t0
    report = {"dataset": root, "protocol": cfg.protocol, "metric": metric, "rows": rows, "images": n_db,
              "missing_images": len(c.missing), "features": features, "config": public_dict(cfg),
              "timings": {k: round(v, 2) for k, v in timings.items()}, **extra}
    storage.write_json(storage.join(cfg.report, "report.json"), to_jsonable(report), so)
    table = markdown_table(rows, ["method", "score"] + (["P@1", "P@4", "P@10"] if cfg.protocol == "labels" else []))
    storage.write_bytes(storage.join(cfg.report, "report.md"), f"{metric}\n\n{table}\n".encode(), so)
    if cfg.figure_queries and labels is not None:
        best = max(rows, key=lambda r: r["score"])["method"]
        rng = np.random.default_rng(cfg.seed)
        pick = rng.choice(len(qrows), size=min(cfg.figure_queries, len(qrows)), replace=False)
        res_paths, rel = [], []
        for qi in pick:
            r = [i for i in rankings[best][qi] if i != qrows[qi]][:12]
            res_paths.append([os.path.join(root, c.paths[i]) for i in r])
            rel.append([bool(c.labels[i] == c.labels[qrows[qi]]) for i in r])
        sheet = results_sheet([os.path.join(root, c.paths[qrows[qi]]) for qi in pick], res_paths, rel)
        save_png(sheet, storage.join(cfg.report, "results.png"), so)
        report["figure"] = {"method": best, "path": storage.join(cfg.report, "results.png")}
    report["table"] = table
    return report
