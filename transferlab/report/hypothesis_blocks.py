"""The answer's tables in the report: the pooled measures, raw vs adjusted per source, each setting with Holm.

transferlab.report.hypothesis computes; this module lays the numbers out (report.matrices calls it from
add_hypothesis_blocks). Every p-value stands beside its unit (pretraining runs) and their number.
"""

from __future__ import annotations

import pandas as pd

from transferlab.report.doc import Doc
from transferlab.report.hypothesis import (ALPHA, format_p, hypothesis_by_setting, per_source_table, setting_text,
                                           units_text)
from transferlab.stats import SIGN_FLIPS, sign_flip_is_exact, units_needed


def _points(value) -> str:
    return "-" if pd.isna(value) else f"{value:+.1f}"


def _percent(value) -> str:
    return "-" if pd.isna(value) else f"{100 * value:.1f}"


def _interval_row(summary: dict) -> tuple[str, str]:
    level = round(100 * summary["confidence"])
    if summary.get("interval") is None:
        return (f"{level}% interval over {summary['unit']}s",
                f"none: with {units_text(summary['units'])} the exact sign-flip test cannot exclude any "
                f"difference at {1 - summary['confidence']:.2g}")
    kind = ("exact sign-flip interval (few units)" if summary["interval"] == "sign-flip"
            else "percentile bootstrap CI")
    return (f"{level}% {kind} over {summary['unit']}s (points)",
            f"{summary['ci_low_points']:+.1f} to {summary['ci_high_points']:+.1f}")


def _setting_interval(low, high, kind) -> str:
    """'-3.1 to +0.4 (sign-flip)': the kind travels with the numbers; 'none (too few units)' where the exact
    test cannot reject anything."""
    if kind is None or pd.isna(low) or pd.isna(high):
        return "none (too few units)"
    return f"{low:+.1f} to {high:+.1f} ({kind})"


def _patterns(units: int) -> str:
    """'' for an exact test; ' (10,000 random of 2^24 sign patterns)' where p is a Monte Carlo estimate, which
    cannot go below 1 / 10,001 whatever the smallest exact p."""
    return "" if sign_flip_is_exact(units) else f" ({SIGN_FLIPS:,} random of 2^{units} sign patterns)"


def hypothesis_measures(summary: dict) -> pd.DataFrame:
    """The pooled test as a measure / value table: unit and number of units first, then the answer."""
    answer = "adjusted by from-scratch targets" if summary["adjusted"] else "unadjusted (no from-scratch targets)"
    reach = (f"{summary['smallest_possible_p']:.3g}" + (
        f" (above {ALPHA:g}: at least {summary['units_short']} more {summary['unit']}s needed)"
        if summary["smallest_possible_p"] >= ALPHA else ""))
    rows = [
        ("unit of the test", f"{summary['unit']} ({summary['targets']} targets × {summary['seeds']} "
                             f"seed{'s' if summary['seeds'] != 1 else ''} "
                             f"averaged into their source runs)"),
        ("number of units", str(summary["units"])),
        (f"answer: mean difference own - other (points), {answer}", _points(summary["effect_points"])),
        ("raw difference (points)", _points(summary["raw_points"])),
        ("same gap on from-scratch targets (points)", _points(summary["scratch_gap_points"])),
        _interval_row(summary),
        (f"sign-flip test over {units_text(summary['units'])}{_patterns(summary['units'])}, p",
         format_p(summary["p_value"])),
        ("smallest p this design can reach", reach),
        ("settings tested / left out as floors",
         f"{summary['settings'] - summary['floor_settings']} / {summary['floor_settings']}"),
        ("mean accuracy, own source's examples", f"{100 * summary['acc_own']:.1f}%"),
        ("mean accuracy, other sources' examples", f"{100 * summary['acc_other']:.1f}%"),
        ("Cohen's h (own vs other)", f"{summary['cohens_h']:+.2f}"),
        ("McNemar tests (per sample) significant at 0.05",
         f"{summary['mcnemar_significant']} of {summary['mcnemar_tests']} "
         f"(own source better: {summary['mcnemar_own_better']}, other better: {summary['mcnemar_other_better']})"),
    ]
    return pd.DataFrame(rows, columns=["measure", "value"])


def add_source_and_setting_blocks(doc: Doc, lineage: pd.DataFrame, cells: pd.DataFrame | None, summary: dict,
                                  level: int) -> None:
    """Raw and adjusted per source, then every setting with its Holm-adjusted p and whether it survives."""
    by_source = per_source_table(lineage, cells)
    if len(by_source):
        doc.heading("Raw and adjusted, per source", level)
        doc.table(pd.DataFrame({
            "source": by_source["source"], "model": by_source["model"], "pretraining runs": by_source["units"],
            "raw (points)": by_source["raw_points"].map(_points),
            "from-scratch gap (points)": by_source["scratch_gap_points"].map(_points),
            "adjusted (points): the answer": by_source["adjusted_points"].map(_points),
            "sign-flip p": by_source["p_value"].map(format_p),
            "smallest possible p": by_source["smallest_possible_p"].map(lambda p: f"{p:.3g}"),
        }), caption="Per source data set and architecture, over its pretraining runs and the settings that are not "
                    "floors. Adjusted = raw minus the from-scratch targets' gap between the same two sources' "
                    "examples ('-' without from-scratch targets: the raw effect is then unadjusted).",
            name="hypothesis_by_source")
    by_setting = hypothesis_by_setting(lineage, cells)
    if len(by_setting) <= 1:
        return
    tested = int((~by_setting["floor"]).sum())
    doc.heading("By setting, Holm-adjusted", level)
    doc.table(pd.DataFrame({
        "setting": [setting_text(a, e, m, n, f) for a, e, m, n, f in
                    zip(by_setting["attack"], by_setting["eps"], by_setting["finetuned_model"], by_setting["n"],
                        by_setting["freeze"])],
        "pretraining runs": by_setting["units"],
        "own %": by_setting["acc_own"].map(_percent), "other %": by_setting["acc_other"].map(_percent),
        "raw (points)": by_setting["raw_points"].map(_points),
        "adjusted (points)": [_points(v) if a else "-" for v, a in zip(by_setting["effect_points"],
                                                                          by_setting["adjusted"])],
        "95% interval": [_setting_interval(lo, hi, kind) for lo, hi, kind in
                         zip(by_setting["ci_low_points"], by_setting["ci_high_points"], by_setting["interval"])],
        "sign-flip p": by_setting["p_value"].map(format_p),
        "Holm p": by_setting["holm_p"].map(format_p),
        "survives Holm": ["floor: left out" if f else ("yes" if s else "no")
                          for f, s in zip(by_setting["floor"], by_setting["survives_holm"])],
    }), caption=f"One test per setting over its pretraining runs; Holm's correction over the {tested} settings "
                f"that are not floors (statsmodels multipletests). With {units_text(int(by_setting['units'].max()))}"
                f" the smallest p is {by_setting['smallest_possible_p'].min():.3g}; surviving Holm over {tested} "
                f"settings needs p < {ALPHA / max(tested, 1):.3g}, i.e. at least "
                f"{units_needed(ALPHA / max(tested, 1))} pretraining runs per setting.",
        name="hypothesis_by_setting")
