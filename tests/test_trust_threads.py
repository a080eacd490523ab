"""Issue 26, item 3: one set of numbers per step. The plan decides each step's torch thread count once (the
driver's OMP_NUM_THREADS, else its cores), keys the step with it and both executors compute with it, so the
local executor and Ray give identical tables at their defaults, and a step made with other threads is redone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from test_study import TINY, write_study
from transferlab.study import load_study, plan

REPO = Path(__file__).resolve().parents[1]
# As tests/test_ray.py: Ray reads RAY_AUTH_MODE when it is imported, and its local heads default to token auth.
os.environ.setdefault("RAY_AUTH_MODE", "token")


@pytest.mark.slow  # over 0.7 s on 2 cores: the full suite (--all) runs it
def test_a_step_made_with_other_threads_is_not_done(tmp_path, monkeypatch):
    from transferlab.study import StudyRunOptions, run_study

    study = write_study(tmp_path, TINY.split("[[finetune]]")[0])  # the two pretrainings
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one = plan(load_study(study), tmp_path / "out")
    assert {s.threads for s in one} == {1}
    run_study(study, tmp_path / "out", StudyRunOptions(progress=False))
    assert all(s.is_done() for s in one if s.kind == "pretrain")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    two = plan(load_study(study), tmp_path / "out")
    assert {s.threads for s in two} == {2} and [s.key for s in one] == [s.key for s in two]
    assert not any(s.is_done() for s in two if s.kind == "pretrain")  # nobody reuses numbers of other threads


def test_execute_step_computes_with_the_planned_threads(tmp_path, monkeypatch):
    import torch

    from transferlab.study import execute as study_mod

    seen = []
    monkeypatch.setattr(study_mod, "_execute_step", lambda step, ctx: seen.append(torch.get_num_threads()) or "")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    step = plan(load_study(write_study(tmp_path, TINY)), tmp_path / "out")[0]
    before = torch.get_num_threads()
    study_mod.execute_step(step, None)
    assert seen == [3] and torch.get_num_threads() == before


def _accuracies(out: Path) -> dict:
    runs = {}
    for path in sorted((out / "runs").glob("*/run.json")):
        info = json.loads(path.read_text())
        runs[info["name"]] = (info["metrics"]["train_accuracy"], info["metrics"]["test_accuracy"])
    return runs


# The quick study's steps (resnets with batch norm, freeze 23, FGSM and PGD) on less data: one fine-tune size,
# fewer pretraining images and scored samples.
QUICK_SMALLEST = ["train.epochs=1", "finetune.epochs=1", "evaluation.samples=100", "pretrain.n=500",
                  "finetune.n=[300]"]


@pytest.mark.ray
@pytest.mark.slow  # resnets: 3.5 min for its first step alone on a 2-core machine at load 16
def test_the_quick_study_gives_the_same_numbers_on_both_executors_at_their_defaults(tmp_path, monkeypatch):
    _same_numbers_on_both_executors(tmp_path, monkeypatch, REPO / "studies" / "quick.toml", QUICK_SMALLEST)


def _same_numbers_on_both_executors(tmp_path, monkeypatch, study, small):
    pytest.importorskip("ray")
    from test_ray import assert_same_tables
    from transferlab.device import thread_count
    from transferlab.executors import RayExecutor
    from transferlab.study import StudyRunOptions, run_study

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the defaults: one thread per core, for both
    # The tables are under test, not the report (rendered from them; 40% of a small study's time): on 2 cores beside
    # another pytest-xdist worker, two threads wait for each other, so every second saved here counts three times.
    monkeypatch.setattr("transferlab.study.write_report", lambda inputs: [])
    local = run_study(study, tmp_path / "local", StudyRunOptions(progress=False, overrides=small))
    on_ray = run_study(study, tmp_path / "ray",
                       StudyRunOptions(progress=False, overrides=small, executor=RayExecutor()))
    assert len(on_ray.executed) == len(local.executed) == len(local.steps)
    assert _accuracies(tmp_path / "local") == _accuracies(tmp_path / "ray")
    assert_same_tables(tmp_path / "local", tmp_path / "ray")
    threads = {json.loads(p.read_text())["numerics"]["threads"] for p in (tmp_path / "ray").glob("runs/*/run.json")}
    assert threads == {thread_count()}
    # That another thread count makes another step is test_a_step_made_with_other_threads_is_not_done.
