"""A/B of the whole extraction command, `python jobs/extract.py`, between checkouts and runners, interleaved in one run.

Each measurement is a fresh process, as a user runs it: ``python <checkout>/jobs/extract.py --input <corpus> --output
<new dir> ...`` with that checkout first on ``PYTHONPATH`` (its Ray workers inherit it), either on Ray (the process
starts its own local Ray instance with every core, Ray's worker niceness set to 0 so that both arms run at the same
priority) or ``--in-process`` (no Ray). An arm is ``label=checkout:runner``; rounds visit the arms in a rotating order
so slow drifts of a shared machine's load hit them alike. It prints, per measurement, the process's wall time
(interpreter start to exit: imports, Ray start, actor start, model load, inference, writes), images/s over it and
the manifest's own figure, then per arm the median, and the per-round ratio of every arm to the first arm.

    python benchmarks/extract_ab.py --n 480 --rounds 3 \\
        --arm ray=.:ray --arm in-process=.:in-process --arm ray-before=/work/wt-old:ray

The corpus is data/caltech8's photos replicated to ``--n`` images under distinct names (as extract_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_bench import make_corpus  # noqa: E402


def parse_arm(text: str) -> tuple[str, Path, str, list[str]]:
    """``label=checkout:runner[:flags]`` -> (label, checkout, runner, extra flags); runner is ``ray`` or
    ``in-process``; flags (space-separated) are added to that arm's command only."""
    label, _, rest = text.partition("=")
    checkout, _, rest = rest.partition(":")
    runner, _, extra = rest.partition(":")
    if not label or not checkout or runner not in ("ray", "in-process"):
        raise SystemExit(f"--arm {text!r}: expected label=checkout:ray[:flags] or label=checkout:in-process[:flags]")
    root = Path(checkout).resolve()
    if not (root / "jobs" / "extract.py").is_file():
        raise SystemExit(f"--arm {text!r}: {root} has no jobs/extract.py")
    return label, root, runner, extra.split()


def run_once(root: Path, runner: str, corpus: Path, out: Path, flags: list[str]) -> dict[str, float]:
    """One fresh ``jobs/extract.py`` process; its wall time and the manifest's figures."""
    env = {**os.environ, "PYTHONPATH": str(root), "RAY_worker_niceness": "0"}
    env.pop("RAY_ADDRESS", None)  # each Ray arm starts (and pays for) its own local instance
    cmd = [sys.executable, str(root / "jobs" / "extract.py"), "--input", str(corpus), "--output", str(out), *flags]
    if runner == "in-process":
        cmd.append("--in-process")
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)  # the failure is reported below
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    run = json.loads((out / "manifest.json").read_text())["run"]
    assert run["images"] == run["ok"], run["statuses"]
    layout = [ln.split(": ", 1)[-1] for ln in proc.stderr.splitlines() if "model actor(s)" in ln]
    return {"images": run["images"], "wall_s": wall, "images_per_s": run["images"] / wall,
            "manifest_images_per_s": run["images_per_s"], "manifest_elapsed_s": run["elapsed_s"],
            "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
            "layout": layout[0] if layout else "in-process"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--arm", action="append", required=True,
                   help="label=checkout:runner[:flags] (runner: ray | in-process; flags: that arm's extra extract "
                        "flags, e.g. 'one-actor=.:ray:--num-actors 1 --threads 2'); ratios are to the first arm")
    p.add_argument("--n", type=int, default=480, help="images")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--flags", default="--max-side 224 --regions 6 --shard-size 32 --batch-size 16",
                   help="extract flags common to every arm")
    p.add_argument("--workdir", default="", help="where the corpus and outputs go (default: a temp dir, removed)")
    args = p.parse_args(argv)
    arms = [parse_arm(a) for a in args.arm]
    if len({a[0] for a in arms}) != len(arms):
        raise SystemExit("arm labels must differ")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="extract_ab_"))
    corpus = make_corpus(work / "corpus", args.n)
    flags = args.flags.split()
    print(f"# extract_ab: {os.cpu_count()} cores, {args.n} images, flags {args.flags!r}, load avg "
          f"{os.getloadavg()[0]:.1f}; arms: " + ", ".join(f"{lab}={root}:{r}:{' '.join(x)}" for lab, root, r, x in arms),
          flush=True)
    results: dict[str, list[dict[str, float]]] = {lab: [] for lab, _, _, _ in arms}
    try:
        for rnd in range(args.rounds):
            k = rnd % len(arms)
            for lab, root, runner, extra in arms[k:] + arms[:k]:  # rotate who goes first
                out = work / f"out-{lab}-{rnd}"
                r = run_once(root, runner, corpus, out, flags + extra)
                shutil.rmtree(out, ignore_errors=True)
                results[lab].append(r)
                print(f"round {rnd} {lab:>14}: {r['images_per_s']:6.2f} img/s over the process "
                      f"({r['wall_s']:.1f} s), manifest {r['manifest_images_per_s']:.2f} img/s "
                      f"({r['manifest_elapsed_s']:.1f} s) | load {r['load_avg_1m']} | {r['layout']}", flush=True)
        first = arms[0][0]
        print("# median images/s over the process (ratio to the first arm per round: median [min, max])")
        for lab, _, _, _ in arms:
            rates = [r["images_per_s"] for r in results[lab]]
            ratios = [a["images_per_s"] / b["images_per_s"] for a, b in zip(results[lab], results[first])]
            print(f"{lab:>14}: {statistics.median(rates):6.2f} img/s | vs {first}: {statistics.median(ratios):.3f} "
                  f"[{min(ratios):.3f}, {max(ratios):.3f}]")
        print(json.dumps(results, indent=1))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
