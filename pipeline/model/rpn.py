"""The DenseCap-style RPN localization layer: the module, its inference (propose), its training targets and loss."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import (
    BalancedPositiveNegativeSampler,
    BoxCoder,
)
from torchvision.ops import box_iou, clip_boxes_to_image, nms, remove_small_boxes


def on_image(anchors: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Mask of the anchors centred on an h x w image's content (anchors centred in a batch's padding belong to no
    image: neither proposed nor trained)."""
    return ((anchors[:, 0] + anchors[:, 2]) / 2 < w) & ((anchors[:, 1] + anchors[:, 3]) / 2 < h)


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
            valid = on_image(anchors, ih, iw)
            sc = logits[i][valid]
            boxes = self.box_coder.decode_single(deltas[i][valid], anchors[valid])
            top = sc.topk(min(pre_nms, sc.numel())).indices
            boxes, sc = clip_boxes_to_image(boxes[top], (ih, iw)), sc[top].sigmoid()
            keep = remove_small_boxes(boxes, min_size)
            boxes, sc = boxes[keep], sc[keep]
            keep = nms(boxes, sc, nms_iou)[:k]
            out.append((boxes[keep], sc[keep]))
        return out


@dataclass
class RPNImageLoss:
    """The RPN's losses on one image, and its positive anchors' predictions (the captioned regions' candidates).

    Attributes:
        objectness: binary cross-entropy over the sampled anchors.
        box: smooth L1 of the positive anchors' deltas, over the sampled anchors' count.
        positive_boxes: (p, 4) the positive anchors' decoded boxes, clipped to the image, without a graph.
        positive_gt: (p,) index of each positive anchor's matched ground-truth box.
    """

    objectness: torch.Tensor
    box: torch.Tensor
    positive_boxes: torch.Tensor
    positive_gt: torch.Tensor


class RPNLoss:
    """Faster R-CNN's RPN training targets and losses (as DenseCap trains its localization layer): anchors matched
    to ground-truth boxes by IoU, a balanced sample of positives and negatives, objectness and box-regression losses.

    Args:
        rpn: the RPN being trained (its box coder encodes the regression targets).
        batch_per_image: anchors sampled per image (at most half positive).
        pos_iou: anchors with IoU >= this to a ground-truth box are positive.
        neg_iou: anchors with IoU < this to every ground-truth box are negative.
    """

    def __init__(self, rpn: RPN, batch_per_image: int, pos_iou: float, neg_iou: float) -> None:
        self.box_coder = rpn.box_coder
        self.sampler = BalancedPositiveNegativeSampler(batch_per_image, 0.5)
        self.pos_iou = pos_iou
        self.neg_iou = neg_iou

    def match(self, anchors: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchor labels (1 positive, 0 negative, -1 ignored) and matched ground-truth index per anchor.

        Positive: IoU >= pos_iou with some box, or the best anchor of a box (Faster R-CNN's low-quality matches, so
        that every box has a positive); negative: IoU < neg_iou with every box.
        """
        iou = box_iou(gt, anchors)  # (G, A)
        best, matched = iou.max(0)
        labels = torch.full_like(best, -1.0)
        labels[best < self.neg_iou] = 0.0
        labels[best >= self.pos_iou] = 1.0
        best_per_gt = iou.max(1, keepdim=True).values
        lowq = ((iou == best_per_gt) & (best_per_gt > 0)).any(0)
        labels[lowq] = 1.0
        return labels, matched

    def __call__(self, anchors: torch.Tensor, logits: torch.Tensor, deltas: torch.Tensor, gt: torch.Tensor,
                 image_size: tuple[int, int]) -> RPNImageLoss:
        """The losses of one image (one call per image: the sampler draws from torch's random generator).

        Args:
            anchors: (A, 4) all anchors of the batch's map (``RPN.anchors``).
            logits: (A,) this image's objectness logits.
            deltas: (A, 4) this image's box deltas.
            gt: (G, 4) ground-truth boxes in the image's pixels.
            image_size: the image's (height, width) of valid pixels.
        """
        ih, iw = image_size
        valid = on_image(anchors, ih, iw)
        anc, lg, dl = anchors[valid], logits[valid], deltas[valid]
        labels, matched = self.match(anc, gt)
        pos_m, neg_m = self.sampler([labels])
        pos, neg = pos_m[0].bool(), neg_m[0].bool()
        sampled = pos | neg
        objectness = F.binary_cross_entropy_with_logits(lg[sampled].float(), labels[sampled])
        target = self.box_coder.encode_single(gt[matched[pos]], anc[pos])
        box = (F.smooth_l1_loss(dl[pos].float(), target, beta=1.0 / 9, reduction="sum")
               / sampled.sum().clamp(min=1))
        with torch.no_grad():
            pred = clip_boxes_to_image(self.box_coder.decode_single(dl[pos].detach().float(), anc[pos]), (ih, iw))
        return RPNImageLoss(objectness, box, pred, matched[pos])
