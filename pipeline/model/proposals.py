"""Region proposers: the ``Proposer`` interface, the activation proposer (per image and batched), proposal recall."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torchvision.ops import box_iou, nms

from pipeline.model.descriptors import rmac_regions
from pipeline.model.transform import cell_sizes, valid_mask


def _box_sums(integral: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Sum of a map inside integer cell boxes [x0, y0, x1, y1) via a summed-area table (h+1, w+1)."""
    x0, y0, x1, y1 = boxes.long().unbind(1)
    return integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]


def activation_candidates(act: np.ndarray, thresholds: Sequence[float], grid_levels: int) -> np.ndarray:
    """Candidate boxes in feature-map cells from an activation map: the bounding boxes of the connected components
    above each relative threshold (where the CNN fires: objects and their parts), the whole map, and an R-MAC style
    multi-scale grid (so that every part of the image can be described even when activation is diffuse).

    Args:
        act: (h, w) non-negative activation (sum over channels).
        thresholds: fractions of the maximum activation.
        grid_levels: R-MAC grid levels (0 = no grid).

    Returns:
        (n, 4) float32 boxes [x0, y0, x1, y1) in cells, unique.
    """
    h, w = act.shape
    boxes = [(0, 0, w, h)]
    peak = float(act.max())
    if peak > 0:
        for t in thresholds:
            labels, n = ndimage.label(act >= t * peak)
            for sl in ndimage.find_objects(labels):
                if sl is not None:
                    boxes.append((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
    if grid_levels > 0:
        for y0, x0, rh, rw in rmac_regions(h, w, levels=grid_levels, overlap=0.4):
            boxes.append((x0, y0, x0 + rw, y0 + rh))
    return np.unique(np.asarray(boxes, dtype=np.float32), axis=0)


def activation_proposals(fmap: torch.Tensor, k: int, thresholds: Sequence[float] = (0.2, 0.35, 0.5, 0.7),
                         grid_levels: int = 3, nms_iou: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-free significant regions from any ImageNet backbone's feature map.

    Each candidate (see ``activation_candidates``) is scored by the geometric mean of its *coverage* (share of the
    image's total activation inside it) and its *density* (mean activation inside it over the image's mean), so a
    region ranks high when it holds much of what the network responds to in a compact box; the whole image scores
    exactly 1. Near-duplicates are removed by NMS, and the top-K kept.

    Args:
        fmap: (C, h, w) non-negative feature map of one image (its valid, unpadded part).
        k: regions to keep.
        thresholds: relative activation thresholds for the connected components.
        grid_levels: R-MAC grid levels added as candidates.
        nms_iou: IoU above which a lower-scored candidate is suppressed.

    Returns:
        (boxes (k', 4) float32 in feature cells [x0, y0, x1, y1), scores (k',) descending), k' <= k.
    """
    act = fmap.float().sum(0)
    h, w = act.shape
    cand = torch.from_numpy(activation_candidates(act.cpu().numpy(), thresholds, grid_levels)).to(act.device)
    integral = torch.zeros(h + 1, w + 1, dtype=torch.float64, device=act.device)
    integral[1:, 1:] = act.double().cumsum(0).cumsum(1)
    total = float(integral[-1, -1])
    area = (cand[:, 2] - cand[:, 0]) * (cand[:, 3] - cand[:, 1])
    if total <= 0:
        scores = area / float(h * w)  # nothing fires: prefer large boxes, deterministic
    else:
        inside = _box_sums(integral, cand).float()
        coverage = inside / total
        density = (inside / area) / (total / (h * w))
        scores = torch.sqrt(coverage.clamp_min(0) * density.clamp_min(0))
    keep = nms(cand, scores, nms_iou)[:k]
    return cand[keep], scores[keep]


class Proposer(Protocol):
    """What the region model asks of a region proposer (the activation proposer, the trained RPN)."""

    def propose(self, fmap: torch.Tensor, hw: Sequence[tuple[int, int]], k: int
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image of a padded batch's feature map (B, C, h, w), given each image's (height, width) in pixels:
        at most k (boxes (k', 4) [x1, y1, x2, y2] in those pixels, scores (k',) descending)."""
        ...


class ActivationProposer:
    """The training-free proposer behind the ``Proposer`` interface: ``activation_proposals`` on each image's own
    feature cells, boxes scaled from cells to pixels and clamped to the image, computed for the whole batch at once
    (``batched_activation_proposals``).

    Args:
        stride: pixels per feature-map cell.
        nms_iou: NMS IoU threshold between candidates.
    """

    def __init__(self, stride: int, nms_iou: float = 0.5) -> None:
        self.stride = stride
        self.nms_iou = nms_iou

    def propose_batch(self, fmap: torch.Tensor, hw: Sequence[tuple[int, int]], k: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k regions of every image as padded tensors (see ``propose_padded``)."""
        cells = cell_sizes(hw, self.stride, fmap.device)
        boxes, scores = batched_activation_proposals(fmap, cells, k, nms_iou=self.nms_iou)
        return clamp_batch(boxes * self.stride, torch.tensor(hw, device=fmap.device)), scores

    def propose(self, fmap: torch.Tensor, hw: Sequence[tuple[int, int]], k: int
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Top-k regions of each image (see ``Proposer.propose``)."""
        boxes, scores = self.propose_batch(fmap, hw, k)
        n = torch.isfinite(scores).sum(dim=1).tolist()
        return [(b[:c], s[:c]) for b, s, c in zip(boxes, scores, n)]


def clamp_batch(boxes: torch.Tensor, hw: torch.Tensor) -> torch.Tensor:
    """Clamp (B, K, 4) [x1, y1, x2, y2] boxes into each image's (height, width) ``hw`` (B, 2); a new tensor."""
    h, w = hw[:, 0].view(-1, 1).to(boxes.dtype), hw[:, 1].view(-1, 1).to(boxes.dtype)
    x = boxes[..., 0::2].clamp_min(0).minimum(w[..., None])
    y = boxes[..., 1::2].clamp_min(0).minimum(h[..., None])
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def propose_padded(proposer: Proposer, fmap: torch.Tensor, hw: Sequence[tuple[int, int]], k: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A proposer's top-k regions of every image as padded tensors: (boxes (B, k', 4) in pixels, scores (B, k')
    descending), an image with fewer regions padded at the end with zero boxes and score -inf. A proposer with
    ``propose_batch`` (the activation proposer) computes them so; another (the RPN) is asked per image and padded.
    """
    batch = getattr(proposer, "propose_batch", None)
    if batch is not None:
        return batch(fmap, hw, k)
    props = proposer.propose(fmap, hw, k)
    n = max(1, max(len(s) for _, s in props))
    boxes = fmap.new_zeros((len(props), n, 4))
    scores = fmap.new_full((len(props), n), float("-inf"))
    for i, (b, s) in enumerate(props):
        boxes[i, : len(s)] = b
        scores[i, : len(s)] = s
    return boxes, scores


def proposal_recall(proposals: torch.Tensor, gt: torch.Tensor, iou: float = 0.5) -> float:
    """Fraction of ground-truth boxes matched by at least one proposal with IoU >= ``iou``."""
    if gt.numel() == 0:
        return float("nan")
    if proposals.numel() == 0:
        return 0.0
    return float((box_iou(gt, proposals).max(dim=1).values >= iou).float().mean())


# ---- the same proposer for a whole batch, in tensor ops on the feature map's device ------------------------------


def label_components(mask: torch.Tensor) -> torch.Tensor:
    """4-connected components of a batch of binary maps (scipy.ndimage.label's default structure), on the device.

    Labels propagate by max over the four neighbours, with pointer jumping (a cell takes the label its label names),
    until nothing changes: a handful of iterations on feature maps, one host sync each.

    Args:
        mask: (N, h, w) bool.

    Returns:
        (N, h, w) int64: 0 off the mask; on it, 1 + the largest flat index (y * w + x) of the cell's component.
    """
    n, h, w = mask.shape
    ids = torch.arange(1, h * w + 1, device=mask.device).view(1, h, w)
    lab = torch.where(mask, ids, 0)
    while True:
        p = F.pad(lab, (1, 1, 1, 1))
        nb = torch.maximum(torch.maximum(p[:, :-2, 1:-1], p[:, 2:, 1:-1]), torch.maximum(p[:, 1:-1, :-2], p[:, 1:-1, 2:]))
        new = torch.where(mask, torch.maximum(lab, nb), 0)
        flat = new.view(n, h * w)
        jumped = flat.gather(1, (flat - 1).clamp_min(0)).view(n, h, w)
        new = torch.where(mask, torch.maximum(new, jumped), 0)
        if torch.equal(new, lab):
            return lab
        lab = new


def component_boxes(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounding boxes of the components ``label_components`` found, one slot per cell (the slot of a component's
    largest cell holds its box).

    Args:
        labels: (N, h, w) from ``label_components``.

    Returns:
        (boxes (N, h*w, 4) int64 [x0, y0, x1, y1) in cells, valid (N, h*w) bool: the slot holds a component).
    """
    n, h, w = labels.shape
    dev = labels.device
    flat = labels.view(n, h * w)
    on = flat > 0
    slot = (flat - 1).clamp_min(0)
    ys = torch.arange(h, device=dev).repeat_interleave(w).expand(n, -1)
    xs = torch.arange(w, device=dev).repeat(h).expand(n, -1)
    big = max(h, w)

    def reduce(v: torch.Tensor, how: str, fill: int) -> torch.Tensor:
        init = torch.full((n, h * w), fill, dtype=torch.long, device=dev)
        return init.scatter_reduce(1, slot, torch.where(on, v, fill), how)

    boxes = torch.stack([reduce(xs, "amin", big), reduce(ys, "amin", big),
                         reduce(xs, "amax", -1) + 1, reduce(ys, "amax", -1) + 1], dim=2)
    valid = on & (flat == torch.arange(1, h * w + 1, device=dev))
    return boxes, valid


_GRID_CACHE: dict[tuple[int, int, int], list[tuple[int, int, int, int]]] = {}


def _grid_boxes(h: int, w: int, levels: int) -> list[tuple[int, int, int, int]]:
    """``activation_candidates``' R-MAC grid boxes [x0, y0, x1, y1) for an h x w cell map (shape only, cached)."""
    key = (h, w, levels)
    if key not in _GRID_CACHE:
        _GRID_CACHE[key] = [(x0, y0, x0 + rw, y0 + rh) for y0, x0, rh, rw in
                            rmac_regions(h, w, levels=levels, overlap=0.4)] if levels > 0 else []
    return _GRID_CACHE[key]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Greedy NMS of each row of a padded batch, exactly as torchvision's ``nms`` on each image alone (a box is
    dropped when its IoU with a kept, higher-ranked box exceeds ``iou``), as a fixed point over an IoU matrix.

    Keeping box j depends only on the boxes ranked before it, so iterating "keep j unless a kept earlier box
    overlaps it" from all-kept settles rank by rank; it stops when nothing changes (suppression chains are short).

    Args:
        boxes: (B, N, 4) [x1, y1, x2, y2], each row sorted by score descending.
        scores: (B, N), -inf on padding (never kept).
        iou: the IoU threshold.

    Returns:
        (B, N) bool: kept.
    """
    n = boxes.shape[1]
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    lt = torch.maximum(boxes[:, :, None, :2], boxes[:, None, :, :2])
    rb = torch.minimum(boxes[:, :, None, 2:], boxes[:, None, :, 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    overlaps = inter / (area[:, :, None] + area[:, None, :] - inter) > iou
    earlier = torch.ones(n, n, dtype=torch.bool, device=boxes.device).triu(1)  # [i, j]: i ranked before j
    overlaps &= earlier
    valid = torch.isfinite(scores)
    keep = valid
    while True:
        new = valid & ~(overlaps & keep[:, :, None]).any(dim=1)
        if torch.equal(new, keep):
            return keep
        keep = new


def batched_activation_proposals(fmap: torch.Tensor, cells: torch.Tensor, k: int,
                                 thresholds: Sequence[float] = (0.2, 0.35, 0.5, 0.7), grid_levels: int = 3,
                                 nms_iou: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``activation_proposals`` for every image of a padded batch at once, on the feature map's device.

    The candidates are the same (the whole map, the connected components above each threshold, the R-MAC grid, each
    on the image's own cells), deduplicated and listed in the same (lexicographic) order, scored by the same formula
    and reduced by the same greedy NMS. Connected components come from ``label_components`` instead of scipy.

    Args:
        fmap: (B, C, H, W) padded batch feature map.
        cells: (B, 2) int64 each image's valid (height, width) in cells (at most (H, W)).
        k: regions kept per image.
        thresholds, grid_levels, nms_iou: as ``activation_proposals``.

    Returns:
        (boxes (B, k', 4) float32 in cells [x0, y0, x1, y1), scores (B, k') descending), k' <= k; an image with
        fewer regions has rows with score -inf (and zero boxes) at the end.
    """
    b, _, H, W = fmap.shape
    dev = fmap.device
    hc, wc = cells[:, 0], cells[:, 1]
    valid = valid_mask(cells, H, W)
    act = fmap.float().sum(1) * valid
    peak = act.masked_fill(~valid, float("-inf")).amax(dim=(1, 2))
    t = torch.tensor(list(thresholds), dtype=act.dtype, device=dev)
    masks = (act[:, None] >= (t.view(1, -1) * peak.view(b, 1)).view(b, -1, 1, 1)) & valid[:, None] \
        & (peak > 0).view(b, 1, 1, 1)
    comp, comp_ok = component_boxes(label_components(masks.view(-1, H, W)))
    comp = comp.view(b, -1, 4)
    comp_ok = comp_ok.view(b, -1)
    # The whole map and the R-MAC grid: from each image's shape alone (host arithmetic on sizes, cached).
    hw = cells.tolist()
    grids = [[(0, 0, w, h), *_grid_boxes(h, w, grid_levels)] for h, w in hw]
    g = max(len(x) for x in grids)
    fixed = torch.tensor([x + [(0, 0, 0, 0)] * (g - len(x)) for x in grids], dtype=torch.long, device=dev)
    fixed_ok = torch.tensor([[True] * len(x) + [False] * (g - len(x)) for x in grids], device=dev)
    cand = torch.cat([fixed, comp], dim=1)
    ok = torch.cat([fixed_ok, comp_ok], dim=1)
    # np.unique's order and deduplication: sort by a lexicographic key, drop repeats, compact.
    s = max(H, W) + 1
    key = ((cand[..., 0] * s + cand[..., 1]) * s + cand[..., 2]) * s + cand[..., 3]
    none = torch.iinfo(torch.long).max
    key = torch.where(ok, key, none)
    key, order = key.sort(dim=1)
    repeat = torch.zeros_like(ok)
    repeat[:, 1:] = key[:, 1:] == key[:, :-1]
    key = torch.where(repeat, none, key)
    key, order2 = key.sort(dim=1)
    order = order.gather(1, order2)
    n = int((key != none).sum(dim=1).max())
    order, ok = order[:, :n], key[:, :n] != none
    cand = (cand.gather(1, order[..., None].expand(-1, -1, 4)) * ok[..., None]).float()  # padding: empty boxes
    # Scores: coverage and density from a summed-area table of each image's activation (float64, as per image).
    integral = F.pad(act.double().cumsum(1).cumsum(2), (1, 0, 1, 0))
    flat = integral.view(b, -1)
    x0, y0, x1, y1 = cand.long().unbind(2)
    w1 = W + 1

    def at(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return flat.gather(1, y * w1 + x)

    inside = (at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)).float()
    total = integral[:, -1, -1].view(b, 1)
    area = (cand[..., 2] - cand[..., 0]) * (cand[..., 3] - cand[..., 1])
    cells_n = (hc * wc).view(b, 1)
    # The per-image code divides float32 tensors by Python floats: the same float32 arithmetic here.
    coverage = inside / total.float()
    density = (inside / area) / (total / cells_n).float()
    scores = torch.where(total > 0, torch.sqrt(coverage.clamp_min(0) * density.clamp_min(0)),
                         area / cells_n.float())
    scores = scores.masked_fill(~ok, float("-inf"))
    scores, rank = scores.sort(dim=1, descending=True, stable=True)
    cand = cand.gather(1, rank[..., None].expand(-1, -1, 4))
    keep = batched_nms(cand, scores, nms_iou)
    # The first k kept, in rank order; fewer kept than k: -inf rows at the end.
    pos = torch.arange(n, device=dev).expand(b, -1)
    top = torch.where(keep, pos, n + pos).argsort(dim=1)[:, :k]
    kept = keep.gather(1, top)
    boxes = cand.gather(1, top[..., None].expand(-1, -1, 4)) * kept[..., None]
    return boxes, scores.gather(1, top).masked_fill(~kept, float("-inf"))
