"""Tests of pipeline/bench/repool.py: IoU, greedy suppression and the re-pooled local feature (numpy references)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.bench.corpus import _local_feature
from pipeline.bench.repool import box_iou, nms_keep, repool_local


def test_box_iou_hand_computed():
    a = np.array([[0, 0, 10, 10], [0, 0, 0, 0]])
    b = np.array([[5, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30]])
    got = box_iou(a, b)
    # 50 / (100 + 100 - 50) = 1/3; identical boxes 1; disjoint 0; an empty box 0.
    np.testing.assert_allclose(got, [[1 / 3, 1, 0], [0, 0, 0]])


def test_nms_keep_drops_near_duplicates_of_better_boxes_only():
    boxes = np.array([[0, 0, 10, 10],  # kept (best)
                      [0, 0, 10, 10],  # the whole image again (the other pyramid level): dropped
                      [5, 0, 15, 10],  # IoU 1/3 with the first: kept at 0.5
                      [6, 0, 16, 10],  # IoU 9/11 with the third (a kept box): dropped
                      [0, 0, 9, 10]])  # IoU 0.9 with the first: dropped at 0.5
    assert nms_keep(boxes, 0.5).tolist() == [True, False, True, False, False]
    # A threshold above every IoU keeps all but exact duplicates... which have IoU 1, not above 1.
    assert nms_keep(boxes, 1.0).all()
    assert nms_keep(boxes, 0.95).tolist() == [True, False, True, True, True]
    assert nms_keep(boxes[:1], 0.1).tolist() == [True]


def test_repool_local_without_suppression_is_eq_1_2():
    rng = np.random.default_rng(0)
    counts = np.array([3, 0, 2])
    desc = rng.random((5, 4)).astype(np.float32)
    boxes = np.tile([0, 0, 10, 10], (5, 1))
    scores = rng.random(5)
    local, kept = repool_local(counts, desc, boxes, scores, k=12)
    np.testing.assert_allclose(local, _local_feature(counts, desc), rtol=1e-6)
    assert kept.all() and not local[1].any()
    # k caps the regions per image, in rank order.
    local2, kept2 = repool_local(counts, desc, boxes, scores, k=1)
    assert kept2.tolist() == [True, False, False, True, False]
    np.testing.assert_allclose(local2[0], desc[0] / desc[0].sum(), rtol=1e-6)


def test_repool_local_suppression_and_weights():
    rng = np.random.default_rng(1)
    counts = np.array([4])
    desc = rng.random((4, 3))
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 5, 5], [5, 5, 10, 10]])
    scores = np.array([1.0, 0.9, 0.5, 0.25])
    local, kept = repool_local(counts, desc, boxes, scores, k=2, nms_iou=0.7, weighting="score")
    # The duplicate whole image is suppressed; the first 2 survivors are regions 0 and 2.
    assert kept.tolist() == [True, False, True, False]
    f = 1.0 * desc[0] + 0.5 * desc[2]
    np.testing.assert_allclose(local[0], f / np.abs(f).sum(), rtol=1e-6)
    local, _ = repool_local(counts, desc, boxes, scores, k=4, weighting="l2")
    f = sum(d / np.linalg.norm(d) for d in desc)
    np.testing.assert_allclose(local[0], f / np.abs(f).sum(), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown region weighting"):
        repool_local(counts, desc, boxes, scores, k=4, weighting="nope")
