"""Search a built index with a query image or a region of it, or with a folder of queries; region re-ranking, QE.

examples:
  sigregions search --index runs/demo/index --image photo.jpg --top-k 10 --rerank 100 --qe 5 [--json]
  sigregions search --index runs/demo/index --image photo.jpg --box 40,30,260,200 --rerank 100 --sheet hits.png
  sigregions search --index runs/demo/index --queries queries/ --boxes boxes.csv --rerank 100 --output results.parquet
  sigregions search --index s3://bucket/sigregions --image photo.jpg    # a `sigregions reindex` root: its CURRENT
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from typing import Any, Sequence

import numpy as np

from pipeline.bench.report import draw_regions_sheet, markdown_table, save_png
from pipeline.cli import run_job
from pipeline.config import Box, ConfigError, SearchConfig, parse_box
from pipeline.io import storage
from pipeline.io.images import decode_image
from pipeline.io.listing import list_images
from pipeline.retrieval.search import Hit, Searcher
from pipeline.schema import search_results_schema, to_table
from pipeline.store.versions import resolve_index

log = logging.getLogger(__name__)


def search(cfg: SearchConfig) -> int:
    """Answer one query (print the ranking as a Markdown table, or JSON with --json; draw it with --sheet), or a
    batch of queries (--queries: write the results Parquet).

    Args:
        cfg: the search's config.

    Returns:
        The exit code.
    """
    so = cfg.fs_options
    searcher = Searcher(resolve_index(cfg.index, so), so)  # a re-index root: the version its CURRENT names
    if cfg.queries:
        n = search_batch(searcher, cfg)
        print(json.dumps({"output": cfg.output, "rows": n}))
        return 0
    box = parse_box(cfg.box) if cfg.box else None
    outs = _describe(searcher, [cfg.image], [box])
    ids, scores = searcher.search_vectors(outs, cfg.top_k, cfg.rerank, cfg.qe, cfg.space, cfg.rerank_mode)
    hits = searcher.hits(outs, ids, scores, cfg.rerank_mode)[0]
    rows = [dataclasses.asdict(h) for h in hits]
    if cfg.sheet:
        save_png(hits_sheet(cfg.image, box, hits, so), cfg.sheet, so)
    print(json.dumps(rows, indent=2) if cfg.json
          else markdown_table(rows, ["rank", "image_id", "uri", "score", "matched_box"]))
    return 0


def _describe(searcher: Searcher, uris: list[str], boxes: list[Box | None]) -> list[dict[str, np.ndarray]]:
    """``Searcher.describe``, with an undecodable query or a box outside its image as a user error."""
    try:
        return searcher.describe(uris, boxes)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def read_boxes(url: str, so: dict[str, Any]) -> dict[str, Box]:
    """A query-regions CSV (``query_id,x1,y1,x2,y2`` with that header) -> query id -> box.

    Raises:
        ConfigError: a missing column, a bad box or a repeated query id.
    """
    text = storage.read_bytes(url, so).decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    want = ["query_id", "x1", "y1", "x2", "y2"]
    if reader.fieldnames is None or any(c not in reader.fieldnames for c in want):
        raise ConfigError(f"--boxes {url}: needs the columns {','.join(want)}; has {reader.fieldnames}")
    out: dict[str, Box] = {}
    for i, row in enumerate(reader):
        qid = row["query_id"]
        if qid in out:
            raise ConfigError(f"--boxes {url}: query {qid!r} listed twice")
        try:
            out[qid] = parse_box(",".join(row[c] for c in want[1:]))
        except ValueError as e:
            raise ConfigError(f"--boxes {url} row {i + 1}: {e}") from None
    return out


def search_batch(searcher: Searcher, cfg: SearchConfig) -> int:
    """Search every query of a folder or manifest in batches (one model, in this process) and write one results row
    per (query, rank) to ``cfg.output`` (schema: ``schema.search_results_schema``).

    Returns:
        The number of rows written.

    Raises:
        ConfigError: a box names a query that is not in the queries.
    """
    so = cfg.fs_options
    records = [r for r in list_images(cfg.queries, so) if not r.error]
    boxes = read_boxes(cfg.boxes, so) if cfg.boxes else {}
    unknown = sorted(set(boxes) - {r.image_id for r in records})
    if unknown:
        raise ConfigError(f"--boxes names queries that are not in {cfg.queries}: {unknown[:5]}")
    cols: dict[str, list] = {f.name: [] for f in search_results_schema()}
    for b0 in range(0, len(records), cfg.batch_size):
        batch = records[b0:b0 + cfg.batch_size]
        qboxes = [boxes.get(r.image_id) for r in batch]
        outs = _describe(searcher, [r.uri for r in batch], qboxes)
        ids, scores = searcher.search_vectors(outs, cfg.top_k, cfg.rerank, cfg.qe, cfg.space, cfg.rerank_mode)
        for r, qbox, hits in zip(batch, qboxes, searcher.hits(outs, ids, scores, cfg.rerank_mode)):
            for h in hits:
                cols["query_id"].append(r.image_id)
                cols["query_box"].append(None if qbox is None else np.asarray(qbox, np.float32))
                cols["rank"].append(h.rank)
                cols["image_id"].append(h.image_id)
                cols["uri"].append(h.uri)
                cols["score"].append(h.score)
                cols["matched_box"].append(None if h.matched_box is None else np.asarray(h.matched_box, np.float32))
        log.info("searched %d / %d queries", min(b0 + cfg.batch_size, len(records)), len(records))
    storage.write_parquet(cfg.output, to_table(cols, search_results_schema()), so)
    return len(cols["rank"])


def hits_sheet(image: str, box: Box | None, hits: Sequence[Hit], so: dict[str, Any], thumb: int = 256) -> Any:
    """A picture of one search: the query with its box (or its whole frame), then each hit with the region that
    matched outlined and labelled ``rank:score``.

    Returns:
        The PIL image.
    """
    def load(uri: str) -> Any:
        d = decode_image(storage.read_bytes(uri, so), max_side=thumb)
        if not d.ok:
            raise ValueError(f"{uri}: {d.status}: {d.error}")
        return d

    q = load(image)
    images, boxes, scores, sizes, titles = [q.array], [np.asarray([box or (0, 0, q.width, q.height)])], [[]], \
        [(q.width, q.height)], ["query" + (" (box)" if box else "")]
    for h in hits:
        d = load(h.uri)
        images.append(d.array)
        boxes.append(np.zeros((0, 4)) if h.matched_box is None else np.asarray([h.matched_box]))
        scores.append([h.score])
        sizes.append((d.width, d.height))
        titles.append(f"{h.rank}. {h.image_id}")
    return draw_regions_sheet(images, boxes, scores, sizes=sizes, titles=titles, thumb=thumb, columns=4)


def main(argv: list[str] | None = None, prog: str = "jobs/search.py") -> int:
    """Parse flags and run; user errors are one line and exit code 2 (see pipeline.cli.run_job)."""
    return run_job(SearchConfig, argv, prog, __doc__, search)
