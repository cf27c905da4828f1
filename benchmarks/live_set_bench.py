"""Live-set benchmark: peak RSS and time of resolving an extraction's live set and planning an incremental run, the
old way (one dict over every id from inline JSON markers) against the per-shard way (Parquet id lists).

Each size gets a synthetic history written twice (format 1 JSON markers, format 2 Parquet id lists; no data files,
the resolution reads only id lists): generation 1 all ids, then reruns that change a share of the ids (cut in shards
from the sorted changed ids, as runs cut them), retry a few and delete some. Every measurement runs in its own
process under ``/usr/bin/time -v``.

  python benchmarks/live_set_bench.py --sizes 100000,1000000 --root /work/runs-13b/live
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# Runnable as a plain script from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.io import listing, storage  # noqa: E402
from pipeline.store import feature_store as fstore  # noqa: E402

SHARD = 256
# (share of ids reprocessed with a new fingerprint, share deleted) per rerun generation.
RERUNS = ((0.10, 0.0), (0.05, 0.01), (0.20, 0.01))
RETRY = 0.001


def image_id(i: int) -> str:
    return f"class{i % 101:03d}/image_{i:08d}.jpg"


def fingerprint(i: int, gen: int) -> str:
    return f"{1000 + i % 977}-{gen}"


def generate(root: Path, n: int, seed: int = 0) -> dict:
    """Write the history under root/json and root/parquet; returns the final fingerprints' generation per id."""
    rng = np.random.default_rng(seed)
    order = sorted(range(n), key=image_id)  # ids in string order, as listings sort them
    version = np.ones(n, dtype=np.int32)
    alive = np.ones(n, dtype=bool)
    gens = [(1, np.array(order), np.zeros(0, dtype=np.int64))]
    for g, (change, delete) in enumerate(RERUNS, start=2):
        pick = np.array([i for i in order if alive[i] and rng.random() < change], dtype=np.int64)
        version[pick] = g
        gone = np.array([i for i in order if alive[i] and rng.random() < delete], dtype=np.int64)
        alive[gone] = False
        gens.append((g, pick, gone))
    # Each shard's retry ids drawn once, so both formats hold the same history.
    retries = {(g, s): [image_id(int(i)) for i in pick[s:s + SHARD] if rng.random() < RETRY]
               for g, pick, _ in gens for s in range(0, len(pick), SHARD)}
    for fmt in ("json", "parquet"):
        out = str(root / fmt)
        for g, pick, gone in gens:
            for s in range(0, len(pick), SHARD):
                part = pick[s:s + SHARD]
                ids = [image_id(int(i)) for i in part]
                fps = [fingerprint(int(i), g) for i in part]
                retry = retries[(g, s)]
                sid = fstore.shard_id(g, s // SHARD)
                if fmt == "json":
                    storage.write_json(fstore.shard_paths(out, sid)["done"],
                                       {"shard": sid, "generation": g, "kind": "data",
                                        "images": [list(p) for p in zip(ids, fps)], "retry": retry,
                                        "stats": {"images": len(ids)}})
                else:
                    fstore.write_data_marker(out, sid, g, ids, fps, retry, stats={"images": len(ids)})
            if len(gone):
                ids = [image_id(int(i)) for i in gone]
                if fmt == "json":
                    sid = f"g{g:05d}-deleted"
                    storage.write_json(fstore.shard_paths(out, sid)["done"],
                                       {"shard": sid, "generation": g, "kind": "deleted", "images": ids})
                else:
                    fstore.write_deletions(out, g, ids)
    np.save(root / "version.npy", version)
    np.save(root / "alive.npy", alive)
    return {"generations": len(gens), "markers": len(fstore.read_done_markers(str(root / "parquet")))}


def listing_of(root: Path, n: int) -> list[listing.ImageRecord]:
    """The next run's listing: the ids still alive less 1% (removed since), 5% of them changed again, sorted."""
    version = np.load(root / "version.npy")
    alive = np.load(root / "alive.npy")
    rng = np.random.default_rng(1)
    recs = [listing.ImageRecord(image_id(i), f"file:///x/{image_id(i)}",
                                fingerprint(i, int(version[i])) if rng.random() >= 0.05 else "changed")
            for i in range(n) if alive[i] and rng.random() >= 0.01]
    recs.sort(key=lambda r: r.image_id)
    return recs


def old_plan(records: list[listing.ImageRecord], markers: list[dict]) -> tuple[int, int]:
    """The planning before: one live dict, a set of listed ids (what plan_shards did)."""
    live = fstore.live_images(markers)
    pending = [r for r in records if live.get(r.image_id, ("", None))[1] != r.fingerprint]
    listed = {r.image_id for r in records}
    deleted = sorted(set(live) - listed)
    return len(pending), len(deleted)


def measure(what: str, root: Path, n: int) -> dict:
    """One measurement (run in a child process): returns its result and seconds."""
    t0 = time.perf_counter()
    if what == "listing":
        res = len(listing_of(root, n))
    elif what == "live-old":
        res = len(fstore.live_images(fstore.read_done_markers(str(root / "json"))))
    elif what == "live-new":
        res = fstore.count_live(str(root / "parquet"))
    elif what == "plan-old":
        recs = listing_of(root, n)
        t0 = time.perf_counter()  # the listing is the same for both: time the planning only
        res = old_plan(recs, fstore.read_done_markers(str(root / "json")))
    elif what == "plan-new":
        from pipeline.extract.plan import plan_shards

        recs = listing_of(root, n)
        t0 = time.perf_counter()
        plan = plan_shards(recs, fstore.read_done_markers(str(root / "parquet")), SHARD)
        res = (plan.images, len(plan.deleted))
    else:
        raise ValueError(what)
    return {"result": res, "seconds": round(time.perf_counter() - t0, 2)}


def run_child(what: str, root: Path, n: int) -> dict:
    """Run one measurement under /usr/bin/time -v: its result, seconds and peak RSS (MiB)."""
    cmd = ["/usr/bin/time", "-v", sys.executable, __file__, "--child", what, "--dir", str(root), "--n", str(n)]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return {**json.loads(p.stdout.strip().splitlines()[-1]), "peak_rss_mib": round(rss_kb / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--root", default="/work/runs-13b/live")
    ap.add_argument("--keep", action="store_true", help="keep the generated outputs")
    ap.add_argument("--child", default="")
    ap.add_argument("--dir", default="")
    ap.add_argument("--n", type=int, default=0)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a.child, Path(a.dir), a.n)))
        return
    print(f"load average: {os.getloadavg()}")
    rows = []
    for n in (int(s) for s in a.sizes.split(",")):
        root = Path(a.root) / str(n)
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        info = generate(root, n)
        print(f"n={n}: wrote {info['markers']} markers over {info['generations']} generations in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        got = {w: run_child(w, root, n) for w in ("listing", "live-old", "live-new", "plan-old", "plan-new")}
        assert got["live-old"]["result"] == got["live-new"]["result"], got
        assert list(got["plan-old"]["result"]) == list(got["plan-new"]["result"]), got
        for w, r in got.items():
            rows.append((n, w, r["result"], r["seconds"], r["peak_rss_mib"]))
            print(f"| {n:,} | {w} | {r['result']} | {r['seconds']} | {r['peak_rss_mib']} |", flush=True)
        if not a.keep:
            shutil.rmtree(root)
    print(f"load average: {os.getloadavg()}")
    print("| images | measurement | result | seconds | peak RSS MiB |\n|---|---|---|---|---|")
    for n, w, res, s, rss in rows:
        print(f"| {n:,} | {w} | {res} | {s} | {rss} |")


if __name__ == "__main__":
    main()
