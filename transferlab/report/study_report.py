"""The full study report: training tables, attack matrices, the answer, run times and provenance.

A study results folder holds runs.csv (one row per trained run), study.json (seeds,
device, versions, data provenance, step timings) and matrix/ (cells.csv, lineage.csv,
pairs.csv, examples.safetensors). The report is built from those tables as ReportInputs:
a study passes the DataFrames it has just written (no re-read), ``transferlab report``
reads them from disk (read_inputs); write_report does the rest for both. It is built once
as a document and rendered to Markdown, self-contained HTML and, on request, LaTeX; every
table is also exported to tables/. A missing input makes its section say so instead of
failing the report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from transferlab.errors import UserError
from transferlab.report.method import add_method_section
from transferlab.report import matrices
from transferlab.report.cells import Cells, eps_text, prepare_lineage, read_csv, read_lineage, read_pairs, settings
from transferlab.report.doc import Doc, Table, render_html, render_latex, render_markdown, table_latex
from transferlab.report.asr import check_metric
from transferlab.report.freeze import add_freeze_blocks
from transferlab.report.hypothesis import hypothesis_summary
from transferlab.report.manifest import replace_outputs
from transferlab.report.predictors import add_predictor_blocks
from transferlab.report import reference
from transferlab.files import atomic_write_text

FORMATS = ("md", "html", "tex")
QUESTION = ("When a model is fine-tuned from a pretrained source, do adversarial examples crafted on that same "
            "source lower its accuracy more than examples crafted on another source of the same architecture?")


# ------------------------------------------------------------------ helpers
def _column(runs: pd.DataFrame, name: str) -> pd.Series:
    """A runs.csv column, or an all-missing one when an older file lacks it."""
    return runs[name] if name in runs.columns else pd.Series([pd.NA] * len(runs), index=runs.index, dtype=object)


def _mean_sd(values: pd.Series) -> str:
    """Accuracy fractions -> '98.65' for one value, '98.65 ± 0.12' (sample sd) for several."""
    values = pd.to_numeric(values, errors="coerce").dropna() * 100
    if values.empty:
        return "-"
    if len(values) == 1:
        return f"{values.iloc[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def _train_test(group: pd.DataFrame) -> str:
    return f"{_mean_sd(group['train_accuracy'])} / {_mean_sd(group['test_accuracy'])}"


def _count(value) -> str:
    return "all" if pd.isna(value) else f"{int(value):,}"


def _int_or_dash(value) -> str:
    return "-" if pd.isna(value) else str(int(value))


def _seconds(value) -> str:
    return "-" if pd.isna(value) else f"{float(value):,.1f}"


def _plain(value) -> str:
    if isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
        return ", ".join(map(str, value))
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(", ", ": "))
    return "-" if value is None else str(value)


def _runs_of(runs: pd.DataFrame, *kinds: str) -> pd.DataFrame:
    return runs[_column(runs, "kind").astype(str).isin(kinds)].copy()


def _read_study_json(path: Path) -> tuple[dict, str | None]:
    if not path.is_file():
        return {}, "study.json is missing, so the study's provenance is unknown."
    try:
        study = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {}, f"study.json could not be read ({type(exc).__name__})."
    return (study, None) if isinstance(study, dict) else ({}, "study.json does not hold a JSON object.")


# ------------------------------------------------------------------ sections
def pretraining_table(runs: pd.DataFrame) -> pd.DataFrame | None:
    """Rows = source dataset (with its subset size when not the full set), columns = model: 'train / test' %."""
    pre = _runs_of(runs, "pretrain")
    if pre.empty:
        return None
    pre["row"] = [d if pd.isna(n) else f"{d} (n={int(n):,})" for d, n in zip(pre["dataset"], _column(pre, "n"))]
    cells = {(row, model): _train_test(group) for (row, model), group in pre.groupby(["row", "model"], sort=False)}
    rows, models = list(dict.fromkeys(pre["row"])), list(dict.fromkeys(pre["model"]))
    table = pd.DataFrame([[row] + [cells.get((row, m), "-") for m in models] for row in rows],
                         columns=["source"] + models)
    return table


def finetuning_table(runs: pd.DataFrame) -> pd.DataFrame | None:
    """One row per (source dataset or 'scratch', model, n, freeze): seeds and train / test %, mean ± sd."""
    tuned = _runs_of(runs, "finetune", "scratch")
    if tuned.empty:
        return None
    tuned["source"] = ["scratch" if k == "scratch" or pd.isna(p) else str(p)
                       for k, p in zip(tuned["kind"], _column(tuned, "pretrain_dataset"))]
    tuned["n_key"] = pd.to_numeric(_column(tuned, "n"), errors="coerce")
    tuned["freeze_key"] = pd.to_numeric(_column(tuned, "freeze"), errors="coerce")
    rows = []
    for (model, source, n, freeze), group in tuned.groupby(["model", "source", "n_key", "freeze_key"], dropna=False):
        datasets = ", ".join(sorted(map(str, group["dataset"].unique())))
        rows.append({"source": source, "model": model, "dataset": datasets,
                     "n": _count(n), "freeze": "-" if source == "scratch" else _int_or_dash(freeze),
                     "seeds": len(group), "train / test (%)": _train_test(group),
                     "_order": (str(model), source == "scratch", source, -(n if pd.notna(n) else float("inf")),
                                freeze if pd.notna(freeze) else -1)})
    # Per model: fine-tuned sources alphabetically, from-scratch runs last; larger n first.
    rows.sort(key=lambda r: r["_order"])
    return pd.DataFrame(rows).drop(columns="_order")


def run_times_table(runs: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "run": _column(runs, "name"), "kind": _column(runs, "kind"), "model": _column(runs, "model"),
        "dataset": _column(runs, "dataset"), "n": _column(runs, "n").map(_count),
        "freeze": _column(runs, "freeze").map(_int_or_dash), "seed": _column(runs, "seed").map(_int_or_dash),
        "seconds": _column(runs, "duration_s").map(_seconds),
        "images/s": _column(runs, "images_per_second").map(lambda v: "-" if pd.isna(v) else f"{float(v):,.0f}"),
        "device": _column(runs, "device").map(lambda v: "-" if pd.isna(v) else str(v)),
        "numerics": _column(runs, "numerics").map(lambda v: "-" if pd.isna(v) else str(v)),
    })


def time_by_kind_table(runs: pd.DataFrame) -> pd.DataFrame:
    frame = pd.DataFrame({"kind": _column(runs, "kind").astype(str),
                          "seconds": pd.to_numeric(_column(runs, "duration_s"), errors="coerce")})
    grouped = frame.groupby("kind", sort=False)["seconds"].agg(["count", "sum", "max"]).reset_index()
    return pd.DataFrame({"kind": grouped["kind"], "runs": grouped["count"].astype(int),
                         "total seconds": grouped["sum"].map(_seconds),
                         "longest run (s)": grouped["max"].map(_seconds)})


def _provenance(doc: Doc, study: dict, note: str | None, matrix_dir: Path) -> None:
    if note:
        doc.paragraph(note)
    facts = [("study", study.get("study")), ("description", study.get("description") or None),
             ("seeds", study.get("seeds")), ("device", study.get("device")), ("git commit", study.get("git_commit")),
             ("wall time (s)", _seconds(study["wall_time_s"]) if study.get("wall_time_s") is not None else None)]
    matrix_json = matrix_dir / "matrix.json"
    if matrix_json.is_file():
        try:
            info = json.loads(matrix_json.read_text(encoding="utf-8"))
            facts += [("attack matrix: sets crafted / reused",
                       f"{info.get('crafted', '-')} / {info.get('reused', '-')}"),
                      ("attack matrix: crafting / evaluation (s)",
                       f"{_seconds(info.get('craft_seconds'))} / {_seconds(info.get('eval_seconds'))}")]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pass
    facts = [(k, _plain(v)) for k, v in facts if v is not None]
    if facts:
        doc.table(pd.DataFrame(facts, columns=["item", "value"]), name="study")

    versions = study.get("versions")
    if isinstance(versions, dict) and versions:
        doc.heading("Versions", 3)
        doc.table(pd.DataFrame([(k, _plain(v)) for k, v in versions.items()], columns=["package", "version"]),
                  name="versions")
    provenance = study.get("data_provenance")
    if isinstance(provenance, dict) and provenance:
        doc.heading("Data sources", 3)
        rows = []
        for dataset, detail in provenance.items():
            if isinstance(detail, dict):
                rows += [(dataset, key, _plain(value)) for key, value in detail.items()]
            else:
                rows.append((dataset, "", _plain(detail)))
        doc.table(pd.DataFrame(rows, columns=["dataset", "field", "value"]), name="data_provenance")
    steps = study.get("steps")
    if isinstance(steps, list) and steps:
        frame = pd.DataFrame([s for s in steps if isinstance(s, dict)])
        if "kind" in frame.columns and "seconds" in frame.columns:
            frame["seconds"] = pd.to_numeric(frame["seconds"], errors="coerce")
            grouped = frame.groupby("kind", sort=False)["seconds"].agg(["count", "sum", "max"]).reset_index()
            doc.heading("Steps", 3)
            doc.table(pd.DataFrame({"step kind": grouped["kind"], "steps": grouped["count"],
                                    "total seconds": grouped["sum"].map(_seconds),
                                    "longest (s)": grouped["max"].map(_seconds)}), name="steps")


# ------------------------------------------------------------------ report
@dataclass
class ReportInputs:
    """Everything a section may draw on; a section states what it lacks instead of failing.

    A study hands over the tables it has just built (transferlab.study.collect_results); ``transferlab
    report FOLDER`` reads the same tables from disk (read_inputs). Both then go through write_report."""

    folder: Path
    runs: pd.DataFrame | None  # None for a bare attack-matrix folder (no runs.csv)
    study: dict
    study_note: str | None
    matrix_dir: Path
    cells: Cells | None = None  # a raw DataFrame given here is prepared once, in __post_init__
    lineage: pd.DataFrame | None = None
    pairs: pd.DataFrame | None = None  # transfer predictors (pairs.csv), when the matrix has them
    examples: Path | None = None  # examples.safetensors, when the matrix saved example images
    metric: str = "accuracy"  # accuracy | asr: which matrix table leads and which heatmap is shown

    def __post_init__(self):
        # The same checked frames whichever way the tables came (see cells.Cells).
        if self.cells is not None:
            self.cells = Cells.of(self.cells)
            self.lineage = prepare_lineage(self.lineage)

    @property
    def attacks_declared(self) -> bool:
        """False only for a study whose file has no [[attack]] table (one that checks training alone)."""
        config = self.study.get("config")
        return not isinstance(config, dict) or "attack" not in config or bool(config["attack"])

    @property
    def no_matrix(self) -> str:
        if not self.attacks_declared:
            return "This study has no [[attack]] table: it trains and scores models only, so it has no attack matrix."
        return "No attack matrix yet (matrix/cells.csv is missing); run the study's attack step first."


def _headline_setting(r: ReportInputs) -> tuple[str, float] | None:
    """The matrix shown in the summary, chosen without looking at the results: the attack with the most
    steps (the strongest; pgd over fgsm), at its smallest eps."""
    if r.cells is None or r.cells.empty:
        return None
    cells = r.cells.frame
    steps = (pd.to_numeric(cells["steps"], errors="coerce").fillna(1).groupby(cells["attack"]).max()
             if "steps" in cells.columns else pd.Series(dtype=float))
    available = settings(cells)
    return min(available, key=lambda s: (-float(steps.get(s[0], 1)), s[1], s[0]))


def summary_section(doc: Doc, r: ReportInputs) -> None:
    """The answer first: the question, one sentence with its numbers, the headline heatmap."""

    doc.box("summary")
    doc.heading("Summary", 2)
    doc.paragraph(f"Question: {QUESTION}")
    if r.cells is None:
        doc.paragraph(f"Answer: {'not yet' if r.attacks_declared else 'not asked here'}. {r.no_matrix}")
    elif r.lineage is None:
        doc.paragraph("Answer: not yet; matrix/lineage.csv is missing.")
    else:
        doc.paragraph(f"Answer: {hypothesis_summary(r.lineage, r.cells.frame)['sentence']}")
    headline = _headline_setting(r)
    if headline is not None:
        heatmap = matrices.matrix_files(r.matrix_dir, *headline)["png"]
        if heatmap.is_file():
            attack, eps = headline
            doc.image(heatmap, f"{attack}, eps = {eps_text(eps)}: adversarial accuracy (%); red frame: "
                               f"white-box, dashed: same pretraining; bottom strip: clean accuracy. Every other "
                               f"setting is in the attack matrices below.")
    doc.end_box()


def pretraining_section(doc: Doc, r: ReportInputs) -> None:
    table = pretraining_table(r.runs)
    if table is None:
        doc.paragraph("No pretraining runs in runs.csv.")
    else:
        doc.table(table, caption="Train / test accuracy (%) of each pretrained source; rows = source dataset, "
                                 "columns = model.", name="pretraining")


def reference_table(runs: pd.DataFrame) -> pd.DataFrame | None:
    """This study's runs that the reference experiment also reported, both 'train / test' % side by side."""
    if runs is None or runs.empty or "kind" not in runs.columns:
        return None
    rows = []
    for (kind, source, model, dataset, n, freeze), group in runs.assign(
            source=_column(runs, "pretrain_dataset"), n=pd.to_numeric(_column(runs, "n"), errors="coerce"),
            freeze=pd.to_numeric(_column(runs, "freeze"), errors="coerce")).groupby(
            ["kind", "source", "model", "dataset", "n", "freeze"], dropna=False, sort=False):
        if kind == "pretrain":
            found = reference.PRETRAIN.get((dataset, model))
        else:
            source = "scratch" if kind == "scratch" else source
            found = reference.TUNED.get((source, model, dataset, None if pd.isna(n) else int(n),
                                         None if kind == "scratch" or pd.isna(freeze) else int(freeze)))
        if found is not None:
            rows.append({"run": kind, "source": source if kind != "pretrain" else dataset, "model": model,
                         "dataset": dataset, "n": _count(n),
                         "freeze": _int_or_dash(freeze) if kind == "finetune" else "-",
                         "seeds": len(group), "this study: train / test (%)": _train_test(group),
                         "reference: train / test (%)": f"{found[0]:.2f} / {found[1]:.2f}"})
    return pd.DataFrame(rows) if rows else None


def finetuning_section(doc: Doc, r: ReportInputs) -> None:
    table = finetuning_table(r.runs)
    if table is None:
        doc.paragraph("No fine-tuning or from-scratch runs in runs.csv.")
    else:
        doc.table(table, caption="Train / test accuracy (%) after fine-tuning each source (first 'freeze' parameter "
                                 "tensors frozen), and from-scratch runs (source 'scratch'); n = training "
                                 "images used.", name="finetuning")
    against = reference_table(r.runs)
    if against is not None:
        doc.heading("Against the reference experiment", 3)
        doc.table(against, caption=f"The runs of this study that the reference experiment ({reference.SOURCE}) "
                                   "also reported: one run each there, mean ± sd over seeds here. n = the training "
                                   "images this study used ('all': the whole training split; the reference "
                                   "pretrained on whole splits).",
                  name="reference")


def matrices_section(doc: Doc, r: ReportInputs) -> None:
    if r.cells is None:
        doc.paragraph(r.no_matrix)
        return
    doc.paragraph(matrices.describe_cells(r.cells.frame))
    add_method_section(doc, r.matrix_dir)
    matrices.add_matrix_blocks(doc, r.matrix_dir, r.cells, metric=r.metric)


def curves_section(doc: Doc, r: ReportInputs) -> None:
    if r.cells is None:
        doc.paragraph(r.no_matrix)
    else:
        matrices.add_curve_blocks(doc, r.matrix_dir, r.cells)


def examples_section(doc: Doc, r: ReportInputs) -> None:
    if r.cells is None:
        doc.paragraph(r.no_matrix)
    else:
        matrices.add_examples_blocks(doc, r.matrix_dir)


def hypothesis_section(doc: Doc, r: ReportInputs) -> None:
    if r.cells is None:
        doc.paragraph(r.no_matrix)
    elif r.lineage is None:
        doc.paragraph("matrix/lineage.csv is missing, so the question cannot be answered yet.")
    else:
        matrices.add_hypothesis_blocks(doc, r.lineage, cells=r.cells)
    if r.cells is not None:  # the why beside the answer: freeze sweep (several freezes only) and predictors

        add_freeze_blocks(doc, r.matrix_dir, r.cells)
        add_predictor_blocks(doc, r.matrix_dir, r.cells.frame, r.pairs)


def provenance_section(doc: Doc, r: ReportInputs) -> None:
    doc.collapsed("Run times, versions, data sources and steps (click to open)")
    if r.runs is not None:
        doc.heading("Run times", 3)
        doc.table(time_by_kind_table(r.runs), name="time_by_kind")
        doc.table(run_times_table(r.runs), name="runs")
    doc.heading("Provenance", 3)
    _provenance(doc, r.study, r.study_note, r.matrix_dir)
    doc.end_collapsed()


@dataclass(frozen=True)
class Section:
    title: str  # None: no numbered heading (the summary box brings its own)
    build: Callable[[Doc, ReportInputs], None]
    needs_runs: bool = False  # skipped for a bare attack-matrix folder


# The report, in order. To add a section, write ``def my_section(doc, r)`` and insert a Section here.
REPORT_SECTIONS: list[Section] = [
    Section(None, summary_section),
    Section("Pretraining accuracy", pretraining_section, needs_runs=True),
    Section("Fine-tuning accuracy", finetuning_section, needs_runs=True),
    Section("Attack matrices", matrices_section),
    Section("Accuracy vs eps", curves_section),
    Section("Example images", examples_section),
    Section("Does same pretraining make adversarial examples transfer better?", hypothesis_section),
    Section("Run times and provenance", provenance_section),
]
SECTIONS = tuple(f"{i}. {s.title}" for i, s in enumerate((s for s in REPORT_SECTIONS if s.title), 1))


def read_inputs(folder: Path) -> ReportInputs:
    """A study results folder (runs.csv + matrix/) or a bare attack-matrix output folder (cells.csv), from disk."""
    folder = Path(folder)
    if (folder / "runs.csv").is_file():
        runs, matrix_dir = read_csv(folder / "runs.csv"), folder / "matrix"
    elif (folder / "cells.csv").is_file():
        runs, matrix_dir = None, folder
    else:
        raise UserError(f"{folder} is neither a study results folder (no runs.csv) nor an attack-matrix output "
                        f"folder (no cells.csv); run 'transferlab run STUDY.toml' or 'transferlab attack-matrix' first")
    study, study_note = _read_study_json(folder / "study.json") if runs is not None else ({}, None)
    if runs is None and (folder / "matrix.json").is_file():
        study, study_note = _read_study_json(folder / "matrix.json")
    cells = lineage = pairs = examples = None
    if (matrix_dir / "cells.csv").is_file():
        cells = Cells.read(matrix_dir / "cells.csv")
        lineage = read_lineage(matrix_dir / "lineage.csv")
        pairs = read_pairs(matrix_dir / "pairs.csv")
        if (matrix_dir / "examples.safetensors").is_file():
            examples = matrix_dir / "examples.safetensors"
    return ReportInputs(folder, runs, study, study_note, matrix_dir, cells, lineage, pairs, examples)


def build_report(r: ReportInputs) -> Doc:
    name = r.study.get("study") or r.folder.name
    doc = Doc(f"Study report: {name}" if r.runs is not None else f"Attack-matrix report: {name}")
    if r.study.get("description"):
        doc.paragraph(str(r.study["description"]))
    if r.runs is not None:
        kinds = _column(r.runs, "kind").astype(str).value_counts()
        seeds = r.study.get("seeds", sorted(_column(r.runs, "seed").dropna().unique().tolist()))
        doc.paragraph(f"{len(r.runs)} runs ({', '.join(f'{n} {k}' for k, n in kinds.items()) or 'none finished yet'}); "
                      f"seeds: {_plain(seeds)}. Accuracies are in %; with several seeds, mean ± sd over seeds.")
    number = 0
    for section in REPORT_SECTIONS:
        if section.needs_runs and r.runs is None:
            continue
        if section.title:
            number += 1
            doc.heading(f"{number}. {section.title}")
        section.build(doc, r)
    return doc


def _check_formats(formats, metric: str) -> list[str]:
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UserError(f"unknown report format(s) {', '.join(unknown)}; use {', '.join(FORMATS)}")

    check_metric(metric)
    return list(formats)


def write_study_report(study_dir: Path, formats=("md", "html"), metric: str = "accuracy") -> list[Path]:
    """Write report.md (and report.html / report.tex) plus tables/*.csv and *.tex into ``study_dir``, a study
    results folder or an attack-matrix output folder, from the tables on disk (``transferlab report``)."""
    formats = _check_formats(formats, metric)
    inputs = read_inputs(Path(study_dir))
    inputs.metric = metric
    return write_report(inputs, formats)


def write_report(inputs: ReportInputs, formats=("md", "html")) -> list[Path]:
    """The report of ``inputs``, however they were obtained: matrix outputs (heatmaps, curves, summary.md; not
    redrawn when drawn from these same tables before), report.md / .html / .tex and tables/ under
    ``inputs.folder``. Returns the paths written."""

    formats = _check_formats(formats, inputs.metric)
    study_dir = inputs.folder
    written = []
    if inputs.cells is not None:
        written += matrices.update_matrix_outputs(inputs.matrix_dir, inputs.cells, inputs.lineage, inputs.examples)
    doc = build_report(inputs)

    report_written = _write_tables(study_dir / "tables", doc, inputs.lineage)
    if "md" in formats:
        atomic_write_text(study_dir / "report.md", render_markdown(doc, study_dir))
        report_written.append(study_dir / "report.md")
    if "html" in formats:
        atomic_write_text(study_dir / "report.html", render_html(doc))
        report_written.append(study_dir / "report.html")
    if "tex" in formats:
        atomic_write_text(study_dir / "report.tex", render_latex(doc, study_dir))
        report_written.append(study_dir / "report.tex")
    # Tables of settings the study no longer has go; report.* of formats not asked for this time stay.

    keep = [study_dir / f"report.{f}" for f in FORMATS if (study_dir / f"report.{f}").is_file()]
    replace_outputs(study_dir, "report", report_written + keep)
    return written + report_written


def _write_tables(tables_dir: Path, doc: Doc, lineage: pd.DataFrame | None) -> list[Path]:
    """Every table of the report as tables/<name>.csv and .tex (the full lineage tests included)."""

    tables = doc.tables()
    if lineage is not None and not any(t.name == "lineage_tests" for t in tables):
        tables.append(Table(matrices.lineage_display(lineage), name="lineage_tests"))
    written, used = [], set()
    for i, table in enumerate(tables, 1):
        name = table.name or f"table_{i}"
        while name in used:
            name += "_2"
        used.add(name)
        for path, text in ((tables_dir / f"{name}.csv", table.frame.to_csv(index=False)),
                           (tables_dir / f"{name}.tex", (f"% {table.caption}\n" if table.caption else "")
                            + table_latex(table))):
            atomic_write_text(path, text)
            written.append(path)
    return written
