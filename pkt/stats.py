"""How sure a number is: 95 % intervals for one model's score, and whether two models differ by more than the
noise of the examples they were scored on.

* a mean over examples (NLL, KL: token-weighted, the sum of each example's token values over the sum of its
  token counts): percentile bootstrap over examples (`bootstrap_ci`);
* an accuracy (k of n items right): the Wilson score interval (`wilson_interval`), which stays inside [0, 1]
  and is not degenerate at 0 or n (the normal approximation gives [0, 0] for 0 of 40);
* two models on the same examples: paired bootstrap of the difference (`paired_difference`): resample the
  examples, recompute both scores on the same resample, take the 2.5 / 97.5 percentiles of the difference.
  Pairing removes the examples' own difficulty from the noise, which dominates at these sizes. The difference
  is *inside the noise* when that interval contains 0 (a two-sided test at the 5 % level). Models scored on
  different examples fall back to resampling each model's examples independently (`unpaired=True`).

The resampling is scipy.stats.bootstrap's (percentile method: it stays defined when every resample gives the
same value, e.g. two models with identical answers, where BCa is undefined); every call is seeded, so a table
is the same on every run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
N_RESAMPLES = 10_000
SEED = 0


def _ratio(rows, axis=-1):
    """rows [2, ..., n] = (values, weights) -> sum(values) / sum(weights) over `axis` (scipy hands a vectorized
    statistic the resamples as [2, n_resamples, n])."""
    return rows[0].sum(axis=axis) / rows[1].sum(axis=axis)


def _rows(values, weights) -> np.ndarray:
    """[2, n]: the values and their weights (1 each when None), one column per example."""
    v = np.asarray(values, dtype=np.float64).ravel()
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if v.shape != w.shape:
        raise ValueError(f"{v.size} values but {w.size} weights")
    if v.size == 0 or w.sum() <= 0:
        raise ValueError("no examples (or zero total weight) to compute a mean over")
    return np.stack([v, w])


def weighted_mean(values, weights=None) -> float:
    """sum(values) / sum(weights) (the plain mean without weights). For per-example NLL sums and token counts
    this is the pooled per-token NLL."""
    return float(_ratio(_rows(values, weights)))


def _bootstrap(samples: tuple, statistic, level: float, n_resamples: int, seed: int) -> tuple[float, float]:
    """Percentile interval of statistic(*samples); each sample is [rows, n] and is resampled by columns
    (an example's rows stay together; different samples are resampled independently)."""
    from scipy.stats import bootstrap

    if any(s.shape[-1] < 2 for s in samples):          # one example: nothing to resample
        x = float(statistic(*samples))
        return x, x
    res = bootstrap(samples, statistic, vectorized=True, axis=-1, confidence_level=level,
                    n_resamples=n_resamples, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def bootstrap_ci(values, weights=None, level: float = LEVEL, n_resamples: int = N_RESAMPLES,
                 seed: int = SEED) -> tuple[float, float]:
    """Percentile-bootstrap interval of `weighted_mean(values, weights)`, resampling examples (each example's
    value and weight together)."""
    return _bootstrap((_rows(values, weights),), _ratio, level, n_resamples, seed)


def wilson_interval(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of the proportion successes / n."""
    from scipy.stats import binomtest

    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"{successes} successes of {n}")
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


@dataclass(frozen=True)
class Difference:
    """a - b with its bootstrap interval; `inside_noise` when the interval contains 0."""
    diff: float
    low: float
    high: float
    paired: bool

    @property
    def inside_noise(self) -> bool:
        return self.low <= 0.0 <= self.high


def paired_difference(a, b, weights_a=None, weights_b=None, level: float = LEVEL,
                      n_resamples: int = N_RESAMPLES, seed: int = SEED, unpaired: bool = False) -> Difference:
    """weighted_mean(a, weights_a) - weighted_mean(b, weights_b) with its bootstrap interval. Paired (the
    default): a[i] and b[i] are the same example, resampled together. `unpaired=True`: a and b may be of
    different examples (and lengths); each is resampled on its own."""
    ra, rb = _rows(a, weights_a), _rows(b, weights_b)
    diff = float(_ratio(ra) - _ratio(rb))
    if unpaired:
        low, high = _bootstrap((ra, rb), lambda x, y, axis=-1: _ratio(x, axis) - _ratio(y, axis),
                               level, n_resamples, seed)
        return Difference(diff, low, high, paired=False)
    if ra.shape != rb.shape:
        raise ValueError(f"paired difference of {ra.shape[-1]} and {rb.shape[-1]} examples")
    both = np.concatenate([ra, rb])                     # [4, n]: one example's four numbers stay together
    low, high = _bootstrap((both,), lambda x, axis=-1: _ratio(x[:2], axis) - _ratio(x[2:], axis),
                           level, n_resamples, seed)
    return Difference(diff, low, high, paired=True)
