"""The report leads with its answer, labels models by what they are, and stays honest with few units."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from helpers import run_cli
from test_report import make_cells, make_lineage, make_study
from transferlab.report import eps_text, hypothesis_summary, write_matrix_outputs, write_study_report


def test_the_first_section_holds_the_answer_and_the_headline_heatmap(tmp_path):
    study = make_study(tmp_path)
    make_lineage().to_csv(study / "matrix" / "lineage.csv", index=False)
    write_study_report(study)
    md = (study / "report.md").read_text()
    first = md.split("## 1. ")[0]
    assert "## Summary" in first and "Question:" in first
    assert "Answer: Yes: adversarial examples crafted on a target's own source lowered its accuracy by" in first
    assert re.search(r"by \d+\.\d points", first)  # the answer carries its numbers
    assert "](matrix/heatmap_pgd_" in first
    html = (study / "report.html").read_text()
    assert '<meta name="viewport"' in html
    assert html.index('<section class="summary">') < html.index("1. Pretraining accuracy")
    assert '<div class="scroll"><table>' in html
    details = html[html.index("<details>"):]
    assert "Provenance" in details and "</details>" in details  # provenance folded away


def test_display_labels_are_used_in_the_heatmaps(tmp_path, monkeypatch):
    from transferlab.report import figures

    seen = []
    real = figures.heatmap_png

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(figures, "heatmap_png", spy)
    write_matrix_outputs(tmp_path, make_cells())
    labels = seen[0]
    assert labels["column_labels"][:2] == ["fmnist source", "kmnist source"]
    assert "kmnist→mnist n=60000 f8" in labels["column_labels"]
    assert labels["row_labels"] == labels["column_labels"]  # one order: white-box cells on the diagonal
    assert np.allclose(labels["clean"].to_numpy(), 0.95)  # the clean-accuracy strip


def test_few_units_get_a_t_interval_not_a_bootstrap():
    lineage = make_lineage(jitter=0.05).query("seed == 0")  # 3 target×seed units
    summary = hypothesis_summary(lineage)
    assert summary["units"] == 3 and summary["interval"] == "t"
    from transferlab.stats import bootstrap_mean_ci

    units = lineage.groupby(["target", "seed"])["difference"].mean().to_numpy()
    boot_low, boot_high = bootstrap_mean_ci(units)
    # Wider than the bootstrap, whose interval cannot leave the range of three numbers.
    assert summary["ci_low"] < boot_low and summary["ci_high"] > boot_high
    one = hypothesis_summary(lineage[lineage["target"] == lineage["target"].iloc[0]])
    assert one["units"] == 1 and one["interval"] is None and "CI" not in one["sentence"]


def test_eps_is_written_as_given():
    assert eps_text(8 / 255) == "8/255" and eps_text(0.1) == "0.1" and eps_text(0.25) == "0.25"


def test_report_works_on_an_attack_matrix_folder(tmp_path, capsys):
    cells = make_cells()
    cells.loc[cells["eps"] == 0.2, "eps"] = 8 / 255
    cells.to_csv(tmp_path / "cells.csv", index=False)
    make_lineage().assign(eps=lambda f: np.where(f["eps"] == 0.2, 8 / 255, f["eps"])).to_csv(
        tmp_path / "lineage.csv", index=False)
    code, out, err = run_cli(["report", tmp_path], capsys)
    assert code == 0, err
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Attack-matrix report")
    assert "Pretraining accuracy" not in md  # no runs.csv: no training sections
    assert "## 1. Attack matrices" in md and "eps = 8/255" in md and "eps = 0.0314" not in md
    assert (tmp_path / "heatmap_pgd_0.0314.png").is_file()
