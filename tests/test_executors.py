"""Choosing an executor: Ray resources (typed settings, [executor] tables, the deprecated string), --scope and the
forward-pass count in --dry-run.

These need no Ray; tests/test_ray.py runs studies on real local Ray clusters.
"""

from __future__ import annotations

import builtins
from types import SimpleNamespace

import pytest

from helpers import assert_user_error, run_cli
from test_study import TINY, write_study
from transferlab.config import StepResources
from transferlab.errors import UserError
from transferlab.resources import default_resources, merged, parse_resources


def test_resource_strings_parse_per_step_kind():
    assert parse_resources("train:gpu=1,cpu=2;craft:gpu=1;eval:gpu=0.25") == {
        "train": {"num_gpus": 1.0, "num_cpus": 2.0}, "craft": {"num_gpus": 1.0}, "eval": {"num_gpus": 0.25}}
    assert parse_resources(None) == {} and parse_resources(" ; ") == {}


@pytest.mark.parametrize("text,fragment", [
    ("train", "KIND:NAME=VALUE"), ("train:gpu", "NAME=VALUE"), ("train:gpu=one", "not a number"),
    ("train:tpu=1", "unknown resource 'tpu'"), ("fit:gpu=1", "unknown step kind 'fit'"),
    ("train:gpu=-1", "0 or more"), ("train:gpu=1.5", "fraction above 1"),
    ("train:gpu=1;train:cpu=2", "given twice"), ("eval:gpu=nan", "0 or more"),
])
def test_malformed_resource_strings_are_one_line_errors(text, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_resources(text)


def test_defaults_fill_one_gpu_per_training_or_crafting_step_and_four_evaluations_per_gpu():
    gpu = default_resources(8)
    assert gpu["train"]["num_gpus"] == 1 and gpu["craft"]["num_gpus"] == 1 and gpu["eval"]["num_gpus"] == 0.25
    assert all("num_gpus" not in r for r in default_resources(0).values())  # a CPU cluster: CPUs only
    assert all("num_gpus" not in r for r in default_resources(8, "cpu").values())  # a study on the CPU: no GPU
    # Each amount on its own: the study's [executor] keys, its kind's table, the command line, the old string.
    executor = {"num_gpus": 0.5, "memory": 2.0, "train": {"num_cpus": 2}, "eval": {"num_cpus": 1, "num_gpus": 0.1}}
    resources = merged(8, executor, StepResources(memory=4.0), {"train": {"num_gpus": 0.0}})
    assert resources["train"] == {"num_gpus": 0.0, "num_cpus": 2.0, "memory": 4.0}
    assert resources["eval"] == {"num_gpus": 0.1, "num_cpus": 1.0, "memory": 4.0}
    assert resources["craft"] == {"num_gpus": 0.5, "memory": 4.0}
    with pytest.raises(UserError, match="no CPU and no GPU"):
        merged(0, {}, StepResources(num_cpus=0))


@pytest.mark.parametrize("table,fragment", [
    ('[executor]\ntrain = { tpu = 1 }', "executor.train"),
    ('[executor]\ncraft = { num_gpus = -1 }', "executor.craft"),
    ('[executor]\ncraft = { num_gpus = 1.5 }', "fraction above 1"),
    ('[executor]\ntrain = "gpu=1"', "executor.train"),
    ('[executor]\nmax_retries = -1', "executor.max_retries"),
    ('[executor]\nnodes = 3', "executor.nodes"),
    ('[executor]\nnum_gpus = 2.5', "executor.num_gpus"),
    ('[executor]\nmemory = -1', "executor.memory"),
    ('[executor]\ncustom_resources = { fast_disk = -1 }', "executor.custom_resources"),
    ('[executor]\neval = { custom_resources = { GPU = 1 } }', "executor.eval"),
])
def test_malformed_executor_tables_are_caught_at_load(tmp_path, capsys, table, fragment):
    study = write_study(tmp_path, TINY + "\n" + table + "\n")
    line = assert_user_error(["run", study, "--dry-run"], capsys, fragment)
    assert "line" in line


def test_a_valid_executor_table_plans_the_same_keys(tmp_path):
    from transferlab.study import load_study, plan

    plain = [s.key for s in plan(load_study(write_study(tmp_path)), tmp_path / "out")]
    table = ('[executor]\nmemory = 2\ntrain = { num_cpus = 2, num_gpus = 1 }\neval = { num_gpus = 0.25 }\n'
             'max_retries = 5\n')
    with_table = [s.key for s in plan(load_study(write_study(tmp_path, TINY + table, "e.toml")), tmp_path / "out")]
    assert with_table == plain  # how steps are spread never changes what they compute


def test_an_old_executor_table_is_read_with_a_warning(tmp_path):
    from transferlab.study import load_study

    with pytest.warns(FutureWarning, match=r"train.gpu is read as train.num_gpus") as caught:
        study = load_study(write_study(tmp_path, TINY + '[executor]\ntrain = { gpu = 1, cpu = 2 }\n'))
    assert len(caught) == 2 and all("\n" not in str(w.message) for w in caught)
    assert merged(1, study["executor"])["train"] == {"num_gpus": 1.0, "num_cpus": 2.0}


def _steps(tmp_path):
    from transferlab.study import load_study, plan

    return plan(load_study(write_study(tmp_path)), tmp_path / "out")


class _FakeRay:
    """What RayExecutor._resources reads of a cluster: its GPUs and its live nodes."""

    def __init__(self, *nodes):
        self.node_list = [{"Alive": True, "NodeID": str(i), "Resources": n} for i, n in enumerate(nodes)]

    def cluster_resources(self):
        return {"GPU": sum(n["Resources"].get("GPU", 0) for n in self.node_list)}

    def nodes(self):
        return self.node_list


def test_typed_resources_reach_each_ray_tasks_options(tmp_path):
    """The options every step's ray.remote(...).options(...) gets, without starting Ray."""
    from transferlab.executors import RayExecutor

    steps = _steps(tmp_path)
    node = {"CPU": 16, "GPU": 2, "memory": 64 * 2**30, "accelerator_type:A100": 1}
    executor = RayExecutor(settings=StepResources(num_gpus=0.5, memory=1.5,
                                                  custom_resources={"accelerator_type:A100": 0.001}))
    study = {"executor": {"eval": {"num_gpus": 0.125}, "merge": {"num_cpus": 1}}}
    resources = executor._resources(_FakeRay(node), study, steps, "auto")
    options = {s.kind: executor.task_options(s, resources, 16, 3) for s in reversed(steps)}  # each kind's first
    pretrain = next(s for s in steps if s.kind == "pretrain")
    assert options["pretrain"] == {"num_cpus": pretrain.threads, "num_gpus": 0.5, "memory": 3 * 2**29,
                                   "resources": {"accelerator_type:A100": 0.001}, "max_retries": 3,
                                   "name": pretrain.id}
    # the command line wins over the study's kind table (num_gpus); the kind table's own num_cpus stays
    assert options["eval"]["num_gpus"] == 0.5 and options["merge"]["num_cpus"] == 1
    # The defaults: a CPU per thread the step runs (at most a node's), GPUs where the cluster has them.
    plain = RayExecutor()
    resources = plain._resources(_FakeRay(node), {"executor": {}}, steps, "auto")
    for step in steps:
        built = plain.task_options(step, resources, 16, 0)
        assert built["num_cpus"] == min(max(1, step.threads), 16) and "memory" not in built
        assert built["num_gpus"] == {"pretrain": 1, "finetune": 1, "craft": 1, "eval": 0.25, "merge": 0}[step.kind]
    cpu_only = plain._resources(_FakeRay({"CPU": 4}), {"executor": {}}, steps, "auto")
    assert all(plain.task_options(s, cpu_only, 4, 0)["num_gpus"] == 0 for s in steps)
    # a request no node can hold is a one-line error before anything runs
    with pytest.raises(UserError, match="more than any Ray node has"):
        RayExecutor(settings=StepResources(memory=128))._resources(_FakeRay(node), {"executor": {}}, steps)


def test_the_command_line_builds_the_executor_with_its_typed_resources(tmp_path, capsys, monkeypatch):
    from transferlab import executors

    built = {}

    def capture(self, steps, ctx, on_start=None, on_done=None):
        built["options"] = {s.kind: self.task_options(s, self._resources(
            _FakeRay({"CPU": 8, "GPU": 1, "memory": 2**35, "fast_disk": 2}), ctx.study, steps, ctx.device), 8, 0)
            for s in steps}
        raise UserError("stopped before running")  # the options are what this test is after

    monkeypatch.setattr(executors.RayExecutor, "run", capture)
    assert_user_error(["run", write_study(tmp_path), "--out", tmp_path / "out", "--executor", "ray",
                       "--num-gpus", "0.25", "--memory", "2", "--resource", "fast_disk=1", "--num-cpus", "2",
                       "--no-progress"],
                      capsys, "stopped before running")
    assert built["options"]["craft"] == {"num_cpus": 2.0, "num_gpus": 0.25, "memory": 2 * 2**30,
                                         "resources": {"fast_disk": 1.0}, "max_retries": 0,
                                         "name": built["options"]["craft"]["name"]}


def test_the_old_resource_string_still_works_with_a_warning(tmp_path, capsys, monkeypatch):
    from transferlab import executors

    seen = {}

    def capture(self, *args, **kwargs):
        seen["per_kind"] = self.command_line
        raise UserError("stopped")

    monkeypatch.setattr(executors.RayExecutor, "run", capture)
    with pytest.warns(Warning, match="--step-resources is deprecated") as warned:
        code, _, err = run_cli(["run", write_study(tmp_path), "--out", tmp_path / "out", "--executor", "ray",
                                "--step-resources", "train:gpu=1,cpu=2"], capsys)
    assert code == 2 and len(warned) == 1
    assert seen["per_kind"] == {"train": {"num_gpus": 1.0, "num_cpus": 2.0}}


@pytest.mark.parametrize("args,fragment", [
    (["--executor", "slurm"], "unknown --executor 'slurm'"),
    (["--jobs", "2"], "only apply to --executor ray"),
    (["--executor", "ray", "--jobs", "0"], "--jobs must be"),
    (["--executor", "ray", "--jobs", "2", "--address", "127.0.0.1:1"], "--jobs sizes a local Ray"),
    (["--executor", "ray", "--step-resources", "train:gpu"], "--step-resources"),
    (["--executor", "ray", "--num-gpus", "-1"], "--num-gpus must be a finite number of 0 or more"),
    (["--executor", "ray", "--num-gpus", "1.5"], "--num-gpus is a fraction above 1"),
    (["--executor", "ray", "--num-cpus", "nan"], "--num-cpus"),
    (["--executor", "ray", "--memory", "-2"], "--memory must be"),
    (["--executor", "ray", "--resource", "fast_disk"], "--resource 'fast_disk' is not NAME=VALUE"),
    (["--executor", "ray", "--resource", "fast_disk=lots"], "is not a number"),
    (["--executor", "ray", "--resource", "fast_disk=-1"], "--resource gives fast_disk -1.0"),
    (["--executor", "ray", "--resource", "GPU=1"], "num_gpus"),
    (["--executor", "ray", "--num-gpus", "two"], "--num-gpus"),
    (["--num-gpus", "1"], "--num-gpus only apply to --executor ray"),
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
