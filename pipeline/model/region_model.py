"""The region model composed: transform -> backbone -> proposer -> recognition -> descriptors -> postprocess."""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig, config_hash
from pipeline.densecap import checkpoint
from pipeline.model import descriptors as D
from pipeline.model.backbones import build_backbone
from pipeline.model.proposals import ActivationProposer, Proposer
from pipeline.model.recognition import RegionDescriber
from pipeline.model.rpn import RPN
from pipeline.model.transform import batch_images, original_boxes, rescale_batch, valid_cells
from pipeline.schema import GLOBAL_KINDS

log = logging.getLogger(__name__)

# One pyramid level's regions, per image: boxes (k, 4) in max_side pixels, scores (k,) descending, descriptors (k, D).
Level = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


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
        if config.checkpoint:
            ckpt = checkpoint.load_checkpoint(config.checkpoint, storage_options)
            self.recognition, self.rpn = checkpoint.restore(ckpt, config, self.backbone)
        else:
            self.recognition = RegionDescriber(self.backbone, pool=config.region_pool)
        self.proposer: Proposer
        if self.rpn is not None:
            self.rpn.eval().to(self.device)
            self.proposer = self.rpn
        else:
            self.proposer = ActivationProposer(self.backbone.stride, nms_iou=config.nms_iou)
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

    def _image_descriptors(self, fm: torch.Tensor, regions: torch.Tensor) -> dict[str, torch.Tensor]:
        """One image's vectors: the global descriptors of its valid feature cells, and ``local`` from its regions."""
        return {"global": self._global_feature(fm), "spoc": D.spoc(fm), "mac": D.mac(fm), "rmac": D.rmac(fm),
                "gem": D.gem(fm), "crow": D.crow(fm), "local": D.sum_pool_l1(regions)}

    def _level(self, fmap: torch.Tensor, hw: Sequence[tuple[int, int]], scale: float) -> Level:
        """Top-K regions of each image of one pyramid level and their descriptors.

        Args:
            fmap: (B, C, h, w) feature map of the level's padded batch.
            hw: each image's (height, width) in the level's pixels.
            scale: the level's scale relative to max_side (boxes are divided by it).

        Returns:
            Per image: boxes in max_side pixels, scores descending, descriptors.
        """
        proposals = self.proposer.propose(fmap, list(hw), self.config.regions)
        boxes = [b for b, _ in proposals]
        desc = self.recognition(fmap, boxes)
        return [b / scale for b in boxes], [s for _, s in proposals], [d.float() for d in desc]

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
        x, hw = batch_images(images, self.backbone, self.device)
        fmap = self.backbone.features(x).float()
        t1 = time.perf_counter()
        # Each level of the pyramid (scale 1 reuses the forward pass above), larger scales first.
        levels = []
        for sc in sorted(self.scales, reverse=True):
            if sc == 1.0:
                levels.append(self._level(fmap, hw, 1.0))
            else:
                xs, hw_sc = rescale_batch(x, hw, sc, self.backbone.stride)
                levels.append(self._level(self.backbone.features(xs).float(), hw_sc, sc))
        out = []
        for i, (boxes, scores, regions) in enumerate(merge_levels(levels, self.config.regions)):
            fm = valid_cells(fmap[i], *hw[i], self.backbone.stride)
            out.append(postprocess(self._image_descriptors(fm, regions), boxes, scores, regions, hw[i], sizes[i]))
        log.debug("batch of %d: backbone %.3fs, regions+descriptors %.3fs", len(images), t1 - t0, time.perf_counter() - t1)
        return out


def merge_levels(levels: Sequence[Level], k: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One ranking per image over the pyramid's levels: concatenate the levels (in the given order), sort by score
    descending (stable: on ties the earlier level first) and keep the top k, so k means the same with one level or
    several.

    Args:
        levels: per level, per image (boxes, scores, descriptors) (see ``Level``).
        k: regions kept per image.

    Returns:
        Per image (boxes (k', 4), scores (k',) descending, descriptors (k', D)), k' <= k.
    """
    out = []
    for i in range(len(levels[0][0])):
        boxes, scores, desc = (torch.cat([lv[j][i] for lv in levels]) for j in range(3))
        order = torch.sort(scores, descending=True, stable=True).indices[:k]
        out.append((boxes[order], scores[order], desc[order]))
    return out


def postprocess(vectors: dict[str, torch.Tensor], boxes: torch.Tensor, scores: torch.Tensor, regions: torch.Tensor,
                hw: tuple[int, int], size: tuple[int, int]) -> dict[str, np.ndarray]:
    """One image's outputs as float32 numpy arrays, boxes mapped to the original image's pixels.

    Args:
        vectors: the image's 1-D descriptors by name.
        boxes: (R, 4) boxes in the resized image's pixels.
        scores: (R,) scores.
        regions: (R, D) region descriptors.
        hw: the resized image's (height, width).
        size: the original image's (width, height).

    Returns:
        The output dict (see ``RegionModel``).
    """
    out = {k: v.float().cpu().numpy().astype(np.float32) for k, v in vectors.items()}
    out["boxes"] = original_boxes(boxes, hw, size).cpu().numpy()
    out["scores"] = scores.float().cpu().numpy()
    out["regions"] = regions.cpu().numpy().astype(np.float32)
    return out
