"""The input transform: images -> a normalised padded batch (inference and training), pyramid levels, boxes back."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.model.backbones import Backbone


def normalise(batch_uint8: torch.Tensor, bb: Backbone) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float normalised with the backbone's mean and std."""
    x = batch_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(bb.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(bb.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _padded(size: int, stride: int) -> int:
    """The smallest multiple of ``stride`` that holds ``size`` pixels."""
    return math.ceil(size / stride) * stride


def batch_images(images: Sequence[np.ndarray], bb: Backbone, device: torch.device
                 ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Pad decoded images to a common size (a multiple of the backbone's stride) and normalise them, so that a batch
    of any sizes runs in one forward pass; the padding is 0 after normalisation (the dataset mean).

    Args:
        images: RGB uint8 arrays (h_i, w_i, 3).
        bb: the backbone (stride, mean, std).
        device: where the batch goes.

    Returns:
        ((B, 3, H, W) float batch, each image's (height, width) inside it).
    """
    H = _padded(max(im.shape[0] for im in images), bb.stride)
    W = _padded(max(im.shape[1] for im in images), bb.stride)
    # Assemble in numpy: decoded arrays may be read-only views of Ray's object store.
    batch = np.zeros((len(images), H, W, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        batch[i, : im.shape[0], : im.shape[1]] = im
    x = normalise(torch.from_numpy(batch).to(device, non_blocking=True), bb)
    mask = torch.zeros((len(images), 1, H, W), device=x.device)
    for i, im in enumerate(images):
        mask[i, :, : im.shape[0], : im.shape[1]] = 1
    return x * mask, [(int(im.shape[0]), int(im.shape[1])) for im in images]


def rescale_batch(x: torch.Tensor, hw: Sequence[tuple[int, int]], scale: float,
                  stride: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Resize each image of a normalised, padded batch by ``scale`` (antialiased when shrinking) and pad them again:
    one level of the region pyramid.

    Args:
        x: (B, 3, H, W) normalised batch, padding = 0.
        hw: each image's (height, width) inside x.
        scale: resize factor.
        stride: the backbone's stride (the new padded size is a multiple of it).

    Returns:
        The new batch and each image's new (height, width).
    """
    new_hw = [(max(1, round(h * scale)), max(1, round(w * scale))) for h, w in hw]
    H = _padded(max(h for h, _ in new_hw), stride)
    W = _padded(max(w for _, w in new_hw), stride)
    out = x.new_zeros((x.shape[0], 3, H, W))
    for i, ((h, w), (nh, nw)) in enumerate(zip(hw, new_hw)):
        out[i, :, :nh, :nw] = F.interpolate(x[i : i + 1, :, :h, :w], size=(nh, nw), mode="bilinear",
                                            align_corners=False, antialias=scale < 1)[0]
    return out, new_hw


def valid_cells(fm: torch.Tensor, h: int, w: int, stride: int) -> torch.Tensor:
    """The part (C, ceil(h/stride), ceil(w/stride)) of one padded feature map (C, H', W') that covers an h x w image."""
    return fm[:, : max(1, math.ceil(h / stride)), : max(1, math.ceil(w / stride))]


def clamp_boxes(boxes: torch.Tensor, h: float, w: float) -> torch.Tensor:
    """Clamp (n, 4) [x1, y1, x2, y2] boxes into a w x h image, in place; returns them."""
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return boxes


def original_boxes(boxes: torch.Tensor, hw: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Boxes in the resized image's pixels -> float32 boxes in the original image's pixels, clamped to it.

    Args:
        boxes: (n, 4) [x1, y1, x2, y2] in resized pixels.
        hw: the resized image's (height, width).
        size: the original image's (width, height).
    """
    ow, oh = size
    h, w = hw
    scale = torch.tensor([ow / w, oh / h, ow / w, oh / h], device=boxes.device)
    # Clamp again after scaling: float32 rounding of w * (ow / w) can land a hair outside the original image.
    return clamp_boxes(boxes.float() * scale, oh, ow)
