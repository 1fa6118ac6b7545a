"""Confidence intervals for paired differences between two systems (e.g. "+P+N minus the baseline"), measured
on several runs (a run = one world or dataset and one training seed) whose queries both systems answer:
:func:`paired_bootstrap`, a two-level bootstrap (one run: the ordinary bootstrap over queries)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .checks import check_positive_int, check_probability
from .errors import DataError, explain

__all__ = ["BootstrapResult", "paired_bootstrap"]


@dataclass(frozen=True)
class BootstrapResult:
    """``mean``: mean over runs of each run's mean difference; ``low``/``high``: the percentile interval
    at ``level``; ``run_means``: each run's mean difference; ``spread``: their sample std (0 for one run)."""

    mean: float
    low: float
    high: float
    level: float
    run_means: tuple[float, ...]
    spread: float
    n_boot: int

    def to_dict(self) -> dict:
        return {**asdict(self), "run_means": list(self.run_means)}


def paired_bootstrap(differences: Sequence[Sequence[float]], *, n_boot: int = 2000, level: float = 0.95,
                     seed: int = 0) -> BootstrapResult:
    """Two-level bootstrap of the mean of paired per-query differences: each replicate draws the runs with
    replacement and, inside each drawn run, its queries with replacement; its statistic is the mean over the
    drawn runs of their resampled query means.

    Args:
        differences: per run, the per-query differences (system minus reference), e.g. 100 * (hit of +P+N -
            hit of the baseline). Runs may differ in length.
        n_boot: bootstrap replicates. level: the interval's coverage (0.95: the 2.5th and 97.5th percentiles).
        seed: the resampling's seed (deterministic for a seed).

    Returns the observed statistic (mean over runs of the per-run means) and the replicates' percentile interval.
    """
    runs = [np.asarray(d, dtype=np.float64).reshape(-1) for d in differences]
    if not runs:
        raise DataError(explain("no runs to bootstrap", got=0, fix="pass one sequence of differences per run"))
    if empty := [i for i, r in enumerate(runs) if r.size == 0]:
        raise DataError(explain("a run has no queries", got=f"runs {empty[:5]}", fix="drop empty runs"))
    if bad := [i for i, r in enumerate(runs) if not np.isfinite(r).all()]:
        raise DataError(explain("differences must be finite", got=f"runs {bad[:5]}", fix="check the per-query scores"))
    check_positive_int("n_boot", n_boot, fix="e.g. 2000")
    check_probability("level", level, open_low=True, open_high=True, fix="e.g. 0.95")
    rng, n_runs = np.random.default_rng(seed), len(runs)
    # per run, n_boot x n_runs independent resampled query means: column j serves the j-th draw of a replicate,
    # so a run drawn twice in one replicate gets two independent query resamples
    boot_means = np.empty((n_runs, n_boot, n_runs))
    for r, values in enumerate(runs):
        picks = rng.integers(0, values.size, size=(n_boot, n_runs, values.size))  # (B, R, Q_r)
        boot_means[r] = values[picks].mean(axis=2)
    drawn = rng.integers(0, n_runs, size=(n_boot, n_runs))  # (B, R) which run fills each draw
    stats = boot_means[drawn, np.arange(n_boot)[:, None], np.arange(n_runs)[None, :]].mean(axis=1)  # (B,)
    low, high = np.quantile(stats, [(1.0 - level) / 2.0, 1.0 - (1.0 - level) / 2.0])
    run_means = tuple(float(r.mean()) for r in runs)
    spread = float(np.std(run_means, ddof=1)) if n_runs > 1 else 0.0
    return BootstrapResult(mean=float(np.mean(run_means)), low=float(low), high=float(high), level=float(level),
                           run_means=run_means, spread=spread, n_boot=n_boot)
