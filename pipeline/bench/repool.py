"""The local feature re-pooled offline from stored regions: suppression of overlapping boxes and per-region weights."""

from __future__ import annotations

import numpy as np

WEIGHTINGS = ("none", "score", "l2")


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every box of ``a`` with every box of ``b`` (``x1, y1, x2, y2``).

    Args:
        a: ``(n, 4)`` boxes.
        b: ``(m, 4)`` boxes.

    Returns:
        ``(n, m)`` ``float64`` IoU (0 where both boxes are empty).
    """
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms_keep(boxes: np.ndarray, iou: float) -> np.ndarray:
    """Greedy suppression over boxes already in rank order (best first): a box is dropped when its IoU with a kept,
    better-ranked box exceeds ``iou``.

    Args:
        boxes: ``(n, 4)`` boxes, best first.
        iou: suppression threshold; ``>= 1`` keeps everything except exact duplicates... of IoU above 1 (none).

    Returns:
        ``(n,)`` bool mask of the kept boxes.
    """
    n = len(boxes)
    keep = np.ones(n, bool)
    if n < 2:
        return keep
    m = box_iou(boxes, boxes)
    for i in range(n):
        if keep[i]:
            later = np.arange(i + 1, n)
            keep[later[m[i, i + 1:] > iou]] = False
    return keep


def repool_local(counts: np.ndarray, desc: np.ndarray, boxes: np.ndarray, scores: np.ndarray, k: int,
                 nms_iou: float = 1.0, weighting: str = "none") -> tuple[np.ndarray, np.ndarray]:
    """Paper eq. (1)-(2) over each image's regions after suppression, with per-region weights:
    ``f = sum_k w_k r_k``, then ``f / ||f||_1``.

    Args:
        counts: ``(N,)`` regions per image; the regions are rows of ``desc`` image after image, best first.
        desc: ``(R, D)`` raw region descriptors.
        boxes: ``(R, 4)`` region boxes (one pixel frame per image).
        scores: ``(R,)`` region scores.
        k: regions kept per image after suppression (the first ``k`` survivors in rank order).
        nms_iou: suppression threshold over an image's regions (:func:`nms_keep`); ``>= 1`` = none.
        weighting: ``none`` (eq. 1 as in the paper), ``score`` (``w_k`` = the region's score) or ``l2`` (each region
            L2-normalised before the sum, i.e. ``w_k = 1 / ||r_k||``).

    Returns:
        ``(local, kept)``: ``(N, D)`` ``float32`` local features (zero rows without regions) and the ``(R,)`` bool mask
        of the regions that entered the sum.

    Raises:
        ValueError: on an unknown weighting.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown region weighting {weighting!r}; known: {WEIGHTINGS}")
    counts = np.asarray(counts, np.int64)
    desc = np.asarray(desc, np.float64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    kept = np.zeros(len(desc), bool)
    for s, c in zip(starts, counts):
        if c == 0:
            continue
        mask = nms_keep(boxes[s:s + c], nms_iou) if nms_iou < 1 else np.ones(c, bool)
        idx = np.flatnonzero(mask)[:k]
        kept[s + idx] = True
    if weighting == "score":
        w = np.asarray(scores, np.float64)
    elif weighting == "l2":
        w = 1.0 / np.maximum(np.linalg.norm(desc, axis=1), 1e-12)
    else:
        w = np.ones(len(desc))
    w = np.where(kept, w, 0.0)
    sums = np.zeros((len(counts), desc.shape[1]), np.float64)
    owner = np.repeat(np.arange(len(counts)), counts)
    np.add.at(sums, owner[kept], desc[kept] * w[kept, None])
    local = sums / np.maximum(np.abs(sums).sum(1, keepdims=True), 1e-12)
    return local.astype(np.float32), kept
