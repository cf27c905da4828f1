"""Ground-truth readers: class folders, labels.csv, query lists, Oxford/Paris gt files, revisited gnd pickles."""

from __future__ import annotations

import csv
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import numpy as np

from pipeline.bench.safe_pickle import safe_loads
from pipeline.io import storage
from pipeline.io.listing import IMAGE_EXTS

# Column names accepted as "the label" in a labels.csv, in order of preference (Caltech ships `class`,
# the Paris subset `landmark`); any other layout falls back to the second column.
_LABEL_COLUMNS = ("label", "class", "landmark")


def _norm_relpath(path: str) -> str:
    """Normalise a relative path to the one spelling used as a key: posix separators, no ``./``, no ``a/../``."""
    p = str(path).strip().replace("\\", "/")
    parts: list[str] = []
    for part in p.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            # A ground-truth path escaping the dataset root is a broken file, not something to resolve.
            if not parts:
                raise ValueError(f"path {path!r} escapes the dataset root")
            parts.pop()
            continue
        parts.append(part)
    if not parts:
        raise ValueError(f"empty path {path!r}")
    return "/".join(parts)


# --------------------------------------------------------------------------------------------------------------------
# Labelled image sets (category retrieval: Caltech-101, the Paris subset, any class-folder tree)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledSet:
    """An image collection with one label per image.

    Attributes:
        root: the dataset directory the paths are relative to (as given to :func:`load_labelled_set`).
        paths: image paths relative to ``root``, posix separators, sorted, unique.
        labels: ``labels[i]`` is the label of ``paths[i]``.
    """

    root: str
    paths: list[str]  # relative to root, posix, sorted
    labels: list[str]

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.paths)

    def label_names(self) -> list[str]:
        """The distinct labels, sorted; ``label_array()`` codes index into this list.

        Returns:
            Sorted list of distinct labels.
        """
        return sorted(set(self.labels))

    def label_array(self) -> np.ndarray:
        """Integer label codes, one per path.

        Returns:
            ``(N,)`` ``int64`` array; ``code[i]`` is the position of ``labels[i]`` in :meth:`label_names`
            (codes are stable for a given label set because the names are sorted).
        """
        lookup = {name: i for i, name in enumerate(self.label_names())}
        return np.fromiter((lookup[x] for x in self.labels), dtype=np.int64, count=len(self.labels))

    # Not a field: the path -> row map is built on the first index_of (cached_property writes the instance
    # __dict__ directly, which a frozen dataclass allows) so that a 10k-image loop stays O(1) per lookup.
    @cached_property
    def _index(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.paths)}

    def index_of(self, path: str) -> int:
        """Row of ``path`` in this set.

        Args:
            path: path relative to ``root`` (``\\`` separators and a leading ``./`` are accepted).

        Returns:
            The index ``i`` with ``paths[i] == path``.

        Raises:
            KeyError: when the path is not in the set.
        """
        key = _norm_relpath(path)
        try:
            return self._index[key]
        except KeyError:
            raise KeyError(f"{path!r} is not in the labelled set at {self.root!r}") from None


def _read_labels_csv(csv_path: str) -> list[tuple[str, str]]:
    """Read ``(relative path, label)`` pairs from a labels.csv (header row required)."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: tolerate a BOM from spreadsheet exports
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ValueError(f"{csv_path}: empty file (a header row is required)") from None
        if len(header) < 2:
            raise ValueError(f"{csv_path}: need at least a path column and a label column, header is {header}")
        lowered = [h.lower() for h in header]
        label_col = next((lowered.index(c) for c in _LABEL_COLUMNS if c in lowered), 1)
        if label_col == 0:
            raise ValueError(f"{csv_path}: the first column must be the image path, not the label")
        rows: list[tuple[str, str]] = []
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue  # blank line (e.g. a trailing newline pair)
            if len(row) <= label_col:
                raise ValueError(f"{csv_path}:{lineno}: expected at least {label_col + 1} columns, got {row}")
            label = row[label_col].strip()
            if not label:
                raise ValueError(f"{csv_path}:{lineno}: empty label for {row[0]!r}")
            rows.append((_norm_relpath(row[0]), label))
    return rows


def _walk_class_folders(root: str) -> list[tuple[str, str]]:
    """``(relative path, parent folder name)`` for every image file below ``root`` (not directly in it)."""
    rows: list[tuple[str, str]] = []
    seen_dirs: set[str] = set()
    # followlinks: datasets are often symlinked into place; the realpath set stops symlink cycles.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # .git, .cache, macOS metadata
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            continue  # an image directly in root has no class folder, hence no label
        label = os.path.basename(dirpath)
        for name in filenames:
            # "._x.jpg" are macOS resource forks, not images.
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTS):
                continue
            rows.append((_norm_relpath(os.path.join(rel_dir, name)), label))
    return rows


def load_labelled_set(
    root: str,
    labels_csv: str | None = None,
    merge: dict[str, str] | None = None,
    exclude_labels: Sequence[str] = (),
) -> LabelledSet:
    """Read an image collection with one label per image.

    With a ``labels.csv`` (``root/labels.csv`` if it exists, or ``labels_csv``): a header row, then one row per
    image; the first column is the path relative to ``root``; the label is the column named ``label``,
    ``class`` or ``landmark`` (case-insensitive), else the second column; other columns are ignored.
    Without one: class folders, i.e. every image file (by extension, :data:`IMAGE_EXTS`) anywhere below
    ``root`` is labelled with the name of the folder that holds it (so
    ``caltech101/101_ObjectCategories/<class>/image_0001.jpg`` with ``root="caltech101"`` gets ``<class>`` and
    keeps the path ``101_ObjectCategories/<class>/image_0001.jpg``). Files directly in ``root`` and hidden
    files/folders are skipped. Image files are not opened or checked for existence here.

    Args:
        root: local dataset directory.
        labels_csv: labels file to use instead of ``root/labels.csv``; a relative path is taken relative to
            ``root``.
        merge: maps a label to the label it should count as (e.g. ``{"Faces_easy": "Faces"}``: Caltech's
            two face classes hold the same photographs with different crops).
        exclude_labels: images whose label, before or after ``merge``, is listed here are left out.

    Returns:
        A :class:`LabelledSet` sorted by path.

    Raises:
        FileNotFoundError: ``root`` (or the given ``labels_csv``) does not exist.
        ValueError: a malformed labels.csv, a path listed twice, or no images found.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset root {root!r} is not a directory")
    if labels_csv is not None:
        csv_path = os.path.join(root, os.fspath(labels_csv))  # join keeps an absolute labels_csv as is
        if not os.path.isfile(csv_path):
            raise FileNotFoundError(f"labels file {csv_path!r} not found")
    else:
        csv_path = os.path.join(root, "labels.csv")
    rows = _read_labels_csv(csv_path) if os.path.isfile(csv_path) else _walk_class_folders(root)

    merge = dict(merge or {})
    excluded = set(exclude_labels)
    by_path: dict[str, str] = {}
    for path, label in rows:
        merged = merge.get(label, label)
        if label in excluded or merged in excluded:
            continue
        if path in by_path:
            # Two labels for one image would silently corrupt every metric computed on the set.
            raise ValueError(f"{path!r} is listed twice in the ground truth of {root!r}")
        by_path[path] = merged
    if not by_path:
        raise ValueError(f"no labelled images found under {root!r}")
    paths = sorted(by_path)
    return LabelledSet(root=root, paths=paths, labels=[by_path[p] for p in paths])


def read_query_list(path: str) -> list[str]:
    """Read a fixed query list.

    Args:
        path: local text file, one image path (relative to the dataset root) per line; blank lines and lines
            starting with ``#`` are skipped.

    Returns:
        The paths in file order, normalised like :attr:`LabelledSet.paths` (posix, no leading ``./``).
    """
    out: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            s = line.strip()
            if s and not s.startswith("#"):
                out.append(_norm_relpath(s))
    return out


def sample_queries(
    ds: LabelledSet,
    fraction: float = 0.05,
    seed: int = 0,
    exclude_labels: Sequence[str] = ("BACKGROUND_Google",),
    exclude_paths: Sequence[str] = (),
) -> list[str]:
    """Draw a stratified random query set: a fixed fraction of every label.

    For each label in sorted order, ``max(1, round(fraction * n_label))`` of its (sorted) paths are drawn with
    ``rng.sample`` from one shared ``random.Random(seed)``; each label's draw is sorted and the labels are
    concatenated. This exact procedure produced the shipped Caltech-101 ``queries_5pct_seed0.txt`` (432 paths),
    so it must not change: a different draw order would silently change every reported number.

    With ``exclude_paths`` (e.g. a tune list), those paths are never drawn, while each label's count is still taken
    from all its paths: a list disjoint from another one has the same size per label (fewer only where a label runs
    out). Without it the draw is exactly the one above.

    Args:
        ds: the labelled set.
        fraction: share of each label to draw, in ``(0, 1]``.
        seed: seed of the random generator.
        exclude_labels: labels that never provide queries (Caltech's clutter class by default).
        exclude_paths: paths never drawn.

    Returns:
        Query paths (relative to ``ds.root``), grouped by label in sorted label order, sorted within a label.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    by_label: dict[str, list[str]] = defaultdict(list)
    for p, label in zip(ds.paths, ds.labels):
        by_label[label].append(p)
    excluded = set(exclude_labels)
    taken = set(exclude_paths)
    rng = random.Random(seed)
    out: list[str] = []
    for label in sorted(by_label):
        if label in excluded:
            continue
        n_all = len(by_label[label])
        paths = sorted(p for p in by_label[label] if p not in taken)
        n = min(len(paths), max(1, round(fraction * n_all)))
        out.extend(sorted(rng.sample(paths, n)))
    return out


def split_halves(ds: LabelledSet, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split a labelled set's images into two halves, label by label: a tune half and a report half.

    For each label in sorted order, ``n_label // 2`` of its sorted paths are drawn with ``rng.sample`` from one shared
    ``random.Random(seed)`` into the first half; the rest of the label goes to the second (so an odd label gives the
    second half one more). Each half is grouped by label in sorted label order, sorted within a label.

    Args:
        ds: the labelled set (e.g. the queries of the Paris subset: every image).
        seed: seed of the random generator.

    Returns:
        ``(first, second)``: disjoint path lists whose union is ``ds.paths``.
    """
    by_label: dict[str, list[str]] = defaultdict(list)
    for p, label in zip(ds.paths, ds.labels):
        by_label[label].append(p)
    rng = random.Random(seed)
    first: list[str] = []
    second: list[str] = []
    for label in sorted(by_label):
        paths = sorted(by_label[label])
        drawn = set(rng.sample(paths, len(paths) // 2))
        first.extend(p for p in paths if p in drawn)
        second.extend(p for p in paths if p not in drawn)
    return first, second


# --------------------------------------------------------------------------------------------------------------------
# Oxford 5k / Paris 6k official ground truth (gt_files_170407 layout)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OxfordQuery:
    """One Oxford/Paris query.

    Attributes:
        name: the query's name, e.g. ``all_souls_1`` (file name without ``_query.txt``).
        image_id: the query image id without extension (``oxc1_`` prefix removed).
        bbox: query region ``(x1, y1, x2, y2)`` in pixels of the original image.
        good: ids of clearly visible instances of the landmark.
        ok: ids where more than 25% of the object is visible.
        junk: ids where the object is hardly visible; removed from the ranking before AP.
    """

    name: str
    image_id: str
    bbox: tuple[float, float, float, float]
    good: frozenset[str]
    ok: frozenset[str]
    junk: frozenset[str]

    @property
    def positives(self) -> frozenset[str]:
        """Relevant ids under the Oxford protocol: ``good | ok``."""
        return self.good | self.ok


def _read_id_list(path: str) -> frozenset[str]:
    """The distinct image ids of a good/ok/junk file, one per line."""
    with open(path, encoding="utf-8") as f:
        # A set: the official lists contain at least one duplicated line (all_souls_1_good.txt), and counting it
        # twice would make AP = 1 unreachable.
        return frozenset(s for s in (line.strip() for line in f) if s)


def read_oxford_gt(gt_dir: str) -> list[OxfordQuery]:
    """Read the official Oxford 5k / Paris 6k ground-truth files.

    ``<name>_query.txt`` holds one line ``<image_id> x1 y1 x2 y2``; the Oxford files write the id as
    ``oxc1_<image_id>`` and that prefix is removed (Paris ids carry no such prefix and are kept as written).
    ``<name>_good.txt``, ``<name>_ok.txt`` and ``<name>_junk.txt`` hold one image id per line.

    Args:
        gt_dir: local directory with the files.

    Returns:
        One :class:`OxfordQuery` per ``*_query.txt``, sorted by name.

    Raises:
        FileNotFoundError: the directory or one of a query's good/ok/junk files is missing.
        ValueError: a malformed query line or a directory with no query files.
    """
    names = sorted(f[: -len("_query.txt")] for f in os.listdir(gt_dir) if f.endswith("_query.txt"))
    if not names:
        raise ValueError(f"no *_query.txt files in {gt_dir!r}")
    out: list[OxfordQuery] = []
    for name in names:
        qpath = os.path.join(gt_dir, f"{name}_query.txt")
        with open(qpath, encoding="utf-8") as f:
            lines = [s for s in (line.strip() for line in f) if s]
        if len(lines) != 1 or len(lines[0].split()) != 5:
            raise ValueError(f"{qpath}: expected one line '<image_id> x1 y1 x2 y2', got {lines}")
        image_id, *coords = lines[0].split()
        if image_id.startswith("oxc1_"):
            image_id = image_id[len("oxc1_"):]
        try:
            x1, y1, x2, y2 = (float(c) for c in coords)
        except ValueError:
            raise ValueError(f"{qpath}: non-numeric bounding box {coords}") from None
        lists = {}
        for kind in ("good", "ok", "junk"):
            p = os.path.join(gt_dir, f"{name}_{kind}.txt")
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p} is missing (query {name!r} needs good, ok and junk lists)")
            lists[kind] = _read_id_list(p)
        out.append(OxfordQuery(name=name, image_id=image_id, bbox=(x1, y1, x2, y2), **lists))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Revisited Oxford / Paris (gnd_roxford5k.pkl, gnd_rparis6k.pkl), unpickled without running code (safe_pickle)
# --------------------------------------------------------------------------------------------------------------------


def _as_index_array(value: Any, n: int, where: str) -> np.ndarray:
    """A gnd index list as a 1-D ``int64`` array, checked to lie in ``[0, n)``."""
    arr = np.asarray(value)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{where}: expected a 1-D integer array, got dtype {arr.dtype} shape {arr.shape}")
    arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() >= n:
        raise ValueError(f"{where}: index out of range [0, {n})")
    return arr


def load_revisited_gnd(path_or_bytes: str | os.PathLike | bytes) -> dict:
    """Load a revisited Oxford/Paris ground-truth pickle (``gnd_roxford5k.pkl``, ``gnd_rparis6k.pkl``) safely.

    Args:
        path_or_bytes: the pickle's bytes, or a local path or fsspec URL (``file://``, ``s3://``, ...).

    Returns:
        ``{"imlist": list[str], "qimlist": list[str], "gnd": list[dict]}`` (other top-level keys are kept) where
        ``gnd[q]`` has ``bbx`` (``(4,)`` float64 ``x1, y1, x2, y2``) and ``easy``, ``hard``, ``junk`` (1-D
        ``int64`` indices into ``imlist``), one entry per query in ``qimlist``.

    Raises:
        pickle.UnpicklingError: the pickle references anything but containers and numpy arrays.
        ValueError: missing keys, wrong lengths, or indices outside ``imlist``.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
        where = "<bytes>"
    else:
        where = os.fspath(path_or_bytes)
        data = storage.read_bytes(where)
    obj = safe_loads(data)

    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a dict, got {type(obj).__name__}")
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing keys {missing} (has {sorted(map(str, obj))})")
    imlist, qimlist, gnd = list(obj["imlist"]), list(obj["qimlist"]), list(obj["gnd"])
    if not all(isinstance(x, str) for x in imlist + qimlist):
        raise ValueError(f"{where}: imlist and qimlist must hold image names (str)")
    if len(gnd) != len(qimlist):
        raise ValueError(f"{where}: {len(gnd)} gnd entries for {len(qimlist)} queries")
    n = len(imlist)
    out_gnd = []
    for q, g in enumerate(gnd):
        if not isinstance(g, dict):
            raise ValueError(f"{where}: gnd[{q}] is a {type(g).__name__}, not a dict")
        missing = [k for k in ("bbx", "easy", "hard", "junk") if k not in g]
        if missing:
            raise ValueError(f"{where}: gnd[{q}] is missing keys {missing}")
        bbx = np.asarray(g["bbx"], dtype=np.float64).reshape(-1)
        if bbx.shape != (4,):
            raise ValueError(f"{where}: gnd[{q}]['bbx'] must have 4 numbers, got {bbx.shape[0]}")
        entry = dict(g)
        entry["bbx"] = bbx
        for k in ("easy", "hard", "junk"):
            entry[k] = _as_index_array(g[k], n, f"{where}: gnd[{q}][{k!r}]")
        out_gnd.append(entry)
    result = dict(obj)
    result.update(imlist=imlist, qimlist=qimlist, gnd=out_gnd)
    return result
