"""Region proposers: a training-free activation proposer and a DenseCap-style RPN localization layer."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou, clip_boxes_to_image, nms, remove_small_boxes

from pipeline.model.descriptors import rmac_regions


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


class RPN(nn.Module):
    """DenseCap-style localization layer: anchors over the feature map, a 3x3 conv, objectness and box regression,
    box decoding, NMS and top-K (Johnson et al. 2016, Faster R-CNN's RPN). RoI sampling is done by the caller with
    bilinear RoIAlign on the same feature map.

    Args:
        in_channels: C of the feature map.
        stride: pixels per cell.
        anchor_sizes: anchor side lengths in pixels (scaled by the aspect ratios).
        aspect_ratios: height / width of anchors.
        mid_channels: channels of the shared 3x3 conv.
    """

    def __init__(self, in_channels: int, stride: int, anchor_sizes: Sequence[float] = (48, 96, 192, 384),
                 aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), mid_channels: int = 256) -> None:
        super().__init__()
        self.stride = stride
        self.anchor_sizes = tuple(float(s) for s in anchor_sizes)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        a = self.num_anchors
        self.conv = nn.Conv2d(in_channels, mid_channels, 3, padding=1)
        self.objectness = nn.Conv2d(mid_channels, a, 1)
        self.deltas = nn.Conv2d(mid_channels, 4 * a, 1)
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        for layer in (self.conv, self.objectness, self.deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    @property
    def num_anchors(self) -> int:
        """Anchors per feature-map cell."""
        return len(self.anchor_sizes) * len(self.aspect_ratios)

    def cell_anchors(self) -> torch.Tensor:
        """(A, 4) anchors centred on the origin, [x1, y1, x2, y2] in pixels."""
        out = []
        for size in self.anchor_sizes:
            for r in self.aspect_ratios:
                hw = size / math.sqrt(r)
                hh = size * math.sqrt(r)
                out.append((-hw / 2, -hh / 2, hw / 2, hh / 2))
        return torch.tensor(out, dtype=torch.float32)

    def anchors(self, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
        """(h * w * A, 4) anchors of an h x w map in image pixels, ordered (y, x, anchor) like ``forward``'s outputs."""
        ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) * self.stride
        xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) * self.stride
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
        return (shifts + self.cell_anchors().to(device).view(1, -1, 4)).reshape(-1, 4)

    def forward(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Objectness logits (B, h*w*A) and box deltas (B, h*w*A, 4) for a feature map batch (B, C, h, w)."""
        t = torch.relu(self.conv(fmap))
        b, _, h, w = t.shape
        logits = self.objectness(t).permute(0, 2, 3, 1).reshape(b, -1)
        deltas = self.deltas(t).view(b, self.num_anchors, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4)
        return logits, deltas

    def propose(self, fmap: torch.Tensor, image_sizes: Sequence[tuple[int, int]], k: int, pre_nms: int = 2000,
                nms_iou: float = 0.7, min_size: float = 8.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Top-K proposals per image.

        Args:
            fmap: (B, C, h, w) padded batch feature map.
            image_sizes: (height, width) of each image's valid (unpadded) pixels.
            k: proposals kept after NMS.
            pre_nms: best anchors considered before NMS.
            nms_iou: NMS IoU threshold.
            min_size: boxes smaller than this (pixels) are dropped.

        Returns:
            Per image (boxes (k', 4) in resized-image pixels, scores (k',) sigmoid objectness, descending).
        """
        logits, deltas = self.forward(fmap)
        h, w = fmap.shape[-2:]
        anchors = self.anchors(h, w, fmap.device)
        out = []
        for i, (ih, iw) in enumerate(image_sizes):
            # Anchors centred in the padding belong to no image content.
            valid = (anchors[:, 0] + anchors[:, 2]) / 2 < iw
            valid &= (anchors[:, 1] + anchors[:, 3]) / 2 < ih
            sc = logits[i][valid]
            boxes = self.box_coder.decode_single(deltas[i][valid], anchors[valid])
            top = sc.topk(min(pre_nms, sc.numel())).indices
            boxes, sc = clip_boxes_to_image(boxes[top], (ih, iw)), sc[top].sigmoid()
            keep = remove_small_boxes(boxes, min_size)
            boxes, sc = boxes[keep], sc[keep]
            keep = nms(boxes, sc, nms_iou)[:k]
            out.append((boxes[keep], sc[keep]))
        return out


def proposal_recall(proposals: torch.Tensor, gt: torch.Tensor, iou: float = 0.5) -> float:
    """Fraction of ground-truth boxes matched by at least one proposal with IoU >= ``iou``."""
    if gt.numel() == 0:
        return float("nan")
    if proposals.numel() == 0:
        return 0.0
    return float((box_iou(gt, proposals).max(dim=1).values >= iou).float().mean())
