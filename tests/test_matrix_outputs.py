"""Outputs never clobber: two attack-matrix commands keep both results (issue 24)."""

from __future__ import annotations

import json

import pytest

from helpers import assert_user_error, run_cli
from transferlab.matrix import spec_from_keywords
from transferlab.matrix.outputs import check_no_clobber, default_out
from transferlab.runs import FinetuneRequest, PretrainRequest, RunOutput, finetune, pretrain
from transferlab.training import TrainConfig


def test_readme_examples_get_different_default_folders():
    first = default_out("mnist", ["pgd", "fgsm"])
    second = default_out("mnist", ["torchattacks:APGD"])
    assert first != second and first.parent == second.parent
    assert default_out("npz:../data/my set", ["fgsm"]).name == "npz-my-set-fgsm"


def _spec(tmp_path, **kwargs):
    settings = dict(sources=["runs/pre_a"], targets=["runs/final_a"], dataset="mnist-sample", attack_names=["pgd"],
                    eps_values=[0.1], out_dir=tmp_path)
    settings.update(kwargs)
    return spec_from_keywords(**settings)


def _record(spec):
    (spec.out_dir / "matrix.json").write_text(json.dumps({
        "dataset": spec.dataset, "samples": spec.samples, "seed": spec.seed, "label_policy": spec.label_policy,
        "scope": spec.scope, "precision": spec.precision, "white_box": spec.white_box,
        "attacks": [{"attack": s.name, "eps": s.eps, "params": s.params} for s in spec.settings],
        "sources": [str(p) for p in spec.sources], "targets": [str(p) for p in spec.targets]}))


def test_a_matrix_may_grow_in_place_but_not_drop_cells(tmp_path):
    _record(_spec(tmp_path))
    check_no_clobber(_spec(tmp_path))  # the same command again
    check_no_clobber(_spec(tmp_path, eps_values=[0.1, 0.2], targets=["runs/final_a", "runs/final_b"]))  # adds
    for other in (dict(attack_names=["fgsm"]), dict(eps_values=[0.2]), dict(steps=3), dict(samples=100),
                  dict(targets=["runs/final_b"])):
        with pytest.raises(Exception, match="--out.*--force"):
            check_no_clobber(_spec(tmp_path, **other))
        check_no_clobber(_spec(tmp_path, **other), force=True)


@pytest.mark.slow  # over 0.7 s on 2 cores: the full suite (--all) runs it
def test_the_readme_examples_run_in_sequence_and_both_results_remain(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common = dict(config=TrainConfig(epochs=1, batch_size=64), device="cpu",
                  output=RunOutput(tmp_path / "runs", progress=False))
    pretrain(PretrainRequest(model="mlp", dataset="kmnist-sample", n=100), **common)
    finetune(FinetuneRequest(dataset="mnist-sample", model="mlp", n=100), **common)  # a from-scratch target
    base = ["attack-matrix", "--runs-dir", "runs", "--dataset", "mnist-sample", "--samples", "40", "--device", "cpu",
            "--no-progress"]
    code, out, err = run_cli(base + ["--attack", "fgsm", "--eps", "0.1"], capsys)
    assert code == 0, err
    assert run_cli(base + ["--attack", "pgd", "--steps", "1", "--eps", "0.1"], capsys)[0] == 0
    first, second = tmp_path / "results/matrix/mnist-sample-fgsm", tmp_path / "results/matrix/mnist-sample-pgd"
    assert (first / "cells.csv").is_file() and (second / "cells.csv").is_file()
    before = (first / "cells.csv").read_text()
    # Into the first one's folder explicitly: refused, one line naming the way out, nothing touched.
    assert_user_error(base + ["--attack", "pgd", "--steps", "1", "--eps", "0.1", "--out", str(first)], capsys,
                      "--out", "--force")
    assert (first / "cells.csv").read_text() == before
