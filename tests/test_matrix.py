"""The attack matrix: crafting once per model, caching, tidy cells, lineage tests and bad input."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from helpers import assert_user_error, run_cli
from transferlab import attacks
from transferlab.errors import UserError
from transferlab.matrix import run_matrix
from transferlab.tables import CELL_COLUMNS
from transferlab.runs import FinetuneRequest, PretrainRequest, RunOutput, finetune, pretrain
from transferlab.training import TrainConfig

CONFIG = TrainConfig(epochs=2, batch_size=64, lr=2e-3)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Two MLP sources (KMNIST, Fashion-MNIST samples), a fine-tune of each and a from-scratch run on MNIST."""
    runs = tmp_path_factory.mktemp("zoo")
    common = dict(config=CONFIG, device="cpu", output=RunOutput(runs, progress=False))
    kmnist = pretrain(PretrainRequest(model="mlp", dataset="kmnist-sample", n=600), **common).run_dir
    fmnist = pretrain(PretrainRequest(model="mlp", dataset="fmnist-sample", n=600), **common).run_dir
    targets = [finetune(FinetuneRequest(dataset="mnist-sample", source=src, n=600, freeze_n=2), **common).run_dir
               for src in (kmnist, fmnist)]
    scratch = finetune(FinetuneRequest(dataset="mnist-sample", model="mlp", n=600), **common).run_dir
    return {"runs": runs, "sources": [kmnist, fmnist], "targets": targets, "scratch": scratch}


class CountingCraft:
    def __init__(self):
        self.calls = []

    def __call__(self, model, images, labels, attack, eps, **kwargs):
        self.calls.append((attack, eps))
        return attacks.craft(model, images, labels, attack, eps, **kwargs)


def _matrix(zoo, out, **kwargs):
    settings = dict(sources=zoo["sources"], targets=zoo["targets"], dataset="mnist-sample", attack_names=["fgsm"],
                    eps_values=[0.1], samples=200, device="cpu", out_dir=out, progress=False)
    settings.update(kwargs)
    return run_matrix(**settings)


@pytest.mark.slow  # over 0.7 s on 2 cores: the full suite (--all) runs it
def test_crafts_once_per_source_and_caches(zoo, tmp_path):
    counter = CountingCraft()
    result = _matrix(zoo, tmp_path, eps_values=[0.1, 0.2], white_box=False, craft_fn=counter)
    S, T = len(zoo["sources"]), len(zoo["targets"])
    assert len(counter.calls) == S * 2 and result.crafted == S * 2  # S sources x 2 eps, never per target
    # Every source's examples hit every target and the source itself: (T + S) cells per set.
    assert len(result.cells) == S * 2 * (T + S)

    # Same matrix plus one more target: nothing is crafted again, the new target gets its cells.
    again = CountingCraft()
    more = _matrix(zoo, tmp_path, eps_values=[0.1, 0.2], white_box=False, craft_fn=again,
                   targets=zoo["targets"] + [zoo["scratch"]])
    assert again.calls == [] and more.reused == S * 2
    assert set(more.cells["evaluated"]) >= {zoo["scratch"].name}
    old = result.cells.set_index(["crafted_on", "evaluated", "eps"])["adversarial_accuracy"]
    new = more.cells.set_index(["crafted_on", "evaluated", "eps"])["adversarial_accuracy"]
    assert (new.loc[old.index] == old).all()


def test_white_box_diagonal_crafts_on_targets_too(zoo, tmp_path):
    counter = CountingCraft()
    result = _matrix(zoo, tmp_path, white_box=True, craft_fn=counter)
    assert len(counter.calls) == len(zoo["sources"]) + len(zoo["targets"])
    white = result.cells[result.cells["white_box"]]
    assert set(white["evaluated"]) == {p.name for p in zoo["sources"] + zoo["targets"]}
    assert (white["crafted_on"] == white["evaluated"]).all()
    # Only the sources' sets stay on disk (a full grid would otherwise keep one per target and setting);
    # every result is cached, so the same matrix again crafts nothing.
    assert len(list((tmp_path / "adversarial").glob("*.safetensors"))) == len(zoo["sources"])
    again = CountingCraft()
    repeat = _matrix(zoo, tmp_path, white_box=True, craft_fn=again)
    assert again.calls == []
    pd.testing.assert_frame_equal(repeat.cells, result.cells)


def test_eps_zero_reproduces_clean_accuracy_exactly(zoo, tmp_path):
    cells = _matrix(zoo, tmp_path, eps_values=[0.0], attack_names=["pgd"], steps=2).cells
    assert (cells["adversarial_accuracy"] == cells["clean_accuracy"]).all()
    assert (cells["attack_success_rate"] == 0).all()


@pytest.mark.slow  # over 0.7 s on 2 cores: the full suite (--all) runs it
def test_cells_are_tidy_and_complete(zoo, tmp_path):
    result = _matrix(zoo, tmp_path, eps_values=[0.1, 0.3], attack_names=["fgsm", "pgd"], steps=2, scope="full")
    cells = pd.read_csv(tmp_path / "cells.csv")
    assert list(cells.columns) == CELL_COLUMNS
    S, T = len(zoo["sources"]), len(zoo["targets"])
    crafters, evaluated = S + T, S + T
    assert len(cells) == crafters * evaluated * 2 * 2
    assert not cells.duplicated(["crafted_on", "evaluated", "attack", "eps", "seed"]).any()
    assert set(cells["samples"]) == {200}
    assert ((cells["ci_low"] <= cells["adversarial_accuracy"]) & (cells["adversarial_accuracy"] <= cells["ci_high"])).all()
    assert (cells["adversarial_correct"] == (cells["adversarial_accuracy"] * 200).round().astype(int)).all()
    # Label policy auto: KMNIST/Fashion sources attack away from their own prediction, MNIST models use the labels.
    policy = cells.drop_duplicates("crafted_on").set_index("crafted_on")["label_policy"]
    assert policy[zoo["sources"][0].name] == "pred" and policy[zoo["targets"][0].name] == "true"
    # A source with other classes is scored against its own clean predictions, so its clean accuracy is 100%.
    own = cells[(cells["evaluated"] == zoo["sources"][0].name)]
    assert (own["reference_labels"] == "own clean predictions").all() and (own["clean_accuracy"] == 1.0).all()
    # Stronger attacks hurt more: PGD at 0.3 beats FGSM at 0.1 on the white-box cells.
    white = cells[cells["white_box"]].groupby(["attack", "eps"])["adversarial_accuracy"].mean()
    assert white[("pgd", 0.3)] < white[("fgsm", 0.1)]
    # Per-sample correctness is on disk for paired tests.
    files = list((tmp_path / "correct").glob("*/*.safetensors"))  # one per (set, evaluated model)
    assert len(files) == crafters * 2 * 2 * evaluated
    assert all(len(t) == 200 for t in load_file(str(files[0])).values())


@pytest.mark.slow  # two matrices with white-box sets
def test_scope_sources_scores_white_box_sets_on_their_own_target_only(zoo, tmp_path):
    S, T = len(zoo["sources"]), len(zoo["targets"])
    cells = _matrix(zoo, tmp_path, eps_values=[0.1, 0.3], white_box=True).cells  # scope "sources" is the default
    # Every model on the sources' sets; each target on its own white-box set alone.
    assert len(cells) == S * 2 * (S + T) + T * 2
    target_rows = cells[cells["crafted_on_role"].isin(["finetuned", "scratch"])]
    assert (target_rows["crafted_on"] == target_rows["evaluated"]).all() and target_rows["white_box"].all()
    full = _matrix(zoo, tmp_path / "full", eps_values=[0.1, 0.3], white_box=True, scope="full").cells
    # The cells both scopes have are the same numbers.
    keys = ["crafted_on", "evaluated", "attack", "eps"]
    both = cells.merge(full, on=keys, suffixes=("", "_full"))
    assert len(both) == len(cells) and (both["adversarial_correct"] == both["adversarial_correct_full"]).all()
    with pytest.raises(UserError, match="--scope"):
        _matrix(zoo, tmp_path, scope="everything")


def test_lineage_compares_own_source_with_other_sources(zoo, tmp_path):
    lineage = _matrix(zoo, tmp_path, eps_values=[0.2]).lineage
    assert len(lineage) == 2  # each target: its own source vs the one other MLP source
    row = lineage.set_index("finetuned").loc[zoo["targets"][0].name]
    assert row["pretrained_from"] == zoo["sources"][0].name and row["other_pretrained"] == zoo["sources"][1].name
    assert 0 <= row["mcnemar_p"] <= 1
    assert row["difference"] == pytest.approx(row["acc_own"] - row["acc_other"])


@pytest.mark.slow  # PGD matrix and every figure through the CLI
def test_cli_matrix_end_to_end_on_sample_data(zoo, tmp_path, capsys):
    started = time.perf_counter()
    code, out, err = run_cli(["attack-matrix", "--runs-dir", zoo["runs"], "--select", "pre_*",
                              "--select-targets", "final_*", "--dataset", "mnist-sample", "--attack", "pgd",
                              "--eps", "0.1,8/255", "--steps", "3", "--samples", "300", "--device", "cpu",
                              "--out", tmp_path, "--no-progress"], capsys)
    assert code == 0, err
    assert time.perf_counter() - started < 60
    assert "attack matrix" in out
    for name in ("cells.csv", "lineage.csv", "summary.md", "matrix_pgd_0.1.csv", "matrix_pgd_0.1.md",
                 "matrix_pgd_0.1.tex", "heatmap_pgd_0.1.png", "eps_curves.png", "examples.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    cells = pd.read_csv(tmp_path / "cells.csv")
    assert sorted(set(cells["eps"].round(4))) == [round(8 / 255, 4), 0.1]


# ------------------------------------------------------------------ bad input
def _cli(zoo, out, *extra):
    base = ["attack-matrix", "--sources", zoo["sources"][0], "--targets", zoo["targets"][0], "--dataset",
            "mnist-sample", "--samples", "100", "--device", "cpu", "--out", out, "--no-progress"]
    # An option given in extra replaces the default above (giving one option twice is an error).
    for flag in {e for e in extra if str(e).startswith("--")} & set(base):
        at = base.index(flag)
        del base[at:at + 2]
    return base + [str(e) for e in extra]


def test_bad_eps_steps_and_attack(zoo, tmp_path, capsys):
    out = tmp_path / "o"
    assert_user_error(_cli(zoo, out, "--eps", "-0.1"), capsys, "-0.1")
    assert_user_error(_cli(zoo, out, "--eps", "1.5"), capsys, "1.5")
    assert_user_error(_cli(zoo, out, "--steps", "0"), capsys, "steps")
    line = assert_user_error(_cli(zoo, out, "--attack", "pgdd"), capsys, "pgdd")
    assert "fgsm" in line and "mifgsm" in line
    assert not out.exists()


def test_bad_runs_and_samples(zoo, tmp_path, capsys):
    out = tmp_path / "o"
    assert_user_error(["attack-matrix", "--targets", zoo["targets"][0], "--dataset", "mnist-sample",
                       "--out", out], capsys, "no source")
    assert_user_error(["attack-matrix", "--sources", zoo["sources"][0], "--dataset", "mnist-sample",
                       "--out", out], capsys, "no target")
    assert_user_error(["attack-matrix", "--sources", zoo["sources"][0], "--targets", zoo["targets"][0],
                       "--dataset", "fmnist-sample", "--out", out], capsys, "fmnist-sample")
    assert_user_error(_cli(zoo, out, "--samples", "5000"), capsys, "5000", "900")
    assert not out.exists() or not (out / "cells.csv").exists()


def test_runs_on_different_canvases_are_refused(zoo, tmp_path, capsys):
    rgb = pretrain(PretrainRequest(model="mlp", dataset="fmnist-sample", n=100, canvas="rgb32"),
                   config=TrainConfig(epochs=1), device="cpu",
                   output=RunOutput(tmp_path, name="rgb", progress=False)).run_dir
    assert_user_error(["attack-matrix", "--sources", rgb, "--targets", zoo["targets"][0], "--dataset",
                       "mnist-sample", "--out", tmp_path / "o"], capsys, "canvas")


@pytest.mark.slow  # crafts on an ensemble and scores every model
def test_ensemble_crafts_once_on_mean_logits_within_eps(zoo, tmp_path):
    from transferlab.ensemble import MeanLogits

    crafted = []

    def craft(model, images, labels, attack, eps, **kwargs):
        adversarial = attacks.craft(model, images, labels, attack, eps, **kwargs)
        if isinstance(model, MeanLogits):
            crafted.append((attack, eps, len(model.members)))
            assert (adversarial - images).abs().max() <= eps + 1e-6  # the eps ball holds for the ensemble too
        return adversarial

    kmnist, fmnist = (p.name for p in zoo["sources"])
    own_target = zoo["targets"][0].name  # fine-tuned from the KMNIST source
    result = _matrix(zoo, tmp_path, attack_names=["pgd"], eps_values=[0.1, 0.2], white_box=False, craft_fn=craft,
                     steps=3, ensembles=[f"{kmnist},{fmnist}", f"{kmnist},{own_target}"])
    assert sorted(crafted) == [("pgd", 0.1, 2), ("pgd", 0.1, 2), ("pgd", 0.2, 2), ("pgd", 0.2, 2)]
    rows = result.cells[result.cells["crafted_on_role"] == "ensemble"]
    mixed = rows[rows["crafted_on"] == f"ensemble({kmnist}+{fmnist})"]
    assert len(mixed) == 2 * len(set(result.cells["evaluated"])) and (mixed["crafted_on_model"] == "ensemble").all()
    assert not mixed["same_pretraining"].any()  # members of two pretrainings: never "same pretraining"
    kin = rows[rows["crafted_on"] == f"ensemble({kmnist}+{own_target})"].set_index("evaluated")
    assert kin.loc[own_target, "same_pretraining"].all()  # every member descends from the KMNIST source
    pairs = pd.read_csv(tmp_path / "pairs.csv")
    assert f"ensemble({kmnist}+{fmnist})" in set(pairs["crafted_on"])
    # a second run crafts nothing: the ensemble's sets are cached like the sources'
    crafted.clear()
    _matrix(zoo, tmp_path, attack_names=["pgd"], eps_values=[0.1, 0.2], white_box=False, craft_fn=craft, steps=3,
            ensembles=[f"{kmnist},{fmnist}", f"{kmnist},{own_target}"])
    assert crafted == []


def test_ensemble_member_must_be_a_matrix_run(zoo, tmp_path):
    with pytest.raises(UserError, match="ensemble member 'nope'"):
        _matrix(zoo, tmp_path, ensembles=[f"{zoo['sources'][0].name},nope"])
    with pytest.raises(UserError, match="at least two"):
        _matrix(zoo, tmp_path, ensembles=[zoo["sources"][0].name])


@pytest.mark.slow  # a matrix over every run of the folder
def test_runs_dir_default_targets_include_scratch_runs(zoo, tmp_path, capsys):
    code, _, err = run_cli(["attack-matrix", "--runs-dir", zoo["runs"], "--dataset", "mnist-sample", "--attack",
                            "fgsm", "--eps", "0.1", "--samples", "100", "--no-white-box", "--device", "cpu",
                            "--out", tmp_path, "--no-progress"], capsys)
    assert code == 0, err
    evaluated = set(pd.read_csv(tmp_path / "cells.csv")["evaluated"])
    assert zoo["scratch"].name in evaluated and {t.name for t in zoo["targets"]} <= evaluated
    assert zoo["scratch"].name.startswith("scratch_")


def _as_schema_3(folder: Path) -> None:
    """Rewrite a matrix folder's tables, pair files and matrix.json as attack-matrix schema 3 wrote them."""
    import json

    from transferlab.tables import V3_CELL_NAMES, V3_LINEAGE_NAMES, V3_PAIR_NAMES

    cells = pd.read_csv(folder / "cells.csv")
    for side in ("crafted_on", "evaluated"):  # schema 3 roles: the list a run came in
        cells[f"{side}_role"] = cells[f"{side}_role"].map(
            {"pretrained": "source", "finetuned": "target", "scratch": "target", "ensemble": "ensemble"})
    for name, names in (("cells", V3_CELL_NAMES), ("lineage", V3_LINEAGE_NAMES), ("pairs", V3_PAIR_NAMES)):
        table = cells if name == "cells" else pd.read_csv(folder / f"{name}.csv")
        table.rename(columns={new: old for old, new in names.items()}).to_csv(folder / f"{name}.csv", index=False)
    for path in (folder / "pairs").glob("*.json"):
        cached = json.loads(path.read_text())
        cached["row"] = {{new: old for old, new in V3_PAIR_NAMES.items()}.get(k, k): v for k, v in cached["row"].items()}
        path.write_text(json.dumps(cached))
    info = json.loads((folder / "matrix.json").read_text())
    (folder / "matrix.json").write_text(json.dumps({**info, "schema": 3}))


@pytest.mark.slow  # a matrix, then merged again
def test_a_schema_3_matrix_folder_is_read_with_a_warning_and_merged_again_without_crafting(zoo, tmp_path):
    from transferlab.report import write_study_report
    from transferlab.report.matrices import read_cells

    result = _matrix(zoo, tmp_path, targets=zoo["targets"] + [zoo["scratch"]])
    _as_schema_3(tmp_path)
    # The report reads the old tables in the new names (roles translated), saying so in one line.
    with pytest.warns(UserWarning, match="column names of attack-matrix schema 3") as caught:
        cells = read_cells(tmp_path / "cells.csv")
    assert all("\n" not in str(w.message) for w in caught)
    assert list(cells.columns) == CELL_COLUMNS
    roles = cells.drop_duplicates("evaluated").set_index("evaluated")["evaluated_role"]
    assert roles[zoo["scratch"].name] == "scratch" and roles[zoo["targets"][0].name] == "finetuned"
    assert roles[zoo["sources"][0].name] == "pretrained"
    with pytest.warns(UserWarning, match="schema 3"):
        write_study_report(tmp_path, formats=("md",))
    assert "crafted on" in (tmp_path / "report.md").read_text()

    # The same matrix again: every result comes from the cached files (keyed as before), the tables are new.
    counter = CountingCraft()
    again = _matrix(zoo, tmp_path, targets=zoo["targets"] + [zoo["scratch"]], craft_fn=counter)
    assert counter.calls == [] and again.crafted == 0
    written = pd.read_csv(tmp_path / "cells.csv")
    assert list(written.columns) == CELL_COLUMNS and "crafted_on" in pd.read_csv(tmp_path / "pairs.csv").columns
    assert "pretrained_from" in pd.read_csv(tmp_path / "lineage.csv").columns
    keys = ["crafted_on", "evaluated", "eps", "adversarial_accuracy", "crafted_on_role", "evaluated_role"]
    pd.testing.assert_frame_equal(again.cells[keys], result.cells[keys])
    pd.testing.assert_frame_equal(again.pairs, result.pairs)


# ------------------------------------------------------------------ norms
def test_linf_set_keys_are_the_keys_they_had_before_norms():
    """An Linf set's content key leaves the norm out, so every set crafted before L2 existed is still found
    (these keys were computed by the code before the norm option)."""
    from types import SimpleNamespace

    from transferlab.matrix import AttackSetting
    from transferlab.matrix.craft import _set_key

    crafter = SimpleNamespace(weights_sha256="0" * 64)
    keys = {a: _set_key(crafter, AttackSetting(a, 0.1, attacks.attack_params(a, 0.1)), "true", "f" * 16, 0, "auto")
            for a in ("fgsm", "pgd", "torchattacks:APGD")}
    assert keys == {"fgsm": "2b0344b931db2bc3", "pgd": "fa45b09a9dc1fc13", "torchattacks:APGD": "a7558a7623c63448"}
    l2 = attacks.attack_params("pgd", 0.1, norm="L2")
    assert _set_key(crafter, AttackSetting("pgd-L2", 0.1, l2, attack="pgd"), "true", "f" * 16, 0, "auto") \
        not in keys.values()


@pytest.mark.slow  # an L2 matrix of two attacks with white-box sets, through the CLI
def test_an_l2_matrix_runs_end_to_end(zoo, tmp_path, capsys):
    code, _, err = run_cli(_cli(zoo, tmp_path, "--attack", "fgsm,pgd", "--attack-opt", "norm=L2", "--eps", "2",
                                "--steps", "3", "--scope", "full"), capsys)
    assert code == 0, err
    cells = pd.read_csv(tmp_path / "cells.csv")
    assert list(cells.columns) == CELL_COLUMNS  # Linf tables keep their columns: the norm is in the label
    assert set(cells["attack"]) == {"fgsm-L2", "pgd-L2"} and set(cells["eps"]) == {2.0}
    assert cells["attack_params"].str.contains('"norm":"L2"').all()
    assert not cells.duplicated(["crafted_on", "evaluated", "attack", "eps", "seed"]).any()
    white = cells[cells["white_box"]]
    assert (white["adversarial_accuracy"] < white["clean_accuracy"]).all()
    # Each kept set records its norm and lies in the L2 ball (the check a read-back set passes too).
    sets = list((tmp_path / "adversarial").glob("*.safetensors"))
    assert sets and all("-L2_" in p.name for p in sets)
    from safetensors import safe_open

    for path in sets:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        assert metadata["norm"] == "L2" and metadata["attack"] in ("fgsm-L2", "pgd-L2")
    # The same matrix again crafts nothing: every set and result is read back under its L2 key.
    code, out, err = run_cli(_cli(zoo, tmp_path, "--attack", "fgsm,pgd", "--attack-opt", "norm=L2", "--eps", "2",
                                  "--steps", "3", "--scope", "full"), capsys)
    assert code == 0 and "0 adversarial sets crafted" in out, (out, err)


def test_a_cached_set_is_checked_against_its_own_norm(tmp_path):
    """A set read back must lie in the ball of its norm: every pixel moved by 0.1 is inside the Linf ball of
    eps 1 but 2.8 long in L2, so as an L2 set of eps 1 it is crafted again."""
    import torch

    from transferlab import store
    from transferlab.matrix.craft import _load_cached_set

    clean = torch.full((3, 1, 28, 28), 0.5)
    path = tmp_path / "set.safetensors"
    store.save_checked_tensors(path, {"adversarial": clean + 0.1}, metadata={"key": "k"})
    assert _load_cached_set(path, "k", clean, 1.0) is not None
    with pytest.warns(UserWarning, match="L2 eps ball"):
        assert _load_cached_set(path, "k", clean, 1.0, "L2") is None


def test_bad_norms_are_one_line_errors(zoo, tmp_path, capsys):
    out = tmp_path / "o"
    line = assert_user_error(_cli(zoo, out, "--attack", "mifgsm", "--attack-opt", "norm=L2", "--eps", "1"), capsys,
                             "mifgsm has no L2 form")
    assert "fgsm, pgd" in line
    assert_user_error(_cli(zoo, out, "--attack-opt", "norm=L3"), capsys, "unknown norm 'L3'", "Linf", "L2")
    assert_user_error(_cli(zoo, out, "--eps", "2"), capsys, "norm=L2")  # an eps above 1 needs L2
    assert not out.exists()
