"""The training job's config (TrainConfig), what a resumed run must keep, and the files a run writes."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from pipeline.config import (
    BACKBONES,
    REGION_POOLS,
    ConfigError,
    HasStorage,
    _check_choices,
    _check_finite,
    _opt,
    public_dict,
    storage_field,
)

MODEL_FILE = "region_model.pt"  # the final checkpoint, in pipeline.densecap.checkpoint.CHECKPOINT_FORMAT
STATE_FILE = "train_state.pt"  # everything needed to resume (model, optimizer, epoch), rewritten every epoch
STATE_MARKER = "train_state.json"  # written after STATE_FILE: epoch, config, vocab (small; read by the driver)
METRICS_FILE = "metrics.json"

# Fields that may change when a run is resumed (how and where it runs, how long); any other change is a new run.
RESUMABLE_CHANGES = ("data", "output", "epochs", "workers", "use_gpu", "cpus_per_worker", "loader_workers", "amp",
                     "log_every", "max_failures", "ray_storage", "storage_options")


@dataclass(frozen=True)
class TrainConfig(HasStorage):
    """`jobs/train_regions.py`: Visual Genome-style region descriptions -> a trained region-model checkpoint."""

    data: str = _opt("", "folder URL holding region_descriptions.json and images/<image_id>.jpg, or the JSON's URL",
                     required=True)
    output: str = _opt("", "output URL: region_model.pt, metrics.json, train_state.pt (resumed when present)",
                       required=True)
    backbone: str = _opt("mobilenet_v2", "CNN backbone", choices=BACKBONES)
    epochs: int = _opt(10, "passes over the training split")
    batch_size: int = _opt(4, "images per worker per step")
    lr: float = _opt(1e-3, "Adam learning rate of the heads (a fine-tuned backbone gets lr / 10)")
    workers: int = _opt(1, "data-parallel training workers (one per GPU with --use-gpu)")
    use_gpu: bool = _opt(False, "one GPU per worker")
    freeze_backbone: bool = _opt(True, "keep the ImageNet backbone fixed (global features stay those of ImageNet)")
    projection_dim: int = _opt(512, "learned projection after pooled RoI features (non-VGG backbones)")
    region_pool: str = _opt("gem", "pooling of RoI features before the projection (non-VGG backbones)",
                            choices=REGION_POOLS)
    max_side: int = _opt(448, "longer image side fed to the CNN, in pixels (aspect kept); extract at the same size")
    image_dirs: str = _opt("images", "comma-separated image folders under the data folder (Visual Genome: "
                                     "VG_100K,VG_100K_2); files are <image_id>.<ext>")
    max_images: int = _opt(0, "use a seeded random subset of this many annotated images (0 = all)")
    val_fraction: float = _opt(0.05, "held-out share of images (seeded split)")
    max_val_images: int = _opt(1000, "at most this many held-out images")
    min_word_count: int = _opt(15, "words seen fewer times in training phrases become <unk> (DenseCap: 15)")
    max_words: int = _opt(15, "phrases with more words are dropped (DenseCap: 15)")
    anchor_sizes: str = _opt("48,96,192,384", "RPN anchor side lengths in pixels, comma-separated")
    aspect_ratios: str = _opt("0.5,1,2", "RPN anchor aspect ratios (height / width), comma-separated")
    rpn_channels: int = _opt(256, "channels of the RPN's shared 3x3 conv")
    rpn_batch: int = _opt(256, "anchors sampled per image for the RPN losses (at most half positive)")
    pos_iou: float = _opt(0.7, "anchors with IoU >= this to a ground-truth box are positive")
    neg_iou: float = _opt(0.3, "anchors with IoU < this to every ground-truth box are negative")
    caption_regions: int = _opt(64, "regions captioned per image (ground truth + positive RPN boxes)")
    embed_dim: int = _opt(512, "word embedding size of the caption LSTM")
    lstm_dim: int = _opt(512, "hidden size of the caption LSTM")
    objectness_weight: float = _opt(1.0, "weight of the RPN objectness loss")
    box_weight: float = _opt(1.0, "weight of the RPN box regression loss")
    caption_weight: float = _opt(1.0, "weight of the caption loss")
    lr_schedule: str = _opt("cosine", "learning rate over the run: constant, or cosine decay to 0",
                            choices=("cosine", "constant"))
    grad_clip: float = _opt(5.0, "clip the gradient norm (0 = off)")
    eval_top_k: int = _opt(50, "held-out proposal recall uses the top-K RPN proposals")
    eval_before: bool = _opt(True, "evaluate the untrained model on the held-out split first (epoch 0)")
    max_steps: int = _opt(0, "stop after this many steps in total (0 = no limit; for smoke runs)")
    amp: bool = _opt(True, "backbone in bfloat16 autocast on GPU")
    loader_workers: int = _opt(2, "image-decoding processes per training worker")
    cpus_per_worker: float = _opt(0.0, "CPUs reserved per training worker; 0 = 1 + loader_workers")
    log_every: int = _opt(50, "log the losses every N steps")
    max_failures: int = _opt(0, "Ray Train restarts after a worker failure (each resumes after the last finished epoch)")
    ray_storage: str = _opt("", "where Ray Train keeps its run records (default ~/ray_results; on a multi-node "
                                "cluster, a shared path or bucket URL)")
    seed: int = _opt(0, "seed of the split, the subset, sampling and initialisation")
    random_weights: bool = _opt(False, "random backbone weights (tests only)")
    storage_options: str = storage_field()

    def validate(self) -> None:
        """Raise ConfigError for values outside their domain."""
        _check_choices(self)
        _check_finite(self)
        if not self.data or not self.output:
            raise ConfigError("--data and --output are required")
        for name in ("epochs", "batch_size", "workers", "projection_dim", "rpn_batch", "rpn_channels", "caption_regions",
                     "embed_dim", "lstm_dim", "eval_top_k", "min_word_count", "max_words", "log_every", "max_val_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_images", "max_steps", "max_failures", "loader_workers", "cpus_per_worker", "grad_clip", "objectness_weight",
                     "box_weight", "caption_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.max_side < 32 or self.max_side > 4096:
            raise ConfigError(f"max_side must be in [32, 4096], got {self.max_side}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 <= self.neg_iou <= self.pos_iou <= 1:
            raise ConfigError(f"need 0 <= neg_iou <= pos_iou <= 1, got {self.neg_iou}, {self.pos_iou}")
        if not [d for d in self.image_dirs.split(",") if d.strip()]:
            raise ConfigError("image_dirs must name at least one folder")
        self.anchors()
        self.fs_options  # noqa: B018 - parses (and caches) the options: a ConfigError now, not mid-run

    def anchors(self) -> dict[str, list[float]]:
        """The RPN's anchor kwargs (``rpn_args`` of the checkpoint) parsed from the comma-separated fields."""
        out = {}
        for name in ("anchor_sizes", "aspect_ratios"):
            try:
                vals = [float(v) for v in getattr(self, name).split(",") if v.strip()]
            except ValueError:
                raise ConfigError(f"{name}: expected comma-separated numbers, got {getattr(self, name)!r}") from None
            if not vals or any(not math.isfinite(v) or v <= 0 for v in vals):
                raise ConfigError(f"{name}: expected positive numbers, got {getattr(self, name)!r}")
            out[name] = vals
        return out


def resume_key(cfg: TrainConfig) -> dict[str, Any]:
    """The fields a resumed run must share with the run that wrote the state."""
    return {k: v for k, v in public_dict(cfg).items() if k not in RESUMABLE_CHANGES}


def replace(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    """A validated copy of a config with some fields changed."""
    new = dataclasses.replace(cfg, **changes)
    new.validate()
    return new
