"""The index build's training sample, taken by tasks: the live rows with the smallest hash of their image id (a
bottom-k sample), each task sending its shard's candidates and the driver keeping the best ``size`` as they arrive."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow.compute as pc

from pipeline.io import images as imgs
from pipeline.io import storage
from pipeline.reduce import task as tk
from pipeline.reduce.runners import TaskRunner
from pipeline.store import feature_store as fstore

# Part of the sample's definition: changing it changes which images every build samples.
HASH_KEY = b"sigregions-sample-1"
FULL = 1 << 64  # a threshold that keeps every row
_SIGMAS = 6.0  # the first threshold expects this many standard deviations more rows than needed


def sample_keys(image_ids: Sequence[str]) -> np.ndarray:
    """The sampling key of each image: the first 8 bytes of its id's keyed BLAKE2b, as uint64 (uniform, and the same
    in every process, unlike Python's ``hash``).

    Args:
        image_ids: image ids.

    Returns:
        ``(n,)`` uint64 keys.
    """
    digests = b"".join(hashlib.blake2b(i.encode("utf-8"), digest_size=8, key=HASH_KEY).digest() for i in image_ids)
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


def smallest(keys: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` rows with the smallest (key, image id), in that order (ids break the rare key ties, so
    the choice is a total order: the same whatever order the rows came in)."""
    return np.lexsort((ids, keys))[:k]


def threshold(size: int, rows: int) -> int:
    """A key bound that keeps about ``size + 6 sqrt(size)`` of ``rows`` uniformly keyed rows (``FULL``: keep all).

    Args:
        size: rows wanted.
        rows: rows there are (or an upper bound: fewer rows keep fewer; ``sample`` then runs again).

    Returns:
        The bound, an int in (0, 2**64].
    """
    want = size + _SIGMAS * math.sqrt(size) + 16
    return FULL if rows <= want else int(want / rows * FULL)


def sample_shard(task: tuple[int, fstore.LiveShardRef], plan: tk.Plan, size: int, below: int) -> dict[str, Any]:
    """One shard's sample candidates: its live, successfully extracted rows with key < ``below``, at most the ``size``
    smallest, with their vectors before PCA.

    Args:
        task: (position of the shard, its live-set reference), as the build's other tasks.
        plan: the build's plan (storage, local weight).
        size: the sample size (no shard needs to send more).
        below: key bound (``FULL``: every row is a candidate).

    Returns:
        shard, live (its ok rows), below (how many have key < ``below``), keys (k,) uint64, ids (k,) str and per space
        ``(k, d)`` float32 vectors (absent when k = 0).
    """
    _, ref = task
    keep = fstore.live_ids(ref, plan.so)
    t = fstore.read_live_shard(ref, fstore.IMAGES_DIR, plan.image_columns, plan.so, keep=keep)
    t = t.filter(pc.equal(t.column("status"), imgs.OK))
    ids = np.array(t.column("image_id").to_pylist(), dtype=str)
    keys = sample_keys(ids.tolist())
    cand = np.arange(len(keys)) if below >= FULL else np.flatnonzero(keys < np.uint64(below))
    pick = cand[smallest(keys[cand], ids[cand], size)]
    out: dict[str, Any] = {"shard": ref.shard, "live": t.num_rows, "below": len(cand), "keys": keys[pick],
                           "ids": ids[pick]}
    if len(pick):
        rows = t.take(pick)  # only the chosen rows are turned into float vectors
        out.update({s: tk.raw_vectors(rows, s, plan.local_weight, plan.fuse_global) for s in tk.SPACES})
    return out


class BottomK:
    """The ``size`` rows with the smallest (key, id) among all rows added, kept as batches arrive in any order.

    Memory: at most ``size + size // 4`` rows held between trims plus the batch being added, and while trimming one
    space's vectors of ``size`` rows more (gathered into a fresh array, that space's batches dropped at once).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.limit = size + max(1, size // 4)
        self.batches: list[dict[str, Any]] = []
        self.rows = 0

    def add(self, batch: dict[str, Any]) -> None:
        """Add ``{"keys", "ids", <space>: vectors}`` rows (a ``sample_shard`` result)."""
        if len(batch["keys"]):
            # Copies: a Ray result's arrays are views of the shared object store; holding them would keep every
            # task's result there (and in the RSS of the worker that wrote it) until the sample is complete.
            self.batches.append({k: np.array(batch[k]) for k in ("keys", "ids", *tk.SPACES)})
            self.rows += len(batch["keys"])
        if self.rows > self.limit:
            self._trim()

    def _trim(self) -> None:
        if not self.batches:
            return
        keys = np.concatenate([b["keys"] for b in self.batches])
        ids = np.concatenate([b["ids"] for b in self.batches])
        order = smallest(keys, ids, self.size)
        lens = np.array([len(b["keys"]) for b in self.batches])
        src = np.repeat(np.arange(len(lens)), lens)[order]  # which batch each kept row is in
        pos = (np.arange(len(keys)) - np.repeat(np.cumsum(lens) - lens, lens))[order]  # and where in it
        out: dict[str, Any] = {"keys": keys[order], "ids": ids[order]}
        for s in tk.SPACES:
            v = np.empty((len(order), self.batches[0][s].shape[1]), np.float32)
            for j, b in enumerate(self.batches):
                m = src == j
                v[m] = b[s][pos[m]]
                b[s] = None  # dropped as soon as gathered: one space's copy at a time
            out[s] = v
        self.batches, self.rows = [out], len(order)

    def result(self) -> dict[str, Any]:
        """The kept rows sorted by (key, id): keys, ids and per space the vectors."""
        self._trim()
        if not self.batches:
            raise storage.StorageError("no successfully extracted images to sample")
        return self.batches[0]


def _pass(plan: tk.Plan, tasks: Sequence[tuple[int, fstore.LiveShardRef]], runner: TaskRunner, size: int,
          below: int, on_done: Callable[[dict[str, Any]], None] | None) -> tuple[BottomK, int, int]:
    """One sampling pass: (the kept rows, live rows seen, rows under ``below``)."""
    acc, count = BottomK(size), {"live": 0, "below": 0}

    def take(r: dict[str, Any]) -> None:
        acc.add(r)
        count["live"] += r["live"]
        count["below"] += r["below"]
        if on_done:
            on_done(r)

    runner.map(sample_shard, tasks, plan, size, below, on_done=take, keep=False)
    return acc, count["live"], count["below"]


def sample(plan: tk.Plan, tasks: Sequence[tuple[int, fstore.LiveShardRef]], runner: TaskRunner, size: int,
           below: int | None = None, on_done: Callable[[dict[str, Any]], None] | None = None
           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The build's sample: of every live, successfully extracted image, the ``size`` with the smallest keys (a
    uniform sample without replacement, since keys are a hash), taken by one task per shard on ``runner``.

    The sample depends only on the live set and ``size``: not on the workers, the order tasks finish in, or the
    threshold; a rerun after a crash takes the same one. The first threshold comes from the done-markers' id counts
    (an upper bound of the live rows); when fewer rows than ``size`` fall under it (many failed or superseded images),
    a second pass uses the live count the first one measured, and a last one keeps every row.

    Args:
        plan: the build's plan.
        tasks: (position, live-set reference) per shard.
        runner: where the tasks run.
        size: sample size (``--pca-sample``).
        below: the first key bound (default: from the markers' counts; tests force a second pass with it).
        on_done: sees each task's result (progress).

    Returns:
        (sample: keys, ids and per space ``(n, d)`` float32 vectors, sorted by key; record: live images, passes,
        seconds).
    """
    t0 = time.perf_counter()
    if below is None:
        below = threshold(size, sum(ref.ids.count for _, ref in tasks))
    passes = 0
    while True:
        passes += 1
        acc, live, under = _pass(plan, tasks, runner, size, below, on_done)
        if under >= size or below >= FULL:
            break
        nxt = threshold(size, live)
        below = nxt if nxt > below else FULL
    out = acc.result()
    return out, {"images": live, "sampled": len(out["keys"]), "passes": passes,
                 "seconds": round(time.perf_counter() - t0, 3)}
