"""Transfer predictors on known cases: a model against itself, differently seeded models, CKA invariances."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from transferlab.models import create_model
from transferlab.predictors import PAIR_COLUMNS, linear_cka, parameter_overlap, profile
from transferlab.runs import FinetuneRequest, PretrainRequest, RunOutput, finetune, pretrain
from transferlab.training import TrainConfig


def test_cka_is_invariant_to_rotation_and_isotropic_scaling_and_not_to_other_maps():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.7 * x @ rotation) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, x @ rotation + 5.0) == pytest.approx(1.0, abs=1e-10)  # centring removes the shift
    # An anisotropic scaling is not a similarity transform: CKA drops below 1.
    stretched = x * torch.linspace(0.05, 5.0, 12)
    assert linear_cka(x, stretched) < 0.95
    assert linear_cka(x, torch.randn(300, 12, generator=g)) < 0.2  # unrelated features


def test_parameter_overlap_counts_identical_tensors_and_measures_the_rest():
    torch.manual_seed(0)
    a = create_model("mlp", num_classes=10)
    b = create_model("mlp", num_classes=10)
    b.load_state_dict(a.state_dict())
    assert parameter_overlap(a, b) == (1.0, 0.0)
    tensors = list(b.parameters())
    with torch.no_grad():
        tensors[-1].add_(1.0)  # the last bias moves, everything else stays
    share, rel = parameter_overlap(a, b)
    assert share == pytest.approx((len(tensors) - 1) / len(tensors))
    assert rel == pytest.approx(float(tensors[-1].numel() ** 0.5 / list(a.parameters())[-1].detach().norm()), rel=1e-6)


@pytest.fixture(scope="module")
def pair_zoo(tmp_path_factory):
    runs = tmp_path_factory.mktemp("pzoo")
    common = dict(config=TrainConfig(epochs=2, batch_size=64, lr=2e-3, min_steps=0), device="cpu",
                  output=RunOutput(runs, progress=False))
    seed0 = pretrain(PretrainRequest(model="mlp", dataset="mnist-sample", n=400), seed=0, **common).run_dir
    seed1 = pretrain(PretrainRequest(model="mlp", dataset="mnist-sample", n=400), seed=1, **common).run_dir
    return seed0, seed1


def test_a_model_against_itself_scores_one_and_other_seeds_score_lower(pair_zoo, tmp_path):
    from transferlab.matrix import run_matrix

    result = run_matrix(sources=list(pair_zoo), targets=list(pair_zoo), dataset="mnist-sample",
                        attack_names=["fgsm"], eps_values=[0.1], samples=200, device="cpu", out_dir=tmp_path,
                        progress=False, white_box=False)
    pairs = pd.read_csv(tmp_path / "pairs.csv")
    assert list(pairs.columns) == PAIR_COLUMNS
    assert len(pairs) == 4  # every (crafter, evaluated) pair of the matrix
    pairs = pairs.set_index(["crafted_on", "evaluated"])
    a, b = (p.name for p in pair_zoo)
    for name in (a, b):
        self_row = pairs.loc[(name, name)]
        assert self_row["grad_cosine"] == pytest.approx(1.0, abs=1e-6)
        assert self_row["cka"] == pytest.approx(1.0, abs=1e-6)
        assert self_row["param_identical"] == 1.0 and self_row["param_rel_l2"] == 0.0
        assert self_row["clean_agreement"] == 1.0
    other = pairs.loc[(a, b)]
    assert other["grad_cosine"] < 0.99 and other["cka"] < 0.99
    assert other["param_identical"] == 0.0 and other["param_rel_l2"] > 0.1
    assert other["clean_agreement"] < 1.0
    # the pair rows cover the matrix's cells one to one
    assert set(pairs.index) == set(zip(result.cells["crafted_on"], result.cells["evaluated"]))


def test_frozen_tensors_count_as_identical(pair_zoo, tmp_path):
    from transferlab.store import load_run

    target = finetune(FinetuneRequest(dataset="mnist-sample", source=pair_zoo[0], n=300, freeze_n=2), device="cpu",
                      config=TrainConfig(epochs=1, batch_size=64, min_steps=0),
                      output=RunOutput(tmp_path, progress=False)).run_dir
    source_model, _ = load_run(pair_zoo[0])
    target_model, _ = load_run(target)
    share, rel = parameter_overlap(source_model, target_model)
    total = len(list(source_model.parameters()))
    assert share == pytest.approx(2 / total) and rel > 0


def test_profile_uses_the_classifier_input_as_features():
    torch.manual_seed(0)
    model = create_model("resnet", num_classes=10)
    images = torch.rand(8, 1, 28, 28)
    result = profile(model, images, None, batch_size=5)
    assert result.features.shape == (8, model.get_classifier().in_features)
    assert result.gradients.shape == (8, 28 * 28) and result.predictions.shape == (8,)


def test_a_stale_pair_file_is_recomputed_quietly_and_a_damaged_one_with_a_warning(pair_zoo, tmp_path):
    import json
    import warnings

    from transferlab.matrix import run_matrix

    args = dict(sources=list(pair_zoo), targets=list(pair_zoo), dataset="mnist-sample", attack_names=["fgsm"],
                eps_values=[0.1], samples=100, device="cpu", out_dir=tmp_path, progress=False, white_box=False)
    run_matrix(**args)
    expected = pd.read_csv(tmp_path / "pairs.csv")
    stale, damaged = sorted((tmp_path / "pairs").glob("*.json"))[:2]
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "key": "from-another-sample-set"}))
    damaged.write_text("{not json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_matrix(**args)
    messages = [str(w.message) for w in caught if "matrix cache file" in str(w.message)]
    assert messages == [f"matrix cache file {damaged} is damaged or foreign; computing it again"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "pairs.csv"), expected)


def test_a_two_attack_matrix_counts_each_pair_once_per_setting(pair_zoo, tmp_path):
    """pairs.csv carries every key of a cell, so the report joins it one to one: per setting as many pairs as
    distinct (crafted_on, evaluated), not one copy per attack (the old join counted 20 pairs where there were 10)."""
    from transferlab.matrix import run_matrix
    from transferlab.report.matrices import prepare_cells
    from transferlab.report.predictors import correlation_table, transfer_pairs

    run_matrix(sources=list(pair_zoo), targets=list(pair_zoo), dataset="mnist-sample", attack_names=["fgsm", "pgd"],
               eps_values=[0.1], steps=2, samples=60, device="cpu", out_dir=tmp_path, progress=False,
               white_box=False)
    pairs = pd.read_csv(tmp_path / "pairs.csv")
    cells = prepare_cells(pd.read_csv(tmp_path / "cells.csv"))
    assert list(pairs.columns) == PAIR_COLUMNS
    assert not pairs.duplicated(["crafted_on", "evaluated", "attack", "eps", "seed"]).any()
    merged = transfer_pairs(cells, pairs)
    per_setting = merged.groupby(["attack", "eps"]).size()
    distinct = merged.drop_duplicates(["crafted_on", "evaluated"]).shape[0]
    assert len(per_setting) == 2 and (per_setting == distinct).all() and distinct == 2  # a->b, b->a
    table = correlation_table(merged, n_resamples=50)
    assert (table["pairs"] <= distinct).all()
    # A study concatenates its attack folders' tables: a repeated key is refused, not double-counted.
    from transferlab.errors import UserError

    with pytest.raises(UserError, match="holds a pair twice"):
        transfer_pairs(cells, pd.concat([pairs, pairs]))
