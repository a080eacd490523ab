"""The report's method note: how the attack-matrix cells were computed.

It reads what each attack matrix recorded in its matrix.json (precision and memory layout
of crafting and of scoring, the label policy applied per crafter, the labels each model is
scored against), so the report states how its numbers were made, not how they usually are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from transferlab.report.doc import Doc


def matrix_records(matrix_dir: Path) -> list[dict]:
    """Every matrix.json under ``matrix_dir`` (a study's matrix/sSEED/ATTACK/ folders, or one matrix output)."""
    matrix_dir = Path(matrix_dir)
    paths = sorted(matrix_dir.glob("s*/*/matrix.json")) + [matrix_dir / "matrix.json"]
    records = []
    for path in paths:
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and "numerics" in record:
            records.append(record)
    return records


def method_table(records: list[dict]) -> pd.DataFrame | None:
    """One row per model and role (crafting / scoring): precision, memory layout, labels."""
    rows = {}
    for record in records:
        numerics = record.get("numerics") or {}
        policies = record.get("label_policy_applied") or {}
        references = record.get("reference_labels") or {}
        for role, label in (("crafting", "crafted on"), ("evaluation", "scored")):
            for model, detail in (numerics.get(role) or {}).items():
                labels = policies.get(model, "-") if role == "crafting" else references.get(model, "-")
                rows[(model, label)] = {"model": model, "role": label, "precision": detail.get("precision", "-"),
                                        "memory layout": detail.get("memory_format", "-"),
                                        "labels": labels if role == "evaluation" else f"attack labels: {labels}"}
    if not rows:
        return None
    # Models computed the same way share one row, so a wide grid still gives a short table.
    frame = pd.DataFrame(sorted(rows.values(), key=lambda r: (r["role"], r["model"])))
    grouped = frame.groupby(["role", "precision", "memory layout", "labels"], sort=False)["model"]
    return grouped.agg(lambda models: ", ".join(models)).reset_index().rename(columns={"model": "models"})[
        ["role", "models", "precision", "memory layout", "labels"]]


def add_method_section(doc: Doc, matrix_dir: Path, level: int = 3) -> None:
    table = method_table(matrix_records(matrix_dir))
    if table is None:
        return
    doc.heading("How the cells were computed", level)
    doc.table(table, name="method", caption=(
        "Crafting (the attack's forward and backward passes) and scoring (clean and adversarial predictions) run "
        "each model in the listed precision and memory layout: one decision per model, measured once per machine "
        "and cached (--precision auto) or as asked (--precision fp32|bf16). Attack labels: 'true' attacks away from the true label, 'pred' away from the crafter's "
        "own prediction (used when the crafter was trained on other classes). A model scored against 'own clean "
        "predictions' has clean accuracy 100 by construction: its cells give the share of predictions the attack "
        "did not change."))
