"""Tests for the SIFT bag-of-visual-words baseline."""

from __future__ import annotations

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("faiss")

from pipeline.bench.bow import BowModel, extract_sift_many, sift_descriptors  # noqa: E402

SIZE = 160
N_CLASSES = 6
PER_CLASS = 4  # database images per class
MAX_FEATURES = 200


def _class_template(cls: int) -> np.ndarray:
    """A class-specific random scene of filled shapes on a gradient: plenty of corners and blobs for SIFT."""
    rng = np.random.default_rng(1000 + cls)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    base = (40 + 60 * (xx / SIZE) * rng.random() + 60 * (yy / SIZE) * rng.random()).astype(np.uint8)
    img = np.dstack([base, base, base]).copy()
    for _ in range(14):
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        kind = rng.integers(0, 3)
        x, y = (int(v) for v in rng.integers(10, SIZE - 10, size=2))
        s = int(rng.integers(5, 22))
        if kind == 0:
            cv2.circle(img, (x, y), s, color, -1)
        elif kind == 1:
            cv2.rectangle(img, (x - s, y - s // 2), (x + s, y + s // 2), color, -1)
        else:
            pts = (rng.integers(-s, s, size=(3, 2)) + [x, y]).astype(np.int32)
            cv2.fillPoly(img, [pts], color)
    return img


def _jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A shifted, slightly rotated and scaled, noisy copy (the kind of change BoW should be invariant to)."""
    angle = float(rng.uniform(-20, 20))
    scale = float(rng.uniform(0.9, 1.1))
    m = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), angle, scale)
    m[:, 2] += rng.uniform(-12, 12, size=2)
    out = cv2.warpAffine(img, m, (SIZE, SIZE), borderMode=cv2.BORDER_REFLECT)
    noise = rng.normal(0, 4, size=out.shape)
    return np.clip(out.astype(np.float64) + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def corpus() -> dict:
    rng = np.random.default_rng(0)
    templates = [_class_template(c) for c in range(N_CLASSES)]
    db_images, db_labels, queries, q_labels = [], [], [], []
    for c, t in enumerate(templates):
        for _ in range(PER_CLASS):
            db_images.append(_jitter(t, rng))
            db_labels.append(c)
        queries.append(_jitter(t, rng))
        q_labels.append(c)
    db_desc = extract_sift_many(db_images, max_features=MAX_FEATURES)
    q_desc = extract_sift_many(queries, max_features=MAX_FEATURES)
    model = BowModel.fit(db_desc, k=64, sample=20_000, seed=0, niter=10)
    return {
        "db_images": db_images,
        "db_desc": db_desc,
        "db_labels": np.array(db_labels),
        "q_desc": q_desc,
        "q_labels": np.array(q_labels),
        "model": model,
    }


def _reference_encode(model: BowModel, descriptor_sets: list[np.ndarray]) -> np.ndarray:
    """Plain numpy tf-idf: nearest centroid by argmin of squared distances, counts, times idf, L2."""
    c = model.centroids.astype(np.float64)
    rows = []
    for d in descriptor_sets:
        hist = np.zeros(model.k)
        if len(d):
            dist = ((d.astype(np.float64)[:, None, :] - c[None, :, :]) ** 2).sum(-1)
            hist = np.bincount(dist.argmin(axis=1), minlength=model.k).astype(np.float64)
        v = hist * model.idf.astype(np.float64)
        n = np.linalg.norm(v)
        rows.append(v / n if n > 0 else v)
    return np.stack(rows)


def _drop_near_ties(model: BowModel, d: np.ndarray, margin: float = 1e-4) -> np.ndarray:
    """Remove descriptors almost equidistant to two centroids: float32 faiss and float64 numpy may split them."""
    if len(d) == 0:
        return d
    dist = ((d.astype(np.float64)[:, None, :] - model.centroids.astype(np.float64)[None]) ** 2).sum(-1)
    two = np.sort(dist, axis=1)[:, :2]
    return d[(two[:, 1] - two[:, 0]) > margin]


def test_sift_finds_keypoints_and_rootsift_is_unit_norm(corpus: dict) -> None:
    img = corpus["db_images"][0]
    d = sift_descriptors(img, max_features=MAX_FEATURES)
    assert d.dtype == np.float32 and d.ndim == 2 and d.shape[1] == 128
    assert 20 <= d.shape[0] <= MAX_FEATURES
    assert np.all(d >= 0)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)

    raw = sift_descriptors(img, max_features=MAX_FEATURES, root_sift=False)
    assert raw.shape == d.shape
    # RootSIFT is exactly sqrt(L1-normalised SIFT).
    np.testing.assert_allclose(d, np.sqrt(raw / raw.sum(axis=1, keepdims=True)), atol=1e-6)


def test_sift_blank_image_gives_empty_and_gray_is_accepted() -> None:
    blank = np.full((64, 64, 3), 128, dtype=np.uint8)
    d = sift_descriptors(blank)
    assert d.shape == (0, 128) and d.dtype == np.float32
    gray = cv2.cvtColor(_class_template(0), cv2.COLOR_RGB2GRAY)
    assert sift_descriptors(gray, max_features=50).shape[0] > 0
    with pytest.raises(ValueError):
        sift_descriptors(blank.astype(np.float32))


def test_max_features_cap(corpus: dict) -> None:
    assert sift_descriptors(corpus["db_images"][0], max_features=10).shape[0] <= 10


def test_fit_shapes_and_finite_idf(corpus: dict) -> None:
    model: BowModel = corpus["model"]
    assert model.centroids.shape == (64, 128) and model.centroids.dtype == np.float32
    assert model.idf.shape == (64,) and model.idf.dtype == np.float32
    assert np.all(np.isfinite(model.idf)) and np.all(np.isfinite(model.centroids))
    # idf is bounded by log(N) (a word in a single image) from above.
    assert model.idf.max() <= np.log(len(corpus["db_desc"])) + 1e-6


def test_fit_is_seeded_and_rejects_too_few_descriptors(corpus: dict) -> None:
    again = BowModel.fit(corpus["db_desc"], k=64, sample=20_000, seed=0, niter=10)
    np.testing.assert_allclose(again.centroids, corpus["model"].centroids, atol=1e-5)
    np.testing.assert_allclose(again.idf, corpus["model"].idf, atol=1e-6)
    with pytest.raises(ValueError):
        BowModel.fit([np.zeros((3, 128), np.float32)], k=10)


def test_fit_with_subsample(corpus: dict) -> None:
    m = BowModel.fit(corpus["db_desc"], k=16, sample=500, seed=3, niter=5)
    assert m.centroids.shape == (16, 128) and np.all(np.isfinite(m.idf))


def test_encode_rows_unit_or_zero(corpus: dict) -> None:
    model: BowModel = corpus["model"]
    sets = corpus["db_desc"] + [np.zeros((0, 128), np.float32)]
    x = model.encode(sets)
    assert x.shape == (len(sets), model.k) and x.dtype == np.float32
    norms = np.linalg.norm(x, axis=1)
    np.testing.assert_allclose(norms[:-1], 1.0, atol=1e-5)
    assert norms[-1] == 0.0


def test_encode_matches_numpy_reference(corpus: dict) -> None:
    model: BowModel = corpus["model"]
    sets = [_drop_near_ties(model, d) for d in corpus["db_desc"] + corpus["q_desc"]]
    sets.append(np.zeros((0, 128), np.float32))
    np.testing.assert_allclose(model.encode(sets), _reference_encode(model, sets), atol=1e-5)


def test_retrieval_ranks_same_class_first(corpus: dict) -> None:
    model: BowModel = corpus["model"]
    db = model.encode(corpus["db_desc"])
    q = model.encode(corpus["q_desc"])
    top1 = np.argmax(q @ db.T, axis=1)
    precision = float(np.mean(corpus["db_labels"][top1] == corpus["q_labels"]))
    # Chance is 1/6; a working vocabulary should get (nearly) all of these.
    assert precision >= 0.8, precision


def test_save_load_roundtrip(corpus: dict, tmp_path) -> None:
    model: BowModel = corpus["model"]
    for url in (str(tmp_path / "sub" / "bow.npz"), "memory://bow-test/bow.npz"):
        model.save(url)
        back = BowModel.load(url)
        np.testing.assert_array_equal(back.centroids, model.centroids)
        np.testing.assert_array_equal(back.idf, model.idf)


def test_extract_sift_many_pool_matches_serial(corpus: dict) -> None:
    images = corpus["db_images"][:3]
    serial = extract_sift_many(images, workers=0, max_features=100)
    pooled = extract_sift_many(iter(images), workers=2, max_features=100)
    assert len(pooled) == 3
    for a, b in zip(serial, pooled):
        np.testing.assert_allclose(a, b, atol=1e-6)
