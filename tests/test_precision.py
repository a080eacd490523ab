"""Precision and layout by measurement: explicit choices, the cached calibration, and where the choice is recorded."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_user_error, run_cli
from transferlab import attacks, device as dev
from transferlab.models import create_model

CPU = torch.device("cpu")
TINY = ["--model", "mlp", "-o", "hidden=[32]", "--dataset", "mnist-sample", "--n", "300", "--epochs", "1",
        "--no-progress", "--device", "cpu"]


@pytest.fixture
def calibrations(monkeypatch, tmp_path):
    """A fresh calibration cache, and the list of calibrations that really timed something."""
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    dev.CalibrationCache.forget_memory()
    seen = []
    monkeypatch.setattr(dev, "CALIBRATION_HOOKS", [lambda key, decision: seen.append((key, decision))])
    # No contention check: on a busy test machine it would (rightly) make decisions provisional and switch
    # threads; tests/test_calibration_contention.py covers that.
    monkeypatch.setattr(dev, "CONTENTION_MIN_STEP_S", float("inf"))
    yield seen
    dev.CalibrationCache.forget_memory()


def conv_net():
    torch.manual_seed(0)
    return create_model("cnn", channels=[4, 8], hidden=16)


def test_fp32_runs_are_bit_identical(tmp_path, capsys):
    for out in ("a", "b"):
        code, _, err = run_cli(["pretrain", *TINY, "--precision", "fp32", "--out", tmp_path / out], capsys)
        assert code == 0, err
    runs = [tmp_path / out / "pre_mlp_mnist-sample300_s0" for out in ("a", "b")]
    weights = [load_file(run / "model.safetensors") for run in runs]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    infos = [json.loads((run / "run.json").read_text()) for run in runs]
    assert infos[0]["metrics"] == infos[1]["metrics"]
    assert infos[0]["numerics"] == {"precision": "fp32", "memory_format": "contiguous", "decided_by": "asked",
                                    "threads": infos[1]["numerics"]["threads"]}
    assert infos[0]["numerics"]["threads"] >= 1
    assert infos[0]["hyperparameters"]["precision"] == "fp32"


def test_auto_calibrates_once_and_caches_on_disk(calibrations):
    model = conv_net()
    first = dev.choose_numerics(model, CPU, "auto", batch_size=16, sample_shape=(1, 28, 28))
    assert len(calibrations) == 1 and first.decided_by == "measured"
    decision = calibrations[0][1]
    # Conv nets measure both layouts in both precisions; the decision carries the timings it came from.
    assert set(decision["step_ms"]) == {"fp32+channels_last", "fp32+contiguous", "bf16+channels_last",
                                        "bf16+contiguous"}
    assert (decision["precision"], decision["channels_last"]) == (first.precision, first.channels_last)
    again = dev.choose_numerics(conv_net(), CPU, "auto", batch_size=16, sample_shape=(1, 28, 28))
    dev.CalibrationCache.forget_memory()  # a new process: only the file remains
    from_disk = dev.choose_numerics(conv_net(), CPU, "auto", batch_size=16, sample_shape=(1, 28, 28))
    assert again == first == from_disk and len(calibrations) == 1
    # Another batch size or workload is another decision.
    dev.choose_numerics(model, CPU, "auto", batch_size=16, sample_shape=(1, 28, 28), workload="attack")
    assert len(calibrations) == 2


def test_calibration_leaves_the_model_untouched(calibrations):
    model = conv_net().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dev.choose_numerics(model, CPU, "auto", batch_size=16, sample_shape=(1, 28, 28))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("content", [b"{not json", b'{"decisions": [1, 2]}', b"\xff\xfe garbage",
                                     b'{"decisions": {"k": {"precision": "fp8"}}}'])
def test_a_corrupt_calibration_cache_is_ignored_and_rewritten(calibrations, tmp_path, content):
    path = tmp_path / "cache" / dev.CALIBRATION_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.warns(RuntimeWarning):
        dev.choose_numerics(conv_net(), CPU, "auto", batch_size=8, sample_shape=(1, 28, 28))
    assert len(calibrations) == 1
    rewritten = json.loads(path.read_text())
    assert len(rewritten["decisions"]) == 1


def test_explicit_precision_skips_the_timing(calibrations):
    for precision in ("fp32", "bf16"):
        numerics = dev.choose_numerics(conv_net(), CPU, precision, batch_size=8, sample_shape=(1, 28, 28))
        assert numerics.precision == precision and numerics.decided_by == "asked" and numerics.channels_last
    assert calibrations == []


def test_bad_precision_is_one_line(tmp_path, capsys):
    assert_user_error(["pretrain", *TINY, "--precision", "fp16", "--out", tmp_path], capsys, "--precision", "fp32")
    assert not any(tmp_path.iterdir())


def test_bf16_crafting_keeps_the_eps_ball():
    model = conv_net().eval()
    images = torch.rand(16, 1, 28, 28)
    labels = torch.randint(0, 10, (16,))
    adversarial = attacks.craft(model, images, labels, "pgd", 0.1, steps=3, precision="bf16")
    attacks.check_eps_ball(images, adversarial, 0.1)
    assert adversarial.dtype == torch.float32 and not torch.equal(adversarial, images)


@pytest.mark.slow  # two trainings and a matrix through the CLI
def test_precision_is_recorded_in_runs_and_matrix_rows(tmp_path, capsys, calibrations):
    runs = tmp_path / "runs"
    code, _, err = run_cli(["pretrain", *TINY, "--out", runs, "--precision", "bf16", "--name", "src"], capsys)
    assert code == 0, err
    info = json.loads((runs / "src" / "run.json").read_text())
    assert info["numerics"]["precision"] == "bf16" and info["numerics"]["decided_by"] == "asked"
    code, _, err = run_cli(["finetune", "--from", runs / "src", "--dataset", "mnist-sample", "--n", "300",
                            "--epochs", "1", "--no-progress", "--device", "cpu", "--out", runs, "--name", "tgt"], capsys)
    assert code == 0, err
    assert json.loads((runs / "tgt" / "run.json").read_text())["numerics"]["decided_by"] == "measured"
    out = tmp_path / "matrix"
    code, _, err = run_cli(["attack-matrix", "--sources", runs / "src", "--targets", runs / "tgt", "--dataset",
                            "mnist-sample", "--attack", "fgsm", "--eps", "0.1", "--samples", "60", "--device", "cpu",
                            "--precision", "fp32", "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    cells = pd.read_csv(out / "cells.csv")
    assert set(cells["craft_numerics"]) == {"fp32+contiguous"} and set(cells["eval_numerics"]) == {"fp32+contiguous"}
    matrix = json.loads((out / "matrix.json").read_text())
    assert matrix["precision"] == "fp32"
    assert {v["precision"] for role in ("crafting", "evaluation") for v in matrix["numerics"][role].values()} == {"fp32"}
