"""The region model on real images: output keys and shapes, boxes in original pixels, the sum-pool + L1 invariant
(paper eq. 1-2), descriptors against a separate per-image computation, batch consistency, and the composed pieces
(transform, proposer, pyramid merge, postprocess) against simple references and against the model."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align

from pipeline.config import SAMPLE_DATA, ModelConfig
from pipeline.io.images import Decoded, decode_image
from pipeline.model import descriptors as D
from pipeline.model.backbones import WeightsUnavailable
from pipeline.model.proposals import ActivationProposer, activation_proposals
from pipeline.model.recognition import pool_roi
from pipeline.model.region_model import RegionModel, merge_levels, merge_levels_padded
from pipeline.model.transform import (
    batch_images,
    normalise,
    original_boxes,
    rescale_batch,
)

VECTOR_KEYS = ("global", "spoc", "mac", "rmac", "gem", "crow", "local")
KEYS = set(VECTOR_KEYS) | {"boxes", "scores", "regions"}


def _sample_paths() -> tuple[list[Path], list[Path]]:
    """Four sample images of one size (the commonest), and two more of two other sizes."""
    by_size: dict[tuple[int, int], list[Path]] = defaultdict(list)
    for p in sorted(SAMPLE_DATA.glob("*/*.jpg")):
        with Image.open(p) as im:
            by_size[im.size].append(p)
    sizes = sorted(by_size, key=lambda s: (-len(by_size[s]), s))
    same = by_size[sizes[0]][:4]
    other = [by_size[s][0] for s in sizes[1:3]]
    return same, other


def decode(paths: list[Path], max_side: int) -> list[Decoded]:
    out = [decode_image(p.read_bytes(), max_side=max_side) for p in paths]
    assert all(d.ok for d in out)
    return out


def run(model: RegionModel, decoded: list[Decoded]) -> list[dict[str, np.ndarray]]:
    return model([d.array for d in decoded], [(d.width, d.height) for d in decoded])


@pytest.fixture(scope="module")
def model() -> RegionModel:
    """One pyramid level (scale 1), so every region comes from the feature map the checks below recompute."""
    return RegionModel(ModelConfig(region_scales="1"), device="cpu")


@pytest.fixture(scope="module")
def images(model: RegionModel) -> dict[str, list[Decoded]]:
    same, other = _sample_paths()
    assert len(same) == 4 and len(other) == 2, "the embedded sample has images of at least three sizes"
    return {"same": decode(same, model.config.max_side), "other": decode(other, model.config.max_side)}


@pytest.fixture(scope="module")
def mixed(model: RegionModel, images) -> tuple[list[Decoded], list[dict[str, np.ndarray]]]:
    """One batch of images of three different sizes, and the model's outputs for it."""
    batch = images["same"][:1] + images["other"]
    assert len({d.array.shape for d in batch}) == 3
    return batch, run(model, batch)


@pytest.fixture(scope="module")
def same_batched(model: RegionModel, images) -> list[dict[str, np.ndarray]]:
    """The model's outputs for the four same-size images in one batch."""
    return run(model, images["same"])


def test_random_weights_must_be_explicit(tmp_path, monkeypatch) -> None:
    assert ModelConfig().random_weights is False
    # With no cached weights and no network, building fails loudly instead of falling back to random weights.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(WeightsUnavailable):
        RegionModel(ModelConfig(backbone="resnet50"), device="cpu")


def test_outputs_keys_and_shapes(model: RegionModel, mixed) -> None:
    batch, outs = mixed
    assert len(outs) == len(batch)
    c, k = model.backbone.channels, model.config.regions
    dims = model.dims
    assert dims["global"] == dims["local"] == c == 1280
    for out in outs:
        assert set(out) == KEYS
        for key in VECTOR_KEYS:
            assert out[key].shape == (dims[key],) and out[key].dtype == np.float32, key
            assert np.isfinite(out[key]).all(), key
        n = len(out["boxes"])
        assert 1 <= n <= k
        assert out["boxes"].shape == (n, 4) and out["scores"].shape == (n,)
        assert out["regions"].shape == (n, dims["local"])
        assert {out[x].dtype for x in ("boxes", "scores", "regions")} == {np.dtype(np.float32)}
        assert (out["regions"] >= 0).all()


def test_boxes_in_original_pixels_and_scores_descending(mixed) -> None:
    batch, outs = mixed
    for d, out in zip(batch, outs):
        b = out["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= d.width).all() and (b[:, 3] <= d.height).all(), (b, d.width, d.height)
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert (np.diff(out["scores"]) <= 0).all()
        # The sample images are upscaled to max_side, so boxes in resized pixels would fail the bounds above.
        assert d.array.shape[1] > d.width


def test_boxes_never_overshoot_by_float_rounding(model: RegionModel) -> None:
    """Regression: boxes clamped to the resized image and then scaled by ow / w in float32 could end at 200.00002 in a
    200-pixel-high image. Pick an original size where that rounding overshoots and check the bound is exact."""
    from pipeline.io.images import resize_max_side

    side = model.config.max_side
    for oh in range(150, 260):
        w, h = resize_max_side(256, oh, side)
        if np.float32(h) * np.float32(oh / h) > oh:
            break
    else:
        pytest.skip("no overshooting size in range")
    image = np.full((h, w, 3), 128, dtype=np.uint8)
    image[h // 3: h, :: 7] = 255  # some structure, reaching the bottom edge
    [out] = model([image], [(256, oh)])
    b = out["boxes"]
    assert (b[:, 2] <= 256).all() and (b[:, 3] <= oh).all()
    assert (b[:, 3] == oh).any(), "some box reaches the bottom edge, so the bound above is tested"


def test_local_is_l1_normalised_sum_of_regions(mixed, same_batched) -> None:
    for out in mixed[1] + same_batched:
        s = out["regions"].astype(np.float64).sum(0)
        np.testing.assert_allclose(out["local"], s / np.abs(s).sum(), atol=1e-6, rtol=0)
        assert abs(np.abs(out["local"]).sum() - 1) < 1e-5


def _alone(model: RegionModel, image: np.ndarray, H: int, W: int) -> torch.Tensor:
    """The image's valid feature map, computed on its own in an H x W padded canvas (zero = the mean after
    normalisation), independently of the model's batching code."""
    h, w = image.shape[:2]
    x = normalise(torch.from_numpy(image)[None], model.backbone)
    canvas = torch.zeros(1, 3, H, W)
    canvas[:, :, :h, :w] = x
    with torch.inference_mode():
        fmap = model.backbone.features(canvas)[0].float()
    s = model.backbone.stride
    return fmap[:, : math.ceil(h / s), : math.ceil(w / s)]


def test_descriptors_equal_a_separate_per_image_computation(model: RegionModel, mixed) -> None:
    batch, outs = mixed
    s = model.backbone.stride
    H = math.ceil(max(d.array.shape[0] for d in batch) / s) * s
    W = math.ceil(max(d.array.shape[1] for d in batch) / s) * s
    for d, out in zip(batch, outs):
        fm = _alone(model, d.array, H, W)
        want = {"global": D.spoc(fm), "spoc": D.spoc(fm), "mac": D.mac(fm), "rmac": D.rmac(fm), "gem": D.gem(fm),
                "crow": D.crow(fm)}
        for key, v in want.items():
            if key == "crow":
                # CroW's channel weight counts exactly-zero activations, so float noise between the batched and the
                # separate forward pass (an activation at 0 vs 1e-7) moves single channels by up to about 1%.
                rel = np.linalg.norm(out[key] - v.numpy()) / np.linalg.norm(v.numpy())
                assert rel < 1e-3, rel
                continue
            np.testing.assert_allclose(out[key], v.numpy(), rtol=1e-4, atol=1e-5 * float(v.abs().max()), err_msg=key)
        # Region descriptors: GeM of bilinear RoI samples of this map, boxes mapped back to the resized image.
        h, w = d.array.shape[:2]
        boxes = torch.from_numpy(out["boxes"]) * torch.tensor([w / d.width, h / d.height] * 2)
        x = roi_align(fm[None], [boxes], output_size=7, spatial_scale=1 / s, sampling_ratio=2, aligned=True)
        np.testing.assert_allclose(out["regions"], pool_roi(x, "gem").numpy(), rtol=1e-3, atol=1e-4)


def test_batch_equals_one_by_one_for_same_size_images(model: RegionModel, images, same_batched) -> None:
    same = images["same"]
    assert len({d.array.shape for d in same}) == 1
    for d, b in zip(same, same_batched):
        [alone] = run(model, [d])
        assert set(alone) == set(b)
        for key in alone:
            np.testing.assert_allclose(b[key], alone[key], rtol=1e-4, atol=1e-4, err_msg=key)


def test_empty_batch_and_tiny_image(model: RegionModel) -> None:
    assert model([], []) == []
    rng = np.random.default_rng(0)
    tiny = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)  # smaller than one stride cell in height
    [out] = model([tiny], [(80, 40)])
    assert set(out) == KEYS and len(out["boxes"]) >= 1
    assert (out["boxes"][:, 2] <= 80).all() and (out["boxes"][:, 3] <= 40).all()
    assert np.isfinite(out["global"]).all()


def test_vgg16_random_weights_gives_4096_d_descriptors() -> None:
    cfg = ModelConfig(backbone="vgg16", random_weights=True, max_side=128, regions=3)
    vgg = RegionModel(cfg, device="cpu")
    assert vgg.dims["global"] == vgg.dims["local"] == vgg.region_dim == 4096 and vgg.dims["spoc"] == 512
    same, other = _sample_paths()
    decoded = decode(same[:1] + other[:1], cfg.max_side)
    for d, out in zip(decoded, run(vgg, decoded)):
        n = len(out["boxes"])
        assert out["global"].shape == (4096,) and out["local"].shape == (4096,)
        assert out["regions"].shape == (n, 4096) and 1 <= n <= 3
        assert out["spoc"].shape == (512,)
        assert (out["boxes"][:, 2] <= d.width).all() and (out["boxes"][:, 3] <= d.height).all()
        s = out["regions"].astype(np.float64).sum(0)
        np.testing.assert_allclose(out["local"], s / max(np.abs(s).sum(), 1e-12), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def pyramid(model: RegionModel) -> RegionModel:
    """The default model with a second, half-size pyramid level for regions."""
    return RegionModel(dataclasses.replace(model.config, region_scales="0.5,1"), device="cpu")


def test_pyramid_keeps_the_top_k_of_both_levels(model: RegionModel, pyramid: RegionModel, mixed) -> None:
    batch, single = mixed
    outs = run(pyramid, batch)
    K = model.config.regions
    s = model.backbone.stride
    H2 = math.ceil(max(round(d.array.shape[0] * 0.5) for d in batch) / s) * s
    W2 = math.ceil(max(round(d.array.shape[1] * 0.5) for d in batch) / s) * s
    n_half = 0
    for d, one, multi in zip(batch, single, outs):
        for key in ("global", "spoc", "mac", "rmac", "gem", "crow"):  # global descriptors come from scale 1 only
            np.testing.assert_allclose(multi[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key)
        assert len(one["boxes"]) <= len(multi["boxes"]) <= K
        assert (np.diff(multi["scores"]) <= 0).all()
        assert (multi["boxes"] >= 0).all()
        assert (multi["boxes"][:, 0::2] <= d.width).all() and (multi["boxes"][:, 1::2] <= d.height).all()
        s_ = multi["regions"].astype(np.float64).sum(0)
        np.testing.assert_allclose(multi["local"], s_ / np.abs(s_).sum(), atol=1e-6, rtol=0)
        # Each kept region is either one of the scale-1 model's regions, unchanged ...
        kept_one, rest = [], []
        for j in range(len(multi["boxes"])):
            m = [i for i in range(len(one["boxes"])) if i not in kept_one
                 and np.allclose(multi["boxes"][j], one["boxes"][i], atol=1e-3)
                 and np.allclose(multi["regions"][j], one["regions"][i], atol=1e-5)]
            (kept_one.append(m[0]) if m else rest.append(j))
        # ... and a scale-1 region was dropped only for higher-scored ones (the top K of both levels).
        dropped = [one["scores"][i] for i in range(len(one["boxes"])) if i not in kept_one]
        if dropped:
            assert len(multi["boxes"]) == K and max(dropped) <= multi["scores"].min() + 1e-6
        # ... or GeM of RoI samples of the half-size image's own feature map (computed separately here).
        if not rest:
            continue
        n_half += len(rest)
        h, w = d.array.shape[:2]
        nh, nw = round(h * 0.5), round(w * 0.5)
        x = normalise(torch.from_numpy(d.array)[None], model.backbone)
        canvas = torch.zeros(1, 3, H2, W2)
        canvas[:, :, :nh, :nw] = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        with torch.inference_mode():
            fm = model.backbone.features(canvas).float()
        boxes = torch.from_numpy(multi["boxes"][rest]) * torch.tensor([w / d.width, h / d.height] * 2) * 0.5
        want = pool_roi(roi_align(fm, [boxes], output_size=7, spatial_scale=1 / s, sampling_ratio=2, aligned=True), "gem")
        err = np.linalg.norm(multi["regions"][rest] - want.numpy(), axis=1) / np.linalg.norm(want.numpy(), axis=1)
        # Exact up to float noise, except boxes at the image's right or bottom edge: the level's size is rounded to
        # whole pixels, and the stored box is clamped to the image, which moves such a RoI by under a pixel.
        assert np.median(err) < 1e-5 and err.max() < 1e-2, err
    assert n_half > 0, "the half-size level contributed no region to any image"


def test_pyramid_batch_equals_one_by_one(pyramid: RegionModel, mixed) -> None:
    batch, _ = mixed
    outs = run(pyramid, batch)
    for d, b in zip(batch, outs):
        [alone] = run(pyramid, [d])
        for key in ("boxes", "scores", "regions", "local"):
            np.testing.assert_allclose(b[key], alone[key], rtol=1e-3, atol=1e-4, err_msg=key)


# --- the composed pieces -----------------------------------------------------------------------------------------


def test_merge_levels_padded_equals_merge_levels_per_image() -> None:
    """The batched merge (one sort for the batch) against merge_levels per image on the same padded levels: ties
    between levels and -inf padding rows included, identical boxes, scores and descriptors, in the same order."""
    rng = np.random.default_rng(1)
    b, k, levels, padded = 5, 4, [], []
    for width in (3, 4, 2):  # levels padded to different widths, like propose_padded's k' per level
        scores = torch.from_numpy(-np.sort(-rng.integers(0, 3, (b, width)).astype(np.float32), axis=1))
        counts = rng.integers(0, width + 1, b)  # real rows per image; the rest is padding
        for i, n in enumerate(counts):
            scores[i, n:] = float("-inf")
        boxes = torch.from_numpy(rng.random((b, width, 4), dtype=np.float32))
        desc = torch.from_numpy(rng.random((b, width, 3), dtype=np.float32))
        padded.append((boxes, scores, desc))
        levels.append((list(boxes.unbind(0)), list(scores.unbind(0)), list(desc.unbind(0))))
    got = merge_levels_padded(*[[p[j] for p in padded] for j in range(3)], k)
    assert got[1].shape == (b, k)
    for i, want in enumerate(merge_levels(levels, k)):
        for j in range(3):
            assert torch.equal(got[j][i], want[j]), (i, j)
    assert torch.isinf(got[1]).any() and (got[1][:, :-1] >= got[1][:, 1:]).all()  # padding present, descending


def test_merge_levels_equals_a_simple_reference() -> None:
    """The pyramid merge: per image, levels concatenated in order, a stable sort by score descending, the top k."""
    rng = np.random.default_rng(0)
    levels = []
    for _ in range(3):
        counts = [int(rng.integers(0, 6)) for _ in range(4)]  # images with no region at some level too
        # Few distinct scores, so that ties (broken by level order, then rank within the level) are tested.
        scores = [torch.from_numpy(np.sort(rng.integers(0, 4, n).astype(np.float32))[::-1].copy()) for n in counts]
        boxes = [torch.from_numpy(rng.random((n, 4), dtype=np.float32)) for n in counts]
        desc = [torch.from_numpy(rng.random((n, 3), dtype=np.float32)) for n in counts]
        levels.append((boxes, scores, desc))
    k = 5
    merged = merge_levels(levels, k)
    assert len(merged) == 4
    for i, (boxes, scores, desc) in enumerate(merged):
        rows = [(float(lv[1][i][j]), lv[0][i][j], lv[2][i][j]) for lv in levels for j in range(len(lv[1][i]))]
        want = sorted(rows, key=lambda r: -r[0])[:k]  # Python's sort is stable
        assert scores.tolist() == [r[0] for r in want]
        assert torch.equal(boxes, torch.stack([r[1] for r in want]) if want else torch.zeros(0, 4))
        assert torch.equal(desc, torch.stack([r[2] for r in want]) if want else torch.zeros(0, 3))


def test_batch_images_pads_and_zeroes_the_padding(model: RegionModel, mixed) -> None:
    batch, _ = mixed
    s = model.backbone.stride
    x, hw = batch_images([d.array for d in batch], model.backbone, torch.device("cpu"))
    assert hw == [d.array.shape[:2] for d in batch]
    assert x.shape[2] % s == 0 and x.shape[3] % s == 0
    assert x.shape[2] - s < max(h for h, _ in hw) <= x.shape[2] and x.shape[3] - s < max(w for _, w in hw) <= x.shape[3]
    for i, (h, w) in enumerate(hw):
        assert torch.equal(x[i, :, :h, :w], normalise(torch.from_numpy(batch[i].array)[None], model.backbone)[0])
        assert not x[i, :, h:].any() and not x[i, :, :, w:].any()


def test_activation_proposer_is_activation_proposals_in_pixels(model: RegionModel, mixed) -> None:
    batch, _ = mixed
    s = model.backbone.stride
    x, hw = batch_images([d.array for d in batch], model.backbone, torch.device("cpu"))
    with torch.inference_mode():
        fmap = model.backbone.features(x)
    proposer = ActivationProposer(s, nms_iou=0.5)
    for i, (boxes, scores) in enumerate(proposer.propose(fmap, hw, 6)):
        h, w = hw[i]
        cells, want_scores = activation_proposals(fmap[i, :, : math.ceil(h / s), : math.ceil(w / s)], 6, nms_iou=0.5)
        want = cells * s
        want[:, 0::2] = want[:, 0::2].clamp(0, w)
        want[:, 1::2] = want[:, 1::2].clamp(0, h)
        assert torch.equal(boxes, want) and torch.equal(scores, want_scores)


def postprocess(vectors: dict[str, torch.Tensor], boxes: torch.Tensor, scores: torch.Tensor, regions: torch.Tensor,
                hw: tuple[int, int], size: tuple[int, int]) -> dict[str, np.ndarray]:
    """One image's outputs as the model returns them (the per-image reference for the model's batched unpacking)."""
    out = {k: v.float().numpy() for k, v in vectors.items()}
    out["boxes"] = original_boxes(boxes, hw, size).numpy()
    out["scores"] = scores.float().numpy()
    out["regions"] = regions.float().numpy()
    return out


def test_model_is_its_composed_pieces(pyramid: RegionModel, mixed) -> None:
    """transform -> backbone -> proposer -> recognition per level -> merge -> descriptors -> postprocess, spelled out
    here image by image from the per-image pieces (scipy proposals, one RoIAlign per level, the (C, H, W) pooling
    formulas), gives the batched model's outputs: boxes exactly, vectors to float rounding."""
    batch, _ = mixed
    m = pyramid
    s = m.backbone.stride
    images, sizes = [d.array for d in batch], [(d.width, d.height) for d in batch]
    with torch.inference_mode():
        x, hw = batch_images(images, m.backbone, m.device)
        fmap = m.backbone.features(x).float()
        levels = []
        for sc in (1.0, 0.5):
            xs, hws = (x, hw) if sc == 1.0 else rescale_batch(x, hw, sc, s)
            fm = m.backbone.features(xs).float()
            props = []
            for i, (h, w) in enumerate(hws):
                cells, sco = activation_proposals(fm[i, :, : math.ceil(h / s), : math.ceil(w / s)], m.config.regions)
                b = cells * s
                b[:, 0::2] = b[:, 0::2].clamp(0, w)
                b[:, 1::2] = b[:, 1::2].clamp(0, h)
                props.append((b, sco))
            desc = m.recognition(fm, [b for b, _ in props])
            levels.append(([b / sc for b, _ in props], [p for _, p in props], [d.float() for d in desc]))
        want = []
        for i, (boxes, scores, regions) in enumerate(merge_levels(levels, m.config.regions)):
            fm = fmap[i, :, : math.ceil(hw[i][0] / s), : math.ceil(hw[i][1] / s)]
            vectors = {"global": D.spoc(fm), "spoc": D.spoc(fm), "mac": D.mac(fm), "rmac": D.rmac(fm),
                       "gem": D.gem(fm), "crow": D.crow(fm), "local": D.sum_pool_l1(regions)}
            want.append(postprocess(vectors, boxes, scores, regions, hw[i], sizes[i]))
    got = m(images, sizes)
    for a, b in zip(got, want):
        assert set(a) == set(b)
        assert np.array_equal(a["boxes"], b["boxes"])
        for key in a:
            assert a[key].shape == b[key].shape and a[key].dtype == np.float32, key
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_the_model_does_not_import_the_trainer() -> None:
    """Inference workers import the region model (and the checkpoint reader), never the training code."""
    import subprocess
    import sys

    code = ("import sys, pipeline.model.region_model; print([m for m in sys.modules if m.startswith('ray') or "
            "m.startswith('pipeline.densecap.') and m != 'pipeline.densecap.checkpoint'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# --- the batched forms of the per-image steps ------------------------------------------------------------------


def test_describe_levels_is_one_roi_align_per_level(pyramid: RegionModel) -> None:
    """One RoIAlign over levels of different sizes (stacked, edge-replicated) equals describing each level alone,
    boxes reaching the levels' far edges included."""
    torch.manual_seed(0)
    fmaps = [torch.rand(3, 8, 5, 7), torch.rand(3, 8, 3, 4)]
    s = pyramid.backbone.stride
    boxes = []
    for fm in fmaps:
        h, w = fm.shape[-2] * s, fm.shape[-1] * s
        b = torch.tensor([[0, 0, w, h], [w / 2, h / 3, w, h], [3, 5, 40, 33]], dtype=torch.float32)
        boxes.append(b.expand(3, -1, -1).clone())
    got = pyramid.recognition.describe_levels(fmaps, boxes)
    for fm, bx, g in zip(fmaps, boxes, got):
        want = pyramid.recognition(fm, list(bx))
        for i in range(3):
            torch.testing.assert_close(g[i], want[i], rtol=1e-5, atol=1e-6)


def test_vgg_global_feature_batched_equals_per_image(model: RegionModel, monkeypatch) -> None:
    """The paper's fc7 global feature (max-pool, 7x7 adaptive average, head), batched over padded maps of several
    sizes, equals the per-image computation on each valid map (a small stand-in head keeps the test fast)."""
    torch.manual_seed(1)
    head = torch.nn.Sequential(torch.nn.Linear(4 * 49, 5), torch.nn.ReLU())
    monkeypatch.setattr(model.backbone, "head", head)
    sizes = [(9, 14), (5, 3), (14, 14), (1, 2), (8, 11)]
    fmap = torch.full((len(sizes), 4, 14, 14), 7.0)
    for i, (h, w) in enumerate(sizes):
        fmap[i, :, :h, :w] = torch.rand(4, h, w)
    cells = torch.tensor(sizes)
    from pipeline.model.transform import valid_mask

    with torch.inference_mode():
        got = model._global_features(fmap, cells, valid_mask(cells, 14, 14))
        for i, (h, w) in enumerate(sizes):
            x = F.adaptive_avg_pool2d(F.max_pool2d(fmap[i : i + 1, :, :h, :w], 2, ceil_mode=True), 7)
            torch.testing.assert_close(got[i], head(x.flatten(1))[0], rtol=1e-5, atol=1e-6)


def test_precision_is_hashed_only_when_set() -> None:
    """Outputs extracted before the precision option existed keep their config hash; a mixed-precision config
    gets another one (its outputs are not float32's)."""
    from pipeline.config import config_hash

    assert config_hash(ModelConfig()) == "ab549cc17c11"  # main's hash of the default config
    assert config_hash(ModelConfig(precision="bfloat16")) != config_hash(ModelConfig())
    with pytest.raises(ValueError):
        ModelConfig(precision="int8").validate()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision_autocast_stays_close_to_float32(model: RegionModel, mixed, precision: str) -> None:
    """Mixed precision (bfloat16 / float16 autocast of the backbone and head) within a stated tolerance of float32
    on photos: image vectors at cosine >= 0.99, and at least half of the top-K boxes found again (IoU >= 0.7).
    Retrieval effect: BENCHMARKS.md (measured there on the Paris subset)."""
    from torchvision.ops import box_iou

    batch, want = mixed
    low = RegionModel(dataclasses.replace(model.config, precision=precision), device="cpu")
    assert low.amp_dtype == getattr(torch, precision)
    got = run(low, batch)
    for a, b in zip(got, want):
        for k in VECTOR_KEYS:
            c = float(a[k] @ b[k] / (np.linalg.norm(a[k]) * np.linalg.norm(b[k])))
            assert c >= 0.99, (k, c)
        found = box_iou(torch.from_numpy(b["boxes"]), torch.from_numpy(a["boxes"])).max(dim=1).values >= 0.7
        assert found.float().mean() >= 0.5
    # The tolerance is not vacuous: float32 outputs of other images (a shifted batch) fail it.
    shifted = want[1:] + want[:1]
    assert min(float(a["crow"] @ b["crow"] / (np.linalg.norm(a["crow"]) * np.linalg.norm(b["crow"])))
               for a, b in zip(got, shifted)) < 0.99
