"""Running the training: data prepared on the driver, in-process (fit_local) or on Ray Train (fit), summary."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch

from pipeline.config import ConfigError, public_dict
from pipeline.densecap.config import METRICS_FILE, MODEL_FILE, TrainConfig, resume_key
from pipeline.densecap.data import RegionData, data_urls, load_region_data
from pipeline.densecap.loop import read_state_marker, train_worker
from pipeline.io import listing, storage

log = logging.getLogger(__name__)


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
    """Train on the connected Ray cluster with Ray Train's TorchTrainer (``pipeline.extract.runners.init_ray`` first):
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
