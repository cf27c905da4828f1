"""Draw each image's top-K significant regions with their scores into one PNG (like the paper's Fig. 1).

examples:
  sigregions draw --images data/caltech8/Leopards data/caltech8/airplanes --n 6 --output regions.png
  sigregions draw --images photo1.jpg photo2.jpg --regions 8 --backbone vgg16 --max-side 512
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipeline.bench.report import draw_regions_sheet, save_png
from pipeline.cli import HelpFormatter, add_common_flags, log_config, setup_logging, split_doc
from pipeline.config import BACKBONES, PROPOSERS, ConfigError, ModelConfig
from pipeline.io.images import decode_image
from pipeline.io.listing import IMAGE_EXTS
from pipeline.model.region_model import RegionModel

log = logging.getLogger("draw_regions")


def pick_images(paths: list[str], n: int) -> list[Path]:
    """The images to draw: files as given, directories' images in name order, taken round-robin across the
    arguments (so several class or landmark folders each contribute), at most ``n`` in all.

    Args:
        paths: image files and/or directories.
        n: how many images at most.

    Returns:
        The chosen image files.

    Raises:
        FileNotFoundError: a path is neither a file nor a directory.
    """
    groups: list[list[Path]] = []
    for p in map(Path, paths):
        if p.is_dir():
            groups.append(sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS))
        elif p.is_file():
            groups.append([p])
        else:
            raise FileNotFoundError(p)
    chosen: list[Path] = []
    depth = 0
    while len(chosen) < n and any(depth < len(g) for g in groups):
        chosen += [g[depth] for g in groups if depth < len(g)][: n - len(chosen)]
        depth += 1
    return chosen


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The command's flags (its own: it draws, it writes no features, so it has no config dataclass of its own)."""
    description, epilog = split_doc(__doc__)
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter,
                                allow_abbrev=False)
    add_common_flags(p)
    p.add_argument("--images", nargs="+", required=True, help="image files or directories (first images of each)")
    p.add_argument("--n", type=int, default=6, help="images drawn")
    p.add_argument("--regions", type=int, default=ModelConfig.regions, help="top-K regions per image")
    p.add_argument("--backbone", default=ModelConfig.backbone, choices=BACKBONES, help="CNN backbone")
    p.add_argument("--proposer", default=ModelConfig.proposer, choices=PROPOSERS, help="region proposer")
    p.add_argument("--checkpoint", default="", help="region-model checkpoint URL (for --proposer rpn)")
    p.add_argument("--max-side", type=int, default=ModelConfig.max_side, help="longer side fed to the CNN")
    p.add_argument("--region-scales", default=ModelConfig.region_scales, help="region pyramid scales (see extract)")
    p.add_argument("--columns", type=int, default=3, help="tiles per row")
    p.add_argument("--thumb", type=int, default=320, help="tile side in pixels")
    p.add_argument("--output", default="regions.png", help="PNG path or URL")
    return p


def main(argv: list[str] | None = None, prog: str = "jobs/draw_regions.py") -> int:
    """Parse flags, draw, write the PNG and print each image's boxes and scores as JSON.

    Args:
        argv: arguments (None = sys.argv[1:]).
        prog: program name for --help and error lines.

    Returns:
        The exit code (1 when no image could be decoded).
    """
    p = build_parser(prog)
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be >= 1")
    cfg = ModelConfig(backbone=args.backbone, proposer=args.proposer, regions=args.regions, max_side=args.max_side,
                      region_scales=args.region_scales, checkpoint=args.checkpoint)
    try:
        cfg.validate()
        files = pick_images(args.images, args.n)
    except ConfigError as e:
        p.error(str(e))
    except FileNotFoundError as e:
        p.error(f"--images: no such file or directory: {e}")
    setup_logging(args.verbose)
    log_config("draw_regions", cfg)

    decoded, names = [], []
    for f in files:
        d = decode_image(f.read_bytes(), max_side=cfg.max_side)
        if d.ok:
            decoded.append(d)
            names.append(f"{f.parent.name}/{f.name}")
        else:
            log.warning("skipping %s: %s (%s)", f, d.status, d.error)
    if not decoded:
        log.error("no decodable images among %s", [str(f) for f in files])
        return 1
    model = RegionModel(cfg)
    sizes = [(d.width, d.height) for d in decoded]
    # One image per forward pass: each image's regions are then exactly what it gets alone, whatever its size.
    outs = [model([d.array], [s])[0] for d, s in zip(decoded, sizes)]
    sheet = draw_regions_sheet([d.array for d in decoded], [o["boxes"] for o in outs], [o["scores"] for o in outs],
                               sizes=sizes, titles=names, thumb=args.thumb, columns=args.columns)
    save_png(sheet, args.output)
    print(json.dumps({"output": args.output, "images": [
        {"image": n, "size": list(s), "boxes": o["boxes"].round(1).tolist(), "scores": o["scores"].round(3).tolist()}
        for n, s, o in zip(names, sizes, outs)]}, indent=1))
    return 0
