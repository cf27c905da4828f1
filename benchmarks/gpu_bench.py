"""GPU throughput of extraction, images/s per GPU: the model alone and the whole Ray job (jobs/extract.py), per model.

    bash benchmarks/gpu_bench.sh            # on a GPU machine: installs Ray if missing, then runs this script
    python benchmarks/gpu_bench.py [--n 2000] [--configs mobilenet_v2:320,mobilenet_v2:448,vgg16:448] [--out DIR]

For each backbone:max_side (default pyramid 0.7,1, 12 regions):

- ``model``: the images decoded ahead (16 threads), batched as a shard is (``worker.plan_batches``), one untimed pass
  (cuDNN autotuning of every batch shape), then a timed pass with ``torch.cuda.synchronize`` around it;
- ``model bf16``: the same with ``precision=bfloat16`` (autocast, channels_last);
- ``ray job``: ``python jobs/extract.py`` in a subprocess on a local Ray (1 GPU actor, decode tasks on the other
  cores), timed around the process (start-up, listing, model load, decode, inference, Parquet writes, manifest) and
  as the manifest's own images/s; its per-stage seconds and mean GPU utilisation come from the manifest.

GPU utilisation of the model rows: ``nvidia-smi`` sampled every 100 ms while the timed pass runs. The corpus is the
committed sample (data/caltech8, 80 photos of Caltech-101) replicated under distinct names. VGG16 runs with random
weights when its ImageNet weights are not cached (identical arithmetic, so identical timing; outputs not used).
Also checks that CUDA and CPU outputs agree on a few images. Prints a Markdown table and writes gpu_bench.json to
--out (default $OUT when set).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import SAMPLE_DATA, ModelConfig
from pipeline.extract.worker import plan_batches
from pipeline.io.images import decode_image
from pipeline.model.backbones import WeightsUnavailable
from pipeline.model.region_model import RegionModel


class SmiSampler:
    """GPU utilisation (%) from ``nvidia-smi`` every 100 ms while in the ``with`` block; empty without nvidia-smi."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> SmiSampler:
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-i", "0", "-lms", "100"], stdout=subprocess.PIPE, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                pass

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def make_corpus(root: Path, n: int) -> Path:
    """n images: the committed sample's photographs copied under distinct names."""
    src = sorted(SAMPLE_DATA.rglob("*.jpg"))
    for i in range(n):
        f = src[i % len(src)]
        dst = root / f"r{i // len(src):03d}" / f.parent.name / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
    return root


def weights_cached(backbone: str) -> bool:
    """Whether the backbone's ImageNet weights file is in torch hub's cache ($TORCH_HOME: .gpu_weights/ when carried)."""
    import torchvision

    from pipeline.model.backbones import PRETRAINED

    w = torchvision.models.get_model_weights(backbone)[PRETRAINED[backbone]]
    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)).is_file()


def build(cfg: ModelConfig, device: str) -> tuple[RegionModel, bool]:
    """The model; with random weights (timing only) when the backbone's ImageNet weights are not cached. No download
    is tried: the GPU machine has no internet, and an unreachable network may stall before it fails."""
    import dataclasses

    if not weights_cached(cfg.backbone):
        return RegionModel(dataclasses.replace(cfg, random_weights=True), device=device), True
    try:
        return RegionModel(cfg, device=device), False
    except WeightsUnavailable:
        return RegionModel(dataclasses.replace(cfg, random_weights=True), device=device), True


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def model_alone(cfg: ModelConfig, files: list[Path], batch_size: int, device: str) -> dict[str, Any]:
    """Images/s of the model on decoded images (decode not timed), and GPU utilisation meanwhile."""
    model, random = build(cfg, device)
    with ThreadPoolExecutor(16) as pool:
        t0 = time.perf_counter()
        dec = [d for d in pool.map(lambda f: decode_image(f.read_bytes(), max_side=cfg.max_side), files) if d.ok]
        decode_s = time.perf_counter() - t0
    batches = plan_batches([d.array.shape[:2] for d in dec], batch_size)

    def one_pass() -> None:
        for idx, _ in batches:
            model([dec[i].array for i in idx], [(dec[i].width, dec[i].height) for i in idx])
        sync(device)

    t0 = time.perf_counter()
    one_pass()  # autotuning of every shape, lazy initialisation
    warm_s = time.perf_counter() - t0
    with SmiSampler() as smi:
        t0 = time.perf_counter()
        one_pass()
        dt = time.perf_counter() - t0
    return {"images": len(dec), "seconds": round(dt, 3), "images_per_s": round(len(dec) / dt, 1),
            "gpu_util_mean": smi.mean, "first_pass_s": round(warm_s, 2), "decode_16_threads_s": round(decode_s, 2),
            "batches": len(batches), "random_weights": random,
            "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None}


def ray_job(cfg: ModelConfig, corpus: Path, work: Path, batch_size: int, random: bool, device: str,
            timeout_s: float) -> dict[str, Any]:
    """The whole job through ``jobs/extract.py`` on a local Ray, in a subprocess (stopped after ``timeout_s``: a hung
    Ray start must not use up the machine's time and lose the other rows)."""
    out = work / f"out-{cfg.backbone}-{cfg.max_side}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "jobs/extract.py"), "--input", str(corpus), "--output", str(out),
           "--backbone", cfg.backbone, "--max-side", str(cfg.max_side), "--batch-size", str(batch_size),
           "--shard-size", "256", "--prefetch", "6"]
    if random:
        cmd.append("--random-weights")
    # GPU: one actor on the GPU with 2 CPUs for its host work, decode tasks on the other cores. CPU (dry run): one
    # CPU actor.
    cmd += ["--num-gpus", "0", "--actor-cpus", "1"] if device == "cpu" else ["--num-gpus", "1", "--actor-cpus", "2"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or "")[-1500:]
        return {"error": f"stopped after {timeout_s:.0f} s (--ray-timeout); stderr tail: {tail}"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    m = json.loads((out / "manifest.json").read_text())
    run = m["run"]
    return {"images": run["images"], "wall_s": round(wall, 2), "images_per_s_wall": round(run["images"] / wall, 1),
            "images_per_s_manifest": run["images_per_s"], "gpu_util_mean_during_infer":
            run.get("gpu_util_mean_during_infer"), "stage_seconds_summed": run["stage_seconds_summed"]}


def agreement(files: list[Path], device: str) -> str:
    """``device`` (CUDA; a dry run: the CPU) and CPU outputs of the default model on a few images (TF32 off)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = ModelConfig(max_side=320)
    dec = [decode_image(f.read_bytes(), max_side=cfg.max_side) for f in files[:6]]
    args = ([d.array for d in dec], [(d.width, d.height) for d in dec])
    torch.manual_seed(0)  # the same random weights in both when none are cached
    cpu, random = build(cfg, "cpu")
    torch.manual_seed(0)
    a, b = cpu(*args), build(cfg, device)[0](*args)
    worst = 0.0
    for x, y in zip(a, b):
        for k in ("global", "crow", "local"):
            worst = max(worst, float(np.abs(x[k] - y[k]).max() / (np.abs(x[k]).max() + 1e-12)))
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    weights = ", random weights" if random else ""
    return (f"{device} vs cpu, {len(dec)} images{weights}, max relative difference {worst:.2e}"
            + (" (ok)" if worst < 1e-2 else " (TOO LARGE)"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="images (the 80-image sample replicated)")
    p.add_argument("--configs", default="mobilenet_v2:320,mobilenet_v2:448,vgg16:448")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-ray", action="store_true", help="skip the Ray job rows")
    p.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 model rows")
    p.add_argument("--out", default=os.environ.get("OUT", ""))
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself (small --n)")
    p.add_argument("--ray-timeout", type=float, default=240.0, help="seconds one Ray job may take before it is stopped")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (--device cpu for a dry run)")
        return 2
    try:
        import ray

        ray_version = f"{ray.__version__} ({Path(ray.__file__).parent})"
    except ImportError:
        ray_version = ""
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (dry run)"
    print(f"# {name}; torch {torch.__version__}; {os.cpu_count()} CPUs; "
          f"ray {ray_version or 'missing (Ray rows skipped)'}; {args.n} images", flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_bench_"))
    corpus = make_corpus(work / "corpus", args.n)
    files = sorted(corpus.rglob("*.jpg"))
    print(agreement(files, args.device), flush=True)
    rows: list[dict[str, Any]] = []

    def save() -> None:  # after every row: a run stopped at its time limit keeps what it measured
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "gpu_bench.json").write_text(json.dumps(rows, indent=2))

    for spec in args.configs.split(","):
        backbone, side = spec.split(":")
        cfg = ModelConfig(backbone=backbone, max_side=int(side))
        r = model_alone(cfg, files, args.batch_size, args.device)
        rows.append({"config": spec, "run": "model", **r})
        print(json.dumps(rows[-1]), flush=True)
        save()
        if not args.no_bf16:
            import dataclasses

            rb = model_alone(dataclasses.replace(cfg, precision="bfloat16"), files, args.batch_size, args.device)
            rows.append({"config": spec, "run": "model bf16", **rb})
            print(json.dumps(rows[-1]), flush=True)
            save()
        if ray_version and not args.no_ray:
            rj = ray_job(cfg, corpus, work, args.batch_size, r["random_weights"], args.device, args.ray_timeout)
            rj["ratio_to_model"] = round(rj["images_per_s_wall"] / r["images_per_s"], 3) if "error" not in rj else None
            rows.append({"config": spec, "run": "ray job", **rj})
            print(json.dumps(rows[-1]), flush=True)
            save()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print()
    print("| backbone:max_side | run | images | images/s | GPU util % | notes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["run"] == "ray job":
            note = (f"error: {' '.join(r['error'].split())[-200:]}" if "error" in r else
                    f"wall {r['wall_s']} s incl. start-up; manifest {r['images_per_s_manifest']} img/s; "
                    f"{r['ratio_to_model']}x the model alone; stages {r['stage_seconds_summed']}")
            print(f"| {r['config']} | ray job (jobs/extract.py) | {r.get('images', '')} | "
                  f"{r.get('images_per_s_wall', '')} | {r.get('gpu_util_mean_during_infer', '')} | {note} |")
        else:
            note = f"first pass {r['first_pass_s']} s, {r['batches']} batches, peak {r['max_memory_gib']} GiB" + (
                ", random weights (timing only)" if r["random_weights"] else "")
            print(f"| {r['config']} | {r['run']} | {r['images']} | {r['images_per_s']} | {r['gpu_util_mean']} | "
                  f"{note} |")
    save()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
