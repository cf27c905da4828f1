"""Extraction: plan shards, decode a shard, run the model over it, write its tables; and the thin Ray layer around it."""

from __future__ import annotations

import logging
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from pipeline.config import ConfigError, ExtractConfig, ModelConfig, config_hash, public_dict
from pipeline.io import images as imgs
from pipeline.io import listing, storage
from pipeline.schema import GLOBAL_KINDS, images_schema, regions_schema, to_table
from pipeline.store import feature_store as fstore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """The unit of work, failure and retry: a fixed list of images with a stable name."""

    shard_id: str
    generation: int
    records: tuple[listing.ImageRecord, ...]


@dataclass
class DecodedShard:
    """A shard's images decoded and resized on a CPU worker (what travels to the model actor)."""

    shard: Shard
    decoded: list[imgs.Decoded]
    read_s: float


@dataclass(frozen=True)
class Plan:
    """What a run will do: shards to process, ids to delete, and what is already done."""

    generation: int
    shards: list[Shard]
    deleted: list[str]
    skipped: int
    markers: list[dict[str, Any]]


def plan_shards(records: Sequence[listing.ImageRecord], markers: Sequence[dict[str, Any]], shard_size: int) -> Plan:
    """Plan a run: every listed image whose id and fingerprint are not already live in a done shard is pending;
    pending images are cut into shards of a new generation; live images no longer listed are deleted.

    Rerunning after a crash therefore redoes only unfinished shards' images, and rerunning after images were added
    or changed processes only those.

    Args:
        records: the listed input, sorted by image_id.
        markers: done-markers already under the output.
        shard_size: images per shard.

    Returns:
        The plan.
    """
    live = fstore.live_images(markers)
    pending = [r for r in records if live.get(r.image_id, ("", None))[1] != r.fingerprint]
    listed = {r.image_id for r in records}
    deleted = sorted(set(live) - listed)
    gen = fstore.next_generation(markers)
    shards = [Shard(fstore.shard_id(gen, i // shard_size), gen, tuple(pending[i:i + shard_size]))
              for i in range(0, len(pending), shard_size)]
    return Plan(gen, shards, deleted, len(records) - len(pending), list(markers))


def decode_shard(shard: Shard, max_side: int, max_pixels: int, storage_options: dict[str, Any] | None = None,
                 io_threads: int = 8) -> DecodedShard:
    """Fetch and decode a shard's images (on a CPU worker). Never raises for bad input: each failure is a value.

    Args:
        shard: the shard.
        max_side: longer side after resizing.
        max_pixels: decompression-bomb limit.
        storage_options: fsspec options.
        io_threads: concurrent fetches (object stores have high latency per request).

    Returns:
        The decoded shard, in the shard's record order.
    """
    t0 = time.perf_counter()

    def one(rec: listing.ImageRecord) -> imgs.Decoded:
        try:
            data = storage.read_bytes(rec.uri, storage_options)
        except Exception as e:  # noqa: BLE001 - any fetch failure becomes a retryable error row
            return imgs.failed(imgs.READ_ERROR, f"{type(e).__name__}: {e}")
        return imgs.decode_image(data, max_side=max_side, max_pixels=max_pixels)

    with ThreadPoolExecutor(max_workers=io_threads) as pool:
        decoded = list(pool.map(one, shard.records))
    return DecodedShard(shard, decoded, time.perf_counter() - t0)


def run_model_on_shard(model: Any, dshard: DecodedShard, batch_size: int, float16: bool = False
                       ) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """Run the model over a decoded shard and build its two tables (pure: no I/O).

    Images are batched in order of size so that padding within a batch stays small.

    Args:
        model: a RegionModel (or anything with its call signature, ``dims``, ``region_dim``, ``name``, ``config_hash``).
        dshard: the decoded shard.
        batch_size: images per forward pass.
        float16: store vectors as float16.

    Returns:
        (images table, regions table, stats with counts and timings).
    """
    recs, dec = dshard.shard.records, dshard.decoded
    ok_idx = [i for i, d in enumerate(dec) if d.ok]
    ok_idx.sort(key=lambda i: (dec[i].array.shape[0], dec[i].array.shape[1]))  # type: ignore[union-attr]
    outputs: dict[int, dict[str, np.ndarray]] = {}
    t0 = time.perf_counter()
    for b in range(0, len(ok_idx), batch_size):
        idx = ok_idx[b:b + batch_size]
        res = model([dec[i].array for i in idx], [(dec[i].width, dec[i].height) for i in idx])
        outputs.update(zip(idx, res))
    infer_s = time.perf_counter() - t0

    dims = model.dims
    cols: dict[str, list] = {k: [] for k in ("image_id", "uri", "fingerprint", "width", "height", "status", "error",
                                             "n_regions", "model", "config_hash")}
    vec: dict[str, list] = {k: [] for k in (*GLOBAL_KINDS, "local")}
    reg: dict[str, list] = {k: [] for k in ("image_id", "rank", "box", "score", "descriptor")}
    for i, (r, d) in enumerate(zip(recs, dec)):
        o = outputs.get(i)
        cols["image_id"].append(r.image_id)
        cols["uri"].append(r.uri)
        cols["fingerprint"].append(r.fingerprint)
        cols["width"].append(d.width or None)
        cols["height"].append(d.height or None)
        cols["status"].append(d.status)
        cols["error"].append(d.error or None)
        cols["n_regions"].append(0 if o is None else int(o["regions"].shape[0]))
        cols["model"].append(model.name)
        cols["config_hash"].append(model.config_hash)
        for k in vec:
            vec[k].append(None if o is None else o[k])
        if o is not None:
            n = o["regions"].shape[0]
            reg["image_id"].extend([r.image_id] * n)
            reg["rank"].extend(range(n))
            reg["box"].append(o["boxes"].reshape(-1, 4))
            reg["score"].extend(o["scores"].tolist())
            reg["descriptor"].append(o["regions"])
    images_table = to_table({**cols, **vec}, images_schema(dims, float16))
    rdim = model.region_dim
    reg["box"] = np.concatenate(reg["box"]) if reg["box"] else np.zeros((0, 4), np.float32)
    reg["descriptor"] = np.concatenate(reg["descriptor"]) if reg["descriptor"] else np.zeros((0, rdim), np.float32)
    regions_table = to_table(reg, regions_schema(rdim, float16))
    statuses: dict[str, int] = {}
    for d in dec:
        statuses[d.status] = statuses.get(d.status, 0) + 1
    stats = {"images": len(recs), "ok": len(ok_idx), "statuses": statuses, "regions": regions_table.num_rows,
             "read_s": dshard.read_s, "infer_s": infer_s}
    return images_table, regions_table, stats


def write_shard(output: str, shard: Shard, images_table: pa.Table, regions_table: pa.Table, stats: dict[str, Any],
                storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a shard's data, then its done-marker last (a shard without a marker is not done and is redone).

    Args:
        output: extraction output URL.
        shard: the shard.
        images_table, regions_table: its tables.
        stats: counts and timings to keep in the marker.
        storage_options: fsspec options.

    Returns:
        The marker written.
    """
    t0 = time.perf_counter()
    paths = fstore.shard_paths(output, shard.shard_id)
    storage.write_parquet(paths["images"], images_table, storage_options)
    storage.write_parquet(paths["regions"], regions_table, storage_options)
    retry = [r.image_id for r, s in zip(shard.records, images_table.column("status").to_pylist()) if s == imgs.READ_ERROR]
    write_s = time.perf_counter() - t0
    marker = {"shard": shard.shard_id, "generation": shard.generation, "kind": "data",
              "images": [[r.image_id, r.fingerprint] for r in shard.records], "retry": retry,
              "stats": {**stats, "write_s": write_s}, "finished": fstore.now()}
    storage.write_json(paths["done"], marker, storage_options)
    return marker


class ShardWorker:
    """Builds the model on the worker that runs it and turns decoded shards into written shards.

    This is the class Ray runs as an actor (constructor kwargs only: nothing heavy is pickled from the driver), and
    it is usable in-process without Ray.

    Args:
        model_config: the model config.
        output: extraction output URL.
        batch_size: images per forward pass.
        float16: store vectors as float16.
        threads: torch CPU threads (0 = all cores of this machine; run_ray passes its own choice, see
            pipeline.extract.ray_runner.actor_threads).
        storage_options: fsspec options.
    """

    def __init__(self, model_config: ModelConfig, output: str, batch_size: int, float16: bool = False,
                 threads: int = 0, storage_options: dict[str, Any] | None = None) -> None:
        from pipeline.model.region_model import RegionModel

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.model = RegionModel(model_config, threads=threads or (os.cpu_count() or 1), storage_options=storage_options)
        self.output = output
        self.batch_size = batch_size
        self.float16 = float16
        self.storage_options = storage_options

    def run(self, dshard: DecodedShard) -> dict[str, Any]:
        """Process one decoded shard end to end; returns its marker (with per-stage timings)."""
        itab, rtab, stats = run_model_on_shard(self.model, dshard, self.batch_size, self.float16)
        marker = write_shard(self.output, dshard.shard, itab, rtab, stats, self.storage_options)
        s = marker["stats"]
        log.info("shard %s: %d images (%d ok), read %.2fs infer %.2fs write %.2fs", dshard.shard.shard_id,
                 s["images"], s["ok"], s["read_s"], s["infer_s"], s["write_s"])
        return marker


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


def preflight(cfg: ExtractConfig, storage_options: dict[str, Any]) -> None:
    """Cheap checks before anything starts (no listing, no Ray): the input exists and the output is writable.

    Raises:
        storage.StorageError: with a clear message.
    """
    listing.check_readable(cfg.input, storage_options)
    storage.check_writable(cfg.output, storage_options)


def run_local(cfg: ExtractConfig) -> dict[str, Any]:
    """Run an extraction in this process without Ray (the reference the Ray job is compared against).

    Args:
        cfg: the extraction config.

    Returns:
        The run summary (also written as the manifest).
    """
    so = cfg.fs_options
    t0 = time.perf_counter()
    records = listing.list_images(cfg.input, so)  # fails fast on an unreachable input, before the output is touched
    markers = prepare_output(cfg, so)
    plan = plan_shards(records, markers, cfg.shard_size)
    worker = ShardWorker(cfg.model_config(), cfg.output, cfg.batch_size, cfg.float16, cfg.threads, so)
    done = [worker.run(decode_shard(s, cfg.max_side, cfg.max_pixels, so)) for s in plan.shards]
    return finish(cfg, plan, done, time.perf_counter() - t0, so)


def finish(cfg: ExtractConfig, plan: Plan, done: list[dict[str, Any]], elapsed: float,
           storage_options: dict[str, Any]) -> dict[str, Any]:
    """Record deletions, then write the run manifest last.

    Returns:
        The manifest.
    """
    if plan.deleted:
        sid = f"g{plan.generation:05d}-deleted"
        storage.write_json(storage.join(cfg.output, fstore.DONE_DIR, f"{sid}.json"),
                           {"shard": sid, "generation": plan.generation, "kind": "deleted", "images": plan.deleted},
                           storage_options)
    summary = summarise(done, elapsed)
    summary.update({"skipped_already_done": plan.skipped, "deleted": len(plan.deleted), "planned_shards": len(plan.shards)})
    live = fstore.live_images(fstore.read_done_markers(cfg.output, storage_options))
    manifest = {"config": public_dict(cfg), "model_hash": config_hash(cfg.model_config()), "generation": plan.generation,
                "run": summary, "live_images": len(live), "versions": versions(),
                "finished": fstore.now()}
    storage.write_json(storage.join(cfg.output, fstore.MANIFEST), manifest, storage_options)
    return manifest
