"""Run names identify their source, and a finished run is never silently replaced by a different one."""

from __future__ import annotations

import pytest

from helpers import assert_user_error, run_cli
from transferlab.runs import FinetuneRequest, PretrainRequest, RunOutput, finetune, pretrain
from transferlab.training import TrainConfig

TINY = dict(config=TrainConfig(epochs=1, batch_size=64), device="cpu")


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    runs = tmp_path_factory.mktemp("names")
    # Same model, dataset and seed, different subsets: the case that used to collide.
    return [pretrain(PretrainRequest(model="mlp", dataset="fmnist-sample", n=n),
                     output=RunOutput(runs, progress=False), **TINY).run_dir
            for n in (100, 200)]


def test_fine_tunes_of_different_sources_never_share_a_directory(two_sources, tmp_path):
    a, b = (finetune(FinetuneRequest(dataset="mnist-sample", source=s, n=100, freeze_n=2),
                     output=RunOutput(tmp_path, progress=False), **TINY).run_dir
            for s in two_sources)
    assert a != b and a.is_dir() and b.is_dir()
    assert a.name == "final_mlp_fmnist-sample100_mnist-sample100_f2_s0"
    assert b.name == "final_mlp_fmnist-sample200_mnist-sample100_f2_s0"


def test_a_different_finished_run_is_not_replaced_without_force(two_sources, tmp_path, capsys):
    first, second = two_sources
    common = ["finetune", "--dataset", "mnist-sample", "--n", "100", "--freeze", "2", "--epochs", "1",
              "--device", "cpu", "--no-progress", "--out", tmp_path, "--name", "mine"]
    assert run_cli(common + ["--from", first], capsys)[0] == 0
    weights = (tmp_path / "mine" / "model.safetensors").read_bytes()
    line = assert_user_error(common + ["--from", second], capsys, "already holds a different finished run", "--force")
    assert "source" in line
    assert (tmp_path / "mine" / "model.safetensors").read_bytes() == weights  # untouched
    # The same run again may replace itself; --force replaces a different one.
    assert run_cli(common + ["--from", first], capsys)[0] == 0
    assert run_cli(common + ["--from", second, "--force"], capsys)[0] == 0
    assert str(second.name) in (tmp_path / "mine" / "run.json").read_text()
