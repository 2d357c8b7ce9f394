"""Uncertainty of evaluation scores: bootstrap confidence intervals and paired comparisons.

Pure numpy (and the standard library), so result files can be analysed without torch.

Every score is a per-example value, usually in ``[0, 1]`` (1 = correct; partial credit allowed).
A method's score on ``n`` examples is their mean; its uncertainty comes from which examples were
drawn, so intervals resample examples:

* :func:`bootstrap_ci` - percentile bootstrap of a mean: draw ``n`` examples with replacement,
  ``resamples`` times, and take the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``
  quantiles of the resampled means (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993,
  ch. 13).
* :func:`stratified_bootstrap_ci` - the same for an average of several groups' means (e.g. the
  average over tasks), resampling within each group.
* :func:`paired_comparison` - two methods on the same examples: the mean difference with a paired
  bootstrap interval (the same example indices for both methods, i.e. a bootstrap of the
  per-example differences), wins / ties / losses, and the exact two-sided sign test (exact
  McNemar test when scores are 0/1) on the examples where the two differ.

All resampling is seeded (``numpy.random.default_rng(seed)``), so results are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "PairedComparison",
    "bootstrap_ci",
    "paired_comparison",
    "sign_test_p_value",
    "stratified_bootstrap_ci",
]

#: Resampled values drawn per block, so memory stays bounded for large ``n x resamples``.
_BLOCK_ELEMENTS = 1 << 20


def _as_scores(scores: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D sequence of per-example scores, got shape {values.shape}."
        )
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} contains NaN or infinite values; every example needs a finite score.")
    return values


def _check_settings(confidence: float, resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence}.")
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, e.g. 10_000; got {resamples!r}.")


def _resampled_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``resamples`` samples of ``len(values)`` values drawn with replacement."""
    n = values.size
    out = np.empty(resamples, dtype=np.float64)
    block = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, resamples, block):
        stop = min(resamples, start + block)
        # int32 indices: about 2.5x faster to draw than numpy's default int64
        out[start:stop] = values[rng.integers(0, n, size=(stop - start, n), dtype=np.int32)].mean(axis=1)
    return out


def _interval(center: float, resampled: np.ndarray, confidence: float) -> tuple[float, float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    return center, float(low), float(high)


def bootstrap_ci(
    scores: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of per-example scores with its percentile-bootstrap confidence interval.

    With ``n`` scores :math:`x_i`, each of ``resamples`` replicates draws ``n`` indices uniformly
    with replacement and takes :math:`\\bar x^* = \\frac1n \\sum_i x_{j_i}`; the interval is the
    :math:`\\alpha/2` and :math:`1-\\alpha/2` quantiles (linear interpolation) of the
    :math:`\\bar x^*`, with :math:`\\alpha = 1 - \\text{confidence}`.

    Parameters
    ----------
    scores
        Per-example scores (usually in [0, 1]); at least one, all finite.
    confidence
        Coverage of the interval, default 0.95.
    resamples
        Bootstrap replicates, default 10,000.
    seed
        Seed of ``numpy.random.default_rng``; the same inputs and seed give the same interval.

    Returns
    -------
    tuple of float
        ``(mean, low, high)``. When every score is equal (``n = 1`` included) the interval is
        degenerate: ``low = high = mean``.

    Raises
    ------
    ValueError
        Empty or non-finite scores, ``confidence`` outside (0, 1), ``resamples < 1``.
    """
    values = _as_scores(scores, "scores")
    _check_settings(confidence, resamples)
    mean = float(values.mean())
    if np.all(values == values[0]):  # no spread to resample: avoid rounding noise around the mean
        return mean, mean, mean
    return _interval(mean, _resampled_means(values, resamples, np.random.default_rng(seed)), confidence)


def stratified_bootstrap_ci(
    groups: Sequence[Sequence[float] | np.ndarray],
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Unweighted average of several groups' means with a stratified bootstrap interval.

    The estimate is :math:`\\frac1G \\sum_g \\bar x_g` (e.g. the average score over tasks, each
    task counting once whatever its number of examples). Each replicate resamples every group
    within itself (``n_g`` draws with replacement from group ``g``) and averages the resampled
    group means; the interval is their percentile interval as in :func:`bootstrap_ci`. With one
    group this is :func:`bootstrap_ci`.

    Parameters
    ----------
    groups
        One non-empty sequence of finite per-example scores per group.
    confidence, resamples, seed
        As in :func:`bootstrap_ci`.

    Returns
    -------
    tuple of float
        ``(average of group means, low, high)``; degenerate when no group has any spread.

    Raises
    ------
    ValueError
        No groups, an empty or non-finite group, or bad ``confidence`` / ``resamples``.
    """
    if len(groups) == 0:
        raise ValueError("groups must hold at least one group of per-example scores.")
    arrays = [_as_scores(g, f"groups[{i}]") for i, g in enumerate(groups)]
    _check_settings(confidence, resamples)
    center = float(np.mean([a.mean() for a in arrays]))
    if all(np.all(a == a[0]) for a in arrays):
        return center, center, center
    rng = np.random.default_rng(seed)
    resampled = np.mean([_resampled_means(a, resamples, rng) for a in arrays], axis=0)
    return _interval(center, resampled, confidence)


def sign_test_p_value(wins: int, losses: int) -> float:
    """Exact two-sided sign test (exact McNemar test) on the discordant examples.

    Under the null hypothesis that neither method is better, each of the
    :math:`m = \\text{wins} + \\text{losses}` examples where they differ is a win with
    probability 1/2, so :math:`X \\sim \\text{Binomial}(m, 1/2)` and

    .. math:: p = \\min\\left(1,\\ 2 \\sum_{k=0}^{\\min(w, l)} \\binom{m}{k} 2^{-m}\\right),

    computed exactly in integers; ``p = 1`` when there is no discordant example. Ties carry no
    information on which method is better and are left out.

    Parameters
    ----------
    wins, losses
        Counts of examples where the second method scores higher / lower than the first.

    Returns
    -------
    float
        The p-value in (0, 1].

    Raises
    ------
    ValueError
        Negative counts.
    """
    if wins < 0 or losses < 0:
        raise ValueError(f"wins and losses must be non-negative counts, got {wins} and {losses}.")
    m = wins + losses
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2**m)


@dataclass(frozen=True)
class PairedComparison:
    """Method B against method A on the same examples (see :func:`paired_comparison`).

    Attributes
    ----------
    n
        Number of paired examples.
    mean_a, mean_b
        Mean scores of A and B.
    difference
        Mean of the per-example differences ``b - a`` (= ``mean_b - mean_a`` up to rounding).
    ci_low, ci_high
        Paired-bootstrap confidence interval of ``difference``.
    confidence
        Coverage of that interval (e.g. 0.95).
    wins, ties, losses
        Examples where B scores higher than, equal to, lower than A.
    p_value
        Exact two-sided sign-test p-value on the ``wins + losses`` discordant examples.
    """

    n: int
    mean_a: float
    mean_b: float
    difference: float
    ci_low: float
    ci_high: float
    confidence: float
    wins: int
    ties: int
    losses: int
    p_value: float

    @property
    def significant(self) -> bool:
        """Whether the confidence interval of the difference excludes 0."""
        return self.ci_low > 0.0 or self.ci_high < 0.0


def paired_comparison(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> PairedComparison:
    """Compare method B with method A, both scored on the same examples in the same order.

    The paired bootstrap draws example indices with replacement and applies the same indices to
    both methods, so it keeps the correlation between the two scores of one example; the
    resampled difference of means is then the resampled mean of :math:`d_i = b_i - a_i`, and its
    interval is :func:`bootstrap_ci` of the :math:`d_i`. Wins / ties / losses count
    :math:`b_i > a_i`, :math:`b_i = a_i`, :math:`b_i < a_i`; the p-value is
    :func:`sign_test_p_value` of the wins and losses.

    Parameters
    ----------
    a, b
        Per-example scores of methods A and B (finite, same length, example ``i`` the same for
        both).
    confidence, resamples, seed
        As in :func:`bootstrap_ci`.

    Returns
    -------
    PairedComparison

    Raises
    ------
    ValueError
        Different lengths, empty or non-finite scores, bad ``confidence`` / ``resamples``.
    """
    x = _as_scores(a, "a")
    y = _as_scores(b, "b")
    if x.size != y.size:
        raise ValueError(
            f"A paired comparison needs both methods' scores on the same examples: got {x.size} and "
            f"{y.size} scores."
        )
    difference, low, high = bootstrap_ci(y - x, confidence=confidence, resamples=resamples, seed=seed)
    wins = int(np.sum(y > x))
    losses = int(np.sum(y < x))
    return PairedComparison(
        n=int(x.size),
        mean_a=float(x.mean()),
        mean_b=float(y.mean()),
        difference=difference,
        ci_low=low,
        ci_high=high,
        confidence=confidence,
        wins=wins,
        ties=int(x.size) - wins - losses,
        losses=losses,
        p_value=sign_test_p_value(wins, losses),
    )
