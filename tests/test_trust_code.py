"""Issue 26, item 8: a trust model for code named in files.

A ``module:factory`` typed by the user (``--model``) runs; one named in a file someone else may have written (a
study file, a run.json read by ``finetune --from``, ``attack-matrix --sources``, ``load_run``) is imported only
with ``--trust-code`` / ``trust_code=True`` / ``TRANSFERLAB_TRUST_CODE``; ``--dry-run`` never calls a factory.
"""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

import helpers
from helpers import assert_user_error, run_cli
from test_study import TINY, write_study
from transferlab.errors import UserError
from transferlab.model_sources import TRUST_ENV

FAST = ["--epochs", "1", "--batch-size", "64", "--no-progress", "--device", "cpu"]

FACTORY = textwrap.dedent('''
    import os
    from torch import nn

    IMPORTED = os.environ.get("TRUST_TEST_MARK")
    if IMPORTED:
        open(IMPORTED, "a").write("imported\\n")

    def make(num_classes, in_channels, image_size):
        mark = os.environ.get("TRUST_TEST_MARK")
        if mark:
            open(mark, "a").write("called\\n")
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))

    def not_a_module(num_classes, in_channels, image_size):
        return "a string"
''')


@pytest.fixture
def untrusted(monkeypatch):
    monkeypatch.setenv(TRUST_ENV, "")  # restored after the test, whatever --trust-code set meanwhile


@pytest.fixture
def user_module(tmp_path, monkeypatch, untrusted):
    monkeypatch.setenv("TRUST_TEST_MARK", str(tmp_path / "mark.txt"))
    yield from helpers.user_module(tmp_path, monkeypatch, "trust_models", FACTORY)


def _marks(tmp_path) -> list[str]:
    mark = tmp_path / "mark.txt"
    return mark.read_text().split() if mark.exists() else []


def test_dry_run_never_calls_a_factory(monkeypatch, tmp_path, capsys, untrusted):
    calls = []
    monkeypatch.setattr(os, "system", lambda *a, **k: calls.append(a) or 0)
    path = write_study(tmp_path, TINY.replace('model = "mlp"', 'model = "os:system"', 1))
    code, out, err = run_cli(["run", path, "--dry-run", "--trust-code", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert calls == []
    assert not (tmp_path / "o").exists()


def test_code_named_in_a_study_file_needs_trust(user_module, tmp_path, capsys):
    sys.modules.pop(user_module, None)
    path = write_study(tmp_path, TINY.replace('model = "mlp"', f'model = "{user_module}:make"', 1))
    assert_user_error(["run", path, "--dry-run", "--out", tmp_path / "o"], capsys, "--trust-code", user_module)
    assert _marks(tmp_path) == []  # not even imported
    code, _, err = run_cli(["run", path, "--dry-run", "--trust-code", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert _marks(tmp_path) == ["imported"]  # imported to check it resolves; never called


def test_a_factory_that_returns_no_module_is_one_line(user_module, tmp_path, capsys):
    assert_user_error(["pretrain", "--model", f"{user_module}:not_a_module", "--dataset", "mnist-sample", "--n",
                       "100", *FAST, "--out", tmp_path / "runs"], capsys, "not a torch nn.Module")


def test_code_named_in_a_run_json_needs_trust(user_module, tmp_path, capsys):
    import transferlab

    # Typed on the command line: the user's own choice, no flag needed.
    code, _, err = run_cli(["pretrain", "--model", f"{user_module}:make", "--dataset", "mnist-sample", "--n", "100",
                            *FAST, "--out", tmp_path / "runs", "--name", "mine"], capsys)
    assert code == 0, err
    run = tmp_path / "runs" / "mine"
    sys.modules.pop(user_module, None)
    (tmp_path / "mark.txt").unlink()
    finetune = ["finetune", "--from", run, "--dataset", "mnist-sample", "--n", "100", *FAST, "--out", tmp_path / "ft"]
    assert_user_error(finetune, capsys, "--trust-code", "run.json")
    assert_user_error(["attack-matrix", "--sources", run, "--targets", run, "--dataset", "mnist-sample", "--eps",
                       "0.1", "--samples", "20", "--device", "cpu", "--no-progress", "--out", tmp_path / "m"],
                      capsys, "--trust-code")
    with pytest.raises(UserError, match="trust_code=True"):
        transferlab.load_run(run)
    assert _marks(tmp_path) == []
    assert not (tmp_path / "ft").exists()
    code, _, err = run_cli([*finetune, "--trust-code"], capsys)
    assert code == 0, err
    assert transferlab.load_run(run).model is not None  # trusted for the rest of the process now


def test_a_trusted_module_list_trusts_only_those(user_module, tmp_path, monkeypatch):
    from transferlab import model_sources

    monkeypatch.setenv(TRUST_ENV, f"other,{user_module}")
    model_sources.check_trusted(f"{user_module}:make", "run.json")
    model_sources.check_trusted(f"{user_module}.sub:make", "run.json")
    with pytest.raises(UserError, match="--trust-code"):
        model_sources.check_trusted("os:system", "run.json")
    model_sources.check_trusted("torchvision:resnet18", "run.json")  # library code: nothing to opt into
