"""The per-shard work of an extraction: decode a shard, run the model over it, write its tables and done-marker."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from pipeline.config import ModelConfig
from pipeline.extract.plan import DecodedShard, Shard
from pipeline.io import images as imgs
from pipeline.io import listing, storage
from pipeline.schema import GLOBAL_KINDS, images_schema, regions_schema, to_table
from pipeline.store import feature_store as fstore

log = logging.getLogger(__name__)


def decode_shard(shard: Shard, max_side: int, max_pixels: int, storage_options: dict[str, Any] | None = None,
                 io_threads: int = 8, max_image_bytes: int | None = None) -> DecodedShard:
    """Fetch and decode a shard's images (on a CPU worker). Never raises for bad input: each failure is a value.

    Only a failed fetch is a ``read_error`` (transient: the next run redoes it). A file over ``max_image_bytes``,
    a path that is not a regular file and a record the listing already found broken stay failed until the input
    changes: retrying them would fail the same way on every run.

    Args:
        shard: the shard.
        max_side: longer side after resizing.
        max_pixels: decompression-bomb limit.
        storage_options: fsspec options.
        io_threads: concurrent fetches (object stores have high latency per request).
        max_image_bytes: files with more bytes are refused after reading at most one byte more (``too_large``);
            None: no limit (callers that read untrusted input pass one: ``ExtractConfig.max_image_bytes``).

    Returns:
        The decoded shard, in the shard's record order.
    """
    t0 = time.perf_counter()
    spent = [0.0, 0.0]  # fetch, decode seconds summed over threads (float += under the GIL is atomic enough here)

    def one(rec: listing.ImageRecord) -> imgs.Decoded:
        if rec.error:
            return imgs.failed(imgs.BAD_RECORD, rec.error)
        t = time.perf_counter()
        try:
            data = storage.read_bytes(rec.uri, storage_options, max_bytes=max_image_bytes)
        except storage.TooLarge:
            return imgs.failed(imgs.TOO_LARGE, f"more than max_image_bytes={max_image_bytes} bytes "
                                               "(--max-image-bytes); refused")
        except storage.NotAFile as e:
            return imgs.failed(imgs.NOT_IMAGE, f"{e} (a FIFO, device, socket or folder); not read")
        except Exception as e:  # noqa: BLE001 - any other fetch failure becomes a retryable error row
            return imgs.failed(imgs.READ_ERROR, f"{type(e).__name__}: {e}")
        finally:
            spent[0] += time.perf_counter() - t
        t = time.perf_counter()
        try:
            return imgs.decode_image(data, max_side=max_side, max_pixels=max_pixels)
        finally:
            spent[1] += time.perf_counter() - t

    with ThreadPoolExecutor(max_workers=io_threads) as pool:
        decoded = list(pool.map(one, shard.records))
    return DecodedShard(shard, decoded, time.perf_counter() - t0, spent[0], spent[1])


def plan_batches(shapes: Sequence[tuple[int, int]], batch_size: int,
                 bucket: Callable[[int, int], tuple[int, int]] | None = None
                 ) -> list[tuple[list[int], tuple[int, int] | None]]:
    """Cut a shard's decoded images into batches that pad little (pure).

    Images are sorted by aspect ratio (height / width: the widest first, the tallest last, then by size), so a batch
    holds images of one orientation and nearly one shape (after the max_side resize, one side is max_side and the
    aspect ratio fixes the other), and cut every ``batch_size``: as few batches as images allow. Each batch is padded
    to ``bucket`` of its largest height and width (a small set of padded sizes: a GPU autotunes each shape once), or
    without ``bucket`` to its own largest image.

    Args:
        shapes: each image's (height, width) after resizing.
        batch_size: images per batch.
        bucket: (h, w) -> padded (H, W), or None.

    Returns:
        Batches: (indices into ``shapes``, padded size or None = the batch's own).
    """
    order = sorted(range(len(shapes)), key=lambda i: (shapes[i][0] / shapes[i][1], shapes[i]))
    out: list[tuple[list[int], tuple[int, int] | None]] = []
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        out.append((idx, None if bucket is None else bucket(max(shapes[i][0] for i in idx),
                                                          max(shapes[i][1] for i in idx))))
    return out


def padding_waste(shapes: Sequence[tuple[int, int]], batches: Sequence[tuple[list[int], tuple[int, int] | None]],
                  stride: int) -> float:
    """Share of the padded pixels of a shard's batches that no image fills (0 = no padding).

    Args:
        shapes: each image's (height, width).
        batches: from ``plan_batches``.
        stride: the backbone's stride (a batch without a fixed size is padded to a multiple of it).
    """
    padded = used = 0
    for idx, size in batches:
        if size is None:
            size = (-(-max(shapes[i][0] for i in idx) // stride) * stride,
                    -(-max(shapes[i][1] for i in idx) // stride) * stride)
        padded += len(idx) * size[0] * size[1]
        used += sum(shapes[i][0] * shapes[i][1] for i in idx)
    return 1.0 - used / padded if padded else 0.0


def run_model_on_shard(model: Any, dshard: DecodedShard, batch_size: int, float16: bool = False,
                       on_images: Callable[[int], Any] | None = None,
                       bucket: Callable[[int, int], tuple[int, int]] | None = None
                       ) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """Run the model over a decoded shard and build its two tables (pure: no I/O).

    Images are batched by ``plan_batches`` so that padding within a batch stays small.

    Args:
        model: a RegionModel (or anything with its call signature, ``dims``, ``region_dim``, ``name``, ``config_hash``).
        dshard: the decoded shard.
        batch_size: images per forward pass.
        float16: store vectors as float16.
        on_images: called with the number of images each batch finished (the failed ones first, at once): the
            run's image-level progress.
        bucket: the padded-size buckets (see ``plan_batches``); the model is then called with ``padded=``.

    Returns:
        (images table, regions table, stats with counts and timings).
    """
    recs, dec = dshard.shard.records, dshard.decoded
    ok_idx = [i for i, d in enumerate(dec) if d.ok]
    shapes = [(int(dec[i].array.shape[0]), int(dec[i].array.shape[1])) for i in ok_idx]  # type: ignore[union-attr]
    batches = plan_batches(shapes, batch_size, bucket)
    if on_images is not None and len(dec) > len(ok_idx):
        on_images(len(dec) - len(ok_idx))  # images that failed to decode are done already
    outputs: dict[int, dict[str, np.ndarray]] = {}
    t0 = time.perf_counter()
    for pos, size in batches:
        idx = [ok_idx[p] for p in pos]
        args = ([dec[i].array for i in idx], [(dec[i].width, dec[i].height) for i in idx])
        res = model(*args) if size is None else model(*args, padded=size)
        outputs.update(zip(idx, res))
        if on_images is not None:
            on_images(len(idx))
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
             "read_s": dshard.read_s, "fetch_s": dshard.fetch_s, "decode_s": dshard.decode_s, "infer_s": infer_s, "batches": len(batches)}
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
    return fstore.write_data_marker(output, shard.shard_id, shard.generation, [r.image_id for r in shard.records],
                                    [r.fingerprint for r in shard.records], retry, storage_options,
                                    stats={**stats, "write_s": write_s}, finished=fstore.now())


class GpuSampler:
    """Samples the GPU's utilisation (NVML, through ``torch.cuda.utilization``) every ``every_s`` seconds in a
    thread while a shard is inferred; on a CPU model it does nothing.

    Args:
        device: the model's device.
        every_s: seconds between samples.
    """

    def __init__(self, device: Any, every_s: float = 0.2) -> None:
        self.device = device
        self.every_s = every_s
        self.samples: list[float] = []
        self.error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if getattr(self.device, "type", "cpu") == "cuda":
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        import torch

        while not self._stop.is_set():
            try:
                self.samples.append(float(torch.cuda.utilization(self.device)))
            except Exception as e:  # noqa: BLE001 - no NVML (pynvml missing): say why once, stop sampling
                self.error = f"{type(e).__name__}: {e}"
                return
            self._stop.wait(self.every_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def stats(self) -> dict[str, Any]:
        """The shard's GPU figures for its marker: mean utilisation in percent (None when not sampled) and, on a
        GPU, why sampling failed if it did."""
        if self._thread is None:
            return {}
        out: dict[str, Any] = {"gpu_util_mean": round(sum(self.samples) / len(self.samples), 1) if self.samples
                               else None, "gpu_util_samples": len(self.samples)}
        if self.error:
            out["gpu_util_error"] = self.error
        return out


class ShardWorker:
    """Builds the model on the worker that runs it and turns decoded shards into written shards.

    This is the class Ray runs as an actor (constructor kwargs only: nothing heavy is pickled from the driver), and
    it is usable in-process without Ray.

    Args:
        model_config: the model config.
        output: extraction output URL.
        batch_size: images per forward pass.
        float16: store vectors as float16.
        threads: torch CPU threads (0 = all cores of this machine; the Ray runner passes its own choice, see
            pipeline.extract.runners.actor_layout).
        storage_options: fsspec options.
        pad_step: batches padded to buckets of this many pixels (see ``transform.padded_size``); 0: each batch to
            its own largest image.
    """

    def __init__(self, model_config: ModelConfig, output: str, batch_size: int, float16: bool = False,
                 threads: int = 0, storage_options: dict[str, Any] | None = None, pad_step: int = 0) -> None:
        from pipeline.model.region_model import RegionModel
        from pipeline.model.transform import padded_size

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.model = RegionModel(model_config, threads=threads or (os.cpu_count() or 1), storage_options=storage_options)
        self.output = output
        self.batch_size = batch_size
        self.float16 = float16
        self.storage_options = storage_options
        stride = self.model.backbone.stride
        self.bucket = functools.partial(padded_size, max_side=model_config.max_side, stride=stride,
                                        step=pad_step) if pad_step > 0 else None
        # An actor that decodes its own shards runs several calls at once (Ray threads): they decode side by side,
        # but one at a time runs the model (concurrent forward passes would only split the same torch threads).
        self._model_lock = threading.Lock()

    def warm(self) -> float:
        """Run the model once on a small blank batch (lazy kernel set-up, memory pools, the first autotuning), so the
        first shard does not pay for it; returns the seconds it took."""
        t0 = time.perf_counter()
        side = self.model.config.max_side
        images = [np.zeros((side, side * 3 // 4, 3), np.uint8)] * min(2, self.batch_size)
        with self._model_lock:  # a threaded actor may already be running a shard's call
            self.model(images, [(side * 3 // 4, side)] * len(images))
        return time.perf_counter() - t0

    def run(self, dshard: DecodedShard, on_images: Callable[[int], Any] | None = None) -> dict[str, Any]:
        """Process one decoded shard end to end; returns its marker (with per-stage timings). ``on_images`` is told
        how many images each batch finished (see ``run_model_on_shard``)."""
        with self._model_lock, GpuSampler(self.model.device) as gpu:
            itab, rtab, stats = run_model_on_shard(self.model, dshard, self.batch_size, self.float16, on_images,
                                                   self.bucket)
        stats.update(gpu.stats())
        marker = write_shard(self.output, dshard.shard, itab, rtab, stats, self.storage_options)
        s = marker["stats"]
        log.info("shard %s: %d images (%d ok), read %.2fs infer %.2fs write %.2fs", dshard.shard.shard_id,
                 s["images"], s["ok"], s["read_s"], s["infer_s"], s["write_s"])
        return marker

    def decode_and_run(self, shard: Shard, max_pixels: int, max_image_bytes: int | None = None,
                       on_images: Callable[[int], Any] | None = None) -> dict[str, Any]:
        """Decode a shard here (``decode_shard`` at the model's max_side), then ``run`` it: what a model actor on a
        CPU-only cluster does with each shard, decoding the next ones in its other call threads meanwhile.

        Args:
            shard: the shard.
            max_pixels, max_image_bytes: as ``decode_shard``'s.
            on_images: as ``run``'s.

        Returns:
            The shard's marker.
        """
        dshard = decode_shard(shard, self.model.config.max_side, max_pixels, self.storage_options,
                              max_image_bytes=max_image_bytes)
        return self.run(dshard, on_images)
