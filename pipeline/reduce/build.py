"""The index job's driver: sample -> PCA -> trained indexes, one task per feature shard (runner), merge, publish."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import resource
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import IndexConfig, public_dict
from pipeline.io import storage
from pipeline.reduce import faiss_index as fx
from pipeline.reduce import sample as sp
from pipeline.reduce import task as tk
from pipeline.reduce.pca import PCA
from pipeline.reduce.runners import TaskRunner, make_task_runner
from pipeline.schema import column_to_numpy
from pipeline.store import feature_store as fstore
from pipeline.store import index_store as layout

log = logging.getLogger(__name__)


def regions_in_order(r: pa.Table, image_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Region descriptors of ``image_ids`` in that order (each image's regions by rank), and the count per image.

    Args:
        r: a regions table holding (at least) those images' rows.
        image_ids: the order wanted.

    Returns:
        (counts (n,) int64, descriptors (sum counts, D) float32).
    """
    pos = {i: k for k, i in enumerate(image_ids)}
    img = r.column("image_id").to_pylist()
    where = np.array([pos.get(i, -1) for i in img], dtype=np.int64)
    keep = where >= 0
    rank = r.column("rank").to_numpy()
    order = np.lexsort((rank[keep], where[keep]))
    desc = column_to_numpy(r, "descriptor")[keep][order]
    counts = np.bincount(where[keep], minlength=len(image_ids)).astype(np.int64)
    return counts, desc


def _plan_key(cfg: IndexConfig, shards: list[str]) -> str:
    """The identity of a build's plan: its config (but where tasks run) and the extraction's done shards."""
    conf = {k: v for k, v in public_dict(cfg).items() if k not in ("in_process", "workers", "output")}
    return hashlib.sha256(json.dumps({"config": conf, "shards": shards}, sort_keys=True).encode()).hexdigest()


def _train(cfg: IndexConfig, shards: list[str], tasks: list[tuple[int, fstore.LiveShardRef]], runner: TaskRunner,
           w: layout.IndexWriter) -> tuple[tk.Plan, dict[str, Any]]:
    """Sample (tasks on ``runner``, see ``pipeline.reduce.sample``), fit PCA, choose and train the indexes, pick the
    recall queries; written under ``_work`` with ``plan.json`` last. A rerun of the same plan (same config and
    shards) reads them back instead; a rerun after a crash before ``plan.json`` samples again and gets the same
    sample (it depends on the live set only).

    Returns:
        (the plan, its record: factories, dims, sample {images, sampled, passes, seconds}, seconds).
    """
    so = cfg.fs_options
    key = _plan_key(cfg, shards)
    plan = tk.Plan(cfg.features, cfg.output, so, tuple(shards), cfg.local_weight, cfg.region_codec, key,
                   cfg.fuse_global)
    plan_url = storage.join(plan.work, "plan.json")
    try:
        rec = storage.read_json(plan_url, so)
        if rec.get("key") == key:
            for name, entry in rec["files"].items():
                w.record(name, entry)
            log.info("resuming the build of plan %s", key[:12])
            return plan, rec
    except (FileNotFoundError, ValueError):
        pass
    t0 = time.perf_counter()
    try:
        sample, srec = sp.sample(plan, tasks, runner, cfg.pca_sample)
    except storage.StorageError:
        raise storage.StorageError(f"no successfully extracted images under {cfg.features}") from None
    n = srec["images"]
    log.info("sampled %d of %d images in %d pass(es), %.1f s", srec["sampled"], n, srec["passes"], srec["seconds"])
    budget = int(cfg.memory_budget_gb * 2**30)
    rng = np.random.default_rng(0)
    n_q = min(cfg.recall_queries, len(sample["fused"]))
    qrows = np.sort(rng.choice(len(sample["fused"]), size=n_q, replace=False))
    rec: dict[str, Any] = {"key": key, "sample": srec, "factory": {}, "dims": {}}
    queries = {}
    for s in tk.SPACES:
        pca = PCA.fit(sample[s], cfg.pca_dim, whiten=cfg.whiten)
        w.write(tk.PCA_FILE[s], pca.to_bytes())
        x = pca.transform(sample[s])
        sample[s] = None  # type: ignore[assignment]  # the raw sample is no longer needed
        fact = cfg.factory or fx.choose_factory(n, pca.dim, budget)
        index = fx.new_index(pca.dim, fact)
        if not (fx.is_flat(index) or fx.is_ivf(index)):
            raise ValueError(f"factory {fact!r}: the distributed build merges Flat or IVF indexes only")
        if not index.is_trained:
            index.train(x)
        fx.set_search_params(index, nprobe=cfg.nprobe, ef_search=cfg.ef_search)
        storage.write_bytes(plan.trained_url(s), fx.index_bytes(index), so)
        queries[s] = x[qrows]
        rec["factory"][s], rec["dims"][s] = fact, pca.dim
    buf = io.BytesIO()
    np.savez(buf, **queries)
    storage.write_bytes(storage.join(plan.work, "recall.npz"), buf.getvalue(), so)
    rec["files"] = {name: w.files[name] for name in tk.PCA_FILE.values()}
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    storage.write_json(plan_url, rec, so)
    log.info("%d images; indexes %s", n, rec["factory"])
    return plan, rec


def _shift_ids(index: Any, row0: int) -> None:
    """Add ``row0`` to every id of an in-memory IVF index's lists (a task's part has ids from 0)."""
    import faiss

    inv = faiss.extract_index_ivf(index).invlists
    for lst in range(inv.nlist):
        n = inv.list_size(lst)
        if n:
            faiss.rev_swig_ptr(inv.get_ids(lst), n)[:] += row0  # a view of the list's ids, changed in place


def _merge_index(plan: tk.Plan, space: str, parts: list[dict[str, Any]], w: layout.IndexWriter, tmp: str,
                 cfg: IndexConfig) -> Any:
    """Merge the tasks' partial indexes of a space into the published one; returns it (searched with PCA outputs, for
    the recall check).

    IVF indexes: faiss's on-disk inverted lists (``faiss.contrib.ondisk.merge_ondisk``): the partial indexes are
    memory-mapped and their lists written to ``<space>.ivfdata``, so the driver holds one list at a time, and a
    search memory-maps it. Flat indexes (chosen only while their vectors fit ``--memory-budget-gb``): in memory.
    The published file is the index behind its PCA and L2 normalisation (``faiss.IndexPreTransform``), so standard
    faiss tooling searches it with the vectors before PCA; it names its ``.ivfdata`` by bare file name.
    """
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    so = plan.so
    trained = fx.index_from_bytes(storage.read_bytes(plan.trained_url(space), so))
    pca = PCA.from_bytes(storage.read_bytes(storage.join(plan.output, tk.PCA_FILE[space]), so))
    pca_t = fx.pca_matrix(pca.mean, pca.components, pca.eigvals, pca.whiten)
    name = tk.INDEX_FILE[space]
    if fx.is_ivf(trained):
        local = []
        for m in parts:
            p = os.path.join(tmp, f"{m['shard']}.{space}.faiss")
            part = fx.index_from_bytes(storage.read_bytes(plan.part_url(m["shard"], f"{space}.faiss"), so))
            _shift_ids(part, m["row0"])
            faiss.write_index(part, p)  # local disk: merge_ondisk memory-maps the parts
            del part
            local.append(p)
        ivfdata = os.path.join(tmp, layout.IVFDATA[name])
        # Not merge_ondisk(shift_ids=True): in faiss 1.15 it shifts the third and later parts wrongly.
        merge_ondisk(trained, local, ivfdata)
        fx.set_search_params(trained, nprobe=cfg.nprobe, ef_search=cfg.ef_search)
        fx.name_ivfdata(trained, layout.IVFDATA[name])
        faiss.write_index(fx.with_pca(trained, pca_t), os.path.join(tmp, name))
        for p in local:
            os.remove(p)
        w.put_file(layout.IVFDATA[name], ivfdata)
        w.put_file(name, os.path.join(tmp, name))
        return fx.unwrap(faiss.read_index(os.path.join(tmp, name), faiss.IO_FLAG_ONDISK_SAME_DIR))
    for m in parts:
        trained.merge_from(fx.index_from_bytes(storage.read_bytes(plan.part_url(m["shard"], f"{space}.faiss"), so)))
    w.write(name, fx.index_bytes(fx.with_pca(trained, pca_t)))
    return trained


def _recall(plan: tk.Plan, space: str, index: Any, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """recall@10 of the published index at its saved search parameters against exact search over the whole corpus,
    for the plan's recall queries (a uniform sample of the corpus): the exact top-10 is merged from the tasks' exact
    top-10 over their own shards, so no process ever holds the corpus."""
    with np.load(io.BytesIO(storage.read_bytes(storage.join(plan.work, "recall.npz"), plan.so))) as z:
        q = z[space]
    k = tk.RECALL_K
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_r = np.full((len(q), k), -1, np.int64)
    for m in parts:
        with np.load(io.BytesIO(storage.read_bytes(plan.part_url(m["shard"], "recall.npz"), plan.so))) as z:
            s, r = z[f"{space}_s"], z[f"{space}_r"]
        s_all = np.concatenate([best_s, s], axis=1)
        r_all = np.concatenate([best_r, np.where(r >= 0, r + m["row0"], -1)], axis=1)
        top = np.argsort(-s_all, axis=1, kind="stable")[:, :k]
        best_s, best_r = np.take_along_axis(s_all, top, 1), np.take_along_axis(r_all, top, 1)
    kk = min(k, index.ntotal)
    _, found = fx.search(index, q, kk)
    hits = [len(set(a[a >= 0]) & set(b[:kk][b[:kk] >= 0])) / kk for a, b in zip(found, best_r)]
    return {"at": kk, "value": round(float(np.mean(hits)), 4), "queries": len(q)}


def build(cfg: IndexConfig, runner: TaskRunner | None = None) -> dict[str, Any]:
    """Build the index of an extraction and publish it with a done-marker last.

    Plan: (1) the driver streams a reservoir sample (``--pca-sample`` images), fits PCA for the fused vector and for
    CroW, chooses and trains the indexes; (2) one task per feature shard (in this process or as Ray tasks) projects
    and encodes its live rows into partial indexes and writes its id-map and region-store parts; (3) the driver
    merges the partial indexes (IVF: on-disk inverted lists), measures recall@10 against exact search and writes the
    done-marker last. Every process holds at most the sample or one shard, plus (for Flat) the index itself. A build
    killed anywhere leaves no done-marker; rerunning the same command resumes from the finished tasks.

    Args:
        cfg: the index config.
        runner: where tasks run (default: ``--in-process`` selects this process, else Ray).

    Returns:
        The done-marker's content.
    """
    so = cfg.fs_options
    storage.check_writable(cfg.output, so)
    runner = runner or make_task_runner(cfg.in_process, cfg.workers)
    t0 = time.perf_counter()
    # The old done-marker goes first: from here on the folder is not a finished index until the new marker.
    w = layout.IndexWriter(cfg.output, so)
    # Markers are small (their id lists are separate Parquet files): names and ranges only, O(shards) not O(images).
    extraction_markers = fstore.read_done_markers(cfg.features, so)
    shards = [m["shard"] for m in extraction_markers]
    tasks = list(enumerate(fstore.live_shard_refs(cfg.features, so, markers=extraction_markers)))
    plan, rec = _train(cfg, shards, tasks, runner, w)
    t1 = time.perf_counter()
    done = [0]

    def progress(m: dict[str, Any]) -> None:
        done[0] += 1
        log.info("task %d/%d: shard %s, %d images, %.1f s, peak RSS %.0f MB", done[0], len(tasks), m["shard"],
                 m["images"], m.get("seconds", 0.0), m.get("max_rss_mb", 0.0))

    markers = runner.map(tk.reduce_shard, tasks, plan, on_done=progress)
    t2 = time.perf_counter()
    parts, row0, regions, dim = [], 0, 0, 0
    region_sum: np.ndarray | None = None  # (D,): one vector, whatever the corpus size
    for m in markers:
        if m.get("regions"):
            part_sum = np.asarray(m["region_sum"], np.float64)
            region_sum = part_sum if region_sum is None else region_sum + part_sum
        if m["images"]:
            parts.append({"shard": m["shard"], "row0": row0, "images": m["images"], "regions": m["regions"]})
            row0 += m["images"]
            regions += m["regions"]
            dim = dim or m.get("dim", 0)
            for name, entry in m["files"].items():
                w.record(name, entry)
    if not parts:
        raise storage.StorageError(f"no successfully extracted images under {cfg.features}")
    recall = {}
    tmp = tempfile.mkdtemp(prefix="sigregions-merge-")
    try:
        for s in tk.SPACES:
            index = _merge_index(plan, s, parts, w, tmp, cfg)
            if index.ntotal != row0:
                raise storage.StorageError(f"merged {s} index holds {index.ntotal} rows, the tasks wrote {row0}")
            recall[s] = _recall(plan, s, index, parts)
            del index
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t3 = time.perf_counter()
    features_cfg = storage.read_json(storage.join(cfg.features, fstore.CONFIG), so)
    marker = w.finish({
        "config": public_dict(cfg), "model": features_cfg["model"], "model_hash": features_cfg["model_hash"],
        "images": row0, "regions": regions, "factory": rec["factory"], "dims": rec["dims"], "recall": recall,
        "parts": [{"name": p["shard"], "row0": p["row0"], "images": p["images"], "regions": p["regions"]}
                  for p in parts],
        "region_store": {"codec": cfg.region_codec, "dim": dim,
                         "center": None if region_sum is None else [float(v) for v in region_sum / regions]},
        "tasks": {"count": len(tasks), "max_rss_mb": max((m.get("max_rss_mb", 0.0) for m in markers), default=0.0)},
        "driver_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        # "train" is the whole first phase, "sample" the part of it spent by the sampling tasks (from plan.json on
        # a resumed build).
        "seconds": {"train": round(t1 - t0, 3), "sample": rec.get("sample", {}).get("seconds"),
                    "tasks": round(t2 - t1, 3), "merge": round(t3 - t2, 3)},
        "finished": fstore.now()})
    # The intermediate state only served resuming; a published index does not need it. Parts of an earlier build into
    # this folder that this one did not write (shards gone since) are not in the marker: removed too.
    fs, root = storage.url_to_fs(cfg.output, so)
    for sub in (layout.IDS_DIR, layout.REGIONS_DIR):
        d = f"{root.rstrip('/')}/{sub}"
        storage.fresh(fs, d)
        for p in fs.find(d) if fs.exists(d) else []:
            if f"{sub}/{p.rsplit('/', 1)[-1]}" not in marker["files"]:
                fs.rm_file(p)
    try:
        fs.rm(f"{root.rstrip('/')}/{layout.WORK_DIR}", recursive=True)
    except FileNotFoundError:
        pass
    return marker
