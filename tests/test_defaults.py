"""Every default is declared once (transferlab/config.py): the CLI, the Python API and the study schema agree
with it, so `transferlab pretrain`, `transferlab.pretrain(...)` and a study's [train] table train the same run."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from transferlab import api, cli, config
from transferlab.study import SCHEMA, TRAIN_FIELDS

# The study's [evaluation] keys and the attack matrix's arguments that say the same thing.
MATRIX_KEYS = ("samples", "labels", "white_box", "batch_size", "precision", "scope")


def _cli_defaults(command: str) -> dict:
    callback = next(c.callback for c in cli.app.registered_commands if (c.name or c.callback.__name__) == command)
    return {name: getattr(p.default, "default", p.default) for name, p in inspect.signature(callback).parameters.items()}


def _api_defaults(function) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()}


def _plain(value):
    return str(value) if isinstance(value, str) else value


@pytest.mark.parametrize("command,function", [("pretrain", api.pretrain), ("finetune", api.finetune)])
def test_training_defaults_agree_everywhere(command, function):
    cli_defaults, api_defaults = _cli_defaults(command), _api_defaults(function)
    for field in config.USER_TRAIN_FIELDS:
        declared = _plain(getattr(config.TRAIN, field))
        if field == "bn_stats" and command == "pretrain":  # a pretrain freezes nothing: no --bn-stats
            assert field not in cli_defaults
            continue
        assert _plain(cli_defaults[field]) == declared, f"transferlab {command} --{field}"
        assert _plain(api_defaults[field]) == declared, f"transferlab.{function.__name__}({field}=)"
        assert _plain(TRAIN_FIELDS[field][1]) == declared, f"study [train] {field}"


def test_the_study_schema_takes_every_user_training_field_and_no_internal_one():
    assert set(TRAIN_FIELDS) == set(config.USER_TRAIN_FIELDS)
    internal = {f.name for f in dataclasses.fields(config.TrainConfig)} - set(config.USER_TRAIN_FIELDS)
    assert internal == {"momentum", "eval_batch_size", "log_every"}


def test_attack_matrix_defaults_agree_everywhere():
    cli_defaults, api_defaults = _cli_defaults("attack-matrix"), _api_defaults(api.attack_matrix)
    evaluation = SCHEMA["evaluation"]
    for key in MATRIX_KEYS:
        declared = _plain(getattr(config.MATRIX, key))
        assert _plain(cli_defaults[key]) == declared, f"transferlab attack-matrix --{key}"
        assert _plain(api_defaults[key]) == declared, f"transferlab.attack_matrix({key}=)"
        assert _plain(evaluation[key][1]) == declared, f"study [evaluation] {key}"
    # No fixed default folder: None means config.MATRIX.out / "<dataset>-<attacks>" (matrix.outputs.default_out)
    assert cli_defaults["out"] is None and api_defaults["out"] is None
    assert tuple(api_defaults["attack"]) == config.MATRIX.attacks
    assert api_defaults["eps"] == config.MATRIX.eps


def test_run_directories_default_to_one_place():
    for command, function in (("pretrain", api.pretrain), ("finetune", api.finetune)):
        assert Path(_cli_defaults(command)["out"]) == Path(_api_defaults(function)["out"]) == config.RUNS_DIR


def test_a_word_outside_its_choices_is_a_one_line_error_naming_the_flag():
    from transferlab.errors import UserError

    assert config.choice(config.BnStats, "UPDATE", "--bn-stats") == "update"
    with pytest.raises(UserError, match=r"unknown --bn-stats 'frozn'; use one of frozen, update"):
        config.choice(config.BnStats, "frozn", "--bn-stats")
    with pytest.raises(UserError, match="unknown --precision 'fp16'; use auto"):
        config.TrainConfig(precision="fp16").validate()


def test_the_command_line_gathers_exactly_the_trackers_that_exist():
    from transferlab import cli_args, tracking

    assert cli_args.list_choices("--log") == frozenset(tracking.KINDS)
