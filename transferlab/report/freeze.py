"""Report section: transfer against the number of frozen tensors (a study with several freezes).

For each fine-tuned target the cells give its accuracy on examples crafted on its own source
and on every other pretrained source. Grouped by (attack, eps, own source, n) and drawn against
the freeze, with counts pooled over seeds (and over the other sources) and 95% Wilson intervals,
beside the target's clean accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from transferlab import stats
from transferlab.report.cells import Cells, eps_text, strip_seed
from transferlab.report.figures import png_bytes
from transferlab.files import atomic_write_bytes

COLUMNS = ["attack", "eps", "own source", "n", "freeze", "clean", "own source adv", "own ci low", "own ci high",
           "other sources adv", "other ci low", "other ci high"]


def _pooled(rows: pd.DataFrame) -> tuple[float, float, float]:
    correct = int(rows["adversarial_correct"].sum())
    n = int(rows["samples"].sum())
    if n == 0:
        return np.nan, np.nan, np.nan
    low, high = stats.wilson_interval(correct, n)
    return correct / n, low, high


def sweep_table(cells: Cells) -> pd.DataFrame | None:
    """One row per (attack, eps, own source, n, freeze); None when no (source, n) has two or more freezes."""

    cells = cells.frame
    needed = {"evaluated_freeze", "evaluated_n", "adversarial_correct", "samples"}
    if not needed <= set(cells.columns):
        return None
    transfer = cells[(cells["evaluated_role"] == "finetuned") & (cells["crafted_on_role"] == "pretrained")
                     & ~cells["white_box"] & cells["evaluated_freeze"].notna()]
    own = transfer[transfer["same_pretraining"]]
    if own.empty:
        return None
    own = own.assign(pretrained_from=[strip_seed(s, seed) for s, seed in zip(own["crafted_on"], own["seed"])])
    owner = dict(zip(own["evaluated"], own["pretrained_from"]))
    transfer = transfer.assign(pretrained_from=transfer["evaluated"].map(owner)).dropna(subset=["pretrained_from"])
    transfer = transfer.assign(n=transfer["evaluated_n"].fillna(-1).astype(int),
                               freeze=transfer["evaluated_freeze"].astype(int))
    if transfer.groupby(["pretrained_from", "n"])["freeze"].nunique().max() < 2:
        return None
    rows = []
    for (attack, eps, source, n, freeze), group in transfer.groupby(["attack", "eps", "pretrained_from", "n",
                                                                     "freeze"]):
        mine, others = group[group["same_pretraining"]], group[~group["same_pretraining"]]
        clean = mine.drop_duplicates(subset=["evaluated", "seed"])["clean_accuracy"].mean()
        rows.append([attack, eps, source, n, freeze, clean, *_pooled(mine), *_pooled(others)])
    return pd.DataFrame(rows, columns=COLUMNS).sort_values(["attack", "eps", "own source", "n", "freeze"])


def sweep_png(table: pd.DataFrame) -> bytes:
    from matplotlib.figure import Figure


    panels = list(table.groupby(["attack", "eps", "own source", "n"], sort=False).groups)
    n_cols = min(3, len(panels))
    n_rows = -(-len(panels) // n_cols)
    fig = Figure(figsize=(3.6 * n_cols + 0.4, 2.9 * n_rows + 0.8), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False, sharey=True)
    for ax, key in zip(axes.flat, panels):
        attack, eps, source, n = key
        rows = table[(table["attack"] == attack) & (table["eps"] == eps) & (table["own source"] == source)
                     & (table["n"] == n)]
        x = rows["freeze"].to_numpy(float)
        for prefix, column, style in (("own", "own source adv", {"color": "tab:red", "marker": "o", "linewidth": 2.4}),
                                      ("other", "other sources adv", {"color": "tab:blue", "marker": "s"})):
            y = 100 * rows[column].to_numpy(float)
            ax.plot(x, y, label=f"adversarial, {prefix} source{'s' if prefix == 'other' else ''}", **style)
            ax.fill_between(x, 100 * rows[f"{prefix} ci low"].to_numpy(float),
                            100 * rows[f"{prefix} ci high"].to_numpy(float), color=style["color"], alpha=0.15,
                            linewidth=0)
        ax.plot(x, 100 * rows["clean"].to_numpy(float), color="grey", linestyle=":", marker=".", label="clean")
        ax.set_title(f"{source}, n = {'all' if n < 0 else f'{n:,}'}\n{attack} eps {eps_text(eps)}", fontsize=8)
        ax.set_xlabel("frozen parameter tensors", fontsize=8)
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy of the fine-tuned target (%)", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8, frameon=False,
               title="band: 95% Wilson interval, seeds (and other sources) pooled", title_fontsize=8)
    return png_bytes(fig)


def add_freeze_blocks(doc, matrix_dir: Path, cells: Cells | None, level: int = 3) -> bool:
    """The freeze-sweep subsection, only for a study with several freezes; returns whether it was added."""

    table = sweep_table(cells) if cells is not None else None
    if table is None:
        return False
    doc.heading("Transfer vs number of frozen tensors", level)
    figure = Path(matrix_dir) / "freeze_sweep.png"
    atomic_write_bytes(figure, sweep_png(table))
    doc.image(figure, "Fine-tuned targets' accuracy on examples crafted on their own source (red) and on the "
                      "other sources (blue), and clean (grey), against the number of frozen tensors.")

    def pct(v, lo=None, hi=None):
        if pd.isna(v):
            return "-"
        return f"{100 * v:.1f}" + ("" if lo is None else f" ({100 * lo:.1f}-{100 * hi:.1f})")

    shown = pd.DataFrame({
        "attack": table["attack"], "eps": table["eps"].map(eps_text), "own source": table["own source"],
        "n": table["n"].map(lambda n: "all" if n < 0 else f"{n:,}"), "freeze": table["freeze"],
        "clean": table["clean"].map(pct),
        "adv, own source": [pct(v, lo, hi) for v, lo, hi in
                            zip(table["own source adv"], table["own ci low"], table["own ci high"])],
        "adv, other sources": [pct(v, lo, hi) for v, lo, hi in
                               zip(table["other sources adv"], table["other ci low"], table["other ci high"])],
    })
    doc.table(shown, caption="Accuracy (%) of each fine-tuned target, clean and on adversarial examples from its "
                             "own source and from the other sources (95% Wilson interval).", name="freeze_sweep")
    return True
