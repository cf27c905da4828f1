"""Region proposers: the ``Proposer`` interface, the training-free activation proposer, and proposal recall."""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch
from scipy import ndimage
from torchvision.ops import box_iou, nms

from pipeline.model.descriptors import rmac_regions
from pipeline.model.transform import clamp_boxes, valid_cells


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
    feature cells, boxes scaled from cells to pixels and clamped to the image.

    Args:
        stride: pixels per feature-map cell.
        nms_iou: NMS IoU threshold between candidates.
    """

    def __init__(self, stride: int, nms_iou: float = 0.5) -> None:
        self.stride = stride
        self.nms_iou = nms_iou

    def propose(self, fmap: torch.Tensor, hw: Sequence[tuple[int, int]], k: int
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Top-k regions of each image (see ``Proposer.propose``)."""
        out = []
        for i, (h, w) in enumerate(hw):
            cells, scores = activation_proposals(valid_cells(fmap[i], h, w, self.stride), k, nms_iou=self.nms_iou)
            out.append((clamp_boxes(cells * self.stride, h, w), scores))
        return out


def proposal_recall(proposals: torch.Tensor, gt: torch.Tensor, iou: float = 0.5) -> float:
    """Fraction of ground-truth boxes matched by at least one proposal with IoU >= ``iou``."""
    if gt.numel() == 0:
        return float("nan")
    if proposals.numel() == 0:
        return 0.0
    return float((box_iou(gt, proposals).max(dim=1).values >= iou).float().mean())
