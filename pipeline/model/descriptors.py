"""Pure pooling formulas over CNN feature maps: SPoC, MAC, R-MAC, GeM, CroW, and sum pooling + L1 (paper eq. 1-2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["crow", "gem", "l2n", "mac", "rmac", "rmac_regions", "spoc", "sum_pool_l1"]


def _check_map(x: Tensor, name: str, batched: bool = False) -> Tensor:
    """Validate a feature map and give it a floating dtype.

    Args:
        x: feature map, (C, H, W) (or (..., C, H, W) when batched).
        name: caller name for the error message.
        batched: whether leading batch dimensions are allowed.

    Returns:
        x, cast to float32 if it was not floating point.

    Raises:
        ValueError: on a wrong number of dimensions or an empty spatial grid.
    """
    if (x.dim() != 3) if not batched else (x.dim() < 3):
        raise ValueError(f"{name}: expected a (C, H, W) feature map, got shape {tuple(x.shape)}")
    if x.shape[-1] == 0 or x.shape[-2] == 0:
        raise ValueError(f"{name}: empty spatial grid {tuple(x.shape)}")
    return x if x.is_floating_point() else x.float()


def l2n(v: Tensor, eps: float = 1e-12, dim: int = -1) -> Tensor:
    """L2-normalise along one dimension; an all-zero vector stays zero.

    Args:
        v: tensor of any shape.
        eps: lower bound on the norm (as torch.nn.functional.normalize).
        dim: dimension to normalise.

    Returns:
        v / max(||v||_2, eps), same shape as v.
    """
    return F.normalize(v, p=2.0, dim=dim, eps=eps)


def spoc(x: Tensor) -> Tensor:
    """SPoC: average (sum) pooling over spatial positions.

    Babenko & Lempitsky, "Aggregating Deep Convolutional Features for Image Retrieval", ICCV 2015.
    The mean differs from the sum only by the factor H*W, which L2 normalisation removes.

    Args:
        x: non-negative feature map (C, H, W); leading batch dims are allowed.

    Returns:
        (C,) (or (..., C)) unnormalised descriptor.
    """
    x = _check_map(x, "spoc", batched=True)
    return x.mean(dim=(-2, -1))


def mac(x: Tensor) -> Tensor:
    """MAC: maximum activation of convolutions, max over spatial positions.

    Tolias, Sicre & Jégou, "Particular object retrieval with integral max-pooling of CNN
    activations", ICLR 2016.

    Args:
        x: feature map (C, H, W); leading batch dims are allowed.

    Returns:
        (C,) (or (..., C)) unnormalised descriptor.
    """
    x = _check_map(x, "mac", batched=True)
    return x.amax(dim=(-2, -1))


def gem(x: Tensor, p: float | Tensor = 3.0, eps: float = 1e-6) -> Tensor:
    """GeM: generalized-mean pooling, (mean(clamp(x, eps)^p))^(1/p).

    Radenović, Tolias & Chum, "Fine-tuning CNN Image Retrieval with No Human Annotation", TPAMI 2018.
    p=1 is SPoC, p -> inf tends to MAC. The clamp keeps the fractional power defined at zero.

    Args:
        x: non-negative feature map (C, H, W); leading batch dims are allowed.
        p: pooling exponent (a float or a learnable scalar tensor).
        eps: lower clamp applied to activations before the power.

    Returns:
        (C,) (or (..., C)) unnormalised descriptor.
    """
    x = _check_map(x, "gem", batched=True)
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def rmac_regions(H: int, W: int, levels: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int, int]]:
    """The R-MAC square region grid for an H x W map, levels 1..L (the level-0 full map is not listed).

    Tolias, Sicre & Jégou, ICLR 2016, as implemented by cirtorch's ``rmac`` (Radenović,
    cnnimageretrieval-pytorch, cirtorch/layers/functional.py). At level l the square side is
    floor(2*min(H, W) / (l+1)), with l regions along the short side and l + extra along the long side,
    the extra count chosen so neighbouring regions overlap by about ``overlap``. Square maps therefore
    get the full map as their single level-1 region; non-square maps never do.

    The arithmetic is done in float32 torch in the reference's order (including its
    ``scalar / tensor`` = reciprocal-times-scalar rounding), so exact-math ties (e.g. a 5x9 map) and
    rounding at extreme aspect ratios resolve exactly as in cirtorch, not as in the float64 MATLAB
    original. Regions are listed level by level, row-major, duplicates kept (cirtorch sums them all).

    Args:
        H: map height (>= 1).
        W: map width (>= 1).
        levels: number of levels L.
        overlap: desired overlap of neighbouring regions (cirtorch ``ovr``).

    Returns:
        List of (y0, x0, h, w) in map cells, with h == w.

    Raises:
        ValueError: for a non-positive size or a negative level count.
    """
    if H < 1 or W < 1 or levels < 0:
        raise ValueError(f"rmac_regions: need H, W >= 1 and levels >= 0, got {H}, {W}, {levels}")
    steps = torch.tensor([2, 3, 4, 5, 6, 7], dtype=torch.float32)  # candidate region counts, long side
    w = min(W, H)
    b = (max(H, W) - w) / (steps - 1)
    _, idx = torch.min(torch.abs(((w**2 - w * b) / w**2) - overlap), 0)  # first index on ties

    # Extra regions along the long dimension only.
    wd = hd = 0
    if H < W:
        wd = int(idx.item()) + 1
    elif H > W:
        hd = int(idx.item()) + 1

    regions: list[tuple[int, int, int, int]] = []
    for level in range(1, levels + 1):
        wl = math.floor(2 * w / (level + 1))
        if wl == 0:  # a 1-cell-wide map has no room for levels >= 2
            continue
        wl2 = math.floor(wl / 2 - 1)
        starts_x = _region_starts(W, wl, wl2, level + wd)
        starts_y = _region_starts(H, wl, wl2, level + hd)
        regions.extend((y0, x0, wl, wl) for y0 in starts_y for x0 in starts_x)
    return regions


def _region_starts(size: int, wl: int, wl2: int, n: int) -> list[int]:
    """Top-left offsets of n regions of side wl spread evenly over size cells, as cirtorch computes them.

    Args:
        size: map extent along this axis.
        wl: region side.
        wl2: cirtorch's floor(wl/2 - 1) half-side offset (cancels out except for rounding).
        n: number of regions along this axis.

    Returns:
        n start offsets.
    """
    step = 0.0 if n == 1 else (size - wl) / (n - 1)
    centres = torch.floor(wl2 + torch.arange(n, dtype=torch.float32) * step) - wl2
    return [int(c) for c in centres.tolist()]


def rmac(x: Tensor, levels: int = 3, overlap: float = 0.4, eps: float = 1e-6) -> Tensor:
    """R-MAC: sum of L2-normalised MAC vectors over a multi-scale square region grid.

    Tolias, Sicre & Jégou, ICLR 2016, following cirtorch's ``rmac``: the level-0 MAC of the whole
    map plus the MAC of every region from rmac_regions, each divided by (its L2 norm + eps).
    The sum is returned unnormalised (callers L2-normalise; PCA-whitening per region, as in the
    paper's full pipeline, is not part of this formula).

    Args:
        x: non-negative feature map (C, H, W).
        levels: number of region levels L.
        overlap: desired overlap of neighbouring regions.
        eps: added to each region norm, as in cirtorch.

    Returns:
        (C,) unnormalised descriptor.
    """
    x = _check_map(x, "rmac")

    def _norm_mac(r: Tensor) -> Tensor:
        v = r.amax(dim=(-2, -1))
        return v / (v.norm(p=2) + eps)

    out = _norm_mac(x)
    for y0, x0, h, w in rmac_regions(x.shape[-2], x.shape[-1], levels, overlap):
        out = out + _norm_mac(x[:, y0 : y0 + h, x0 : x0 + w])
    return out


def crow(x: Tensor, a: float = 2.0, b: float = 2.0) -> Tensor:
    """CroW: cross-dimensional weighting, spatially and channel-weighted sum pooling.

    Kalantidis, Mellina & Osindero, "Cross-dimensional Weighting for Aggregated Deep Convolutional
    Features", ECCV Workshops 2016; follows the reference code (yahoo/crow, crow.py:
    compute_crow_spatial_weight, compute_crow_channel_weight, apply_crow_aggregation) minus its
    final L2 normalisation.

    Spatial weight: Z = sum_k x_k, S = (Z / ||Z||_a)^(1/b).
    Channel weight: Q_k = fraction of non-zero positions in channel k,
    Omega_k = log(sum_j Q_j / Q_k) for Q_k > 0, else 0 (a channel that never fires carries no
    information; the reference sets it to 0 rather than infinity).
    Result: Omega_k * sum_{ij} S_ij x_kij.

    Args:
        x: non-negative feature map (C, H, W).
        a: norm used to normalise the spatial weight.
        b: power applied to the normalised spatial weight.

    Returns:
        (C,) unnormalised descriptor; all zeros for an all-zero map (the reference would give NaN).
    """
    x = _check_map(x, "crow")
    s = x.sum(dim=0)  # (H, W) total activation per position
    z = s.pow(a).sum().pow(1.0 / a)
    if not bool(z > 0):
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    s = s / z
    if b != 1:
        s = s.pow(1.0 / b)

    q = (x != 0).to(x.dtype).mean(dim=(-2, -1))  # (C,) as np.count_nonzero / area in the reference
    fired = q > 0
    # Clamp only to keep the masked-out branch finite; it is discarded by where().
    omega = torch.where(fired, torch.log(q.sum() / q.clamp_min(torch.finfo(x.dtype).tiny)), torch.zeros_like(q))
    return omega * (x * s).sum(dim=(-2, -1))


def sum_pool_l1(region_desc: Tensor, eps: float = 1e-12) -> Tensor:
    """Aggregate region descriptors into one image vector: paper eq. (1) f = sum_k r_k, eq. (2) f / ||f||_1.

    Args:
        region_desc: (K, D) region descriptors; K may be 0.
        eps: lower bound on ||f||_1, so an all-zero sum stays zero instead of becoming NaN.

    Returns:
        (D,) L1-normalised vector; a zero vector when there are no regions.

    Raises:
        ValueError: if region_desc is not 2-D.
    """
    if region_desc.dim() != 2:
        raise ValueError(f"sum_pool_l1: expected (K, D) region descriptors, got shape {tuple(region_desc.shape)}")
    r = region_desc if region_desc.is_floating_point() else region_desc.float()
    f = r.sum(dim=0)  # (D,), zeros when K == 0
    return f / f.abs().sum().clamp_min(eps)


# ---- the same formulas for a padded batch: (B, C, H, W) with each image's valid cells given by a mask -------------


def masked_spoc(x: Tensor, mask: Tensor) -> Tensor:
    """``spoc`` of each image's valid cells: (B, C, H, W), (B, H, W) -> (B, C)."""
    m = mask[:, None].to(x.dtype)
    return (x * m).sum(dim=(-2, -1)) / m.sum(dim=(-2, -1))


def masked_mac(x: Tensor, mask: Tensor) -> Tensor:
    """``mac`` of each image's valid cells: (B, C, H, W), (B, H, W) -> (B, C)."""
    return x.masked_fill(~mask[:, None], float("-inf")).amax(dim=(-2, -1))


def masked_gem(x: Tensor, mask: Tensor, p: float = 3.0, eps: float = 1e-6) -> Tensor:
    """``gem`` of each image's valid cells: (B, C, H, W), (B, H, W) -> (B, C)."""
    m = mask[:, None].to(x.dtype)
    return ((x.clamp(min=eps).pow(p) * m).sum(dim=(-2, -1)) / m.sum(dim=(-2, -1))).pow(1.0 / p)


def masked_crow(x: Tensor, mask: Tensor, a: float = 2.0, b: float = 2.0) -> Tensor:
    """``crow`` of each image's valid cells: (B, C, H, W), (B, H, W) -> (B, C); zeros for an all-zero image."""
    m = mask.to(x.dtype)
    s = x.sum(dim=1) * m  # (B, H, W)
    z = s.pow(a).sum(dim=(-2, -1)).pow(1.0 / a)
    fired_img = z > 0
    s = s / torch.where(fired_img, z, torch.ones_like(z)).view(-1, 1, 1)
    if b != 1:
        s = s.pow(1.0 / b)
    q = ((x != 0) & mask[:, None]).to(x.dtype).sum(dim=(-2, -1)) / m.sum(dim=(-2, -1))[:, None]
    fired = q > 0
    omega = torch.where(fired, torch.log(q.sum(dim=1, keepdim=True) / q.clamp_min(torch.finfo(x.dtype).tiny)),
                        torch.zeros_like(q))
    out = omega * (x * s[:, None]).sum(dim=(-2, -1))
    return out * fired_img[:, None]


_RMAC_CACHE: dict[tuple[int, int, int, float], list[tuple[int, int, int, int]]] = {}


def batched_rmac(x: Tensor, cells: Tensor, levels: int = 3, overlap: float = 0.4, eps: float = 1e-6) -> Tensor:
    """``rmac`` of each image's valid cells: every image's regions max-pooled in one ``roi_pool`` call.

    The region grids depend on each image's valid size only (host arithmetic, cached by size); ``roi_pool`` with one
    output bin and integer cell boxes is the maximum over exactly the box's cells.

    Args:
        x: (B, C, H, W) padded batch feature map.
        cells: (B, 2) each image's valid (height, width) in cells.
        levels, overlap, eps: as ``rmac``.

    Returns:
        (B, C) unnormalised descriptors.
    """
    from torchvision.ops import roi_pool

    rows = []
    for i, (h, w) in enumerate(cells.tolist()):
        key = (h, w, levels, overlap)
        if key not in _RMAC_CACHE:
            _RMAC_CACHE[key] = [(0, 0, h, w), *rmac_regions(h, w, levels, overlap)]
        rows.extend((i, x0, y0, x0 + rw - 1, y0 + rh - 1) for y0, x0, rh, rw in _RMAC_CACHE[key])
    rois = torch.tensor(rows, dtype=x.dtype, device=x.device)
    v = roi_pool(x, rois, output_size=1, spatial_scale=1.0).flatten(1)  # (R, C)
    v = v / (v.norm(p=2, dim=1, keepdim=True) + eps)
    return torch.zeros(x.shape[0], x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, rois[:, 0].long(), v)


def masked_sum_pool_l1(regions: Tensor, valid: Tensor, eps: float = 1e-12) -> Tensor:
    """``sum_pool_l1`` of each image's valid regions: (B, K, D), (B, K) bool -> (B, D)."""
    f = (regions * valid[..., None].to(regions.dtype)).sum(dim=1)
    return f / f.abs().sum(dim=1, keepdim=True).clamp_min(eps)
