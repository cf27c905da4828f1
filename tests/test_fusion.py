"""Tests for pipeline.reduce.pca: L2, PCA (+ whitening) against a numpy SVD reference, serialisation, fusion."""

from __future__ import annotations

import io

import numpy as np
import pytest

from pipeline.reduce.pca import PCA, fuse, l2n


def _anisotropic(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Gaussian data with distinct per-axis scales and an offset, so PCA axes are well separated."""
    rng = np.random.default_rng(seed)
    mixing = np.linalg.qr(rng.standard_normal((d, d)))[0]
    scales = np.linspace(5.0, 0.5, d)
    return (rng.standard_normal((n, d)) * scales @ mixing + 3.0).astype(np.float32)


def test_l2n_unit_rows_zero_row_and_dtype():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]], dtype=np.float64)
    y = l2n(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(l2n(np.array([0.0, 2.0])), [0.0, 1.0])


@pytest.mark.parametrize("n,d,dim", [(600, 24, 10), (20, 64, 50)])  # eigh path, then SVD path (n < d)
def test_pca_matches_numpy_svd_up_to_sign(n, d, dim):
    x = _anisotropic(n, d)
    pca = PCA.fit(x, dim)
    expected_dim = min(dim, n - 1, d)
    assert pca.components.shape == (expected_dim, d)

    x64 = x.astype(np.float64)
    xc = x64 - x64.mean(axis=0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    ref = xc @ vt[:expected_dim].T
    got = pca.project(x)
    signs = np.sign(np.sum(got * ref, axis=0))
    np.testing.assert_allclose(got, ref * signs, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(pca.eigvals, s[:expected_dim] ** 2 / (n - 1), rtol=1e-4)
    np.testing.assert_allclose(pca.transform(x), l2n(got), atol=1e-6)


@pytest.mark.parametrize("n,d,dim", [(600, 24, 10), (20, 64, 50)])
def test_whitening_gives_identity_covariance_on_fit_sample(n, d, dim):
    x = _anisotropic(n, d, seed=1)
    pca = PCA.fit(x, dim, whiten=True)
    cov = np.cov(pca.project(x).astype(np.float64), rowvar=False)
    np.testing.assert_allclose(cov, np.eye(pca.dim), atol=1e-3)
    norms = np.linalg.norm(pca.transform(x), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_pca_sample_is_seeded():
    x = _anisotropic(1000, 16)
    a = PCA.fit(x, 8, sample=100, seed=3)
    b = PCA.fit(x, 8, sample=100, seed=3)
    full = PCA.fit(x, 8)
    np.testing.assert_array_equal(a.components, b.components)
    assert not np.allclose(a.mean, full.mean)


def _assert_same_pca(a: PCA, b: PCA) -> None:
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.components, b.components)
    np.testing.assert_array_equal(a.eigvals, b.eigvals)
    assert a.whiten == b.whiten


def test_pca_bytes_round_trip():
    pca = PCA.fit(_anisotropic(200, 16), 8, whiten=True)
    _assert_same_pca(PCA.from_bytes(pca.to_bytes()), pca)


def test_pca_file_round_trip(tmp_path):
    pca = PCA.fit(_anisotropic(200, 16), 8)
    url = f"file://{tmp_path}/pca.npz"
    pca.save(url)
    _assert_same_pca(PCA.load(url), pca)


def test_pca_s3_round_trip(s3_server, s3_bucket):
    pca = PCA.fit(_anisotropic(200, 16), 8, whiten=True)
    url = f"s3://{s3_bucket}/models/pca.npz"
    pca.save(url, storage_options=s3_server)
    loaded = PCA.load(url, storage_options=s3_server)
    _assert_same_pca(loaded, pca)
    x = _anisotropic(5, 16, seed=9)
    np.testing.assert_array_equal(loaded.transform(x), pca.transform(x))


def test_pca_from_bytes_refuses_pickled_arrays():
    buf = io.BytesIO()
    np.savez(
        buf,
        version=np.array(1),
        mean=np.array([{"not": "data"}], dtype=object),
        components=np.zeros((1, 1), np.float32),
        eigvals=np.ones(1),
        whiten=np.array(False),
    )
    with pytest.raises(ValueError):
        PCA.from_bytes(buf.getvalue())


def test_fuse_concatenates_normalised_parts():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((4, 6)) * 10
    loc = rng.standard_normal((4, 3))
    out = fuse(g, loc, local_weight=0.5)
    assert out.dtype == np.float32 and out.shape == (4, 9)
    np.testing.assert_allclose(out[:, :6], g / np.linalg.norm(g, axis=1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(out[:, 6:], 0.5 * loc / np.linalg.norm(loc, axis=1, keepdims=True), rtol=1e-5)
    with pytest.raises(ValueError):
        fuse(g, loc[:3])


def test_fuse_global_parts_and_fused_vectors_against_numpy():
    """The one definition of the fused vector (index build, search, benchmark): each ``--fuse-global`` against the
    formula written out in numpy."""
    from pipeline.reduce.pca import fuse_columns, fuse_global_part, fuse_vectors

    rng = np.random.default_rng(1)
    v = {"global": rng.standard_normal((5, 4)) * 7, "rmac": rng.standard_normal((5, 3)) * 0.1,
         "local": rng.standard_normal((5, 2))}

    def n(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    both = np.concatenate([n(v["global"]), n(v["rmac"])], axis=1)  # each part at unit norm: R-MAC's scale is ignored
    for kind, part in (("global", v["global"]), ("rmac", v["rmac"]), ("global+rmac", both)):
        np.testing.assert_allclose(fuse_global_part(v, kind), part, rtol=1e-5)
        np.testing.assert_allclose(fuse_vectors(v, kind, 0.5),
                                   np.concatenate([n(part), 0.5 * n(v["local"])], axis=1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fuse_global_part({"global": np.array([[3.0, 4.0]]), "rmac": np.array([[0.0, 2.0]])},
                                                "global+rmac"), [[0.6, 0.8, 0.0, 1.0]])
    assert fuse_columns("global") == ("global", "local")
    assert fuse_columns("rmac") == ("rmac", "local")
    assert fuse_columns("global+rmac") == ("global", "rmac", "local")
    # Only the columns it names are read.
    fuse_vectors({k: v[k] for k in fuse_columns("rmac")}, "rmac")
    for bad in (lambda: fuse_global_part(v, "gem"), lambda: fuse_columns("gem"), lambda: fuse_vectors(v, "gem")):
        with pytest.raises(ValueError, match="unknown fuse_global"):
            bad()
