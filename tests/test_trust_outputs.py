"""Issue 26: ``--log`` targets are checked before training, and the matrix summary counts a rebuilt set."""

from __future__ import annotations

import re

import pytest

from helpers import assert_user_error, run_cli
from test_trust_checkpoints import FAST, two_runs  # noqa: F401 - the session's trained runs

PRETRAIN = ["pretrain", "--model", "mlp", "--dataset", "mnist-sample", "--n", "200", *FAST]


def test_log_into_a_file_fails_before_training(tmp_path, capsys, monkeypatch):
    from transferlab import runs

    out = tmp_path / "out"
    out.mkdir()
    (out / "logs").write_text("not a folder")

    def no_training(*args, **kwargs):
        raise AssertionError("trained although the log folder is a file")

    monkeypatch.setattr(runs, "fit", no_training)
    assert_user_error([*PRETRAIN, "--out", out, "--log", "csv"], capsys, "logs")
    assert sorted(p.name for p in out.iterdir()) == ["logs"]


def test_log_into_a_file_fails_before_the_matrix(two_runs, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "m"
    out.mkdir()
    (out / "logs").write_text("not a folder")
    assert_user_error(["attack-matrix", "--sources", two_runs[0], "--targets", two_runs[1], "--dataset",
                       "mnist-sample", "--eps", "0.1", "--samples", "20", "--device", "cpu", "--no-progress",
                       "--out", out, "--log", "csv"], capsys, "logs")
    assert sorted(p.name for p in out.iterdir()) == ["logs"]


def _counts(text: str) -> tuple[int, int]:
    found = re.search(r"(\d+) adversarial sets crafted, (\d+) reused", text)
    assert found, text
    return int(found.group(1)), int(found.group(2))


@pytest.mark.slow  # over 0.7 s on 2 cores: the full suite (--all) runs it
def test_a_rebuilt_adversarial_set_is_counted_as_crafted(two_runs, tmp_path, capsys):  # noqa: F811
    matrix = ["attack-matrix", "--sources", two_runs[0], "--targets", two_runs[1], "--dataset", "mnist-sample",
              "--attack", "fgsm", "--eps", "0.1", "--samples", "20", "--no-white-box", "--device", "cpu",
              "--no-progress", "--out", tmp_path / "m"]
    code, out, err = run_cli(matrix, capsys)
    assert code == 0, err
    assert _counts(out) == (1, 0)
    code, out, err = run_cli(matrix, capsys)
    assert _counts(out) == (0, 1)
    (damaged,) = (tmp_path / "m" / "adversarial").glob("*.safetensors")
    damaged.write_bytes(damaged.read_bytes()[:-16])
    with pytest.warns(UserWarning):
        code, out, err = run_cli(matrix, capsys)
    assert code == 0, err
    assert _counts(out) == (1, 0)
