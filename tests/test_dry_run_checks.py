"""A dry run checks what the real run needs (issue 24): every dataset present (or downloadable), the output
folder writable, room on the disk; a study's data_dir is relative to the study file, TRANSFERLAB_DATA and
--data-dir override it."""

from __future__ import annotations

import collections

import pytest

from helpers import assert_user_error, run_cli
from transferlab import preflight

STUDY = """
[study]
name = "needs-data"

[data]
download = false
data_dir = "data"

[[pretrain]]
name = "src"
model = "mlp"
dataset = "kmnist-sample"

[[finetune]]
from = ["src"]
dataset = "mnist"
n = [100]

[[attack]]
attack = "fgsm"
eps = [0.1]

[evaluation]
samples = 10
"""
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


@pytest.fixture
def study(tmp_path, monkeypatch):
    folder = tmp_path / "studies"
    folder.mkdir()
    path = folder / "needs-data.toml"
    path.write_text(STUDY)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the study's folder: data_dir must not depend on the working directory
    monkeypatch.delenv("TRANSFERLAB_DATA", raising=False)
    return path


def _give_mnist(root):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        (raw / name).write_bytes(b"")


def test_dry_run_refuses_missing_data_and_finds_it_beside_the_study(study, capsys):
    line = assert_user_error(["run", study, "--dry-run", "--out", "out"], capsys, "mnist: data files not found")
    assert str(study.parent / "data" / "MNIST" / "raw") in line
    _give_mnist(study.parent / "data")
    code, out, err = run_cli(["run", study, "--dry-run", "--out", "out"], capsys)
    assert code == 0, err
    assert "checked: data for kmnist-sample, mnist present" in out and "MB to write" in out


def test_environment_and_flag_override_the_study_data_dir(study, tmp_path, monkeypatch, capsys):
    _give_mnist(study.parent / "data")
    monkeypatch.setenv("TRANSFERLAB_DATA", str(tmp_path / "machine-data"))
    assert_user_error(["run", study, "--dry-run", "--out", "out"], capsys, str(tmp_path / "machine-data"))
    _give_mnist(tmp_path / "flag-data")
    code, _, err = run_cli(["run", study, "--dry-run", "--out", "out", "--data-dir", tmp_path / "flag-data"], capsys)
    assert code == 0, err


def test_dry_run_checks_the_output_folder_and_the_disk(study, tmp_path, monkeypatch, capsys):
    _give_mnist(study.parent / "data")
    (tmp_path / "a-file").write_text("")
    assert_user_error(["run", study, "--dry-run", "--out", tmp_path / "a-file" / "out"], capsys, "a-file")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))
    assert_user_error(["run", study, "--dry-run", "--out", "out"], capsys, "needs about", "free")


def test_an_npz_copy_in_its_second_folder_counts_as_present(tmp_path):
    # EMNIST byclass is looked for in <data_dir>/emnist-byclass, then beside a torchvision folder as
    # <data_dir>/../npz/emnist-byclass (the layout of ../shared/datasets); the dry run must look where loading does.
    import numpy as np

    root = tmp_path / "datasets" / "torchvision"
    root.mkdir(parents=True)
    assert "emnist-byclass: data files not found" in preflight.missing_data("emnist-byclass", root, download=False)
    folder = tmp_path / "datasets" / "npz" / "emnist-byclass"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        np.savez(folder / f"{split}.npz", x=np.zeros((2, 28, 28), np.uint8), y=np.array([0, 61]))
    assert preflight.missing_data("emnist-byclass", root, download=False) is None


def test_a_finished_study_needs_no_data_and_the_dry_run_says_so(tmp_path):
    # Nothing left to run reads no data: the line names no datasets rather than an empty list.
    line = preflight.check([], {"data": {"canvas": "gray28"}}, tmp_path / "out", None, download=False)
    assert line.startswith("checked: no data needed (no step left to run); ")
