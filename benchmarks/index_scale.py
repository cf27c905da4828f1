"""Indexing at scale: region-store codecs and index recall on real features, then build + search on synthetic corpora.

Subcommands:
  codecs   the benchmark's re-rank rows (crow+rerank(+qe), crow+regions(+qe)) with the region store as extracted and
           after each codec's encode/decode (same protocol code as jobs/benchmark.py);
  recall   recall@10 against exact search of the factories the size rule picks (and would pick at larger n), on real
           features (fused and CroW after PCA 512), at the saved nprobe;
  gen      a synthetic extraction output in the exact layout (schema.py tables, done-markers, config.json);
  scale    gen (if missing) + jobs/index.py under /usr/bin/time -v (driver peak RSS, tasks' peak RSS, images/s) + a
           Searcher (peak RSS in a fresh process, queries/s at top-100 with --rerank 100);
  sample   the build's sampling pass alone (pipeline.reduce.sample: tasks in-process or on 1, 2... Ray workers), each
           in a fresh process: seconds and the driver's peak RSS.

examples:
  python benchmarks/index_scale.py codecs --dataset ../shared/datasets/caltech101 --protocol category \\
      --queries ../shared/datasets/caltech101/queries_5pct_seed0.txt --features runs/caltech101-ms/features
  python benchmarks/index_scale.py recall --features runs/caltech101-ms/features
  python benchmarks/index_scale.py scale --root /work/runs-13 --sizes 10000 30000 --workers 1 2
  python benchmarks/index_scale.py gen --root /work/runs-13 --size 30000
  python benchmarks/index_scale.py sample --features /work/runs-13/synth-30000 --size 10000 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Default model dims (mobilenet_v2): global and local 1280 each (fused 2560), CroW 1280, 12 regions x 1280.
DIMS = {"global": 1280, "spoc": 1280, "mac": 1280, "rmac": 1280, "gem": 1280, "crow": 1280, "local": 1280}
REGIONS, REGION_DIM = 12, 1280


def codecs(a: argparse.Namespace) -> None:
    """Re-rank rows with each region codec against the store as extracted."""
    from pipeline.bench.corpus import load_corpus
    from pipeline.bench.methods import method_rankers
    from pipeline.bench.protocols import PROTOCOLS
    from pipeline.config import BenchmarkConfig
    from pipeline.store import region_store as rs

    cfg = BenchmarkConfig(dataset=a.dataset, protocol=a.protocol, queries=a.queries, features=a.features,
                          report="/tmp/unused", methods=a.methods, max_side=a.max_side)
    protocol = PROTOCOLS[cfg.protocol](cfg)
    paths, labels = protocol.ground_truth()
    c = load_corpus(a.features, a.dataset, paths, labels, {}, regions=cfg.regions)
    qrows, _ = protocol.queries(c)
    base = c.region_desc
    rows = []
    for codec in ["as extracted", *rs.CODECS]:
        c.region_desc = base if codec == "as extracted" else rs.decode(rs.encode(base, codec))
        rankers = method_rankers(c, cfg, qrows, protocol.depth(len(c.paths)))
        for m in [m.strip() for m in a.methods.split(",") if m.strip()]:
            rows.append((codec, m, protocol.score(rankers[m]())["score"]))
            print(f"{codec:>13} {m:>15} {rows[-1][2]:.4f}  bytes/region {_bytes(codec, base.shape[1])}", flush=True)


def _bytes(codec: str, d: int) -> int:
    return {"as extracted": 2 * d, "float16": 2 * d, "int8": d}[codec]


def recall(a: argparse.Namespace) -> None:
    """recall@10 vs exact search of compressed factories on real features."""
    import pyarrow.compute as pc

    from pipeline.reduce import faiss_index as fx
    from pipeline.reduce.pca import PCA, fuse, l2n
    from pipeline.schema import column_to_numpy
    from pipeline.store import feature_store as fstore

    t = fstore.read_live_table(a.features, "images", None, ["status", "global", "local", "crow"])
    t = t.filter(pc.equal(t.column("status"), "ok"))
    spaces = {"fused": fuse(column_to_numpy(t, "global"), column_to_numpy(t, "local")),
              "crow": l2n(column_to_numpy(t, "crow"))}
    n = t.num_rows
    print(f"{n} images; PCA {a.pca_dim}; nprobe {a.nprobe}; size rule at this n: "
          f"{fx.choose_factory(n, a.pca_dim, int(a.budget_gb * 2**30))}", flush=True)
    for space, raw in spaces.items():
        x = PCA.fit(raw, a.pca_dim).transform(raw)
        _, exact = fx.build_index(x, "Flat").search(x, 10)
        for fac in a.factories:
            fac = fac.replace("NLIST", str(fx._ivf_nlist(n)))
            t0 = time.perf_counter()
            idx = fx.build_index(x, fac)
            fx.set_search_params(idx, nprobe=a.nprobe)
            _, got = idx.search(x, 10)
            r = np.mean([len(set(g) & set(e)) / 10 for g, e in zip(got, exact)])
            print(f"{space:>6} {fac:>22} recall@10 {r:.4f}  ({time.perf_counter() - t0:.1f} s)", flush=True)


def gen(root: str, n: int, shard: int, seed: int = 0) -> str:
    """Write a synthetic extraction of ``n`` images (float16 vectors, clustered so IVF has structure)."""
    from pipeline.config import ExtractConfig, ModelConfig, public_dict
    from pipeline.extract.plan import Shard
    from pipeline.extract.worker import write_shard
    from pipeline.io import storage
    from pipeline.io.listing import ImageRecord
    from pipeline.schema import images_schema, regions_schema, to_table
    from pipeline.store import feature_store as fstore

    out = os.path.join(root, f"synth-{n}")
    if os.path.exists(os.path.join(out, "manifest.json")):
        return out
    rng = np.random.default_rng(seed)
    centers = {k: rng.standard_normal((256, d)).astype(np.float32) for k, d in {**DIMS, "region": REGION_DIM}.items()}
    mcfg = ModelConfig()
    storage.write_json(os.path.join(out, fstore.CONFIG), {"config": public_dict(ExtractConfig(input="synthetic",
                       output=out)), "model": public_dict(mcfg), "model_hash": "synthetic"})
    ischema, rschema = images_schema(DIMS, float16=True), regions_schema(REGION_DIM, float16=True)
    for s0 in range(0, n, shard):
        k = min(shard, n - s0)
        ids = [f"img/{i:09d}.jpg" for i in range(s0, s0 + k)]
        lab = rng.integers(0, 256, k)
        vec = {m: centers[m][lab] + 0.7 * rng.standard_normal((k, d)).astype(np.float32) for m, d in DIMS.items()}
        rl = np.repeat(lab, REGIONS)
        rdesc = centers["region"][rl] + rng.standard_normal((k * REGIONS, REGION_DIM)).astype(np.float32)
        boxes = np.abs(rng.standard_normal((k * REGIONS, 4)).astype(np.float32)) * 100
        boxes[:, 2:] += boxes[:, :2]
        itab = to_table({"image_id": ids, "uri": [f"s3://synthetic/{i}" for i in ids], "fingerprint": ["0"] * k,
                         "width": [640] * k, "height": [480] * k, "status": ["ok"] * k, "error": [None] * k,
                         "n_regions": [REGIONS] * k, **vec, "model": ["synthetic"] * k,
                         "config_hash": ["synthetic"] * k}, ischema)
        rtab = to_table({"image_id": np.repeat(ids, REGIONS).tolist(), "rank": np.tile(np.arange(REGIONS), k).tolist(),
                         "box": boxes, "score": np.ones(k * REGIONS, np.float32).tolist(), "descriptor": rdesc}, rschema)
        recs = tuple(ImageRecord(i, f"s3://synthetic/{i}", "0") for i in ids)
        write_shard(out, Shard(fstore.shard_id(1, s0 // shard), 1, recs), itab, rtab, {"images": k}, None)
    storage.write_json(os.path.join(out, "manifest.json"), {"live_images": n, "synthetic": True})
    return out


def _time_v(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run under /usr/bin/time -v: (peak RSS MB, wall s, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"{cmd} failed: {p.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    return rss, wall, p.stdout


SEARCH_PROBE = """
import json, resource, sys, time, numpy as np
from pipeline.retrieval.search import Searcher
from pipeline.reduce.pca import l2n
s = Searcher(sys.argv[1], model=object())
rng = np.random.default_rng(1)
nq = int(sys.argv[2])
outs = [{k: rng.standard_normal(d).astype(np.float32) for k, d in (("global", 1280), ("rmac", 1280), ("local", 1280),
        ("crow", 1280), ("gem", 1280))} for _ in range(nq)]
for o in outs:  # the query's own significant regions: the default re-rank matches them with the candidates'
    o["regions"] = rng.standard_normal((12, 1280)).astype(np.float32)
s.search_vectors(outs[:2], top_k=100, rerank=100)  # warm: first ranged reads, lazily loaded parts
t0 = time.perf_counter()
for o in outs:
    ids, _ = s.search_vectors([o], top_k=100, rerank=100)
    s.resolve(ids[0][ids[0] >= 0])
dt = time.perf_counter() - t0
print(json.dumps({"qps": nq / dt, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


SAMPLE_PROBE = """
import json, resource, sys, time
from pipeline.reduce import sample as sp, task as tk
from pipeline.reduce.runners import make_task_runner
from pipeline.store import feature_store as fstore
feats, size, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
plan = tk.Plan(feats, "/nonexistent", {}, (), 1.0, "int8", "probe", "global+rmac")  # sampling writes nothing
tasks = list(enumerate(fstore.live_shard_refs(feats, {})))
if workers:  # Ray started before the clock, as in a build (where it runs already)
    import ray
    from pipeline.extract.runners import init_ray
    init_ray()
    ray.get(ray.remote(lambda: 1).remote())
t0 = time.perf_counter()
out, rec = sp.sample(plan, tasks, make_task_runner(workers == 0, workers), size)
print(json.dumps({"workers": workers, "seconds": round(time.perf_counter() - t0, 1),
                  "driver_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  **{k: rec[k] for k in ("images", "sampled", "passes")}}))
"""


def sample(a: argparse.Namespace) -> None:
    """The sampling pass alone, in a fresh process per worker count (the driver's own peak RSS: Ray's processes are
    not counted)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for w in a.workers:
        p = subprocess.run([sys.executable, "-c", SAMPLE_PROBE, a.features, str(a.size), str(w)], capture_output=True,
                           text=True, env=env, check=False)
        if p.returncode:
            raise RuntimeError(f"sample probe failed: {p.stderr[-3000:]}")
        print(p.stdout.strip().splitlines()[-1], f"load {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)


def scale(a: argparse.Namespace) -> None:
    """Build and search synthetic corpora; print the table."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows = []
    for n in a.sizes:
        feats = gen(a.root, n, a.shard_size)
        for w in a.workers:
            out = os.path.join(a.root, f"index-{n}-w{w}")
            subprocess.run(["rm", "-rf", out], check=True)
            cmd = [sys.executable, str(ROOT / "jobs" / "index.py"), "--features", feats, "--output", out,
                   "--pca-sample", str(a.pca_sample), "--memory-budget-gb", str(a.budget_gb), "--workers", str(w)]
            if a.factory:
                cmd += ["--factory", a.factory]
            if w == 0:
                cmd = [*cmd[:-2], "--in-process"]
            rss, wall, _ = _time_v(cmd, env)
            m = json.loads(Path(out, "_SUCCESS.json").read_text())
            # Under /usr/bin/time too: a child forked from this (large) process would report this process's peak as
            # its own ru_maxrss (Linux keeps the pre-exec high-water mark).
            srss, _, sout = _time_v([sys.executable, "-c", SEARCH_PROBE, out, str(a.queries)], env)
            sr = {**json.loads(sout.strip().splitlines()[-1]), "rss_mb": srss}
            rows.append({"images": n, "workers": w or "in-process", "driver_rss_mb": round(rss),
                         "task_rss_mb": m["tasks"]["max_rss_mb"], "wall_s": round(wall, 1),
                         "images_per_s": round(n / wall), "factory": m["factory"]["fused"],
                         "recall@10": m["recall"]["fused"]["value"], "search_rss_mb": round(sr["rss_mb"]),
                         "qps": round(sr["qps"], 1), "seconds": m["seconds"]})
            print(json.dumps(rows[-1]), flush=True)
            if not a.keep:
                subprocess.run(["rm", "-rf", out], check=True)
    print(f"\nload average {Path('/proc/loadavg').read_text().split()[:3]}")
    cols = ["images", "workers", "driver_rss_mb", "task_rss_mb", "wall_s", "images_per_s", "factory", "recall@10",
            "search_rss_mb", "qps"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("codecs")
    c.add_argument("--dataset", required=True)
    c.add_argument("--protocol", default="category")
    c.add_argument("--queries", default="")
    c.add_argument("--features", required=True)
    c.add_argument("--max-side", type=int, default=320)
    c.add_argument("--methods", default="crow+rerank,crow+rerank+qe,crow+regions,crow+regions+qe",
                   help="re-rank rows to score with each codec")
    r = sub.add_parser("recall")
    r.add_argument("--features", required=True)
    r.add_argument("--pca-dim", type=int, default=512)
    r.add_argument("--nprobe", type=int, default=32)
    r.add_argument("--budget-gb", type=float, default=8.0)
    r.add_argument("--factories", nargs="+", default=["IVFNLIST,SQ8", "IVFNLIST,PQ64", "IVFNLIST,PQ64,RFlat"])
    s = sub.add_parser("scale")
    s.add_argument("--root", default="/work/runs-13")
    s.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000])
    s.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray workers (0 = --in-process)")
    s.add_argument("--shard-size", type=int, default=1000)
    s.add_argument("--pca-sample", type=int, default=10_000)
    s.add_argument("--budget-gb", type=float, default=8.0)
    s.add_argument("--factory", default="")
    s.add_argument("--queries", type=int, default=50)
    s.add_argument("--keep", action="store_true")
    g = sub.add_parser("gen")
    g.add_argument("--root", default="/work/runs-13")
    g.add_argument("--size", type=int, required=True)
    g.add_argument("--shard-size", type=int, default=1000)
    m = sub.add_parser("sample")
    m.add_argument("--features", required=True)
    m.add_argument("--size", type=int, default=10_000, help="--pca-sample")
    m.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="Ray workers (0 = in-process)")
    a = p.parse_args()
    if a.cmd == "gen":
        print(gen(a.root, a.size, a.shard_size))
        return
    {"codecs": codecs, "recall": recall, "scale": scale, "sample": sample}[a.cmd](a)


if __name__ == "__main__":
    main()
