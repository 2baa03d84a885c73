"""Uncertainty of mean scores over cases: bootstrap intervals and the Wilcoxon signed-rank test.

Used by ``uumamba ablate`` (:mod:`uumamba.ablation.report`) and meant for any comparison of
per-case scores (Dice, HD95) between models evaluated on the same cases.

- :func:`bootstrap_mean` — the mean of per-case values and its percentile bootstrap interval:
  the *cases* are resampled with replacement (Efron's percentile bootstrap; B. Efron and
  R. J. Tibshirani, *An Introduction to the Bootstrap*, Chapman & Hall 1993, ch. 13);
- :func:`paired_bootstrap_difference` — the mean of per-case differences ``a - b`` of two
  models scored on the same cases, with the same interval over resampled *pairs* (each
  resample draws cases, and a drawn case brings both of its scores, so the correlation
  between the models on a case is kept);
- :func:`paired_bootstrap_ratio` — the geometric mean of per-case ratios ``a / b`` (e.g.
  seconds per volume of two models), the paired bootstrap of the log ratios;
- :func:`wilcoxon_signed_rank` — ``scipy.stats.wilcoxon`` on those pairs (two-sided, zero
  differences dropped as in Wilcoxon's original method, scipy's default), with the cases
  scipy does not answer well handled first: no pairs, all differences zero.

NaN values (a class absent from both masks, HD95 undefined for an empty mask) are dropped
before anything is computed — case by case for one sample, pair by pair for two — and ``n``
in every result counts what remained. Resampling uses ``numpy.random.default_rng(seed)``: the
same values and seed give the same interval on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

#: Bootstrap resamples used unless told otherwise (percentile intervals need their tails
#: well sampled: Efron and Tibshirani ask for at least 1000; 10 000 take milliseconds for a
#: few hundred cases).
N_RESAMPLES = 10_000
#: Resamples drawn at a time (bounds the index array to this many x n_cases integers).
_CHUNK = 1000

#: Non-zero paired differences below which the exact two-sided signed-rank p-value cannot
#: reach 0.05 (its minimum is 2 / 2**n: 0.0625 for n = 5, 0.03125 for n = 6).
MIN_PAIRS_FOR_005 = 6


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap interval.

    Attributes:
        estimate: the mean of the (non-NaN) values; NaN when there are none.
        low / high: the interval's ends (``(1 - confidence) / 2`` and ``(1 + confidence) / 2``
            percentiles of the resampled means); NaN when there are no values.
        n: number of values (cases, or pairs) the mean is taken over.
        confidence: the interval's nominal coverage, e.g. 0.95.
    """

    estimate: float
    low: float
    high: float
    n: int
    confidence: float

    def to_json(self) -> dict[str, float | int | None]:
        """The fields as a JSON-ready dict (NaN as None)."""
        def clean(v: float) -> float | None:
            return None if math.isnan(v) else float(v)

        return {"estimate": clean(self.estimate), "low": clean(self.low),
                "high": clean(self.high), "n": self.n, "confidence": self.confidence}


def _vector(values: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1D sequence of per-case values, got shape "
                         f"{array.shape}")
    return array


def _check_settings(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples={n_resamples}: need at least 1 resample")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence}: must lie strictly between 0 and 1")


def _percentile_interval(values: np.ndarray, n_resamples: int, confidence: float,
                         seed: int, statistic: str = "mean") -> Interval:
    """Efron's percentile interval of the mean (or ``statistic="median"``) of ``values`` (1D,
    no NaN)."""
    n = int(values.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, confidence)
    reduce = {"mean": np.mean, "median": np.median}[statistic]
    estimate = float(reduce(values))
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, _CHUNK):
        rows = min(_CHUNK, n_resamples - start)
        index = rng.integers(0, n, size=(rows, n))  # each row: one resample of the cases
        means[start:start + rows] = reduce(values[index], axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    # a constant sample has a point interval; float rounding of the means must not widen it
    # past the estimate
    return Interval(estimate, float(min(low, estimate)), float(max(high, estimate)), n,
                    confidence)


def bootstrap_mean(values: ArrayLike, n_resamples: int = N_RESAMPLES, confidence: float = 0.95,
                   seed: int = 0) -> Interval:
    """Mean of per-case values with its percentile bootstrap interval.

    Args:
        values: shape (n_cases,), one value per case (e.g. one class's Dice); NaN entries are
            dropped first.
        n_resamples: bootstrap resamples B; each draws n cases with replacement from the
            non-NaN values and takes their mean.
        confidence: coverage of the interval (0.95: the 2.5 and 97.5 % points of the B means).
        seed: seed of ``numpy.random.default_rng`` (same values + seed: same interval).

    Returns:
        :class:`Interval`; a constant sample (or a single case) gives ``low == estimate ==
        high``; no values give NaN with ``n = 0``.

    Raises:
        ValueError: ``values`` is not 1D, ``n_resamples`` < 1, or ``confidence`` not in (0, 1).
    """
    _check_settings(n_resamples, confidence)
    array = _vector(values, "values")
    return _percentile_interval(array[~np.isnan(array)], n_resamples, confidence, seed)


def bootstrap_median(values: ArrayLike, n_resamples: int = N_RESAMPLES,
                     confidence: float = 0.95, seed: int = 0) -> Interval:
    """Median of per-case values with its percentile bootstrap interval; as
    :func:`bootstrap_mean` (same arguments, NaN handling and errors) with the median of each
    resample (e.g. of per-round speed ratios, where one disturbed round should not move it)."""
    _check_settings(n_resamples, confidence)
    array = _vector(values, "values")
    return _percentile_interval(array[~np.isnan(array)], n_resamples, confidence, seed,
                                "median")


def paired_differences(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """``a - b`` per case, pairs with a NaN on either side dropped.

    Args:
        a, b: shape (n_cases,) each, the same cases in the same order.

    Raises:
        ValueError: the shapes differ or are not 1D.
    """
    a, b = _vector(a, "a"), _vector(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired values need one value per case on each side: a has "
                         f"{a.size}, b has {b.size}")
    keep = ~(np.isnan(a) | np.isnan(b))
    return a[keep] - b[keep]


def paired_bootstrap_difference(a: ArrayLike, b: ArrayLike, n_resamples: int = N_RESAMPLES,
                                confidence: float = 0.95, seed: int = 0) -> Interval:
    """Mean of the per-case differences ``a - b`` with its paired (percentile) bootstrap interval.

    The resampled unit is the case: each of the ``n_resamples`` resamples draws n cases with
    replacement and averages their differences, so both scores of a case always travel
    together.

    Args:
        a, b: shape (n_cases,) each, two models' scores of the same cases in the same order
            (e.g. per-case foreground-mean Dice of a cell and of the reference); pairs with a
            NaN on either side are dropped.
        n_resamples, confidence, seed: as :func:`bootstrap_mean`.

    Returns:
        :class:`Interval` of the mean difference (positive: ``a`` scores higher); ``n`` is
        the number of pairs used.

    Raises:
        ValueError: the shapes differ or are not 1D; bad ``n_resamples`` / ``confidence``.
    """
    _check_settings(n_resamples, confidence)
    return _percentile_interval(paired_differences(a, b), n_resamples, confidence, seed)


def paired_bootstrap_ratio(a: ArrayLike, b: ArrayLike, n_resamples: int = N_RESAMPLES,
                           confidence: float = 0.95, seed: int = 0) -> Interval:
    """Geometric mean of the per-case ratios ``a / b`` with its paired bootstrap interval.

    :func:`paired_bootstrap_difference` of ``log a`` and ``log b``, mapped back with ``exp``:
    for positive quantities where ratios, not differences, compare (seconds per volume of
    two models on the same volumes; a volume twice as large weighs no more than another).

    Args:
        a, b: shape (n_cases,) each, positive, the same cases in the same order; pairs with a
            NaN on either side are dropped.
        n_resamples, confidence, seed: as :func:`bootstrap_mean`.

    Returns:
        :class:`Interval` of the ratio (below 1: ``a`` is smaller); ``n`` pairs; NaN with
        ``n = 0`` when no pair is left.

    Raises:
        ValueError: as :func:`paired_bootstrap_difference`; a value that is not NaN and not
            finite and > 0.
    """
    a, b = _vector(a, "a"), _vector(b, "b")
    both = np.concatenate([a, b])
    both = both[~np.isnan(both)]  # NaN: dropped pair by pair below, not refused
    if np.any(~np.isfinite(both)) or np.any(both <= 0):
        raise ValueError("paired ratios need finite values > 0 on both sides")
    d = paired_bootstrap_difference(np.log(a), np.log(b), n_resamples, confidence, seed)
    return Interval(math.exp(d.estimate), math.exp(d.low), math.exp(d.high), d.n,
                    d.confidence)


@dataclass(frozen=True)
class WilcoxonResult:
    """The outcome of :func:`wilcoxon_signed_rank`.

    Attributes:
        statistic: scipy's statistic (the smaller of the positive- and negative-rank sums for
            the two-sided test); None when no test was run.
        p_value: two-sided p; 1.0 when every difference is zero (no evidence of any
            difference); None when there is no pair.
        n: pairs used (NaN pairs dropped); n_nonzero: of them, with a non-zero difference
            (the ones the test ranks).
        note: a remark for the reader, else None: no pairs, all differences zero (the two
            cases whose p-value is not scipy's), or too few non-zero differences for any
            two-sided p below 0.05 (fewer than :data:`MIN_PAIRS_FOR_005`; p is scipy's).
    """

    statistic: float | None
    p_value: float | None
    n: int
    n_nonzero: int
    note: str | None = None


def wilcoxon_signed_rank(a: ArrayLike, b: ArrayLike) -> WilcoxonResult:
    """Two-sided Wilcoxon signed-rank test of the paired differences ``a - b``.

    Calls ``scipy.stats.wilcoxon(a - b)`` with scipy's defaults (``zero_method="wilcox"``:
    zero differences are dropped; ``method="auto"``: the exact distribution for small samples
    without ties, else the normal approximation) after dropping NaN pairs. Handled before
    scipy is asked: no pairs (p None) and only zero differences (p 1.0, which some scipy
    versions refuse with an error and others answer with a division warning).

    Args:
        a, b: shape (n_cases,) each, the same cases in the same order.

    Returns:
        :class:`WilcoxonResult`. With fewer than :data:`MIN_PAIRS_FOR_005` non-zero
        differences no two-sided p can fall below 0.05 (the exact minimum is ``2 / 2**n``):
        the p-value is still scipy's, and ``note`` says so.

    Raises:
        ValueError: the shapes differ or are not 1D.
    """
    from scipy.stats import wilcoxon

    d = paired_differences(a, b)
    nonzero = int(np.count_nonzero(d))
    if d.size == 0:
        return WilcoxonResult(None, None, 0, 0, "no paired cases")
    if nonzero == 0:
        return WilcoxonResult(0.0, 1.0, int(d.size), 0, "all differences are zero")
    result = wilcoxon(d)
    note = None
    if nonzero < MIN_PAIRS_FOR_005:
        note = f"{nonzero} non-zero difference(s); p < 0.05 needs {MIN_PAIRS_FOR_005}"
    return WilcoxonResult(float(result.statistic), float(result.pvalue), int(d.size), nonzero,
                          note)
