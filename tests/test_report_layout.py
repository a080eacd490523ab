"""The report leads with its answer, labels models by what they are, and stays honest with few units."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from helpers import run_cli
from test_report import make_cells, make_lineage, make_study
from transferlab.report import eps_text, hypothesis_summary, write_matrix_outputs, write_study_report


@pytest.mark.slow  # a study report with its figures
def test_the_first_section_holds_the_answer_and_the_headline_heatmap(tmp_path):
    study = make_study(tmp_path)
    make_lineage().to_csv(study / "matrix" / "lineage.csv", index=False)
    write_study_report(study)
    md = (study / "report.md").read_text()
    first = md.split("## 1. ")[0]
    assert "## Summary" in first and "Question:" in first
    assert "Answer: Too few pretraining runs to tell: accuracy under a target's own source's examples was" in first
    assert re.search(r"was \d+\.\d points lower", first)  # the answer carries its numbers
    assert "with 4 pretraining runs (the unit of the test)" in first
    assert "](matrix/heatmap_pgd_" in first
    html = (study / "report.html").read_text()
    assert '<meta name="viewport"' in html
    assert "section.summary img { max-height: 58vh" in html  # the whole headline heatmap on the first screen
    assert html.index('<section class="summary">') < html.index("1. Pretraining accuracy")
    assert '<div class="scroll"><table>' in html
    details = html[html.index("<details>"):]
    assert "Provenance" in details and "</details>" in details  # provenance folded away


@pytest.mark.slow  # a study report with its figures
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


@pytest.mark.slow  # over 0.7 s on 2 cores: the full suite (--all) runs it
def test_few_units_get_no_interval_that_contradicts_the_exact_test():
    """Below 10 units the interval is the sign-flip test's own: it leaves out 0 exactly when p < 0.05, so it
    never looks significant beside "too few repeats"; with 5 units or fewer (and with one) there is none."""
    import itertools

    from transferlab.report.hypothesis import sign_flip_interval
    from transferlab.stats import sign_flip_test

    lineage = make_lineage(jitter=0.05).query("seed == 0")  # 2 pretraining runs, both clearly negative
    summary = hypothesis_summary(lineage)
    assert summary["units"] == 2 and summary["verdict"] == "too few repeats"
    assert summary["interval"] is None and "interval" not in summary["sentence"] and "CI" not in summary["sentence"]
    one = hypothesis_summary(lineage[lineage["finetuned"] == lineage["finetuned"].iloc[0]])
    assert one["units"] == 1 and one["interval"] is None and "CI" not in one["sentence"]

    six = hypothesis_summary(make_lineage(jitter=0.05, seeds=(0, 1, 2)))  # 2 sources × 3 seeds
    assert six["units"] == 6 and six["interval"] == "sign-flip" and six["verdict"] == "yes"
    assert six["ci_high"] < 0 and "95% sign-flip interval" in six["sentence"]

    rng = np.random.default_rng(0)
    for n, trial in itertools.product((6, 7, 8, 9), range(5)):
        units = rng.normal(-0.04, 0.06, n)
        low, high = sign_flip_interval(units)
        assert low <= units.mean() <= high
        assert (low <= 0 <= high) == (sign_flip_test(units)["p_value"] >= 0.05), (n, trial)
    assert sign_flip_interval(rng.normal(-1, 0.1, 5)) is None  # 2/32 > 0.05: nothing can be rejected


def test_eps_is_written_as_given():
    assert eps_text(8 / 255) == "8/255" and eps_text(0.1) == "0.1" and eps_text(0.25) == "0.25"


@pytest.mark.slow  # a matrix report with its figures
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


def _eps_8_255(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(eps=np.where(np.isclose(frame["eps"], 0.2), 8 / 255, frame["eps"]))


@pytest.mark.slow  # a study report with its figures
def test_eps_is_written_as_given_everywhere_in_a_study_report(tmp_path, monkeypatch):
    """8/255 in the matrix headings, the lineage, by-setting, freeze-sweep and predictor tables and the
    examples figure's title; never 0.0314 or 0.0313725."""
    from transferlab.report import figures

    study = make_study(tmp_path)  # the kmnist source has two freezes (0, 8): the freeze sweep is drawn
    matrix = study / "matrix"
    cells = _eps_8_255(make_cells())
    cells.to_csv(matrix / "cells.csv", index=False)
    _eps_8_255(make_lineage(jitter=0.05)).to_csv(matrix / "lineage.csv", index=False)
    pairs = cells[["crafted_on", "evaluated", "seed"]].drop_duplicates().assign(
        grad_cosine=lambda f: np.linspace(0, 1, len(f)), cka=0.5, param_identical=0.0, param_rel_l2=0.3,
        clean_agreement=0.9)
    pairs.to_csv(matrix / "pairs.csv", index=False)
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(matrix / "examples.safetensors")), str(matrix / "examples.safetensors"),
              metadata={"attack": "pgd", "eps": str(8 / 255)})
    titles = []
    real_figure = figures.Figure

    class RecordingFigure(real_figure):
        def suptitle(self, text, *args, **kwargs):
            titles.append(text)
            return super().suptitle(text, *args, **kwargs)

    monkeypatch.setattr(figures, "Figure", RecordingFigure)
    write_study_report(study, formats=("md",))
    md = (study / "report.md").read_text()
    assert "### pgd, eps = 8/255" in md and "### Transfer vs number of frozen tensors" in md
    assert "### What predicts transfer?" in md
    text = re.sub(r"\]\([^)]*\)", "]()", md)  # file names keep their compact, file-safe eps (0.0314)
    for written in ("0.0314", "0.0313"):
        assert written not in text, written
    for table in ("lineage_tests", "hypothesis_by_setting", "freeze_sweep", "predictors"):
        assert "8/255" in (study / "tables" / f"{table}.csv").read_text(), table
    assert any("eps = 8/255" in title for title in titles), titles


@pytest.mark.slow  # a study report with its figures
def test_by_setting_intervals_name_their_kind_and_one_unit_gets_none(tmp_path):
    study = make_study(tmp_path)
    three = (0, 1, 2)
    make_cells(seeds=three).to_csv(study / "matrix" / "cells.csv", index=False)
    make_lineage(jitter=0.05, seeds=three).to_csv(study / "matrix" / "lineage.csv", index=False)
    write_study_report(study, formats=("md",))
    by_setting = pd.read_csv(study / "tables" / "hypothesis_by_setting.csv")
    # freeze 0: both sources' fine-tunes, 2 x 3 = 6 pretraining runs; freeze 8: only kmnist's, 3 runs.
    f0, f8 = by_setting[by_setting["setting"].str.endswith("freeze 0")], by_setting[by_setting["setting"].str.endswith("freeze 8")]
    assert (f0["pretraining runs"] == 6).all() and f0["95% interval"].str.endswith(" (sign-flip)").all()
    assert (f8["pretraining runs"] == 3).all() and (f8["95% interval"] == "none (too few units)").all()
    assert len(f0) == len(f8) == 2

    one = make_lineage(jitter=0.05).query("seed == 0 and finetuned == 'final_alexnet_kmnist_mnist_f0'")
    one.to_csv(study / "matrix" / "lineage.csv", index=False)
    write_study_report(study, formats=("md",))
    by_setting = pd.read_csv(study / "tables" / "hypothesis_by_setting.csv")
    assert (by_setting["pretraining runs"] == 1).all() and (by_setting["95% interval"] == "none (too few units)").all()
    assert not re.search(r"\bnan\b", (study / "report.md").read_text())
