"""Training the region model DenseCap-style (RPN localization layer + recognition network + LSTM captions) on Ray Train."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import string
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.ops import box_iou, clip_boxes_to_image

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
from pipeline.io import images as imgs
from pipeline.io import listing, storage
from pipeline.model.backbones import Backbone, build_backbone, normalise
from pipeline.model.proposals import RPN, proposal_recall
from pipeline.model.recognition import RegionDescriber

log = logging.getLogger(__name__)

ANNOTATIONS = "region_descriptions.json"
MODEL_FILE = "region_model.pt"  # the final checkpoint, in pipeline.model.region_model.CHECKPOINT_FORMAT
STATE_FILE = "train_state.pt"  # everything needed to resume (model, optimizer, epoch), rewritten every epoch
STATE_MARKER = "train_state.json"  # written after STATE_FILE: epoch, config, vocab (small; read by the driver)
METRICS_FILE = "metrics.json"

SPECIAL_TOKENS = ("<pad>", "<start>", "<end>", "<unk>")
PAD, START, END, UNK = range(4)

# Fields that may change when a run is resumed (how and where it runs, how long); any other change is a new run.
RESUMABLE_CHANGES = ("data", "output", "epochs", "workers", "use_gpu", "cpus_per_worker", "loader_workers", "amp",
                     "log_every", "max_failures", "ray_storage", "storage_options")


# ----------------------------------------------------------------------------------------------------------- config


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


# ------------------------------------------------------------------------------------------------------------- text


def tokenize(phrase: str) -> list[str]:
    """DenseCap's tokenisation: lower case, punctuation removed, split on whitespace."""
    return phrase.lower().translate(str.maketrans("", "", string.punctuation)).split()


def build_vocab(token_lists: Iterable[Sequence[str]], min_count: int) -> list[str]:
    """Vocabulary: the special tokens, then words seen at least ``min_count`` times (most frequent first, ties by
    spelling, so the order is deterministic).

    Args:
        token_lists: tokenised training phrases.
        min_count: minimum occurrences of a word.

    Returns:
        The vocabulary; index = token id (``<pad>`` = 0, ``<start>`` = 1, ``<end>`` = 2, ``<unk>`` = 3).
    """
    counts = Counter(w for toks in token_lists for w in toks)
    words = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIAL_TOKENS),
                   key=lambda w: (-counts[w], w))
    return [*SPECIAL_TOKENS, *words]


def encode(tokens: Sequence[str], index: dict[str, int], length: int) -> np.ndarray:
    """Token ids of a phrase padded with ``<pad>`` to ``length`` (unknown words -> ``<unk>``)."""
    out = np.full(length, PAD, dtype=np.int32)
    ids = [index.get(w, UNK) for w in tokens[:length]]
    out[: len(ids)] = ids
    return out


def decode(ids: Iterable[int], vocab: Sequence[str]) -> str:
    """A phrase from token ids (stops at ``<end>``, skips ``<pad>`` and ``<start>``)."""
    words = []
    for i in ids:
        i = int(i)
        if i == END:
            break
        if i not in (PAD, START):
            words.append(vocab[i])
    return " ".join(words)


# ------------------------------------------------------------------------------------------------------------- data


@dataclass
class RegionData:
    """Annotated images in compact arrays (cheap to put in Ray's object store and share between workers).

    Attributes:
        image_ids: (N,) int64.
        uris: N image URLs.
        offsets: (N + 1,) int64: image i's regions are rows offsets[i]:offsets[i+1].
        boxes: (R, 4) float32 [x1, y1, x2, y2] in original-image pixels.
        tokens: (R, max_words) int32 token ids, ``<pad>``-padded.
    """

    image_ids: np.ndarray
    uris: list[str]
    offsets: np.ndarray
    boxes: np.ndarray
    tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.uris)

    @property
    def num_regions(self) -> int:
        """Regions of all images."""
        return int(self.offsets[-1])

    def regions(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(boxes, tokens) of image i."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.boxes[a:b], self.tokens[a:b]

    def subset(self, idx: Sequence[int]) -> "RegionData":
        """The images at positions ``idx``, in that order."""
        idx = [int(i) for i in idx]
        spans = [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in idx]
        rows = np.concatenate([np.arange(a, b) for a, b in spans]) if spans else np.zeros(0, np.int64)
        return RegionData(self.image_ids[idx], [self.uris[i] for i in idx],
                          np.concatenate([[0], np.cumsum([b - a for a, b in spans])]).astype(np.int64),
                          self.boxes[rows], self.tokens[rows])


def data_urls(data: str) -> tuple[str, str]:
    """(annotations JSON URL, data folder URL) from ``--data`` (a folder or the JSON itself)."""
    if data.rstrip("/").endswith(".json"):
        return data, data.rstrip("/").rsplit("/", 1)[0] if "/" in data.rstrip("/") else "."
    return storage.join(data, ANNOTATIONS), data


def parse_region_descriptions(obj: Any, max_words: int) -> tuple[list[int], list[list[tuple[list[float], list[str]]]],
                                                                 dict[str, int]]:
    """Parse Visual Genome's ``region_descriptions.json`` (a list of ``{"id", "regions": [{"x", "y", "width",
    "height", "phrase", ...}]}``).

    Regions with empty boxes, empty phrases or more than ``max_words`` words are dropped (as DenseCap's preprocessing
    does), then images without regions.

    Args:
        obj: the decoded JSON.
        max_words: longest phrase kept, in words.

    Returns:
        (image ids, per image a list of (box [x1, y1, x2, y2], tokens), counts of what was dropped).

    Raises:
        ValueError: the JSON is not in this format.
    """
    if not isinstance(obj, list):
        raise ValueError("region descriptions must be a JSON list of images")
    ids: list[int] = []
    per_image: list[list[tuple[list[float], list[str]]]] = []
    dropped = {"empty_box": 0, "empty_phrase": 0, "long_phrase": 0, "images_without_regions": 0, "duplicate_images": 0}
    seen: set[int] = set()
    for entry in obj:
        if not isinstance(entry, dict) or not isinstance(entry.get("regions"), list):
            raise ValueError("each image must be an object with a 'regions' list")
        regions = entry["regions"]
        image_id = entry.get("id", entry.get("image_id"))
        if image_id is None and regions:
            image_id = regions[0].get("image_id")
        if image_id is None:
            raise ValueError("an image has neither 'id' nor 'image_id'")
        image_id = int(image_id)
        if image_id in seen:
            dropped["duplicate_images"] += 1
            continue
        seen.add(image_id)
        kept = []
        for r in regions:
            try:
                x, y, w, h = (float(r[k]) for k in ("x", "y", "width", "height"))
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"image {image_id}: a region lacks numeric x, y, width, height") from None
            toks = tokenize(str(r.get("phrase", "")))
            if not (w >= 1 and h >= 1 and math.isfinite(x + y + w + h)):
                dropped["empty_box"] += 1
            elif not toks:
                dropped["empty_phrase"] += 1
            elif len(toks) > max_words:
                dropped["long_phrase"] += 1
            else:
                kept.append(([max(x, 0.0), max(y, 0.0), x + w, y + h], toks))
        if not kept:
            dropped["images_without_regions"] += 1
            continue
        ids.append(image_id)
        per_image.append(kept)
    return ids, per_image, dropped


def find_image_files(root: str, image_dirs: Sequence[str], storage_options: dict[str, Any] | None = None
                     ) -> dict[int, str]:
    """Map image id -> URL by listing the image folders once (files named ``<image_id>.<ext>``).

    Args:
        root: data folder URL.
        image_dirs: folders under it.
        storage_options: fsspec options.

    Returns:
        {image_id: URL}; the first folder wins for an id found twice.
    """
    found: dict[int, str] = {}
    for d in image_dirs:
        url = storage.join(root, d)
        fs, path = storage.url_to_fs(url, storage_options)
        if not fs.exists(path):
            log.warning("image folder %s does not exist", url)
            continue
        for p in sorted(fs.find(path)):
            name = p.rsplit("/", 1)[-1]
            stem, _, ext = name.rpartition(".")
            if "." + ext.lower() in listing.IMAGE_EXTS and stem.isdigit():
                found.setdefault(int(stem), fs.unstrip_protocol(p))
    return found


def split_indices(n: int, val_fraction: float, max_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of n items into (train, held-out) positions, both sorted; held-out is at least one item
    when n >= 2."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = min(max_val, max(1, int(round(n * val_fraction)))) if n >= 2 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def load_region_data(cfg: TrainConfig, storage_options: dict[str, Any] | None = None,
                     vocab: Sequence[str] | None = None) -> tuple[RegionData, RegionData, list[str], dict[str, Any]]:
    """Read the annotations, find the image files, split (seeded), build the vocabulary from the training phrases and
    encode every phrase.

    Args:
        cfg: the training config.
        storage_options: fsspec options.
        vocab: reuse this vocabulary (a resumed run) instead of building one.

    Returns:
        (train, held-out, vocabulary, statistics).

    Raises:
        ConfigError: no usable images, or too few to train with.
    """
    ann_url, root = data_urls(cfg.data)
    t0 = time.perf_counter()
    try:
        ids, per_image, dropped = parse_region_descriptions(storage.read_json(ann_url, storage_options), cfg.max_words)
    except ValueError as e:  # also json.JSONDecodeError
        raise ConfigError(f"{ann_url} is not in Visual Genome's region_descriptions.json format: {e}") from None
    files = find_image_files(root, [d.strip() for d in cfg.image_dirs.split(",") if d.strip()], storage_options)
    keep = [i for i, image_id in enumerate(ids) if image_id in files]
    missing = len(ids) - len(keep)
    if missing:
        log.warning("%d of %d annotated images have no file under %s/{%s}", missing, len(ids), root, cfg.image_dirs)
    if cfg.max_images and len(keep) > cfg.max_images:
        keep = sorted(np.random.default_rng(cfg.seed + 1).choice(keep, cfg.max_images, replace=False).tolist())
    if len(keep) < 2:
        raise ConfigError(f"{ann_url}: {len(keep)} usable images (annotated and found under {cfg.image_dirs}); "
                          "need >= 2")
    tr, va = split_indices(len(keep), cfg.val_fraction, cfg.max_val_images, cfg.seed)
    if vocab is None:
        vocab = build_vocab((toks for j in tr for _, toks in per_image[keep[j]]), cfg.min_word_count)
    index = {w: i for i, w in enumerate(vocab)}

    def pack(positions: np.ndarray) -> RegionData:
        sel = [keep[j] for j in positions]
        regs = [r for i in sel for r in per_image[i]]
        counts = [len(per_image[i]) for i in sel]
        return RegionData(
            image_ids=np.asarray([ids[i] for i in sel], dtype=np.int64),
            uris=[files[ids[i]] for i in sel],
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            boxes=np.asarray([b for b, _ in regs], dtype=np.float32).reshape(-1, 4),
            tokens=np.stack([encode(t, index, cfg.max_words) for _, t in regs]) if regs
            else np.zeros((0, cfg.max_words), np.int32))

    train, val = pack(tr), pack(va)
    n_tok = int((train.tokens != PAD).sum())
    unk = int((train.tokens == UNK).sum())
    stats = {"annotated_images": len(ids), "missing_files": missing, "dropped": dropped, "train_images": len(train),
             "train_regions": train.num_regions, "val_images": len(val), "val_regions": val.num_regions,
             "vocab_size": len(vocab), "train_unk_rate": round(unk / max(1, n_tok), 4),
             "load_s": round(time.perf_counter() - t0, 2)}
    return train, val, list(vocab), stats


class RegionDataset(torch.utils.data.Dataset):
    """Images decoded and resized like extraction (pipeline.io.images.decode_image), boxes scaled to match.

    An item is a dict (``image`` (h, w, 3) uint8, ``boxes`` (n, 4) float32 resized-image pixels, ``tokens`` (n, L)
    int64, ``image_id``), or None when the image cannot be read or decoded, or keeps no box after clipping.
    """

    def __init__(self, data: RegionData, max_side: int, storage_options: dict[str, Any] | None = None) -> None:
        self.data = data
        self.max_side = max_side
        self.storage_options = storage_options

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        try:
            raw = storage.read_bytes(self.data.uris[i], self.storage_options)
        except Exception as e:  # noqa: BLE001 - a missing or unreadable image is skipped, not fatal
            log.warning("cannot read %s: %s: %s", self.data.uris[i], type(e).__name__, e)
            return None
        dec = imgs.decode_image(raw, max_side=self.max_side)
        if not dec.ok:
            log.warning("cannot decode %s: %s %s", self.data.uris[i], dec.status, dec.error)
            return None
        h, w = dec.array.shape[:2]
        boxes, tokens = self.data.regions(i)
        scale = np.asarray([w / dec.width, h / dec.height] * 2, dtype=np.float32)
        b = boxes * scale
        b[:, 0::2] = b[:, 0::2].clip(0, w)
        b[:, 1::2] = b[:, 1::2].clip(0, h)
        ok = ((b[:, 2] - b[:, 0]) >= 1) & ((b[:, 3] - b[:, 1]) >= 1)
        if not ok.any():
            return None
        return {"image": dec.array, "boxes": b[ok], "tokens": tokens[ok].astype(np.int64),
                "image_id": int(self.data.image_ids[i])}


def collate(items: Sequence[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """A batch: the items that decoded (as a list: images differ in size)."""
    return [it for it in items if it is not None]


def image_batch(images: Sequence[np.ndarray], bb: Backbone, device: torch.device) -> torch.Tensor:
    """Pad decoded images to a common size (a multiple of the stride) and normalise them, padding = 0 after
    normalisation: exactly what ``RegionModel`` feeds its backbone."""
    s = bb.stride
    H = math.ceil(max(im.shape[0] for im in images) / s) * s
    W = math.ceil(max(im.shape[1] for im in images) / s) * s
    batch = np.zeros((len(images), H, W, 3), dtype=np.uint8)
    mask = torch.zeros((len(images), 1, H, W))
    for i, im in enumerate(images):
        batch[i, : im.shape[0], : im.shape[1]] = im
        mask[i, :, : im.shape[0], : im.shape[1]] = 1
    x = normalise(torch.from_numpy(batch).to(device, non_blocking=True), bb)
    return x * mask.to(device)


# ------------------------------------------------------------------------------------------------------------ model


class CaptionLSTM(nn.Module):
    """DenseCap's language model: an LSTM fed the region code, then ``<start>`` and the words (teacher forcing),
    predicting each next word and ``<end>``.

    Args:
        in_dim: region descriptor size.
        vocab_size: words including the special tokens.
        embed_dim: word (and region code) embedding size.
        hidden_dim: LSTM hidden size.
    """

    def __init__(self, in_dim: int, vocab_size: int, embed_dim: int = 512, hidden_dim: int = 512) -> None:
        super().__init__()
        self.args = {"in_dim": int(in_dim), "vocab_size": int(vocab_size), "embed_dim": int(embed_dim),
                     "hidden_dim": int(hidden_dim)}
        self.encode_region = nn.Linear(in_dim, embed_dim)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, batch_first=True)
        self.out = nn.Linear(hidden_dim, vocab_size)

    def forward(self, desc: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets for teacher forcing.

        Args:
            desc: (n, in_dim) region descriptors.
            tokens: (n, L) word ids, ``<pad>``-padded.

        Returns:
            (logits (n, L' + 1, V), targets (n, L' + 1) with ``<end>`` after the words and ``<pad>`` after that),
            L' = the longest phrase of the batch.
        """
        lengths = (tokens != PAD).sum(1)
        L = int(lengths.max()) if tokens.numel() else 0
        tokens = tokens[:, :L]
        n = tokens.shape[0]
        start = tokens.new_full((n, 1), START)
        inputs = torch.cat([self.encode_region(desc).unsqueeze(1), self.embed(torch.cat([start, tokens], 1))], 1)
        hidden, _ = self.lstm(inputs)
        logits = self.out(hidden[:, 1:])  # the output after the region code is not a prediction
        targets = torch.cat([tokens, tokens.new_full((n, 1), PAD)], 1)
        targets[torch.arange(n, device=tokens.device), lengths] = END
        return logits, targets

    def loss(self, desc: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy per predicted token (the words and ``<end>``)."""
        logits, targets = self(desc, tokens)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=PAD)

    @torch.no_grad()
    def generate(self, desc: torch.Tensor, max_len: int = 15) -> torch.Tensor:
        """Greedy captions (n, max_len) of token ids (``<end>`` then ``<pad>`` after a finished caption)."""
        n = desc.shape[0]
        _, state = self.lstm(self.encode_region(desc).unsqueeze(1))
        word = desc.new_full((n,), START, dtype=torch.long)
        out = desc.new_full((n, max_len), PAD, dtype=torch.long)
        done = torch.zeros(n, dtype=torch.bool, device=desc.device)
        for t in range(max_len):
            h, state = self.lstm(self.embed(word).unsqueeze(1), state)
            word = self.out(h[:, 0]).argmax(-1)
            out[:, t] = torch.where(done, torch.full_like(word, PAD), word)
            done |= word == END
            if bool(done.all()):
                break
        return out


class DenseCapModel(nn.Module):
    """Backbone + RPN localization layer + recognition network + caption LSTM, with DenseCap's training losses.

    ``forward`` returns the losses (so that DistributedDataParallel sees one module). The backbone's batch norms stay
    in eval mode (small per-GPU batches); with ``freeze_backbone`` its weights get no gradient. For VGG16 the
    recognition network's fc6/fc7 are trained (fine-tuned) either way.

    Args:
        cfg: the training config.
        vocab_size: caption vocabulary size.
        backbone: a built backbone (default: built from ``cfg``).
    """

    def __init__(self, cfg: TrainConfig, vocab_size: int, backbone: Backbone | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.bb = backbone or build_backbone(cfg.backbone, random_weights=cfg.random_weights)
        self.features = self.bb.features
        self.freeze_backbone = cfg.freeze_backbone
        for p in self.features.parameters():
            p.requires_grad_(not cfg.freeze_backbone)
        self.rpn_args = {**cfg.anchors(), "mid_channels": cfg.rpn_channels}
        self.rpn = RPN(self.bb.channels, self.bb.stride, **self.rpn_args)
        self.recognition = RegionDescriber(self.bb, pool=cfg.region_pool, projection_dim=cfg.projection_dim)
        self.projection_dim = self.recognition.projection.out_features if self.recognition.projection is not None else 0
        dim = self.recognition.dim if self.recognition.dim > 0 else self.bb.channels
        self.caption = CaptionLSTM(dim, vocab_size, cfg.embed_dim, cfg.lstm_dim)
        self.sampler = BalancedPositiveNegativeSampler(cfg.rpn_batch, 0.5)

    def train(self, mode: bool = True) -> "DenseCapModel":
        super().train(mode)
        self.features.eval()  # frozen batch-norm statistics, also when fine-tuning
        return self

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's feature map (float32; computed in bfloat16 on CUDA with ``amp``); no graph when the backbone
        is frozen. The heads run in float32 (box coordinates need its precision)."""
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cfg.amp and x.device.type == "cuda")
        with amp, torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            return self.features(x).float()

    def rpn_targets(self, anchors: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchor labels (1 positive, 0 negative, -1 ignored) and matched ground-truth index per anchor.

        Positive: IoU >= pos_iou with some box, or the best anchor of a box (Faster R-CNN's low-quality matches, so
        that every box has a positive); negative: IoU < neg_iou with every box.
        """
        iou = box_iou(gt, anchors)  # (G, A)
        best, matched = iou.max(0)
        labels = torch.full_like(best, -1.0)
        labels[best < self.cfg.neg_iou] = 0.0
        labels[best >= self.cfg.pos_iou] = 1.0
        best_per_gt = iou.max(1, keepdim=True).values
        lowq = ((iou == best_per_gt) & (best_per_gt > 0)).any(0)
        labels[lowq] = 1.0
        return labels, matched

    def forward(self, x: torch.Tensor, image_sizes: Sequence[tuple[int, int]], boxes: Sequence[torch.Tensor],
                tokens: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """DenseCap's losses for a batch.

        Args:
            x: (B, 3, H, W) normalised, padded images.
            image_sizes: (height, width) of each image's valid pixels.
            boxes: per image (n_i, 4) ground-truth boxes in resized-image pixels.
            tokens: per image (n_i, L) their phrases' token ids.

        Returns:
            {"loss" (the weighted sum, with its graph), "objectness", "box", "caption" (detached)}.
        """
        fmap = self.feature_map(x)
        logits, deltas = self.rpn(fmap)
        h, w = fmap.shape[-2:]
        anchors = self.rpn.anchors(h, w, fmap.device)
        centre = (anchors[:, :2] + anchors[:, 2:]) / 2
        obj_terms, box_terms, rois, roi_tokens = [], [], [], []
        for i, (ih, iw) in enumerate(image_sizes):
            gt, tok = boxes[i], tokens[i]
            valid = (centre[:, 0] < iw) & (centre[:, 1] < ih)  # anchors centred on image content (as in propose)
            anc, lg, dl = anchors[valid], logits[i][valid], deltas[i][valid]
            labels, matched = self.rpn_targets(anc, gt)
            pos_m, neg_m = self.sampler([labels])
            pos, neg = pos_m[0].bool(), neg_m[0].bool()
            sampled = pos | neg
            obj_terms.append(F.binary_cross_entropy_with_logits(lg[sampled].float(), labels[sampled]))
            target = self.rpn.box_coder.encode_single(gt[matched[pos]], anc[pos])
            box_terms.append(F.smooth_l1_loss(dl[pos].float(), target, beta=1.0 / 9, reduction="sum")
                             / sampled.sum().clamp(min=1))
            # Captioned regions: the ground truth and the positive anchors' predicted boxes (each with the phrase of
            # its matched box), a random subset of at most caption_regions.
            with torch.no_grad():
                pred = clip_boxes_to_image(self.rpn.box_coder.decode_single(dl[pos].detach().float(), anc[pos]),
                                           (ih, iw))
            ok = ((pred[:, 2] - pred[:, 0]) >= 1) & ((pred[:, 3] - pred[:, 1]) >= 1)
            cand = torch.cat([gt, pred[ok]])
            cand_tok = torch.cat([tok, tok[matched[pos][ok]]])
            pick = torch.randperm(cand.shape[0], device=cand.device)[: self.cfg.caption_regions]
            rois.append(cand[pick])
            roi_tokens.append(cand_tok[pick])
        desc = torch.cat(self.recognition(fmap, rois))
        caption = self.caption.loss(desc, torch.cat(roi_tokens))
        objectness = torch.stack(obj_terms).mean()
        box = torch.stack(box_terms).mean()
        c = self.cfg
        loss = c.objectness_weight * objectness + c.box_weight * box + c.caption_weight * caption
        return {"loss": loss, "objectness": objectness.detach(), "box": box.detach(), "caption": caption.detach()}

    @torch.no_grad()
    def evaluate_batch(self, x: torch.Tensor, image_sizes: Sequence[tuple[int, int]], boxes: Sequence[torch.Tensor],
                       tokens: Sequence[torch.Tensor], top_k: int) -> dict[str, float]:
        """Sums over a held-out batch: caption cross-entropy on the ground-truth boxes (summed over tokens), tokens,
        ground-truth boxes recalled at IoU 0.5 by the top-K proposals, ground-truth boxes."""
        fmap = self.feature_map(x)
        desc = torch.cat(self.recognition(fmap, list(boxes)))
        logits, targets = self.caption(desc, torch.cat(list(tokens)))
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=PAD, reduction="sum")
        hits = gt_total = 0.0
        for (props, _), gt in zip(self.rpn.propose(fmap, image_sizes, top_k), boxes):
            hits += proposal_recall(props, gt, 0.5) * gt.shape[0]
            gt_total += gt.shape[0]
        return {"caption_ce": float(ce), "caption_tokens": float((targets != PAD).sum()), "recall_hits": hits,
                "gt_boxes": gt_total}


def to_device(batch: Sequence[dict[str, Any]], bb: Backbone, device: torch.device
              ) -> tuple[torch.Tensor, list[tuple[int, int]], list[torch.Tensor], list[torch.Tensor]]:
    """A collated batch as model inputs: (images, sizes, boxes, tokens)."""
    x = image_batch([b["image"] for b in batch], bb, device)
    sizes = [tuple(b["image"].shape[:2]) for b in batch]
    boxes = [torch.as_tensor(b["boxes"], device=device) for b in batch]
    tokens = [torch.as_tensor(b["tokens"], device=device) for b in batch]
    return x, sizes, boxes, tokens


# ------------------------------------------------------------------------------------------------------ checkpoints


def region_checkpoint(model: DenseCapModel, vocab: Sequence[str], metrics: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
    """The trained model in ``pipeline.model.region_model.CHECKPOINT_FORMAT`` (tensors and plain containers only, so that it loads
    with ``torch.load(weights_only=True)``), plus the caption head and its vocabulary.

    Args:
        model: the trained model (unwrapped from DDP).
        vocab: the caption vocabulary.
        metrics: last metrics to keep in the file (numbers only).
    """
    from pipeline.model.region_model import CHECKPOINT_FORMAT

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


def save_torch(obj: Any, url: str, storage_options: dict[str, Any] | None = None) -> None:
    """torch.save through fsspec (one object written whole)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    storage.write_bytes(url, buf.getvalue(), storage_options)


def load_torch(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    """torch.load(weights_only=True) through fsspec."""
    with io.BytesIO(storage.read_bytes(url, storage_options)) as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def read_state_marker(output: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The resume marker of an earlier run under ``output``, or None."""
    url = storage.join(output, STATE_MARKER)
    fs, path = storage.url_to_fs(url, storage_options)
    try:
        fs.invalidate_cache(path)
    except Exception:  # noqa: BLE001
        pass
    return storage.read_json(url, storage_options) if fs.exists(path) else None


# ------------------------------------------------------------------------------------------------------------- loop


def _all_reduce_sum(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum numbers over the data-parallel workers (identity without torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def evaluate(model: DenseCapModel, data: RegionData, cfg: TrainConfig, device: torch.device, rank: int = 0,
             world: int = 1, storage_options: dict[str, Any] | None = None, batch_size: int | None = None
             ) -> dict[str, float]:
    """Held-out metrics: caption loss (cross-entropy per token on the ground-truth boxes) and proposal recall at IoU
    0.5 of the top ``eval_top_k`` RPN proposals; each worker evaluates every world-th image, the sums are reduced.

    Returns:
        {"val_caption_loss", "val_recall", "val_images", "val_gt_boxes"}.
    """
    was_training = model.training
    model.eval()
    ds = RegionDataset(data.subset(range(rank, len(data), world)), cfg.max_side, storage_options)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size or cfg.batch_size, collate_fn=collate,
                                         num_workers=cfg.loader_workers)
    sums = {"caption_ce": 0.0, "caption_tokens": 0.0, "recall_hits": 0.0, "gt_boxes": 0.0, "images": 0.0}
    for batch in loader:
        if not batch:
            continue
        s = model.evaluate_batch(*to_device(batch, model.bb, device), top_k=cfg.eval_top_k)
        for k, v in s.items():
            sums[k] += v
        sums["images"] += len(batch)
    sums = _all_reduce_sum(sums, device)
    model.train(was_training)
    return {"val_caption_loss": sums["caption_ce"] / max(1.0, sums["caption_tokens"]),
            "val_recall": sums["recall_hits"] / max(1.0, sums["gt_boxes"]),
            "val_images": sums["images"], "val_gt_boxes": sums["gt_boxes"]}


def build_optimizer(model: DenseCapModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam over the trainable parameters; a fine-tuned backbone learns at lr / 10."""
    backbone = [p for p in model.features.parameters() if p.requires_grad]
    ids = {id(p) for p in model.features.parameters()}
    heads = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": heads, "lr": cfg.lr, "base_lr": cfg.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr / 10, "base_lr": cfg.lr / 10})
    return torch.optim.Adam(groups)


def set_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Set each group's learning rate for ``step`` (0-based) of ``total_steps``; returns the heads' rate."""
    f = 1.0 if cfg.lr_schedule == "constant" else 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * f
    return optimizer.param_groups[0]["lr"]


def _first_good(ds: RegionDataset, indices: Sequence[int]) -> list[dict[str, Any]]:
    """A one-image batch: the first of ``indices`` that decodes (for a step whose images all failed)."""
    for i in indices:
        item = ds[int(i)]
        if item is not None:
            return [item]
    raise RuntimeError("no training image of this worker could be read and decoded")


def train_worker(cfg: TrainConfig, train: RegionData, val: RegionData, vocab: Sequence[str], rank: int = 0,
                 world: int = 1, device: torch.device | None = None,
                 prepare: Callable[[nn.Module], nn.Module] | None = None,
                 report: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """The training loop of one data-parallel worker (rank 0 also writes the outputs).

    Every worker sees the same number of steps per epoch (its share of a seeded per-epoch permutation, the tail
    dropped), which DistributedDataParallel needs. A run whose state is under ``cfg.output`` resumes after its last
    finished epoch.

    Args:
        cfg: the training config.
        train, val: the training and held-out images.
        vocab: caption vocabulary.
        rank, world: this worker's rank and the number of workers.
        device: where to train (default: cuda if available, else cpu).
        prepare: wraps the model for data parallelism (ray.train.torch.prepare_model); None = as is.
        report: called with each epoch's metrics (ray.train.report); None = no-op.

    Returns:
        The metrics of every epoch (epoch 0 = before training, when ``eval_before``).
    """
    so = cfg.fs_options
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    model = DenseCapModel(cfg, len(vocab)).to(device)
    optimizer = build_optimizer(model, cfg)
    history: list[dict[str, Any]] = []
    start_epoch, step = 1, 0
    marker = read_state_marker(cfg.output, so)
    if marker is not None:
        state = load_torch(storage.join(cfg.output, STATE_FILE), so)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, history = int(state["epoch"]) + 1, int(state["step"]), json.loads(state["history"])
        log.info("resuming after epoch %d (step %d)", start_epoch - 1, step)
    torch.manual_seed(cfg.seed * 1000 + rank + 7919 * start_epoch)  # sampling differs per worker and epoch
    net = prepare(model) if prepare else model
    model.train()

    if start_epoch == 1 and cfg.eval_before:
        m = {"epoch": 0, "step": 0, **evaluate(model, val, cfg, device, rank, world, so)}
        history.append(m)
        log.info("untrained: %s", json.dumps(m))
        if rank == 0:
            storage.write_json(storage.join(cfg.output, METRICS_FILE), {"history": history}, so)
        if report:
            report(m)

    steps_per_epoch = len(train) // (world * cfg.batch_size)
    if steps_per_epoch < 1:
        raise ConfigError(f"{len(train)} training images are fewer than workers x batch size "
                          f"({world} x {cfg.batch_size})")
    trainable = [p for p in model.parameters() if p.requires_grad]
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    ds = RegionDataset(train, cfg.max_side, so)
    for epoch in range(start_epoch, cfg.epochs + 1):
        if cfg.max_steps and step >= cfg.max_steps:
            break
        perm = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))
        mine = perm[: steps_per_epoch * world * cfg.batch_size][rank::world]
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, mine.tolist()), batch_size=cfg.batch_size,
                                             collate_fn=collate, num_workers=cfg.loader_workers)
        sums = {"loss": 0.0, "objectness": 0.0, "box": 0.0, "caption": 0.0}
        n_steps = images = 0
        last_batch: list[dict[str, Any]] = []
        t_epoch = time.perf_counter()
        t_data = t_compute = 0.0
        t0 = time.perf_counter()
        for batch in loader:
            t1 = time.perf_counter()
            t_data += t1 - t0
            optimizer.zero_grad(set_to_none=True)
            lr = set_lr(optimizer, cfg, step, total_steps)
            images += len(batch)
            if batch:
                last_batch = batch
            else:  # no image of this batch decoded: repeat a good batch so that DDP's workers stay in lockstep
                batch = last_batch or _first_good(ds, mine)
            out = net(*to_device(batch, model.bb, device))
            out["loss"].backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            optimizer.step()
            step += 1
            n_steps += 1
            for k in sums:
                sums[k] += float(out[k].detach())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            t_compute += t0 - t1
            if rank == 0 and step % cfg.log_every == 0:
                log.info("epoch %d step %d: loss %.4f (objectness %.4f, box %.4f, caption %.4f), %.3f s/step, "
                         "data wait %.3f s/step", epoch, step,
                         *(float(out[k].detach()) for k in ("loss", "objectness", "box", "caption")),
                         t_compute / n_steps, t_data / n_steps)
            if cfg.max_steps and step >= cfg.max_steps:
                break
        train_s = time.perf_counter() - t_epoch
        tot = _all_reduce_sum({**sums, "steps": float(n_steps), "images": float(images)}, device)  # over all workers
        m = {"epoch": epoch, "step": step, **{f"train_{k}": tot[k] / max(1.0, tot["steps"]) for k in sums},
             "train_images": int(tot["images"]), "train_s": train_s, "step_s": t_compute / max(1, n_steps),
             "data_wait_s": t_data / max(1, n_steps), "images_per_s": tot["images"] / max(train_s, 1e-9),
             "lr": lr if n_steps else float("nan")}
        m.update(evaluate(model, val, cfg, device, rank, world, so))
        history.append(m)
        log.info("epoch %d: %s", epoch, json.dumps(m))
        if rank == 0:
            save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                        "step": step, "history": json.dumps(history)}, storage.join(cfg.output, STATE_FILE), so)
            storage.write_json(storage.join(cfg.output, STATE_MARKER),
                               {"epoch": epoch, "step": step, "config": resume_key(cfg), "vocab": list(vocab)}, so)
            storage.write_json(storage.join(cfg.output, METRICS_FILE), {"history": history}, so)
        if report:
            report(m)
    if rank == 0:
        last = history[-1] if history else {}
        save_torch(region_checkpoint(model, vocab, last), storage.join(cfg.output, MODEL_FILE), so)
        log.info("wrote %s", storage.join(cfg.output, MODEL_FILE))
    return history


def prepare_data(cfg: TrainConfig) -> tuple[RegionData, RegionData, list[str], dict[str, Any]]:
    """Check the output (a resumed run must have the same config), then load and split the data (on the driver).

    Raises:
        ConfigError: the output holds a run with another config.
        storage.StorageError: unreadable data or unwritable output.
    """
    so = cfg.fs_options
    listing.check_readable(data_urls(cfg.data)[0], so)
    storage.check_writable(cfg.output, so)
    marker = read_state_marker(cfg.output, so)
    if marker is not None and marker.get("config") != resume_key(cfg):
        changed = sorted(k for k in resume_key(cfg) if marker.get("config", {}).get(k) != resume_key(cfg)[k])
        raise ConfigError(f"{cfg.output} holds a training run with another config (differs in {changed}); "
                          "use a new --output")
    train, val, vocab, stats = load_region_data(cfg, so, vocab=marker["vocab"] if marker else None)
    if len(train) < cfg.workers * cfg.batch_size:
        raise ConfigError(f"{len(train)} training images are fewer than workers x batch size "
                          f"({cfg.workers} x {cfg.batch_size})")
    if marker is not None:
        stats["resume_after_epoch"] = marker["epoch"]
    log.info("data: %s", json.dumps(stats))
    storage.write_json(storage.join(cfg.output, "train_config.json"), {"config": public_dict(cfg), "data": stats}, so)
    return train, val, vocab, stats


def fit_local(cfg: TrainConfig, device: str | None = None) -> dict[str, Any]:
    """Train in this process, without Ray (one worker; the reference the Ray job is compared against).

    Returns:
        {"output", "checkpoint", "data" statistics, "history"}.
    """
    train, val, vocab, stats = prepare_data(cfg)
    history = train_worker(cfg, train, val, vocab, device=torch.device(device) if device else None)
    return {"output": cfg.output, "checkpoint": storage.join(cfg.output, MODEL_FILE), "data": stats,
            "history": history}


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point: fetch the shared data from the object store and run ``train_worker``."""
    import ray
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg: TrainConfig = loop_config["config"]
    train, val, vocab = ray.get(loop_config["data"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(loop_config["cpus"]) - cfg.loader_workers))
    train_worker(cfg, train, val, vocab, rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=device,
                 prepare=ray.train.torch.prepare_model, report=lambda m: ray.train.report(m))


def fit(cfg: TrainConfig, prepared: tuple[RegionData, RegionData, list[str], dict[str, Any]] | None = None
        ) -> dict[str, Any]:
    """Train on the connected Ray cluster with Ray Train's TorchTrainer (``pipeline.extract.ray_runner.init_ray`` first):
    ``cfg.workers`` data-parallel workers, one GPU each with ``use_gpu``; the data is parsed once on the driver and
    shared through the object store.

    Args:
        cfg: the training config.
        prepared: what ``prepare_data(cfg)`` returned, when the caller ran it already (before starting Ray).

    Returns:
        {"output", "checkpoint", "data" statistics, "history"}.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train, val, vocab, stats = prepared or prepare_data(cfg)
    if cfg.use_gpu and ray.cluster_resources().get("GPU", 0) < cfg.workers:
        log.warning("--use-gpu with %d workers, but the cluster has %s GPUs now: workers wait for GPUs "
                    "(an autoscaling cluster may add them)", cfg.workers, ray.cluster_resources().get("GPU", 0))
    cpus = cfg.cpus_per_worker or float(1 + cfg.loader_workers)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg, "data": ray.put((train, val, vocab)), "cpus": cpus},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=f"train_regions-{int(time.time())}", storage_path=cfg.ray_storage or None,
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    trainer.fit()
    so = cfg.fs_options
    history = storage.read_json(storage.join(cfg.output, METRICS_FILE), so)["history"]
    return {"output": cfg.output, "checkpoint": storage.join(cfg.output, MODEL_FILE), "data": stats,
            "history": history}


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """What the job prints: where the checkpoint is, held-out metrics before and after, throughput."""
    hist = result["history"]
    first = next((h for h in hist if h["epoch"] == 0), None)
    last = hist[-1] if hist else {}
    keep = ("epoch", "step", "train_loss", "train_objectness", "train_box", "train_caption", "val_caption_loss",
            "val_recall", "images_per_s", "step_s")
    return {"checkpoint": result["checkpoint"], "data": result["data"],
            "untrained": {k: first[k] for k in ("val_caption_loss", "val_recall")} if first else None,
            "final": {k: last[k] for k in keep if k in last}}


def replace(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    """A validated copy of a config with some fields changed."""
    new = dataclasses.replace(cfg, **changes)
    new.validate()
    return new

