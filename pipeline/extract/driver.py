"""The one extraction driver: check, list, prepare the output, plan, hand the shards to a runner, write the manifest."""

from __future__ import annotations

import logging
import platform
import time
from typing import TYPE_CHECKING, Any, Sequence

from pipeline.config import ConfigError, ExtractConfig, config_hash, public_dict
from pipeline.extract.plan import Plan, plan_shards
from pipeline.io import images as imgs
from pipeline.io import listing, storage
from pipeline.store import feature_store as fstore

if TYPE_CHECKING:
    from pipeline.extract.runners import Runner

log = logging.getLogger(__name__)


def run(cfg: ExtractConfig, runner: Runner, progress_every_s: float = 10.0) -> dict[str, Any]:
    """Run an extraction: the same steps whichever runner processes the shards.

    Input and output are checked before any work starts (and before a runner starts anything); the plan skips
    images already done; the runner turns the plan's shards into done-markers; deletions are recorded and the run
    manifest is written last.

    Args:
        cfg: the extraction config.
        runner: what processes the shards (``LocalRunner`` in this process, ``RayRunner`` on a Ray cluster).
        progress_every_s: seconds between progress lines.

    Returns:
        The run manifest.

    Raises:
        storage.StorageError: unreachable input or unwritable output.
        ConfigError: the output holds features of another model config.
    """
    so = cfg.fs_options
    preflight(cfg, so)
    t0 = time.perf_counter()
    records = listing.list_images(cfg.input, so)  # fails fast on an unreachable input, before the output is touched
    markers = prepare_output(cfg, so)
    plan = plan_shards(records, markers, cfg.shard_size)
    log.info("input %s: %d images listed, %d already done, %d to process in %d shards, %d to delete",
             cfg.input, len(records), plan.skipped, plan.images, len(plan.shards), len(plan.deleted))
    # Nothing to process: no runner work at all (no model is built, no actor started).
    done = runner.run(cfg, plan.shards, Progress(plan, t0, progress_every_s)) if plan.shards else []
    return finish(cfg, plan, done, time.perf_counter() - t0, so)


class Progress:
    """Progress lines of a run (shards and images done, throughput, errors): at most one per ``every_s`` seconds,
    and one when the last shard is done.

    Args:
        plan: the run's plan.
        t0: ``time.perf_counter()`` when the run started.
        every_s: seconds between lines (a runner may also wait on its work for this long at most).
    """

    def __init__(self, plan: Plan, t0: float, every_s: float) -> None:
        self.shards = len(plan.shards)
        self.images = plan.images
        self.t0 = t0
        self.every_s = every_s
        self.last = time.perf_counter()

    def __call__(self, done: Sequence[dict[str, Any]], final: bool = False) -> None:
        """Log a line when ``every_s`` has passed since the last one, or when ``final``."""
        if not final and time.perf_counter() - self.last < self.every_s:
            return
        s = summarise(done, time.perf_counter() - self.t0)
        log.info("progress: %d/%d shards, %d/%d images, %.1f images/s, %d errors", len(done), self.shards,
                 s["images"], self.images, s["images_per_s"] or 0.0, s["errors"])
        self.last = time.perf_counter()


def preflight(cfg: ExtractConfig, storage_options: dict[str, Any]) -> None:
    """Cheap checks before anything starts (no listing, no Ray): the input exists and the output is writable.

    Raises:
        storage.StorageError: with a clear message.
    """
    listing.check_readable(cfg.input, storage_options)
    storage.check_writable(cfg.output, storage_options)


def prepare_output(cfg: ExtractConfig, storage_options: dict[str, Any]) -> list[dict[str, Any]]:
    """Check the output is writable and compatible with this config, write ``config.json``, clean a crashed run's
    orphan files, and return the done-markers already there.

    Raises:
        storage.StorageError: unreachable or unwritable output.
        ConfigError: (a ValueError) the output holds features of another model config.
    """
    storage.check_writable(cfg.output, storage_options)
    model_hash = config_hash(cfg.model_config())
    cfg_url = storage.join(cfg.output, fstore.CONFIG)
    fs, path = storage.url_to_fs(cfg_url, storage_options)
    fs.invalidate_cache(path)  # s3fs listings cached in this process may predate another run's files
    if fs.exists(path):
        prev = storage.read_json(cfg_url, storage_options)
        if prev.get("model_hash") != model_hash:
            raise ConfigError(f"{cfg.output} holds features of another model config ({prev.get('model_hash')} != "
                              f"{model_hash}: {prev.get('model')}); write to a new --output")
    storage.write_json(cfg_url, {"config": public_dict(cfg), "model": public_dict(cfg.model_config()),
                                 "model_hash": model_hash}, storage_options)
    markers = fstore.read_done_markers(cfg.output, storage_options)
    removed = fstore.remove_orphans(cfg.output, markers, storage_options)
    if removed:
        log.info("removed %d data files of shards that never finished", removed)
    return markers


def summarise(markers: Sequence[dict[str, Any]], elapsed: float) -> dict[str, Any]:
    """Counts and throughput of the shards a run finished."""
    statuses: dict[str, int] = {}
    images = regions = 0
    timing = {"read_s": 0.0, "infer_s": 0.0, "write_s": 0.0}
    for m in markers:
        s = m["stats"]
        images += s["images"]
        regions += s["regions"]
        for k, v in s["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
        for k in timing:
            timing[k] += s.get(k, 0.0)
    ok = statuses.get(imgs.OK, 0)
    return {"shards": len(markers), "images": images, "ok": ok, "errors": images - ok, "statuses": statuses,
            "regions": regions, "elapsed_s": round(elapsed, 3),
            "images_per_s": round(images / elapsed, 3) if elapsed > 0 else None,
            "stage_seconds_summed": {k: round(v, 3) for k, v in timing.items()}}


def versions() -> dict[str, str]:
    """Versions of what produced an output (written into manifests), from the installed packages' metadata: the
    driver never imports torch just to name its version (that import alone took 5-15 s per run)."""
    import importlib.metadata

    v = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "pyarrow", "numpy", "fsspec", "ray"):
        try:
            v[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return v


def finish(cfg: ExtractConfig, plan: Plan, done: list[dict[str, Any]], elapsed: float,
           storage_options: dict[str, Any]) -> dict[str, Any]:
    """Record deletions, then write the run manifest last.

    Returns:
        The manifest.
    """
    if plan.deleted:
        fstore.write_deletions(cfg.output, plan.generation, plan.deleted, storage_options)
    summary = summarise(done, elapsed)
    summary.update({"skipped_already_done": plan.skipped, "deleted": len(plan.deleted),
                    "planned_shards": len(plan.shards)})
    live = fstore.live_images(fstore.read_done_markers(cfg.output, storage_options))
    manifest = {"config": public_dict(cfg), "model_hash": config_hash(cfg.model_config()),
                "generation": plan.generation, "run": summary, "live_images": len(live), "versions": versions(),
                "finished": fstore.now()}
    storage.write_json(storage.join(cfg.output, fstore.MANIFEST), manifest, storage_options)
    return manifest
