"""Report section: which model similarity predicts transfer (matrix/pairs.csv beside cells.csv).

Only transfer pairs count (a model attacked with its own examples is white-box, not transfer,
and would sit at predictor value 1 with a high success rate, inflating every correlation).
For each attack and eps: a scatter of attack success rate against each predictor, Spearman's
rho over the pairs and a percentile bootstrap CI (pairs resampled with replacement).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from transferlab.predictors import PREDICTORS
from transferlab.report.matrices import eps_text
from transferlab.report.figures import png_bytes
from transferlab.store import atomic_write_bytes

LABELS = {
    "grad_cosine": "input-gradient cosine",
    "cka": "linear CKA (penultimate)",
    "param_identical": "share of identical tensors",
    "param_rel_l2": "relative L2 of other tensors",
    "clean_agreement": "clean agreement",
}


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = ~(np.isnan(x) | np.isnan(y))
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan")
    return float(spearmanr(x[ok], y[ok]).statistic)


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> list[float]:
    """Spearman's rho of each row pair (ties get average ranks, as spearmanr's), rows with a constant side
    or fewer than 3 values left out."""
    from scipy.stats import rankdata

    if x.shape[1] < 3:
        return []
    rx, ry = rankdata(x, axis=1), rankdata(y, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    ok = (np.ptp(x, axis=1) > 0) & (np.ptp(y, axis=1) > 0)
    rho = (rx * ry).sum(axis=1)[ok] / np.sqrt((rx ** 2).sum(axis=1)[ok] * (ry ** 2).sum(axis=1)[ok])
    return np.clip(rho, -1.0, 1.0).tolist()


def spearman_ci(x, y, n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> tuple[float, float, float]:
    """(rho, low, high): Spearman's rho and its percentile bootstrap CI over resampled pairs."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    rho = spearman(x, y)
    if math.isnan(rho):
        return rho, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    indices = np.stack([rng.integers(0, len(x), len(x)) for _ in range(n_resamples)])
    if np.isnan(x).any() or np.isnan(y).any():  # each resample drops its own missing pairs: one at a time
        draws = [value for value in (spearman(x[i], y[i]) for i in indices) if not math.isnan(value)]
    else:  # all resamples at once: 2,000 scipy calls took 1 s per predictor (20 s of the quick study's report)
        draws = _spearman_rows(x[indices], y[indices])
    if len(draws) < n_resamples // 2:
        return rho, float("nan"), float("nan")
    tail = (1 - confidence) / 2
    return rho, float(np.quantile(draws, tail)), float(np.quantile(draws, 1 - tail))


def transfer_pairs(cells: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """Cells (transfer only) with their pair's predictors."""
    cells = cells[~cells["white_box"].astype(bool)]
    keys = ["crafted_on", "evaluated"] + (["seed"] if "seed" in pairs.columns and "seed" in cells.columns else [])
    return cells.merge(pairs, on=keys, how="inner")


def correlation_table(merged: pd.DataFrame, n_resamples: int = 2000) -> pd.DataFrame:
    rows = []
    for (attack, eps), group in merged.groupby(["attack", "eps"], sort=True):
        for name in PREDICTORS:
            rho, low, high = spearman_ci(group[name], group["attack_success_rate"], n_resamples)
            rows.append({"attack": attack, "eps": eps, "predictor": name, "pairs": int(group[name].notna().sum()),
                         "rho": rho, "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows, columns=["attack", "eps", "predictor", "pairs", "rho", "ci_low", "ci_high"])


def best_predictor_sentence(table: pd.DataFrame) -> str:
    usable = table.dropna(subset=["rho"])
    if usable.empty:
        return "Too few transfer pairs vary to rank the predictors."
    strength = usable.assign(abs_rho=usable["rho"].abs()).groupby("predictor")["abs_rho"].mean()
    best = strength.idxmax()
    rows = usable[usable["predictor"] == best]
    strongest = rows.loc[rows["rho"].abs().idxmax()]
    return (f"In this study {LABELS[best]} explains transfer best: its mean |rho| over {len(rows)} attack settings "
            f"is {strength[best]:.2f} (next: {', '.join(f'{LABELS[p]} {v:.2f}' for p, v in strength.drop(best).sort_values(ascending=False).items())}); "
            f"at {strongest['attack']} eps {eps_text(strongest['eps'])} rho = {strongest['rho']:+.2f} "
            f"(95% bootstrap CI {strongest['ci_low']:+.2f} to {strongest['ci_high']:+.2f}, {int(strongest['pairs'])} pairs).")


def scatter_png(merged: pd.DataFrame, table: pd.DataFrame) -> bytes:
    from matplotlib.figure import Figure


    settings = list(merged.groupby(["attack", "eps"], sort=True).groups)
    width, height = 2.6 * len(PREDICTORS) + 0.6, 2.3 * len(settings) + 0.6
    fig = Figure(figsize=(width, height))
    # Fixed margins in inches rather than a constrained layout: the grid is regular, and the layout engine's
    # text measuring took 1.5 of the 2 s this figure cost at 4 x 5 panels.
    fig.subplots_adjust(left=0.6 / width, right=1 - 0.1 / width, top=1 - 0.3 / height, bottom=0.75 / height,
                        wspace=0.12, hspace=0.4)
    axes = fig.subplots(len(settings), len(PREDICTORS), squeeze=False, sharey=True)
    lookup = table.set_index(["attack", "eps", "predictor"])
    for row, (attack, eps) in enumerate(settings):
        group = merged[(merged["attack"] == attack) & (merged["eps"] == eps)]
        same = group["same_pretraining"].astype(bool)
        for col, name in enumerate(PREDICTORS):
            ax = axes[row, col]
            ax.scatter(group.loc[~same, name], 100 * group.loc[~same, "attack_success_rate"], s=14, alpha=0.7,
                       color="tab:blue", label="other pretraining")
            ax.scatter(group.loc[same, name], 100 * group.loc[same, "attack_success_rate"], s=18, alpha=0.8,
                       color="tab:red", marker="D", label="same pretraining")
            stat = lookup.loc[(attack, eps, name)]
            ax.set_title(f"{attack} eps {eps_text(eps)}: rho {stat['rho']:+.2f}" if not pd.isna(stat["rho"])
                         else f"{attack} eps {eps_text(eps)}: rho -", fontsize=8)
            ax.grid(alpha=0.3)
            if row == len(settings) - 1:
                ax.set_xlabel(LABELS[name], fontsize=8)
        axes[row, 0].set_ylabel("attack success rate (%)", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8, frameon=False)
    return png_bytes(fig)


def add_predictor_blocks(doc, matrix_dir: Path, cells: pd.DataFrame | None, pairs: pd.DataFrame | None,
                         level: int = 3) -> None:
    """The predictors subsection: scatter, correlation table, one sentence naming the best predictor."""

    doc.heading("What predicts transfer?", level)
    if cells is None or pairs is None or "attack_success_rate" not in cells.columns:
        doc.paragraph("No transfer predictors yet (matrix/pairs.csv is missing); an attack matrix made by this "
                      "version writes them.")
        return
    merged = transfer_pairs(cells, pairs)
    if merged.empty:
        doc.paragraph("pairs.csv has no transfer pairs matching the cells.")
        return
    table = correlation_table(merged)
    doc.paragraph(best_predictor_sentence(table))
    figure = Path(matrix_dir) / "predictors.png"
    atomic_write_bytes(figure, scatter_png(merged, table))
    doc.image(figure, "Attack success rate (transfer pairs only) against each predictor, per attack and eps; "
                      "red diamonds: the evaluated model shares the crafter's pretraining.")
    shown = table.assign(rho=table["rho"].map(lambda v: "-" if pd.isna(v) else f"{v:+.2f}"),
                         ci=[("-" if pd.isna(lo) else f"{lo:+.2f} to {hi:+.2f}")
                             for lo, hi in zip(table["ci_low"], table["ci_high"])],
                         predictor=table["predictor"].map(LABELS), eps=table["eps"].map(eps_text))
    doc.table(shown[["attack", "eps", "predictor", "pairs", "rho", "ci"]],
              caption="Spearman's rho between attack success rate and each predictor over transfer pairs, "
                      "with a 95% percentile bootstrap CI (2,000 resamples of the pairs).", name="predictors")
