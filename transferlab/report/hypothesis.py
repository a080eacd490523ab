"""The answer to the study's question, with the pretraining run as the unit of the test.

Question: do adversarial examples crafted on a target's own source (same pretraining) lower its accuracy more
than examples crafted on other sources of the same architecture?

Each lineage row compares, for one target (``finetuned``), attack, eps and seed, the target's accuracy under its
own source's examples (``pretrained_from``) with its accuracy under one other source's (``other_pretrained``):
difference = acc_own - acc_other, negative supports the hypothesis.

- **Unit.** What was drawn independently is the pretraining run (a source model at one seed). Every target
  fine-tuned from one source run (each n, each freeze depth) shares that model and the adversarial sets crafted
  on it, so their rows are averaged into one value per source run; the sign-flip test and its interval resample
  those units. With n units the exact test cannot go below p = 2 / 2^n: the report says so and how many runs
  more it needs.
- **Source strength.** A source whose examples hit *every* model harder looks as if it transferred better to its
  own fine-tunes. The from-scratch targets (same architecture, same n, same seed; they never saw any source)
  measure that: their own-minus-other gap is subtracted (difference in differences). Without scratch targets
  the effect is reported as unadjusted.
- **Floors.** A setting (attack, eps, n, freeze) where the from-scratch targets' adversarial accuracy is at or
  below chance + FLOOR_MARGIN, or where most targets sit there under both sets (predictions collapsed to about
  one class), cannot show "own vs other": it is flagged and left out of the tests.
- **Multiplicity.** The per-setting tests form one family; their p-values are Holm-adjusted (statsmodels).

The per-row McNemar tests (one per target x other source x eps x seed, over the paired samples) are counted,
not combined, because they share targets and samples.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

from transferlab.stats import (bootstrap_mean_ci, cohens_h, holm, sign_flip_test, smallest_sign_flip_p,
                               units_needed)

ALPHA = 0.05
SMALL_SAMPLE = 10  # fewer units than this: the exact sign-flip interval instead of a percentile bootstrap
CHANCE = 0.1  # the targets' chance accuracy (10 classes: MNIST); hypothesis_summary(chance=...) for others
FLOOR_MARGIN = 0.05  # a setting whose scratch targets score at most chance + this is a floor
UNIT = "pretraining run"
# A freeze depth means something only within one architecture, so the architecture is part of a setting.
SETTING_KEYS = ["attack", "eps", "finetuned_model", "n", "freeze"]
UNIT_KEYS = ["pretrained_from", "seed"]
NOT_TESTABLE = "Not testable: no target has both its own source and another source of the same architecture."


def _units(lineage: pd.DataFrame) -> pd.Series:
    """Mean difference per pretraining run (its targets, other sources and settings averaged)."""
    return lineage.groupby(UNIT_KEYS, sort=True)["difference"].mean()


def _smallest_p(n_units: int) -> float:
    return smallest_sign_flip_p(n_units)


def sign_flip_interval(units, confidence: float = 0.95) -> tuple[float, float] | None:
    """The exact interval that goes with the sign-flip test: every shift d whose test on ``units - d`` is not
    rejected at 1 - confidence (p >= alpha), as (low, high).

    It agrees with the test by construction (it leaves out 0 exactly when p < alpha), so it can never look
    significant beside "too few repeats". None when no shift can be rejected at all: with n units the
    smallest possible p is 2 / 2^n, so at 95% five units or fewer give no interval. Exhaustive over the
    2^n sign patterns (an inverted test, which scipy does not offer): meant for the handful of units below
    SMALL_SAMPLE.
    """
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


# ------------------------------------------------------------------ the rows, with n, freeze and scratch gap
def _target_info(cells: pd.DataFrame) -> pd.DataFrame:
    """n, freeze and source dataset of every evaluated fine-tune, one row per (run, seed)."""
    tuned = cells[cells["evaluated_role"] == "finetuned"]
    info = tuned[["evaluated", "seed", "evaluated_n", "evaluated_freeze", "evaluated_pretrain_dataset"]]
    return info.drop_duplicates(["evaluated", "seed"]).rename(columns={
        "evaluated": "finetuned", "evaluated_n": "n", "evaluated_freeze": "freeze",
        "evaluated_pretrain_dataset": "source"})


def _scratch_gaps(cells: pd.DataFrame) -> pd.DataFrame:
    """Per (own source, other source, setting, seed, architecture, n): the from-scratch targets' accuracy under
    the own source's examples minus under the other's (``gap``) and their accuracies, averaged over them."""
    scratch = cells[(cells["evaluated_role"] == "scratch") & (cells["crafted_on_role"] == "pretrained")]
    acc = scratch[["evaluated", "evaluated_model", "evaluated_n", "crafted_on", "attack", "eps", "seed",
                   "adversarial_accuracy"]].rename(columns={"evaluated_model": "finetuned_model", "evaluated_n": "n"})
    both = acc.rename(columns={"crafted_on": "pretrained_from", "adversarial_accuracy": "z_own"}).merge(
        acc.rename(columns={"crafted_on": "other_pretrained", "adversarial_accuracy": "z_other"}),
        on=["evaluated", "finetuned_model", "n", "attack", "eps", "seed"])
    both = both[both["pretrained_from"] != both["other_pretrained"]]
    both = both.assign(gap=both["z_own"] - both["z_other"], n=pd.to_numeric(both["n"], errors="coerce"))
    keys = ["pretrained_from", "other_pretrained", "attack", "eps", "seed", "finetuned_model", "n"]
    return both.groupby(keys, dropna=False)[["gap", "z_own", "z_other"]].mean().reset_index()


def lineage_rows(lineage: pd.DataFrame, cells: pd.DataFrame | None = None) -> pd.DataFrame:
    """The lineage rows with the target's ``n``, ``freeze`` and ``source`` dataset and, where the study has
    from-scratch targets, their gap (``scratch_gap``) and accuracies (``scratch_own``, ``scratch_other``):
    same architecture, seed and n first, the same architecture and seed at any n otherwise (``scratch_match``).
    Every join is validated as many-to-one, so no row is counted twice."""
    rows = lineage.dropna(subset=["difference"]).copy()
    rows["eps"] = rows["eps"].astype(float)
    rows = rows.drop(columns=[c for c in ("n", "freeze", "source") if c in rows.columns])
    if cells is None or cells.empty or "evaluated_n" not in cells.columns:
        rows["n"], rows["freeze"] = np.nan, np.nan
        rows["source"] = rows["pretrained_from"].astype(str).str.replace(r"^pre_|_s\d+$", "", regex=True)
    else:
        rows = rows.merge(_target_info(cells), on=["finetuned", "seed"], how="left", validate="many_to_one")
    rows["n"] = pd.to_numeric(rows["n"], errors="coerce")
    rows["freeze"] = pd.to_numeric(rows["freeze"], errors="coerce")
    rows["scratch_gap"] = rows["scratch_own"] = rows["scratch_other"] = np.nan
    rows["scratch_match"] = "none"
    if cells is None or cells.empty or "evaluated_n" not in cells.columns:
        return rows
    gaps = _scratch_gaps(cells)
    keys = ["pretrained_from", "other_pretrained", "attack", "eps", "seed", "finetuned_model"]
    same_n = rows.merge(gaps, on=keys + ["n"], how="left", validate="many_to_one")
    any_n = rows.merge(gaps.drop(columns="n").groupby(keys).mean().reset_index(), on=keys, how="left",
                       validate="many_to_one")
    use_any = same_n["gap"].isna() & any_n["gap"].notna()
    for ours, theirs in (("scratch_gap", "gap"), ("scratch_own", "z_own"), ("scratch_other", "z_other")):
        rows[ours] = np.where(use_any, any_n[theirs], same_n[theirs])
    rows["scratch_match"] = np.where(same_n["gap"].notna(), "same n", np.where(use_any, "other n", "none"))
    return rows


# ------------------------------------------------------------------ per unit and setting
def unit_effects(rows: pd.DataFrame, chance: float = CHANCE, margin: float = FLOOR_MARGIN) -> pd.DataFrame:
    """One row per (pretraining run, attack, eps, n, freeze): the raw effect (own - other, over its targets at
    that n and freeze and the other sources), the scratch gap, the adjusted effect (raw - gap; NaN without
    scratch targets), the accuracies, and whether the unit's targets sit at the floor under both sets."""
    level = chance + margin
    keyed = rows.assign(n=rows["n"].fillna(-1), freeze=rows["freeze"].fillna(-1),
                        at_floor=(rows["acc_own"] <= level) & (rows["acc_other"] <= level))
    grouped = keyed.groupby(UNIT_KEYS + ["source"] + SETTING_KEYS, sort=True, dropna=False)
    effects = grouped.agg(raw=("difference", "mean"), scratch_gap=("scratch_gap", "mean"),
                          acc_own=("acc_own", "mean"), acc_other=("acc_other", "mean"),
                          scratch_own=("scratch_own", "mean"), scratch_other=("scratch_other", "mean"),
                          targets_at_floor=("at_floor", "mean"), rows=("difference", "size")).reset_index()
    effects["adjusted"] = effects["raw"] - effects["scratch_gap"]
    return effects


def setting_floors(effects: pd.DataFrame, chance: float = CHANCE, margin: float = FLOOR_MARGIN) -> pd.DataFrame:
    """One row per setting (attack, eps, architecture, n, freeze): the scratch targets' mean adversarial accuracy on the
    sources' sets, the share of units whose targets sit at the floor, ``floor`` and why (``floor_reason``)."""
    level = chance + margin
    keyed = effects.assign(scratch_accuracy=(effects["scratch_own"] + effects["scratch_other"]) / 2)
    table = keyed.groupby(SETTING_KEYS, sort=True).agg(
        scratch_accuracy=("scratch_accuracy", "mean"), units_at_floor=("targets_at_floor", "mean"),
        units=("raw", "size")).reset_index()
    scratch_floor = table["scratch_accuracy"] <= level
    collapsed = table["units_at_floor"] >= 0.5
    table["floor"] = scratch_floor | collapsed
    table["floor_reason"] = [
        f"from-scratch targets at {100 * z:.1f}% (chance {100 * chance:g}% + {100 * margin:g})" if s else
        (f"targets at chance under both sets in {100 * c:.0f}% of units (predictions collapsed)" if k else "")
        for z, c, s, k in zip(table["scratch_accuracy"], table["units_at_floor"], scratch_floor, collapsed)]
    return table


def _effect_column(effects: pd.DataFrame) -> tuple[str, bool]:
    """'adjusted' when every unit row has a scratch gap, else 'raw' (the answer is then unadjusted)."""
    adjusted = len(effects) > 0 and effects["scratch_gap"].notna().all()
    return ("adjusted" if adjusted else "raw"), adjusted


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float, str | None]:
    """A percentile bootstrap (scipy) from SMALL_SAMPLE units on; below, the exact sign-flip interval, or none
    where that test cannot reject anything (a bootstrap or t interval could look significant beside it)."""
    if len(values) >= SMALL_SAMPLE:
        low, high = bootstrap_mean_ci(values, confidence=confidence)
        return low, high, "bootstrap"
    exact = sign_flip_interval(values, confidence=confidence)
    return (exact[0], exact[1], "sign-flip") if exact else (math.nan, math.nan, None)


def _kept(effects: pd.DataFrame, floors: pd.DataFrame) -> pd.DataFrame:
    """The unit rows of settings that are not floors."""
    flagged = effects.merge(floors[SETTING_KEYS + ["floor"]], on=SETTING_KEYS, how="left", validate="many_to_one")
    return flagged[~flagged["floor"].astype(bool)]


def analyse(lineage: pd.DataFrame | None, cells: pd.DataFrame | None = None, chance: float = CHANCE,
            margin: float = FLOOR_MARGIN) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(rows, unit effects, setting floors) of a study: lineage_rows, unit_effects and setting_floors."""
    rows = lineage_rows(lineage, cells)
    effects = unit_effects(rows, chance, margin)
    return rows, effects, setting_floors(effects, chance, margin)


def _empty_summary(sentence: str, verdict: str = "not testable") -> dict:
    return {"testable": False, "verdict": verdict, "sentence": sentence, "rows": 0, "units": 0, "targets": 0,
            "seeds": 0, "unit": UNIT, "mcnemar_tests": 0, "mcnemar_significant": 0, "mcnemar_own_better": 0,
            "mcnemar_other_better": 0, "floors": [], "adjusted": False}


def hypothesis_summary(lineage: pd.DataFrame | None, cells: pd.DataFrame | None = None, confidence: float = 0.95,
                       alpha: float = ALPHA, chance: float = CHANCE) -> dict:
    """The pooled answer: one value per pretraining run (its adjusted effect averaged over the settings that are
    not floors), a sign-flip test over those units and its interval. Differences are fractions
    (``effect``) and percentage points (``*_points``); ``verdict`` is "yes", "opposite", "no clear difference",
    "too few repeats", "floor" or "not testable"; ``sentence`` says it in plain words, with the unit, the
    number of units and, when the design cannot reach alpha, how many runs more it needs."""
    if lineage is None or len(lineage) == 0 or lineage["difference"].notna().sum() == 0:
        return _empty_summary(NOT_TESTABLE)
    rows, effects, floors = analyse(lineage, cells, chance)
    kept = _kept(effects, floors)
    floor_notes = floor_sentences(floors)
    if kept.empty:
        summary = _empty_summary("Not testable: every setting sits at a floor, where own and other sources cannot "
                                 "differ. " + " ".join(floor_notes), verdict="floor")
        return {**summary, "floors": floor_notes}
    column, adjusted = _effect_column(kept)
    units = kept.groupby(UNIT_KEYS, sort=True)[column].mean()
    test = sign_flip_test(units.to_numpy())
    low, high, interval = _interval(units.to_numpy(), confidence)
    kept_rows = rows.merge(floors[SETTING_KEYS + ["floor"]].assign(
        n=lambda f: f["n"].replace(-1, np.nan), freeze=lambda f: f["freeze"].replace(-1, np.nan)),
        on=SETTING_KEYS, how="left", validate="many_to_one")
    kept_rows = kept_rows[~kept_rows["floor"].fillna(False).astype(bool)]
    summary = {
        "testable": True, "unit": UNIT, "units": int(test["n"]), "rows": len(kept_rows),
        # Run names carry their seed (final_..._s1): a target is the same run at every seed.
        "targets": int(kept_rows["finetuned"].astype(str).str.replace(r"_s\d+$", "", regex=True).nunique()),
        "seeds": int(kept_rows["seed"].nunique()), "adjusted": adjusted,
        "settings": len(floors), "floor_settings": int(floors["floor"].sum()), "floors": floor_notes,
        "effect": float(test["mean"]), "raw": float(kept.groupby(UNIT_KEYS)["raw"].mean().mean()),
        "scratch_gap": float(kept.groupby(UNIT_KEYS)["scratch_gap"].mean().mean()) if adjusted else math.nan,
        "ci_low": low, "ci_high": high, "confidence": confidence, "interval": interval,
        "p_value": float(test["p_value"]), "smallest_possible_p": _smallest_p(int(test["n"])),
        "units_short": max(0, units_needed(alpha) - int(test["n"])),
        **_mcnemar_counts(kept_rows, alpha),
    }
    summary["cohens_h"] = cohens_h(summary["acc_own"], summary["acc_other"])
    by_setting = hypothesis_by_setting(lineage, cells, alpha, chance)
    summary["holm_settings"] = int((~by_setting["floor"]).sum())
    summary["holm_survivors"] = int(by_setting["survives_holm"].sum())
    for key in ("effect", "raw", "scratch_gap", "ci_low", "ci_high"):
        summary[f"{key}_points"] = 100 * summary[key]
    # The names earlier reports and scripts read: the answer's mean difference.
    summary["mean_difference"], summary["mean_difference_points"] = summary["effect"], summary["effect_points"]
    summary["verdict"], summary["sentence"] = _verdict(summary, alpha)
    return summary


def _mcnemar_counts(rows: pd.DataFrame, alpha: float) -> dict:
    significant = rows[rows["mcnemar_p"] < alpha]
    return {"acc_own": float(rows["acc_own"].mean()), "acc_other": float(rows["acc_other"].mean()),
            "mcnemar_tests": len(rows), "mcnemar_significant": len(significant),
            # A lower accuracy under the own source's examples means they transferred better.
            "mcnemar_own_better": int((significant["difference"] < 0).sum()),
            "mcnemar_other_better": int((significant["difference"] > 0).sum())}


def units_text(n: int) -> str:
    return f"{n} {UNIT}{'s' if n != 1 else ''}"


def _adjustment_text(s: dict) -> str:
    if not s["adjusted"]:
        return ("unadjusted for source strength: the study has no from-scratch targets to measure how hard each "
                "source's examples hit a model that never saw it")
    text = (f"adjusted for source strength (difference in differences: minus the same own-minus-other gap on "
            f"from-scratch targets, {_signed(s['scratch_gap_points'])} points on average; raw difference "
            f"{_signed(s['raw_points'])} points; per source below)")
    if abs(s["scratch_gap_points"]) < 0.05:
        text += (". The gaps cancel in the mean where every source's examples are compared with every other "
                 "source's (each pair's gap enters once with each sign): the adjustment moves the per-source "
                 "effects and the spread between pretraining runs that the test sees, not the mean")
    return text


def _signed(points: float) -> str:
    """'+1.2' / '-3.4' / '+0.0' (never '-0.0')."""
    return f"{round(points, 1) + 0.0:+.1f}"


def _verdict(s: dict, alpha: float) -> tuple[str, str]:
    d = s["effect_points"]
    level = round(100 * s["confidence"])
    kind = {"sign-flip": "sign-flip interval", "bootstrap": "bootstrap CI"}.get(s.get("interval"), "CI")
    evidence = f"sign-flip p = {format_p(s['p_value'])} over {units_text(s['units'])}, the unit of the test"
    mcnemar = (f"{s['mcnemar_significant']} of {s['mcnemar_tests']} per-sample McNemar tests were significant at "
               f"{alpha:g} ({s['mcnemar_own_better']} favouring the own source, "
               f"{s['mcnemar_other_better']} favouring another source)")
    tail = f" {_adjustment_text(s)[0].upper()}{_adjustment_text(s)[1:]}."
    if s["holm_settings"] > 1:
        tail += (f" Tested per setting, {s['holm_survivors']} of {s['holm_settings']} settings survive Holm's "
                 f"correction at {alpha:g}.")
    if s["floor_settings"]:
        tail += f" {s['floor_settings']} of {s['settings']} settings sat at a floor and were left out (see below)."
    if s["smallest_possible_p"] >= alpha:
        return "too few repeats", (
            f"Too few pretraining runs to tell: accuracy under a target's own source's examples was {_compared(d)} "
            f"under other sources of the same architecture, but with {units_text(s['units'])} (the unit of the "
            f"test) the sign-flip test cannot reach p < {alpha:g} (smallest possible p = "
            f"{s['smallest_possible_p']:.3g}); it needs at least {s['units_short']} more; {mcnemar}.{tail}")
    interval = "" if s.get("interval") is None else (
        f"{level}% {kind} {s['ci_low_points']:+.1f} to {s['ci_high_points']:+.1f}; ")
    if s["p_value"] < alpha and d < 0:
        # "Lowered by X more" reads as a positive number, so the interval is flipped with it.
        lowered = "" if s.get("interval") is None else (
            f"{level}% {kind} {-s['ci_high_points']:.1f} to {-s['ci_low_points']:.1f}; ")
        return "yes", (
            f"Yes: adversarial examples crafted on a target's own source lowered its accuracy by {abs(d):.1f} points "
            f"more than those from other sources of the same architecture ({lowered}{evidence}).{tail}")
    if s["p_value"] < alpha and d > 0:
        return "opposite", (
            f"No, the opposite: adversarial examples from other sources of the same architecture lowered a target's "
            f"accuracy by {d:.1f} points more than those crafted on its own source ({interval}{evidence}).{tail}")
    return "no clear difference", (
        f"No clear difference: accuracy under a target's own source's examples was {_compared(d)} under other "
        f"sources of the same architecture (difference {d:+.1f} points; {interval}{evidence}).{tail}")


def _compared(points: float) -> str:
    """'12.3 points lower than' / '0.4 points higher than' / 'the same as' (below 0.05 points)."""
    if abs(points) < 0.05:
        return "the same as"
    return f"{abs(points):.1f} points {'lower' if points < 0 else 'higher'} than"


def setting_text(attack, eps, model, n, freeze) -> str:
    """'pgd eps 0.1, resnet, n = 1,000, freeze 23' (n and freeze only where the rows have them)."""
    from transferlab.tables import eps_text

    parts = [f"{attack} eps {eps_text(eps)}", str(model)]
    if n is not None and not pd.isna(n) and n >= 0:
        parts.append(f"n = {int(n):,}")
    if freeze is not None and not pd.isna(freeze) and freeze >= 0:
        parts.append(f"freeze {int(freeze)}")
    return ", ".join(parts)


def floor_sentences(floors: pd.DataFrame) -> list[str]:
    """One sentence per floor setting: which, why, and that it was left out."""
    return [f"{setting_text(r.attack, r.eps, r.finetuned_model, r.n, r.freeze)} is a floor ({r.floor_reason}) "
            f"and was left out of the tests." for r in floors.itertuples() if r.floor]


def hypothesis_by_setting(lineage: pd.DataFrame | None, cells: pd.DataFrame | None = None, alpha: float = ALPHA,
                          chance: float = CHANCE) -> pd.DataFrame:
    """The test per setting (attack, eps, architecture, n, freeze) over pretraining runs, Holm-adjusted over the
    settings that are not floors (one family); floors are listed with their reason and no p-value."""
    columns = ["attack", "eps", "finetuned_model", "n", "freeze", "units", "acc_own", "acc_other", "raw_points",
               "scratch_gap_points",
               "effect_points", "adjusted", "ci_low_points", "ci_high_points", "interval", "p_value",
               "smallest_possible_p", "holm_p", "survives_holm", "floor", "floor_reason", "mean_difference_points"]
    if lineage is None or len(lineage) == 0 or lineage["difference"].notna().sum() == 0:
        return pd.DataFrame(columns=columns)
    _, effects, floors = analyse(lineage, cells, chance)
    column, adjusted = _effect_column(_kept(effects, floors))
    out = []
    for setting, group in effects.groupby(SETTING_KEYS, sort=True):
        floor = floors.set_index(SETTING_KEYS).loc[setting]
        values = group[column].to_numpy()
        test = sign_flip_test(values) if not floor["floor"] else {"p_value": math.nan}
        low, high, interval = _interval(values, 0.95) if not floor["floor"] else (math.nan, math.nan, None)
        out.append({**dict(zip(SETTING_KEYS, setting)), "units": len(group), "acc_own": group["acc_own"].mean(),
                    "acc_other": group["acc_other"].mean(), "raw_points": 100 * group["raw"].mean(),
                    "scratch_gap_points": 100 * group["scratch_gap"].mean(), "effect_points": 100 * values.mean(),
                    "adjusted": adjusted, "ci_low_points": 100 * low, "ci_high_points": 100 * high,
                    "interval": interval, "p_value": test["p_value"], "smallest_possible_p": _smallest_p(len(group)),
                    "floor": bool(floor["floor"]), "floor_reason": floor["floor_reason"]})
    table = pd.DataFrame(out)
    table["survives_holm"], table["holm_p"] = holm(table["p_value"].to_numpy(), alpha)
    table["mean_difference_points"] = table["effect_points"]
    return table[columns]


def per_source_table(lineage: pd.DataFrame | None, cells: pd.DataFrame | None = None,
                     chance: float = CHANCE) -> pd.DataFrame:
    """Raw and adjusted effect side by side per source data set and architecture, over its pretraining runs
    (settings that are not floors), with the sign-flip p over those runs and the smallest p they can reach."""
    columns = ["source", "model", "units", "raw_points", "scratch_gap_points", "adjusted_points", "p_value",
               "smallest_possible_p"]
    if lineage is None or len(lineage) == 0 or lineage["difference"].notna().sum() == 0:
        return pd.DataFrame(columns=columns)
    _, effects, floors = analyse(lineage, cells, chance)
    kept = _kept(effects, floors)
    column, _ = _effect_column(kept)
    out = []
    for (source, model), group in kept.groupby(["source", "finetuned_model"], sort=True):
        units = group.groupby(UNIT_KEYS)[["raw", "scratch_gap", "adjusted"]].mean()
        out.append({"source": source, "model": model, "units": len(units),
                    "raw_points": 100 * units["raw"].mean(), "scratch_gap_points": 100 * units["scratch_gap"].mean(),
                    "adjusted_points": 100 * units["adjusted"].mean(),
                    "p_value": sign_flip_test(units[column].to_numpy())["p_value"],
                    "smallest_possible_p": _smallest_p(len(units))})
    return pd.DataFrame(out, columns=columns)


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
