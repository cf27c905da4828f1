"""Reports: report.json, Markdown tables, and contact-sheet pictures of queries and their results."""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from pipeline import storage


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
