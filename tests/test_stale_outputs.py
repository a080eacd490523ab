"""A re-run with fewer attacks or eps leaves exactly its own outputs: stale heatmaps and tables go,
a user's own files stay."""

from __future__ import annotations

import pandas as pd
import pytest

from test_report import make_study
from transferlab.report import write_matrix_outputs, write_study_report


@pytest.mark.slow  # writes every figure of a matrix twice
def test_matrix_outputs_of_dropped_settings_are_removed(tmp_path):
    from test_report import make_cells

    cells = make_cells()
    write_matrix_outputs(tmp_path, cells)
    assert (tmp_path / "heatmap_pgd_0.2.png").is_file() and (tmp_path / "matrix_pgd_0.2.tex").is_file()
    (tmp_path / "my_notes.md").write_text("mine")
    (tmp_path / "heatmap_mine.png").write_bytes(b"not ours")

    write_matrix_outputs(tmp_path, cells[cells["eps"] == 0.1])
    names = {p.name for p in tmp_path.iterdir()}
    assert "heatmap_pgd_0.1.png" in names and "matrix_pgd_0.1.csv" in names
    assert not any("0.2" in name for name in names), names
    assert {"my_notes.md", "heatmap_mine.png"} <= names  # never written by the tool: kept


@pytest.mark.slow  # two study reports with their figures
def test_study_report_tables_of_dropped_settings_are_removed(tmp_path):
    study = make_study(tmp_path)
    write_study_report(study)
    assert (study / "tables" / "matrix_pgd_0.2.csv").is_file()
    assert (study / "matrix" / "heatmap_pgd_0.2.png").is_file()
    (study / "tables" / "by_hand.csv").write_text("a\n1\n")

    cells = pd.read_csv(study / "matrix" / "cells.csv")
    cells[cells["eps"] == 0.1].to_csv(study / "matrix" / "cells.csv", index=False)
    write_study_report(study)
    assert not (study / "tables" / "matrix_pgd_0.2.csv").exists()
    assert not (study / "matrix" / "heatmap_pgd_0.2.png").exists()
    assert (study / "tables" / "matrix_pgd_0.1.csv").is_file() and (study / "tables" / "by_hand.csv").is_file()
    assert "heatmap_pgd_0.2" not in (study / "report.md").read_text()


STUDY = """
[study]
name = "stale"
device = "cpu"

[data]
download = false

[train]
epochs = 1
batch_size = 64

[[pretrain]]
name = "f"
model = "mlp"
dataset = "fmnist-sample"
n = 200

[[finetune]]
from = ["f"]
dataset = "mnist-sample"
n = [200]
freeze = [2]

[[attack]]
attack = "fgsm"
eps = [0.1, 0.2]
{more}
[evaluation]
samples = 50
white_box = false
"""


@pytest.mark.slow  # runs a study, then again with less
def test_a_study_rerun_with_fewer_attacks_and_eps_keeps_only_its_outputs(tmp_path):
    from transferlab.study import StudyRunOptions, run_study

    path = tmp_path / "stale.toml"
    path.write_text(STUDY.format(more='[[attack]]\nattack = "pgd"\neps = [0.1]\nsteps = 1\n'))
    out = run_study(path, tmp_path / "out", StudyRunOptions(progress=False)).out_dir
    assert (out / "matrix" / "heatmap_pgd_0.1.png").is_file() and (out / "tables" / "matrix_fgsm_0.2.csv").is_file()

    path.write_text(STUDY.format(more="").replace("eps = [0.1, 0.2]", "eps = [0.1]"))
    run_study(path, out, StudyRunOptions(progress=False))
    cells = pd.read_csv(out / "matrix" / "cells.csv")
    assert set(cells["attack"]) == {"fgsm"} and set(cells["eps"]) == {0.1}  # no rows from the dropped pgd folder
    left = {p.name for p in (out / "matrix").iterdir()} | {p.name for p in (out / "tables").iterdir()}
    assert not any("pgd" in name or "0.2" in name for name in left), left
    assert "pgd" not in (out / "report.md").read_text()
