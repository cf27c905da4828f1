"""Tests of the index build's sample (pipeline/reduce/sample.py): bottom-k of a hash of the image ids, taken by tasks,
the same whatever the order, the threshold or a crash."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow.compute as pc
import pytest

from pipeline.config import IndexConfig
from pipeline.reduce import build as rd
from pipeline.reduce import sample as sp
from pipeline.reduce import task as tk
from pipeline.reduce.pca import fuse, l2n
from pipeline.reduce.runners import LocalTaskRunner
from pipeline.schema import column_to_numpy
from pipeline.store import feature_store as fstore


class ShuffledRunner:
    """Runs the tasks in a seeded random order (as Ray may finish them), each result seen once by ``on_done``."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def map(self, fn, tasks, *args, on_done=None, keep=True):
        out = {}
        for k in self.rng.permutation(len(tasks)):
            out[k] = fn(tasks[k], *args)
            if on_done:
                on_done(out[k])
        return [out[k] for k in range(len(tasks))] if keep else []


def _plan(features: str, out: str) -> tuple[tk.Plan, list]:
    plan = tk.Plan(features, out, {}, (), 1.0, "int8", "test", "global")  # the reference below fuses the paper's global
    return plan, list(enumerate(fstore.live_shard_refs(features)))


def _reference(features: str, size: int) -> tuple[list[str], dict[str, np.ndarray]]:
    """The ``size`` ok images with the smallest keyed BLAKE2b of their id (ties by id), and their raw vectors."""
    t = fstore.read_live_table(features, "images")
    t = t.filter(pc.equal(t.column("status"), "ok"))
    ids = t.column("image_id").to_pylist()
    key = [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8, key=b"sigregions-sample-1").digest(), "big")
           for i in ids]
    order = sorted(range(len(ids)), key=lambda j: (key[j], ids[j]))[:size]
    vec = {"fused": fuse(column_to_numpy(t, "global"), column_to_numpy(t, "local"), 1.0),
           "crow": l2n(column_to_numpy(t, "crow"))}
    return [ids[j] for j in order], {s: v[order] for s, v in vec.items()}


@pytest.mark.parametrize("size", [5, 24, 100])
def test_sample_is_the_bottom_k_of_a_hash_of_the_ids(tiny_features, tmp_path, size):
    plan, tasks = _plan(tiny_features["features"], str(tmp_path / "index"))
    assert len(tasks) > 1  # several shards, several tasks
    got, rec = sp.sample(plan, tasks, LocalTaskRunner(), size)
    ids, vec = _reference(tiny_features["features"], size)
    assert got["ids"].tolist() == ids
    for s in tk.SPACES:
        np.testing.assert_allclose(got[s], vec[s], atol=1e-6)
    assert rec["images"] == 24 and rec["sampled"] == min(size, 24) and rec["passes"] == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sample_is_the_same_in_any_task_order_and_any_threshold(tiny_features, tmp_path, seed):
    """Tasks finishing in another order, and a first threshold so low that more passes are needed, give the same
    sample, bit for bit."""
    plan, tasks = _plan(tiny_features["features"], str(tmp_path / "index"))
    want, _ = sp.sample(plan, tasks, LocalTaskRunner(), 10)
    got, rec = sp.sample(plan, tasks, ShuffledRunner(seed), 10, below=1 << 58)  # ~1.5 of 24 rows under it
    assert rec["passes"] > 1
    for k in ("keys", "ids", *tk.SPACES):
        np.testing.assert_array_equal(got[k], want[k])


def test_bottom_k_holds_a_bounded_number_of_rows():
    """Whatever the number and order of batches, at most size + size/4 rows are held between batches, and the result
    is the global bottom-k."""
    rng = np.random.default_rng(0)
    size, acc, allk = 40, sp.BottomK(40), []
    for b in range(60):
        n = int(rng.integers(0, 30))
        keys = rng.integers(0, 1 << 20, n).astype(np.uint64)  # small range: ties, broken by id
        ids = np.array([f"i{b:03d}-{j:03d}" for j in range(n)], dtype=str)
        vec = {s: rng.standard_normal((n, 3)).astype(np.float32) for s in tk.SPACES}
        acc.add({"keys": keys, "ids": ids, **vec})
        assert acc.rows <= size + size // 4
        allk.append((keys, ids, vec))
    keys = np.concatenate([k for k, _, _ in allk])
    ids = np.concatenate([i for _, i, _ in allk])
    order = sorted(range(len(keys)), key=lambda j: (int(keys[j]), str(ids[j])))[:size]
    got = acc.result()
    assert got["ids"].tolist() == ids[order].tolist()
    for s in tk.SPACES:
        np.testing.assert_array_equal(got[s], np.concatenate([v[s] for _, _, v in allk])[order])


def test_threshold_keeps_every_row_of_a_small_corpus():
    assert sp.threshold(100, 50) == sp.FULL
    t = sp.threshold(1000, 10**6)
    assert 0 < t < sp.FULL and abs(t / sp.FULL * 10**6 - (1000 + 6 * 1000**0.5 + 16)) < 1


def test_a_build_killed_while_sampling_then_rerun_gives_the_same_index(tiny_features, tmp_path, monkeypatch):
    """A sampling task dies: nothing is published; the rerun samples again, the same rows, and publishes what an
    uninterrupted build publishes."""
    def build(out):
        return rd.build(IndexConfig(features=tiny_features["features"], output=out, pca_dim=8, pca_sample=12,
                                    in_process=True))

    want = build(str(tmp_path / "ref"))
    assert want["seconds"]["sample"] >= 0
    real, calls = sp.sample_shard, []

    def dies_on_the_second(task, *args):
        calls.append(task)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(task, *args)

    monkeypatch.setattr(sp, "sample_shard", dies_on_the_second)
    out = str(tmp_path / "index")
    with pytest.raises(KeyboardInterrupt):
        build(out)
    monkeypatch.setattr(sp, "sample_shard", real)
    got = build(out)
    assert got["files"] == want["files"] and got["parts"] == want["parts"]  # byte-identical published files
