"""Tests of pipeline/bench/paired.py: the paired gain, its bootstrap interval and the tune/report rows (numpy
references)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.bench.paired import holdout_rows, paired_gain


def test_paired_gain_one_list_matches_the_loop_of_the_old_script():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 11, 40) / 10
    b = rng.integers(0, 11, 40) / 10
    g = paired_gain([a], [b], boot=500, seed=0)
    d = a - b
    assert g.gain == pytest.approx(d.mean()) and g.queries == 40
    assert g.se == pytest.approx(d.std(ddof=1) / np.sqrt(40))
    # Reference: benchmarks/paired_gain.py before the move, one resample at a time.
    ref = np.random.default_rng(0)
    boot = [d[ref.integers(0, 40, 40)].mean() for _ in range(500)]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    assert (g.lo, g.hi) == pytest.approx((lo, hi))


def test_paired_gain_several_lists_drops_nan_and_averages_list_means():
    a = [np.array([1.0, 0.5, np.nan, 0.0]), np.array([0.2, 0.4])]
    b = [np.array([0.0, 0.5, 0.3, 0.5]), np.array([0.2, np.nan])]
    g = paired_gain(a, b, boot=300, seed=7)
    d1, d2 = np.array([1.0, 0.0, -0.5]), np.array([0.0])
    assert g.gain == pytest.approx((d1.mean() + d2.mean()) / 2)
    assert g.se == pytest.approx(np.sqrt(d1.var(ddof=1) / 3 + 0.0) / 2)
    assert g.queries == 4
    # Reference: each list resampled on its own, the resample's gain the mean of the list means.
    rng = np.random.default_rng(7)
    m1 = d1[rng.integers(0, 3, (300, 3))].mean(axis=1)
    m2 = d2[rng.integers(0, 1, (300, 1))].mean(axis=1)
    lo, hi = np.percentile((m1 + m2) / 2, [2.5, 97.5])
    assert (g.lo, g.hi) == pytest.approx((lo, hi))
    assert g.lo <= g.gain <= g.hi


def test_paired_gain_errors_and_no_bootstrap():
    with pytest.raises(ValueError, match="lists"):
        paired_gain([np.ones(2)], [])
    with pytest.raises(ValueError, match="pair"):
        paired_gain([np.ones(2)], [np.ones(3)])
    with pytest.raises(ValueError, match="without any scored"):
        paired_gain([np.array([np.nan])], [np.array([1.0])])
    g = paired_gain([np.array([1.0, 0.0])], [np.array([0.0, 0.0])], boot=0)
    assert g.gain == 0.5 and np.isnan(g.lo) and np.isnan(g.hi)


def test_holdout_rows_scores_each_list_and_picks_the_baseline_on_the_tune_list():
    # Union of 6 queries: tune = positions 0, 1; report lists r1 = 2, 3 and r2 = 4, 5.
    lists = {"tune": np.array([0, 1]), "r1": np.array([2, 3]), "r2": np.array([4, 5])}
    per = {
        "global": np.array([0.5, 0.5, 0.4, 0.6, 0.5, 0.5]),
        "rmac": np.array([0.9, 0.7, 0.5, 0.5, 0.5, 0.7]),  # best descriptor on the tune list (0.8)
        "gem": np.array([0.6, 0.6, 0.9, 0.9, 0.9, 0.9]),  # best on the report lists, not chosen
        "ours": np.array([1.0, 0.8, 0.7, 0.9, 0.6, np.nan]),
    }
    rows, best = holdout_rows(per, lists, "tune", ("global", "rmac", "gem"), boot=200)
    assert best == "rmac"
    by = {r["method"]: r for r in rows}
    assert [r["method"] for r in rows] == ["global", "rmac", "gem", "ours"]
    o = by["ours"]
    assert o["tune"] == pytest.approx(0.9)
    assert o["lists"] == pytest.approx({"tune": 0.9, "r1": 0.8, "r2": 0.6})
    assert o["mean"] == pytest.approx(0.7) and o["std"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    # Paired over the report lists, NaN dropped: r1 diffs vs global (0.3, 0.3), r2 (0.1) -> (0.3 + 0.1) / 2.
    assert o["gain_global"] == pytest.approx(0.2)
    # vs rmac: r1 (0.2, 0.4) -> 0.3, r2 (0.1) -> 0.1.
    assert o["gain_rmac"] == pytest.approx(0.2)
    assert "gain_gem" not in o
    ref = paired_gain([per["ours"][[2, 3]], per["ours"][[4, 5]]], [per["rmac"][[2, 3]], per["rmac"][[4, 5]]],
                      boot=200)
    assert (o["gain_rmac_lo"], o["gain_rmac_hi"], o["gain_rmac_se"]) == pytest.approx((ref.lo, ref.hi, ref.se))
    assert by["global"]["gain_global"] == 0.0


def test_holdout_rows_needs_a_report_list():
    with pytest.raises(ValueError, match="at least one other"):
        holdout_rows({"global": np.zeros(2)}, {"tune": np.array([0, 1])}, "tune")
