"""The region model: backbone + proposer + recognition network + descriptors, batched over images of any size."""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Sequence

import fsspec
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig, config_hash
from pipeline.model import descriptors as D
from pipeline.model.backbones import build_backbone, normalise
from pipeline.model.proposals import RPN, activation_proposals
from pipeline.model.recognition import RegionDescriber
from pipeline.schema import GLOBAL_KINDS

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "sigregions-region-model-v1"


def load_checkpoint(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a region-model checkpoint through fsspec with ``torch.load(weights_only=True)`` (tensors and plain
    containers only: a checkpoint can never run code).

    Args:
        url: checkpoint URL.
        storage_options: fsspec options.

    Returns:
        The checkpoint dict (``format``, ``backbone``, ``rpn`` state dict, ``rpn_args``, ``projection_dim``, optional
        ``projection``, ``backbone_state``, ``head_state`` (VGG16 fc6/fc7), ``region_pool``, ``max_side``; a checkpoint
        from pipeline/train.py also holds its caption head: ``caption``, ``caption_args``, ``vocab``).
    """
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        ckpt = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{url} is not a {CHECKPOINT_FORMAT} checkpoint")
    return ckpt


class RegionModel:
    """Callable region model. Build it on the worker that runs it (it loads weights in ``__init__``).

    ``model(images, sizes)`` takes decoded RGB uint8 arrays already resized so the longer side is ``max_side``
    (pipeline.io.images.decode_image does that) and the original (width, height) of each, and returns one dict per image:
    ``global``, ``spoc``, ``mac``, ``rmac``, ``gem``, ``crow`` (1-D float32), ``boxes`` (R, 4) in original-image pixels,
    ``scores`` (R,) descending, ``regions`` (R, D) region descriptors, ``local`` (D,) = L1(sum of regions) (eq. 1-2).
    R <= K: each level of the region pyramid (``region_scales``) proposes its top K, and the K best of them all are kept.

    Args:
        config: the model config.
        device: "cuda", "cpu" or None (cuda when available).
        threads: torch CPU threads (0 = leave torch's default).
        storage_options: fsspec options for reading the checkpoint.
    """

    def __init__(self, config: ModelConfig, device: str | None = None, threads: int = 0,
                 storage_options: dict[str, Any] | None = None) -> None:
        config.validate()
        self.config = config
        self.config_hash = config_hash(config)
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.backbone = build_backbone(config.backbone, random_weights=config.random_weights)
        self.rpn: RPN | None = None
        projection_dim = 0
        ckpt = load_checkpoint(config.checkpoint, storage_options) if config.checkpoint else None
        if ckpt is not None:
            if ckpt["backbone"] != config.backbone:
                raise ValueError(f"checkpoint was trained on {ckpt['backbone']}, not {config.backbone}")
            if "backbone_state" in ckpt:
                self.backbone.features.load_state_dict(ckpt["backbone_state"])
            if "head_state" in ckpt and self.backbone.head is not None:
                self.backbone.head.load_state_dict(ckpt["head_state"])  # fc6/fc7, fine-tuned with the RPN (VGG16)
            projection_dim = int(ckpt.get("projection_dim", 0))
            # The projection was trained on RoI features pooled one way: another pooling would feed it other inputs.
            trained_pool = ckpt.get("region_pool")
            if projection_dim and self.backbone.head is None and trained_pool and trained_pool != config.region_pool:
                raise ValueError(f"the checkpoint's projection was trained on {trained_pool!r}-pooled regions; "
                                 f"use --region-pool {trained_pool}, not {config.region_pool!r}")
            if "max_side" in ckpt and int(ckpt["max_side"]) != config.max_side:
                log.warning("checkpoint was trained at max_side %d, extracting at %d (RPN anchors are in pixels)",
                            int(ckpt["max_side"]), config.max_side)
        self.recognition = RegionDescriber(self.backbone, pool=config.region_pool, projection_dim=projection_dim)
        if config.proposer == "rpn":
            assert ckpt is not None  # validated by the config
            self.rpn = RPN(self.backbone.channels, self.backbone.stride, **ckpt.get("rpn_args", {}))
            self.rpn.load_state_dict(ckpt["rpn"])
            self.rpn.eval().to(self.device)
        if ckpt is not None and self.recognition.projection is not None:
            self.recognition.projection.load_state_dict(ckpt["projection"])
        self.backbone.features.to(self.device)
        self.recognition.eval().to(self.device)
        self.name = f"{config.backbone}/{config.proposer}"
        self.region_dim = self.recognition.dim if self.recognition.dim > 0 else self.backbone.channels
        self.scales = config.scales()

    @property
    def dims(self) -> dict[str, int]:
        """Dimension of each vector output (the images table's vector columns)."""
        d = {k: self.backbone.channels for k in GLOBAL_KINDS}
        d["global"] = self.backbone.descriptor_dim
        d["local"] = self.region_dim
        return d

    def _global_feature(self, fm: torch.Tensor) -> torch.Tensor:
        """The paper's global CNN feature: fc7 for VGG16 (max-pool, 7x7 average pool, fc6/fc7, as the classifier
        sees the image), otherwise the average-pooled conv map the classifier sees (equals SPoC)."""
        if self.backbone.head is None:
            return D.spoc(fm)
        x = F.adaptive_avg_pool2d(F.max_pool2d(fm.unsqueeze(0), 2, ceil_mode=True), 7)
        return self.backbone.head(x.flatten(1))[0]

    def _regions_at(self, fmap: torch.Tensor, hw: Sequence[tuple[int, int]], k: int,
                    scale: float) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Top-k regions of each image of one pyramid level and their descriptors.

        Args:
            fmap: (B, C, h, w) feature map of the level's padded batch.
            hw: each image's (height, width) in the level's pixels.
            k: regions per image.
            scale: the level's scale relative to max_side (boxes are divided by it).

        Returns:
            Per image: boxes (k', 4) in max_side pixels, scores (k',) descending, descriptors (k', D).
        """
        s = self.backbone.stride
        boxes, scores = [], []
        if self.rpn is not None:
            for b, sc in self.rpn.propose(fmap, list(hw), k):
                boxes.append(b)
                scores.append(sc)
        else:
            for i, (h, w) in enumerate(hw):
                cells, sc = activation_proposals(_valid_cells(fmap[i], h, w, s), k, nms_iou=self.config.nms_iou)
                b = cells * s
                b[:, 0::2] = b[:, 0::2].clamp(0, w)
                b[:, 1::2] = b[:, 1::2].clamp(0, h)
                boxes.append(b)
                scores.append(sc)
        desc = self.recognition(fmap, boxes)
        return [b / scale for b in boxes], scores, [d.float() for d in desc]

    @torch.inference_mode()
    def __call__(self, images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]) -> list[dict[str, np.ndarray]]:
        """Run the model on a batch.

        Args:
            images: RGB uint8 arrays (h_i, w_i, 3), resized with longer side = max_side.
            sizes: original (width, height) of each image, to map boxes back to original pixels.

        Returns:
            One output dict per image (see the class docstring).
        """
        if not images:
            return []
        t0 = time.perf_counter()
        s = self.backbone.stride
        # Pad to a common size (a multiple of the stride) so the batch runs in one forward pass; each image's
        # descriptors then use only the feature cells that cover its own pixels.
        H = max(im.shape[0] for im in images)
        W = max(im.shape[1] for im in images)
        H, W = math.ceil(H / s) * s, math.ceil(W / s) * s
        # Assemble in numpy: decoded arrays may be read-only views of Ray's object store.
        batch = np.zeros((len(images), H, W, 3), dtype=np.uint8)
        for i, im in enumerate(images):
            batch[i, : im.shape[0], : im.shape[1]] = im
        x = normalise(torch.from_numpy(batch).to(self.device, non_blocking=True), self.backbone)
        x = x * _valid_mask(images, H, W, x.device)  # padding = 0 after normalisation (the dataset mean)
        fmap = self.backbone.features(x).float()
        t1 = time.perf_counter()

        K = self.config.regions
        hw = [im.shape[:2] for im in images]
        crops = [_valid_cells(fmap[i], h, w, s) for i, (h, w) in enumerate(hw)]
        # Regions at each scale of the pyramid (scale 1 reuses the forward pass above), boxes in max_side pixels.
        per_scale = []
        for sc in sorted(self.scales, reverse=True):
            if sc == 1.0:
                per_scale.append(self._regions_at(fmap, hw, K, 1.0))
                continue
            xs, hw_sc = _rescaled_batch(x, hw, sc, s)
            per_scale.append(self._regions_at(self.backbone.features(xs).float(), hw_sc, K, sc))
        boxes_px, scores, regions = [], [], []
        for i in range(len(images)):
            b = torch.cat([ps[0][i] for ps in per_scale])
            sc_ = torch.cat([ps[1][i] for ps in per_scale])
            r = torch.cat([ps[2][i] for ps in per_scale])
            # One ranking over the pyramid, rank 0 = highest score at any scale (stable: on ties the larger scale
            # first); the top K are kept, so K means the same with one scale or several.
            order = torch.sort(sc_, descending=True, stable=True).indices[:K]
            boxes_px.append(b[order])
            scores.append(sc_[order])
            regions.append(r[order])

        out = []
        for i, im in enumerate(images):
            fm = crops[i]
            r = regions[i]
            rec = {
                "global": self._global_feature(fm),
                "spoc": D.spoc(fm),
                "mac": D.mac(fm),
                "rmac": D.rmac(fm),
                "gem": D.gem(fm),
                "crow": D.crow(fm),
                "local": D.sum_pool_l1(r),
            }
            ow, oh = sizes[i]
            h, w = im.shape[:2]
            scale = torch.tensor([ow / w, oh / h, ow / w, oh / h], device=boxes_px[i].device)
            rec_np = {k: v.float().cpu().numpy().astype(np.float32) for k, v in rec.items()}
            bx = boxes_px[i].float() * scale
            # Clamp again after scaling: float32 rounding of w * (ow / w) can land a hair outside the original image.
            bx[:, 0::2] = bx[:, 0::2].clamp(0, ow)
            bx[:, 1::2] = bx[:, 1::2].clamp(0, oh)
            rec_np["boxes"] = bx.cpu().numpy()
            rec_np["scores"] = scores[i].float().cpu().numpy()
            rec_np["regions"] = r.cpu().numpy().astype(np.float32)
            out.append(rec_np)
        log.debug("batch of %d: backbone %.3fs, regions+descriptors %.3fs", len(images), t1 - t0, time.perf_counter() - t1)
        return out


def _valid_cells(fm: torch.Tensor, h: int, w: int, stride: int) -> torch.Tensor:
    """The part (C, ceil(h/stride), ceil(w/stride)) of one padded feature map (C, H', W') that covers an h x w image."""
    return fm[:, : max(1, math.ceil(h / stride)), : max(1, math.ceil(w / stride))]


def _rescaled_batch(x: torch.Tensor, hw: Sequence[tuple[int, int]], scale: float,
                    stride: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Resize each image of a normalised, padded batch by ``scale`` (antialiased when shrinking) and pad them again.

    Args:
        x: (B, 3, H, W) normalised batch, padding = 0.
        hw: each image's (height, width) inside x.
        scale: resize factor.
        stride: the backbone's stride (the new padded size is a multiple of it).

    Returns:
        The new batch and each image's new (height, width).
    """
    new_hw = [(max(1, round(h * scale)), max(1, round(w * scale))) for h, w in hw]
    H = math.ceil(max(h for h, _ in new_hw) / stride) * stride
    W = math.ceil(max(w for _, w in new_hw) / stride) * stride
    out = x.new_zeros((x.shape[0], 3, H, W))
    for i, ((h, w), (nh, nw)) in enumerate(zip(hw, new_hw)):
        out[i, :, :nh, :nw] = F.interpolate(x[i : i + 1, :, :h, :w], size=(nh, nw), mode="bilinear",
                                            align_corners=False, antialias=scale < 1)[0]
    return out, new_hw


def _valid_mask(images: Sequence[np.ndarray], H: int, W: int, device: torch.device) -> torch.Tensor:
    """(B, 1, H, W) mask of each image's real pixels in the padded batch."""
    m = torch.zeros((len(images), 1, H, W), device=device)
    for i, im in enumerate(images):
        m[i, :, : im.shape[0], : im.shape[1]] = 1
    return m
