"""Reports: report.json, Markdown tables, and contact-sheet pictures of queries and their results."""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from pipeline.io import storage


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of dict rows (floats with 4 decimals).

    Args:
        rows: the rows.
        columns: keys to show, in order.

    Returns:
        The table text.
    """
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def holdout_table(rows: Sequence[dict[str, Any]], tune: str, reports: Sequence[str],
                  baselines: Sequence[str]) -> str:
    """The Markdown table of a tune-on-one/report-on-many run (rows of ``pipeline.bench.paired.holdout_rows``).

    Scores with 4 decimals; gains in points (x100) with their bootstrap interval.

    Args:
        rows: the rows (``tune``, ``mean``, ``std``, ``lists``, ``gain_<b>``/``_lo``/``_hi``, optional ``seconds``,
            ``ms_per_query``).
        tune: the tune list's name.
        reports: the report lists' names, in order.
        baselines: the baselines whose gains are shown.

    Returns:
        The table text.
    """
    head = ["method", f"tune ({tune})", "report mean", "std", *reports, *(f"vs {b} (points, 95% CI)" for b in baselines),
            "s", "ms/query"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def gain(r: dict[str, Any], b: str) -> str:
        if f"gain_{b}" not in r:
            return ""
        return f"{100 * r[f'gain_{b}']:+.2f} [{100 * r[f'gain_{b}_lo']:+.2f}, {100 * r[f'gain_{b}_hi']:+.2f}]"

    for r in rows:
        cells = [r["method"], f"{r['tune']:.4f}", f"{r['mean']:.4f}", "" if r["std"] is None else f"{r['std']:.4f}",
                 *(f"{r['lists'][n]:.4f}" for n in reports), *(gain(r, b) for b in baselines),
                 "" if r.get("seconds") is None else f"{r['seconds']:.2f}",
                 "" if r.get("ms_per_query") is None else f"{r['ms_per_query']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_sheet(query_paths: Sequence[str], result_paths: Sequence[Sequence[str]],
                  relevant: Sequence[Sequence[bool]], thumb: int = 128, pad: int = 6) -> Image.Image:
    """A picture like the paper's Fig. 5: one row per query, the query (blue frame) then its top results, each framed
    green when relevant and red when not.

    Args:
        query_paths: local image paths of the queries.
        result_paths: per query, local paths of its ranked results.
        relevant: per query, whether each result is relevant.
        thumb: thumbnail side in pixels.
        pad: frame width in pixels.

    Returns:
        The RGB picture.
    """
    cols = 1 + max((len(r) for r in result_paths), default=0)
    cell = thumb + 2 * pad
    sheet = Image.new("RGB", (cols * cell + pad, len(query_paths) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (q, res, rel) in enumerate(zip(query_paths, result_paths, relevant)):
        items = [(q, (40, 90, 220))] + [(p, (30, 160, 60) if ok else (210, 40, 40)) for p, ok in zip(res, rel)]
        for col, (path, colour) in enumerate(items):
            x, y = col * cell + (pad if col else 0), row * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour)
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
                im.thumbnail((thumb, thumb))
                sheet.paste(im, (x + pad + (thumb - im.width) // 2, y + pad + (thumb - im.height) // 2))
    return sheet


def save_png(img: Image.Image, url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write a picture as PNG to any fsspec URL."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    storage.write_bytes(url, buf.getvalue(), storage_options)


def to_jsonable(obj: Any) -> Any:
    """numpy scalars/arrays -> plain Python, recursively (for report.json)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


# Rank colours of region boxes: rank 1 red, then orange, yellow, green, cyan, blue, purple, magenta (cycled).
RANK_COLOURS = ((230, 25, 25), (255, 140, 0), (240, 220, 0), (40, 200, 60), (0, 200, 220), (40, 90, 255),
                (150, 60, 230), (240, 50, 200))


def draw_regions_sheet(images: Sequence[np.ndarray | Image.Image], boxes: Sequence[np.ndarray],
                       scores: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]] | None = None,
                       titles: Sequence[str] | None = None, thumb: int = 320, columns: int = 3,
                       pad: int = 8, caption: int = 20) -> Image.Image:
    """A picture like the paper's Fig. 1: each image with its top-K region boxes, tiled into one sheet.

    Boxes are drawn in rank colours (``RANK_COLOURS``: rank 1 red, 2 orange, 3 yellow, ...), the best on top, each
    labelled "rank:score" at its top-left corner; each tile is the image fitted into a ``thumb`` x ``thumb`` square
    with its title (e.g. the file name) underneath.

    Args:
        images: RGB uint8 arrays (h, w, 3) or PIL images.
        boxes: per image, (K, 4) boxes [x0, y0, x1, y1] in the pixels of a ``sizes[i]`` frame, best first.
        scores: per image, (K,) scores.
        sizes: per image, the (width, height) frame the boxes refer to (e.g. the original image when the arrays are
            resized copies); default: each image's own size.
        titles: per image, a caption; default: none.
        thumb: side of each tile's square, pixels.
        columns: tiles per row (fewer when there are fewer images).
        pad: gap between tiles and around the sheet, pixels.
        caption: height of the caption strip under each tile, pixels.

    Returns:
        The RGB sheet, ``cols * (thumb + pad) + pad`` wide and ``rows * (thumb + caption + pad) + pad`` high, with
        ``cols = min(len(images), columns)`` and ``rows = ceil(len(images) / cols)``.
    """
    from PIL import ImageFont

    n = len(images)
    if n == 0:
        raise ValueError("draw_regions_sheet: no images")
    if len(boxes) != n or len(scores) != n:
        raise ValueError(f"draw_regions_sheet: {n} images but {len(boxes)} box sets and {len(scores)} score sets")
    cols = max(1, min(n, columns))
    rows = -(-n // cols)
    sheet = Image.new("RGB", (cols * (thumb + pad) + pad, rows * (thumb + caption + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
        font = ImageFont.load_default()
    for i, image in enumerate(images):
        im = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
        fw, fh = sizes[i] if sizes is not None else im.size
        f = min(thumb / im.width, thumb / im.height)
        tw, th = max(1, round(im.width * f)), max(1, round(im.height * f))
        im = im.resize((tw, th), Image.Resampling.BILINEAR)
        x0 = pad + (i % cols) * (thumb + pad) + (thumb - tw) // 2
        y0 = pad + (i // cols) * (thumb + caption + pad) + (thumb - th) // 2
        sheet.paste(im, (x0, y0))
        sx, sy = tw / fw, th / fh
        b = np.asarray(boxes[i], dtype=np.float64).reshape(-1, 4)
        s = np.asarray(scores[i], dtype=np.float64).reshape(-1)
        rects = []
        for bx0, by0, bx1, by1 in b:
            px0, py0 = x0 + min(max(bx0 * sx, 0), tw - 1), y0 + min(max(by0 * sy, 0), th - 1)
            px1, py1 = x0 + min(max(bx1 * sx, 0), tw) - 1, y0 + min(max(by1 * sy, 0), th) - 1
            rects.append((px0, py0, max(px0, px1), max(py0, py1)))
        for rank in range(len(rects) - 1, -1, -1):  # worst first, so the best box is drawn on top
            draw.rectangle(rects[rank], outline=RANK_COLOURS[rank % len(RANK_COLOURS)], width=3 if rank == 0 else 2)
        placed: list[tuple[float, float, float, float]] = []
        for rank, (px0, py0, _, _) in enumerate(rects):  # best first: it keeps its natural label position
            colour = RANK_COLOURS[rank % len(RANK_COLOURS)]
            label = f"{rank + 1}:{s[rank]:.2f}" if rank < len(s) else f"{rank + 1}"
            lx0, ly0, lx1, ly1 = draw.textbbox((0, 0), label, font=font)
            lw, lh = lx1 - lx0 + 4, ly1 - ly0 + 3
            lx, ly = min(px0 + 3, x0 + tw - lw), min(py0 + 3, y0 + th - lh)
            # Boxes often share a corner (e.g. the whole image and a grid cell): stack their labels downwards.
            while any(lx < qx1 and qx0 < lx + lw and ly < qy1 and qy0 < ly + lh for qx0, qy0, qx1, qy1 in placed):
                ly += lh
            ly = min(ly, y0 + th - lh)
            placed.append((lx, ly, lx + lw, ly + lh))
            draw.rectangle([lx, ly, lx + lw, ly + lh], fill=colour)
            draw.text((lx + 2 - lx0, ly + 1 - ly0), label, fill=(0, 0, 0) if sum(colour) > 400 else (255, 255, 255),
                      font=font)
        if titles is not None:
            title = str(titles[i])
            cx = pad + (i % cols) * (thumb + pad)
            cy = pad + (i // cols) * (thumb + caption + pad) + thumb + 2
            while len(title) > 4 and draw.textlength(title, font=font) > thumb:
                title = "..." + title[4:]
            draw.text((cx, cy), title, fill=(0, 0, 0), font=font)
    return sheet
