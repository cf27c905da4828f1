"""The training loop of one data-parallel worker: optimizer, learning rate, held-out evaluation, resume state."""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.densecap.checkpoint import region_checkpoint, save_checkpoint
from pipeline.densecap.config import METRICS_FILE, MODEL_FILE, STATE_FILE, STATE_MARKER, TrainConfig, resume_key
from pipeline.densecap.data import RegionData, RegionDataset, collate, to_device
from pipeline.densecap.model import DenseCapModel
from pipeline.io import storage

log = logging.getLogger(__name__)


def read_state_marker(output: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The resume marker of an earlier run under ``output``, or None."""
    url = storage.join(output, STATE_MARKER)
    fs, path = storage.url_to_fs(url, storage_options)
    storage.fresh(fs, path)  # a marker written by another process (a Ray Train worker) must be seen
    return storage.read_json(url, storage_options) if fs.exists(path) else None


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
        state = storage.read_torch(storage.join(cfg.output, STATE_FILE), so)
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
            storage.write_torch(storage.join(cfg.output, STATE_FILE), {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step,
                "history": json.dumps(history)}, so)
            storage.write_json(storage.join(cfg.output, STATE_MARKER),
                               {"epoch": epoch, "step": step, "config": resume_key(cfg), "vocab": list(vocab)}, so)
            storage.write_json(storage.join(cfg.output, METRICS_FILE), {"history": history}, so)
        if report:
            report(m)
    if rank == 0:
        last = history[-1] if history else {}
        save_checkpoint(storage.join(cfg.output, MODEL_FILE), region_checkpoint(model, vocab, last), so)
        log.info("wrote %s", storage.join(cfg.output, MODEL_FILE))
    return history
