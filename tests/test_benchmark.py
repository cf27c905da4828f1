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


# --------------------------------------------------------------------------------------------------------------------
# Query expansion: the expansion set never holds the query's own row
# --------------------------------------------------------------------------------------------------------------------


def _unit(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([np.cos(t), np.sin(t)], dtype=np.float32)


def _qe_rankers(monkeypatch, db, qrows, region_desc=None, offsets=None):
    """Rankers over hand-made vectors (``ours`` = ``crow`` = ``gem`` = ``db``), with every AQE call recorded."""
    from types import SimpleNamespace

    from pipeline.bench import methods
    from pipeline.bench.corpus import Corpus

    calls = []
    real = methods.average_query_expansion

    def spy(q, vecs, ids, k):
        calls.append(np.asarray(ids)[:, :k].copy())
        return real(q, vecs, ids, k)

    monkeypatch.setattr(methods, "method_vectors", lambda c, cfg: {"ours": db, "crow": db})
    monkeypatch.setattr(methods, "average_query_expansion", spy)
    n = len(db)
    region_desc = np.zeros((0, db.shape[1]), np.float32) if region_desc is None else region_desc
    offsets = np.zeros(n + 1, np.int64) if offsets is None else offsets
    c = Corpus("", [f"{i}.jpg" for i in range(n)], None, {"gem": db}, region_desc, offsets, [])
    cfg = SimpleNamespace(qe=2, rerank=n)
    return methods.method_rankers(c, cfg, np.asarray(qrows), n), calls


def test_expansion_neighbours_skip_the_query_and_pad():
    from pipeline.bench.methods import expansion_neighbours

    ids = np.array([[0, 1, 2], [5, 3, 4]])
    assert expansion_neighbours(ids, np.array([0, 3]), 2).tolist() == [[1, 2], [5, 4]]
    # Fewer than k others: padded with -1, which AQE ignores.
    assert expansion_neighbours(np.array([[0, 1]]), np.array([0]), 2).tolist() == [[1, -1]]


def test_ours_qe_expands_with_qe_non_self_neighbours(monkeypatch):
    # Unit vectors at 0, 30, 50 and 60 degrees; queries rows 0 and 3, qe = 2.
    db = np.stack([_unit(a) for a in (0, 30, 50, 60)])
    rankers, calls = _qe_rankers(monkeypatch, db, [0, 3])
    got = rankers["ours+qe"]()
    # Row 0 ranks [0, 1, 2, 3]: its 2 non-self neighbours are rows 1, 2, so q' = l2n(u0 + u30 + u50), at ~26.8
    # degrees: nearest row 1 (30), then row 2 (50, 23.2 away), row 0 (26.8 away), row 3.
    # Row 3 ranks [3, 2, 1, 0]: neighbours rows 2, 1; q' = l2n(u60 + u50 + u30) at ~46.7 degrees -> [2, 3, 1, 0].
    assert got.tolist() == [[1, 2, 0, 3], [2, 3, 1, 0]]
    assert [row.tolist() for row in calls[0]] == [[1, 2], [2, 1]]
    for qrow, used in zip((0, 3), calls[0]):
        assert qrow not in used
    q2 = db[[0, 3]] + db[[1, 2]] + db[[2, 1]]
    q2 /= np.linalg.norm(q2, axis=1, keepdims=True)
    np.testing.assert_array_equal(got, np.argsort(-(q2 @ db.T), axis=1, kind="stable"))
    # The old expansion, l2n(2q + top-1 other) for qe + 1 = 3 with the query among them, ranks row 0 first.
    old = 2 * db[0] + db[1]
    assert int(np.argmax(db @ old)) == 0 and got[0, 0] != 0


def test_crow_rerank_qe_expands_with_reranked_non_self_neighbours(monkeypatch):
    # CroW = GeM = unit vectors at 0, 30, 50 and 65 degrees; each image has one region equal to its vector,
    # except row 3, whose region equals the query's (0 degrees).
    db = np.stack([_unit(a) for a in (0, 30, 50, 65)])
    regions = np.stack([_unit(a) for a in (0, 30, 50, 0)])
    rankers, calls = _qe_rankers(monkeypatch, db, [0], regions, np.arange(5))
    # Re-ranked first pass (0.5 region + 0.5 CroW): [0 (1), 1 (.866), 3 (.5 + .5 * .423 = .711), 2 (.643)].
    assert rankers["crow+rerank"]().tolist() == [[0, 1, 3, 2]]
    calls.clear()
    got = rankers["crow+rerank+qe"]()
    # Expansion from the re-ranked list without the query: rows 1 and 3 (not 1 and 2 of the CroW order).
    assert [row.tolist() for row in calls[0]] == [[1, 3]]
    # q' = l2n(u0 + u30 + u65) at ~31.6 degrees; CroW scores cos(1.6), cos(18.4), cos(31.6), cos(33.4) for rows
    # 1, 2, 0, 3; re-ranked with the original GeM query: row 1 .5 * .866 + .5 * .9996 = .933, row 0 .926,
    # row 3 .918, row 2 .796.
    assert got.tolist() == [[1, 0, 3, 2]]


# --------------------------------------------------------------------------------------------------------------------
# Protocols: ground truth mapped to corpus rows by path; missing positives count as not retrieved
# --------------------------------------------------------------------------------------------------------------------


def _corpus(paths):
    from pipeline.bench.corpus import Corpus

    n = len(paths)
    return Corpus("", paths, None, {}, np.zeros((0, 2), np.float32), np.zeros(n + 1, np.int64), [])


def test_revisited_protocol_maps_gnd_by_path_with_a_missing_image(tmp_path):
    from types import SimpleNamespace

    from pipeline.bench.protocols import RevisitedProtocol

    (tmp_path / "jpg").mkdir()
    (tmp_path / "jpg" / "a.jpg").write_bytes(b"")  # the query's file must exist; its pixels are not read here
    p = RevisitedProtocol(SimpleNamespace(dataset=str(tmp_path)))
    # imlist a b c d e; c (position 2, in the middle) failed to extract, so corpus rows are a=0 b=1 d=2 e=3.
    e = np.array([0, 0, 1, 1], dtype=np.float64)
    p.gnd = {"imlist": ["a", "b", "c", "d", "e"], "qimlist": ["a"],
             "gnd": [{"easy": np.array([1, 3]), "hard": np.array([2]), "junk": np.array([4]), "bbx": e}]}
    qrows, extra = p.queries(_corpus(["jpg/a.jpg", "jpg/b.jpg", "jpg/d.jpg", "jpg/e.jpg"]))
    assert qrows.tolist() == [0] and extra == {"positives_missing": 1}
    assert p.crops == [("jpg/a.jpg", (0.0, 0.0, 1.0, 1.0))] and p.self_rows.tolist() == [-1]
    assert p.gnd_rows[0]["easy"].tolist() == [1, 2]  # b, d
    assert p.gnd_rows[0]["hard"].tolist() == [4 + 2]  # c: N + its imlist position, in no ranking
    assert p.gnd_rows[0]["junk"].tolist() == [3]  # e
    res = p.score(np.array([[0, 3, 2, 1]]))  # a, e, d, b
    # Medium: positives b, c, d (3), junk e -> junk-free [a, d, b], hits at 1, 2:
    # ((0 + 1/2)/2 + (1/2 + 2/3)/2) / 3 = 5/18. (By position, b/e/d would be the positives: 37/72.)
    assert res["score"] == pytest.approx(5 / 18)
    # Easy: positives b, d, junk e (and c): ((0 + 1/2)/2 + (1/2 + 2/3)/2) / 2 = 5/12. Hard: c never retrieved: 0.
    assert res["easy"] == pytest.approx(5 / 12)
    assert res["hard"] == 0.0


# --------------------------------------------------------------------------------------------------------------------
# Query regions: the oxford and revisited protocols describe each query cropped to its box, with the model
# --------------------------------------------------------------------------------------------------------------------

RED, BLUISH, ORANGE, BLUE = (255, 0, 0), (0, 128, 255), (255, 64, 0), (0, 0, 255)


class MeanColourModel:
    """A stand-in region model: every descriptor of an image (and its one region) is its mean RGB colour, so the
    similarities of a constructed case can be worked out by hand."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.config = SimpleNamespace(max_side=32)
        self.seen: list[tuple[int, int]] = []

    def __call__(self, images, sizes):
        from pipeline.schema import VECTOR_COLUMNS

        out = []
        for im, size in zip(images, sizes):
            self.seen.append(tuple(size))
            v = np.asarray(im, np.float32).reshape(-1, 3).mean(0)
            out.append({**{m: v.copy() for m in VECTOR_COLUMNS}, "regions": v[None].copy(),
                        "boxes": np.array([[0, 0, *size]], np.float32), "scores": np.ones(1, np.float32)})
        return out


def _write(path, colours, size=(64, 32)):
    """An image of vertical colour bands: ``colours`` = [(width, rgb), ...] left to right."""
    from PIL import Image

    im = Image.new("RGB", size)
    x = 0
    for w, rgb in colours:
        im.paste(rgb, (x, 0, x + w, size[1]))
        x += w
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=100) if path.suffix == ".jpg" else im.save(path)


def _colour_corpus(root, paths):
    """The corpus of ``paths`` under ``root`` described by ``MeanColourModel`` (one region per image)."""
    from PIL import Image

    from pipeline.bench.corpus import Corpus
    from pipeline.schema import VECTOR_COLUMNS

    v = np.stack([np.asarray(Image.open(root / p).convert("RGB"), np.float32).reshape(-1, 3).mean(0) for p in paths])
    return Corpus(str(root), list(paths), None, {m: v.copy() for m in VECTOR_COLUMNS},
                  v / np.linalg.norm(v, axis=1, keepdims=True), np.arange(len(paths) + 1), [])


def _run_colour_benchmark(monkeypatch, root, protocol, paths, tmp_path):
    """``bench.runner.run`` on a hand-described corpus, with ``MeanColourModel`` describing the queries."""
    monkeypatch.setattr(bm, "load_corpus", lambda *a, **k: _colour_corpus(root, paths))
    model = MeanColourModel()
    cfg = from_dict(BenchmarkConfig, {"dataset": str(root), "features": "unused", "report": str(tmp_path / "r"),
                                      "protocol": protocol, "methods": "crow", "rerank": 4, "figure_queries": 0})
    return bm.run(cfg, model=model), model


def test_oxford_protocol_describes_the_query_cropped_to_its_box(monkeypatch, tmp_path):
    # The query image q is red in its left quarter (its box) and blue elsewhere; a is red, b bluish, c orange.
    # gt: good a, ok b, junk q; c is a negative.
    root = tmp_path / "oxford"
    _write(root / "jpg" / "q.png", [(16, RED), (48, BLUE)])
    for name, rgb in (("a", RED), ("b", BLUISH), ("c", ORANGE)):
        _write(root / "jpg" / f"{name}.png", [(64, rgb)])
    gt = root / "gt"
    gt.mkdir()
    (gt / "x_1_query.txt").write_text("oxc1_q 0 0 16 32\n")
    (gt / "x_1_good.txt").write_text("a\n")
    (gt / "x_1_ok.txt").write_text("b\n")
    (gt / "x_1_junk.txt").write_text("q\n")
    paths = ["jpg/a.png", "jpg/b.png", "jpg/c.png", "jpg/q.png"]
    report, model = _run_colour_benchmark(monkeypatch, root, "oxford", paths, tmp_path)
    # The crop is pure red (16 x 32 original pixels): cosines a 1, c .970, q .316 (junk), b 0. Junk removed: a, c, b,
    # hits at 0 and 2 of 2 positives: (1 + (1/2 + 2/3)/2) / 2 = 19/24.
    assert model.seen == [(16, 32)]
    assert report["rows"][0]["score"] == pytest.approx(19 / 24)
    # The whole query image (mean (64, 0, 191)) would rank b .848, a .316, c .307: AP 1, as the query's own row did.


def test_revisited_protocol_crops_queries_outside_the_image_list(monkeypatch, tmp_path):
    import pickle

    # The query q is not in imlist (R-Oxford's qimlist is separate): it used to raise KeyError.
    root = tmp_path / "roxtiny"
    _write(root / "jpg" / "q.jpg", [(16, RED), (48, BLUE)])
    for name, rgb in (("a", RED), ("b", BLUISH), ("c", ORANGE)):
        _write(root / "jpg" / f"{name}.jpg", [(64, rgb)])
    gnd = {"imlist": ["a", "b", "c"], "qimlist": ["q"],
           "gnd": [{"bbx": np.array([0.0, 0.0, 16.0, 32.0]), "easy": np.array([0]), "hard": np.array([1]),
                    "junk": np.array([], dtype=np.int64)}]}
    (root / "gnd_roxtiny.pkl").write_bytes(pickle.dumps(gnd))
    report, model = _run_colour_benchmark(monkeypatch, root, "revisited", ["jpg/a.jpg", "jpg/b.jpg", "jpg/c.jpg"],
                                          tmp_path)
    assert model.seen == [(16, 32)]
    row = report["rows"][0]
    # Cropped (red): a 1, c ~.97, b ~0. Medium (a, b positive): hits at 0 and 2 -> 19/24; easy (a; b junk): 1;
    # hard (b; a junk): ranking c, b -> (0 + 1/2)/2 = 1/4. The whole image would give medium 1.
    assert row["score"] == pytest.approx(19 / 24)
    assert row["easy"] == pytest.approx(1.0)
    assert row["hard"] == pytest.approx(1 / 4)


def test_oxford_protocol_counts_a_missing_positive_as_not_retrieved():
    from types import SimpleNamespace

    from pipeline.bench.datasets import OxfordQuery
    from pipeline.bench.protocols import OxfordProtocol

    p = OxfordProtocol(SimpleNamespace(dataset="unused", queries=None))
    # p2 (ok) and j (junk) failed to extract.
    p.gt = [OxfordQuery(name="x_1", image_id="q", bbox=(0, 0, 1, 1), good=frozenset({"q", "p1"}),
                        ok=frozenset({"p2"}), junk=frozenset({"j"}))]
    qrows, extra = p.queries(_corpus(["x/q.jpg", "x/p1.jpg", "x/n.jpg"]))
    assert qrows.tolist() == [0] and extra == {"positives_missing": 1}
    assert p.positives[0].tolist() == [0, 1, 3] and p.junk[0].tolist() == []
    # Ranking q, n, p1: hits at 0 and 2 among 3 positives: (1 + (1/2 + 2/3)/2) / 3 = 19/36 (p2 dropped: 19/24).
    assert p.score(np.array([[0, 2, 1]]))["score"] == pytest.approx(19 / 36)


def test_labels_protocol_with_query_boxes_describes_the_crops(monkeypatch, tmp_path):
    # m is labelled red: red in its left quarter (the query box), blue elsewhere; r red, b1 and b2 blue.
    root = tmp_path / "labelled"
    _write(root / "red" / "m.png", [(16, RED), (48, BLUE)])
    _write(root / "red" / "r.png", [(64, RED)])
    _write(root / "blue" / "b1.png", [(64, BLUE)])
    _write(root / "blue" / "b2.png", [(64, BLUISH)])
    for k in range(8):  # more blue images: the labels protocol ranks at least 11 results (P@10 without the query)
        _write(root / "blue" / f"f{k}.png", [(64, (0, 10 * k, 255))])
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,x1,y1,x2,y2\nred/m.png,0,0,16,32\n")
    paths = ["blue/b1.png", "blue/b2.png", *[f"blue/f{k}.png" for k in range(8)], "red/m.png", "red/r.png"]
    monkeypatch.setattr(bm, "load_corpus", lambda *a, **k: _with_labels(_colour_corpus(root, paths), [0] * 10 + [1, 1]))
    model = MeanColourModel()
    cfg = from_dict(BenchmarkConfig, {"dataset": str(root), "features": "unused", "report": str(tmp_path / "r"),
                                      "protocol": "labels", "methods": "crow,crow+regions", "rerank": 12,
                                      "query_boxes": str(boxes), "figure_queries": 0})
    report = bm.run(cfg, model=model)
    assert model.seen == [(16, 32)] and report["queries"] == 1
    # The red crop ranks m (its own image: left out), r, then the blue images: AP 1. The whole image (mean
    # (64, 0, 191)) would rank every blue image (cosine >= .848) before r (.316): AP 1/11.
    assert [r["score"] for r in report["rows"]] == [pytest.approx(1.0), pytest.approx(1.0)]


def _with_labels(c, labels):
    c.labels = np.asarray(labels)
    return c


# --------------------------------------------------------------------------------------------------------------------
# Tune on one query list, report on others (--tune-seed, --report-seeds)
# --------------------------------------------------------------------------------------------------------------------


def test_sample_queries_excluding_a_list_keeps_sizes_and_the_plain_draw():
    from pipeline.bench.datasets import LabelledSet, sample_queries, split_halves

    paths = [f"{c}/{i:02d}.jpg" for c in "abc" for i in range(20)]
    s = LabelledSet("", paths, [p[0] for p in paths])
    tune = sample_queries(s, 0.1, seed=0)
    assert sample_queries(s, 0.1, seed=0, exclude_paths=()) == tune  # the shipped procedure, unchanged
    rep = sample_queries(s, 0.1, seed=1, exclude_paths=tune)
    assert len(rep) == len(tune) == 6 and not set(rep) & set(tune)
    assert [p[0] for p in rep] == [p[0] for p in tune]  # 2 per class, grouped by class
    # Halves: per label n // 2 to the first half, disjoint, together everything, deterministic.
    odd = LabelledSet("", paths[:25], [p[0] for p in paths[:25]])
    first, second = split_halves(odd, seed=0)
    assert len(first) == 10 + 2 and len(second) == 10 + 3
    assert sorted(first + second) == sorted(odd.paths) and split_halves(odd, seed=0) == (first, second)
    assert split_halves(odd, seed=1) != (first, second)


def _ref_rank(c, m):
    v = c.vectors[m] / np.linalg.norm(c.vectors[m], axis=1, keepdims=True)
    return np.argsort(-(v @ v.T), axis=1, kind="stable")


def test_labels_protocol_tune_and_report_halves(tiny_features, tmp_path):
    from pipeline.bench import metrics as ev

    report = bm.run(_cfg(tiny_features, str(tmp_path), protocol="labels", methods="global,rmac,crow",
                         tune_seed=3, figure_queries=0))
    tune = (tmp_path / "queries_tune_half_seed3.txt").read_text().split()
    rest = (tmp_path / "queries_report_half_seed3.txt").read_text().split()
    # 8 classes of 3 images: 1 per class to tune on, 2 to report on.
    assert len(tune) == 8 and len(rest) == 16 and not set(tune) & set(rest)
    split = report["split"]
    assert split["tune"] == "tune_half_seed3" and split["reports"] == ["report_half_seed3"]
    c = load_corpus(tiny_features["features"], tiny_features["images"], *_paths_labels(tiny_features["images"]), {},
                    regions=3)
    by = {r["method"]: r for r in report["rows"]}
    for m in ("global", "rmac", "crow"):
        ranks = _ref_rank(c, m)
        for name, paths in (("tune_half_seed3", tune), ("report_half_seed3", rest)):
            q = np.array([c.paths.index(p) for p in paths])
            ref = ev.labels_eval(ranks[q], c.labels, q)["mAP"]
            assert by[m]["lists"][name] == pytest.approx(ref)
        assert by[m]["tune"] == by[m]["lists"]["tune_half_seed3"] and by[m]["std"] is None
    best = max(("global", "rmac", "crow"), key=lambda m: by[m]["tune"])
    assert split["best_descriptor"] == best
    assert by["crow"][f"gain_{best}"] == pytest.approx(by["crow"]["mean"] - by[best]["mean"])
    assert f"| global | {by['global']['tune']:.4f} |" in report["table"]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["rows"][0]["lists"] == pytest.approx(report["rows"][0]["lists"])


def test_category_protocol_tune_and_report_lists(tiny_features, tmp_path):
    from pipeline.bench import datasets as ds

    report = bm.run(_cfg(tiny_features, str(tmp_path), protocol="category", methods="global,ours", k=2,
                         tune_seed=0, report_seeds="4,5", figure_queries=0))
    lists = {n: (tmp_path / f"queries_{n}.txt").read_text().split()
             for n in ("tune_seed0", "report_seed4", "report_seed5")}
    lset = ds.load_labelled_set(tiny_features["images"])
    assert lists["tune_seed0"] == ds.sample_queries(lset, 0.05, seed=0)  # the plain seeded draw
    for n in ("report_seed4", "report_seed5"):
        assert len(lists[n]) == 8 and not set(lists[n]) & set(lists["tune_seed0"])
        assert lists[n] == ds.sample_queries(lset, 0.05, seed=int(n[-1]), exclude_paths=lists["tune_seed0"])
    c = load_corpus(tiny_features["features"], tiny_features["images"], *_paths_labels(tiny_features["images"]), {})
    ranks = _ref_rank(c, "global")
    g = report["rows"][0]
    for n, paths in lists.items():
        precs = []
        for p in paths:
            qi = c.paths.index(p)
            top = [i for i in ranks[qi] if i != qi][:2]
            precs.append(np.mean([c.labels[i] == c.labels[qi] for i in top]))
        assert g["lists"][n] == pytest.approx(np.mean(precs))
    assert g["mean"] == pytest.approx(np.mean([g["lists"]["report_seed4"], g["lists"]["report_seed5"]]))
    assert g["std"] == pytest.approx(np.std([g["lists"]["report_seed4"], g["lists"]["report_seed5"]], ddof=1))
    assert report["queries"] == len({p for paths in lists.values() for p in paths})


def test_tune_seed_config_errors(tiny_features, tmp_path):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="report-seeds"):
        _cfg(tiny_features, str(tmp_path), tune_seed=0, report_seeds="1,x")
    with pytest.raises(ConfigError, match="report-seeds"):
        _cfg(tiny_features, str(tmp_path), tune_seed=0, report_seeds="1,1")
    with pytest.raises(ConfigError, match="fixed queries"):
        _cfg(tiny_features, str(tmp_path), protocol="oxford", tune_seed=0)
    for bad in ({"kr_k1": 0}, {"kr_k2": 0}, {"kr_lambda": 1.5}, {"kr_lambda": -0.1}):
        with pytest.raises(ConfigError, match="kr_"):
            _cfg(tiny_features, str(tmp_path), **bad)
    q = tmp_path / "q.txt"
    q.write_text("Leopards/image_0001.jpg\n")
    with pytest.raises(ValueError, match="exclude each other"):
        bm.run(_cfg(tiny_features, str(tmp_path / "r"), protocol="category", queries=str(q), tune_seed=0,
                    methods="global"))


def test_dba_and_diffusion_rows_rank_as_their_references(monkeypatch):
    # Unit vectors at 0, 20, 50, 60 and 100 degrees; ours = db; queries rows 0 and 4.
    db = np.stack([_unit(a) for a in (0, 20, 50, 60, 100)])
    _qe_rankers(monkeypatch, db, [0, 4])  # method_vectors patched: ours = crow = db
    from types import SimpleNamespace

    from pipeline.bench import methods
    from pipeline.bench.corpus import Corpus

    c = Corpus("", [f"{i}.jpg" for i in range(5)], None, {"gem": db}, np.zeros((0, 2), np.float32),
               np.zeros(6, np.int64), [])
    cfg = SimpleNamespace(qe=1, rerank=5, dba_k=1, dba_alpha=0.0, diffusion_k=1, diffusion_alpha=0.5,
                          diffusion_seeds=1, kr_k1=2, kr_k2=2, kr_lambda=0.3)
    rankers = methods.method_rankers(c, cfg, np.array([0, 4]), 5)
    # DBA with k = 1: each vector averaged with its nearest other one (0+20, 20+0, 50+60, 60+50, 100+60).
    nn = [1, 0, 3, 2, 3]
    aug = db + db[nn]
    aug /= np.linalg.norm(aug, axis=1, keepdims=True)
    ref = np.argsort(-(db[[0, 4]] @ aug.T), axis=1, kind="stable")
    np.testing.assert_array_equal(rankers["ours+dba"](), ref)
    # + AQE over the DBA'd vectors of the first non-self result.
    first = [next(i for i in r if i != q) for r, q in zip(ref, (0, 4))]
    q2 = db[[0, 4]] + aug[first]
    q2 /= np.linalg.norm(q2, axis=1, keepdims=True)
    np.testing.assert_array_equal(rankers["ours+dba+qe"](), np.argsort(-(q2 @ aug.T), axis=1, kind="stable"))
    # Diffusion from the query's single seed (itself) over the 1-NN graph: its graph component {0, 1} first, then the
    # rest by similarity.
    got = rankers["ours+diffusion"]()
    assert got[0].tolist() == [0, 1, 2, 3, 4]
    assert got[1, 0] == 4 and set(got[1, :3].tolist()) == {4, 3, 2}
    # k-reciprocal: the queries are database rows, encoded with the database (the ranking itself: test_kreciprocal).
    from pipeline.bench.kreciprocal import k_reciprocal_ranking

    np.testing.assert_array_equal(rankers["ours+kr"](),
                                  k_reciprocal_ranking(db, db[[0, 4]], 5, k1=2, k2=2, lam=0.3, q_rows=[0, 4]))


@pytest.mark.parametrize("fuse_global", ["global+rmac", "global"])
def test_ours_ranks_as_the_index_searches(tiny_features, tmp_path, fuse_global):
    """The benchmark's `ours` is the searched vector: with the same --fuse-global, the benchmark's ranking of every
    corpus image equals the hits of an exact index built from the same extraction, searched with those images."""
    from pipeline.bench.corpus import corpus_queries
    from pipeline.bench.methods import method_rankers
    from pipeline.config import IndexConfig
    from pipeline.reduce import build as rd
    from pipeline.retrieval.search import Searcher

    paths, labels = _paths_labels(tiny_features["images"])
    c = load_corpus(tiny_features["features"], tiny_features["images"], paths, labels, {})
    qrows = np.arange(len(c.paths))
    cfg = _cfg(tiny_features, str(tmp_path / "r"), fuse_global=fuse_global)
    ranking = method_rankers(c, cfg, qrows, 5)["ours"]()
    out = str(tmp_path / "index")
    rd.build(IndexConfig(features=tiny_features["features"], output=out, pca_dim=cfg.pca_dim, in_process=True,
                         fuse_global=fuse_global))
    s = Searcher(out)
    q = corpus_queries(c, qrows)
    ids, _ = s.search_vectors([{k: v[i] for k, v in q.vectors.items()} for i in range(len(qrows))], top_k=5)
    row_of = {p: i for i, p in enumerate(c.paths)}
    assert [[row_of[i] for i, _ in s.resolve(r)] for r in ids] == ranking.tolist()
