"""Recognition network: one descriptor per region from bilinear RoI samples (fc6/fc7 for VGG16, pooled RoI otherwise)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from pipeline.config import REGION_POOLS
from pipeline.model.backbones import Backbone


def pool_roi(x: torch.Tensor, pool: str, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Pool RoI samples (n, C, X, Y) into (n, C) with GeM (p), MAC or SPoC (mean)."""
    if pool == "gem":
        return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)
    if pool == "mac":
        return x.amax(dim=(-2, -1))
    if pool == "spoc":
        return x.mean(dim=(-2, -1))
    raise ValueError(f"unknown region pool {pool!r}; known: {REGION_POOLS}")


class RegionDescriber(nn.Module):
    """Describes each region of an image batch.

    For VGG16 (the paper, as DenseCap initialises it), RoIAlign samples a 7x7 grid of conv5_3 features per region and
    the recognition network is VGG16's fc6/fc7 (two FC + ReLU + dropout, D=4096). For other backbones the RoI samples
    are pooled (GeM by default) into a C-dimensional descriptor, optionally followed by a learned linear projection
    (loaded from a trained checkpoint).

    Args:
        backbone: the backbone whose feature map is sampled.
        pool: RoI pooling for non-VGG backbones.
        roi_size: RoI grid (X = Y) for non-VGG backbones.
        projection_dim: output size of a learned projection (0 = none).
    """

    def __init__(self, backbone: Backbone, pool: str = "gem", roi_size: int = 7, projection_dim: int = 0) -> None:
        super().__init__()
        if pool not in REGION_POOLS:
            raise ValueError(f"unknown region pool {pool!r}; known: {REGION_POOLS}")
        self.stride = backbone.stride
        self.head = backbone.head
        self.roi_size = backbone.head_input if backbone.head is not None else roi_size
        self.pool = pool
        self.projection = nn.Linear(backbone.channels, projection_dim) if projection_dim and backbone.head is None else None

    @property
    def dim(self) -> int:
        """Region descriptor dimension."""
        if self.head is not None:
            return 4096
        if self.projection is not None:
            return self.projection.out_features
        return -1  # the backbone's channels; resolved by the caller

    def roi_features(self, fmap: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        """Bilinear RoI sampling (RoIAlign) of all images' boxes: (sum k_i, C, X, Y).

        Args:
            fmap: (B, C, h, w) feature map batch.
            boxes: per image (k_i, 4) [x1, y1, x2, y2] in resized-image pixels.
        """
        return roi_align(fmap, [b.to(fmap.dtype) for b in boxes], output_size=self.roi_size,
                         spatial_scale=1.0 / self.stride, sampling_ratio=2, aligned=True)

    def _describe(self, x: torch.Tensor) -> torch.Tensor:
        """Sampled RoI features (R, C, s, s) -> (R, D) descriptors: the recognition head, or pooling (+ projection)."""
        if self.head is not None:
            return self.head(x.flatten(1))
        desc = pool_roi(x, self.pool)
        return torch.relu(self.projection(desc)) if self.projection is not None else desc

    def forward(self, fmap: torch.Tensor, boxes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Region descriptors per image: a list of (k_i, D) tensors (non-negative)."""
        counts = [int(b.shape[0]) for b in boxes]
        if sum(counts) == 0:
            d = self.dim if self.dim > 0 else fmap.shape[1]
            return [fmap.new_zeros((0, d)) for _ in boxes]
        x = self.roi_features(fmap, boxes)
        desc = self._describe(x)
        return list(desc.split(counts))

    def describe_levels(self, fmaps: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Region descriptors of a padded batch at every pyramid level, with one RoIAlign call for all of them.

        The levels' feature maps are padded to one size by repeating their last row and column (RoIAlign clamps a
        sample at a map's edge to the edge cell, so replicated cells give exactly the per-level result) and stacked
        along the batch; each box samples its own level's image.

        Args:
            fmaps: per level, (B, C, h_l, w_l) feature map.
            boxes: per level, (B, K_l, 4) [x1, y1, x2, y2] in that level's pixels (padding rows are described too;
                callers drop them).

        Returns:
            Per level, (B, K_l, D) descriptors.
        """
        b = fmaps[0].shape[0]
        H = max(f.shape[-2] for f in fmaps)
        W = max(f.shape[-1] for f in fmaps)
        stacked = torch.cat([F.pad(f, (0, W - f.shape[-1], 0, H - f.shape[-2]), mode="replicate")
                             if f.shape[-2:] != (H, W) else f for f in fmaps])
        rois = []
        for level, bx in enumerate(boxes):
            k = bx.shape[1]
            idx = (torch.arange(b, device=bx.device, dtype=stacked.dtype) + level * b).repeat_interleave(k)
            rois.append(torch.cat([idx[:, None], bx.reshape(-1, 4).to(stacked.dtype)], dim=1))
        x = roi_align(stacked, torch.cat(rois), output_size=self.roi_size, spatial_scale=1.0 / self.stride,
                      sampling_ratio=2, aligned=True)
        desc = self._describe(x)
        return [d.view(b, bx.shape[1], -1) for d, bx in zip(desc.split([b * bx.shape[1] for bx in boxes]), boxes)]
