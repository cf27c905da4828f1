"""The input transform: images -> a normalised padded batch (inference and training), pyramid levels, boxes back."""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def batch_images(images: Sequence[np.ndarray], bb: Backbone, device: torch.device,
                 size: tuple[int, int] | None = None) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Pad decoded images to a common size (a multiple of the backbone's stride) and normalise them, so that a batch
    of any sizes runs in one forward pass; the padding is 0 after normalisation (the dataset mean).

    Args:
        images: RGB uint8 arrays (h_i, w_i, 3).
        bb: the backbone (stride, mean, std).
        device: where the batch goes.
        size: the padded (height, width) to use (a bucket's, see ``padded_size``); None: the smallest that holds
            the batch.

    Returns:
        ((B, 3, H, W) float batch, each image's (height, width) inside it).
    """
    hw = [(int(im.shape[0]), int(im.shape[1])) for im in images]
    H = _padded(max(h for h, _ in hw), bb.stride)
    W = _padded(max(w for _, w in hw), bb.stride)
    if size is not None:
        if size[0] < H or size[1] < W or size[0] % bb.stride or size[1] % bb.stride:
            raise ValueError(f"padded size {size} does not hold the batch ({H}, {W}) or is not a multiple of "
                             f"{bb.stride}")
        H, W = size
    # Assemble in numpy: decoded arrays may be read-only views of Ray's object store. Pinned memory lets the copy to
    # a GPU run asynchronously.
    pin = device.type == "cuda"
    batch = torch.zeros((len(images), H, W, 3), dtype=torch.uint8, pin_memory=pin)
    arr = batch.numpy()
    for i, im in enumerate(images):
        arr[i, : im.shape[0], : im.shape[1]] = im
    x = normalise(batch.to(device, non_blocking=pin), bb)
    return x * valid_mask(torch.tensor(hw, device=x.device), H, W)[:, None], hw


def padded_size(h: int, w: int, max_side: int, stride: int, step: int = 64) -> tuple[int, int]:
    """The bucket of an h x w image: its size padded up to the next multiple of ``step`` pixels (and of the
    stride), capped at max_side rounded up to the stride. Batches of one bucket share one padded shape, so a GPU's
    kernel autotuning (cuDNN benchmark mode) meets few distinct shapes.

    Args:
        h, w: the image's size in pixels (after the max_side resize).
        max_side: the model's max_side.
        stride: the backbone's stride.
        step: bucket granularity in pixels (rounded up to a multiple of the stride).

    Returns:
        (height, width) of the bucket's padded batch.
    """
    q = _padded(max(step, stride), stride)
    cap = _padded(max_side, stride)
    return min(_padded(h, q), max(cap, _padded(h, stride))), min(_padded(w, q), max(cap, _padded(w, stride)))


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
    # One resize per distinct image size in the batch (bucketed batches hold few), not one per image.
    groups: dict[tuple[tuple[int, int], tuple[int, int]], list[int]] = {}
    for i, key in enumerate(zip(hw, new_hw)):
        groups.setdefault(key, []).append(i)
    for ((h, w), (nh, nw)), idx in groups.items():
        sel = torch.tensor(idx, device=x.device) if len(idx) < x.shape[0] else slice(None)
        out[sel, :, :nh, :nw] = F.interpolate(x[sel, :, :h, :w], size=(nh, nw), mode="bilinear",
                                              align_corners=False, antialias=scale < 1)
    return out, new_hw


def valid_mask(sizes: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(B, H, W) bool mask of each image's valid part, the top-left ``sizes[i]`` = (h_i, w_i) of a padded (H, W)."""
    dev = sizes.device
    return (torch.arange(H, device=dev).view(1, H, 1) < sizes[:, 0].view(-1, 1, 1)) & \
        (torch.arange(W, device=dev).view(1, 1, W) < sizes[:, 1].view(-1, 1, 1))


def cell_sizes(hw: Sequence[tuple[int, int]], stride: int, device: torch.device) -> torch.Tensor:
    """(B, 2) int64 each image's valid (height, width) in feature cells (as ``valid_cells`` cuts them)."""
    return torch.tensor([(max(1, math.ceil(h / stride)), max(1, math.ceil(w / stride))) for h, w in hw],
                        dtype=torch.long, device=device)


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
