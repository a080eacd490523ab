"""Attack-matrix outputs: pivot tables, heatmaps, eps curves, example images and summary.md.

Input is the tidy ``cells`` table (one row per crafted-on model, evaluated model, attack,
eps, seed) and, optionally, the ``lineage`` tests and the examples file written by
``transferlab.matrix``. Everything shown is a pivot or a plot of those rows.

Run names usually end in ``_s<seed>`` (one run per seed). When a table holds several
seeds, that suffix is dropped for display so the seeds of one configuration share a row
and column, and cells show the mean over seeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from transferlab.errors import UserError
from transferlab.report import asr, figures
from transferlab.report.cells import (LEGEND, ROLE_ORDER_COLUMNS, SIDES, Cells, run_order, choose, eps_text,
                                      merge_seed_names, pivot, pivots, prepare_lineage, setting_stem, settings)
from transferlab.report.cells import prepare_cells, read_cells  # noqa: F401 - importable from here too
from transferlab.report.doc import Doc, Table, render_markdown, table_latex, table_markdown
from transferlab.report.hypothesis import format_p, hypothesis_summary, per_target_table
from transferlab.report.hypothesis_blocks import add_source_and_setting_blocks, hypothesis_measures
from transferlab.report.manifest import recorded_outputs, replace_outputs
from transferlab.report.method import add_method_section
from transferlab.files import atomic_write_bytes, atomic_write_text, content_key, file_sha256

OUTPUT_LAYOUT = 4  # bump when figures or tables change look: existing outputs are then drawn again


def display_labels(cells: pd.DataFrame) -> dict[str, str]:
    """Run name -> short label from what run.json recorded (copied into the cells): 'fmnist→mnist n=2000 f23'
    for a fine-tune, 'scratch→mnist n=500' for a from-scratch run, 'fmnist source' for a pretrained model; the
    model is named when the matrix holds several. Labels that would collide fall back to the run name."""
    def value(row, key):
        v = row.get(key)
        return None if v is None or (not isinstance(v, str) and pd.isna(v)) else v

    models = set()
    for side in SIDES:
        if f"{side}_model" in cells.columns:
            models |= set(cells[f"{side}_model"].dropna().astype(str))
    labels = {}
    for side in ("evaluated", "crafted_on"):  # the evaluated side carries n and freeze
        columns = [c for c in cells.columns if c == side or c.startswith(f"{side}_")]
        for _, row in cells[columns].drop_duplicates(subset=[side]).iterrows():
            name = row[side]
            if name in labels:
                continue
            dataset = value(row, f"{side}_dataset") or "?"
            pretrain = value(row, f"{side}_pretrain_dataset")
            n, freeze = value(row, f"{side}_n"), value(row, f"{side}_freeze")
            size = f" n={int(float(n))}" if n is not None else ""
            if row.get(f"{side}_role") == "pretrained":
                label = f"{dataset} source{size}"
            elif pretrain is None:
                label = f"scratch→{dataset}{size}"
            else:
                label = f"{pretrain}→{dataset}{size}" + (f" f{int(float(freeze))}" if freeze is not None else "")
            model = value(row, f"{side}_model")
            labels[name] = f"{model} {label}" if len(models) > 1 and model else label
    counts = pd.Series(list(labels.values())).value_counts()
    return {name: (label if counts[label] == 1 else str(name)) for name, label in labels.items()}


def pivot_matrix(cells: Cells | pd.DataFrame, attack: str, eps: float,
                 value: str = "adversarial_accuracy") -> pd.DataFrame:
    """Rows = models the examples were crafted on (pretrained first, then fine-tuned and from-scratch runs);
    columns = evaluated models in the same order; values averaged over seeds."""
    cells = Cells.of(cells)
    if value not in cells.frame.columns:
        raise UserError(f"cells table has no column {value!r}")
    return pivot(choose(cells, attack, eps), value)


def matrix_table(cells: Cells | pd.DataFrame, attack: str, eps: float) -> Table:
    """The display version: percentages, white-box bold, same pretraining italic, clean accuracy last."""
    chosen = choose(Cells.of(cells), attack, eps)
    p = pivots(chosen)
    shown = p.values.map(lambda v: "-" if pd.isna(v) else f"{100 * v:.1f}")
    shown.loc["clean accuracy (no attack)"] = [("-" if pd.isna(v) else f"{100 * v:.1f}") for v in p.clean]
    marks = pd.DataFrame("", index=shown.index, columns=shown.columns)
    marks.iloc[: len(p.values)] = np.where(p.white_box.to_numpy(), "bold",
                                           np.where(p.same_pretraining.to_numpy(), "italic", ""))
    labels = display_labels(chosen)
    frame = shown.reset_index()
    frame.iloc[: len(p.values), 0] = [labels.get(r, r) for r in p.values.index]
    frame.columns = ["crafted on \\ evaluated"] + [labels.get(c, c) for c in shown.columns]
    marks = marks.reset_index(drop=True)
    marks.insert(0, "label", "")
    seeds = chosen["seed"].nunique()
    caption = (f"Adversarial accuracy (%) under {attack}, eps = {eps_text(eps)}, "
               f"{'mean over ' + str(seeds) + ' seeds' if seeds > 1 else 'one seed'}. {LEGEND}"
               f"{own_prediction_note(chosen, labels)}")
    return Table(frame, marks, caption, name=f"matrix_{setting_stem(attack, eps)}")


def own_prediction_note(cells: pd.DataFrame, labels: dict | None = None) -> str:
    """The sentence that explains columns scored against their model's own predictions (empty when none are)."""
    if "reference_labels" not in cells.columns:
        return ""
    own = sorted(cells.loc[cells["reference_labels"] == "own clean predictions", "evaluated"].astype(str).unique())
    own = [(labels or {}).get(name, name) for name in own]
    if not own:
        return ""
    return (f" Columns {', '.join(own)}: trained on other classes, so scored against their own clean predictions; "
            "their clean accuracy is 100 by construction and a cell is the share of predictions the attack "
            "did not change.")


# ----------------------------------------------------------------- figures
def _heatmap(cells: Cells, attack: str, eps: float) -> bytes:
    chosen = choose(cells, attack, eps)
    p = pivots(chosen)
    seeds = chosen["seed"].nunique()
    samples = int(chosen["samples"].max()) if "samples" in chosen.columns else None
    caption = ("rows: model the examples were crafted on; columns: model evaluated; cells: adversarial accuracy in %"
               f" ({'mean over ' + str(seeds) + ' seeds' if seeds > 1 else 'one seed'}"
               f"{', ' + format(samples, ',') + ' images' if samples else ''}); lower = the attack worked better")
    labels = display_labels(chosen)
    return figures.heatmap_png(figures.HeatmapGrids(p.values, p.white_box, p.same_pretraining),
                               f"{attack}, eps = {eps_text(eps)}: adversarial accuracy", caption, clean=p.clean,
                               row_labels=[labels.get(r, r) for r in p.values.index],
                               column_labels=[labels.get(c, c) for c in p.values.columns])


def curve_attacks(cells: pd.DataFrame) -> list[str]:
    """Attacks with at least two eps values: the only ones an eps curve can show."""
    counts = cells.groupby("attack")["eps"].nunique()
    return sorted(counts[counts >= 2].index)


def _eps_curves(cells: Cells) -> bytes:
    cells = cells.merged
    attacks = curve_attacks(cells)
    chosen = cells[cells["attack"].isin(attacks)]
    evaluated = run_order(chosen, "evaluated", ROLE_ORDER_COLUMNS)
    trained = [t for t in evaluated
               if chosen.loc[chosen["evaluated"] == t, "evaluated_role"].isin(("finetuned", "scratch")).any()]
    panels_for = trained or evaluated  # a matrix of pretrained models only still gets its curves
    # Lines: every pretrained model's sets, plus the white-box attack on the panel's own model.
    lines = chosen[chosen["evaluated"].isin(panels_for)
                   & ((chosen["crafted_on_role"] == "pretrained") | chosen["white_box"])]
    lines = lines.assign(kind=np.where(lines["white_box"], "white-box",
                                       np.where(lines["same_pretraining"], "own", "other")))
    many = len(attacks) > 1
    names = display_labels(chosen)
    panel_label = dict(zip(panels_for, figures.short_labels([names.get(t, t) for t in panels_for], 40)))
    lines = lines.assign(panel=[panel_label[t] + (f"\n{a}" if many else "")
                                for t, a in zip(lines["evaluated"], lines["attack"])])
    curves = (lines.groupby(["attack", "evaluated", "panel", "crafted_on", "kind", "eps"], sort=False)["adversarial_accuracy"]
              .agg(mean="mean", sd="std").reset_index())
    # Panels in matrix-column order, attack by attack.
    rank = {pair: i for i, pair in enumerate((a, t) for a in attacks for t in panels_for)}
    curves["rank"] = [rank[(a, t)] for a, t in zip(curves["attack"], curves["evaluated"])]
    curves = curves.sort_values(["rank", "eps"], kind="stable")
    clean = lines.groupby("panel")["clean_accuracy"].mean().rename("clean").reset_index()
    return figures.eps_curves_png(curves, clean, labels=names)


def _examples(examples_file: Path) -> bytes:
    from safetensors import safe_open

    with safe_open(str(examples_file), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key).float().numpy() for key in f.keys()}
    if "clean" not in tensors:
        raise ValueError("no 'clean' tensor")
    adversarial = {key.split("/", 1)[1]: value for key, value in tensors.items() if key.startswith("adv/")}
    if not adversarial:
        raise ValueError("no 'adv/<source>' tensors")
    try:
        eps = float(metadata.get("eps"))
    except (TypeError, ValueError):
        eps = None
    return figures.examples_png(tensors["clean"], adversarial, eps, metadata.get("attack", "attack"))


# ------------------------------------------------------------ doc sections
def matrix_files(out_dir: Path, attack: str, eps: float) -> dict[str, Path]:
    stem = setting_stem(attack, eps)
    return {ext: Path(out_dir) / f"matrix_{stem}.{ext}" for ext in ("csv", "md", "tex")} | {
        "png": Path(out_dir) / f"heatmap_{stem}.png"}


def add_matrix_blocks(doc: Doc, out_dir: Path, cells: Cells | pd.DataFrame, level: int = 3,
                      metric: str = "accuracy") -> None:
    """Per setting: the adversarial-accuracy and the attack-success-rate tables (``metric`` first) and
    the heatmap of ``metric``."""
    cells = Cells.of(cells)
    if cells.empty:
        doc.paragraph("The attack matrix has no cells.")
        return
    for attack, eps in settings(cells.frame):
        doc.heading(f"{attack}, eps = {eps_text(eps)}", level)
        tables = [matrix_table(cells, attack, eps)]
        if asr.available(cells):
            tables.append(asr.asr_table(cells, attack, eps))
        for table in (tables if metric == "accuracy" else tables[::-1]):
            doc.table(table.frame, table.marks, table.caption, name=table.name)
        heatmap, shown = matrix_files(out_dir, attack, eps)["png"], "adversarial accuracy"
        if metric == "asr" and asr.heatmap_path(out_dir, attack, eps).is_file():
            heatmap, shown = asr.heatmap_path(out_dir, attack, eps), "attack success rate"
        if heatmap.is_file():
            doc.image(heatmap, f"Heatmap ({shown}): {attack}, eps = {eps_text(eps)}")


def add_curve_blocks(doc: Doc, out_dir: Path, cells: Cells | pd.DataFrame) -> None:
    path = Path(out_dir) / "eps_curves.png"
    if not curve_attacks(Cells.of(cells).frame):
        doc.paragraph("Only one eps value per attack was run, so there is no accuracy-vs-eps curve.")
    elif path.is_file():
        doc.image(path, "Adversarial accuracy vs eps, one panel per evaluated model; thick line: its own source.")
    else:
        doc.paragraph("The accuracy-vs-eps figure has not been drawn.")


def add_examples_blocks(doc: Doc, out_dir: Path, note: str | None = None) -> None:
    path = Path(out_dir) / "examples.png"
    if note:
        doc.paragraph(note)
    elif path.is_file():
        doc.image(path, "Example images: clean, adversarial and the perturbation (amplified to ±eps) per source.")
    elif (Path(out_dir) / "examples.safetensors").is_file():
        doc.paragraph("examples.safetensors exists but could not be drawn; matrix/summary.md says why.")
    else:
        doc.paragraph("No example images were saved with this attack matrix.")


def _pct(v) -> str:
    return "-" if pd.isna(v) else f"{100 * v:.1f}"


def _pts(v) -> str:
    return "-" if pd.isna(v) else f"{100 * v:+.1f}"


def add_hypothesis_blocks(doc: Doc, lineage: pd.DataFrame | None, level: int = 3,
                          cells: Cells | pd.DataFrame | None = None) -> dict:
    """The plain answer (unit: pretraining runs; adjusted by the from-scratch targets where the cells have
    them), the floors left out, the pooled test, per source, per setting with Holm, per target; returns the
    summary."""
    cells = None if cells is None else Cells.of(cells).frame
    summary = hypothesis_summary(lineage, cells)
    doc.paragraph(summary["sentence"])
    if summary["floors"]:
        doc.paragraph("Floors: " + " ".join(summary["floors"]))
    if not summary["testable"]:
        return summary
    doc.table(hypothesis_measures(summary), name="hypothesis")
    doc.paragraph("Difference = target accuracy under its own source's examples minus under another source's "
                  "(same architecture); negative means examples sharing the target's pretraining transfer better. "
                  "The unit of the test is the pretraining run: every target fine-tuned from one source run (each "
                  "n, each freeze) shares its model and its adversarial sets, so their rows are averaged into one "
                  "value per run, and the sign-flip test and its interval resample those runs. Adjusted = the "
                  "difference minus the same own-minus-other gap on from-scratch targets (same architecture, n and "
                  "seed), which removes how hard a source's examples hit any model. Each McNemar test compares the "
                  "two attacks on the same images of one target; they share targets and images, so they are "
                  "counted, not combined. Cohen's h: |h| 0.2 small, 0.5 medium, 0.8 large.")
    add_source_and_setting_blocks(doc, lineage, cells, summary, level)
    doc.heading("Per target", level)
    display = merge_seed_names(lineage, ["finetuned", "pretrained_from", "other_pretrained"])
    per_target = per_target_table(display)
    doc.table(pd.DataFrame({
        "target": per_target["finetuned"], "own source": per_target["pretrained_from"],
        "other sources": per_target["other_pretrained"], "tests": per_target["tests"],
        "own %": per_target["acc_own"].map(_pct), "other %": per_target["acc_other"].map(_pct),
        "mean difference (points)": per_target["mean_difference"].map(_pts),
        "range (points)": [f"{_pts(lo)} to {_pts(hi)}" for lo, hi in zip(per_target["min_difference"],
                                                                          per_target["max_difference"])],
        "significant: own better / other better": [f"{a} / {b}" for a, b in zip(per_target["own_better"],
                                                                                 per_target["other_better"])],
    }), caption="Over every attack, eps, other source and seed of the target; significance from McNemar at 0.05.",
        name="hypothesis_per_target")

    if len(lineage) <= 60:
        doc.heading("Every lineage test", level)
        doc.table(lineage_display(lineage), name="lineage_tests")
    else:
        doc.paragraph(f"All {len(lineage)} individual lineage tests are in lineage.csv.")
    return summary


def lineage_display(lineage: pd.DataFrame) -> pd.DataFrame:
    rows = lineage.sort_values(["finetuned", "other_pretrained", "attack", "eps", "seed"])
    if {"diff_ci_low", "diff_ci_high"} <= set(rows.columns):
        interval = [f"{_pts(lo)} to {_pts(hi)}" for lo, hi in zip(rows["diff_ci_low"], rows["diff_ci_high"])]
    else:
        interval = ["-"] * len(rows)
    return pd.DataFrame({
        "target": rows["finetuned"], "own source": rows["pretrained_from"], "other source": rows["other_pretrained"],
        "attack": rows["attack"], "eps": rows["eps"].map(eps_text), "seed": rows["seed"],
        "own %": rows["acc_own"].map(_pct), "other %": rows["acc_other"].map(_pct),
        "difference (points)": rows["difference"].map(_pts),
        "95% CI": interval,
        "McNemar p": rows["mcnemar_p"].map(format_p),
    }).reset_index(drop=True)


# ------------------------------------------------------------------ writer
def outputs_key(cells: Cells | pd.DataFrame, lineage: pd.DataFrame | None, examples_file: Path | None,
                metric: str = "accuracy") -> str:
    """A content key of what the matrix outputs are drawn from (the tables, the examples file, the metric)."""

    examples = Path(examples_file) if examples_file is not None else None
    return content_key({
        "cells": Cells.of(cells).frame.to_csv(index=False),
        "lineage": None if lineage is None else prepare_lineage(lineage).to_csv(index=False),
        "examples": file_sha256(examples) if examples is not None and examples.is_file() else None,
        "metric": metric,
    })


def update_matrix_outputs(out_dir: Path, cells: Cells | pd.DataFrame, lineage: pd.DataFrame | None = None,
                          examples_file: Path | None = None, metric: str = "accuracy") -> list[Path]:
    """write_matrix_outputs, unless the outputs in ``out_dir`` were drawn from these same tables by this layout
    and are all still there: a report rebuilt in another format, or a study or matrix re-run that added nothing,
    redraws no figure. Returns the paths written (none when current)."""

    cells = Cells.of(cells)
    key = outputs_key(cells, lineage, examples_file, metric)
    recorded = recorded_outputs(out_dir, "matrix-outputs", OUTPUT_LAYOUT, inputs=key)
    if recorded and all((Path(out_dir) / name).is_file() for name in recorded):
        return []
    return write_matrix_outputs(out_dir, cells, lineage, examples_file, metric, inputs_key=key)


def _setting_outputs(out_dir: Path, cells: Cells, attack: str, eps: float) -> dict[Path, str | bytes]:
    """One setting's files: the matrix as CSV, Markdown and LaTeX and its heatmap; the attack success rate's
    heatmap and CSV when the cells record it."""
    files = matrix_files(out_dir, attack, eps)
    table = matrix_table(cells, attack, eps)
    outputs = {files["csv"]: pivot_matrix(cells, attack, eps).to_csv(float_format="%.6g"),
               files["md"]: f"# Attack matrix: {attack}, eps = {eps_text(eps)}\n\n{table_markdown(table)}\n",
               files["tex"]: f"% {table.caption}\n" + table_latex(table),
               files["png"]: _heatmap(cells, attack, eps)}
    if asr.available(cells):
        outputs[asr.heatmap_path(out_dir, attack, eps)] = asr.asr_heatmap_png(cells, attack, eps)
        outputs[out_dir / f"asr_{setting_stem(attack, eps)}.csv"] = pd.concat(
            {k: v for k, v in asr.asr_pivots(cells, attack, eps).items() if k in ("rate", "ci_low", "ci_high")},
            axis=1).to_csv(float_format="%.6g")
    return outputs


def write_matrix_outputs(out_dir: Path, cells: Cells | pd.DataFrame, lineage: pd.DataFrame | None = None,
                         examples_file: Path | None = None, metric: str = "accuracy",
                         inputs_key: str | None = None) -> list[Path]:
    """Write matrix_<attack>_<eps>.csv/.md/.tex and heatmap_<attack>_<eps>.png per setting, eps_curves.png
    (several eps), examples.png (examples file present) and summary.md into ``out_dir``; return the paths.
    ``inputs_key``: outputs_key of the arguments, when the caller has it already."""

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = Cells.of(cells)
    if inputs_key is None:
        inputs_key = outputs_key(cells, lineage, examples_file, metric)
    lineage = prepare_lineage(lineage)
    written: list[Path] = []

    def write(path: Path, data) -> None:
        (atomic_write_text if isinstance(data, str) else atomic_write_bytes)(path, data)
        written.append(path)

    for attack, eps in settings(cells.frame):
        for path, data in _setting_outputs(out_dir, cells, attack, eps).items():
            write(path, data)
    if curve_attacks(cells.frame):
        write(out_dir / "eps_curves.png", _eps_curves(cells))
    examples_note = None
    if examples_file is not None and Path(examples_file).is_file():
        try:
            write(out_dir / "examples.png", _examples(Path(examples_file)))
        except Exception as exc:  # a damaged examples file must not cost the whole report
            examples_note = f"The examples file {Path(examples_file).name} could not be drawn ({exc})."

    doc = Doc("Attack matrix summary")
    doc.paragraph(describe_cells(cells.frame))

    add_method_section(doc, out_dir, level=2)
    doc.heading("Matrices")
    add_matrix_blocks(doc, out_dir, cells, metric=metric)
    doc.heading("Accuracy vs eps")
    add_curve_blocks(doc, out_dir, cells)
    doc.heading("Example images")
    add_examples_blocks(doc, out_dir, examples_note)
    doc.heading("Does same pretraining make adversarial examples transfer better?")
    if lineage is None:
        doc.paragraph("No lineage tests were given, so the question is not answered here.")
    else:
        add_hypothesis_blocks(doc, lineage, cells=cells)
    write(out_dir / "summary.md", render_markdown(doc, out_dir))

    # Heatmaps of settings no longer in the cells go.
    replace_outputs(out_dir, "matrix-outputs", written, layout=OUTPUT_LAYOUT, inputs=inputs_key)
    return written


def describe_cells(cells: pd.DataFrame) -> str:
    if cells.empty:
        return "The attack matrix has no cells."
    merged = merge_seed_names(cells, list(SIDES))  # count configurations, not one run per seed
    crafters = merged["crafted_on"].nunique()
    evaluated = merged["evaluated"].nunique()
    attacks = ", ".join(f"{a} (eps {', '.join(eps_text(e) for e in sorted(g['eps'].unique()))})"
                        for a, g in cells.groupby("attack"))
    seeds = ", ".join(str(s) for s in sorted(cells["seed"].unique()))
    samples = f" on {int(cells['samples'].max()):,} test images" if "samples" in cells.columns else ""
    return (f"{len(cells)} cells: examples crafted on {crafters} models, each evaluated on {evaluated} models"
            f"{samples}; "
            f"attacks {attacks}; seeds {seeds}. Cells show adversarial accuracy in %: lower means the attack "
            f"transferred better.")
