"""Issue 14, verified against the real CLI: three inputs that ended in a traceback or in a run that every later
command refused (a real full disk's wording, a diverged fit, an option torchattacks rejects only when it runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import assert_user_error, run_cli
from transferlab import store

FAST = ["--epochs", "1", "--min-steps", "0", "--batch-size", "64", "--no-progress", "--device", "cpu"]
PRETRAIN = ["pretrain", "--model", "mlp", "--dataset", "mnist-sample", "--n", "200", *FAST]

# What safetensors 0.8 raises when the disk is full, captured on a 64 KiB tmpfs:
#   SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')
# tests/test_trust.py::test_full_disk_is_one_line_and_a_full_cache_only_warns uses an older wording
# ('IoError(Os { code: 28, ... })'), which store.save_tensors_file's regex `code: (\d+)` understands; this one
# it does not, so the errno becomes EIO, which cli.main does not count as an environment error: a traceback.
REAL_FULL_DISK = "Error while serializing: I/O error: No space left on device (os error 28)"


def test_a_real_full_disk_message_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    import safetensors

    def disk_full(tensors, filename, metadata=None):
        raise safetensors.SafetensorError(REAL_FULL_DISK)

    monkeypatch.setattr(store, "save_file", disk_full)
    assert_user_error([*PRETRAIN, "--out", tmp_path / "runs"], capsys, "No space left on device")


def test_training_that_diverges_to_nan_is_refused_not_saved(tmp_path, capsys):
    # lr 1e12 with SGD: the loss is nan after the first steps and every weight with it. Today the command exits 0
    # and writes a run whose NaN weights every later command refuses ("holds NaN or infinite weights").
    out = tmp_path / "runs"
    code, _, err = run_cli([*PRETRAIN, "--lr", "1e12", "--optimizer", "sgd", "--out", out], capsys)
    assert code == 2 and err.strip().startswith("error: ") and "nan" in err.lower(), (code, err)
    assert not out.exists() or not any(out.iterdir())


def test_an_attack_option_torchattacks_rejects_is_one_line(tmp_path, capsys):
    from transferlab.runs import PretrainRequest, RunOutput, pretrain
    from transferlab.training import TrainConfig

    run = pretrain(PretrainRequest(model="mlp", dataset="mnist-sample", n=100),
                   config=TrainConfig(epochs=1, min_steps=0), device="cpu",
                   output=RunOutput(tmp_path / "runs", progress=False)).run_dir
    out = tmp_path / "m"
    assert_user_error(["attack-matrix", "--sources", run, "--targets", run, "--dataset", "mnist-sample",
                       "--attack", "torchattacks:APGD", "--attack-opt", "loss=nope", "--eps", "0.1", "--samples",
                       "20", "--device", "cpu", "--no-progress", "--out", out], capsys, "loss")
    assert not out.exists() or not any(Path(out).rglob("*.json"))


def test_every_command_a_message_or_doc_names_exists():
    """Issue 14.5: a message named `transferlab matrix`, which does not exist. Every quoted 'transferlab WORD'
    in the package's messages, README.md and docs/ must be a real command."""
    import re

    import typer.main

    from transferlab.cli import app

    root = Path(__file__).resolve().parents[1]
    commands = set(typer.main.get_command(app).commands)
    files = [*sorted((root / "transferlab").rglob("*.py")), root / "README.md", *sorted((root / "docs").glob("*.md"))]
    named = {}
    for path in files:
        for word in re.findall(r"['\"`]transferlab ([a-z][a-z-]*)", path.read_text(encoding="utf-8")):
            named.setdefault(word, path.name)
    assert {"run", "pretrain", "attack-matrix"} <= set(named)
    assert {w: f for w, f in named.items() if w not in commands} == {}
