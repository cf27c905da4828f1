"""One index-build task: a feature shard's live rows projected and encoded into partial indexes, its id map and its
region-store part, written to storage with the task's marker last."""

from __future__ import annotations

import hashlib
import io
import resource
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io import images as imgs
from pipeline.io import storage
from pipeline.reduce import faiss_index as fx
from pipeline.reduce.pca import PCA, fuse_columns, fuse_vectors, l2n
from pipeline.schema import column_to_numpy
from pipeline.store import feature_store as fstore
from pipeline.store import index_store as layout
from pipeline.store import region_store as rs

SPACES = ("fused", "crow")
PCA_FILE = {"fused": layout.PCA_FUSED, "crow": layout.PCA_CROW}
INDEX_FILE = {"fused": layout.INDEX_FUSED, "crow": layout.INDEX_CROW}
REGION_COLUMNS = ["rank", "descriptor", "box"]
RECALL_K = 10  # recall@10 is what the index choice is judged by


@dataclass(frozen=True)
class Plan:
    """What every task of one build shares (small: the trained state is on storage, under ``work``).

    Attributes:
        features: extraction URL.
        output: index folder URL.
        so: fsspec options.
        shards: every done-marker name of the extraction, sorted (part of the plan's identity).
        local_weight: the fused vector's local weight.
        codec: region-store codec.
        key: the plan's identity; a task marker with another key is stale and redone.
        fuse_global: the fused vector's global part (``IndexConfig.fuse_global``).
    """

    features: str
    output: str
    so: dict[str, Any]
    shards: tuple[str, ...]
    local_weight: float
    codec: str
    key: str
    fuse_global: str

    @property
    def image_columns(self) -> list[str]:
        """The image columns a task reads: uri, status, the fused vector's descriptors (by ``fuse_global``), CroW."""
        return ["uri", "status", *fuse_columns(self.fuse_global), "crow"]

    @property
    def work(self) -> str:
        """The build's intermediate folder."""
        return storage.join(self.output, layout.WORK_DIR)

    def trained_url(self, space: str) -> str:
        """The trained, empty index of a space."""
        return storage.join(self.work, f"trained_{space}.faiss")

    def part_url(self, name: str, what: str) -> str:
        """A task's intermediate file (``fused.faiss``, ``crow.faiss``, ``recall.npz``) or its marker (``json``)."""
        return storage.join(self.work, "parts", f"{name}.{what}")


def fused_vectors(t: pa.Table, local_weight: float, fuse_global: str) -> np.ndarray:
    """The fused vector before PCA (paper 2.4, ``pca.fuse_vectors``): concat(L2(global part), w * L2(local)), the
    global part chosen by ``fuse_global`` (see ``pca.fuse_global_part``).

    Args:
        t: image rows with (at least) the columns ``pca.fuse_columns(fuse_global)``.
        local_weight: the local part's weight.
        fuse_global: one of ``FUSE_GLOBALS``.

    Returns:
        ``(n, D)`` float32 vectors, one per row.
    """
    return fuse_vectors({c: column_to_numpy(t, c) for c in fuse_columns(fuse_global)}, fuse_global, local_weight)


def raw_vectors(t: pa.Table, space: str, local_weight: float, fuse_global: str) -> np.ndarray:
    """A space's vectors before PCA: fused, or L2(CroW)."""
    return fused_vectors(t, local_weight, fuse_global) if space == "fused" else l2n(column_to_numpy(t, "crow"))


def region_rows(r: pa.Table, image_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a regions table for ``image_ids`` in that order (each image's regions by rank), and the count per image.

    Returns:
        (counts (n,) int64, row indices into ``r`` (sum counts,) int64).
    """
    pos = {i: k for k, i in enumerate(image_ids)}
    where = np.array([pos.get(i, -1) for i in r.column("image_id").to_pylist()], dtype=np.int64)
    keep = np.flatnonzero(where >= 0)
    order = keep[np.lexsort((r.column("rank").to_numpy()[keep], where[keep]))]
    return np.bincount(where[keep], minlength=len(image_ids)).astype(np.int64), order


_STATE: dict[tuple[str, str], dict[str, Any]] = {}


def _state(plan: Plan) -> dict[str, Any]:
    """PCA, trained empty indexes and recall queries of a plan, read once per process (a Ray worker runs many tasks)."""
    cache_key = (plan.output, plan.key)
    if cache_key not in _STATE:
        _STATE.clear()  # one plan at a time
        _STATE[cache_key] = _read_state(plan)
    return _STATE[cache_key]


def _read_state(plan: Plan) -> dict[str, Any]:
    """See ``_state``."""
    pcas = {s: PCA.from_bytes(storage.read_bytes(storage.join(plan.output, PCA_FILE[s]), plan.so)) for s in SPACES}
    trained = {s: storage.read_bytes(plan.trained_url(s), plan.so) for s in SPACES}
    with np.load(io.BytesIO(storage.read_bytes(storage.join(plan.work, "recall.npz"), plan.so)),
                 allow_pickle=False) as z:
        queries = {s: z[s] for s in SPACES}
    return {"pca": pcas, "trained": trained, "queries": queries}


def _exact_top(q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of queries over this shard's vectors: (scores (Q, k), local rows (Q, k); -1 pads)."""
    s = q @ x.T
    kk = min(k, x.shape[0])
    top = np.argsort(-s, axis=1, kind="stable")[:, :kk]
    scores = np.full((len(q), k), -np.inf, np.float32)
    rows = np.full((len(q), k), -1, np.int64)
    scores[:, :kk], rows[:, :kk] = np.take_along_axis(s, top, 1), top
    return scores, rows


def reduce_shard(task: tuple[int, fstore.LiveShardRef], plan: Plan) -> dict[str, Any]:
    """Build one shard's part of the index (idempotent: a finished task of the same plan is returned as is).

    Writes ``_work/parts/<shard>.{fused,crow}.faiss`` (the trained index with this shard's rows added, ids from 0),
    ``_work/parts/<shard>.recall.npz`` (exact top-10 of the plan's recall queries over this shard), ``ids/<shard>.parquet``
    and the region-store part, then the task marker ``_work/parts/<shard>.json`` last.

    Args:
        task: (position of the shard among the build's data shards, the shard's live-set reference).
        plan: the build's plan.

    Returns:
        The task marker: shard, key, images, regions, files (name -> bytes, sha256 of published files), peak RSS.
    """
    _, ref = task
    name = ref.shard
    done_url = plan.part_url(name, "json")
    try:
        old = storage.read_json(done_url, plan.so)
        if old.get("key") == plan.key:
            return old  # finished by an earlier run of the same plan
    except (FileNotFoundError, ValueError):
        pass
    t0 = time.perf_counter()
    state = _state(plan)
    # The shard's live ids are resolved once (its id list against the later markers overlapping it) and both
    # tables are filtered by them: the task holds one shard, never the corpus's id set.
    keep = fstore.live_ids(ref, plan.so)
    live = {kind: fstore.read_live_shard(ref, kind, cols, plan.so, keep=keep)
            for kind, cols in ((fstore.IMAGES_DIR, plan.image_columns), (fstore.REGIONS_DIR, REGION_COLUMNS))}
    t = live[fstore.IMAGES_DIR]
    t = t.filter(pc.equal(t.column("status"), imgs.OK)).sort_by("image_id")
    marker: dict[str, Any] = {"shard": name, "key": plan.key, "images": t.num_rows, "regions": 0, "files": {}}
    if t.num_rows:
        exact = {}
        for s in SPACES:
            x = state["pca"][s].transform(raw_vectors(t, s, plan.local_weight, plan.fuse_global))
            index = fx.index_from_bytes(state["trained"][s])
            fx.add_chunks(index, [x])
            storage.write_bytes(plan.part_url(name, f"{s}.faiss"), fx.index_bytes(index), plan.so)
            exact[s] = _exact_top(state["queries"][s], x, RECALL_K)
        buf = io.BytesIO()
        np.savez(buf, **{f"{s}_{w}": exact[s][j] for s in SPACES for j, w in enumerate(("s", "r"))})
        storage.write_bytes(plan.part_url(name, "recall.npz"), buf.getvalue(), plan.so)
        ids = t.column("image_id").to_pylist()
        idb = storage.parquet_bytes(pa.table({"image_id": t.column("image_id"), "uri": t.column("uri")}))
        id_name = f"{layout.IDS_DIR}/{name}.parquet"
        storage.write_bytes(storage.join(plan.output, id_name), idb, plan.so)
        marker["files"][id_name] = {"bytes": len(idb), "sha256": hashlib.sha256(idb).hexdigest()}
        r = live[fstore.REGIONS_DIR]
        counts, rows = region_rows(r, ids)
        desc = column_to_numpy(r, "descriptor")[rows]
        boxes = column_to_numpy(r, "box")[rows] if len(rows) else np.zeros((0, 4), np.float32)
        marker["files"].update(rs.write_part(plan.output, name, counts, desc, boxes, plan.codec, plan.so))
        marker["regions"] = int(counts.sum())
        # The sum of the descriptors as search decodes them: the driver turns the parts' sums into the store's mean
        # region, which region-to-region matching removes (search.Searcher, rerank.match_regions).
        marker["region_sum"] = [float(v) for v in rs.decode(rs.encode(desc, plan.codec)).sum(axis=0, dtype=np.float64)]
        marker["dim"] = int(desc.shape[1]) if len(rows) else 0
    marker["seconds"] = round(time.perf_counter() - t0, 3)
    marker["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    storage.write_json(done_url, marker, plan.so)
    return marker
