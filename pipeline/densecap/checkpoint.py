"""The region-model checkpoint: its format, building it from a trained model, saving, loading and restoring."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

from pipeline.config import ModelConfig, public_dict
from pipeline.io import storage
from pipeline.model.backbones import Backbone
from pipeline.model.recognition import RegionDescriber
from pipeline.model.rpn import RPN

if TYPE_CHECKING:  # the trainer is never imported by inference, which only loads checkpoints
    from pipeline.densecap.model import DenseCapModel

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "sigregions-region-model-v1"


def region_checkpoint(model: DenseCapModel, vocab: Sequence[str], metrics: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
    """The trained model in ``CHECKPOINT_FORMAT`` (tensors and plain containers only, so that it loads with
    ``torch.load(weights_only=True)``), plus the caption head and its vocabulary.

    Args:
        model: the trained model (unwrapped from DDP).
        vocab: the caption vocabulary.
        metrics: last metrics to keep in the file (numbers only).

    Returns:
        The checkpoint dict (see ``load_checkpoint``).
    """
    cpu = lambda sd: {k: v.detach().cpu().clone() for k, v in sd.items()}  # noqa: E731
    cfg = model.cfg
    ckpt: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "backbone": cfg.backbone,
        "rpn": cpu(model.rpn.state_dict()),
        "rpn_args": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in model.rpn_args.items()},
        "projection_dim": int(model.projection_dim),
        "region_pool": cfg.region_pool,
        "roi_size": int(model.recognition.roi_size),
        "max_side": int(cfg.max_side),
        "caption": cpu(model.caption.state_dict()),
        "caption_args": dict(model.caption.args),
        "vocab": [str(w) for w in vocab],
        "max_words": int(cfg.max_words),
        "train_config": {k: v for k, v in public_dict(cfg).items()},
        "metrics": {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))},
    }
    if model.recognition.projection is not None:
        ckpt["projection"] = cpu(model.recognition.projection.state_dict())
    if model.bb.head is not None:
        ckpt["head_state"] = cpu(model.bb.head.state_dict())  # fc6/fc7, fine-tuned
    if not cfg.freeze_backbone:
        ckpt["backbone_state"] = cpu(model.features.state_dict())
    return ckpt


def save_checkpoint(url: str, ckpt: dict[str, Any], storage_options: dict[str, Any] | None = None) -> None:
    """Write a checkpoint (``region_checkpoint``'s dict) as one torch file.

    Args:
        url: checkpoint URL.
        ckpt: the checkpoint dict.
        storage_options: fsspec options.
    """
    storage.write_torch(url, ckpt, storage_options)


def load_checkpoint(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a region-model checkpoint with ``torch.load(weights_only=True)`` (tensors and plain containers only: a
    checkpoint can never run code).

    Args:
        url: checkpoint URL.
        storage_options: fsspec options.

    Returns:
        The checkpoint dict (``format``, ``backbone``, ``rpn`` state dict, ``rpn_args``, ``projection_dim``, optional
        ``projection``, ``backbone_state``, ``head_state`` (VGG16 fc6/fc7), ``region_pool``, ``max_side``; a checkpoint
        from training also holds its caption head: ``caption``, ``caption_args``, ``vocab``).

    Raises:
        ValueError: the file is not a region-model checkpoint.
    """
    ckpt = storage.read_torch(url, storage_options)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{url} is not a {CHECKPOINT_FORMAT} checkpoint")
    return ckpt


def restore(ckpt: dict[str, Any], config: ModelConfig, backbone: Backbone) -> tuple[RegionDescriber, RPN | None]:
    """Check a checkpoint against the model config and build the region model's trained parts from it.

    The fine-tuned backbone and VGG16 head (when the checkpoint holds them) are loaded into ``backbone`` in place.

    Args:
        ckpt: what ``load_checkpoint`` returned.
        config: the region model's config.
        backbone: the built backbone.

    Returns:
        (the recognition network with the trained projection, the trained RPN when ``config.proposer`` is "rpn",
        else None), both on the CPU.

    Raises:
        ValueError: the checkpoint was trained on another backbone, or its projection on another region pooling.
    """
    if ckpt["backbone"] != config.backbone:
        raise ValueError(f"checkpoint was trained on {ckpt['backbone']}, not {config.backbone}")
    if "backbone_state" in ckpt:
        backbone.features.load_state_dict(ckpt["backbone_state"])
    if "head_state" in ckpt and backbone.head is not None:
        backbone.head.load_state_dict(ckpt["head_state"])  # fc6/fc7, fine-tuned with the RPN (VGG16)
    projection_dim = int(ckpt.get("projection_dim", 0))
    # The projection was trained on RoI features pooled one way: another pooling would feed it other inputs.
    trained_pool = ckpt.get("region_pool")
    if projection_dim and backbone.head is None and trained_pool and trained_pool != config.region_pool:
        raise ValueError(f"the checkpoint's projection was trained on {trained_pool!r}-pooled regions; "
                         f"use --region-pool {trained_pool}, not {config.region_pool!r}")
    if "max_side" in ckpt and int(ckpt["max_side"]) != config.max_side:
        log.warning("checkpoint was trained at max_side %d, extracting at %d (RPN anchors are in pixels)",
                    int(ckpt["max_side"]), config.max_side)
    recognition = RegionDescriber(backbone, pool=config.region_pool, projection_dim=projection_dim)
    if recognition.projection is not None:
        recognition.projection.load_state_dict(ckpt["projection"])
    rpn = None
    if config.proposer == "rpn":
        rpn = RPN(backbone.channels, backbone.stride, **ckpt.get("rpn_args", {}))
        rpn.load_state_dict(ckpt["rpn"])
    return recognition, rpn
