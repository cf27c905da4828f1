"""Visual Genome region descriptions as training data: parsing, image files, split, Dataset, model inputs."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.config import ConfigError
from pipeline.densecap.config import TrainConfig
from pipeline.densecap.vocab import PAD, UNK, build_vocab, encode, tokenize
from pipeline.io import images as imgs
from pipeline.io import listing, storage
from pipeline.model.backbones import Backbone
from pipeline.model.transform import batch_images

log = logging.getLogger(__name__)

ANNOTATIONS = "region_descriptions.json"


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


def to_device(batch: Sequence[dict[str, Any]], bb: Backbone, device: torch.device
              ) -> tuple[torch.Tensor, list[tuple[int, int]], list[torch.Tensor], list[torch.Tensor]]:
    """A collated batch as model inputs: (normalised padded images, each image's (height, width), its boxes, its
    phrases' tokens), the images batched exactly as the region model batches them."""
    x, sizes = batch_images([b["image"] for b in batch], bb, device)
    boxes = [torch.as_tensor(b["boxes"], device=device) for b in batch]
    tokens = [torch.as_tensor(b["tokens"], device=device) for b in batch]
    return x, sizes, boxes, tokens
