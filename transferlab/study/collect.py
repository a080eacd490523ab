"""A study's tables: every finished step's outputs gathered into runs.csv, matrix/*.csv and study.json (what a
later ``transferlab report`` reads), handed to the report as its inputs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from transferlab import store
from transferlab.device import cpu_model, thread_count
from transferlab.report.study_report import ReportInputs
from transferlab.study.execute import StudyContext
from transferlab.study.plan import TRAIN_KINDS, Step
from transferlab.tables import integer_columns


def collect_results(study: dict, steps: list[Step], out_dir: Path, seconds: float, step_seconds: dict,
                    ctx: StudyContext):
    """Gather every finished step's outputs into the study's tables, write them (runs.csv, matrix/*.csv,
    study.json: what a later ``transferlab report`` reads) and return them as the report's inputs."""

    rows = []
    provenance = {}
    device = None
    for step in steps:
        if step.kind not in TRAIN_KINDS or not step.is_done():
            continue
        info = store.read_run_info(step.output)
        provenance[info["dataset"]["name"]] = info["dataset"]["provenance"]
        device = info.get("device_name", info.get("device"))
        rows.append({
            "name": info["name"], "kind": step.kind,
            "model": info["model"]["family"], "dataset": info["dataset"]["name"],
            "pretrain_dataset": (info.get("lineage") or {}).get("pretrain_dataset"),
            "n": info["dataset"]["subset"]["n"], "freeze": info["freeze"]["n"], "seed": info["seed"],
            "train_accuracy": info["metrics"]["train_accuracy"], "test_accuracy": info["metrics"]["test_accuracy"],
            "duration_s": info["duration_s"], "images_per_second": info["images_per_second"], "device": info["device"],
            "numerics": numerics_label(info.get("numerics")), "step": step.id,
        })
    runs = pd.DataFrame(rows)
    store.atomic_write_text(out_dir / "runs.csv", runs.to_csv(index=False))

    cells, lineage, pairs, examples = _merged_tables(steps, ctx)
    matrix_dir = out_dir / "matrix"
    cells_table = lineage_table = pairs_table = examples_file = None
    if cells:
        matrix_dir.mkdir(parents=True, exist_ok=True)
        cells_table = integer_columns(pd.concat(cells, ignore_index=True))
        store.atomic_write_text(matrix_dir / "cells.csv", cells_table.to_csv(index=False))
        lineage_table = integer_columns(pd.concat(lineage, ignore_index=True)) if lineage else pd.DataFrame()
        store.atomic_write_text(matrix_dir / "lineage.csv", lineage_table.to_csv(index=False))
        if examples is not None:
            examples_file = matrix_dir / "examples.safetensors"
            store.atomic_write_bytes(examples_file, examples.read_bytes())
        if pairs:
            pairs_table = pd.concat(pairs, ignore_index=True)
            store.atomic_write_text(matrix_dir / "pairs.csv", pairs_table.to_csv(index=False))
    previous = {}
    if (out_dir / "study.json").is_file():
        previous = store.read_json(out_dir / "study.json").get("step_seconds", {})
    previous.update(step_seconds)
    record = {
        "study": study["study"]["name"], "description": study["study"]["description"],
        "seeds": study["study"]["seeds"], "device": device or ctx.device, "versions": store.versions(),
        "git_commit": store.git_commit(), "data_provenance": provenance, "wall_time_s": round(seconds, 3),
        "cpu": cpu_model(), "threads": thread_count(),  # the numerics a quoted result needs (README excerpt)
        "step_seconds": previous,
        "steps": [{"id": s.id, "kind": s.kind, "key": s.key, "seconds": previous.get(s.id)} for s in steps],
        "config": {k: v for k, v in study.items() if k != "source_file"},
    }
    store.atomic_write_json(out_dir / "study.json", record)
    return ReportInputs(out_dir, runs, record, None, matrix_dir, cells_table, lineage_table, pairs_table,
                        examples_file)


def numerics_label(numerics: dict | None) -> str | None:
    """'fp32, channels_last, 2 threads': what a run computed with (run.json's numerics), the part of its
    config that moves its floats; runs.csv and the report carry it, since run folders are not committed."""
    if not numerics:
        return None
    threads = numerics.get("threads")
    parts = [numerics.get("precision"), numerics.get("memory_format"),
             None if threads is None else f"{threads} thread{'s' if threads != 1 else ''}"]
    return ", ".join(str(p) for p in parts if p)


def _merged_tables(steps: list[Step], ctx: StudyContext) -> tuple[list, list, list, Path | None]:
    """The cells, lineage and pairs tables of every finished merge step, and the first examples file. Each merge
    wrote its matrix's tables in its own folder: the ones merged in this process are taken as they returned
    them, the others (an earlier run's, or another worker's) are read once."""
    cells, lineage, pairs, examples = [], [], [], None
    for step in steps:
        # Only the study's current attacks: a folder left by an attack since removed from the file is stale.
        if step.kind != "merge" or not step.is_done():
            continue
        folder = step.output.parent
        merged = ctx.merged.get(step.id)
        if merged is not None:
            cells.append(merged.cells)
            lineage.append(merged.lineage)
            pairs.append(merged.pairs)
        elif (folder / "cells.csv").is_file():
            cells.append(pd.read_csv(folder / "cells.csv"))
            if (folder / "lineage.csv").is_file() and (folder / "lineage.csv").stat().st_size > 1:
                lineage.append(pd.read_csv(folder / "lineage.csv"))
            if (folder / "pairs.csv").is_file():
                pairs.append(pd.read_csv(folder / "pairs.csv"))
        if examples is None and (folder / "examples.safetensors").is_file():
            examples = folder / "examples.safetensors"
    return cells, lineage, pairs, examples
