"""Every bad value is caught up front, from each setting's one declaration: on the command line a one-line
error with exit status 2 (before anything trains or is written), in Python a TypeError or ValueError naming the
parameter and what it expects (both transferlab.UserError)."""

from __future__ import annotations

from pathlib import Path

import pytest

import transferlab
from helpers import assert_user_error
from transferlab.study import load_study

STUDY = """
[study]
name = "tiny"
device = "cpu"

[train]
epochs = 1

[[pretrain]]
name = "k"
model = "mlp"
dataset = "kmnist-sample"
n = 400
"""

PRETRAIN = ["pretrain", "--model", "mlp", "--dataset", "kmnist-sample", "--n", "200", "--no-download"]
MATRIX = ["attack-matrix", "--sources", "no-such-run", "--targets", "no-such-target", "--dataset", "mnist-sample"]


@pytest.mark.parametrize("args,fragments", [
    ([*MATRIX, "--eps", ""], ["--eps ''", "empty"]),
    ([*MATRIX, "--attack", ""], ["--attack ''", "empty"]),
    ([*MATRIX, "--sources", ","], ["--sources", "empty"]),
    ([*MATRIX, "--samples", "99999999999999999999"], ["--samples must be at most"]),
    ([*PRETRAIN, "--batch-size", "99999999999999999999"], ["--batch-size must be at most"]),
    ([*PRETRAIN, "--augment-shift", "1000000000"], ["--augment-shift must be at most 32"]),
    ([*PRETRAIN, "--epochs", "10000000"], ["--epochs must be at most"]),
    ([*PRETRAIN, "--min-steps", "-1"], ["--min-steps must be at least 0"]),
    ([*PRETRAIN, "--device", ""], ["unknown device ''"]),
    ([*PRETRAIN, "--log", ""], ["--log '' is empty"]),
    ([*PRETRAIN, "--optimizer", ""], ["unknown --optimizer ''; use one of adam, adamw, sgd"]),
    ([*PRETRAIN, "--precision", "FP16"], ["unknown --precision 'FP16'"]),
])
def test_bad_command_line_values_are_one_line_errors_before_any_work(tmp_path, capsys, args, fragments):
    line = assert_user_error([*args, "--out", tmp_path / "out"], capsys, *fragments)
    assert "Value error" not in line  # our message, not typer's wrapping of it
    assert not (tmp_path / "out").exists()


def test_an_empty_report_format_is_an_error(tmp_path, capsys):
    (tmp_path / "cells.csv").write_text("")
    assert_user_error(["report", tmp_path, "--format", ""], capsys, "--format '' is empty")


@pytest.mark.parametrize("flag", ["--only", "--force", "--step-resources", "--address"])
def test_an_empty_step_glob_is_an_error_not_every_step(tmp_path, capsys, flag):
    (tmp_path / "s.toml").write_text(STUDY)
    assert_user_error(["run", tmp_path / "s.toml", "--dry-run", flag, "", "--out", tmp_path / "out"], capsys,
                      f"{flag} is empty")


def test_a_study_size_past_its_bound_names_its_key(tmp_path):
    (tmp_path / "s.toml").write_text(STUDY)
    with pytest.raises(transferlab.UserError, match=r"train\.batch_size \(from --set\) is invalid: must be at most"):
        load_study(tmp_path / "s.toml", ["train.batch_size=99999999999999999999"])
    with pytest.raises(transferlab.UserError, match=r"pretrain\[0\]\.augment_shift.*must be at most 32"):
        load_study(tmp_path / "s.toml", ["pretrain[0].augment_shift=1000000000"])


@pytest.mark.parametrize("call,error,fragments", [
    (lambda: transferlab.load_dataset(None), TypeError, ["name must be str", "NoneType"]),
    (lambda: transferlab.pretrain(model="mlp", dataset="kmnist-sample", lr="fast"), TypeError,
     ["lr must be a number", "str 'fast'"]),
    (lambda: transferlab.pretrain(model="mlp", dataset="kmnist-sample", epochs=True), TypeError,
     ["epochs must be a whole number", "bool"]),
    (lambda: transferlab.run_study(123), TypeError, ["path must be", "int 123"]),
    (lambda: transferlab.load_run(None), TypeError, ["path must be", "NoneType"]),
    (lambda: transferlab.finetune(dataset="mnist-sample", model="mlp", freeze="2"), TypeError,
     ["freeze must be int or None", "str '2'"]),
    (lambda: transferlab.run_study("quick", overrides="train.epochs=2"), TypeError,
     ["overrides must be a list", "overrides=['train.epochs=2']"]),
    (lambda: transferlab.pretrain(model="mlp", dataset="kmnist-sample", epoch=2), TypeError,
     ["unexpected keyword argument 'epoch'", "did you mean epochs"]),
    (lambda: transferlab.pretrain(model="mlp", dataset="kmnist-sample", optimizer=1), TypeError,
     ["optimizer must be a word"]),
    (lambda: transferlab.pretrain(model="mlp", dataset="kmnist-sample", epochs=0), ValueError,
     ["epochs must be at least 1"]),
    (lambda: transferlab.finetune(dataset="mnist-sample", model="mlp", batch_size=10 ** 20), ValueError,
     ["batch_size must be at most"]),
    (lambda: transferlab.pretrain(model="mlp", dataset="kmnist-sample", optimizer="adamx"), ValueError,
     ["unknown optimizer 'adamx'"]),
    (lambda: transferlab.attack_matrix(dataset="mnist-sample", samples=0), ValueError, ["samples must be at least 1"]),
    (lambda: transferlab.attack_matrix(dataset="mnist-sample", scope="al"), ValueError, ["unknown scope 'al'"]),
    (lambda: transferlab.run_study("quick", only=""), ValueError, ["--only is empty"]),
])
def test_the_api_names_the_parameter_and_what_it_expects(call, error, fragments):
    with pytest.raises(error) as raised:
        call()
    assert isinstance(raised.value, transferlab.UserError)  # the CLI's one-line, exit-2 handling applies
    message = str(raised.value)
    assert "out of range" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_a_whole_config_object_is_checked_too(tmp_path):
    from transferlab.config import TrainConfig

    with pytest.raises(TypeError, match="lr must be a number"):
        transferlab.pretrain(model="mlp", dataset="kmnist-sample", train=TrainConfig(lr="fast"), out=tmp_path)
    with pytest.raises(TypeError, match="train must be TrainConfig or None"):
        transferlab.pretrain(model="mlp", dataset="kmnist-sample", train={"lr": 0.1}, out=tmp_path)
    assert not list(Path(tmp_path).iterdir())
