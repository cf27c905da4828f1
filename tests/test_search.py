"""Tests of search (pipeline/retrieval/search.py and jobs/search.py): an indexed image finds itself; re-ranking and QE run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import IndexConfig
from pipeline.reduce import build as rd
from pipeline.retrieval.search import Searcher

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_index(tiny_features, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("index"))
    rd.build(IndexConfig(features=tiny_features["features"], output=out, pca_dim=16))
    return out


@pytest.mark.parametrize("space", ["fused", "crow"])
@pytest.mark.parametrize("rerank,qe", [(0, 0), (10, 0), (0, 2)])
def test_indexed_image_returns_itself_first(tiny_features, tiny_index, space, rerank, qe):
    s = Searcher(tiny_index)
    img = str(Path(tiny_features["images"]) / "Leopards" / "image_0001.jpg")
    hits = s.search([img], top_k=5, rerank=rerank, qe=qe, space=space)[0]
    assert len(hits) == 5
    if qe == 0:  # with QE the expanded query may prefer a near neighbour; without, the image itself is exact
        assert hits[0].image_id == "Leopards/image_0001.jpg"
        assert hits[0].score == pytest.approx(max(h.score for h in hits))
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]


def test_batch_search_is_consistent_with_single(tiny_features, tiny_index):
    s = Searcher(tiny_index)
    imgs = [str(p) for p in sorted(Path(tiny_features["images"]).rglob("*.jpg"))[:4]]
    batch = s.search(imgs, top_k=3, rerank=5)
    single = [s.search([i], top_k=3, rerank=5)[0] for i in imgs]
    assert [[h.image_id for h in b] for b in batch] == [[h.image_id for h in b] for b in single]


def test_search_cli_json(tiny_features, tiny_index):
    img = str(Path(tiny_features["images"]) / "watch" / "image_0002.jpg")
    res = subprocess.run([sys.executable, str(ROOT / "jobs" / "search.py"), "--index", tiny_index, "--image", img,
                          "--top-k", "3", "--rerank", "5", "--json"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["rank"] for r in rows] == [1, 2, 3] and rows[0]["image_id"] == "watch/image_0002.jpg"
    assert set(rows[0]) == {"rank", "image_id", "uri", "score"}


def test_unfinished_index_is_refused(tmp_path):
    with pytest.raises(Exception, match="no finished index"):
        Searcher(str(tmp_path))


def test_query_model_follows_the_index_and_old_indexes_mean_one_scale(tiny_features, tiny_index):
    s = Searcher(tiny_index)
    assert s.model.config.region_scales == s.meta["model"]["region_scales"]
    old = Searcher(tiny_index)
    del old.meta["model"]["region_scales"]  # as written before region pyramids existed
    assert old.model.scales == (1.0,)
