"""Figures: attack-matrix heatmaps, accuracy-vs-eps curves and example images, as PNG bytes.

Everything uses matplotlib's object API (``Figure`` + the Agg canvas), never pyplot, so no
global backend is switched and no window can ever open. Sizes and font sizes scale with
the number of rows and columns so a 20 x 20 matrix stays readable.
"""

from __future__ import annotations

import io
import math
import textwrap
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from transferlab.tables import eps_text

DPI = 110
WHITE_BOX_STYLE = {"edgecolor": "red", "linewidth": 3.0, "linestyle": "-"}
SAME_PRETRAINING_STYLE = {"edgecolor": "black", "linewidth": 1.8, "linestyle": (0, (3, 2))}
# A white halo under the dashed outline keeps it visible on dark and light cells alike.
_HALO = [patheffects.withStroke(linewidth=3.5, foreground="white")]


def short_label(text: str, width: int = 36) -> str:
    """Keep both ends of long run names: the start names the model, the end its variant."""
    text = str(text)
    if len(text) <= width:
        return text
    keep = (width - 1) // 2
    return text[:keep] + "…" + text[-(width - 1 - keep):]


def short_labels(names, width: int = 36) -> list[str]:
    """Shortened labels for one axis, widened until no two runs share a label."""
    names = [str(n) for n in names]
    longest = max((len(n) for n in names), default=0)
    while True:
        labels = [short_label(n, width) for n in names]
        if len(set(labels)) == len(set(names)) or width >= longest:
            return labels
        width += 4


def png_bytes(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


@dataclass(frozen=True)
class HeatmapGrids:
    """The matrix and its two outline masks, one pivot in the shape of ``values``."""

    values: pd.DataFrame  # fractions
    white_box: pd.DataFrame  # bool: crafted on the evaluated model itself
    same_pretraining: pd.DataFrame  # bool


def heatmap_png(grids: HeatmapGrids, title: str, caption: str, clean: pd.Series | None = None, row_labels=None,
                column_labels=None, value_label: str = "accuracy (%)") -> bytes:
    """Annotated heatmap of accuracies (fractions) in %, with white-box and same-pretraining cells outlined.

    ``clean`` (indexed like the columns) adds a strip under the matrix with each evaluated model's clean
    accuracy; ``row_labels`` / ``column_labels`` replace the run names on the axes."""
    import seaborn as sns

    values = grids.values
    n_rows, n_cols = values.shape
    # Display labels are short by construction: cut only what is really long; run ids keep the old width.
    column_labels = (short_labels(column_labels, 48) if column_labels is not None
                     else short_labels(values.columns))
    row_labels = short_labels(row_labels, 48) if row_labels is not None else short_labels(values.index)
    longest_col = max((len(c) for c in column_labels), default=4)
    longest_row = max((len(r) for r in row_labels), default=4)
    strip = clean is not None and len(clean) == n_cols
    width = 2.8 + 0.07 * longest_row + 0.55 * max(n_cols, 3)
    height = 2.4 + 0.07 * longest_col + 0.42 * (max(n_rows, 2) + (1.3 if strip else 0))
    fig = Figure(figsize=(width, height), layout="constrained")
    grid = fig.add_gridspec(2 if strip else 1, 2, width_ratios=[max(n_cols, 1), 0.25],
                            height_ratios=[max(n_rows, 1), 1] if strip else [1])
    ax = fig.add_subplot(grid[0, 0])
    cbar_ax = fig.add_subplot(grid[0, 1])

    percent = 100 * values.astype(float)
    decimals = 1 if n_cols <= 10 else 0  # whole percent once cells get narrow
    annot = percent.map(lambda v: "" if pd.isna(v) else f"{v:.{decimals}f}")
    font = 9 if n_cols <= 8 else 8 if n_cols <= 12 else 6.5
    sns.heatmap(percent, ax=ax, cbar_ax=cbar_ax, vmin=0, vmax=100, cmap="viridis", annot=annot.to_numpy(), fmt="",
                annot_kws={"size": font}, linewidths=0.5, linecolor="white",
                cbar_kws={"label": value_label})
    _outline_cells(ax, values.shape, grids.white_box, grids.same_pretraining)
    ax.set_yticks(np.arange(n_rows) + 0.5, row_labels, rotation=0, fontsize=8)
    ax.set_ylabel("examples crafted on")
    ax.set_title(title, fontsize=10)
    bottom = ax
    if strip:
        strip_ax = fig.add_subplot(grid[1, 0], sharex=ax)
        clean_pct = 100 * pd.DataFrame([clean.astype(float).to_numpy()], index=["clean accuracy"])
        sns.heatmap(clean_pct, ax=strip_ax, cbar=False, vmin=0, vmax=100, cmap="viridis",
                    annot=clean_pct.map(lambda v: "" if pd.isna(v) else f"{v:.{decimals}f}").to_numpy(), fmt="",
                    annot_kws={"size": font}, linewidths=0.5, linecolor="white")
        strip_ax.set_yticks([0.5], ["clean (no attack)"], rotation=0, fontsize=8)
        ax.tick_params(axis="x", labelbottom=False)
        ax.set_xlabel("")
        bottom = strip_ax
    bottom.set_xticks(np.arange(n_cols) + 0.5, column_labels, rotation=45, ha="right", rotation_mode="anchor",
                      fontsize=8)
    bottom.set_xlabel("evaluated model")
    # About 13 characters of 8-point text per inch: wrap the caption to the figure's width.
    fig.legend(handles=_outline_legend(grids.white_box, grids.same_pretraining), loc="outside lower center", fontsize=8,
               frameon=False, title=textwrap.fill(caption, max(40, int(width * 13))), title_fontsize=8)
    return png_bytes(fig)


def _outline_cells(ax, shape: tuple[int, int], white_box: pd.DataFrame, same_pretraining: pd.DataFrame) -> None:
    """Outline the white-box cells and, inside, the same-pretraining ones."""
    n_rows, n_cols = shape
    for i in range(n_rows):
        for j in range(n_cols):
            if bool(white_box.iat[i, j]):
                ax.add_patch(Rectangle((j + 0.04, i + 0.04), 0.92, 0.92, fill=False, **WHITE_BOX_STYLE))
            elif bool(same_pretraining.iat[i, j]):
                ax.add_patch(Rectangle((j + 0.08, i + 0.08), 0.84, 0.84, fill=False, path_effects=_HALO,
                                       **SAME_PRETRAINING_STYLE))


def _outline_legend(white_box: pd.DataFrame, same_pretraining: pd.DataFrame) -> list:
    """Legend entries for the outlines that the heatmap shows."""
    handles = [Patch(facecolor="none", label="white-box: crafted on the evaluated model itself", **WHITE_BOX_STYLE)]
    if bool(same_pretraining.to_numpy().any()):
        handles.append(Patch(facecolor="none", label="same pretraining: one model was fine-tuned from the other "
                                                     "(or both from one source)", **SAME_PRETRAINING_STYLE))
    if not bool(white_box.to_numpy().any()):
        handles = handles[1:]
    return handles


def eps_curves_png(curves: pd.DataFrame, clean: pd.DataFrame, labels: dict | None = None) -> bytes:
    """Accuracy vs eps, one panel per (attack, evaluated model), one line per crafting model.

    ``curves`` has columns panel, crafted_on, eps, mean, sd, kind ("own", "white-box", "other"); ``clean`` has
    panel and clean (the evaluated model's clean accuracy, drawn as a dotted reference line)."""
    panels = list(dict.fromkeys(curves["panel"]))
    crafters = list(dict.fromkeys(curves.loc[curves["kind"] != "white-box", "crafted_on"]))
    palette = _palette(len(crafters))
    colour = dict(zip(crafters, palette))
    n_cols = min(4, len(panels))
    n_rows = math.ceil(len(panels) / n_cols)
    fig = Figure(figsize=(1.0 + 3.3 * n_cols, 1.4 + 2.7 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False, sharex=True, sharey=True)
    for ax, panel in zip(axes.flat, panels):
        for crafter, line in curves[curves["panel"] == panel].groupby("crafted_on", sort=False):
            line = line.sort_values("eps")
            kind = line["kind"].iloc[0]
            if kind == "white-box":
                style = {"color": "black", "linestyle": "--", "linewidth": 1.5, "zorder": 3}
            elif kind == "own":
                style = {"color": colour[crafter], "linewidth": 3.2, "marker": "o", "zorder": 4}
            else:
                style = {"color": colour[crafter], "linewidth": 1.1, "alpha": 0.85, "zorder": 2}
            x, y = line["eps"].to_numpy(float), 100 * line["mean"].to_numpy(float)
            ax.plot(x, y, **style)
            sd = 100 * line["sd"].fillna(0).to_numpy(float)
            if sd.any():
                ax.fill_between(x, y - sd, y + sd, color=style["color"], alpha=0.12, linewidth=0)
        reference = clean.loc[clean["panel"] == panel, "clean"]
        if len(reference):
            ax.axhline(100 * float(reference.iloc[0]), color="grey", linestyle=":", linewidth=1)
        ax.set_title(panel, fontsize=8)
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("eps")
    for ax in axes[:, 0]:
        ax.set_ylabel("adversarial accuracy (%)")
    # The legend lists only what is drawn: no white-box entry without white-box lines, no band with one seed.
    names = labels if labels is not None else {}
    handles = [Line2D([], [], color=colour[c], linewidth=1.5, label=label)
               for c, label in zip(crafters, short_labels([names.get(c, c) for c in crafters]))]
    kinds = set(curves["kind"])
    if "own" in kinds:
        handles.append(Line2D([], [], color="grey", linewidth=3.2, marker="o",
                              label="thick: own source (same pretraining)"))
    if "white-box" in kinds:
        handles.append(Line2D([], [], color="black", linestyle="--", label="white-box (crafted on the model itself)"))
    if len(clean):
        handles.append(Line2D([], [], color="grey", linestyle=":", label="clean accuracy"))
    banded = bool(curves["sd"].fillna(0).to_numpy().any())
    fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)), fontsize=8, frameon=False,
               title="examples crafted on" + (" (mean over seeds; band = ±1 sd)" if banded else ""),
               title_fontsize=8)
    return png_bytes(fig)


def _palette(n: int) -> list:
    import seaborn as sns

    return sns.color_palette("tab10" if n <= 10 else "tab20", max(n, 1))


def _as_image(t: np.ndarray) -> np.ndarray:
    """[C, H, W] -> [H, W] (gray) or [H, W, 3] (colour) for imshow."""
    return t[0] if t.shape[0] == 1 else np.transpose(t[:3], (1, 2, 0)).clip(0, 1)


def examples_png(clean: np.ndarray, adversarial: dict[str, np.ndarray], eps: float | None, attack: str,
                 count: int = 4) -> bytes:
    """One row per source: (clean, adversarial, perturbation) for the first ``count`` images.

    The perturbation is shown on a diverging scale from -eps to +eps, i.e. amplified to full contrast."""
    count = min(count, clean.shape[0])
    names = list(adversarial)
    if eps is not None and eps > 0:
        caption = f"eps = {eps_text(eps)}"  # 8/255 as given, not 0.0314
    else:  # fall back to the largest perturbation actually present
        eps = max(float(np.abs(a[:count] - clean[:count]).max()) for a in adversarial.values()) or 1.0
        caption = f"largest |δ| = {eps:.3g}"
    n_cols = 3 * count
    fig = Figure(figsize=(0.9 + 1.15 * n_cols, 0.9 + 1.25 * len(names)), layout="constrained")
    axes = fig.subplots(len(names), n_cols, squeeze=False)
    row_labels = short_labels(names, 24)
    gray = clean.shape[1] == 1
    for r, name in enumerate(names):
        adv = adversarial[name]
        for k in range(count):
            delta = (adv[k] - clean[k]).mean(axis=0)  # colour images: mean perturbation over channels
            panels = [(_as_image(clean[k]), {"cmap": "gray" if gray else None, "vmin": 0, "vmax": 1}, "clean"),
                      (_as_image(adv[k]), {"cmap": "gray" if gray else None, "vmin": 0, "vmax": 1}, "adversarial"),
                      (delta, {"cmap": "RdBu_r", "vmin": -eps, "vmax": eps}, "perturbation")]
            for c, (image, style, title) in enumerate(panels):
                ax = axes[r, 3 * k + c]
                ax.imshow(image, interpolation="nearest", **style)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(title, fontsize=8)
        axes[r, 0].set_ylabel(row_labels[r], fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(f"{attack}, {caption}: clean image, adversarial image and perturbation "
                 f"(blue -eps, red +eps) per source", fontsize=9)
    return png_bytes(fig)
