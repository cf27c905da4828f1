"""The one extraction driver: check, list, prepare the output, plan, hand the shards to a runner, write the manifest."""

from __future__ import annotations

import logging
import platform
import sys
import time
from typing import TYPE_CHECKING, Any, Sequence, TextIO

from pipeline.config import ConfigError, ExtractConfig, config_hash, public_dict
from pipeline.extract.plan import Plan, plan_shards
from pipeline.io import images as imgs
from pipeline.io import listing, storage
from pipeline.store import feature_store as fstore

if TYPE_CHECKING:
    from pipeline.extract.runners import Runner

log = logging.getLogger(__name__)


class EmptyInput(storage.StorageError):
    """The input lists no images (refused unless ``--allow-empty``)."""


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
        storage.StorageError: unreachable input or unwritable output; ``EmptyInput``: the input lists no images
            (unless ``cfg.allow_empty``); ``fstore.LeaseHeld``: another extraction is writing the output.
        ConfigError: the output holds features of another model config.
    """
    so = cfg.fs_options
    preflight(cfg, so)
    t0 = time.perf_counter()
    runner.start(cfg)  # models load (Ray actors start and warm up) while the input is listed and planned
    try:
        return _run(cfg, runner, so, t0, progress_every_s)
    finally:
        runner.close()


def _run(cfg: ExtractConfig, runner: Runner, so: dict[str, Any], t0: float, progress_every_s: float
         ) -> dict[str, Any]:
    """``run`` once the runner is starting: list, plan, process, finish (see ``run``)."""
    records = listing.list_images(cfg.input, so)  # fails fast on an unreachable input, before the output is touched
    if not records and not cfg.allow_empty:
        raise EmptyInput(f"input {cfg.input} lists no images (files ending in {', '.join(listing.IMAGE_EXTS)}); "
                         f"nothing was written. An empty run would record every image already under {cfg.output} "
                         f"as deleted: pass --allow-empty if that is what you want")
    lease = fstore.acquire_lease(cfg.output, so)  # before anything is written: one extraction per output
    progress: Progress | None = None  # renews the lease while the runner works
    try:
        markers = prepare_output(cfg, so)
        plan = plan_shards(records, markers, cfg.shard_size, so)
        log.info("input %s: %d images listed, %d already done, %d to process in %d shards, %d to delete",
                 cfg.input, len(records), plan.skipped, plan.images, len(plan.shards), len(plan.deleted))
        progress = Progress(plan, t0, progress_every_s, lease, so)
        # Nothing to process: no shard work (a runner's started actors are stopped by ``close``).
        done = runner.run(cfg, plan.shards, progress) if plan.shards else []
        progress.renew()  # a long last shard may have used up half the lease: deletions and manifest still to write
        manifest = finish(cfg, plan, done, time.perf_counter() - t0, so)
    except BaseException:
        # Also when the run fails, so a rerun need not wait for the lease to expire (only a killed run leaves one);
        # but a failure to release must not hide why the run failed.
        try:
            fstore.release_lease(progress.lease if progress else lease, so)
        except Exception as e:  # noqa: BLE001
            log.warning("could not release the lease on %s (it expires by itself): %s", cfg.output, e)
        raise
    fstore.release_lease(progress.lease, so)
    return manifest


class Progress:
    """A run's progress, image by image: a bar on a terminal (redrawn about once a second) and log lines (one per
    ``every_s`` seconds and one at the end) with images done, images/s, ETA, shards and errors.

    Runners count images as their batches finish (``add``, or set ``counted``) and call the object at least every
    ``tick_s`` seconds while they wait on their work. It also keeps the run's lease on the output: the lease is
    renewed once half its time has passed.

    Args:
        plan: the run's plan.
        t0: ``time.perf_counter()`` when the run started.
        every_s: seconds between log lines.
        lease: the run's lease on the output.
        storage_options: fsspec options.
        stream: where the bar goes (default stderr); no bar unless it is a terminal.
    """

    def __init__(self, plan: Plan, t0: float, every_s: float, lease: fstore.Lease,
                 storage_options: dict[str, Any] | None = None, stream: TextIO | None = None) -> None:
        self.shards = len(plan.shards)
        self.images = plan.images
        self.t0 = t0
        self.every_s = every_s
        self.last = time.perf_counter()
        self.drawn = float("-inf")  # the first call draws the bar
        self.lease = lease
        self.storage_options = storage_options
        self.stream = stream if stream is not None else sys.stderr
        self.bar = self.stream.isatty()
        self.tick_s = min(1.0, every_s) if self.bar else every_s
        # Images the workers reported batch by batch. A shard retried after its worker died counts twice, so the
        # figure shown is clamped to the plan, and never below what the finished shards' markers say.
        self.counted = 0

    def add(self, n: int) -> None:
        """Count ``n`` more finished images."""
        self.counted += n

    def renew(self) -> None:
        """Renew the lease when half its time has passed.

        Raises:
            fstore.LeaseLost: another run took the output over; this one must stop writing.
        """
        if fstore.now() >= self.lease.renew_at:
            self.lease = fstore.renew_lease(self.lease, self.storage_options)

    def __call__(self, done: Sequence[dict[str, Any]], final: bool = False) -> None:
        """Renew the lease when due; redraw the bar about once a second; log a line when ``every_s`` has passed since
        the last one, or when ``final``."""
        self.renew()
        now = time.perf_counter()
        line = not final and now - self.last < self.every_s
        if not self.bar and line:
            return
        s = summarise(done, now - self.t0)
        n = min(self.images, max(self.counted, s["images"]))
        rate = n / (now - self.t0) if now > self.t0 else 0.0
        eta = _duration((self.images - n) / rate) if rate > 0 else "?"
        if self.bar and (final or now - self.drawn >= self.tick_s):
            width = 30
            fill = int(width * n / self.images) if self.images else width
            self.stream.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {n}/{self.images} images, {rate:.1f}/s, "
                              f"ETA {eta}, {s['errors']} errors" + ("\n" if final else ""))
            self.stream.flush()
            self.drawn = now
        if line:
            return
        if self.bar and not final:
            self.stream.write("\r\033[K")  # the log line takes the bar's place; the next tick draws it again
            self.drawn = float("-inf")
        log.info("progress: %d/%d images, %.1f images/s, ETA %s, %d/%d shards, %d errors", n, self.images, rate, eta,
                 len(done), self.shards, s["errors"])
        self.last = now


def _duration(seconds: float) -> str:
    """Seconds as h:mm:ss."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def preflight(cfg: ExtractConfig, storage_options: dict[str, Any]) -> None:
    """Cheap checks before anything starts (no listing, no Ray): the input exists and the output is writable.

    Raises:
        storage.StorageError: with a clear message.
    """
    listing.check_readable(cfg.input, storage_options)
    storage.check_writable(cfg.output, storage_options)


def prepare_output(cfg: ExtractConfig, storage_options: dict[str, Any]) -> list[dict[str, Any]]:
    """Check the output is writable and compatible with this config, write ``config.json``, clean a crashed run's
    orphan files, and return the done-markers already there. Call it holding the output's lease (``run`` does): the
    orphans of a crashed run look exactly like the shards of a run still writing.

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
    # Per stage: read_s is the decode task's wall time (fetch + decode); fetch_s and decode_s split it (summed over
    # its threads); infer_s and write_s are the model actor's.
    timing = {"read_s": 0.0, "fetch_s": 0.0, "decode_s": 0.0, "infer_s": 0.0, "write_s": 0.0}
    gpu_sum = gpu_n = 0.0
    for m in markers:
        s = m["stats"]
        images += s["images"]
        regions += s["regions"]
        for k, v in s["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
        for k in timing:
            timing[k] += s.get(k, 0.0)
        if s.get("gpu_util_mean") is not None:  # weighted by the shard's samples (its inference time)
            gpu_sum += s["gpu_util_mean"] * s["gpu_util_samples"]
            gpu_n += s["gpu_util_samples"]
    ok = statuses.get(imgs.OK, 0)
    out = {"shards": len(markers), "images": images, "ok": ok, "errors": images - ok, "statuses": statuses,
           "regions": regions, "elapsed_s": round(elapsed, 3),
           "images_per_s": round(images / elapsed, 3) if elapsed > 0 else None,
           "stage_seconds_summed": {k: round(v, 3) for k, v in timing.items()}}
    if gpu_n:
        out["gpu_util_mean_during_infer"] = round(gpu_sum / gpu_n, 1)
    return out


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
    live = fstore.count_live(cfg.output, storage_options)  # shard by shard: no structure over every id
    manifest = {"config": public_dict(cfg), "model_hash": config_hash(cfg.model_config()),
                "generation": plan.generation, "run": summary, "live_images": live, "versions": versions(),
                "finished": fstore.now()}
    storage.write_json(storage.join(cfg.output, fstore.MANIFEST), manifest, storage_options)
    return manifest
