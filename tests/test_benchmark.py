"""Tests of the benchmark runner (pipeline/bench/runner.py): rows, report.json, the figure, protocols, the corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.bench import runner as bm
from pipeline.bench.corpus import load_corpus
from pipeline.config import BenchmarkConfig, from_dict


def _cfg(tiny, report, **kw) -> BenchmarkConfig:
    base = {"dataset": tiny["images"], "features": tiny["features"], "report": report, "max_side": 128, "regions": 3,
            "pca_dim": 16, "rerank": 10, "qe": 2, "bow_words": 32}
    base.update(kw)
    return from_dict(BenchmarkConfig, base)


def test_labels_protocol_report(tiny_features, tmp_path):
    report = bm.run(_cfg(tiny_features, str(tmp_path), protocol="labels",
                         methods="global,crow,ours,ours+qe,crow+rerank,crow+rerank+qe,bow"))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["protocol"] == "labels" and saved["metric"] == "mAP" and saved["queries"] == 24
    methods = [r["method"] for r in saved["rows"]]
    assert methods == ["global", "crow", "ours", "ours+qe", "crow+rerank", "crow+rerank+qe", "bow"]
    for r in saved["rows"]:
        assert 0.0 <= r["score"] <= 1.0 and {"P@1", "P@4", "P@10"} <= set(r)
        # 8 classes of 3: chance mAP is about 0.1; real ImageNet features do much better.
    by = {r["method"]: r["score"] for r in saved["rows"]}
    assert by["global"] > 0.3 and by["ours"] > 0.3
    assert (tmp_path / "results.png").stat().st_size > 1000
    assert "| global |" in report["table"]


def test_category_protocol_excludes_query_and_matches_manual(tiny_features, tmp_path):
    queries = tmp_path / "q.txt"
    queries.write_text("Leopards/image_0001.jpg\nwatch/image_0002.jpg\n")
    report = bm.run(_cfg(tiny_features, str(tmp_path / "r"), protocol="category", queries=str(queries), k=2,
                         methods="global"))
    # Reference: brute-force cosine ranking with numpy, the query removed, top-2 same-class fraction.
    c = load_corpus(tiny_features["features"], tiny_features["images"],
                       *_paths_labels(tiny_features["images"]), {})
    g = c.vectors["global"] / np.linalg.norm(c.vectors["global"], axis=1, keepdims=True)
    precs = []
    for q in ("Leopards/image_0001.jpg", "watch/image_0002.jpg"):
        qi = c.paths.index(q)
        order = [i for i in np.argsort(-(g @ g[qi]), kind="stable") if i != qi][:2]
        precs.append(np.mean([c.labels[i] == c.labels[qi] for i in order]))
    assert report["rows"][0]["score"] == pytest.approx(float(np.mean(precs)))
    assert report["queries"] == 2


def _paths_labels(root: str):
    from pipeline.bench.datasets import load_labelled_set

    s = load_labelled_set(root)
    return s.paths, s.label_array()


def test_unknown_method_is_an_error(tiny_features, tmp_path):
    with pytest.raises(ValueError, match="unknown methods"):
        bm.run(_cfg(tiny_features, str(tmp_path), protocol="labels", methods="global,nope"))


def test_top_k_regions_recompute_local_feature(tiny_features):
    paths, labels = _paths_labels(tiny_features["images"])
    full = load_corpus(tiny_features["features"], tiny_features["images"], paths, labels, {})
    same = load_corpus(tiny_features["features"], tiny_features["images"], paths, labels, {}, regions=3)
    # All 3 stored regions: the recomputed eq. (1)-(2) equals the stored local feature.
    np.testing.assert_allclose(same.vectors["local"], full.vectors["local"], atol=1e-6)
    one = load_corpus(tiny_features["features"], tiny_features["images"], paths, labels, {}, regions=1)
    assert np.all(np.diff(one.offsets) <= 1)
    # One region: the local feature is that region's descriptor, L1-normalised; its direction is the stored region's.
    i = 5
    r = one.region_desc[one.offsets[i]]
    loc = one.vectors["local"][i]
    assert abs(loc.sum() - 1) < 1e-5
    np.testing.assert_allclose(loc / np.linalg.norm(loc), r, atol=1e-5)
