"""Paired comparison of two methods on the same query lists: the gain, its paired standard error, a bootstrap interval."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairedGain:
    """The gain of method a over method b, averaged over query lists.

    Attributes:
        gain: mean over the lists of each list's mean per-query difference ``a - b``.
        se: its paired standard error, ``sqrt(sum_l var_l / n_l) / L`` (``var_l`` with ``ddof=1``).
        lo: lower end of the bootstrap percentile interval.
        hi: upper end.
        queries: queries paired, over all lists.
    """

    gain: float
    se: float
    lo: float
    hi: float
    queries: int


def paired_gain(a: Sequence[np.ndarray], b: Sequence[np.ndarray], boot: int = 2000, seed: int = 0,
                level: float = 0.95) -> PairedGain:
    """How sure is a gain of a over b? Per-query scores of both methods on the same queries, list by list.

    Queries are resampled with replacement within each list (a stratified bootstrap: every resample keeps the lists
    and their sizes), and each resample's gain is the mean over lists of the list's mean difference, as for the
    point estimate. A query with a NaN score in either method (e.g. no other image of its label) is left out.

    Args:
        a: per list, ``(n_l,)`` per-query scores of method a.
        b: per list, the scores of method b on the same queries in the same order.
        boot: bootstrap resamples (0: no interval, ``lo = hi = NaN``).
        seed: seed of ``np.random.default_rng``; with one list the resamples are those of
            ``rng.integers(0, n, n)`` drawn ``boot`` times in a row.
        level: coverage of the interval.

    Returns:
        The gain, its paired standard error and the interval.

    Raises:
        ValueError: when the lists do not pair up or a list has no query left.
    """
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired_gain: {len(a)} and {len(b)} lists (need the same, at least one)")
    diffs = []
    for x, y in zip(a, b):
        x, y = np.asarray(x, np.float64).reshape(-1), np.asarray(y, np.float64).reshape(-1)
        if x.shape != y.shape:
            raise ValueError(f"paired_gain: lists of {x.size} and {y.size} queries do not pair")
        d = x - y
        d = d[~np.isnan(d)]
        if not d.size:
            raise ValueError("paired_gain: a list without any scored query")
        diffs.append(d)
    n_lists = len(diffs)
    gain = float(np.mean([d.mean() for d in diffs]))
    var = sum((d.var(ddof=1) if d.size > 1 else 0.0) / d.size for d in diffs)
    se = float(np.sqrt(var) / n_lists)
    lo = hi = float("nan")
    if boot > 0:
        rng = np.random.default_rng(seed)
        means = np.zeros(boot, np.float64)
        for d in diffs:
            n = d.size
            means += d[rng.integers(0, n, (boot, n))].mean(axis=1)
        means /= n_lists
        tail = 100 * (1 - level) / 2
        lo, hi = (float(v) for v in np.percentile(means, [tail, 100 - tail]))
    return PairedGain(gain, se, lo, hi, int(sum(d.size for d in diffs)))


def holdout_rows(per_query: dict[str, np.ndarray], lists: dict[str, np.ndarray], tune: str,
                 descriptors: Sequence[str] = (), boot: int = 2000, seed: int = 0) -> tuple[list[dict], str | None]:
    """Tune on one query list, report on the others: per method the tune score, the report lists' mean and standard
    deviation, and paired gains over ``global`` and over the best single descriptor on the report lists.

    Args:
        per_query: method -> ``(Q,)`` per-query scores over the union of the lists (NaN = not scored).
        lists: list name -> positions of its queries in the union (the tune list and the report lists).
        tune: the tune list's name; every other list is a report list, in the order given.
        descriptors: the single-descriptor methods; the best of them on the tune list (not the report lists: the
            choice is part of tuning) is the second baseline.
        boot: bootstrap resamples of each gain's interval (:func:`paired_gain`).
        seed: bootstrap seed.

    Returns:
        ``(rows, best)``: one dict per method in ``per_query`` order with ``method``, ``tune``, ``mean``, ``std``
        (``ddof=1`` over the report lists, None with one), ``lists`` (name -> score), and for each baseline present
        ``gain_<baseline>``, ``gain_<baseline>_se``, ``gain_<baseline>_lo``, ``gain_<baseline>_hi``; and the best
        descriptor's name (None without any).
    """
    reports = [n for n in lists if n != tune]
    if tune not in lists or not reports:
        raise ValueError(f"holdout_rows: need the tune list {tune!r} and at least one other, got {list(lists)}")

    def list_score(m: str, name: str) -> float:
        return float(np.nanmean(per_query[m][lists[name]]))

    present = [m for m in descriptors if m in per_query]
    best = max(present, key=lambda m: list_score(m, tune)) if present else None
    baselines = [b for b in dict.fromkeys(["global", best]) if b is not None and b in per_query]
    rows = []
    for m, scores in per_query.items():
        by_list = {name: list_score(m, name) for name in lists}
        rep = np.array([by_list[n] for n in reports])
        row: dict = {"method": m, "tune": by_list[tune], "mean": float(rep.mean()),
                     "std": float(rep.std(ddof=1)) if rep.size > 1 else None, "lists": by_list}
        for b in baselines:
            g = paired_gain([scores[lists[n]] for n in reports], [per_query[b][lists[n]] for n in reports],
                            boot=boot, seed=seed)
            row.update({f"gain_{b}": g.gain, f"gain_{b}_se": g.se, f"gain_{b}_lo": g.lo, f"gain_{b}_hi": g.hi})
        rows.append(row)
    return rows, best
