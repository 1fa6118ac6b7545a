"""The paired two-level bootstrap: known answers, and the vectorised draw against a plain loop."""

import numpy as np
import pytest

from cir_plugins.errors import ConfigError, DataError
from cir_plugins.stats import paired_bootstrap


def test_constant_differences_have_a_zero_width_interval():
    result = paired_bootstrap([[2.5] * 40, [2.5] * 10], n_boot=200)
    assert result.mean == result.low == result.high == pytest.approx(2.5)
    assert result.spread == 0.0 and result.run_means == (2.5, 2.5)


def test_one_run_matches_the_normal_interval_of_a_mean():
    """One run of n iid draws: the bootstrap interval of the mean is close to mean +- 1.96 s / sqrt(n)."""
    rng = np.random.default_rng(1)
    values = rng.normal(3.0, 10.0, size=2000)
    result = paired_bootstrap([values], n_boot=4000, seed=2)
    half = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
    assert result.mean == pytest.approx(values.mean())
    assert result.low == pytest.approx(values.mean() - half, abs=0.1 * half)
    assert result.high == pytest.approx(values.mean() + half, abs=0.1 * half)


def test_runs_that_disagree_widen_the_interval_beyond_the_query_noise():
    """Runs whose means differ (+1 and +9, no query noise): the interval spans the run level, not zero."""
    result = paired_bootstrap([[1.0] * 50, [9.0] * 50], n_boot=2000)
    assert result.mean == pytest.approx(5.0)
    assert result.low == pytest.approx(1.0) and result.high == pytest.approx(9.0)
    assert result.spread == pytest.approx(np.std([1.0, 9.0], ddof=1))


def _reference(runs, n_boot, level, seed):
    """The same draw order as paired_bootstrap, written as a plain loop over replicates."""
    rng = np.random.default_rng(seed)
    runs = [np.asarray(r, dtype=float) for r in runs]
    n = len(runs)
    means = np.empty((n, n_boot, n))
    for r, values in enumerate(runs):
        picks = rng.integers(0, values.size, size=(n_boot, n, values.size))
        for b in range(n_boot):
            for j in range(n):
                means[r, b, j] = sum(values[i] for i in picks[b, j]) / values.size
    drawn = rng.integers(0, n, size=(n_boot, n))
    stats = [sum(means[drawn[b, j], b, j] for j in range(n)) / n for b in range(n_boot)]
    tail = (1 - level) / 2
    return np.quantile(stats, [tail, 1 - tail])


def test_vectorised_draw_equals_a_plain_loop_on_random_runs():
    rng = np.random.default_rng(0)
    runs = [rng.normal(size=rng.integers(3, 12)) for _ in range(4)]
    result = paired_bootstrap(runs, n_boot=50, level=0.9, seed=7)
    low, high = _reference(runs, 50, 0.9, 7)
    assert result.low == pytest.approx(low) and result.high == pytest.approx(high)
    assert paired_bootstrap(runs, n_boot=50, level=0.9, seed=7) == result  # deterministic for a seed


@pytest.mark.parametrize("runs, kwargs, error", [
    ([], {}, DataError), ([[1.0], []], {}, DataError), ([[float("nan")]], {}, DataError),
    ([[1.0]], {"n_boot": 0}, ConfigError), ([[1.0]], {"level": 1.0}, ConfigError),
])
def test_bad_input_is_refused(runs, kwargs, error):
    with pytest.raises(error):
        paired_bootstrap(runs, **kwargs)
