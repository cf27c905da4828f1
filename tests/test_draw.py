"""The regions picture (paper Fig. 1): sheet geometry, rank-coloured boxes, and the jobs/draw_regions.py command."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.bench.report import RANK_COLOURS, draw_regions_sheet
from pipeline.commands.draw_regions import pick_images
from pipeline.config import SAMPLE_DATA

ROOT = Path(__file__).resolve().parents[1]


def test_sheet_size_and_rank_colours_for_two_images() -> None:
    grey = np.full((50, 100, 3), 128, np.uint8)  # landscape: 100 x 50 -> 200 x 100 in a 200 tile
    dark = np.full((80, 40, 3), 30, np.uint8)  # portrait
    boxes = [np.array([[0, 0, 400, 200], [100, 50, 300, 150]], np.float32), np.array([[10, 10, 30, 70]], np.float32)]
    scores = [np.array([1.0, 0.5], np.float32), np.array([0.9], np.float32)]
    sheet = draw_regions_sheet([grey, dark], boxes, scores, sizes=[(400, 200), (40, 80)], titles=["a.jpg", "b.jpg"],
                               thumb=200, columns=3, pad=8, caption=20)
    assert sheet.mode == "RGB"
    assert sheet.size == (2 * (200 + 8) + 8, 1 * (200 + 20 + 8) + 8)  # cols = min(2, 3), one row
    px = np.asarray(sheet)
    # Tile 0: the image fills 200 x 100 centred vertically at (8, 8 + 50); rank 1 (red) outlines the whole image,
    # rank 2 (orange) the middle half, drawn from boxes given in a 400 x 200 frame.
    x0, y0 = 8, 8 + 50
    assert tuple(px[y0 + 100 - 1, x0 + 100]) == RANK_COLOURS[0]  # bottom edge of the whole-image box
    assert tuple(px[y0 + 50, x0 + 50]) == RANK_COLOURS[1]  # left edge of box 2 (x = 100 / 2, y in 25..75)
    assert tuple(px[y0 + 60, x0 + 100]) == (128, 128, 128)  # inside: the image itself
    assert tuple(px[4, 4]) == (255, 255, 255)  # padding stays white
    # Two columns and rows for 5 images in columns of 2.
    five = draw_regions_sheet([grey] * 5, boxes[:1] * 5, scores[:1] * 5, thumb=64, columns=2, pad=4, caption=10)
    assert five.size == (2 * (64 + 4) + 4, 3 * (64 + 10 + 4) + 4)
    with pytest.raises(ValueError):
        draw_regions_sheet([grey], [], [])


def test_draw_regions_command_writes_the_png(tmp_path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    spec = importlib.util.spec_from_file_location("draw_regions_job", ROOT / "jobs" / "draw_regions.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    # Directories contribute round-robin: two folders, n=2 -> the first image of each.
    picked = pick_images([str(SAMPLE_DATA / "Leopards"), str(SAMPLE_DATA / "watch")], 2)
    assert [p.parent.name for p in picked] == ["Leopards", "watch"]
    out = tmp_path / "regions.png"
    rc = job.main(["--images", str(SAMPLE_DATA / "Leopards"), str(SAMPLE_DATA / "watch"), "--n", "2",
                   "--regions", "3", "--max-side", "128", "--thumb", "100", "--output", str(out)])
    assert rc == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (2 * (100 + 8) + 8, 100 + 20 + 8 + 8)
    monkeypatch.undo()
