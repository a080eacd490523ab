"""Regenerate the README's quick-study example: results/examples/quick and the excerpt quoted in README.

    python scripts/quick_excerpt.py --run      # runs studies/quick.toml into results/examples/quick with the
                                               # pinned numerics, then rewrites the README block (one command)
    python scripts/quick_excerpt.py            # only rewrites the block between the quick-excerpt markers
    python scripts/quick_excerpt.py --print    # prints it instead

Pinned numerics: studies/quick.toml asks for fp32 (channels_last for the conv nets) for training, crafting and
scoring, and this script runs it on ONE thread (OMP_NUM_THREADS=1): a single thread's float reductions run in
the same order on a 2-core laptop and a 64-core server, so the numbers depend only on the CPU's kernels, and
the excerpt names the CPU model that made it. tests/test_readme_results.py reruns the study under the same
numerics and compares at the reported digits.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- quick-excerpt:start -->", "<!-- quick-excerpt:end -->"
ATTACK, EPS = "pgd", 0.1
RESULTS = ROOT / "results" / "examples" / "quick"  # committed; `transferlab run` writes results/quick by default
THREADS = 1  # pinned: see the module docstring


def _short(dataset: str) -> str:
    return str(dataset).split("-")[0]


def _label(row: pd.Series, side: str) -> str:
    if row[f"{side}_role"] == "pretrained":
        return f"{_short(row[f'{side}_dataset'])} source"
    return f"{_short(row[f'{side}_pretrain_dataset'])}→{_short(row[f'{side}_dataset'])} {int(row['evaluated_n'])}"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def excerpt(results: Path = RESULTS) -> str:
    from transferlab.report.matrices import read_cells

    cells = read_cells(results / "matrix" / "cells.csv")  # a schema-3 table is read in the new column names
    cells = cells[(cells["attack"] == ATTACK) & (cells["eps"].round(6) == EPS)]
    study = json.loads((results / "study.json").read_text())
    matrix = json.loads(next((results / "matrix").glob(f"s0/{ATTACK}*/matrix.json")).read_text())
    precision = sorted({v["precision"] for v in matrix["numerics"]["evaluation"].values()})
    layout = sorted({v["memory_format"] for v in matrix["numerics"]["evaluation"].values()})
    cells = cells.assign(row=[_label(r, "crafted_on") for _, r in cells.iterrows()],
                         column=[_label(r, "evaluated") for _, r in cells.iterrows()])
    tuned = cells[cells["evaluated_role"] == "finetuned"]
    targets = tuned.sort_values(["evaluated_pretrain_dataset", "evaluated_n"],
                                ascending=[True, False])["column"].unique().tolist()
    sources = sorted(cells.loc[cells["evaluated_role"] == "pretrained", "column"].unique())
    columns = targets + sources
    rows = sorted(cells["row"].unique())
    steps = int(cells["steps"].dropna().iloc[0]) if cells["steps"].notna().any() else None
    samples = int(cells["samples"].iloc[0])
    trained = sorted({(r["precision"], r["memory_format"]) for r in _run_numerics(results)})
    threads = study.get("threads", THREADS)
    lines = [
        f"Made by `python scripts/quick_excerpt.py --run` (`transferlab run studies/quick.toml` with its pinned "
        f"numerics) on an {study.get('cpu') or _cpu()} CPU, {threads} thread; the full report is in "
        f"[`results/examples/quick/report.md`](results/examples/quick/report.md). {ATTACK.upper()} at eps {EPS} "
        f"({steps} steps, {samples} MNIST-sample test images; trained under "
        f"{' / '.join(f'{p}, {m}' for p, m in trained) or '?'}; scored under {' / '.join(precision)}, "
        f"{' / '.join(layout)}; {threads} thread), adversarial accuracy in %; rows: the source the examples were crafted on; "
        "italic: the target was fine-tuned from that source; bold: white-box. The source columns are scored "
        "against their own clean predictions (their classes are not digits), so their clean accuracy is 100 by "
        "construction.",
        "",
        "| crafted on \\ evaluated | " + " | ".join(columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for row in rows:
        shown = []
        for column in columns:
            cell = cells[(cells["row"] == row) & (cells["column"] == column)].iloc[0]
            value = f"{100 * cell['adversarial_accuracy']:.1f}"
            shown.append(f"**{value}**" if cell["white_box"] else f"_{value}_" if cell["same_pretraining"] else value)
        lines.append(f"| {row} | " + " | ".join(shown) + " |")
    clean = [f"{100 * cells.loc[cells['column'] == c, 'clean_accuracy'].iloc[0]:.1f}" for c in columns]
    lines.append("| clean accuracy | " + " | ".join(clean) + " |")
    return "\n".join(lines)


def _run_numerics(results: Path) -> list[dict]:
    """Each trained run's numerics (run.json; the runs are not committed, so empty in a fresh clone)."""
    return [json.loads(p.read_text())["numerics"] for p in sorted((results / "runs").glob("*/run.json"))]


def run_quick_study() -> None:
    """`transferlab run studies/quick.toml --out results/examples/quick` on THREADS thread(s)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    # From an empty folder: an older plan's files (eval receipts of steps that no longer exist) must not stay
    # committed beside the new ones.
    shutil.rmtree(RESULTS, ignore_errors=True)
    # Relative paths, from the repository root: the committed tables name their runs as results/examples/quick/...
    subprocess.run([sys.executable, "-m", "transferlab.cli", "run", "studies/quick.toml", "--out",
                    str(RESULTS.relative_to(ROOT)), "--no-progress"], check=True, env=env, cwd=ROOT)


def main() -> None:
    if "--run" in sys.argv:
        run_quick_study()
    block = excerpt()
    if "--print" in sys.argv:
        print(block)
        return
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        sys.exit(f"README.md lacks the {START} / {END} markers")
    text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: f"{START}\n{block}\n{END}", text,
                  flags=re.S)
    readme.write_text(text, encoding="utf-8")
    print("README.md quick-study excerpt rewritten")


if __name__ == "__main__":
    main()
