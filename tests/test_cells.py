"""The cells table is prepared once per report, and a study hands its report the tables its merges returned."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest

from test_report import make_cells, make_lineage
from transferlab.report.cells import Cells
from transferlab.report.study_report import ReportInputs, write_report
from transferlab.report import write_matrix_outputs


@pytest.fixture
def prepare_calls(monkeypatch):
    """Counts Cells.prepare: the one place a cells table is checked and cast."""
    calls = []
    real = Cells.prepare.__func__

    def counting(cls, cells):
        calls.append(len(cells))
        return real(cls, cells)

    monkeypatch.setattr(Cells, "prepare", classmethod(counting))
    return calls


@pytest.mark.slow  # over 0.7 s on 2 cores: the full suite (--all) runs it
def test_matrix_outputs_prepare_the_cells_once(tmp_path, prepare_calls):
    cells = make_cells().query("eps == 0.1")  # one setting is enough to draw every kind of output once
    written = write_matrix_outputs(tmp_path, cells, make_lineage())
    assert any(p.name.startswith("heatmap_") for p in written)  # several settings, tables and figures drawn
    assert prepare_calls == [len(cells)]


@pytest.mark.slow  # over 0.7 s on 2 cores: the full suite (--all) runs it
def test_a_report_prepares_the_cells_once(tmp_path, prepare_calls):
    cells = make_cells().query("eps == 0.1")
    inputs = ReportInputs(tmp_path, None, {}, None, tmp_path / "matrix", cells, make_lineage())
    write_report(inputs, formats=("md",))
    assert (tmp_path / "report.md").is_file()
    assert prepare_calls == [len(cells)]


def test_prepared_cells_pass_through_and_preparing_again_changes_nothing():
    raw = make_cells()
    raw = raw.assign(steps=[10 if i % 2 else 40 for i in range(len(raw))], white_box=raw["white_box"].astype(str))
    cells = Cells.prepare(raw)
    assert Cells.of(cells) is cells
    assert cells.frame["white_box"].dtype == bool and set(cells.frame["attack"]) == {"pgd_k10", "pgd_k40"}
    pd.testing.assert_frame_equal(Cells.prepare(cells.frame).frame, cells.frame)


def test_collect_results_takes_the_tables_a_merge_in_this_process_returned(tmp_path):
    """The merge wrote no cells.csv here: a collect that read the disk would find no matrix at all."""
    from transferlab.study import StudyContext, Step, collect_results
    from transferlab.tables import MATRIX_SCHEMA

    folder = tmp_path / "matrix" / "s0" / "pgd"
    folder.mkdir(parents=True)
    (folder / "matrix.json").write_text(json.dumps({"step_key": "k", "schema": MATRIX_SCHEMA}))
    merge = Step("merge/s0/pgd", "merge", {}, key="k", output=folder / "matrix.json")
    cells, lineage = make_cells(), make_lineage()
    pairs = pd.DataFrame({"crafted_on": ["a"], "evaluated": ["b"]})
    study = {"study": {"name": "t", "description": "", "seeds": [0]}}
    ctx = StudyContext(study, tmp_path, "cpu", None, False, {merge.id: merge})
    ctx.merged[merge.id] = SimpleNamespace(cells=cells, lineage=lineage, pairs=pairs)
    inputs = collect_results(study, [merge], tmp_path, 1.0, {}, ctx)
    pd.testing.assert_frame_equal(inputs.cells.frame, Cells.prepare(cells).frame)
    assert len(inputs.lineage) == len(lineage) and inputs.pairs.equals(pairs)
    assert len(pd.read_csv(tmp_path / "matrix" / "cells.csv")) == len(cells)  # still written for `report`
