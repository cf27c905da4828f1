"""Benchmark protocols as small objects: each one's ground truth, queries, ranking depth, scoring and metric text."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench import datasets as ds
from pipeline.bench import metrics as ev
from pipeline.bench.corpus import Corpus
from pipeline.config import BenchmarkConfig
from pipeline.io.listing import IMAGE_EXTS


class Protocol:
    """One evaluation protocol over a dataset, used in this order: ``ground_truth``, ``queries``, ``score``.

    The object keeps what one step reads for the next (the ground truth, then the corpus and its query rows).

    Attributes:
        name: the protocol's ``--protocol`` name.
        metric: what ``score`` measures, as written in the report.
        columns: report-table columns beyond ``method`` and ``score``.
        crops: after ``queries``: per query ``(image path relative to the root, box in original pixels)`` when the
            queries are image regions, which the runner describes with the model (the path search takes with a box);
            None when the queries are the corpus rows returned by ``queries``.
        self_rows: after ``queries``: per query the corpus row left out of its results and its query expansion (its
            own image under the labels protocols), or -1.
    """

    name = ""
    metric = "mAP"
    columns: tuple[str, ...] = ()

    def __init__(self, cfg: BenchmarkConfig) -> None:
        self.cfg = cfg
        self.root = cfg.dataset
        self.corpus: Corpus | None = None
        self.qrows = np.zeros(0, dtype=np.int64)
        self.crops: list[tuple[str, tuple[float, float, float, float]]] | None = None
        self.self_rows = np.zeros(0, dtype=np.int64)

    def ground_truth(self) -> tuple[list[str], np.ndarray | None]:
        """Read the dataset's ground truth.

        Returns:
            ``(paths, labels)``: the database paths relative to the dataset root, and an int label per path (None
            for protocols without labels).
        """
        raise NotImplementedError

    def queries(self, corpus: Corpus) -> tuple[np.ndarray, dict[str, Any]]:
        """Pick the queries among the corpus rows.

        Args:
            corpus: the dataset's images with their features (only images with an ok extraction).

        Returns:
            ``(qrows, extra)``: ``(Q,)`` ``int64`` corpus rows of the queries (their own image's row, or -1 when the
            queries are regions: see ``crops``), and report fields such as ``queries_missing``.
        """
        self.corpus = corpus
        self.lists: dict[str, list[str]] = {}
        self.list_pos: dict[str, np.ndarray] = {}
        if getattr(self.cfg, "tune_seed", -1) < 0:  # (stand-in configs in tests have no tune_seed)
            self.qrows, extra = self._query_rows(corpus)
            if self.crops is None or not len(self.self_rows):
                self.self_rows = self.qrows if self.crops is None else np.full(len(self.qrows), -1, np.int64)
            return self.qrows, extra
        if getattr(self.cfg, "query_boxes", ""):
            raise ValueError("--tune-seed splits whole-image query lists; it does not take --query-boxes")
        # Tune on one list, report on others: every list's queries are ranked once (their union); each list is then
        # scored on its own positions of the union (a query's ranking does not depend on the other queries).
        self.lists = dict(self._split_lists(corpus))
        row_of = {p: i for i, p in enumerate(corpus.paths)}
        union: dict[int, int] = {}
        for paths in self.lists.values():
            for p in paths:
                union.setdefault(row_of[p], len(union))
        self.qrows = np.fromiter(union, dtype=np.int64, count=len(union))
        self.self_rows = self.qrows  # whole images of the corpus: each query's own row is left out
        self.list_pos = {name: np.array([union[row_of[p]] for p in paths], dtype=np.int64)
                         for name, paths in self.lists.items()}
        return self.qrows, {"lists": {name: len(paths) for name, paths in self.lists.items()}}

    def _query_rows(self, corpus: Corpus) -> tuple[np.ndarray, dict[str, Any]]:
        """This protocol's query rows and extra report fields."""
        raise NotImplementedError

    def _split_lists(self, corpus: Corpus) -> list[tuple[str, list[str]]]:
        """The tune list first, then the report lists, as ``(name, corpus paths)`` (``--tune-seed`` >= 0)."""
        raise ValueError(f"the {self.name} protocol has no tune/report split (--tune-seed): use category or labels")

    def per_query(self, ranking: np.ndarray) -> np.ndarray:
        """Each query's own score, the one :meth:`score` averages (NaN where a query is not scored).

        Args:
            ranking: ``(Q, depth)`` corpus rows, best first, one row per query of :meth:`queries`.

        Returns:
            ``(Q,)`` ``float64`` scores.
        """
        raise NotImplementedError

    def depth(self, n_db: int) -> int:
        """How many results per query each method ranks (the whole database unless the protocol needs fewer).

        Args:
            n_db: database size.

        Returns:
            The ranking depth.
        """
        return n_db

    def score(self, ranking: np.ndarray) -> dict[str, float]:
        """Score one method's ranking of the queries.

        Args:
            ranking: ``(Q, depth)`` corpus rows, best first, one row per query of :meth:`queries`.

        Returns:
            A report row's score fields: ``score`` and any of :attr:`columns` (or other extras).
        """
        raise NotImplementedError


class LabelsProtocol(Protocol):
    """Same-label retrieval (Caltech-101, the Paris subset): mAP and P@1/4/10 over a full ranking; by default every
    image is a query."""

    name = "labels"
    columns = ("P@1", "P@4", "P@10")

    def ground_truth(self) -> tuple[list[str], np.ndarray | None]:
        """Class folders or labels.csv (Caltech's Faces and Faces_easy merged unless ``--no-merge-faces``)."""
        merge = {"Faces_easy": "Faces"} if self.cfg.merge_faces else None
        self.lset = ds.load_labelled_set(self.root, merge=merge)
        return self.lset.paths, self.lset.label_array()

    def _default_queries(self, corpus: Corpus) -> list[str]:
        """Query paths without ``--queries``: every corpus image."""
        return list(corpus.paths)

    def _query_rows(self, corpus: Corpus) -> tuple[np.ndarray, dict[str, Any]]:
        """The ``--queries`` list (or the default queries) that the corpus holds; the others are reported missing.

        With ``--query-boxes`` the queries are the regions that file lists (``path,x1,y1,x2,y2``, original pixels),
        in its order: each is described by the model, and its own image is left out of its results.
        """
        row_of = {p: i for i, p in enumerate(corpus.paths)}
        if getattr(self.cfg, "query_boxes", ""):
            boxes = read_query_boxes(self.cfg.query_boxes)
            kept = [(p, b) for p, b in boxes if p in row_of]
            self.crops = kept
            qrows = np.array([row_of[p] for p, _ in kept], dtype=np.int64)
            self.self_rows = qrows
            return qrows, {"queries_missing": [p for p, _ in boxes if p not in row_of], "query_boxes": len(kept)}
        qpaths = ds.read_query_list(self.cfg.queries) if self.cfg.queries else self._default_queries(corpus)
        qrows = np.array([row_of[p] for p in qpaths if p in row_of], dtype=np.int64)
        return qrows, {"queries_missing": [p for p in qpaths if p not in row_of]}

    def _split_lists(self, corpus: Corpus) -> list[tuple[str, list[str]]]:
        """Half of each label's queries (the ``--queries`` list or every image) to tune on, drawn with
        ``--tune-seed``; the other half to report on."""
        qpaths = ds.read_query_list(self.cfg.queries) if self.cfg.queries else self._default_queries(corpus)
        held = set(corpus.paths)
        missing = [p for p in qpaths if p not in held]
        if missing:
            raise ValueError(f"{len(missing)} queries have no ok extraction row, e.g. {missing[:3]}")
        row_of = {p: i for i, p in enumerate(corpus.paths)}
        pool = ds.LabelledSet(self.root, sorted(set(qpaths)),
                              [str(corpus.labels[row_of[p]]) for p in sorted(set(qpaths))])
        tune, rest = ds.split_halves(pool, seed=self.cfg.tune_seed)
        seed = self.cfg.tune_seed
        return [(f"tune_half_seed{seed}", tune), (f"report_half_seed{seed}", rest)]

    def score(self, ranking: np.ndarray) -> dict[str, float]:
        """mAP as ``score``, plus P@1, P@4 and P@10."""
        res = ev.labels_eval(ranking, self.corpus.labels, self.qrows)
        return {"score": res["mAP"], **{k: v for k, v in res.items() if k != "mAP"}}

    def per_query(self, ranking: np.ndarray) -> np.ndarray:
        """Each query's AP (NaN for a label without another image)."""
        return ev.label_average_precisions(ranking, self.corpus.labels, self.qrows)


class CategoryProtocol(LabelsProtocol):
    """Category retrieval as in the paper: mean top-k precision (its "MAP@k"); by default a seeded 5% of each class
    are the queries."""

    name = "category"
    columns = ()

    @property
    def metric(self) -> str:  # type: ignore[override]
        """The metric text names k."""
        return f"mean top-{self.cfg.k} precision (the paper's MAP@{self.cfg.k})"

    def _sampling_set(self, corpus: Corpus) -> ds.LabelledSet:
        """The corpus images with the dataset's own labels, before ``--merge-faces``: the sampler stratifies by
        them, as for the shipped ``queries_5pct_seed0.txt`` (which seed 0 reproduces: Faces and Faces_easy are
        sampled as two classes there)."""
        own = ds.load_labelled_set(self.root) if self.cfg.merge_faces else self.lset
        return ds.LabelledSet(self.root, corpus.paths, [own.labels[own.index_of(p)] for p in corpus.paths])

    def _default_queries(self, corpus: Corpus) -> list[str]:
        """Query paths without ``--queries``: a stratified 5% sample of the corpus images."""
        return ds.sample_queries(self._sampling_set(corpus), fraction=0.05, seed=self.cfg.seed)

    def _split_lists(self, corpus: Corpus) -> list[tuple[str, list[str]]]:
        """The stratified 5% list of ``--tune-seed`` to tune on, then one list per ``--report-seeds`` seed, drawn the
        same way from the images outside the tune list (disjoint from it, same size per class)."""
        if self.cfg.queries:
            raise ValueError("--queries and --tune-seed exclude each other in the category protocol: the tune and "
                             "report lists are drawn by the stratified 5% sampler")
        kept = self._sampling_set(corpus)
        tune = ds.sample_queries(kept, fraction=0.05, seed=self.cfg.tune_seed)
        out = [(f"tune_seed{self.cfg.tune_seed}", tune)]
        for s in self.cfg.report_seed_list():
            out.append((f"report_seed{s}", ds.sample_queries(kept, fraction=0.05, seed=s, exclude_paths=tune)))
        return out

    def depth(self, n_db: int) -> int:
        """Enough for P@k without the query, the re-ranked top-N and 100 results."""
        return min(n_db, max(self.cfg.k + 1, self.cfg.rerank, 100))

    def score(self, ranking: np.ndarray) -> dict[str, float]:
        """Mean top-k precision, the query left out of its own results."""
        labels = self.corpus.labels
        p = ev.precision_at_k(ranking, labels, labels[self.qrows], k=self.cfg.k, query_db_index=self.qrows)
        return {"score": float(np.mean(p))}

    def per_query(self, ranking: np.ndarray) -> np.ndarray:
        """Each query's top-k precision."""
        labels = self.corpus.labels
        return ev.precision_at_k(ranking, labels, labels[self.qrows], k=self.cfg.k,
                                 query_db_index=self.qrows).astype(np.float64)


class OxfordProtocol(Protocol):
    """Oxford 5k / Paris 6k: mAP with good + ok as positives and junk removed (the official gt_files layout)."""

    name = "oxford"

    def ground_truth(self) -> tuple[list[str], np.ndarray | None]:
        """The gt files from ``--queries`` (default ``<dataset>/gt``); the database is every image below the
        dataset folder."""
        self.gt = ds.read_oxford_gt(self.cfg.queries or os.path.join(self.root, "gt"))
        paths = sorted(p.relative_to(self.root).as_posix() for p in Path(self.root).rglob("*")
                       if p.suffix.lower() in IMAGE_EXTS)
        self.paths = paths
        return paths, None

    def _query_rows(self, corpus: Corpus) -> tuple[np.ndarray, dict[str, Any]]:
        """Each query is its image (found by file stem) cropped to its box (``crops``), as the official protocol
        describes it; its positives and junk as corpus rows. The query's image stays an ordinary database image.

        A positive that failed to extract gets an id past the database (``N + k``), which no ranking holds: it
        counts as not retrieved instead of leaving the positives (which would raise AP). A missing junk image
        cannot appear in a ranking and is dropped. ``positives_missing`` counts such positives over all queries.
        """
        by_id = {Path(p).stem: i for i, p in enumerate(corpus.paths)}
        absent = sorted({i for q in self.gt for i in q.positives} - by_id.keys())
        ids = {**{name: len(corpus.paths) + k for k, name in enumerate(absent)}, **by_id}
        self.positives = [np.array(sorted(ids[i] for i in q.positives), dtype=np.int64) for q in self.gt]
        self.junk = [np.array(sorted(by_id[i] for i in q.junk if i in by_id), dtype=np.int64) for q in self.gt]
        n_missing = sum(len(q.positives - by_id.keys()) for q in self.gt)
        file_of = {Path(p).stem: p for p in getattr(self, "paths", corpus.paths)}
        absent_q = sorted(q.image_id for q in self.gt if q.image_id not in file_of)
        if absent_q:
            raise FileNotFoundError(f"query images not found under {self.root}: {absent_q[:5]}")
        self.crops = [(file_of[q.image_id], tuple(float(v) for v in q.bbox)) for q in self.gt]
        qrows = np.array([by_id.get(q.image_id, -1) for q in self.gt], dtype=np.int64)
        return qrows, {"positives_missing": n_missing}

    def score(self, ranking: np.ndarray) -> dict[str, float]:
        """Oxford mAP."""
        return {"score": ev.oxford_map(ranking, self.positives, self.junk)[0]}


class RevisitedProtocol(Protocol):
    """Revisited Oxford / Paris: mAP under the Medium setting as ``score``, Easy and Hard beside it."""

    name = "revisited"
    metric = "mAP (medium)"

    def ground_truth(self) -> tuple[list[str], np.ndarray | None]:
        """``<dataset>/gnd_<dataset name>.pkl``; the database is its image list under ``jpg/``."""
        self.gnd = ds.load_revisited_gnd(os.path.join(self.root, f"gnd_{Path(self.root).name}.pkl"))
        return [f"jpg/{i}.jpg" for i in self.gnd["imlist"]], None

    def _query_rows(self, corpus: Corpus) -> tuple[np.ndarray, dict[str, Any]]:
        """Each query is its ``qimlist`` image ``jpg/<name>.jpg`` cropped to its ``bbx`` (``crops``), whether or not
        ``imlist`` holds it; the ground truth moved from ``imlist`` positions to corpus rows.

        gnd indices are positions in ``imlist``, while rankings hold corpus rows, which skip images that failed to
        extract: each index is mapped through its image's path, never by position. An easy or hard image without
        a row gets the id ``N + its imlist position``, which no ranking holds, so it counts as a positive not
        retrieved; a missing junk image cannot appear and is dropped. ``positives_missing`` counts the easy + hard
        entries without a row over all queries (the Medium setting's missing positives).
        """
        row_of = {p: i for i, p in enumerate(corpus.paths)}
        n_db = len(corpus.paths)
        rows = np.array([row_of.get(f"jpg/{name}.jpg", -1) for name in self.gnd["imlist"]], dtype=np.int64)
        pos_ids = np.where(rows >= 0, rows, n_db + np.arange(rows.size))
        self.gnd_rows: list[dict[str, np.ndarray]] = []
        n_missing = 0
        for g in self.gnd["gnd"]:
            easy, hard, junk = (np.asarray(g[k], dtype=np.int64).reshape(-1) for k in ("easy", "hard", "junk"))
            n_missing += int(np.count_nonzero(rows[np.union1d(easy, hard)] < 0))
            self.gnd_rows.append({"easy": pos_ids[easy], "hard": pos_ids[hard], "junk": rows[junk][rows[junk] >= 0]})
        qpaths = [f"jpg/{q}.jpg" for q in self.gnd["qimlist"]]
        absent = [p for p in qpaths if not os.path.isfile(os.path.join(self.root, p))]
        if absent:
            raise FileNotFoundError(f"query images not found under {self.root}: {absent[:5]}")
        self.crops = [(p, tuple(float(v) for v in np.asarray(g["bbx"], dtype=np.float64).reshape(4)))
                      for p, g in zip(qpaths, self.gnd["gnd"])]
        qrows = np.array([row_of.get(p, -1) for p in qpaths], dtype=np.int64)
        return qrows, {"positives_missing": n_missing}

    def score(self, ranking: np.ndarray) -> dict[str, float]:
        """Medium mAP, with the Easy and Hard mAPs."""
        res = ev.revisited_map(ranking, self.gnd_rows)
        return {"score": res["medium"]["mAP"], "easy": res["easy"]["mAP"], "hard": res["hard"]["mAP"]}


def read_query_boxes(path: str) -> list[tuple[str, tuple[float, float, float, float]]]:
    """A query-regions file: CSV with the header ``path,x1,y1,x2,y2`` (path relative to the dataset root, box in the
    image's original pixels).

    Returns:
        ``(path, box)`` per row, in file order.

    Raises:
        ValueError: a missing column or a bad box.
    """
    import csv

    from pipeline.config import parse_box

    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        cols = ["path", "x1", "y1", "x2", "y2"]
        if reader.fieldnames is None or any(c not in reader.fieldnames for c in cols):
            raise ValueError(f"{path}: needs the columns {','.join(cols)}; has {reader.fieldnames}")
        return [(ds._norm_relpath(r["path"]), parse_box(",".join(r[c] for c in cols[1:]))) for r in reader]


PROTOCOLS: dict[str, type[Protocol]] = {p.name: p for p in (CategoryProtocol, LabelsProtocol, OxfordProtocol,
                                                              RevisitedProtocol)}
