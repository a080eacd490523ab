"""Statistics for accuracy comparisons: intervals, paired tests, effect sizes, multiplicity.

Accuracies in this project are proportions over the same test images, so the
comparisons that matter are paired: did the target get image i right under
attack from source A, and under attack from source B? McNemar's test and
Newcombe's paired interval use exactly that pairing; across independent units
(pretraining runs) the sign-flip test and the bootstrap summarise per-unit
differences without assuming normality.

The formulas come from scipy and statsmodels; what is here is the output shape the
report uses (dicts with named fields, fractions, the method named) and the few
things neither library has (Newcombe's paired interval, the cluster bootstrap).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as _st


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


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
    """Wilson score interval for a binomial proportion (statsmodels' proportion_confint); (0, 1) when n == 0."""
    from statsmodels.stats.proportion import proportion_confint

    _check_confidence(confidence)
    if n == 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    low, high = proportion_confint(successes, n, alpha=1.0 - confidence, method="wilson")
    # At 0 or n successes the bound is exactly 0 or 1; rounding could miss it.
    return (0.0 if successes == 0 else max(0.0, float(low)), 1.0 if successes == n else min(1.0, float(high)))


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
    """McNemar's test (statsmodels) that A and B have the same accuracy on the same samples.

    Only discordant pairs carry information. With fewer than 25 of them the exact
    two-sided binomial test (statistic = the smaller discordant count) is used,
    otherwise the chi-square statistic with continuity correction on one degree of freedom."""
    from statsmodels.stats.contingency_tables import mcnemar

    both, a_only, b_only, neither = _paired_table(a_correct, b_correct)
    discordant = a_only + b_only
    result = {"n": both + a_only + b_only + neither, "a_only": a_only, "b_only": b_only,
              "both": both, "neither": neither}
    if discordant == 0:
        return {**result, "statistic": 0.0, "p_value": 1.0, "method": "exact binomial"}
    exact = discordant < 25
    test = mcnemar([[both, a_only], [b_only, neither]], exact=exact, correction=True)
    return {**result, "statistic": float(test.statistic), "p_value": float(min(1.0, test.pvalue)),
            "method": "exact binomial" if exact else "chi-square with continuity correction"}


def paired_difference(a_correct, b_correct, confidence: float = 0.95) -> dict:
    """acc(A) - acc(B) on the same samples, with Newcombe's (1998) paired
    square-and-add interval built from the two Wilson intervals ("method 10"; neither scipy nor
    statsmodels has the paired form, so the combination is here, the Wilson intervals are statsmodels').

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


SIGN_FLIPS = 10000  # random sign patterns of a sign-flip test whose 2^n patterns are more than this


def sign_flip_is_exact(n_units: int, n_resamples: int = SIGN_FLIPS) -> bool:
    """Whether sign_flip_test enumerates every sign pattern of ``n_units`` (else it draws ``n_resamples``)."""
    return 2 ** n_units <= n_resamples


def sign_flip_test(differences, n_resamples: int = SIGN_FLIPS, seed: int = 0) -> dict:
    """Two-sided paired permutation test that the mean of ``differences`` (one per independent unit) is zero:
    scipy.stats.permutation_test with one sample, which flips each unit's sign.

    Every one of the 2^n sign patterns is enumerated when 2^n <= n_resamples (exact); otherwise
    n_resamples random ones are drawn and p = (1 + hits) / (1 + n_resamples), never an impossible 0."""
    d = _as_float(differences)
    n = d.size
    if n == 0:
        return {"mean": 0.0, "p_value": 1.0, "n": 0}
    if n < 2 or np.all(d == 0):  # one unit: both sign patterns reach |mean|, p = 1 (scipy needs two)
        return {"mean": float(d.mean()), "p_value": 1.0, "n": n}
    result = _st.permutation_test((d,), np.mean, permutation_type="samples", vectorized=True,
                                  n_resamples=n_resamples, alternative="two-sided", rng=np.random.default_rng(seed))
    return {"mean": float(d.mean()), "p_value": float(min(1.0, result.pvalue)), "n": n}


def smallest_sign_flip_p(n_units: int) -> float:
    """The smallest two-sided p an exact sign-flip test over ``n_units`` can give: 2 / 2^n (1 for none)."""
    return min(1.0, 2.0 / 2 ** n_units) if n_units > 0 else 1.0


def units_needed(alpha: float) -> int:
    """The fewest units whose exact sign-flip test can reach p < alpha (every unit with the same sign)."""
    n = 1
    while smallest_sign_flip_p(n) >= alpha:
        n += 1
    return n


def bootstrap_mean_ci(values, confidence: float = 0.95, n_resamples: int = 10000,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of ``values`` (scipy.stats.bootstrap)."""
    v = _as_float(values)
    if v.size == 0:
        raise ValueError("bootstrap_mean_ci needs at least one value")
    _check_confidence(confidence)
    if v.size == 1 or np.all(v == v[0]):
        return (float(v[0]), float(v[0]))
    result = _st.bootstrap((v,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                           method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return (float(result.confidence_interval.low), float(result.confidence_interval.high))


def holm(p_values, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down correction (statsmodels multipletests): (reject, adjusted p) over one family.
    NaN p-values (settings left out of the family) stay NaN and are never rejected."""
    from statsmodels.stats.multitest import multipletests

    p = _as_float(p_values)
    reject, adjusted = np.zeros(p.size, bool), np.full(p.size, np.nan)
    present = ~np.isnan(p)
    if present.any():
        reject[present], adjusted[present], _, _ = multipletests(p[present], alpha=alpha, method="holm")
    return reject, adjusted


def cluster_bootstrap(statistic, clusters, n_resamples: int = 2000, seed: int = 0,
                      confidence: float = 0.95, vectorized: bool = False) -> tuple[float, float]:
    """Percentile interval of ``statistic(rows)`` when whole clusters (independent units, e.g. pretraining runs)
    are drawn with replacement: ``clusters`` labels each row; ``statistic`` takes an index array of rows and
    returns a number (NaN draws are dropped; fewer than half usable: NaNs). With ``vectorized`` and clusters of
    one size it gets all draws at once, an [n_resamples, rows] index matrix, and returns one value per draw.
    scipy's bootstrap resamples observations, not clusters, so the draw is here; the interval is the same
    percentile rule."""
    labels = np.asarray(clusters)
    names, codes = np.unique(labels, return_inverse=True)
    members = [np.flatnonzero(codes == k) for k in range(len(names))]
    if len(names) < 2:
        return (float("nan"), float("nan"))
    _check_confidence(confidence)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(names), size=(n_resamples, len(names)))
    if vectorized and len({len(m) for m in members}) == 1:
        values = np.asarray(statistic(np.stack(members)[draws].reshape(n_resamples, -1)), dtype=float)
    else:
        values = np.array([statistic(np.concatenate([members[k] for k in draw])) for draw in draws], dtype=float)
    values = values[~np.isnan(values)]
    if values.size < n_resamples // 2:
        return (float("nan"), float("nan"))
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return (float(low), float(high))
