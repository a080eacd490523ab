"""Tests for transferlab.stats against published and hand-computed values."""

import math

import numpy as np
import pytest
import torch
from scipy import stats as st

from transferlab.stats import (
    bootstrap_mean_ci,
    cohens_h,
    mcnemar_test,
    paired_difference,
    sign_flip_test,
    wilson_interval,
)


def paired_arrays(both, a_only, b_only, neither):
    """Boolean correctness vectors for a paired 2x2 table."""
    a = [True] * both + [True] * a_only + [False] * b_only + [False] * neither
    b = [True] * both + [False] * a_only + [True] * b_only + [False] * neither
    return np.array(a), np.array(b)


# ---------------------------------------------------------------- Wilson

def test_wilson_matches_published_values():
    # 81 of 263 (Newcombe 1998, Stat Med 17:857, method 3): 0.2553 to 0.3662
    low, high = wilson_interval(81, 263)
    assert low == pytest.approx(0.2553, abs=5e-5) and high == pytest.approx(0.3662, abs=5e-5)
    # 0 of 10: upper bound z^2 / (n + z^2) = 0.2775
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=5e-5))
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(1 - 0.2775, abs=5e-5)


def test_wilson_edge_cases():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low90, high90 = wilson_interval(81, 263, confidence=0.90)
    low95, high95 = wilson_interval(81, 263)
    assert low95 < low90 < high90 < high95
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


# ---------------------------------------------------------------- McNemar

def test_mcnemar_exact_branch_hand_computed():
    a, b = paired_arrays(59, 6, 16, 80)
    result = mcnemar_test(a, b)
    assert (result["n"], result["both"], result["a_only"], result["b_only"], result["neither"]) == (161, 59, 6, 16, 80)
    assert result["method"] == "exact binomial"
    # two-sided: 2 * P(X <= 6), X ~ Bin(22, 1/2) = 2 * 110056 / 2^22
    assert result["p_value"] == pytest.approx(2 * 110056 / 2**22, rel=1e-12)
    assert result["statistic"] == 6


def test_mcnemar_chi_square_branch():
    a, b = paired_arrays(50, 30, 12, 8)
    result = mcnemar_test(torch.tensor(a), torch.tensor(b))  # torch input works too
    assert result["method"].startswith("chi-square")
    statistic = (abs(30 - 12) - 1) ** 2 / 42  # = 289 / 42
    assert result["statistic"] == pytest.approx(statistic)
    assert result["p_value"] == pytest.approx(st.chi2.sf(statistic, 1))
    assert result["p_value"] == pytest.approx(0.008711, abs=1e-6)


def test_mcnemar_identical_and_symmetric():
    a = np.array([True, False, True, True])
    assert mcnemar_test(a, a)["p_value"] == 1.0
    a, b = paired_arrays(10, 5, 5, 10)
    assert mcnemar_test(a, b)["p_value"] == 1.0
    with pytest.raises(ValueError):
        mcnemar_test([True, False], [True])


# ---------------------------------------------------------------- paired difference

def test_paired_difference_matches_newcombe_reference():
    # Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables", ch. 8
    # (Cavo et al. 2012 table): Newcombe square-and-add -0.0621 (95% CI -0.1186 to -0.0046)
    a, b = paired_arrays(59, 6, 16, 80)
    result = paired_difference(a, b)
    assert result["difference"] == pytest.approx(-10 / 161)
    assert result["ci_low"] == pytest.approx(-0.1186, abs=5e-5)
    assert result["ci_high"] == pytest.approx(-0.0046, abs=5e-5)


def test_paired_difference_identical_arrays():
    a = np.array([True] * 30 + [False] * 10)
    result = paired_difference(a, a)
    assert result["difference"] == 0.0
    assert result["ci_low"] < 0 < result["ci_high"]


# ---------------------------------------------------------------- effect size, permutation, bootstrap

def test_cohens_h():
    # 2 asin(sqrt .5) - 2 asin(sqrt .25) = pi/2 - pi/3 = pi/6
    assert cohens_h(0.5, 0.25) == pytest.approx(math.pi / 6)
    assert cohens_h(1.0, 0.0) == pytest.approx(math.pi)
    assert cohens_h(0.3, 0.3) == 0.0


def test_sign_flip_exact_hand_computed():
    # [1, 2, 3]: of the 8 sign patterns only +++ and --- reach |mean| >= 2 -> p = 2/8
    result = sign_flip_test([1.0, 2.0, 3.0])
    assert result == {"mean": 2.0, "p_value": 0.25, "n": 3}
    # [1, 1, 1, 3]: |sum| = 6 only for all-plus and all-minus (flipping a 1 gives 4,
    # flipping the 3 gives 0), so p = 2/16
    assert sign_flip_test([1, 1, 1, 3])["p_value"] == pytest.approx(2 / 16)
    # ties count: [1, -1] has mean 0, every pattern has |mean| >= 0
    assert sign_flip_test([1, -1])["p_value"] == 1.0


def test_sign_flip_monte_carlo_branch():
    rng = np.random.default_rng(1)
    shifted = rng.normal(1.0, 1.0, size=40)
    result = sign_flip_test(shifted, n_resamples=2000, seed=0)
    assert result["n"] == 40 and result["p_value"] < 0.01
    assert result == sign_flip_test(shifted, n_resamples=2000, seed=0)  # seeded
    centred = rng.normal(0.0, 1.0, size=40)
    assert sign_flip_test(centred, n_resamples=2000)["p_value"] > 0.01


def test_bootstrap_mean_ci():
    values = np.arange(1.0, 21.0)
    low, high = bootstrap_mean_ci(values, n_resamples=4000, seed=0)
    assert low < values.mean() < high
    # close to the normal-theory interval for the mean of 1..20
    half = 1.96 * values.std() / math.sqrt(values.size)
    assert low == pytest.approx(values.mean() - half, abs=0.4)
    assert high == pytest.approx(values.mean() + half, abs=0.4)
    assert bootstrap_mean_ci(values, seed=3) == bootstrap_mean_ci(values, seed=3)
    assert bootstrap_mean_ci([0.7]) == (0.7, 0.7)


# ---------------------------------------------------------------- against scipy / statsmodels, multiplicity

def test_holm_matches_hand_computed_step_down_and_skips_missing():
    from transferlab.stats import holm

    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    reject, adjusted = holm([0.01, 0.04, 0.03, 0.005, float("nan")])
    assert np.allclose(adjusted[:4], [0.03, 0.06, 0.06, 0.02]) and np.isnan(adjusted[4])
    assert reject.tolist() == [True, False, False, True, False]


def test_sign_flip_agrees_with_brute_force():
    values = np.array([-0.31, -0.12, -0.25, 0.04, -0.18, -0.2])
    # the exact test over 6 units against all 64 sign patterns counted by brute force
    signs = np.array(np.meshgrid(*[[1, -1]] * 6)).reshape(6, -1).T
    brute = np.mean(np.abs(signs @ values) >= abs(values.sum()) - 1e-12)
    assert sign_flip_test(values)["p_value"] == pytest.approx(brute)


def test_smallest_reachable_p_and_units_needed():
    from transferlab.stats import smallest_sign_flip_p, units_needed

    assert smallest_sign_flip_p(6) == pytest.approx(2 / 64) and smallest_sign_flip_p(2) == 0.5
    assert units_needed(0.05) == 6  # 2/32 = 0.0625 is not below 0.05
    assert units_needed(0.05 / 8) == 9  # Holm over 8 settings: 2/512 < 0.00625 <= 2/256


def test_cluster_bootstrap_resamples_whole_clusters():
    from transferlab.stats import cluster_bootstrap

    # 4 clusters of 25 identical rows: an observation bootstrap would look precise; whole clusters do not.
    values = np.repeat([0.0, 1.0, 2.0, 3.0], 25)
    clusters = np.repeat(["a", "b", "c", "d"], 25)
    low, high = cluster_bootstrap(lambda rows: values[rows].mean(), clusters, n_resamples=2000)
    naive = bootstrap_mean_ci(values, n_resamples=2000)
    assert high - low > 3 * (naive[1] - naive[0])
    assert low >= 0.0 and high <= 3.0
    assert np.isnan(cluster_bootstrap(lambda rows: values[rows].mean(), np.zeros(100))[0])  # one cluster: none


def _clustered_studies(rng, studies: int, runs: int, targets: int, effect: float) -> np.ndarray:
    """[studies, runs, targets] differences: every target of a run shares the run's draw (the source model and
    its adversarial sets), plus a little target noise."""
    run_effect = rng.normal(effect, 0.05, size=(studies, runs, 1))
    return run_effect + rng.normal(0.0, 0.005, size=(studies, runs, targets))


@pytest.mark.slow  # over 0.7 s on 2 cores: the full suite (--all) runs it
def test_false_positive_rate_near_alpha_with_pretraining_runs_as_units_and_inflated_with_targets():
    rng = np.random.default_rng(0)
    null = _clustered_studies(rng, studies=300, runs=10, targets=4, effect=0.0)
    per_run = np.array([sign_flip_test(study.mean(axis=1))["p_value"] for study in null])
    rate = np.mean(per_run < 0.05)
    assert 0.015 <= rate <= 0.09, rate  # 0.05 +- 3 binomial sd over 300 studies
    # Counting every target as a unit (pseudo-replication) rejects far too often on the same null data.
    per_target = np.array([sign_flip_test(study.ravel(), n_resamples=499)["p_value"] for study in null[:100]])
    assert np.mean(per_target < 0.05) > 0.2


def test_a_planted_effect_is_found_with_pretraining_runs_as_units():
    rng = np.random.default_rng(1)
    planted = _clustered_studies(rng, studies=50, runs=10, targets=4, effect=-0.08)
    found = np.array([sign_flip_test(study.mean(axis=1))["p_value"] for study in planted]) < 0.05
    assert found.mean() > 0.9


def test_row_wise_spearman_and_its_cluster_interval_match_scipy():
    from transferlab.report.predictors import _spearman_rows, spearman_ci

    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(20, 12)), rng.normal(size=(20, 12))
    x[3, :6] = x[3, 6:]  # ties get average ranks
    expected = [st.spearmanr(a, b).statistic for a, b in zip(x, y)]
    assert _spearman_rows(x, y) == pytest.approx(expected)
    runs = np.repeat(np.arange(6), 2)
    rho, low, high = spearman_ci(x[0], x[0] + 0.3 * y[0], runs, n_resamples=300)
    assert rho == pytest.approx(st.spearmanr(x[0], x[0] + 0.3 * y[0]).statistic) and low <= rho <= high
    assert np.isnan(spearman_ci(x[0], y[0], np.repeat(np.arange(3), 4))[1])  # 3 runs: no interval
