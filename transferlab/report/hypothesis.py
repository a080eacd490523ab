"""The answer to the study's question, from the per-target lineage tests.

Question: do adversarial examples crafted on a target's own source (same pretraining)
lower its accuracy more than examples crafted on other sources of the same architecture?

Each lineage row compares, for one target (column ``finetuned``), attack, eps and seed, the
target's accuracy under its own source's examples (``pretrained_from``) with its accuracy under
one other source's examples (``other_pretrained``) (difference = acc_own - acc_other; negative
supports the hypothesis). The rows are not
independent: one target appears under several eps and other sources. So the pooled test
treats each (target, seed) pair as one unit: its rows are averaged first, then a
sign-flip permutation test asks whether the unit means are centred on zero. The per-row
McNemar tests (one per target x other source x eps x seed, over the paired samples) are
counted, not combined, because they share targets and samples.
"""

from __future__ import annotations

import math

import pandas as pd
from transferlab.stats import bootstrap_mean_ci, cohens_h, sign_flip_test

ALPHA = 0.05
SMALL_SAMPLE = 10  # fewer units than this: the exact sign-flip interval instead of a percentile bootstrap
NOT_TESTABLE = "Not testable: no target has both its own source and another source of the same architecture."


def _units(lineage: pd.DataFrame) -> pd.Series:
    """Mean difference per (target, seed): the independent-ish units of the pooled test."""
    return lineage.groupby(["finetuned", "seed"], sort=True)["difference"].mean()


def _smallest_p(n_units: int) -> float:
    """The smallest two-sided p an exact sign-flip test over n units can give: 2 / 2^n."""
    return min(1.0, 2.0 / 2 ** n_units) if n_units <= 16 else 0.0


def sign_flip_interval(units, confidence: float = 0.95) -> tuple[float, float] | None:
    """The exact interval that goes with the sign-flip test: every shift d whose test on ``units - d`` is not
    rejected at 1 - confidence (p >= alpha), as (low, high).

    It agrees with the test by construction (it leaves out 0 exactly when p < alpha), so it can never look
    significant beside "too few repeats". None when no shift can be rejected at all: with n units the
    smallest possible p is 2 / 2^n, so at 95% five units or fewer give no interval. Exhaustive over the
    2^n sign patterns: meant for the handful of units below SMALL_SAMPLE.
    """
    import itertools

    import numpy as np

    u = np.asarray(units, dtype=float)
    u = u[np.isfinite(u)]
    n = u.size
    alpha = 1.0 - confidence
    if n < 2 or _smallest_p(n) >= alpha or n > 16:
        return None
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    # p(d) is a step function of d that can only change where some sign pattern's |mean| ties the
    # observed |mean|: at the mean of a non-empty subset of the units. Test those points and the midpoints.
    masks = signs[1:] < 0  # every non-empty subset (the all-plus row is the empty one)
    breaks = np.unique(np.round((masks @ u) / masks.sum(axis=1), 12))
    points = np.unique(np.concatenate([breaks, (breaks[:-1] + breaks[1:]) / 2]))
    shifted = u[None, :] - points[:, None]
    tolerance = 1e-12 * max(1.0, float(np.abs(shifted).max()))
    observed = np.abs(shifted.mean(axis=1))
    p = np.mean(np.abs(shifted @ signs.T) / n >= observed[:, None] - tolerance, axis=1)
    kept = points[p >= alpha]
    return (float(kept.min()), float(kept.max())) if kept.size else None


def hypothesis_summary(lineage: pd.DataFrame | None, confidence: float = 0.95, alpha: float = ALPHA) -> dict:
    """Pooled answer over every lineage row; see the module docstring for the design.

    Differences are returned as fractions (``mean_difference``) and in percentage points
    (``*_points``). ``verdict`` is one of "yes", "opposite", "no clear difference",
    "too few repeats" or "not testable"; ``sentence`` says it in plain words."""

    if lineage is None or len(lineage) == 0 or lineage["difference"].notna().sum() == 0:
        return {"testable": False, "verdict": "not testable", "sentence": NOT_TESTABLE, "rows": 0, "units": 0,
                "targets": 0, "seeds": 0, "mcnemar_tests": 0, "mcnemar_significant": 0,
                "mcnemar_own_better": 0, "mcnemar_other_better": 0}
    rows = lineage.dropna(subset=["difference"])
    units = _units(rows)
    test = sign_flip_test(units.to_numpy())
    # A percentile bootstrap over a handful of units is far too narrow (it never leaves the data's range),
    # and a Student-t interval can exclude zero where the exact test cannot reach p < alpha (four units:
    # "too few repeats" beside "-7.4 to -1.4"). Below SMALL_SAMPLE units the interval is the sign-flip
    # test's own, and where that test cannot reject anything (five units or fewer at 95%) there is none.
    if len(units) >= SMALL_SAMPLE:
        (low, high), interval = bootstrap_mean_ci(units.to_numpy(), confidence=confidence), "bootstrap"
    else:
        exact = sign_flip_interval(units.to_numpy(), confidence=confidence)
        (low, high), interval = (exact, "sign-flip") if exact else ((math.nan, math.nan), None)
    acc_own, acc_other = float(rows["acc_own"].mean()), float(rows["acc_other"].mean())
    significant = rows[rows["mcnemar_p"] < alpha]
    summary = {
        "testable": True,
        "rows": len(rows),
        "units": int(test["n"]),
        # Run names carry their seed (final_..._s1): a target is the same run at every seed.
        "targets": int(rows["finetuned"].astype(str).str.replace(r"_s\d+$", "", regex=True).nunique()),
        "seeds": int(rows["seed"].nunique()),
        "mean_difference": float(rows["difference"].mean()),
        "unit_mean_difference": float(test["mean"]),
        "ci_low": low,
        "ci_high": high,
        "confidence": confidence,
        "interval": interval,  # "bootstrap", "sign-flip" (few units) or None (too few units for any)
        "p_value": float(test["p_value"]),
        "smallest_possible_p": _smallest_p(int(test["n"])),
        "acc_own": acc_own,
        "acc_other": acc_other,
        "cohens_h": cohens_h(acc_own, acc_other),
        "mcnemar_tests": len(rows),
        "mcnemar_significant": len(significant),
        # A lower accuracy under the own source's examples means they transferred better.
        "mcnemar_own_better": int((significant["difference"] < 0).sum()),
        "mcnemar_other_better": int((significant["difference"] > 0).sum()),
    }
    summary["mean_difference_points"] = 100 * summary["mean_difference"]
    summary["unit_mean_difference_points"] = 100 * summary["unit_mean_difference"]
    summary["ci_low_points"], summary["ci_high_points"] = 100 * low, 100 * high
    summary["verdict"], summary["sentence"] = _verdict(summary, alpha)
    return summary


def _verdict(s: dict, alpha: float) -> tuple[str, str]:
    d = s["mean_difference_points"]
    # "Lowered by X more" reads naturally as a positive number, so flip the interval with it.
    lowered_low, lowered_high = -s["ci_high_points"], -s["ci_low_points"]
    level = round(100 * s["confidence"])
    kind = {"sign-flip": "sign-flip interval", "bootstrap": "bootstrap CI"}.get(s.get("interval"), "CI")
    interval = "" if s.get("interval") is None else f"{level}% {kind} {lowered_low:.1f} to {lowered_high:.1f}; "
    units = f"{s['units']} target×seed pair{'s' if s['units'] != 1 else ''}"
    evidence = f"sign-flip p = {s['p_value']:.3g} over {units}"
    mcnemar = (f"{s['mcnemar_significant']} of {s['mcnemar_tests']} per-sample McNemar tests were significant at "
               f"{alpha:g} ({s['mcnemar_own_better']} favouring the own source, "
               f"{s['mcnemar_other_better']} favouring another source)")
    if s["smallest_possible_p"] > alpha:
        return "too few repeats", (
            f"Too few repeats to tell: accuracy under a target's own source's examples was {_compared(d)} "
            f"under other sources of the same architecture, but with only {units} the sign-flip "
            f"test cannot reach p < {alpha:g} (smallest possible p = {s['smallest_possible_p']:.3g}); {mcnemar}.")
    if s["p_value"] < alpha and d < 0:
        return "yes", (
            f"Yes: adversarial examples crafted on a target's own source lowered its accuracy by {abs(d):.1f} points "
            f"more than those from other sources of the same architecture ({interval}{evidence}).")
    low, high = s["ci_low_points"], s["ci_high_points"]
    if s["p_value"] < alpha and d > 0:
        return "opposite", (
            f"No, the opposite: adversarial examples from other sources of the same architecture lowered a target's "
            f"accuracy by {d:.1f} points more than those crafted on its own source ("
            f"{'' if s.get('interval') is None else f'{level}% {kind} {low:.1f} to {high:.1f}; '}{evidence}).")
    return "no clear difference", (
        f"No clear difference: accuracy under a target's own source's examples was {_compared(d)} under other "
        f"sources of the same architecture (difference {d:+.1f} points"
        f"{'' if s.get('interval') is None else f', {level}% {kind} {low:+.1f} to {high:+.1f}'}; {evidence}).")


def _compared(points: float) -> str:
    """'12.3 points lower than' / '0.4 points higher than' / 'the same as' (below 0.05 points)."""
    if abs(points) < 0.05:
        return "the same as"
    return f"{abs(points):.1f} points {'lower' if points < 0 else 'higher'} than"


def hypothesis_by_setting(lineage: pd.DataFrame | None, alpha: float = ALPHA) -> pd.DataFrame:
    """The pooled test repeated per (attack, eps): the effect usually grows with eps."""
    columns = ["attack", "eps", "units", "acc_own", "acc_other", "mean_difference_points", "ci_low_points",
               "ci_high_points", "interval", "p_value", "cohens_h", "mcnemar_significant", "mcnemar_tests", "verdict"]
    if lineage is None or len(lineage) == 0:
        return pd.DataFrame(columns=columns)
    rows = []
    for (attack, eps), group in lineage.groupby(["attack", "eps"], sort=True):
        s = hypothesis_summary(group, alpha=alpha)
        if s["testable"]:
            rows.append({"attack": attack, "eps": eps, **{k: s[k] for k in columns[2:]}})
    return pd.DataFrame(rows, columns=columns)


def per_target_table(lineage: pd.DataFrame | None, alpha: float = ALPHA) -> pd.DataFrame:
    """One row per (fine-tune, model it was fine-tuned from): the mean, range and significant tests over its
    lineage rows."""
    columns = ["finetuned", "pretrained_from", "other_pretrained", "tests", "acc_own", "acc_other",
               "mean_difference", "min_difference", "max_difference", "own_better", "other_better"]
    if lineage is None or len(lineage) == 0:
        return pd.DataFrame(columns=columns)
    rows = []
    for (finetuned, own), group in lineage.groupby(["finetuned", "pretrained_from"], sort=True):
        significant = group[group["mcnemar_p"] < alpha]
        rows.append({
            "finetuned": finetuned, "pretrained_from": own,
            "other_pretrained": ", ".join(sorted(group["other_pretrained"].unique())),
            "tests": len(group), "acc_own": group["acc_own"].mean(), "acc_other": group["acc_other"].mean(),
            "mean_difference": group["difference"].mean(), "min_difference": group["difference"].min(),
            "max_difference": group["difference"].max(),
            "own_better": int((significant["difference"] < 0).sum()),
            "other_better": int((significant["difference"] > 0).sum()),
        })
    return pd.DataFrame(rows, columns=columns)


def format_p(p: float) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "-"
    return "< 0.0001" if p < 1e-4 else f"{p:.3g}"
