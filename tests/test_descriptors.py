"""Tests for pipeline.model.descriptors: every pooling formula against a plain-numpy implementation written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.model.descriptors import (
    crow,
    gem,
    l2n,
    mac,
    rmac,
    rmac_regions,
    spoc,
    sum_pool_l1,
)

# (C, H, W): square, H != W both ways, 1x1, a single row, an extreme aspect ratio.
SHAPES = [(8, 5, 5), (16, 7, 10), (6, 10, 3), (4, 1, 1), (5, 1, 9), (3, 2, 32), (12, 13, 17)]
TOL = {"rtol": 1e-5, "atol": 1e-5}


def relu_map(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random non-negative, post-ReLU-like map: about half the activations are exactly zero."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.standard_normal(shape), 0.0).astype(np.float32)


def as_t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.copy())


# ---------------------------------------------------------------- numpy references (loops on purpose)


def np_spoc(x):
    c, h, w = x.shape
    out = np.zeros(c)
    for k in range(c):
        for i in range(h):
            for j in range(w):
                out[k] += x[k, i, j]
    return out / (h * w)


def np_mac(x):
    c, h, w = x.shape
    out = np.full(c, -np.inf)
    for k in range(c):
        for i in range(h):
            for j in range(w):
                out[k] = max(out[k], x[k, i, j])
    return out


def np_gem(x, p=3.0, eps=1e-6):
    c, h, w = x.shape
    out = np.zeros(c)
    for k in range(c):
        acc = 0.0
        for i in range(h):
            for j in range(w):
                acc += max(float(x[k, i, j]), eps) ** p
        out[k] = (acc / (h * w)) ** (1.0 / p)
    return out


def np_rmac_regions(H, W, L=3, ovr=0.4):
    """cirtorch's rmac region loop written with numpy float32, in cirtorch's operation order.

    torch evaluates ``scalar / tensor`` as ``reciprocal(tensor) * scalar``, so that is done here too;
    together with float32 this decides exact-math ties (e.g. 5x9) the way cirtorch does.
    """
    f = np.float32
    steps = np.array([2, 3, 4, 5, 6, 7], dtype=f)
    w = min(W, H)
    b = (f(1) / (steps - f(1))) * f(max(H, W) - w)
    idx = int(np.argmin(np.abs(((f(w**2) - f(w) * b) / f(w**2)) - f(ovr))))
    Wd = idx + 1 if H < W else 0
    Hd = idx + 1 if H > W else 0
    regions = []
    for l in range(1, L + 1):
        wl = math.floor(2 * w / (l + 1))
        wl2 = math.floor(wl / 2 - 1)
        if wl == 0:
            continue

        def starts(n, size):
            step = 0.0 if n == 1 else (size - wl) / (n - 1)
            return [int(np.floor(f(wl2) + f(i) * f(step))) - wl2 for i in range(n)]

        for y0 in starts(l + Hd, H):
            for x0 in starts(l + Wd, W):
                regions.append((y0, x0, wl, wl))
    return regions


def np_rmac(x, L=3, ovr=0.4, eps=1e-6):
    def norm_mac(r):
        v = np_mac(r)
        return v / (np.sqrt((v**2).sum()) + eps)

    out = norm_mac(x)
    for y0, x0, h, w in np_rmac_regions(x.shape[1], x.shape[2], L, ovr):
        out = out + norm_mac(x[:, y0 : y0 + h, x0 : x0 + w])
    return out


def np_crow(X, a=2, b=2):
    """yahoo/crow crow.py: compute_crow_spatial_weight, compute_crow_channel_weight, apply_crow_aggregation."""
    S = X.sum(axis=0)
    z = (S**a).sum() ** (1.0 / a)
    S = (S / z) ** (1.0 / b) if b != 1 else (S / z)
    K, h, w = X.shape
    nonzeros = np.zeros(K)
    for i, xk in enumerate(X):
        nonzeros[i] = np.count_nonzero(xk) / float(h * w)
    nzsum = nonzeros.sum()
    C = np.zeros(K)
    for i, d in enumerate(nonzeros):
        C[i] = np.log(nzsum / d) if d > 0.0 else 0.0
    return (X * S).sum(axis=(1, 2)) * C


# ---------------------------------------------------------------- SPoC, MAC, GeM


@pytest.mark.parametrize("shape", SHAPES)
def test_spoc_mac_match_numpy(shape):
    x = relu_map(shape, seed=sum(shape))
    for fn, ref in ((spoc, np_spoc), (mac, np_mac)):
        got = fn(as_t(x))
        assert got.shape == (shape[0],) and got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), ref(x), **TOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [1.0, 3.0, 4.5])
def test_gem_matches_numpy(shape, p):
    x = relu_map(shape, seed=sum(shape) + int(p * 10))
    got = gem(as_t(x), p=p)
    assert got.shape == (shape[0],)
    np.testing.assert_allclose(got.numpy(), np_gem(x, p), **TOL)


def test_gem_limits_and_learnable_p():
    x = as_t(relu_map((6, 9, 7), seed=3)) + 0.1
    np.testing.assert_allclose(gem(x, p=1.0).numpy(), spoc(x).numpy(), **TOL)
    # Large p tends to MAC: here the gap is at most (1/(H*W))^(1/p) = 63^(-1/300), about 1.4 %.
    assert torch.allclose(gem(x.double(), p=300.0), mac(x.double()), rtol=0.02)
    p = torch.tensor(3.0, requires_grad=True)
    gem(x, p=p).sum().backward()
    assert p.grad is not None and torch.isfinite(p.grad)


def test_batched_leading_dims_for_global_pools():
    x = as_t(relu_map((2, 5, 4, 6), seed=9))
    for fn in (spoc, mac, gem):
        out = fn(x)
        assert out.shape == (2, 5)
        np.testing.assert_allclose(out[1].numpy(), fn(x[1]).numpy(), **TOL)


def test_bad_shapes_rejected():
    for fn in (spoc, mac, gem, rmac, crow):
        with pytest.raises(ValueError):
            fn(torch.zeros(4, 5))
        with pytest.raises(ValueError):
            fn(torch.zeros(4, 0, 5))
    with pytest.raises(ValueError):
        rmac(torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError):
        sum_pool_l1(torch.zeros(5))


def test_float64_in_float64_out():
    x = as_t(relu_map((4, 6, 5), seed=2)).double()
    for fn in (spoc, mac, gem, rmac, crow):
        assert fn(x).dtype == torch.float64


# ---------------------------------------------------------------- R-MAC


def test_rmac_regions_square_by_hand():
    # H = W = 10, cirtorch: w = 10, no extra regions (Wd = Hd = 0).
    #   l=1: wl = floor(20/2) = 10, one region = the full map.
    #   l=2: wl = floor(20/3) = 6, wl2 = 2, step (10-6)/1 = 4 -> starts floor(2 + {0,4}) - 2 = {0, 4}.
    #   l=3: wl = floor(20/4) = 5, wl2 = 1, step (10-5)/2 = 2.5 -> starts floor(1 + {0,2.5,5}) - 1 = {0, 2, 5}.
    expected = [(0, 0, 10, 10)]
    expected += [(y, x, 6, 6) for y in (0, 4) for x in (0, 4)]
    expected += [(y, x, 5, 5) for y in (0, 2, 5) for x in (0, 2, 5)]
    assert rmac_regions(10, 10, 3) == expected


def test_rmac_regions_landscape_by_hand():
    # H = 7, W = 10 (e.g. VGG pool5 of a 224x320 image). w = 7, b = 3 / (steps - 1) = [3, 1.5, 1, ...],
    # |(1 - b/7) - 0.4| is smallest at steps = 2 (idx 0) -> Wd = 1: one extra region along the width.
    #   l=1: wl = 7, wl2 = 2; width: 2 regions, step 3 -> {0, 3}; height: 1 region {0}.
    #   l=2: wl = 4, wl2 = 1; width: 3 regions, step 3 -> {0, 3, 6}; height: 2, step 3 -> {0, 3}.
    #   l=3: wl = 3, wl2 = 0; width: 4 regions, step 7/3 -> {0, 2, 4, 7}; height: 3, step 2 -> {0, 2, 4}.
    expected = [(0, 0, 7, 7), (0, 3, 7, 7)]
    expected += [(y, x, 4, 4) for y in (0, 3) for x in (0, 3, 6)]
    expected += [(y, x, 3, 3) for y in (0, 2, 4) for x in (0, 2, 4, 7)]
    assert rmac_regions(7, 10, 3) == expected
    # Transposed map: the same grid with the axes swapped.
    assert sorted(rmac_regions(10, 7, 3)) == sorted((x, y, h, w) for y, x, h, w in expected)


def test_rmac_regions_tie_resolved_like_cirtorch():
    # 5x9: |(1 - b/5) - 0.4| ties at 0.2 for steps 2 and 3 in exact arithmetic. cirtorch's float32
    # picks steps = 2 (Wd = 1, 20 regions); float64 would pick steps = 3 (26 regions).
    regions = rmac_regions(5, 9, 3)
    assert len(regions) == 20
    assert regions[:2] == [(0, 0, 5, 5), (0, 4, 5, 5)]


def test_rmac_regions_one_by_one():
    # w = 1: level 1 is the single cell (wl2 = floor(-0.5) = -1 cancels); levels 2, 3 have wl = 0.
    assert rmac_regions(1, 1, 3) == [(0, 0, 1, 1)]


@pytest.mark.parametrize("L", [1, 3, 5])
def test_rmac_regions_match_numpy_reference_and_stay_inside(L):
    for H in range(1, 33):
        for W in range(1, 33) if L == 3 else (1, 2, 5, 9, 16, 31, 32):
            regions = rmac_regions(H, W, L)
            assert regions == np_rmac_regions(H, W, L), (H, W)
            for y0, x0, h, w in regions:
                assert 0 <= y0 and y0 + h <= H and 0 <= x0 and x0 + w <= W and h == w >= 1
            # The full map is a level-1 region exactly when the reference makes it one: square maps.
            assert ((0, 0, H, W) in regions) == (H == W)


def test_rmac_regions_levels_zero_and_validation():
    assert rmac_regions(8, 8, 0) == []
    with pytest.raises(ValueError):
        rmac_regions(0, 5)


@pytest.mark.parametrize("shape", SHAPES)
def test_rmac_matches_numpy(shape):
    x = relu_map(shape, seed=100 + sum(shape))
    got = rmac(as_t(x))
    assert got.shape == (shape[0],)
    np.testing.assert_allclose(got.numpy(), np_rmac(x), **TOL)


def test_rmac_one_by_one_is_twice_the_normalised_vector():
    x = as_t(relu_map((5, 1, 1), seed=4)) + 0.5
    v = x[:, 0, 0]
    expected = 2 * v / (v.norm() + 1e-6)  # level 0 + the single level-1 region
    np.testing.assert_allclose(rmac(x).numpy(), expected.numpy(), **TOL)


# ---------------------------------------------------------------- CroW


@pytest.mark.parametrize("shape", SHAPES)
def test_crow_matches_reference(shape):
    x = relu_map(shape, seed=200 + sum(shape))
    got = crow(as_t(x))
    assert got.shape == (shape[0],)
    np.testing.assert_allclose(got.numpy(), np_crow(x.astype(np.float64)), **TOL)


def test_crow_all_zero_channels_get_zero_weight():
    x = relu_map((10, 6, 8), seed=5)
    x[[1, 4, 7]] = 0.0  # channels that never fire
    got = crow(as_t(x))
    ref = np_crow(x.astype(np.float64))
    np.testing.assert_allclose(got.numpy(), ref, **TOL)
    assert torch.isfinite(got).all()
    assert (got[[1, 4, 7]] == 0).all()


def test_crow_nondefault_a_b_and_all_zero_map():
    x = relu_map((7, 5, 6), seed=6)
    for a, b in ((1, 1), (2, 1), (3, 2)):
        np.testing.assert_allclose(crow(as_t(x), a=a, b=b).numpy(), np_crow(x.astype(np.float64), a, b), **TOL)
    zero = crow(torch.zeros(4, 3, 3))
    assert torch.equal(zero, torch.zeros(4))  # the reference divides by zero here


# ---------------------------------------------------------------- sum pooling + L1 (eq. 1-2), l2n


@pytest.mark.parametrize("k", [1, 3, 17])
def test_sum_pool_l1_matches_formula(k):
    r = np.abs(np.random.default_rng(k).standard_normal((k, 32))).astype(np.float32)
    got = sum_pool_l1(as_t(r))
    f = np.zeros(32)
    for row in r:  # eq. (1)
        f += row
    f /= np.abs(f).sum()  # eq. (2)
    assert got.shape == (32,)
    np.testing.assert_allclose(got.numpy(), f, **TOL)
    assert abs(float(got.abs().sum()) - 1.0) < 1e-5


def test_sum_pool_l1_no_regions_and_zero_regions():
    empty = sum_pool_l1(torch.zeros(0, 16))
    assert empty.shape == (16,) and torch.equal(empty, torch.zeros(16))
    zeros = sum_pool_l1(torch.zeros(4, 16))
    assert torch.equal(zeros, torch.zeros(16))


def test_l2n():
    v = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(l2n(v).numpy(), [[0.6, 0.8], [0.0, 0.0]], **TOL)
    np.testing.assert_allclose(l2n(torch.tensor([3.0, 4.0])).numpy(), [0.6, 0.8], **TOL)
    np.testing.assert_allclose(l2n(v, dim=0)[:, 0].numpy(), [1.0, 0.0], **TOL)


# ---------------------------------------------------------------- the batched (masked) forms against the per-image ones


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """A (B, C, 9, 12) padded batch of maps of several valid sizes (padding filled with large values, which a masked
    form must ignore; an all-zero image included), their (h, w), and the valid maps."""
    sizes = [(9, 12), (5, 12), (9, 4), (1, 1), (7, 7), (3, 11)]
    x = torch.full((len(sizes), 6, 9, 12), 50.0)
    maps = []
    for i, (h, w) in enumerate(sizes):
        m = relu_map((6, h, w), seed + i) if i != 4 else np.zeros((6, h, w), np.float32)
        x[i, :, :h, :w] = as_t(m)
        maps.append(m)
    return x, torch.tensor(sizes), maps


def test_masked_poolings_equal_the_per_image_formulas() -> None:
    from pipeline.model import descriptors as D
    from pipeline.model.transform import valid_mask

    x, cells, maps = padded_batch()
    mask = valid_mask(cells, x.shape[-2], x.shape[-1])
    got = {"spoc": D.masked_spoc(x, mask), "mac": D.masked_mac(x, mask), "gem": D.masked_gem(x, mask),
           "crow": D.masked_crow(x, mask), "rmac": D.batched_rmac(x, cells)}
    for i, m in enumerate(maps):
        t = as_t(m)
        want = {"spoc": spoc(t), "mac": mac(t), "gem": gem(t), "crow": crow(t), "rmac": rmac(t)}
        for k, w in want.items():
            np.testing.assert_allclose(got[k][i].numpy(), w.numpy(), err_msg=f"{k} image {i}", **TOL)


def test_masked_sum_pool_l1_ignores_padding_rows() -> None:
    from pipeline.model.descriptors import masked_sum_pool_l1

    rng = np.random.default_rng(3)
    r = torch.from_numpy(rng.random((3, 5, 4), dtype=np.float32))
    valid = torch.tensor([[True] * 5, [True, True, False, False, False], [False] * 5])
    got = masked_sum_pool_l1(r, valid)
    for i in range(3):
        np.testing.assert_allclose(got[i].numpy(), sum_pool_l1(r[i][valid[i]]).numpy(), **TOL)
