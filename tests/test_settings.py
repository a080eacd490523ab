"""Each setting is declared once (config.setting) and flows from there to the CLI, the API, the study schema
and the docs; the listing commands answer without importing torch."""

import dataclasses
import os
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from transferlab import api, config, study, study_check
from transferlab.arguments import with_settings
from transferlab.cli import app
from transferlab.cli_args import setting_options
from transferlab.config import TrainConfig, at_least, setting
from transferlab.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class WarmupConfig(TrainConfig):
    """TrainConfig with one setting more, declared the one way a setting is declared."""

    warmup: int = setting(0, help="Linear warm-up over this many steps.", check=at_least(0, 1000))


def _command_with(cls):
    """A one-command typer app whose training options are generated from ``cls``; returns (app, received)."""
    received = []
    demo = typer.Typer(rich_markup_mode=None)

    @demo.command()
    @setting_options(cls, "pretrain", into="train")
    def fit(model: str = typer.Option(..., "--model"), train: cls = None):
        received.append(train)

    @demo.command()
    def other():  # two commands, so 'fit' is a subcommand as in transferlab
        pass

    return demo, received


def test_a_setting_declared_once_appears_in_help_api_and_study_schema():
    demo, received = _command_with(WarmupConfig)
    runner = CliRunner()
    help_text = runner.invoke(demo, ["fit", "--help"]).output
    assert "--warmup" in help_text and "Linear warm-up over this many steps." in help_text
    assert "--epochs" in help_text  # the inherited settings are still there
    result = runner.invoke(demo, ["fit", "--model", "mlp", "--warmup", "5"])
    assert result.exit_code == 0, result.output
    assert received[0].warmup == 5 and received[0].epochs == TrainConfig().epochs
    result = runner.invoke(demo, ["fit", "--model", "mlp", "--warmup", "-1"])
    assert isinstance(result.exception, UserError) and "--warmup must be at least 0" in str(result.exception)

    @with_settings(WarmupConfig, "pretrain")
    def fit_api(*, model: str, train: WarmupConfig | None = None):
        return train

    assert inspect.signature(fit_api).parameters["warmup"].default == 0
    assert fit_api(model="mlp", warmup=7).warmup == 7
    assert fit_api(model="mlp", train=WarmupConfig(warmup=2), lr=0.5).warmup == 2
    with pytest.raises(TypeError, match="warmup must be a whole number"):
        fit_api(model="mlp", warmup="7")
    with pytest.raises(ValueError, match="warmup must be at most 1,000"):
        fit_api(model="mlp", warmup=5000)

    assert config.study_keys(WarmupConfig)["warmup"] == (int, 0)
    check = study_check._setting_checks(WarmupConfig)["warmup"]
    assert check(3) == 3
    with pytest.raises(UserError, match="must be at least 0"):
        check(-1)


def test_the_real_commands_api_and_schema_are_generated_from_the_declarations():
    declared = {f.name: f for f in config.setting_fields(TrainConfig)}
    assert study.SCHEMA["train"] == config.study_keys(TrainConfig)
    assert set(study.SCHEMA["evaluation"]) == {f.name for f in config.setting_fields(config.MatrixDefaults)} | {
        "ensembles"}
    api_parameters = inspect.signature(api.finetune).parameters
    assert set(declared) <= set(api_parameters)
    pretrain_help = CliRunner().invoke(app, ["pretrain", "--help"]).output
    for name, f in declared.items():
        if "pretrain" in f.meta.commands:
            assert f.meta.help.split(" (")[0][:25] in " ".join(pretrain_help.split()), name


def test_help_lists_the_words_an_option_takes():
    runner = CliRunner()
    assert "<adam|adamw|sgd>" in runner.invoke(app, ["pretrain", "--help"]).output
    assert "<frozen|update>" in runner.invoke(app, ["finetune", "--help"]).output
    assert "<sources|full>" in runner.invoke(app, ["attack-matrix", "--help"]).output
    assert "<local|ray>" in runner.invoke(app, ["run", "--help"]).output
    assert "--install-completion" in runner.invoke(app, ["--help"]).output


def test_docs_settings_table_is_the_generated_one():
    """docs/settings.md is written by scripts/settings_doc.py; a setting added without regenerating it fails
    here."""
    assert (ROOT / "docs" / "settings.md").read_text(encoding="utf-8") == config.settings_doc()


def test_model_catalogue_read_without_torch_is_the_zoo():
    from transferlab.model_catalog import list_families
    from transferlab.models import list_models

    assert list_families() == [{"name": f.name, "description": f.description, "defaults": f.defaults,
                                "block_help": f.block_help} for f in list_models()]


@pytest.mark.parametrize("args", [["models"], ["datasets"], ["--help"], ["pretrain", "--help"]])
def test_listing_commands_do_not_import_torch(args):
    script = ("import sys\nfrom transferlab.cli import main\n"
              f"try:\n    main({args!r})\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
              "heavy = sorted(m for m in ('torch', 'torchvision', 'pandas') if m in sys.modules)\n"
              "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_shell_completion_offers_an_options_words():
    env = {**os.environ, "_TRANSFERLAB_COMPLETE": "complete_bash",
           "COMP_WORDS": "transferlab finetune --bn-stats ", "COMP_CWORD": "3"}
    result = subprocess.run([sys.executable, "-c", "from transferlab.cli import main; main([])"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["frozen", "update"], (result.stdout, result.stderr[-1000:])


@pytest.mark.slow
def test_report_does_not_import_torch(tmp_path, tiny_study_done):
    """The report reads tidy tables only (transferlab.files for its writes): `transferlab report` on a finished
    study never pays torch's import (4 s and 600 MB on 2 cores)."""
    _, out = tiny_study_done.copy_to(tmp_path)
    script = ("import sys\nfrom transferlab.cli import main\n"
              f"try:\n    main(['report', {str(out)!r}])\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
              "assert 'torch' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "report.md").is_file()
