"""Ray Data's streaming executor against the hand-scheduled RayRunner, on the same images and model, in one run.

For each corpus size it times, one after another in one process on one local Ray instance:

- ``bare``: the in-process loop of ``benchmarks/extract_bench.py`` (decode + model, no Ray, no output): the reference;
- ``runner``: ``pipeline.extract.driver.run`` with today's ``RayRunner`` (decode tasks feeding model actors warmed
  while the input is listed; shards written with their done-markers; manifest);
- ``data-shards``: the same driver with ``RayDataRunner`` below: the runner's scheduling loop replaced by a Ray Data
  pipeline over shards, ``from_items(shards) -> map(decode_shard) -> map_batches(ShardWorker actor class,
  concurrency=actors, batch_size=1)``, so each row is a shard and the actor writes it and its marker exactly as
  today (the form that keeps shards as the unit of resume, incremental runs and error rows); Ray Data fuses the
  decode step into the actor there (decode then runs inside the actor, serially with inference);
- ``data-shards-split``: the same with the decode tasks kept apart from the actor (0.99 CPU each: not fused);
- ``data-images``: Ray Data's idiomatic form, rows = images: ``from_items(records) -> map_batches(decode, tasks) ->
  map_batches(model actor class, concurrency=actors)``, the actor turning each block of ``--shard-size`` images
  into the images table (``worker.run_model_on_shard``, same batching), collected and counted, not written (no
  shard files, no markers: the comparison is the throughput of the executor itself).

All four use the same model (``RegionModel`` through ``ShardWorker`` / ``run_model_on_shard``), max side, batch
size, torch threads and CPUs per actor. Images are the first ``--n`` (sorted by path, every class) of
``--images`` (default: the embedded sample replicated).

    python benchmarks/raydata_bench.py --images /work/shared/datasets/caltech101 --sizes 160,480
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from extract_bench import bare_loop, make_corpus, measure

from pipeline.config import ExtractConfig, ModelConfig, from_dict
from pipeline.extract import driver
from pipeline.extract.plan import DecodedShard, Shard
from pipeline.extract.runners import RayRunner, init_ray
from pipeline.extract.worker import ShardWorker, decode_shard, run_model_on_shard
from pipeline.io import images as imgs
from pipeline.io import listing, storage

if TYPE_CHECKING:
    from pipeline.extract.driver import Progress


class ShardActor:
    """The Ray Data actor class of ``data-shards``: a ShardWorker applied to batches of decoded shards."""

    def __init__(self, **kwargs: Any) -> None:
        self.worker = ShardWorker(**kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        markers = [self.worker.run(d) for d in batch["dshard"]]
        return {"marker": np.array([json.dumps(m) for m in markers], dtype=object)}


class RayDataRunner:
    """A Runner (``pipeline.extract.runners.Runner``) whose shard scheduling is Ray Data's streaming executor.

    Same semantics as RayRunner (a shard is decoded by one task and written with its marker by one actor call), but
    the actors start when the dataset executes (Ray Data has no handle to warm them during listing) and a shard whose
    retries run out fails the whole dataset (Ray Data has no per-shard give-up-and-resubmit).
    """

    def __init__(self, fuse: bool = True) -> None:
        # Ray Data fuses the decode map into the actor stage when their resources match (decode then runs inside the
        # actor, serially with inference); 0.99 CPU per decode task keeps them apart (decode tasks beside the actor).
        self.decode_cpus = 1.0 if fuse else 0.99

    def start(self, cfg: ExtractConfig) -> None:
        """Start Ray if needed (the actor pool starts with the dataset)."""
        init_ray()

    def close(self) -> None:
        """Nothing held between runs: the pool ends with the dataset."""

    def run(self, cfg: ExtractConfig, shards: Sequence[Shard], progress: Progress) -> list[dict[str, Any]]:
        """Decode tasks -> actor pool over shards; markers in completion order."""
        import ray

        so = cfg.fs_options
        cpus = ray.cluster_resources().get("CPU", 1.0)
        n_actors = max(1, cfg.num_actors or 1)
        threads = cfg.threads or max(1, int(cpus // n_actors))  # the CPUs shared among the pool's actors

        def decode(row: dict[str, Any]) -> dict[str, Any]:
            return {"dshard": decode_shard(row["shard"], cfg.max_side, cfg.max_pixels, so,
                                           max_image_bytes=cfg.max_image_bytes)}

        ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
        ds = ds.map(decode, num_cpus=self.decode_cpus)
        # Ray Data restarts a dead pool actor and retries its calls itself (its own defaults).
        ds = ds.map_batches(ShardActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=n_actors),
                            num_cpus=cfg.actor_cpus, num_gpus=0,
                            fn_constructor_kwargs={"model_config": cfg.model_config(), "output": cfg.output,
                                                   "batch_size": cfg.batch_size, "float16": cfg.float16,
                                                   "threads": threads, "storage_options": so,
                                                   "pad_step": cfg.pad_step})
        done: list[dict[str, Any]] = []
        for row in ds.iter_rows():
            done.append(json.loads(row["marker"]))
            progress.add(done[-1]["stats"]["images"])
            progress(done, final=len(done) == len(shards))
        return done


def decode_block(batch: dict[str, np.ndarray], max_side: int, max_pixels: int) -> dict[str, Any]:
    """Ray Data task of ``data-images``: fetch and decode a block of images (failures stay rows)."""
    out: dict[str, list[Any]] = {"image_id": [], "uri": [], "fingerprint": [], "image": [], "width": [],
                                 "height": [], "status": [], "error": []}
    for image_id, uri, fp in zip(batch["image_id"], batch["uri"], batch["fingerprint"]):
        try:
            d = imgs.decode_image(storage.read_bytes(uri), max_side=max_side, max_pixels=max_pixels)
        except Exception as e:  # noqa: BLE001 - as decode_shard: a failed fetch is an error row
            d = imgs.failed(imgs.READ_ERROR, f"{type(e).__name__}: {e}")
        out["image_id"].append(image_id)
        out["uri"].append(uri)
        out["fingerprint"].append(fp)
        out["image"].append(d.array if d.ok else np.zeros((1, 1, 3), np.uint8))
        out["width"].append(d.width)
        out["height"].append(d.height)
        out["status"].append(d.status)
        out["error"].append(d.error)
    return {k: (np.array(v, dtype=object) if k == "image" else np.array(v)) for k, v in out.items()}


class ImageModelActor:
    """The Ray Data actor class of ``data-images``: a block of decoded images -> its images table (not written)."""

    def __init__(self, model_config: ModelConfig, batch_size: int, threads: int) -> None:
        from pipeline.model.region_model import RegionModel

        self.model = RegionModel(model_config, threads=threads)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        recs = tuple(listing.ImageRecord(image_id=str(i), uri=str(u), fingerprint=str(f))
                     for i, u, f in zip(batch["image_id"], batch["uri"], batch["fingerprint"]))
        dec = [imgs.Decoded(a if s == imgs.OK else None, int(w), int(h), str(s), str(e))
               for a, w, h, s, e in zip(batch["image"], batch["width"], batch["height"], batch["status"],
                                        batch["error"])]
        itab, _, _ = run_model_on_shard(self.model, DecodedShard(Shard("block", 0, recs), dec, 0.0),
                                        self.batch_size)
        return itab.select(["image_id", "status", "n_regions", "local"])


def data_images(cfg: ExtractConfig) -> dict[str, Any]:
    """``data-images``: list, then the Ray Data pipeline over image rows; every output row counted."""
    import ray

    t0 = time.perf_counter()
    records = listing.list_images(cfg.input)
    rows = [{"image_id": r.image_id, "uri": r.uri, "fingerprint": r.fingerprint} for r in records]
    cpus = ray.cluster_resources().get("CPU", 1.0)
    threads = cfg.threads or max(1, int(cpus))  # one actor: every CPU
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // cfg.shard_size)))
    ds = ds.map_batches(decode_block, batch_size=cfg.shard_size, num_cpus=1,
                        fn_kwargs={"max_side": cfg.max_side, "max_pixels": cfg.max_pixels})
    ds = ds.map_batches(ImageModelActor, batch_size=cfg.shard_size,
                        compute=ray.data.ActorPoolStrategy(size=max(1, cfg.num_actors or 1)),
                        num_cpus=cfg.actor_cpus, num_gpus=0, batch_format="numpy",
                        fn_constructor_kwargs={"model_config": cfg.model_config(), "batch_size": cfg.batch_size,
                                               "threads": threads})
    n = ok = 0
    for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        n += b.num_rows
        ok += sum(1 for s in b.column("status").to_pylist() if s == imgs.OK)
    wall = time.perf_counter() - t0
    assert n == len(records), (n, len(records))
    return {"images": n, "ok": ok, "wall_s": wall, "images_per_s": n / wall}


def runner_job(cfg: ExtractConfig, runner: Any) -> dict[str, Any]:
    """The driver with ``runner``, timed around the call (listing, actors, decode, model, writes, manifest)."""
    shutil.rmtree(cfg.output, ignore_errors=True)
    t0 = time.perf_counter()
    manifest = driver.run(cfg, runner, progress_every_s=30.0)
    wall = time.perf_counter() - t0
    run = manifest["run"]
    assert run["images"] == run["ok"], run["statuses"]
    return {"images": run["images"], "wall_s": wall, "images_per_s": run["images"] / wall,
            "stage_seconds_summed": run["stage_seconds_summed"]}


def one_run(which: str, cfg: ExtractConfig, threads: int) -> dict[str, Any]:
    """One of the four runs (see the module docstring) on ``cfg``."""
    if which == "bare":
        return bare_loop(cfg, threads)
    if which == "data-images":
        return data_images(cfg)
    if which == "data-shards-split":
        return runner_job(cfg, RayDataRunner(fuse=False))
    return runner_job(cfg, {"runner": RayRunner, "data-shards": RayDataRunner}[which]())


def pick_images(src: Path, n: int, dst: Path) -> Path:
    """The first n images (sorted paths) of src, copied under dst (so a run lists exactly these)."""
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in listing.IMAGE_EXTS)[:n]
    if len(files) < n:
        raise SystemExit(f"{src} holds only {len(files)} images")
    for f in files:
        t = dst / f.relative_to(src)
        t.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, t)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--images", default="", help="image folder to take the first --sizes images of (default: the "
                                                "embedded sample replicated)")
    p.add_argument("--sizes", default="160,480")
    p.add_argument("--runs", default="bare,runner,data-shards,data-images", help="which runs, in this order")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    p.add_argument("--threads", type=int, default=0, help="torch threads everywhere; 0 = all cores")
    p.add_argument("--actor-cpus", type=float, default=1.0)
    p.add_argument("--max-side", type=int, default=224)
    p.add_argument("--regions", type=int, default=6)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--out", default="", help="write the JSON results here")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = args.threads or (os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="raydata_bench_"))
    import ray
    import ray.data
    import torch

    torch.set_num_threads(threads)
    os.environ["RAY_worker_niceness"] = "0"  # Ray's default 15 would hand the job's CPU to other jobs (see extract_bench)
    for attempt in range(3):  # under heavy load the raylet can miss Ray's fixed 30 s registration window
        try:
            ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            break
        except Exception as e:  # Ray raises a bare Exception for it
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            print(f"# ray.init: {e}; retrying", flush=True)
            ray.shutdown()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    print(f"# raydata_bench: {os.cpu_count()} cores, Ray {ray.__version__} with {args.cpus} CPUs, torch "
          f"{torch.__version__} with {threads} threads, max_side {args.max_side}, regions {args.regions}, shard "
          f"{args.shard_size}, batch {args.batch_size}, actor_cpus {args.actor_cpus}, images "
          f"{args.images or 'embedded sample'}, load avg {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    try:
        for n in [int(s) for s in args.sizes.split(",")]:
            src = (pick_images(Path(args.images), n, work / f"corpus{n}") if args.images
                   else make_corpus(work / f"corpus{n}", n))
            cfg = from_dict(ExtractConfig, {
                "input": str(src), "output": str(work / f"out{n}"), "max_side": args.max_side,
                "regions": args.regions, "shard_size": args.shard_size, "batch_size": args.batch_size,
                "threads": threads, "actor_cpus": args.actor_cpus, "prefetch": args.prefetch, "num_gpus": 0})
            row: dict[str, Any] = {"images": n}
            for which in args.runs.split(","):
                row[which] = r = measure(functools.partial(one_run, which, cfg, threads), tree=True, every_s=1.0)
                print(f"{n:>5} images | {which:<11} | {r['images_per_s']:7.2f} img/s | {r['wall_s']:6.1f} s | "
                      f"load {r['load_avg_1m']}", flush=True)
            base = row.get("bare", {}).get("images_per_s")
            if base:
                row["ratio_to_bare"] = {k: round(row[k]["images_per_s"] / base, 3) for k in row
                                        if isinstance(row[k], dict) and k != "bare"}
                print(f"{n:>5} images | ratios to bare: {row['ratio_to_bare']}", flush=True)
            results.append(row)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
