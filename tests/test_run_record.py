"""run.json is a typed record (records.RunRecord), written exactly once per run, inside the run's staging folder,
with the study's step key: a killed run can never leave a run.json without its key or a key without its run."""

from __future__ import annotations

import builtins
import io
import json
from pathlib import Path

import pytest

from test_study import write_study
from transferlab.errors import UserError
from transferlab.names import STAGING_PATTERN
from transferlab.records import RunRecord
from transferlab.study import StudyRunOptions, run_study


@pytest.mark.slow  # runs the whole TINY study
def test_run_json_is_written_once_per_run_inside_staging_with_its_step_key(tmp_path, monkeypatch):
    writes: list[Path] = []
    real_open = builtins.open

    def recording_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, Path)) and Path(file).name == "run.json" and any(m in mode for m in "wax+"):
            writes.append(Path(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    monkeypatch.setattr(io, "open", recording_open)
    outcome = run_study(write_study(tmp_path), tmp_path / "out", StudyRunOptions(progress=False))
    runs = sorted((tmp_path / "out" / "runs").glob("*/run.json"))
    assert len(runs) == 6
    assert sorted(w.parent.parent / _final_name(w.parent.name) for w in writes) == sorted(r.parent for r in runs)
    assert all(STAGING_PATTERN.fullmatch(w.parent.name) for w in writes), writes  # never the final folder
    steps = {s.output: s for s in outcome.steps}
    for path in runs:
        record = RunRecord.from_json(json.loads(path.read_text()))
        assert record.step_key == steps[path.parent].key and record.step_id == steps[path.parent].id


def _final_name(staging: str) -> str:
    """'.pre_k_s0.1a2b3c4d.tmp' -> 'pre_k_s0'."""
    return staging[1:].rsplit(".", 2)[0]


def test_a_record_round_trips_and_a_foreign_one_is_a_one_line_error():
    record = RunRecord(kind="pretrain", name="pre_x_s0", model={"family": "mlp", "config": {}}, seed=0,
                       dataset={"name": "kmnist", "label_space": "kmnist"}, freeze={"n": 0},
                       lineage={"pretrain_dataset": "kmnist"}, step_key="abc")
    data = record.to_json()
    assert "imported_from" not in data and data["source"] is None  # optional keys only when they apply
    assert RunRecord.from_json(json.loads(json.dumps(data))) == record
    assert record.family == "mlp" and record.pretrain_dataset == "kmnist" and record.source_sha256 is None
    with pytest.raises(UserError, match="not a transferlab run record"):
        RunRecord.from_json({"name": "x"})
    with pytest.raises(UserError, match="not a transferlab run record"):
        RunRecord.from_json({**data, "kind": "mystery"})
