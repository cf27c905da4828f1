"""Region proposers: the activation proposer on synthetic maps, the RPN's anchors and hand-set decoding, RoI
sampling against torchvision's roi_align, and proposal recall."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou, roi_align

from pipeline.model.backbones import Backbone
from pipeline.model.proposals import (
    activation_candidates,
    activation_proposals,
    proposal_recall,
)
from pipeline.model.recognition import RegionDescriber, pool_roi
from pipeline.model.rpn import RPN


def two_blobs(h: int = 12, w: int = 16, c: int = 4) -> torch.Tensor:
    """(c, h, w) map: zero except a strong 3x3 blob near the top left and a weaker 2x4 one near the bottom right."""
    f = torch.zeros(c, h, w)
    f[:, 1:4, 2:5] = 2.0  # blob A: cells x 2..4, y 1..3
    f[:2, 8:10, 10:14] = 1.0  # blob B: cells x 10..13, y 8..9
    return f


def contains(outer: torch.Tensor, inner: tuple[int, int, int, int]) -> bool:
    x0, y0, x1, y1 = outer.tolist()
    return x0 <= inner[0] and y0 <= inner[1] and x1 >= inner[2] and y1 >= inner[3]


# --- activation proposer ---------------------------------------------------------------------------------------


def test_activation_proposals_find_both_blobs() -> None:
    fmap = two_blobs()
    boxes, scores = activation_proposals(fmap, k=10)
    blob_a, blob_b = (2, 1, 5, 4), (10, 8, 14, 10)  # [x0, y0, x1, y1) in cells
    # The tight box of each blob is a candidate and scores far above the whole map (coverage / sqrt(area)).
    assert boxes[0].tolist() == list(map(float, blob_a)), "the denser, stronger blob ranks first"
    assert any(b.tolist() == list(map(float, blob_b)) for b in boxes)
    assert any(contains(b, blob_a) for b in boxes) and any(contains(b, blob_b) for b in boxes)
    assert bool((scores[:-1] >= scores[1:]).all()), "scores descend"
    # Exact score of blob A: coverage 72/88 (4 ch x 9 cells x 2 over 72 + 2 ch x 8 cells x 1), area share 9/192.
    cov = 72 / 88
    assert float(scores[0]) == pytest.approx(math.sqrt(cov * cov / (9 / 192)), rel=1e-5)


def test_whole_map_scores_exactly_one() -> None:
    fmap = torch.rand(3, 5, 7) + 0.1
    cand = torch.from_numpy(activation_candidates(fmap.sum(0).numpy(), (0.5,), 0))
    assert [0.0, 0.0, 7.0, 5.0] in cand.tolist()
    boxes, scores = activation_proposals(fmap, k=50, grid_levels=0, nms_iou=1.0)
    whole = [i for i, b in enumerate(boxes.tolist()) if b == [0.0, 0.0, 7.0, 5.0]]
    assert len(whole) == 1 and float(scores[whole[0]]) == pytest.approx(1.0, abs=1e-6)
    # A uniform map: every box has coverage = area share and density 1, so the whole map is first with score 1.
    boxes, scores = activation_proposals(torch.ones(2, 4, 6), k=3)
    assert boxes[0].tolist() == [0.0, 0.0, 6.0, 4.0] and float(scores[0]) == pytest.approx(1.0)


def test_nms_removes_duplicates_and_k_is_respected() -> None:
    torch.manual_seed(0)
    fmap = torch.rand(8, 10, 14) ** 4  # a busy map: many overlapping candidates
    for k in (1, 3, 7):
        for nms_iou in (0.3, 0.6):
            boxes, scores = activation_proposals(fmap, k=k, nms_iou=nms_iou)
            assert 1 <= len(boxes) <= k and boxes.shape == (len(scores), 4)
            assert boxes.dtype == torch.float32
            iou = box_iou(boxes, boxes).fill_diagonal_(0)
            assert float(iou.max()) <= nms_iou + 1e-6, "no pair above the NMS threshold"
            assert len({tuple(b) for b in boxes.tolist()}) == len(boxes)
            assert bool((scores[:-1] >= scores[1:]).all())
            assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all())
            assert bool((boxes[:, 2] <= 14).all() and (boxes[:, 3] <= 10).all())
            assert bool((boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all())
    few, _ = activation_proposals(fmap, k=3)
    many, _ = activation_proposals(fmap, k=7)
    assert torch.equal(few, many[:3]), "top-k is a prefix of top-k' for k < k'"


def test_dead_map_prefers_the_whole_image() -> None:
    boxes, scores = activation_proposals(torch.zeros(5, 3, 4), k=4)
    assert boxes[0].tolist() == [0.0, 0.0, 4.0, 3.0] and float(scores[0]) == pytest.approx(1.0)
    assert torch.isfinite(scores).all()


def test_one_cell_map() -> None:
    boxes, scores = activation_proposals(torch.ones(3, 1, 1), k=6)
    assert boxes.tolist() == [[0.0, 0.0, 1.0, 1.0]] and scores.tolist() == pytest.approx([1.0])


# --- RPN -------------------------------------------------------------------------------------------------------


def test_anchor_count_and_order() -> None:
    rpn = RPN(8, stride=16, anchor_sizes=(32, 64), aspect_ratios=(0.5, 1.0, 2.0))
    h, w, a = 3, 5, rpn.num_anchors
    assert a == 6
    anchors = rpn.anchors(h, w)
    assert anchors.shape == (h * w * a, 4)
    cell = rpn.cell_anchors()
    for y in range(h):
        for x in range(w):
            for j in range(a):
                box = anchors[(y * w + x) * a + j]
                cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
                assert (float(cx), float(cy)) == pytest.approx(((x + 0.5) * 16, (y + 0.5) * 16))
                assert torch.allclose(box - torch.tensor([cx, cy, cx, cy]), cell[j], atol=1e-4)
    # Anchor j = size index * len(ratios) + ratio index; ratio = height / width, area = size^2.
    for j, (size, r) in enumerate([(s, r) for s in (32, 64) for r in (0.5, 1.0, 2.0)]):
        bw, bh = float(cell[j, 2] - cell[j, 0]), float(cell[j, 3] - cell[j, 1])
        assert bh / bw == pytest.approx(r) and bw * bh == pytest.approx(size * size)
    logits, deltas = rpn(torch.rand(2, 8, h, w))
    assert logits.shape == (2, h * w * a) and deltas.shape == (2, h * w * a, 4)


def test_forward_layout_matches_anchor_order() -> None:
    """logits[b, (y * w + x) * A + j] is the objectness conv's channel j at (y, x); deltas likewise, 4 per anchor."""
    rpn = RPN(4, stride=8, anchor_sizes=(16,), aspect_ratios=(0.5, 1.0, 2.0), mid_channels=4)
    fmap = torch.rand(1, 4, 3, 2)
    with torch.no_grad():
        logits, deltas = rpn(fmap)
        t = torch.relu(rpn.conv(fmap))
        obj, reg = rpn.objectness(t)[0], rpn.deltas(t)[0]
    h, w, a = 3, 2, 3
    for y in range(h):
        for x in range(w):
            for j in range(a):
                i = (y * w + x) * a + j
                assert float(logits[0, i]) == pytest.approx(float(obj[j, y, x]))
                assert torch.allclose(deltas[0, i], reg[4 * j: 4 * j + 4, y, x])


def test_propose_random_weights_stays_inside_images() -> None:
    torch.manual_seed(0)
    rpn = RPN(16, stride=16).eval()
    fmap = torch.rand(2, 16, 6, 8)  # padded batch: 96 x 128 pixels
    sizes = [(96, 128), (70, 50)]
    with torch.no_grad():
        out = rpn.propose(fmap, sizes, k=5)
    assert len(out) == 2
    for (boxes, scores), (ih, iw) in zip(out, sizes):
        assert 1 <= len(boxes) <= 5 and scores.shape == (len(boxes),)
        assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all())
        assert bool((boxes[:, 2] <= iw).all() and (boxes[:, 3] <= ih).all())
        assert bool((scores[:-1] >= scores[1:]).all()) and bool(((scores > 0) & (scores < 1)).all())
        iou = box_iou(boxes, boxes).fill_diagonal_(0)
        assert float(iou.max()) <= 0.7 + 1e-6


def hand_set_rpn() -> RPN:
    """An RPN whose proposals are known: zero deltas (boxes = anchors), objectness = channel 0 of the map for
    16-pixel anchors and a large negative bias for 32-pixel ones."""
    rpn = RPN(2, stride=16, anchor_sizes=(16, 32), aspect_ratios=(1.0,), mid_channels=1)
    with torch.no_grad():
        for layer in (rpn.conv, rpn.objectness, rpn.deltas):
            layer.weight.zero_()
            layer.bias.zero_()
        rpn.conv.weight[0, 0, 1, 1] = 1.0  # t = relu(channel 0)
        rpn.objectness.weight[0, 0] = 1.0  # anchor 0 (16 px): logit = t
        rpn.objectness.bias[1] = -10.0  # anchor 1 (32 px): never preferred
    return rpn.eval()


def test_propose_hand_set_weights_returns_the_expected_anchors() -> None:
    rpn = hand_set_rpn()
    fmap = torch.zeros(1, 2, 3, 4)
    fmap[0, 0] = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 3.0, 0.6, 0.7], [0.8, 0.9, 2.0, 1.0]])
    fmap[0, 1] = 5.0  # ignored by the hand-set conv
    with torch.no_grad():
        [(boxes, scores)] = rpn.propose(fmap, [(48, 64)], k=3)
    # The three best cells: (y=1, x=1) 3.0, (2, 2) 2.0, (2, 3) 1.0; each its own 16x16 cell.
    assert boxes.tolist() == [[16.0, 16.0, 32.0, 32.0], [32.0, 32.0, 48.0, 48.0], [48.0, 32.0, 64.0, 48.0]]
    assert torch.allclose(scores, torch.tensor([3.0, 2.0, 1.0]).sigmoid())


def test_propose_hand_set_weights_one_anchor_size_and_padding() -> None:
    rpn = hand_set_rpn()
    with torch.no_grad():
        rpn.objectness.weight.zero_()
        rpn.objectness.bias.copy_(torch.tensor([-4.0, 4.0]))  # favour the 32-pixel anchors everywhere
    fmap = torch.zeros(1, 2, 1, 3)  # the image covers only the first cell (16 x 16 of a 16 x 48 padded map)
    with torch.no_grad():
        [(boxes, scores)] = rpn.propose(fmap, [(16, 16)], k=5, min_size=1.0)
    # Only cell 0's anchors are valid; the 32 px one [-8, -8, 24, 24] clipped to the image is the whole image.
    assert boxes.tolist() == [[0.0, 0.0, 16.0, 16.0]]
    assert scores.tolist() == pytest.approx([torch.tensor(4.0).sigmoid().item()])


# --- RoI sampling ----------------------------------------------------------------------------------------------


def fake_backbone(channels: int = 3, stride: int = 8) -> Backbone:
    return Backbone("fake", torch.nn.Identity(), stride=stride, channels=channels)


def test_roi_features_match_torchvision_roi_align() -> None:
    torch.manual_seed(0)
    fmap = torch.rand(2, 3, 6, 9)
    boxes = [torch.tensor([[0.0, 0.0, 72.0, 48.0], [10.0, 5.0, 40.0, 30.0]]), torch.tensor([[20.0, 8.0, 60.0, 47.0]])]
    desc = RegionDescriber(fake_backbone(), pool="mac", roi_size=5)
    got = desc.roi_features(fmap, boxes)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    ref = roi_align(fmap, rois, output_size=(5, 5), spatial_scale=1 / 8, sampling_ratio=2, aligned=True)
    assert got.shape == (3, 3, 5, 5)
    assert torch.allclose(got, ref, atol=1e-6)
    out = desc(fmap, boxes)
    assert [o.shape for o in out] == [(2, 3), (1, 3)]
    assert torch.allclose(torch.cat(out), ref.amax(dim=(-2, -1)), atol=1e-6)


def test_roi_sampling_pixel_convention() -> None:
    """Feature cell i covers pixels [i*s, (i+1)*s): a box over cells [2, 5) of a map whose value is the cell index
    samples values whose mean is the mean cell index, 3 (bilinear sampling of a linear ramp is exact)."""
    s = 8
    ramp = torch.arange(10, dtype=torch.float32).view(1, 1, 1, 10).expand(1, 1, 4, 10).contiguous()
    desc = RegionDescriber(fake_backbone(1, s), pool="spoc", roi_size=3)
    x = desc.roi_features(ramp, [torch.tensor([[2.0 * s, 8.0, 5.0 * s, 24.0]])])
    assert torch.allclose(x[0, 0].mean(), torch.tensor(3.0), atol=1e-5)
    assert torch.allclose(x[0, 0, 0], torch.tensor([2.0, 3.0, 4.0]), atol=1e-5)  # one bin per cell


@pytest.mark.parametrize("pool", ["gem", "mac", "spoc"])
def test_constant_map_pools_to_the_constant(pool: str) -> None:
    fmap = torch.full((1, 4, 5, 7), 2.5)
    boxes = [torch.tensor([[0.0, 0.0, 56.0, 40.0], [3.0, 4.0, 20.0, 33.0], [50.0, 30.0, 56.0, 40.0]])]
    [out] = RegionDescriber(fake_backbone(4, 8), pool=pool)(fmap, boxes)
    assert out.shape == (3, 4)
    assert torch.allclose(out, torch.full_like(out, 2.5), atol=1e-5)


def test_pool_roi_formulas() -> None:
    x = torch.rand(2, 3, 4, 4)
    assert torch.allclose(pool_roi(x, "spoc"), x.mean(dim=(2, 3)))
    assert torch.allclose(pool_roi(x, "mac"), x.flatten(2).max(-1).values)
    assert torch.allclose(pool_roi(x, "gem"), x.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3), atol=1e-6)
    with pytest.raises(ValueError):
        pool_roi(x, "max")


def test_no_regions_gives_empty_descriptors() -> None:
    out = RegionDescriber(fake_backbone(4, 8))(torch.rand(2, 4, 3, 3), [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert [o.shape for o in out] == [(0, 4), (0, 4)]


# --- proposal recall -------------------------------------------------------------------------------------------


def test_proposal_recall_hand_cases() -> None:
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    assert proposal_recall(gt.clone(), gt) == 1.0
    assert proposal_recall(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), gt) == 0.5
    # IoU of [0, 0, 10, 5] with [0, 0, 10, 10] is exactly 0.5: matched at 0.5, not at 0.6.
    half = torch.tensor([[0.0, 0.0, 10.0, 5.0]])
    assert proposal_recall(half, gt[:1], iou=0.5) == 1.0
    assert proposal_recall(half, gt[:1], iou=0.6) == 0.0
    assert proposal_recall(torch.tensor([[100.0, 100.0, 110.0, 110.0]]), gt) == 0.0
    assert proposal_recall(torch.zeros(0, 4), gt) == 0.0
    assert math.isnan(proposal_recall(gt, torch.zeros(0, 4)))
    # One proposal may match several ground-truth boxes.
    assert proposal_recall(torch.tensor([[0.0, 0.0, 30.0, 30.0]]), torch.tensor([[0.0, 0.0, 30.0, 29.0]] * 3)) == 1.0


# --- the batched activation proposer ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_label_components_is_scipy_label(seed: int) -> None:
    """The same 4-connected partition as scipy.ndimage.label (labels differ by name only), spirals and all."""
    from scipy import ndimage

    from pipeline.model.proposals import label_components

    rng = np.random.default_rng(seed)
    masks = rng.random((5, 11, 13)) < [[[0.3]], [[0.5]], [[0.6]], [[0.9]], [[0.0]]]
    masks[0, 1:10, 1] = masks[0, 9, 1:12] = masks[0, 1:10, 11] = masks[0, 1, 3:12] = True  # a long hook
    got = label_components(torch.from_numpy(masks)).numpy()
    for m, g in zip(masks, got):
        want, _ = ndimage.label(m)
        assert ((g > 0) == m).all()
        pairs = set(zip(want[m].tolist(), g[m].tolist()))
        assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})  # a bijection


def test_batched_nms_is_torchvision_nms() -> None:
    from torchvision.ops import nms

    from pipeline.model.proposals import batched_nms

    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 40))
        xy = rng.integers(0, 10, (3, n, 2))
        wh = rng.integers(1, 8, (3, n, 2))
        boxes = torch.from_numpy(np.concatenate([xy, xy + wh], axis=2).astype(np.float32))
        scores = torch.from_numpy(rng.random((3, n)).astype(np.float32))
        scores[2, n // 2:] = float("-inf")  # padding rows
        scores, order = scores.sort(dim=1, descending=True, stable=True)
        boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
        keep = batched_nms(boxes, scores, 0.5)
        for i in range(3):
            v = torch.isfinite(scores[i])
            want = nms(boxes[i][v], scores[i][v], 0.5)
            assert keep[i].nonzero().flatten().tolist() == want.tolist()


@pytest.fixture(scope="module")
def photo_maps() -> list[tuple[torch.Tensor, list[tuple[int, int]]]]:
    """Feature maps of the 80 committed photos (data/caltech8), in size-sorted padded batches of 16, with the
    default backbone at max_side 448 and 320."""
    from pipeline.config import SAMPLE_DATA, ModelConfig
    from pipeline.io.images import decode_image
    from pipeline.model.region_model import RegionModel
    from pipeline.model.transform import batch_images

    model = RegionModel(ModelConfig(), device="cpu")
    paths = sorted(SAMPLE_DATA.glob("*/*.jpg"))
    out = []
    for side in (448, 320):
        dec = sorted((decode_image(p.read_bytes(), max_side=side) for p in paths), key=lambda d: d.array.shape[:2])
        for b in range(0, len(dec), 16):
            with torch.inference_mode():
                x, hw = batch_images([d.array for d in dec[b:b + 16]], model.backbone, model.device)
                out.append((model.backbone.features(x), hw))
    return out


@pytest.mark.slow
def test_batched_proposals_equal_per_image_proposals_on_photos(photo_maps) -> None:
    """On real photos, the whole-batch proposer gives every image exactly the boxes of the per-image (scipy)
    proposer, in the same order, and the same scores to float32 rounding."""
    from pipeline.model.proposals import batched_activation_proposals

    n_images = 0
    for fmap, hw in photo_maps:
        cells = torch.tensor([(math.ceil(h / 32), math.ceil(w / 32)) for h, w in hw])
        boxes, scores = batched_activation_proposals(fmap, cells, 12)
        for i, (h, w) in enumerate(cells.tolist()):
            want_b, want_s = activation_proposals(fmap[i, :, :h, :w], 12)
            n = len(want_s)
            assert torch.equal(boxes[i, :n], want_b)
            torch.testing.assert_close(scores[i, :n], want_s, rtol=1e-6, atol=1e-7)
            assert torch.isinf(scores[i, n:]).all() and not boxes[i, n:].any()
            n_images += 1
    assert n_images == 160
