"""One list convention on the command line, and every README command parses as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer.main

from helpers import assert_user_error
from transferlab.cli import app
from transferlab.cli_args import normalise_argv

README = Path(__file__).resolve().parents[1] / "README.md"


def _parsed(argv: list[str]) -> dict:
    """The parameters the command would receive (click parses and converts; nothing runs)."""
    argv = normalise_argv(app, argv)
    group = typer.main.get_command(app)
    command = group.commands[argv[0]]
    return command.make_context(argv[0], argv[1:]).params


@pytest.mark.parametrize("spelling", [
    ["--eps", "0.1,0.2", "--eps", "8/255"],
    ["--eps", "0.1", "0.2", "8/255"],
    ["--eps", "0.1", "--eps", "0.2,8/255"],
])
def test_eps_spellings_mean_one_list(spelling):
    from transferlab.attacks import parse_eps_list
    from transferlab.cli_args import split_list

    params = _parsed(["attack-matrix", "--dataset", "mnist", *spelling])
    assert parse_eps_list(",".join(split_list(params["eps"]))) == [0.1, 0.2, 8 / 255]


def test_several_values_after_one_flag_commas_and_repeats():
    from transferlab.cli_args import split_list

    params = _parsed(["attack-matrix", "--sources", "a", "b", "c", "--targets", "d,e", "--targets", "f",
                      "--attack", "fgsm,pgd", "--attack", "mifgsm", "--dataset", "mnist", "--no-white-box"])
    assert split_list(params["sources"]) == ["a", "b", "c"]
    assert split_list(params["targets"]) == ["d", "e", "f"]
    assert split_list(params["attack"]) == ["fgsm", "pgd", "mifgsm"]
    assert params["white_box"] is False and params["dataset"] == "mnist"
    # KEY=VALUE options keep their commas: they belong to the value.
    params = _parsed(["pretrain", "--model", "mlp", "--dataset", "mnist", "-o", "hidden=[256,128]", "-o", "depth=2"])
    assert params["option"] == ("hidden=[256,128]", "depth=2") or list(params["option"]) == ["hidden=[256,128]", "depth=2"]


def test_a_repeated_single_value_option_is_an_error(capsys):
    assert_user_error(["attack-matrix", "--sources", "a", "--targets", "b", "--dataset", "mnist", "--dataset",
                       "fmnist"], capsys, "--dataset given twice")
    assert_user_error(["pretrain", "--model", "mlp", "--dataset", "mnist", "--epochs", "1", "--epochs=2"], capsys,
                      "--epochs given twice")


def test_comma_list_of_attacks_reaches_the_matrix(capsys, monkeypatch):
    seen = {}

    def fake_run_matrix(**kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr("transferlab.matrix.run_matrix", fake_run_matrix)
    from helpers import run_cli

    code, _, err = run_cli(["attack-matrix", "--sources", "s1", "s2", "--targets", "t", "--dataset", "mnist",
                            "--attack", "fgsm,pgd", "--eps", "0.1", "--eps", "0.2"], capsys)
    assert code == 0, err
    assert seen["attack_names"] == ["fgsm", "pgd"] and seen["eps_values"] == [0.1, 0.2]
    assert [str(p) for p in seen["sources"]] == ["s1", "s2"] and [str(p) for p in seen["targets"]] == ["t"]


def readme_commands() -> list[str]:
    """Every `transferlab ...` command in README.md's code blocks (continuation lines joined)."""
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("transferlab "):
                    commands.append(part)
    return commands


def test_readme_has_commands_to_check():
    assert len(readme_commands()) >= 6


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_parses(command):
    argv = shlex.split(command)[1:]
    if argv[0] in ("--version",) or argv[0] not in typer.main.get_command(app).commands:
        assert argv[0] == "--version", command
        return
    _parsed(argv)


def test_steps_as_flag_and_as_attack_option_is_one_too_many(tmp_path, capsys):
    assert_user_error(["attack-matrix", "--sources", "s", "--targets", "t", "--dataset", "mnist-sample",
                       "--attack", "torchattacks:APGD", "--steps", "2", "--attack-opt", "steps=3",
                       "--out", tmp_path / "o"], capsys, "steps given twice")
    assert not (tmp_path / "o").exists()


def test_report_formats_after_one_flag_beside_the_results_folder():
    # report takes a positional folder, so only the known format words are gathered after --format.
    argv = normalise_argv(app, ["report", "results/quick", "--format", "md", "html", "tex"])
    assert argv == ["report", "results/quick", "--format", "md", "--format", "html", "--format", "tex"]
    argv = normalise_argv(app, ["report", "--format", "md", "results/quick"])
    assert argv == ["report", "--format", "md", "results/quick"]  # the folder is not taken for a format


def test_an_unknown_report_format_is_one_line(tmp_path, capsys):
    assert_user_error(["report", str(tmp_path), "--format", "md,pdf"], capsys, "unknown report format", "pdf")
