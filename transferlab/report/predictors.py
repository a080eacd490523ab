"""Report section: which model similarity predicts transfer (matrix/pairs.csv beside cells.csv).

Only transfer pairs count (a model attacked with its own examples is white-box, not transfer,
and would sit at predictor value 1 with a high success rate, inflating every correlation).
For each attack and eps: a scatter of attack success rate against each predictor, Spearman's
rho over the pairs and a cluster bootstrap CI: pairs whose crafter comes from one pretraining run (source data
set, architecture, seed) share that model, so whole runs are resampled, not pairs. pairs.csv is joined to the
cells one to one on every key of a cell (crafted_on, evaluated, attack, eps, seed), so no pair counts twice.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from transferlab.tables import PREDICTORS
from transferlab.report.matrices import eps_text
from transferlab.report.figures import png_bytes
from transferlab.files import atomic_write_bytes

MIN_RUNS = 5  # fewer pretraining runs than this: no interval for a correlation
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
    """Spearman's rho of each row pair: scipy's Pearson correlation of the rows' average ranks (spearmanr's
    definition) along axis 1, rows with a constant side or fewer than 3 values left out."""
    from scipy.stats import pearsonr, rankdata

    if x.shape[1] < 3:
        return []
    ok = (np.ptp(x, axis=1) > 0) & (np.ptp(y, axis=1) > 0)
    if not ok.any():
        return []
    rho = pearsonr(rankdata(x[ok], axis=1), rankdata(y[ok], axis=1), axis=1).statistic
    return np.clip(rho, -1.0, 1.0).tolist()


def _rows_spearman(x: np.ndarray, y: np.ndarray):
    """Spearman's rho of the rows picked by an index vector, or of each row of an index matrix (vectorised)."""
    def statistic(rows: np.ndarray):
        if rows.ndim == 1:
            return spearman(x[rows], y[rows])
        rho = np.full(len(rows), np.nan)
        xs, ys = x[rows], y[rows]
        if xs.shape[1] < 3:
            return rho
        ok = (np.ptp(xs, axis=1) > 0) & (np.ptp(ys, axis=1) > 0)
        rho[ok] = _spearman_rows(xs[ok], ys[ok]) if ok.any() else []
        return rho
    return statistic


def spearman_ci(x, y, clusters=None, n_resamples: int = 2000, seed: int = 0,
                confidence: float = 0.95) -> tuple[float, float, float]:
    """(rho, low, high): Spearman's rho and its percentile cluster-bootstrap CI, whole ``clusters`` (pretraining
    runs; None: every pair its own) resampled with replacement."""
    from transferlab.stats import cluster_bootstrap

    x, y = np.asarray(x, float), np.asarray(y, float)
    rho = spearman(x, y)
    if math.isnan(rho):
        return rho, float("nan"), float("nan")
    clusters = np.arange(len(x)) if clusters is None else np.asarray(clusters)
    if len(np.unique(clusters)) < MIN_RUNS:  # a bootstrap over 2 or 3 runs is no interval at all
        return rho, float("nan"), float("nan")
    # All resamples at once where no value is missing: 2,000 scipy calls took 1 s per predictor.
    vectorized = not (np.isnan(x).any() or np.isnan(y).any())
    low, high = cluster_bootstrap(_rows_spearman(x, y), clusters, n_resamples, seed, confidence, vectorized)
    return rho, low, high


def pretraining_run(cells: pd.DataFrame) -> pd.Series:
    """Which pretraining run each cell's crafter comes from: its source data set, architecture and seed (a
    from-scratch crafter is its own run)."""
    dataset = cells["crafted_on_pretrain_dataset"] if "crafted_on_pretrain_dataset" in cells.columns else None
    model = cells["crafted_on_model"] if "crafted_on_model" in cells.columns else ""
    if dataset is None:
        return cells["crafted_on"].astype(str) + "/s" + cells["seed"].astype(str)
    own = dataset.isna()
    return (dataset.where(~own, cells["crafted_on"]).astype(str) + "/" + pd.Series(model, index=cells.index).astype(str)
            + "/s" + cells["seed"].astype(str))


def transfer_pairs(cells: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """Cells (transfer only) with their pair's predictors, joined one to one on every key of a cell. A pairs.csv
    written before it carried attack and eps holds one row per pair and seed (repeated once per attack folder
    in a study): it is reduced to one row per pair and joined many to one."""
    from transferlab.errors import UserError
    from transferlab.tables import PAIR_KEYS

    cells = cells[~cells["white_box"].astype(bool)]
    keys = [k for k in PAIR_KEYS if k in pairs.columns and k in cells.columns]
    if {"attack", "eps"} <= set(keys):
        validate = "one_to_one"
        pairs = pairs.assign(eps=pairs["eps"].astype(float))
    else:
        validate, pairs = "many_to_one", pairs.drop_duplicates(keys)
    try:
        return cells.merge(pairs, on=keys, how="inner", validate=validate)
    except pd.errors.MergeError:
        raise UserError(f"pairs.csv holds a pair twice for one key ({', '.join(keys)}); rebuild it by merging the "
                        f"attack matrix again (transferlab run, or transferlab attack-matrix)") from None


def correlation_table(merged: pd.DataFrame, n_resamples: int = 2000) -> pd.DataFrame:
    rows = []
    merged = merged.assign(_run=pretraining_run(merged))
    for (attack, eps), group in merged.groupby(["attack", "eps"], sort=True):
        for name in PREDICTORS:
            rho, low, high = spearman_ci(group[name], group["attack_success_rate"], group["_run"], n_resamples)
            rows.append({"attack": attack, "eps": eps, "predictor": name, "pairs": int(group[name].notna().sum()),
                         "runs": int(group["_run"].nunique()), "rho": rho, "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows, columns=["attack", "eps", "predictor", "pairs", "runs", "rho", "ci_low", "ci_high"])


def best_predictor_sentence(table: pd.DataFrame) -> str:
    usable = table.dropna(subset=["rho"])
    if usable.empty:
        return "Too few transfer pairs vary to rank the predictors."
    strength = usable.assign(abs_rho=usable["rho"].abs()).groupby("predictor")["abs_rho"].mean()
    best = strength.idxmax()
    rows = usable[usable["predictor"] == best]
    strongest = rows.loc[rows["rho"].abs().idxmax()]
    interval = (f"95% cluster bootstrap CI {strongest['ci_low']:+.2f} to {strongest['ci_high']:+.2f}"
                if pd.notna(strongest["ci_low"]) else f"no interval below {MIN_RUNS} pretraining runs")
    return (f"In this study {LABELS[best]} explains transfer best: its mean |rho| over {len(rows)} attack settings "
            f"is {strength[best]:.2f} (next: {', '.join(f'{LABELS[p]} {v:.2f}' for p, v in strength.drop(best).sort_values(ascending=False).items())}); "
            f"at {strongest['attack']} eps {eps_text(strongest['eps'])} rho = {strongest['rho']:+.2f} "
            f"({interval}, {int(strongest['pairs'])} "
            f"pairs from {int(strongest['runs'])} pretraining runs, the unit of the bootstrap).")


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
    doc.table(shown[["attack", "eps", "predictor", "pairs", "runs", "rho", "ci"]].rename(
                  columns={"runs": "pretraining runs"}),
              caption="Spearman's rho between attack success rate and each predictor over transfer pairs, "
                      "with a 95% cluster bootstrap CI (2,000 resamples of the crafters' pretraining runs, the "
                      "independent unit: pairs of one run share its model).", name="predictors")
