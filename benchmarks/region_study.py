"""Region-descriptor study on a Caltech-101 subset: which extraction-side choice makes `ours` gain most over `global`.

One pass over the images computes, per image, the global feature (SPoC of MobileNetV2's last conv map) and several local
features (paper eq. 1-2 over the top-K activation regions) that differ in where the regions are described:

- ``s32_gem`` / ``s32_mac``: RoIAlign on the stride-32 map (the pipeline's default is s32_gem);
- ``s16_gem`` / ``s16_mac``: the last stage re-run with dilation 2 instead of stride 2 (output stride 16, the paper's
  conv5 stride), proposals and RoIAlign on that finer map;
- ``crop_spoc``: each of the top ``--crops`` regions cropped from the image, resized, and re-described by the whole
  backbone (SPoC), i.e. a recognition network that sees the region at full resolution.

Then it prints mean top-10 precision (fixed query list, restricted to the subset) of global and of ours (PCA + L2 of
concat(l2n global, l2n local)) for each local variant.

With ``--combine A.npz B.npz ...`` (files written by ``--save`` at different ``--max-side`` on the same subset) it
instead scores pyramids: the global feature of the first file fused with the sum of the files' local features.

Usage: .venv/bin/python benchmarks/region_study.py --dataset ../shared/datasets/caltech101 --n 2500 --max-side 320
       .venv/bin/python benchmarks/region_study.py --dataset ../shared/datasets/caltech101 --combine s320.npz s224.npz
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchvision.ops import roi_align  # noqa: E402

from pipeline.bench import datasets as ds  # noqa: E402
from pipeline.bench import metrics as ev  # noqa: E402
from pipeline.bench.metrics import rank_by_similarity  # noqa: E402
from pipeline.io.images import decode_image  # noqa: E402
from pipeline.model import descriptors as D  # noqa: E402
from pipeline.model.backbones import build_backbone  # noqa: E402
from pipeline.model.proposals import ActivationProposer  # noqa: E402
from pipeline.model.recognition import pool_roi  # noqa: E402
from pipeline.model.transform import normalise  # noqa: E402
from pipeline.reduce.pca import PCA, fuse, l2n  # noqa: E402


def dilated_tail(features: torch.nn.Module) -> torch.nn.Module:
    """MobileNetV2 blocks 14-18 with the stride-2 depthwise conv set to stride 1 and the later depthwise convs dilated
    by 2 (DeepLab's output-stride-16 trick): the same ImageNet weights, a map twice as fine."""
    tail = copy.deepcopy(torch.nn.Sequential(*list(features.children())[14:]))
    for i, block in enumerate(list(tail.children())[:4]):
        dw = block.conv[1][0]
        if i == 0:
            dw.stride = (1, 1)
        else:
            dw.dilation, dw.padding = (2, 2), (2, 2)
    return tail.eval()


def region_locals(fm: torch.Tensor, stride: int, h: int, w: int, k: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Top-k activation regions of one map (C, hc, wc), proposed once -> (boxes in pixels, {pool: local feature}) for
    GeM and MAC region descriptors (eq. 1-2 over the regions)."""
    [(b, _)] = ActivationProposer(stride, nms_iou=0.5).propose(fm[None], [(h, w)], k)
    x = roi_align(fm[None], [b], output_size=7, spatial_scale=1.0 / stride, sampling_ratio=2, aligned=True)
    return b, {pool: D.sum_pool_l1(pool_roi(x, pool)) for pool in ("gem", "mac")}


def _scorers(labels: np.ndarray, qrows: np.ndarray):
    """Mean top-10 precision of a vector set, and of the paper's fusion (PCA-512 + L2 of l2n global, w * l2n local)."""

    def p10(x: np.ndarray) -> float:
        x = l2n(x)
        ranks = rank_by_similarity(x[qrows], x, 11)
        return float(np.mean(ev.precision_at_k(ranks, labels, labels[qrows], k=10, query_db_index=qrows)))

    def ours(g: np.ndarray, loc: np.ndarray, w: float = 1.0) -> float:
        f = fuse(g, loc, w)
        return p10(PCA.fit(f, 512).transform(f))

    return p10, ours


def combine(dataset: str, queries: str | None, files: list[str]) -> None:
    """Score two- and three-level pyramids from runs saved at different resolutions (same subset, same order)."""
    Z = [np.load(f) for f in files]
    paths = list(Z[0]["paths"])
    if any(list(z["paths"]) != paths for z in Z):
        raise SystemExit("the files hold different subsets")
    qlist = ds.read_query_list(queries or str(Path(dataset) / "queries_5pct_seed0.txt"))
    row_of = {p: i for i, p in enumerate(paths)}
    qrows = np.array([row_of[p] for p in qlist], dtype=np.int64)
    p10, ours = _scorers(Z[0]["labels"], qrows)
    for f, z in zip(files, Z):
        print(f"{f}: global {p10(z['global']):.4f}  local {p10(z['s32_gem']):.4f}  ours {ours(z['global'], z['s32_gem']):.4f}")
    g = Z[0]["global"]
    for n in range(2, len(Z) + 1):
        loc = sum(z["s32_gem"] for z in Z[:n])
        gms = sum(l2n(z["global"]) for z in Z[:n])
        print(f"pyramid {' + '.join(files[:n])}: global of all levels {p10(gms):.4f}, local alone {p10(loc):.4f}, ours "
              + ", ".join(f"w={w} {ours(g, loc, w):.4f}" for w in (1.0, 1.5, 2.0, 3.0)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--queries", default=None, help="default: <dataset>/queries_5pct_seed0.txt")
    ap.add_argument("--n", type=int, default=2000, help="subset size (all queries + random others)")
    ap.add_argument("--max-side", type=int, default=320)
    ap.add_argument("--regions", type=int, default=12)
    ap.add_argument("--crops", type=int, default=3, help="regions re-described from image crops (0 = skip)")
    ap.add_argument("--crop-side", type=int, default=224)
    ap.add_argument("--s16", type=int, default=1, help="1 = also the dilated stride-16 variants")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default=None, help="write the vectors to this .npz")
    ap.add_argument("--combine", nargs="+", default=None, help="score pyramids of saved runs instead of extracting")
    a = ap.parse_args()
    if a.combine:
        combine(a.dataset, a.queries, a.combine)
        return
    torch.set_num_threads(a.threads)

    lset = ds.load_labelled_set(a.dataset, merge={"Faces_easy": "Faces"})
    queries = ds.read_query_list(a.queries or str(Path(a.dataset) / "queries_5pct_seed0.txt"))
    qset = set(queries)
    others = [p for p in lset.paths if p not in qset]
    random.Random(a.seed).shuffle(others)
    paths = sorted(queries + others[: max(0, a.n - len(queries))])
    labels = np.array([lset.labels[lset.index_of(p)] for p in paths])

    bb = build_backbone("mobilenet_v2")
    trunk = torch.nn.Sequential(*list(bb.features.children())[:14]).eval()
    tail32 = torch.nn.Sequential(*list(bb.features.children())[14:]).eval()
    tail16 = dilated_tail(bb.features)
    K = a.regions
    vec: dict[str, list[np.ndarray]] = {}

    def put(name: str, v: torch.Tensor) -> None:
        vec.setdefault(name, []).append(v.float().numpy())

    t0 = time.perf_counter()
    with torch.inference_mode():
        for n, p in enumerate(paths):
            d = decode_image((Path(a.dataset) / p).read_bytes(), max_side=a.max_side)
            im = d.array
            h, w = im.shape[:2]
            x = normalise(torch.from_numpy(np.ascontiguousarray(im))[None], bb)
            mid = trunk(x)
            f32 = tail32(mid)[0]
            put("global", D.spoc(f32))
            put("rmac", D.rmac(f32))
            put("gem", D.gem(f32))
            boxes32, loc = region_locals(f32, 32, h, w, K)
            for pool, v in loc.items():
                put(f"s32_{pool}", v)
            if a.s16:
                f16 = tail16(mid)[0]
                put("global16", D.spoc(f16))
                for pool, v in region_locals(f16, 16, h, w, K)[1].items():
                    put(f"s16_{pool}", v)
            if a.crops:
                descs = []
                for b in boxes32[: a.crops]:
                    x0, y0, x1, y1 = [int(round(float(v))) for v in b]
                    crop = x[:, :, y0:max(y1, y0 + 16), x0:max(x1, x0 + 16)]
                    ch, cw = crop.shape[-2:]
                    s = a.crop_side / max(ch, cw)
                    crop = F.interpolate(crop, size=(max(32, round(ch * s)), max(32, round(cw * s))), mode="bilinear",
                                         align_corners=False)
                    descs.append(D.spoc(bb.features(crop)[0]))
                put("crop_spoc", D.sum_pool_l1(torch.stack(descs)))
            if (n + 1) % 200 == 0:
                el = time.perf_counter() - t0
                print(f"{n + 1}/{len(paths)} images, {(n + 1) / el:.1f} img/s", flush=True)
    V = {k: np.stack(v) for k, v in vec.items()}
    if a.save:
        np.savez(a.save, paths=np.array(paths), labels=labels, **V)

    row_of = {p: i for i, p in enumerate(paths)}
    qrows = np.array([row_of[p] for p in queries], dtype=np.int64)

    p10, ours = _scorers(labels, qrows)
    print(f"\n{len(paths)} images, {len(qrows)} queries, max side {a.max_side}, K={K}, "
          f"{len(paths) / (time.perf_counter() - t0):.1f} img/s")
    for m in ("global", "global16", "rmac", "gem"):
        if m in V:
            print(f"{m:10s} {p10(V[m]):.4f}")
    for loc in ("s32_gem", "s32_mac", "s16_gem", "s16_mac", "crop_spoc"):
        if loc in V:
            print(f"local {loc:10s} alone {p10(V[loc]):.4f}  ours {ours(V['global'], V[loc]):.4f}  "
                  + (f"ours(global16) {ours(V['global16'], V[loc]):.4f}" if "global16" in V else ""))


if __name__ == "__main__":
    main()
