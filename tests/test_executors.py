"""Choosing an executor: resource strings, [executor] tables, --scope and the forward-pass count in --dry-run.

These need no Ray; tests/test_ray.py runs studies on real local Ray clusters.
"""

from __future__ import annotations

import builtins

import pytest

from helpers import assert_user_error, run_cli
from test_study import TINY, write_study
from transferlab.errors import UserError
from transferlab.resources import default_resources, merged, parse_resources


def test_resource_strings_parse_per_step_kind():
    assert parse_resources("train:gpu=1,cpu=2;craft:gpu=1;eval:gpu=0.25") == {
        "train": {"gpu": 1.0, "cpu": 2.0}, "craft": {"gpu": 1.0}, "eval": {"gpu": 0.25}}
    assert parse_resources(None) == {} and parse_resources(" ; ") == {}


@pytest.mark.parametrize("text,fragment", [
    ("train", "KIND:NAME=VALUE"), ("train:gpu", "NAME=VALUE"), ("train:gpu=one", "not a number"),
    ("train:tpu=1", "unknown resource 'tpu'"), ("fit:gpu=1", "unknown step kind 'fit'"),
    ("train:gpu=-1", ">= 0"), ("train:gpu=1.5", "fraction above 1"), ("train:cpu=0", "no CPU and no GPU"),
    ("train:gpu=1;train:cpu=2", "given twice"), ("eval:gpu=nan", ">= 0"),
])
def test_malformed_resource_strings_are_one_line_errors(text, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_resources(text)


def test_defaults_fill_one_gpu_per_training_or_crafting_step_and_four_evaluations_per_gpu():
    gpu = default_resources(8)
    assert gpu["train"]["gpu"] == 1 and gpu["craft"]["gpu"] == 1 and gpu["eval"]["gpu"] == 0.25
    assert all("gpu" not in r for r in default_resources(0).values())  # a CPU cluster: one CPU per step
    # The study's table overrides the defaults, the command line overrides the study, each kind whole.
    resources = merged(0, {"train": {"cpu": 2}, "eval": {"cpu": 1}}, {"train": {"cpu": 1, "gpu": 0}})
    assert resources["train"] == {"cpu": 1, "gpu": 0} and resources["eval"] == {"cpu": 1.0}


@pytest.mark.parametrize("table,fragment", [
    ('[executor]\ntrain = { tpu = 1 }', "executor.train"),
    ('[executor]\ncraft = { gpu = -1 }', "executor.craft"),
    ('[executor]\ntrain = "gpu=1"', "executor.train"),
    ('[executor]\nmax_retries = -1', "executor.max_retries"),
    ('[executor]\nnodes = 3', "executor.nodes"),
])
def test_malformed_executor_tables_are_caught_at_load(tmp_path, capsys, table, fragment):
    study = write_study(tmp_path, TINY + "\n" + table + "\n")
    line = assert_user_error(["run", study, "--dry-run"], capsys, fragment)
    assert "line" in line


def test_a_valid_executor_table_plans_the_same_keys(tmp_path):
    from transferlab.study import load_study, plan

    plain = [s.key for s in plan(load_study(write_study(tmp_path)), tmp_path / "out")]
    table = '[executor]\ntrain = { cpu = 2, gpu = 1 }\neval = { gpu = 0.25 }\nmax_retries = 5\n'
    with_table = [s.key for s in plan(load_study(write_study(tmp_path, TINY + table, "e.toml")), tmp_path / "out")]
    assert with_table == plain  # how steps are spread never changes what they compute


@pytest.mark.parametrize("args,fragment", [
    (["--executor", "slurm"], "unknown --executor 'slurm'"),
    (["--jobs", "2"], "only apply to --executor ray"),
    (["--executor", "ray", "--jobs", "0"], "--jobs must be"),
    (["--executor", "ray", "--jobs", "2", "--address", "127.0.0.1:1"], "--jobs sizes a local Ray"),
    (["--executor", "ray", "--step-resources", "train:gpu"], "--step-resources"),
])
def test_bad_executor_options_are_one_line_errors(tmp_path, capsys, args, fragment):
    assert_user_error(["run", write_study(tmp_path), "--out", tmp_path / "out", *args], capsys, fragment)
    assert not (tmp_path / "out").exists()


def test_executor_ray_without_ray_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    line = assert_user_error(["run", write_study(tmp_path), "--out", tmp_path / "out", "--executor", "ray"], capsys,
                             "pip install 'transferlab[ray]'")
    assert line.count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_dry_run_counts_the_matrix_forward_passes_per_scope(tmp_path, capsys):
    text = TINY.replace("white_box = false", "white_box = true")
    code, out, _ = run_cli(["run", write_study(tmp_path, text), "--out", tmp_path / "out", "--dry-run"], capsys)
    assert code == 0
    # 2 sources + 4 fine-tunes craft at 2 eps (FGSM: one pass each) on 100 samples: 6 * 2 * 100 crafting passes.
    # Scope sources: 6 evaluated models on the sources' 4 sets, each target on its own 2 sets: (24 + 8) * 100.
    # Scope full: 6 models on all 12 sets.
    assert "1,200 crafting forward+backward passes, 3,200 evaluation forward passes (scope sources" in out
    assert "full: 7,200" in out
    code, out, _ = run_cli(["run", write_study(tmp_path, text + '\nscope = "full"\n', "full.toml"), "--out",
                            tmp_path / "out", "--dry-run"], capsys)
    assert "7,200 evaluation forward passes (scope full" in out
    assert_user_error(["run", write_study(tmp_path, text + '\nscope = "all"\n', "bad.toml"), "--dry-run"], capsys,
                      "evaluation.scope")
