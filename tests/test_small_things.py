"""Small promises: --version, packaged studies, inspect of a run, progress on stderr, dependencies."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from helpers import assert_user_error, run_cli

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version(capsys):
    from transferlab import __version__

    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"transferlab {__version__}"


def test_every_study_file_is_installed_with_the_package():
    data_files = _pyproject()["tool"]["setuptools"]["data-files"]["share/transferlab/studies"]
    shipped = {p for pattern in data_files for p in ROOT.glob(pattern)}
    assert shipped == set((ROOT / "studies").glob("*.toml")) and shipped


def test_packaged_study_is_found_by_name(tmp_path, monkeypatch, capsys):
    from transferlab.packaged import resolve_study

    monkeypatch.chdir(tmp_path)  # no studies/ here: the name must resolve to the packaged file
    assert resolve_study(Path("quick")).read_text() == (ROOT / "studies" / "quick.toml").read_text()
    assert resolve_study(Path("quick.toml")).name == "quick.toml"
    code, out, err = run_cli(["run", "quick", "--dry-run"], capsys)
    assert code == 0, err
    assert "pretrain/" in out
    assert_user_error(["run", "quik"], capsys, "quik", "did you mean quick")


def test_tabulate_is_not_a_dependency():
    assert not any(d.startswith("tabulate") for d in _pyproject()["project"]["dependencies"])


def test_inspect_a_run_shows_its_recorded_freeze_and_progress_goes_to_stderr(tmp_path, capsys):
    from transferlab.runs import FinetuneRequest, PretrainRequest, RunOutput, finetune, pretrain
    from transferlab.training import TrainConfig

    tiny = dict(config=TrainConfig(epochs=1, batch_size=64), device="cpu")
    source = pretrain(PretrainRequest(model="mlp", dataset="fmnist-sample", n=100),
                      output=RunOutput(tmp_path, progress=False), **tiny).run_dir
    capsys.readouterr()
    target = finetune(FinetuneRequest(dataset="mnist-sample", source=source, n=100, freeze_n=2),
                      output=RunOutput(tmp_path, progress=True), **tiny).run_dir
    out, err = capsys.readouterr()
    assert out == "" and "loss nan" not in err  # progress is on stderr, and never shows a nan loss
    code, out, _ = run_cli(["inspect", target], capsys)
    assert code == 0
    assert "2 frozen" in out and "as trained: freeze 2" in out
    code, out, _ = run_cli(["inspect", target, "--freeze", "0"], capsys)
    assert "0 frozen" in out  # an explicit --freeze still wins
