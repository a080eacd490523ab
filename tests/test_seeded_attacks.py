"""torchattacks classes whose constructor takes its own ``seed`` (APGD, APGDT, AutoAttack, FAB, Square)
run through the attack-matrix command and through a study, as the README's example does."""

from __future__ import annotations

import pandas as pd
import pytest

from helpers import run_cli
from transferlab.runs import FinetuneRequest, PretrainRequest, RunOutput, finetune, pretrain
from transferlab.study import StudyRunOptions, run_study
from transferlab.training import TrainConfig

# Each class with the cheapest options it allows: a user would use more steps / queries.
SEEDED = {
    "APGD": ["loss=ce", "steps=1"],
    "APGDT": ["steps=1", "n_restarts=1"],
    "AutoAttack": ["version=standard"],
    "FAB": ["steps=1"],
    "Square": ["n_queries=2"],
}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("seeded-runs")
    common = dict(config=TrainConfig(epochs=1, batch_size=64), device="cpu", output=RunOutput(runs, progress=False))
    source = pretrain(PretrainRequest(model="mlp", dataset="fmnist-sample", n=200), **common).run_dir
    target = finetune(FinetuneRequest(dataset="mnist-sample", source=source, n=200, freeze_n=2), **common).run_dir
    return source, target


@pytest.mark.parametrize("name", sorted(SEEDED))
@pytest.mark.slow  # an attack matrix through the CLI per torchattacks class
def test_seeded_torchattacks_class_through_the_cli(name, tiny_runs, tmp_path, capsys):
    source, target = tiny_runs
    options = [a for opt in SEEDED[name] for a in ("--attack-opt", opt)]
    code, out, err = run_cli(["attack-matrix", "--sources", source, "--targets", target, "--dataset", "mnist-sample",
                              "--attack", f"torchattacks:{name}", *options, "--eps", "0.1", "--samples", "20",
                              "--no-white-box", "--device", "cpu", "--no-progress", "--out", tmp_path], capsys)
    assert code == 0, err
    cells = pd.read_csv(tmp_path / "cells.csv")
    assert set(cells["attack"]) == {f"torchattacks:{name}"}
    assert len(cells) == 2  # the target and the source, on the source's examples
    assert '"seed":0' in cells["attack_params"].iloc[0]  # the constructor seed is recorded, not the clock's


@pytest.mark.slow  # a whole study
def test_seeded_torchattacks_classes_in_a_study(tmp_path):
    attacks = "\n".join(
        f'[[attack]]\nattack = "torchattacks:{name}"\neps = [0.1]\n'
        f"options = {{ {', '.join(k + ' = ' + (repr(v) if not v.isdigit() else v) for k, v in (o.split('=') for o in opts))} }}\n"
        .replace("'", '"')
        for name, opts in SEEDED.items())
    study = tmp_path / "seeded.toml"
    study.write_text(f"""
[study]
name = "seeded"
device = "cpu"

[data]
download = false

[train]
epochs = 1
batch_size = 64

[[pretrain]]
name = "f"
model = "mlp"
dataset = "fmnist-sample"
n = 200

[[finetune]]
from = ["f"]
dataset = "mnist-sample"
n = [200]
freeze = [2]

{attacks}
[evaluation]
samples = 20
white_box = false
""")
    outcome = run_study(study, tmp_path / "out", StudyRunOptions(progress=False))
    cells = pd.read_csv(outcome.out_dir / "matrix" / "cells.csv")
    assert set(cells["attack"]) == {f"torchattacks:{name}" for name in SEEDED}
    assert (outcome.out_dir / "report.md").is_file()


def test_a_seeded_class_draws_from_the_matrix_seed_unless_given_one(tiny_runs):
    from transferlab.matrix import AttackRequest, MatrixRuns, make_spec

    source, target = tiny_runs
    common = dict(runs=MatrixRuns([source], [target]), dataset="mnist-sample")
    square = AttackRequest(["torchattacks:Square"], [0.1])
    assert make_spec(**common, attack=square, seed=3).settings[0].params["seed"] == 3
    assert make_spec(**common, attack=square, seed=0).settings[0].params["seed"] == 0  # the keys of earlier runs hold
    given = AttackRequest(["torchattacks:Square"], [0.1], options={"seed": 7})
    assert make_spec(**common, attack=given, seed=3).settings[0].params["seed"] == 7
    assert "seed" not in make_spec(**common, attack=AttackRequest(["pgd"], [0.1]), seed=3).settings[0].params
