"""Issue 26, item 1: checkpoints are verified by content.

The corruption matrix: a run's ``model.safetensors`` is bit-flipped (inside a tensor, so safetensors still
parses it), truncated, or swapped for another run's weights of the same architecture; every command that
loads it (``finetune --from``, ``attack-matrix --sources``, ``inspect``, the API's ``load_run``) must refuse
it with one line naming the run (exit 2), and a study must train the step again with a warning.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from helpers import assert_user_error
from transferlab import store
from transferlab.errors import UserError

FAST = ["--epochs", "1", "--batch-size", "64", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="session")
def two_runs(tmp_path_factory):
    """Two finished MLP runs of one architecture (different seeds), trained once for the whole session."""
    from transferlab.runs import PretrainRequest, RunOutput, pretrain
    from transferlab.training import TrainConfig

    runs = tmp_path_factory.mktemp("trust-runs")
    made = [pretrain(PretrainRequest(model="mlp", dataset="mnist-sample", n=200), seed=seed,
                     config=TrainConfig(epochs=1, batch_size=64), device="cpu",
                     output=RunOutput(runs, progress=False)).run_dir for seed in (0, 1)]
    return made


def _copy(run_dir: Path, where: Path) -> Path:
    target = where / run_dir.name
    shutil.copytree(run_dir, target)
    return target


def _flip_bit(run_dir: Path, other: Path) -> None:
    weights = run_dir / store.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # the last tensor's bytes: the header still parses, the file still loads
    weights.write_bytes(bytes(data))


def _truncate(run_dir: Path, other: Path) -> None:
    weights = run_dir / store.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-64])


def _swap(run_dir: Path, other: Path) -> None:
    shutil.copyfile(other / store.WEIGHTS_FILE, run_dir / store.WEIGHTS_FILE)


CORRUPTIONS = {"bit-flipped": _flip_bit, "truncated": _truncate, "swapped": _swap}


def test_run_json_records_the_weights_checksum(two_runs):
    info = json.loads((two_runs[0] / store.RUN_FILE).read_text())
    assert info[store.FILES_SHA256][store.WEIGHTS_FILE] == store.file_sha256(two_runs[0] / store.WEIGHTS_FILE)


def _finetune(run_dir, tmp_path):
    return ["finetune", "--from", run_dir, "--dataset", "mnist-sample", "--n", "100", *FAST, "--out", tmp_path / "ft"]


def _matrix(run_dir, tmp_path):
    return ["attack-matrix", "--sources", run_dir, "--targets", run_dir, "--dataset", "mnist-sample", "--eps", "0.1",
            "--samples", "20", "--device", "cpu", "--no-progress", "--out", tmp_path / "m"]


def _inspect(run_dir, tmp_path):
    return ["inspect", run_dir]


COMMANDS = {"finetune --from": _finetune, "attack-matrix --sources": _matrix, "inspect": _inspect}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_damaged_or_swapped_checkpoint_is_refused_by_every_command(two_runs, tmp_path, capsys, corruption,
                                                                     command):
    run = _copy(two_runs[0], tmp_path)
    CORRUPTIONS[corruption](run, two_runs[1])
    line = assert_user_error(COMMANDS[command](run, tmp_path), capsys, run.name)
    assert "checkpoint" in line
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_the_api_load_run_refuses_a_damaged_or_swapped_checkpoint(two_runs, tmp_path, corruption):
    import transferlab

    run = _copy(two_runs[0], tmp_path)
    CORRUPTIONS[corruption](run, two_runs[1])
    with pytest.raises(UserError, match=run.name):
        transferlab.load_run(run)


@pytest.mark.slow  # over 0.7 s on 2 cores: the full suite (--all) runs it
def test_the_matrix_refuses_a_swapped_source_even_when_its_cells_are_cached(two_runs, tmp_path, capsys):
    """A finished matrix re-run loads no model (every cell is cached): the check must not ride on loading."""
    from helpers import run_cli

    run = _copy(two_runs[0], tmp_path)
    code, _, err = run_cli(_matrix(run, tmp_path), capsys)
    assert code == 0, err
    _swap(run, two_runs[1])
    assert_user_error(_matrix(run, tmp_path), capsys, run.name, "checkpoint")


def test_a_run_without_a_recorded_checksum_loads_with_a_warning(two_runs, tmp_path):
    """Runs written before checksums were recorded stay usable (unverified), and say so."""
    run = _copy(two_runs[0], tmp_path)
    info = json.loads((run / store.RUN_FILE).read_text())
    del info[store.FILES_SHA256]
    (run / store.RUN_FILE).write_text(json.dumps(info))
    with pytest.warns(UserWarning, match="no checksum"):
        store.load_run(run)


STUDY = """
[study]
name = "trust"
seeds = [0]
device = "cpu"

[data]
download = false

[train]
epochs = 1
batch_size = 64
min_steps = 0

[[pretrain]]
name = "k"
model = "mlp"
dataset = "kmnist-sample"
n = 100
"""


@pytest.mark.parametrize("corruption", ["bit-flipped", "swapped"])
def test_a_study_trains_a_damaged_step_again_with_a_warning(two_runs, tmp_path, corruption):
    from transferlab.study import StudyRunOptions, run_study

    path = tmp_path / "study.toml"
    path.write_text(STUDY)
    out = tmp_path / "out"
    run_study(path, out, StudyRunOptions(progress=False))
    run = out / "runs" / "pre_k_s0"
    good = (run / store.WEIGHTS_FILE).read_bytes()
    CORRUPTIONS[corruption](run, two_runs[1])
    with pytest.warns(UserWarning, match="pretrain/k/s0 is done again"):
        run_study(path, out, StudyRunOptions(progress=False))
    assert (run / store.WEIGHTS_FILE).read_bytes() == good  # trained again: the same seed, the same weights
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store.load_run(run)
