"""Say what changed (issue 24): the step budget's epoch raise is one line, accuracies say which split and
mode, and --force's help says what forcing a merge step does (tested against the plan)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from typer.testing import CliRunner

from helpers import run_cli
from transferlab import training
from transferlab.cli import app
from transferlab.models import create_model
from transferlab.training import TrainConfig, fit

ROOT = Path(__file__).resolve().parent.parent


def test_raising_the_epochs_for_the_step_budget_is_one_line(capsys):
    images = torch.randint(0, 256, (128, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(128) % 10
    config = TrainConfig(epochs=1, batch_size=64, min_steps=6, precision="fp32")
    result = fit(create_model("mlp", hidden=[8]), images, labels, config, torch.device("cpu"), progress=False)
    assert result.epochs_used == 3
    lines = [line for line in capsys.readouterr().err.splitlines() if "raised" in line]
    assert lines == ["--epochs 1 raised to 3 for 6 optimizer steps (6 in all); --min-steps 0 keeps 1"]
    fit(create_model("mlp", hidden=[8]), images, labels, TrainConfig(epochs=3, batch_size=64, min_steps=6,
                                                                      precision="fp32"),
        torch.device("cpu"), progress=False)
    assert "raised" not in capsys.readouterr().err  # nothing changed, nothing said


def test_progress_bar_and_summary_say_which_accuracy():
    columns = [getattr(c, "text_format", "") for c in training._progress_bar(True).columns]
    assert any("train acc (train mode)" in text for text in columns), columns
    from transferlab.runs import RunOutcome

    info = {"name": "pre_x", "metrics": {"train_accuracy": 0.9, "test_accuracy": 0.8}, "duration_s": 1.0,
            "images_per_second": 10.0, "device": "cpu"}
    summary = RunOutcome(Path("x"), info).summary()
    assert "(eval mode) on the train split 90.00%, on the test split 80.00%" in summary


def _forced(capsys, glob: str) -> set[str]:
    code, out, err = run_cli(["run", str(ROOT / "studies" / "quick.toml"), "--dry-run", "--force", glob,
                              "--out", "unused"], capsys)
    assert code == 0, err
    return {m.group(1) for m in re.finditer(r"│\s*\d+\s*│\s*(\S+)\s*│\s*\w+\s*│\s*forced\s*│", out)}


def test_force_does_what_its_help_says(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    help_text = " ".join(CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output.split())
    help_text = re.sub(r"[│ ]+", " ", help_text)
    assert "every step that depends on them" in help_text
    assert "forcing a merge step (merge/*) redoes its whole attack matrix" in help_text
    # A training step: it and its dependants (the fine-tunes from it, the matrices), not the other source.
    forced = _forced(capsys, "pretrain/kmnist-resnet/*")
    assert "pretrain/kmnist-resnet/s0" in forced and "pretrain/fmnist-resnet/s0" not in forced
    assert any(s.startswith("finetune/") and "kmnist" in s for s in forced)
    assert not any(s.startswith("finetune/") and "fmnist" in s for s in forced)
    # A merge step: its whole matrix, craft and eval steps included, as the help says; no training step.
    forced = _forced(capsys, "merge/pgd*")
    assert {s.split("/")[0] for s in forced} == {"merge", "craft", "eval"}
    assert all("/pgd" in s for s in forced)
