"""Issue 12's experiment tracking, drafted as transferlab/tracking.py (not wired into the CLI yet): per-epoch
metrics and final tables to CSV always, to TensorBoard / MLflow when those packages are installed."""

from __future__ import annotations

import importlib.util
import json

import pandas as pd
import pytest

from transferlab import tracking
from transferlab.errors import UserError


@pytest.fixture(scope="module")
def run_and_matrix(tmp_path_factory):
    from transferlab.matrix import run_matrix
    from transferlab.runs import PretrainRequest, RunOutput, pretrain
    from transferlab.training import TrainConfig

    root = tmp_path_factory.mktemp("tracked")
    run = pretrain(PretrainRequest(model="mlp", dataset="mnist-sample", n=100),
                   config=TrainConfig(epochs=3, batch_size=50, min_steps=0, val_fraction=0.2), device="cpu",
                   output=RunOutput(root / "runs", progress=False)).run_dir
    run_matrix(sources=[run], targets=[run], dataset="mnist-sample", attack_names=["fgsm"], eps_values=[0.1],
               samples=30, device="cpu", out_dir=root / "m", progress=False)
    return run, root / "m"


def test_csv_gets_one_row_per_epoch_and_the_final_tables(run_and_matrix, tmp_path):
    run, matrix = run_and_matrix
    folder = tracking.export_run(run, "csv", tmp_path / "logs")
    history = json.loads((run / "run.json").read_text())["history"]
    metrics = pd.read_csv(folder / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2, 3] and len(history) == 3
    assert metrics["loss"].tolist() == pytest.approx([h["loss"] for h in history])
    assert "val_accuracy" in metrics.columns
    assert json.loads((folder / "params.json").read_text())["epochs"] == 3
    tables = tracking.export_matrix(matrix, "csv", tmp_path / "logs", name="m")
    pd.testing.assert_frame_equal(pd.read_csv(tables / "tables" / "cells.csv"), pd.read_csv(matrix / "cells.csv"))
    assert (tables / "tables" / "pairs.csv").is_file()


def test_the_tracker_is_the_hook_training_would_call(tmp_path):
    with tracking.Tracker("csv", tmp_path, "live") as tracker:
        for epoch in (1, 2):
            tracker.log_epoch({"epoch": epoch, "loss": 1.0 / epoch, "lr": 0.001})
            assert len(pd.read_csv(tmp_path / "live" / "metrics.csv")) == epoch  # readable while training runs
    with pytest.raises(UserError, match="not a name"):
        tracking.Tracker("csv", tmp_path, "../escape")
    assert tracking.Tracker(None, tmp_path, "off").backends == []


def test_unknown_or_missing_backends_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="unknown --log 'wandb'"):
        tracking.parse_kinds("csv,wandb")
    assert tracking.parse_kinds(["csv", "csv,tensorboard"]) == ["csv", "tensorboard"]
    for kind, module in (("tensorboard", "tensorboard"), ("mlflow", "mlflow")):
        if importlib.util.find_spec(module) is None:
            with pytest.raises(UserError, match=f"pip install {module}"):
                tracking.Tracker(kind, tmp_path, "x")


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_gets_scalars(run_and_matrix, tmp_path):
    run, _ = run_and_matrix
    folder = tracking.export_run(run, "tensorboard", tmp_path)
    assert any((folder / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_mlflow_gets_metrics(run_and_matrix, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run, _ = run_and_matrix
    tracking.export_run(run, "mlflow", tmp_path)
    assert any((tmp_path / json.loads((run / "run.json").read_text())["name"] / "mlruns").rglob("loss"))
