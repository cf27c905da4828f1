"""Offline benchmark runner: ground truth -> features -> corpus -> queries -> method rankings -> scores -> report."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np

from pipeline.bench.corpus import Corpus, Queries, described_queries, load_corpus
from pipeline.bench.methods import DESCRIPTOR_METHODS, method_rankers, select_methods
from pipeline.bench.paired import holdout_rows
from pipeline.bench.protocols import PROTOCOLS
from pipeline.bench.report import (
    holdout_table,
    markdown_table,
    results_sheet,
    save_png,
    to_jsonable,
)
from pipeline.config import BenchmarkConfig, ExtractConfig, public_dict
from pipeline.extract import driver
from pipeline.extract.runners import LocalRunner, Runner
from pipeline.io import storage

log = logging.getLogger(__name__)


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


def describe_crops(features: str, root: str, crops: list[tuple[str, tuple[float, float, float, float]]],
                   so: dict[str, Any], model: Any = None, batch_size: int = 16) -> list[dict[str, np.ndarray]]:
    """Describe query regions with the model that described the corpus (its config is in the features' config.json),
    through the path search takes with a box (``retrieval.search.describe_images``).

    Args:
        features: the extraction URL.
        root: dataset root.
        crops: per query ``(path relative to root, box)``.
        so: storage options.
        model: a region model to use instead (tests).
        batch_size: images per forward pass.

    Returns:
        One model output per crop.
    """
    from pipeline.retrieval.search import describe_images

    if model is None:
        from pipeline.config import ModelConfig
        from pipeline.model.region_model import RegionModel

        mcfg = storage.read_json(storage.join(features, "config.json"), so)["model"]
        model = RegionModel(ModelConfig(**{"region_scales": "1", **mcfg}), storage_options=so)
    datas = [storage.read_bytes(os.path.join(root, p), so) for p, _ in crops]
    return describe_images(model, datas, [b for _, b in crops], names=[p for p, _ in crops], batch_size=batch_size)


def run(cfg: BenchmarkConfig, runner: Runner | None = None, model: Any = None) -> dict[str, Any]:
    """Run a benchmark and write ``report.json``, ``report.md`` and ``results.png`` under ``cfg.report``.

    Args:
        cfg: the benchmark config.
        runner: what extracts the dataset when ``cfg.features`` is not given (default: this process;
            jobs/benchmark.py passes a RayRunner).
        model: the region model that describes query regions (default: built from the features' model config).

    Returns:
        The report dict.
    """
    so = cfg.fs_options
    storage.check_writable(cfg.report, so)
    t0 = time.perf_counter()
    root = cfg.dataset
    timings: dict[str, float] = {}
    protocol = PROTOCOLS[cfg.protocol](cfg)

    # 1. Ground truth.
    paths, labels = protocol.ground_truth()

    # 2. Features.
    features = cfg.features or extract_dataset(cfg, storage.join(cfg.report, "features"), runner or LocalRunner())
    timings["extract_s"] = time.perf_counter() - t0
    c = load_corpus(features, root, paths, labels, so, regions=cfg.regions)
    if c.missing:
        log.warning("%d dataset images have no ok extraction row (decode errors?): %s", len(c.missing), c.missing[:5])

    # 3. Queries.
    qrows, extra = protocol.queries(c)
    extra["queries"] = int(len(qrows))
    queries: Queries | None = None
    if protocol.crops is not None:  # query regions: described by the model, like a search with --box
        tq = time.perf_counter()
        outs = describe_crops(features, root, protocol.crops, so, model, cfg.batch_size)
        queries = described_queries(outs, protocol.self_rows, protocol.crops, cfg.regions)
        timings["describe_queries_s"] = time.perf_counter() - tq

    # 4. Methods -> rankings -> scores.
    n_db = len(c.paths)
    wanted = select_methods(cfg.methods)
    rankers = method_rankers(c, cfg, qrows, protocol.depth(n_db), queries)
    rows = []
    rankings: dict[str, np.ndarray] = {}
    per_query: dict[str, np.ndarray] = {}
    for m in wanted:
        tm = time.perf_counter()
        rankings[m] = rankers[m]()
        seconds = time.perf_counter() - tm
        if protocol.lists:
            per_query[m] = protocol.per_query(rankings[m])
            # What one query costs, offline work (PCA, DBA, a diffusion graph) included: the method's time / queries.
            row: dict[str, Any] = {"method": m, "ms_per_query": round(1000 * seconds / max(len(qrows), 1), 3)}
        else:
            row = {"method": m, **protocol.score(rankings[m])}
        row["seconds"] = round(seconds, 2)
        rows.append(row)
        log.info("%s: %s (%.1fs)", m, "ranked" if protocol.lists else f"{row['score']:.4f}", row["seconds"])

    # 5. Report.
    if protocol.lists:
        table, rows, extra = _holdout(cfg, protocol.lists, protocol.list_pos, per_query, rows, extra)
    else:
        table = markdown_table(rows, ["method", "score", *protocol.columns])
    timings["total_s"] = time.perf_counter() - t0
    report = {"dataset": root, "protocol": cfg.protocol, "metric": protocol.metric, "rows": rows, "images": n_db,
              "missing_images": len(c.missing), "features": features, "config": public_dict(cfg),
              "timings": {k: round(v, 2) for k, v in timings.items()}, **extra}
    storage.write_json(storage.join(cfg.report, "report.json"), to_jsonable(report), so)
    storage.write_bytes(storage.join(cfg.report, "report.md"), f"{protocol.metric}\n\n{table}\n".encode(), so)
    if cfg.figure_queries and c.labels is not None:
        best = max(rows, key=lambda r: r["mean"] if protocol.lists else r["score"])["method"]
        report["figure"] = {"method": best, "path": _write_figure(cfg, c, qrows, rankings[best])}
    report["table"] = table
    return report


def _holdout(cfg: BenchmarkConfig, lists: dict[str, list[str]], list_pos: dict[str, np.ndarray],
             per_query: dict[str, np.ndarray], timing_rows: list[dict[str, Any]],
             extra: dict[str, Any]) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """Tune-on-one/report-on-many: save each query list next to the report, score every list, pair the gains.

    Returns:
        ``(table, rows, extra)``: the Markdown table, the report rows (with the method's seconds), and the report
        fields with ``split`` added (the tune list, the report lists with their files, the best descriptor).
    """
    so = cfg.fs_options
    names = list(lists)
    tune, reports = names[0], names[1:]
    files = {}
    for name, paths in lists.items():
        files[name] = storage.join(cfg.report, f"queries_{name}.txt")
        storage.write_bytes(files[name], "".join(p + "\n" for p in paths).encode(), so)
    rows, best = holdout_rows(per_query, list_pos, tune, DESCRIPTOR_METHODS, seed=cfg.seed)
    for row, timing in zip(rows, timing_rows):
        row.update({k: timing[k] for k in ("seconds", "ms_per_query")})
    baselines = [b for b in dict.fromkeys(["global", best]) if b is not None and b in per_query]
    table = holdout_table(rows, tune, reports, baselines)
    split = {"tune": tune, "reports": reports, "files": files, "sizes": {n: len(p) for n, p in lists.items()},
             "best_descriptor": best, "baselines": baselines}
    return table, rows, {**extra, "split": split}


def _write_figure(cfg: BenchmarkConfig, c: Corpus, qrows: np.ndarray, ranking: np.ndarray) -> str:
    """Draw ``cfg.figure_queries`` random queries with their top-12 results (the query left out), framed by
    same-label relevance, to ``results.png``; return its URL."""
    rng = np.random.default_rng(cfg.seed)
    pick = rng.choice(len(qrows), size=min(cfg.figure_queries, len(qrows)), replace=False)
    res_paths, rel = [], []
    for qi in pick:
        r = [i for i in ranking[qi] if i != qrows[qi]][:12]
        res_paths.append([os.path.join(c.root, c.paths[i]) for i in r])
        rel.append([bool(c.labels[i] == c.labels[qrows[qi]]) for i in r])
    sheet = results_sheet([os.path.join(c.root, c.paths[qrows[qi]]) for qi in pick], res_paths, rel)
    url = storage.join(cfg.report, "results.png")
    save_png(sheet, url, cfg.fs_options)
    return url
