"""Extraction benchmark: the whole Ray job (the driver with a RayRunner, on a local Ray) against a bare in-process loop.

For a corpus and for the 10x corpus (data/caltech8's 80 images replicated under distinct names), it prints images/s of

- ``ray``:  ``pipeline.extract.driver.run`` with a ``RayRunner`` end to end (listing, actor start and model load,
  decode tasks, batched inference, Parquet writes, done-markers, manifest), timed around the call;
- ``bare``: one process, no Ray, no output: decode_image + RegionModel in batches over the same images, with the same
  max_side, batch size, size-sorted batches per shard-sized chunk, every core as torch threads (``--threads``; model
  load included, the torch import not: the process has it already, while the job's actors import it),

their ratio, the Ray run's summed stage seconds, and peak memory: the sum over the driver and every process it
started (Ray's GCS, raylet and workers), sampled every ``--sample-s`` seconds with psutil when installed, else from
/proc: RSS, which counts shared object-store pages in every process mapping them, and PSS, which counts them once
(read less often: see MemorySampler). The bare loop's figure is its one process's.

    python benchmarks/extract_bench.py                      # 160 and 1600 images, max_side 224, 2 CPUs
    python benchmarks/extract_bench.py --sizes 80 --cpus 4 --threads 3 --actor-cpus 3
    python benchmarks/extract_bench.py --sizes 480 --num-actors 1 --ray-threads 2   # the layout before: one actor
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from pipeline.config import SAMPLE_DATA, ExtractConfig, from_dict  # noqa: E402
from pipeline.io import (
    listing,
    storage,  # noqa: E402
)
from pipeline.store import feature_store as fstore

MiB = 1024 * 1024


# ---- memory sampling -----------------------------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    """ppid -> child pids, from /proc."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _proc_tree(root: int) -> list[int]:
    """root and all its descendants (Ray's GCS/raylet are the driver's children, workers the raylet's)."""
    try:
        import psutil

        p = psutil.Process(root)
        return [root] + [c.pid for c in p.children(recursive=True)]
    except ImportError:
        pass
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _rss(pid: int) -> int:
    """Resident bytes of one process (cheap: /proc/pid/statm or psutil's memory_info); 0 when it is gone."""
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - the process ended between listing and reading
        return 0
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _pss(pid: int) -> int:
    """Proportional set size of one process (shared pages split among their users); costly: ~5-10 ms a process."""
    try:
        import psutil

        info = psutil.Process(pid).memory_full_info()
        return int(getattr(info, "pss", info.rss))
    except ImportError:
        pass
    except Exception:  # noqa: BLE001
        return 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemorySampler:
    """Samples memory of this process alone or of its whole process tree in a background thread; keeps peaks.

    RSS is read every ``every_s`` (cheap); PSS, whose kernel walk cost ~60 ms for a Ray job's ten processes and, taken
    four times a second, ate a fifth of a core of the 2-core machine it measured, only when the RSS total reaches a
    new peak, at most every ``pss_every_s``, and once at the end. The process list is refreshed every 2 s.
    """

    def __init__(self, tree: bool, every_s: float, pss_every_s: float = 2.0) -> None:
        self.tree, self.every_s, self.pss_every_s = tree, every_s, pss_every_s
        self.peak = {"driver_rss": 0, "others_rss": 0, "total_rss": 0, "driver_pss": 0, "others_pss": 0,
                     "total_pss": 0, "processes": 0}
        self._pids: list[int] = []
        self._pids_at = self._pss_at = -1e9
        self._pss_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self, force_pss: bool = False) -> None:
        me, now = os.getpid(), time.monotonic()
        if now - self._pids_at >= 2.0 or force_pss:
            self._pids = _proc_tree(me) if self.tree else [me]
            self._pids_at = now
        rss = {pid: _rss(pid) for pid in self._pids}
        d_rss, o_rss = rss.get(me, 0), sum(v for k, v in rss.items() if k != me)
        cur = {"driver_rss": d_rss, "others_rss": o_rss, "total_rss": d_rss + o_rss, "processes": len(self._pids)}
        if force_pss or (d_rss + o_rss > self._pss_rss and now - self._pss_at >= self.pss_every_s):
            pss = {pid: _pss(pid) for pid in self._pids}
            d_pss, o_pss = pss.get(me, 0), sum(v for k, v in pss.items() if k != me)
            cur.update({"driver_pss": d_pss, "others_pss": o_pss, "total_pss": d_pss + o_pss})
            self._pss_at, self._pss_rss = now, d_rss + o_rss
        for k, v in cur.items():
            self.peak[k] = max(self.peak[k], v)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every_s)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(force_pss=True)


# ---- corpus --------------------------------------------------------------------------------------------------------


def make_corpus(root: Path, n: int) -> Path:
    """n images: data/caltech8's photographs copied under distinct names (r000/Faces/image_0001.jpg, ...)."""
    src = sorted(p for p in SAMPLE_DATA.rglob("*.jpg"))
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        f = src[i % len(src)]
        dst = root / f"r{i // len(src):03d}" / f.parent.name / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
    return root


# ---- the two runs --------------------------------------------------------------------------------------------------


def bare_loop(cfg: ExtractConfig, threads: int) -> dict[str, float]:
    """Decode + model in batches in this process: the work of the job without Ray and without writing output."""
    import torch

    from pipeline.io.images import decode_image
    from pipeline.model.region_model import RegionModel

    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    model = RegionModel(cfg.model_config(), threads=threads)
    t_model = time.perf_counter()
    records = listing.list_images(cfg.input)
    decode_s = infer_s = 0.0
    n_ok = 0
    for c in range(0, len(records), cfg.shard_size):
        t = time.perf_counter()
        dec = [decode_image(storage.read_bytes(r.uri), max_side=cfg.max_side, max_pixels=cfg.max_pixels)
               for r in records[c:c + cfg.shard_size]]
        ok = sorted((d for d in dec if d.ok), key=lambda d: d.array.shape[:2])
        decode_s += time.perf_counter() - t
        t = time.perf_counter()
        for b in range(0, len(ok), cfg.batch_size):
            batch = ok[b:b + cfg.batch_size]
            model([d.array for d in batch], [(d.width, d.height) for d in batch])
        infer_s += time.perf_counter() - t
        n_ok += len(ok)
    wall = time.perf_counter() - t0
    return {"images": len(records), "ok": n_ok, "wall_s": wall, "model_load_s": t_model - t0, "decode_s": decode_s,
            "infer_s": infer_s, "images_per_s": len(records) / wall}


def ray_job(cfg: ExtractConfig) -> dict[str, Any]:
    from pipeline.extract import driver
    from pipeline.extract.runners import RayRunner

    t0 = time.perf_counter()
    manifest = driver.run(cfg, RayRunner(), progress_every_s=30.0)
    wall = time.perf_counter() - t0
    run = manifest["run"]
    assert run["images"] == run["ok"], run["statuses"]
    markers = fstore.read_done_markers(cfg.output)
    first = min(markers, key=lambda m: m["finished"])
    first_done = first["finished"] - manifest["finished"] + wall  # seconds from the call to the first done shard
    # After the first shard the actor is up and the pipeline is full: the rate that a larger corpus converges to.
    steady = (run["images"] - first["stats"]["images"]) / max(1e-9, wall - first_done)
    return {"images": run["images"], "wall_s": wall, "images_per_s": run["images"] / wall,
            "steady_images_per_s": steady, "stage_seconds_summed": run["stage_seconds_summed"],
            "first_shard_done_s": round(first_done, 2)}


def measure(fn: Callable[[], dict[str, Any]], tree: bool, every_s: float) -> dict[str, Any]:
    load0 = os.getloadavg()[0]
    with MemorySampler(tree, every_s) as mem:
        out = fn()
    out["load_avg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]  # before, after: other jobs on the machine
    out["peak_mem_mib"] = {k: (round(v / MiB, 1) if k != "processes" else v) for k, v in mem.peak.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--sizes", default="160,1600", help="corpus sizes, comma-separated (default: a corpus and 10x)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the bare loop; 0 = all cores")
    p.add_argument("--ray-threads", type=int, default=0,
                   help="torch threads per model actor of the Ray job; 0 = the job's default (actor_layout: on this "
                        "CPU-only Ray, the CPUs shared among the actors). Before the CPU layout change the job ran "
                        "one actor with every core: --num-actors 1 --ray-threads <cpus>")
    p.add_argument("--num-actors", type=int, default=0, help="model actors of the Ray job; 0 = the job's default")
    p.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs reserved per model actor")
    p.add_argument("--max-side", type=int, default=224)
    p.add_argument("--regions", type=int, default=6)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--sample-s", type=float, default=0.5, help="memory (RSS) sampling period")
    p.add_argument("--order", choices=("bare-first", "ray-first"), default="bare-first")
    p.add_argument("--worker-niceness", type=int, default=0,
                   help="nice value of Ray's workers; Ray's own default is 15, which on a machine shared with other "
                        "jobs hands the job's CPU to them while the bare loop keeps nice 0 (0: equal footing)")
    p.add_argument("--workdir", default="", help="where corpora and outputs go (default: a temp dir, removed)")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = args.threads or (os.cpu_count() or 1)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="extract_bench_"))
    sizes = [int(s) for s in args.sizes.split(",")]
    import ray
    import torch

    torch.set_num_threads(threads)
    os.environ["RAY_worker_niceness"] = str(args.worker_niceness)  # read by the raylet that ray.init starts
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    print(f"# extract_bench: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Ray {ray.__version__} with {args.cpus} CPUs, torch {torch.__version__}, bare loop {threads} threads, "
          f"Ray job: actors {args.num_actors or 'auto'} x threads {args.ray_threads or 'auto'}, "
          f"max_side {args.max_side}, regions {args.regions}, shard {args.shard_size}, batch {args.batch_size}, "
          f"actor_cpus {args.actor_cpus}, prefetch {args.prefetch}, worker niceness {args.worker_niceness}, "
          f"load avg {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    try:
        for n in sizes:
            src = make_corpus(work / f"corpus{n}", n)
            cfg = from_dict(ExtractConfig, {
                "input": str(src), "output": str(work / f"out{n}"), "max_side": args.max_side,
                "regions": args.regions, "shard_size": args.shard_size, "batch_size": args.batch_size,
                "threads": args.ray_threads, "num_actors": args.num_actors, "actor_cpus": args.actor_cpus,
                "prefetch": args.prefetch, "num_gpus": 0})
            runs: dict[str, Any] = {}
            order = ["bare", "ray"] if args.order == "bare-first" else ["ray", "bare"]
            for which in order:
                if which == "bare":
                    runs["bare"] = measure(lambda: bare_loop(cfg, threads), tree=False, every_s=args.sample_s)
                else:
                    shutil.rmtree(cfg.output, ignore_errors=True)
                    runs["ray"] = measure(lambda: ray_job(cfg), tree=True, every_s=args.sample_s)
            ratio = runs["ray"]["images_per_s"] / runs["bare"]["images_per_s"]
            row = {"images": n, "ray": runs["ray"], "bare": runs["bare"], "ratio_ray_over_bare": round(ratio, 3)}
            results.append(row)
            r = runs["ray"]
            print(f"{n:>6} images | ray {r['images_per_s']:7.2f} img/s ({r['wall_s']:.1f} s; first shard done at "
                  f"{r['first_shard_done_s']:.1f} s, then {r['steady_images_per_s']:.2f} img/s) | "
                  f"bare {runs['bare']['images_per_s']:7.2f} img/s ({runs['bare']['wall_s']:.1f} s) | "
                  f"ratio {ratio:.3f} | peak PSS ray job {runs['ray']['peak_mem_mib']['total_pss']:.0f} MiB "
                  f"(driver {runs['ray']['peak_mem_mib']['driver_pss']:.0f}, others "
                  f"{runs['ray']['peak_mem_mib']['others_pss']:.0f}, RSS sum "
                  f"{runs['ray']['peak_mem_mib']['total_rss']:.0f}) | bare process RSS "
                  f"{runs['bare']['peak_mem_mib']['driver_rss']:.0f} MiB | load avg ray {r['load_avg_1m']} bare "
                  f"{runs['bare']['load_avg_1m']}", flush=True)
        print(json.dumps(results, indent=2, default=str))
    finally:
        ray.shutdown()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
