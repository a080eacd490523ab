"""Issue 12, verified: models from anywhere in study files (model = "pkg.mod:fn", torchvision:NAME), checked at
load like zoo families; a factory that raises is one line, exit 2; docs/models.md's commands parse."""

from __future__ import annotations

import re
import shlex
import textwrap
from pathlib import Path

import pytest
import typer

import helpers
from helpers import assert_user_error, run_cli
from test_study import TINY, write_study
from transferlab.cli import app

ROOT = Path(__file__).resolve().parents[1]

FACTORY = textwrap.dedent('''
    from torch import nn

    def make(num_classes, in_channels, image_size, width=8):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, int(width)), nn.ReLU(),
                             nn.Linear(int(width), num_classes))

    def broken(num_classes, in_channels, image_size):
        raise ValueError("width must be even")
''')



@pytest.fixture(autouse=True)
def trusted_code(monkeypatch):
    """These tests name their own modules in study files and run.json: trusted (tests/test_trust_code.py tests
    the refusal)."""
    monkeypatch.setenv("TRANSFERLAB_TRUST_CODE", "1")

@pytest.fixture
def user_module(tmp_path, monkeypatch):
    yield from helpers.user_module(tmp_path, monkeypatch, "v_user_models", FACTORY)


def _with_model(model_lines: str) -> str:
    return TINY.replace('model = "mlp"', model_lines, 1)


@pytest.mark.slow  # a whole study
def test_a_study_takes_a_user_factory_and_runs_it(user_module, tmp_path, capsys):
    text = _with_model(f'model = "{user_module}:make"\noptions = {{ width = 6 }}')
    text = text.replace('from = ["k", "f"]', 'from = ["k"]').replace("n = [200, 400]", "n = [200]")
    path = write_study(tmp_path, text)
    code, out, err = run_cli(["run", path, "--dry-run", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    from transferlab.study import StudyRunOptions, run_study

    outcome = run_study(path, tmp_path / "o", StudyRunOptions(progress=False))
    import json

    info = json.loads((outcome.out_dir / "runs" / "pre_k_s0" / "run.json").read_text())
    assert info["model"]["config"]["family"] == f"{user_module}:make" and info["model"]["config"]["width"] == 6


@pytest.mark.parametrize("model_lines, key, fragment", [
    ('model = "no_such_module_v:make"', "pretrain[0].model", "cannot import"),
    ('model = "{mod}:nothing_here"', "pretrain[0].model", "has no callable"),
    ('model = "{mod}:broken"', "pretrain[0].model", "the factory failed (ValueError: width must be even)"),
    ('model = "{mod}:make"\noptions = {{ colour = 2 }}', "pretrain[0].options", "rejected its arguments"),
    ('model = "torchvision:no_such_net"', "pretrain[0].model", "torchvision has no model"),
    ('model = "torchvision:resnet18"\noptions = {{ resize = "big" }}', "pretrain[0].options", "resize"),
    ('model = "resnett"', "pretrain[0].model", "did you mean resnet"),
])
def test_external_model_mistakes_in_a_study_are_caught_at_load(user_module, tmp_path, capsys, model_lines, key,
                                                              fragment):
    text = _with_model(model_lines.format(mod=user_module))
    # A dry run never calls a factory (issue 26): what only a call can find is found by a real run, still at load.
    dry = [] if "factory" in fragment or "arguments" in fragment else ["--dry-run"]
    line = assert_user_error(["run", write_study(tmp_path, text), *dry, "--out", tmp_path / "o"], capsys,
                             key, "(line ", fragment)
    number = int(line.split("(line ")[1].split(")")[0])
    assert text.splitlines()[number - 1].lstrip().startswith(key.rsplit(".", 1)[1])
    assert not (tmp_path / "o").exists()


def test_torchvision_model_in_a_study_passes_the_load_checks(tmp_path, capsys):
    text = TINY.replace('model = "mlp"', 'model = "torchvision:resnet18"').replace("freeze = [2]", "freeze = [10]")
    code, out, err = run_cli(["run", write_study(tmp_path, text), "--dry-run", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    too_far = text.replace("freeze = [10]", "freeze = [63]")
    assert_user_error(["run", write_study(tmp_path, too_far), "--dry-run"], capsys, "finetune[0].freeze", "62")


def test_a_factory_that_raises_is_one_line_exit_2(user_module, tmp_path, capsys):
    assert_user_error(["inspect", f"{user_module}:broken"], capsys, "the factory failed", "width must be even")
    assert_user_error(["pretrain", "--model", f"{user_module}:broken", "--dataset", "mnist-sample", "--device", "cpu",
                       "--out", tmp_path / "runs"], capsys, "the factory failed")
    assert not (tmp_path / "runs").exists()


def docs_commands() -> list[str]:
    """Every `transferlab ...` command in docs/*.md: in code blocks and in inline code spans."""
    commands = []
    for doc in sorted((ROOT / "docs").glob("*.md")):
        text = doc.read_text(encoding="utf-8")
        spans = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S) + re.findall(r"`([^`\n]+)`", text)
        for span in spans:
            for line in span.replace("\\\n", " ").splitlines():
                for part in line.split(" #")[0].split("&&"):
                    part = part.strip()
                    # "..." marks an abbreviated example ("-o weights=... ..."), not a command to run
                    if part.startswith("transferlab ") and len(part.split()) > 2 and "..." not in part:
                        commands.append(part)
    return commands


def test_docs_have_commands_to_check():
    assert any("timm:vit_base_patch16_224" in c for c in docs_commands())


@pytest.mark.parametrize("command", docs_commands())
def test_every_docs_command_parses(command):
    from test_cli_lists import _parsed

    argv = shlex.split(command)[1:]
    assert argv[0] in typer.main.get_command(app).commands, command
    _parsed(argv)


def test_a_weights_file_that_does_not_match_says_how_in_a_few_words(tmp_path, capsys):
    import torch
    import torchvision
    from safetensors.torch import save_file

    other = torchvision.models.resnet18(weights=None, num_classes=7)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "r18_7.safetensors"))
    line = assert_user_error(["inspect", "torchvision:resnet18", "-o", f"weights={tmp_path / 'r18_7.safetensors'}"],
                             capsys, "does not match", "2 of another shape (fc.bias, fc.weight)")
    save_file({"fc.weight": torch.zeros(3, 3)}, str(tmp_path / "bad.safetensors"))
    line = assert_user_error(["inspect", "torchvision:resnet18", "-o", f"weights={tmp_path / 'bad.safetensors'}"],
                             capsys, "121 missing (conv1.weight, bn1.weight, bn1.bias, ...)")
    assert len(line) < 300, line


def test_an_installed_entry_point_is_a_model_family(user_module, tmp_path, monkeypatch, capsys):
    """A real distribution on sys.path (dist-info with entry_points.txt), not a patched importlib.metadata."""
    dist = tmp_path / "v_user_nets-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: v-user-nets\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[transferlab.models]\nv-tiny-net = {user_module}:make\n")
    code, out, err = run_cli(["inspect", "v-tiny-net", "-o", "width=5"], capsys)
    assert code == 0, err
    assert "net.1.weight" in out and "[5, 784]" in out
    code, out, err = run_cli(["pretrain", "--model", "v-tiny-net", "--dataset", "mnist-sample", "--n", "50",
                              "--epochs", "1", "--min-steps", "0", "--device", "cpu", "--no-progress",
                              "--out", tmp_path / "runs"], capsys)
    assert code == 0, err
    import transferlab

    run = transferlab.load_run(next((tmp_path / "runs").iterdir()))
    assert run.config["model"]["family"] == "v-tiny-net"
