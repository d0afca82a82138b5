"""Statistics and histograms checked against numbers worked out by hand or by numpy."""

import numpy as np
import pytest

from engine.stats import compute_histogram, compute_stats


def test_stats_of_known_array() -> None:
    weights = np.array([0.0, 0.0, 1.0, -1.0, 2.0, -2.0, 0.0, 4.0], dtype=np.float32)
    stats = compute_stats(weights)
    assert stats.count == 8
    assert stats.min == -2.0 and stats.max == 4.0
    assert stats.mean == pytest.approx(0.5)
    assert stats.std == pytest.approx(np.std(weights.astype(np.float64)))
    assert stats.abs_mean == pytest.approx(10 / 8)
    assert stats.sparsity == pytest.approx(3 / 8)
    centered = weights.astype(np.float64) - 0.5
    expected_kurtosis = np.mean(centered**4) / np.mean(centered**2) ** 2 - 3
    assert stats.kurtosis == pytest.approx(expected_kurtosis)
    assert stats.non_finite == 0


def test_outlier_fraction_counts_values_beyond_three_sigma() -> None:
    weights = np.zeros(1000, dtype=np.float32)
    weights[:10] = 100.0  # 1% far out
    stats = compute_stats(weights)
    assert stats.outlier_fraction == pytest.approx(0.01)


def test_non_finite_values_are_counted_and_left_out_of_moments() -> None:
    weights = np.array([1.0, np.nan, 3.0, np.inf], dtype=np.float32)
    stats = compute_stats(weights)
    assert stats.non_finite == 2
    assert stats.mean == pytest.approx(2.0)
    assert stats.max == 3.0


def test_histogram_matches_numpy_and_counts_every_value() -> None:
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((64, 32)).astype(np.float32)
    hist = compute_histogram(weights, bins=50)
    expected, edges = np.histogram(weights, bins=50)
    # Values exactly on an edge may fall one bin apart from numpy's choice; nothing else may.
    assert np.abs(hist.counts - expected).sum() <= 2
    np.testing.assert_allclose(hist.edges, edges, atol=1e-6)
    assert hist.counts.sum() == weights.size
    assert len(hist.centers) == 50


def test_histogram_of_constant_array_has_a_nonzero_range() -> None:
    hist = compute_histogram(np.full(10, 0.25, dtype=np.float32), bins=4)
    assert hist.counts.sum() == 10
    assert hist.edges[0] < 0.25 < hist.edges[-1]


def test_chunked_statistics_match_a_direct_computation_on_a_large_array() -> None:
    from engine import stats as stats_module

    rng = np.random.default_rng(1)
    weights = rng.standard_t(df=4, size=3 * stats_module.CHUNK + 17).astype(np.float32)
    stats = compute_stats(weights)
    centered = weights.astype(np.float64) - weights.astype(np.float64).mean()
    var = np.mean(centered**2)
    assert stats.std == pytest.approx(np.sqrt(var), rel=1e-9)
    assert stats.kurtosis == pytest.approx(np.mean(centered**4) / var**2 - 3, rel=1e-9)
    expected_outliers = np.count_nonzero(np.abs(centered) > 3 * np.sqrt(var)) / weights.size
    assert stats.outlier_fraction == pytest.approx(expected_outliers)
    hist = compute_histogram(weights, bins=64)
    assert hist.counts.sum() == weights.size
