"""The region model composed: transform -> backbone -> proposer -> recognition -> descriptors -> postprocess."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig, config_hash
from pipeline.densecap import checkpoint
from pipeline.model import descriptors as D
from pipeline.model.backbones import build_backbone
from pipeline.model.proposals import (
    ActivationProposer,
    Proposer,
    clamp_batch,
    propose_padded,
)
from pipeline.model.recognition import RegionDescriber
from pipeline.model.rpn import RPN
from pipeline.model.transform import batch_images, cell_sizes, rescale_batch, valid_mask
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
    Everything after the backbone runs for the whole batch in tensor ops on the model's device (proposals, every
    pooling, one RoIAlign over all levels), and the outputs reach the host in one copy per batch.

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
        # Mixed precision (autocast) for the backbone and the region head; every pooling and proposal is float32.
        self.amp_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[config.precision]
        # channels_last suits GPU convolutions (tensor cores); on CPU the default layout is kept.
        self.channels_last = self.device.type == "cuda"
        if self.channels_last:
            self.backbone.features.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True  # bucketed batches have few shapes: autotuning pays once each

    @property
    def dims(self) -> dict[str, int]:
        """Dimension of each vector output (the images table's vector columns)."""
        d = {k: self.backbone.channels for k in GLOBAL_KINDS}
        d["global"] = self.backbone.descriptor_dim
        d["local"] = self.region_dim
        return d

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's float32 feature map of a normalised batch, in the configured precision and layout."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return self.backbone.features(x).float()

    def _global_features(self, fmap: torch.Tensor, cells: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The paper's global CNN feature of each image's valid cells: fc7 for VGG16 (max-pool, 7x7 average pool,
        fc6/fc7, as the classifier sees the image), otherwise the average-pooled conv map the classifier sees (equals
        SPoC). (B, C, H, W) -> (B, D).

        For VGG16 the batch is pooled with padding at -inf (a ceil-mode window at an image's edge sees only its own
        cells) and the adaptive 7x7 average of each image's own pooled cells comes from a summed-area table, with
        torch's adaptive-pool bins (floor(i*n/7), ceil((i+1)*n/7)).
        """
        if self.backbone.head is None:
            return D.masked_spoc(fmap, mask)
        pooled = F.max_pool2d(fmap.masked_fill(~mask[:, None], float("-inf")), 2, ceil_mode=True)
        pooled = pooled.masked_fill(pooled == float("-inf"), 0.0)
        b, c, _, pw = pooled.shape
        integral = F.pad(pooled.double().cumsum(2).cumsum(3), (1, 0, 1, 0)).view(b, c, -1)
        n = (cells + 1) // 2  # pooled valid size (ceil)
        i = torch.arange(7, device=fmap.device)
        lo = (i.view(1, 1, 7) * n[:, :, None]) // 7  # (B, 2, 7): floor(i * n / 7)
        hi = ((i.view(1, 1, 7) + 1) * n[:, :, None] + 6) // 7  # ceil((i + 1) * n / 7)
        y0, y1 = lo[:, 0, :, None], hi[:, 0, :, None]  # (B, 7, 1)
        x0, x1 = lo[:, 1, None, :], hi[:, 1, None, :]  # (B, 1, 7)

        def at(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            idx = (y * (pw + 1) + x).reshape(b, 1, 49).expand(b, c, 49)
            return integral.gather(2, idx)

        sums = at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)
        area = ((y1 - y0) * (x1 - x0)).reshape(b, 1, 49)
        grid = (sums / area).float()  # (B, C, 49): the flatten order of a (C, 7, 7) map
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return self.backbone.head(grid.flatten(1)).float()

    @torch.inference_mode()
    def __call__(self, images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]],
                 padded: tuple[int, int] | None = None) -> list[dict[str, np.ndarray]]:
        """Run the model on a batch: every step after the backbone is done for the whole batch in tensor ops on the
        model's device, and the results come to the host in one copy.

        Args:
            images: RGB uint8 arrays (h_i, w_i, 3), resized with longer side = max_side.
            sizes: original (width, height) of each image, to map boxes back to original pixels.
            padded: the batch's padded (height, width) (its bucket's, see ``transform.padded_size``); None: the
                smallest that holds it.

        Returns:
            One output dict per image (see the class docstring).
        """
        if not images:
            return []
        t0 = time.perf_counter()
        stride, k = self.backbone.stride, self.config.regions
        x, hw = batch_images(images, self.backbone, self.device, padded)
        fmap = self._features(x)
        # Each level of the pyramid (scale 1 reuses the forward pass above), larger scales first.
        scales = sorted(self.scales, reverse=True)
        fmaps, props = [], []
        for sc in scales:
            xs, hw_sc = (x, hw) if sc == 1.0 else rescale_batch(x, hw, sc, stride)
            fm = fmap if sc == 1.0 else self._features(xs)
            fmaps.append(fm)
            props.append(propose_padded(self.proposer, fm, hw_sc, k))
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            descs = self.recognition.describe_levels(fmaps, [b for b, _ in props])
        # The pyramid merge for the whole batch (merge_levels per image, in one sort): padding rows have score -inf,
        # so they rank last and are dropped in unpack.
        boxes, scores, regions = merge_levels_padded([b / sc for sc, (b, _) in zip(scales, props)],
                                                     [s for _, s in props], [d.float() for d in descs], k)
        valid = torch.isfinite(scores)
        cells = cell_sizes(hw, stride, fmap.device)
        mask = valid_mask(cells, fmap.shape[-2], fmap.shape[-1])
        vectors = {"global": self._global_features(fmap, cells, mask), "spoc": D.masked_spoc(fmap, mask),
                   "mac": D.masked_mac(fmap, mask), "rmac": D.batched_rmac(fmap, cells), "gem": D.masked_gem(fmap, mask),
                   "crow": D.masked_crow(fmap, mask), "local": D.masked_sum_pool_l1(regions, valid)}
        out = unpack(vectors, boxes, scores, regions, hw, sizes)
        log.debug("batch of %d: %.3fs", len(images), time.perf_counter() - t0)
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


def merge_levels_padded(boxes: Sequence[torch.Tensor], scores: Sequence[torch.Tensor], descs: Sequence[torch.Tensor],
                        k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``merge_levels`` for a whole batch of padded levels in one sort on the device, no loop over images: per image,
    the levels' rows concatenated in the given order, a stable sort by score descending, the top k. Padding rows
    (score -inf) rank last, in level order, exactly as ``merge_levels`` ranks them when given the padded rows.

    Args:
        boxes: per level, (B, k_l, 4) boxes.
        scores: per level, (B, k_l) scores, -inf on padding rows.
        descs: per level, (B, k_l, D) region descriptors.
        k: regions kept per image.

    Returns:
        (boxes (B, k', 4), scores (B, k') descending, descriptors (B, k', D)), k' = min(k, sum of k_l).
    """
    b, s, d = torch.cat(list(boxes), 1), torch.cat(list(scores), 1), torch.cat(list(descs), 1)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return (b.gather(1, order[..., None].expand(-1, -1, b.shape[-1])), s.gather(1, order),
            d.gather(1, order[..., None].expand(-1, -1, d.shape[-1])))


def unpack(vectors: dict[str, torch.Tensor], boxes: torch.Tensor, scores: torch.Tensor, regions: torch.Tensor,
           hw: Sequence[tuple[int, int]], sizes: Sequence[tuple[int, int]]) -> list[dict[str, np.ndarray]]:
    """A batch's outputs as one float32 numpy dict per image, boxes mapped to the original images' pixels: everything
    is packed into one tensor and copied to the host once.

    Args:
        vectors: each (B, D_name) descriptor by name.
        boxes: (B, K, 4) boxes in the resized images' pixels.
        scores: (B, K) scores descending, -inf on padding rows (dropped).
        regions: (B, K, D) region descriptors.
        hw: each resized image's (height, width).
        sizes: each original image's (width, height).

    Returns:
        The output dicts (see ``RegionModel``).
    """
    b, k = scores.shape
    dev = boxes.device
    # Scale to original pixels (float32, as per image) and clamp again: w * (ow / w) can land a hair outside.
    res = torch.tensor(hw, dtype=torch.float64, device=dev)
    orig = torch.tensor(sizes, dtype=torch.float64, device=dev)  # (width, height)
    f = torch.stack([orig[:, 0] / res[:, 1], orig[:, 1] / res[:, 0]], dim=1).float()  # (B, 2): x, y factors
    scaled = boxes.float() * f.repeat(1, 2)[:, None, :]
    boxes_o = clamp_batch(scaled, orig.flip(1))
    names = list(vectors)
    parts = [vectors[n].float() for n in names] + [boxes_o.reshape(b, -1), scores.float(),
                                                   regions.float().reshape(b, -1)]
    host = torch.cat(parts, dim=1).cpu().numpy()
    widths = [p.shape[1] for p in parts]
    cols = np.split(host, np.cumsum(widths)[:-1], axis=1)
    n_valid = np.isfinite(cols[-2]).sum(axis=1)
    out = []
    for i in range(b):
        n = int(n_valid[i])
        o = {name: cols[j][i] for j, name in enumerate(names)}
        o["boxes"] = cols[-3][i].reshape(k, 4)[:n]
        o["scores"] = cols[-2][i, :n]
        o["regions"] = cols[-1][i].reshape(k, -1)[:n]
        out.append(o)
    return out
