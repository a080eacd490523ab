"""Statistics for accuracy comparisons: intervals, paired tests, effect sizes.

Accuracies in this project are proportions over the same test images, so the
comparisons that matter are paired: did the target get image i right under
attack from source A, and under attack from source B? McNemar's test and
Newcombe's paired interval use exactly that pairing; across repeated units
(targets x seeds) the sign-flip test and the bootstrap summarise per-unit
differences without assuming normality.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import stats as _st


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(_st.norm.ppf(1.0 - (1.0 - confidence) / 2.0))


def _as_bool(values) -> np.ndarray:
    """A flat numpy bool array from a numpy array, torch tensor or list."""
    if hasattr(values, "detach"):  # torch tensor, on any device
        values = values.detach().cpu().numpy()
    return np.asarray(values).astype(bool).ravel()


def _as_float(values) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=float).ravel()


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n == 0."""
    if n == 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    z = _z(confidence)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n successes the bound is exactly 0 or 1; rounding could miss it.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def _paired_table(a_correct, b_correct) -> tuple[int, int, int, int]:
    a, b = _as_bool(a_correct), _as_bool(b_correct)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in length: {a.size} vs {b.size}")
    both = int(np.sum(a & b))
    a_only = int(np.sum(a & ~b))
    b_only = int(np.sum(~a & b))
    neither = int(np.sum(~a & ~b))
    return both, a_only, b_only, neither


def mcnemar_test(a_correct, b_correct) -> dict:
    """McNemar's test that A and B have the same accuracy on the same samples.

    Only discordant pairs carry information. With fewer than 25 of them the exact
    two-sided binomial test (statistic = the smaller discordant count) is used,
    otherwise the chi-square statistic with continuity correction,
    (|a_only - b_only| - 1)^2 / (a_only + b_only), on one degree of freedom."""
    both, a_only, b_only, neither = _paired_table(a_correct, b_correct)
    discordant = a_only + b_only
    result = {"n": both + a_only + b_only + neither, "a_only": a_only, "b_only": b_only,
              "both": both, "neither": neither}
    if discordant == 0:
        return {**result, "statistic": 0.0, "p_value": 1.0, "method": "exact binomial"}
    if discordant < 25:
        p = _st.binomtest(a_only, discordant, 0.5, alternative="two-sided").pvalue
        return {**result, "statistic": float(min(a_only, b_only)), "p_value": float(min(1.0, p)),
                "method": "exact binomial"}
    statistic = (abs(a_only - b_only) - 1.0) ** 2 / discordant
    return {**result, "statistic": float(statistic), "p_value": float(_st.chi2.sf(statistic, 1)),
            "method": "chi-square with continuity correction"}


def paired_difference(a_correct, b_correct, confidence: float = 0.95) -> dict:
    """acc(A) - acc(B) on the same samples, with Newcombe's (1998) paired
    square-and-add interval built from the two Wilson intervals ("method 10").

    The correlation between the two accuracies uses Newcombe's corrected phi:
    with AD - BC > n/2 the numerator is AD - BC - n/2, between 0 and n/2 it is 0,
    below 0 it is AD - BC; phi is 0 when any margin is empty (A = both,
    B = a_only, C = b_only, D = neither)."""
    both, a_only, b_only, neither = _paired_table(a_correct, b_correct)
    n = both + a_only + b_only + neither
    if n == 0:
        return {"difference": 0.0, "ci_low": -1.0, "ci_high": 1.0, "n": 0, "method": "newcombe-paired"}
    p1, p2 = (both + a_only) / n, (both + b_only) / n
    l1, u1 = wilson_interval(both + a_only, n, confidence)
    l2, u2 = wilson_interval(both + b_only, n, confidence)

    margins = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    phi = 0.0
    if margins > 0:
        cross = both * neither - a_only * b_only
        if cross > n / 2:
            phi = (cross - n / 2) / math.sqrt(margins)
        elif cross < 0:
            phi = cross / math.sqrt(margins)

    d = p1 - p2
    low = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = d + math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return {"difference": d, "ci_low": max(-1.0, low), "ci_high": min(1.0, high), "n": n,
            "method": "newcombe-paired"}


def cohens_h(p1, p2) -> float:
    """Cohen's h = 2 asin(sqrt p1) - 2 asin(sqrt p2); |h| 0.2 small, 0.5 medium, 0.8 large."""
    for p in (p1, p2):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"proportions must lie in [0, 1], got {p}")
    return float(2 * math.asin(math.sqrt(p1)) - 2 * math.asin(math.sqrt(p2)))


def sign_flip_test(differences, n_resamples: int = 10000, seed: int = 0) -> dict:
    """Two-sided paired permutation test that the mean difference is zero.

    Under the null each unit's difference is as likely to have either sign, so the
    p-value is the share of sign assignments whose |mean| is at least the
    observed |mean|. All 2^n assignments are enumerated when n <= 16; otherwise
    n_resamples random ones are drawn and p = (1 + hits) / (1 + n_resamples),
    which never reports an impossible p of 0."""
    d = _as_float(differences)
    n = d.size
    if n == 0:
        return {"mean": 0.0, "p_value": 1.0, "n": 0}
    observed = abs(d.mean())
    tolerance = 1e-12 * max(1.0, float(np.abs(d).max()))  # float ties must count as ties
    if n <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        means = np.abs(signs @ d) / n
        p = float(np.mean(means >= observed - tolerance))
    else:
        rng = np.random.default_rng(seed)
        hits = 0
        for start in range(0, n_resamples, 1000):  # chunks keep memory small
            size = min(1000, n_resamples - start)
            signs = rng.choice((1.0, -1.0), size=(size, n))
            hits += int(np.sum(np.abs(signs @ d) / n >= observed - tolerance))
        p = (1 + hits) / (1 + n_resamples)
    return {"mean": float(d.mean()), "p_value": p, "n": n}


def bootstrap_mean_ci(values, confidence: float = 0.95, n_resamples: int = 10000,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of ``values``."""
    v = _as_float(values)
    if v.size == 0:
        raise ValueError("bootstrap_mean_ci needs at least one value")
    _z(confidence)  # validates confidence
    if v.size == 1 or np.all(v == v[0]):
        return (float(v[0]), float(v[0]))
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, 1000):
        size = min(1000, n_resamples - start)
        means[start:start + size] = v[rng.integers(0, v.size, size=(size, v.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return (float(low), float(high))
