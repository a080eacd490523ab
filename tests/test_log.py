"""`--log csv|tensorboard|mlflow`: training mirrors each epoch as it is recorded, matrices and studies their final
tables; a tracker never changes a result, and one asked for without its package stops before anything trains."""

from __future__ import annotations

import importlib.util
import json

import pandas as pd
import pytest

from helpers import assert_user_error, run_cli
from test_study import write_study

TRAIN = ["--epochs", "3", "--n", "200", "--batch-size", "50", "--min-steps", "0", "--precision", "fp32",
         "--no-progress"]


@pytest.mark.slow  # trains two runs and an attack matrix through the CLI
def test_training_and_the_matrix_mirror_their_records_to_csv(tmp_path, capsys):
    runs = tmp_path / "runs"
    code, _, err = run_cli(["pretrain", "--model", "mlp", "--dataset", "kmnist-sample", *TRAIN, "--out", runs,
                            "--log", "csv"], capsys)
    assert code == 0, err
    info = json.loads((runs / "pre_mlp_kmnist-sample200_s0" / "run.json").read_text())
    logged = pd.read_csv(runs / "logs" / "pre_mlp_kmnist-sample200_s0" / "metrics.csv")
    history = pd.DataFrame(info["history"])
    assert len(logged) == 3  # one row per epoch, as training recorded it
    pd.testing.assert_frame_equal(logged[history.columns], history, check_dtype=False)
    params = json.loads((runs / "logs" / "pre_mlp_kmnist-sample200_s0" / "params.json").read_text())
    assert params["model"] == "mlp" and params["epochs"] == 3

    # The same run without --log: same weights, same history (a tracker only mirrors).
    code, _, err = run_cli(["pretrain", "--model", "mlp", "--dataset", "kmnist-sample", *TRAIN, "--out",
                            tmp_path / "plain"], capsys)
    assert code == 0, err
    plain = json.loads((tmp_path / "plain" / "pre_mlp_kmnist-sample200_s0" / "run.json").read_text())
    untimed = [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in info["history"]]
    assert [{k: r[k] for k in untimed[0]} for r in plain["history"]] == untimed
    assert plain["metrics"] == info["metrics"]

    code, _, err = run_cli(["finetune", "--from", runs / "pre_mlp_kmnist-sample200_s0", "--dataset", "mnist-sample",
                            *TRAIN, "--freeze", "2", "--out", runs], capsys)
    assert code == 0, err
    matrix = tmp_path / "matrix"
    code, _, err = run_cli(["attack-matrix", "--runs-dir", runs, "--dataset", "mnist-sample", "--attack", "fgsm",
                            "--eps", "0.1", "--samples", "60", "--precision", "fp32", "--out", matrix,
                            "--no-progress", "--log", "csv"], capsys)
    assert code == 0, err
    pd.testing.assert_frame_equal(pd.read_csv(matrix / "logs" / "matrix" / "tables" / "cells.csv"),
                                  pd.read_csv(matrix / "cells.csv"))


@pytest.mark.slow  # the whole TINY study through the CLI (a logged run must execute, so no shared fixture)
def test_a_study_logs_every_run_and_its_tables(tmp_path, capsys):
    study = write_study(tmp_path)
    out = tmp_path / "out"
    code, _, err = run_cli(["run", study, "--out", out, "--no-progress", "--log", "csv"], capsys)
    assert code == 0, err
    run_logs = sorted(p.name for p in (out / "runs" / "logs").iterdir())
    assert run_logs == sorted(p.parent.name for p in (out / "runs").glob("*/run.json"))
    tables = out / "logs" / "tiny" / "tables"
    pd.testing.assert_frame_equal(pd.read_csv(tables / "runs.csv"), pd.read_csv(out / "runs.csv"))
    assert (tables / "cells.csv").is_file()


def test_a_tracker_without_its_package_or_an_unknown_one_stops_before_training(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    args = ["pretrain", "--model", "mlp", "--dataset", "kmnist-sample", *TRAIN, "--out", tmp_path / "runs"]
    assert_user_error([*args, "--log", "mlflow"], capsys, "--log mlflow needs the mlflow package",
                      "pip install mlflow")
    assert_user_error([*args, "--log", "wandb"], capsys, "unknown --log 'wandb'")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*/run.json"))
    study = write_study(tmp_path)
    assert_user_error(["run", study, "--out", tmp_path / "study", "--log", "mlflow"], capsys, "mlflow package")
    assert not (tmp_path / "study").exists()
