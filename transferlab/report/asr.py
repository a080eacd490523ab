"""The attack-success-rate view of the matrix: ``--metric asr``.

Near-chance adversarial accuracy hides differences between crafters (9% vs 11% of all
samples). The attack success rate counts only the samples the evaluated model gets right
when clean, the share of those the attack flips, so models with different clean accuracy
compare fairly. Seeds are pooled: flipped and clean-correct counts are summed before the
rate and its Wilson interval are taken.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from transferlab import stats
from transferlab.errors import UserError
from transferlab.report import figures
from transferlab.report.cells import LEGEND, Cells, choose, eps_text, pivot, pivots, setting_stem
from transferlab.report.doc import Table

METRICS = ("accuracy", "asr")


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise UserError(f"unknown --metric {metric!r}; use accuracy or asr")
    return metric


def available(cells: Cells) -> bool:
    """Cells tables written before the success rate was recorded have no ASR view."""
    return "attack_success_rate" in cells.frame.columns


def _chosen(cells: Cells, attack: str, eps: float) -> pd.DataFrame:
    chosen = choose(cells, attack, eps)
    clean_correct = chosen["clean_correct"] if "clean_correct" in chosen.columns else \
        (chosen["clean_accuracy"] * chosen["samples"]).round()
    return chosen.assign(clean_correct=clean_correct.astype(int),
                         flipped=(chosen["attack_success_rate"].fillna(0) * clean_correct).round().astype(int))


def _wilson(flipped, correct) -> tuple[float, float]:
    if pd.isna(correct) or correct <= 0:
        return np.nan, np.nan
    return stats.wilson_interval(int(flipped), int(correct))


def asr_pivots(cells: Cells, attack: str, eps: float) -> dict[str, pd.DataFrame]:
    """rate, ci_low, ci_high (fractions), white_box and same_pretraining pivots in matrix order."""
    chosen = _chosen(cells, attack, eps)
    p = pivots(chosen, "flipped", "sum")
    flipped = p.values.astype(float)
    correct = pivot(chosen, "clean_correct", "sum").reindex_like(flipped).astype(float)
    bounds = np.array([[_wilson(f, n) for f, n in zip(f_row, n_row)]
                       for f_row, n_row in zip(flipped.to_numpy(), correct.to_numpy())]).reshape(*flipped.shape, 2)
    return {"rate": flipped / correct.where(correct > 0),
            "ci_low": pd.DataFrame(bounds[..., 0], index=flipped.index, columns=flipped.columns),
            "ci_high": pd.DataFrame(bounds[..., 1], index=flipped.index, columns=flipped.columns),
            "white_box": p.white_box, "same_pretraining": p.same_pretraining, "seeds": chosen["seed"].nunique()}


def asr_table(cells: Cells, attack: str, eps: float) -> Table:
    p = asr_pivots(cells, attack, eps)
    rate = p["rate"]
    shown = pd.DataFrame([[("-" if pd.isna(v) else f"{100 * v:.1f} ({100 * lo:.1f}-{100 * hi:.1f})")
                           for v, lo, hi in zip(rate.loc[r], p["ci_low"].loc[r], p["ci_high"].loc[r])]
                          for r in rate.index], index=rate.index, columns=rate.columns)
    marks = pd.DataFrame(np.where(p["white_box"].to_numpy(), "bold",
                                  np.where(p["same_pretraining"].to_numpy(), "italic", "")),
                         columns=rate.columns).reset_index(drop=True)
    marks.insert(0, "label", "")
    frame = shown.reset_index()
    frame.columns = ["crafted on \\ evaluated"] + list(shown.columns)
    pooled = f"pooled over {p['seeds']} seeds" if p["seeds"] > 1 else "one seed"
    caption = (f"Attack success rate (%) under {attack}, eps = {eps_text(eps)}: the share of the samples "
               f"the evaluated model classifies correctly when clean that the attack flips, with a 95% Wilson "
               f"interval ({pooled}); higher = the attack transferred better. {LEGEND}")
    return Table(frame, marks, caption, name=f"asr_{setting_stem(attack, eps)}")


def asr_heatmap_png(cells: Cells, attack: str, eps: float) -> bytes:
    p = asr_pivots(cells, attack, eps)
    caption = ("rows: model the examples were crafted on; columns: model evaluated; cells: attack success rate in % "
               "on the samples the evaluated model gets right when clean; higher = the attack transferred better")
    return figures.heatmap_png(figures.HeatmapGrids(p["rate"], p["white_box"], p["same_pretraining"]),
                               f"{attack}, eps = {eps_text(eps)}: attack success rate", caption,
                               value_label="attack success rate (%)")


def heatmap_path(out_dir, attack: str, eps: float) -> Path:
    return Path(out_dir) / f"heatmap_asr_{setting_stem(attack, eps)}.png"
