"""Tests for transferlab.report on small synthetic studies with known numbers.

The synthetic study: two alexnet sources (pretrained on kmnist and fmnist), three targets
fine-tuned on MNIST (two from kmnist, one from fmnist), two eps values, two seeds. Every
model is also attacked white-box. Adversarial accuracy is built from a formula, so the
pivots, the lineage differences and the hypothesis verdict are known in advance.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.image import imread
from safetensors.torch import save_file

from helpers import assert_user_error, run_cli
from transferlab.errors import UserError
from transferlab.stats import wilson_interval
from transferlab.report import eps_label, hypothesis_summary, pivot_matrix, write_matrix_outputs, write_study_report
from transferlab.report.study_report import SECTIONS

SOURCES = {"pre_alexnet_kmnist": "kmnist", "pre_alexnet_fmnist": "fmnist"}
TARGETS = {"final_alexnet_kmnist_mnist_f0": "pre_alexnet_kmnist", "final_alexnet_kmnist_mnist_f8": "pre_alexnet_kmnist",
           "final_alexnet_fmnist_mnist_f0": "pre_alexnet_fmnist"}
EPS = (0.1, 0.2)
SEEDS = (0, 1)
SAMPLES = 1000


def _root(run: str) -> str:
    """Which pretrained weights a run descends from."""
    return TARGETS.get(run, run)


def accuracy(crafter: str, evaluated: str, eps: float, seed: int, own_gap: float) -> float:
    """White-box 2%; own-lineage transfer 60% - eps - own_gap; other transfer 60% - eps; +1 point for seed 1."""
    if crafter == evaluated:
        base = 0.02
    elif _root(crafter) == _root(evaluated):
        base = 0.60 - eps - own_gap
    else:
        base = 0.60 - eps
    return round(base + 0.01 * seed, 6)


def make_cells(own_gap: float = 0.3, suffix_seeds: bool = False, seeds=SEEDS) -> pd.DataFrame:
    rows = []
    runs = {**{s: "pretrained" for s in SOURCES}, **{t: "finetuned" for t in TARGETS}}
    crafters = list(SOURCES) + list(TARGETS)  # sources, then the white-box diagonal of the targets
    evaluated = list(TARGETS) + list(SOURCES)
    for seed in seeds:
        name = (lambda run: f"{run}_s{seed}") if suffix_seeds else (lambda run: run)
        for eps in EPS:
            for c in crafters:
                for e in evaluated:
                    acc = accuracy(c, e, eps, seed, own_gap)
                    rows.append({
                        "crafted_on": name(c), "evaluated": name(e),
                        "crafted_on_dataset": SOURCES.get(c, "mnist"), "evaluated_dataset": SOURCES.get(e, "mnist"),
                        "crafted_on_model": "alexnet", "evaluated_model": "alexnet",
                        "crafted_on_pretrain_dataset": SOURCES[_root(c)],
                        "evaluated_pretrain_dataset": SOURCES[_root(e)],
                        "crafted_on_role": runs[c], "evaluated_role": runs[e], "attack": "pgd", "eps": eps, "steps": 10,
                        "label_policy": "true", "seed": seed, "samples": SAMPLES,
                        "clean_correct": 950, "clean_accuracy": 0.95,
                        "adversarial_correct": round(acc * SAMPLES), "adversarial_accuracy": acc,
                        "attack_success_rate": 1 - acc / 0.95, "ci_low": acc - 0.03, "ci_high": acc + 0.03,
                        "same_pretraining": _root(c) == _root(e), "white_box": c == e,
                        "evaluated_n": None if runs[e] == "pretrained" else 60000,
                        "evaluated_freeze": 8 if e.endswith("f8") else (0 if runs[e] == "finetuned" else None),
                    })
    return pd.DataFrame(rows)


def make_lineage(own_gap: float = 0.3, jitter: float = 0.0, seeds=SEEDS) -> pd.DataFrame:
    """One row per target x other source x eps x seed; ``jitter`` alternates the sign of a small extra difference."""
    rows = []
    for seed in seeds:
        for eps in EPS:
            for k, (target, own) in enumerate(TARGETS.items()):
                other = next(s for s in SOURCES if s != own)
                acc_own = accuracy(own, target, eps, seed, own_gap) + jitter * (-1) ** (k + seed)
                acc_other = accuracy(other, target, eps, seed, own_gap)
                diff = acc_own - acc_other
                rows.append({
                    "finetuned": target, "finetuned_model": "alexnet", "pretrained_from": own,
                    "other_pretrained": other,
                    "attack": "pgd", "eps": eps, "seed": seed, "samples": SAMPLES, "acc_own": acc_own,
                    "acc_other": acc_other, "difference": diff, "diff_ci_low": diff - 0.03,
                    "diff_ci_high": diff + 0.03, "own_only_correct": 10, "other_only_correct": 10 + round(-diff * 1000),
                    "mcnemar_statistic": 5.0, "mcnemar_p": 0.001 if abs(diff) > 0.05 else 0.6,
                    "method": "chi-square with continuity correction",
                })
    return pd.DataFrame(rows)


def make_examples(path, k: int = 4) -> None:
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(k, 1, 28, 28, generator=g)
    tensors = {"clean": clean}
    for name in SOURCES:
        tensors[f"adv/{name}"] = (clean + 0.2 * torch.sign(torch.randn(k, 1, 28, 28, generator=g))).clamp(0, 1)
    save_file(tensors, str(path), metadata={"attack": "pgd", "eps": "0.2"})


def make_runs() -> pd.DataFrame:
    rows = []
    for seed in SEEDS:
        for model in ("alexnet", "resnet"):
            for dataset in ("kmnist", "fmnist"):
                rows.append({"name": f"pre_{model}_{dataset}_s{seed}", "kind": "pretrain", "model": model,
                             "dataset": dataset, "pretrain_dataset": dataset, "n": None, "freeze": None,
                             "seed": seed, "train_accuracy": 0.98 + 0.01 * seed, "test_accuracy": 0.90,
                             "duration_s": 12.5, "images_per_second": 48000.0, "device": "cpu"})
            rows.append({"name": f"final_{model}_kmnist_mnist_f0_s{seed}", "kind": "finetune", "model": model,
                         "dataset": "mnist", "pretrain_dataset": "kmnist", "n": None, "freeze": 0, "seed": seed,
                         "train_accuracy": 0.99, "test_accuracy": 0.975, "duration_s": 10.0,
                         "images_per_second": 50000.0, "device": "cpu"})
            rows.append({"name": f"scratch_{model}_mnist10000_s{seed}", "kind": "scratch", "model": model,
                         "dataset": "mnist", "pretrain_dataset": None, "n": 10000, "freeze": None, "seed": seed,
                         "train_accuracy": 0.995, "test_accuracy": 0.97, "duration_s": 3.0,
                         "images_per_second": 40000.0, "device": "cpu"})
    return pd.DataFrame(rows)


def make_study(tmp_path, own_gap: float = 0.3, matrix: bool = True):
    study = tmp_path / "study"
    study.mkdir()
    make_runs().to_csv(study / "runs.csv", index=False)
    (study / "study.json").write_text(json.dumps({
        "study": "reference", "seeds": list(SEEDS), "device": "cpu",
        "versions": {"transferlab": "0.1.0", "torch": torch.__version__},
        "data_provenance": {"mnist": {"source": "torchvision", "sha256": "abc123"}},
        "wall_time_s": 123.4, "steps": [{"id": "pre_a", "kind": "pretrain", "seconds": 12.5},
                                        {"id": "fin_a", "kind": "finetune", "seconds": 10.0}],
    }))
    if matrix:
        (study / "matrix").mkdir()
        make_cells(own_gap).to_csv(study / "matrix" / "cells.csv", index=False)
        make_lineage(own_gap).to_csv(study / "matrix" / "lineage.csv", index=False)
        make_examples(study / "matrix" / "examples.safetensors")
    return study


# ------------------------------------------------------------------ pivots
def test_eps_label_is_compact():
    assert eps_label(0.1) == "0.1"
    assert eps_label(8 / 255) == "0.0314"
    assert eps_label(0.3) == "0.3"


def test_pivot_matrix_orders_roles_and_averages_seeds():
    matrix = pivot_matrix(make_cells(), "pgd", 0.1)
    assert matrix.shape == (5, 5)
    # One order on both axes (sources, then targets), so the white-box cells form the diagonal.
    assert list(matrix.index) == ["pre_alexnet_fmnist", "pre_alexnet_kmnist", "final_alexnet_fmnist_mnist_f0",
                                  "final_alexnet_kmnist_mnist_f0", "final_alexnet_kmnist_mnist_f8"]
    assert list(matrix.columns) == list(matrix.index)
    white = pivot_matrix(make_cells(), "pgd", 0.1, value="white_box").astype(bool).to_numpy()
    assert (white == np.eye(5, dtype=bool)).all()
    # Mean over seeds 0 and 1 adds half a point to each formula value.
    assert matrix.loc["pre_alexnet_kmnist", "final_alexnet_kmnist_mnist_f0"] == pytest.approx(0.60 - 0.1 - 0.3 + 0.005)
    assert matrix.loc["pre_alexnet_fmnist", "final_alexnet_kmnist_mnist_f0"] == pytest.approx(0.60 - 0.1 + 0.005)
    assert matrix.loc["pre_alexnet_kmnist", "pre_alexnet_kmnist"] == pytest.approx(0.025)
    clean = pivot_matrix(make_cells(), "pgd", 0.2, value="clean_accuracy")
    assert np.allclose(clean.to_numpy(), 0.95)


def test_pivot_matrix_lines_up_seed_suffixed_run_names():
    matrix = pivot_matrix(make_cells(suffix_seeds=True), "pgd", 0.2)
    assert matrix.shape == (5, 5)  # pre_alexnet_kmnist_s0 and _s1 share one row
    assert matrix.loc["pre_alexnet_kmnist", "final_alexnet_kmnist_mnist_f8"] == pytest.approx(0.60 - 0.2 - 0.3 + 0.005)
    one_seed = make_cells(suffix_seeds=True).query("seed == 0")
    assert "pre_alexnet_kmnist_s0" in pivot_matrix(one_seed, "pgd", 0.2).index  # nothing to merge: names kept


def test_attacks_with_several_step_counts_are_kept_apart():
    cells = pd.concat([make_cells(), make_cells(own_gap=0.0).assign(steps=40)])
    assert pivot_matrix(cells, "pgd_k40", 0.1).loc["pre_alexnet_kmnist", "final_alexnet_kmnist_mnist_f0"] == \
        pytest.approx(0.505)
    assert pivot_matrix(cells, "pgd_k10", 0.1).loc["pre_alexnet_kmnist", "final_alexnet_kmnist_mnist_f0"] == \
        pytest.approx(0.205)


def test_pivot_matrix_unknown_setting_is_a_user_error():
    with pytest.raises(UserError, match="available: pgd eps=0.1, pgd eps=0.2"):
        pivot_matrix(make_cells(), "fgsm", 0.1)


# -------------------------------------------------------------- hypothesis
def test_hypothesis_summary_yes_when_own_source_transfers_better():
    s = hypothesis_summary(make_lineage(own_gap=0.3, seeds=(0, 1, 2)))
    assert s["verdict"] == "yes"
    # The unit is the pretraining run: 2 sources x 3 seeds, not 3 targets x 3 seeds.
    assert s["units"] == 6 and s["unit"] == "pretraining run" and s["rows"] == 18
    assert s["targets"] == 3 and s["seeds"] == 3
    assert s["mean_difference_points"] == pytest.approx(-30.0)
    assert s["p_value"] == pytest.approx(2 / 64)  # every one of 6 units negative: the exact test's floor
    assert s["mcnemar_own_better"] == 18 and s["mcnemar_other_better"] == 0
    assert s["cohens_h"] < -0.5
    assert s["sentence"].startswith("Yes: adversarial examples crafted on a target's own source lowered its "
                                    "accuracy by 30.0 points more")
    assert "over 6 pretraining runs, the unit of the test" in s["sentence"]
    assert "Unadjusted for source strength" in s["sentence"]  # no cells, so no from-scratch targets


def test_targets_of_one_source_run_are_one_unit_not_several():
    """Two fine-tunes of one source run (f0 and f8 of pre_alexnet_kmnist) share the source model: with 2 seeds
    there are 4 pretraining runs, whose smallest p (2/16) cannot reach 0.05, however many targets there are."""
    s = hypothesis_summary(make_lineage(own_gap=0.3))
    assert s["units"] == 4 and s["verdict"] == "too few repeats"
    assert s["smallest_possible_p"] == pytest.approx(2 / 16) and s["units_short"] == 2
    assert "with 4 pretraining runs (the unit of the test)" in s["sentence"] and "at least 2 more" in s["sentence"]


def test_hypothesis_summary_no_clear_difference_when_equal():
    s = hypothesis_summary(make_lineage(own_gap=0.0, jitter=0.01, seeds=(0, 1, 2)))
    assert s["verdict"] == "no clear difference"
    assert s["p_value"] > 0.05
    assert s["mcnemar_significant"] == 0
    assert s["sentence"].startswith("No clear difference:")


@pytest.mark.slow  # over 0.7 s on 2 cores: the full suite (--all) runs it
def test_hypothesis_summary_opposite_and_edge_cases():
    assert hypothesis_summary(make_lineage(own_gap=-0.2, seeds=(0, 1, 2)))["verdict"] == "opposite"
    empty = hypothesis_summary(make_lineage().iloc[0:0])
    assert empty["verdict"] == "not testable" and empty["sentence"].startswith("Not testable")
    assert hypothesis_summary(None)["testable"] is False
    # Two pretraining runs can never give p < 0.05 with an exact sign-flip test: say so instead.
    few = hypothesis_summary(make_lineage().query("seed == 0"))
    assert few["verdict"] == "too few repeats" and "cannot reach p < 0.05" in few["sentence"]


# ---------------------------------------------------------- matrix outputs
@pytest.fixture(scope="module")
def matrix_outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("matrix")
    make_examples(out / "examples.safetensors")
    written = write_matrix_outputs(out, make_cells(), make_lineage(), out / "examples.safetensors")
    return out, written


@pytest.mark.slow  # every figure of a matrix (the module fixture)
def test_write_matrix_outputs_writes_every_file(matrix_outputs):
    out, written = matrix_outputs
    expected = {f"matrix_pgd_{e}.{x}" for e in ("0.1", "0.2") for x in ("csv", "md", "tex")}
    expected |= {"heatmap_pgd_0.1.png", "heatmap_pgd_0.2.png", "eps_curves.png", "examples.png", "summary.md"}
    expected |= {f"{kind}_pgd_{e}.{x}" for e in ("0.1", "0.2") for kind, x in (("asr", "csv"), ("heatmap_asr", "png"))}
    assert {p.name for p in written} == expected
    for path in written:
        assert path.is_file() and path.stat().st_size > 0
        if path.suffix == ".png":
            image = imread(path)
            assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert not list(out.glob("*.tmp"))  # atomic writes leave no temporary files
    csv = pd.read_csv(out / "matrix_pgd_0.1.csv", index_col=0)
    assert np.allclose(csv.to_numpy(), pivot_matrix(make_cells(), "pgd", 0.1).to_numpy())
    md = (out / "matrix_pgd_0.1.md").read_text()
    # Display labels from the runs' records; white-box bold on the diagonal, own lineage italic.
    assert "| fmnist source | kmnist source | fmnist→mnist n=60000 f0 | kmnist→mnist n=60000 f0 |" in md
    assert "| kmnist source | 50.5 | **2.5** | 50.5 | _20.5_ | _20.5_ |" in md
    assert "clean accuracy (no attack)" in md
    tex = (out / "matrix_pgd_0.1.tex").read_text()
    assert r"\begin{tabular}" in tex and r"\textbf{2.5}" in tex and "kmnist source" in tex


@pytest.mark.slow  # shares the figure-writing module fixture
def test_summary_md_gives_the_effect_and_says_four_pretraining_runs_cannot_answer(matrix_outputs):
    out, _ = matrix_outputs
    summary = (out / "summary.md").read_text()
    # 2 sources x 2 seeds = 4 pretraining runs: the effect is stated, the verdict says the design cannot reach 0.05.
    assert ("Too few pretraining runs to tell: accuracy under a target's own source's examples was 30.0 points "
            "lower") in summary
    assert "| number of units | 4 |" in summary and "at least 2 more pretraining runs needed" in summary
    for image in ("heatmap_pgd_0.1.png", "heatmap_pgd_0.2.png", "eps_curves.png", "examples.png"):
        assert f"]({image})" in summary
    assert "Per target" in summary and "Every lineage test" in summary


@pytest.mark.slow  # every figure of a matrix
def test_summary_md_says_no_clear_difference_when_sources_are_equal(tmp_path):
    cells = make_cells(own_gap=0.0).query("eps == 0.1")  # one eps: no curve figure
    written = write_matrix_outputs(tmp_path, cells, make_lineage(own_gap=0.0, jitter=0.01).query("eps == 0.1"))
    summary = (tmp_path / "summary.md").read_text()
    assert "Too few pretraining runs to tell:" in summary and "Yes:" not in summary
    assert "eps_curves.png" not in {p.name for p in written}
    assert "Only one eps value per attack" in summary
    assert "No example images" in summary


@pytest.mark.slow  # renders a 20 x 20 heatmap
def test_large_matrix_heatmap_stays_readable(tmp_path):
    names = [f"final_resnet_kmnist_mnist10000_f23_variant{i:02d}" for i in range(20)]
    rows = [{"crafted_on": c, "evaluated": e, "crafted_on_role": "finetuned", "evaluated_role": "finetuned",
             "attack": "pgd", "eps": 0.3,
             "seed": 0, "samples": 500, "adversarial_accuracy": (i * 20 + j) / 400, "clean_accuracy": 0.98,
             "same_pretraining": True, "white_box": c == e}
            for i, c in enumerate(names) for j, e in enumerate(names)]
    write_matrix_outputs(tmp_path, pd.DataFrame(rows))
    image = imread(tmp_path / "heatmap_pgd_0.3.png")
    assert 1000 < image.shape[1] < 2500 and 1000 < image.shape[0] < 2500


# ------------------------------------------------------------ study report
@pytest.fixture(scope="module")
def study_report(tmp_path_factory):
    study = make_study(tmp_path_factory.mktemp("full"))
    written = write_study_report(study, formats=("md", "html", "tex"))
    return study, written


@pytest.mark.slow  # a study report in three formats (module fixture)
def test_study_report_has_every_section_and_recreates_matrix_outputs(study_report):
    study, written = study_report
    md = (study / "report.md").read_text()
    for heading in SECTIONS:
        assert f"## {heading}" in md
    assert (study / "matrix" / "summary.md").is_file() and (study / "matrix" / "heatmap_pgd_0.2.png").is_file()
    assert "](matrix/heatmap_pgd_0.1.png)" in md and "](matrix/eps_curves.png)" in md
    assert "Too few pretraining runs to tell: accuracy under a target's own source's examples was 30.0" in md
    assert "Cohen's h" in md and "sign-flip" in md and "| number of units | 4 |" in md
    # Pretraining laid out like the reference: rows = source dataset, columns = model, mean ± sd over seeds.
    assert "| source | alexnet | resnet |" in md
    assert "| kmnist | 98.50 ± 0.71 / 90.00 ± 0.00 | 98.50 ± 0.71 / 90.00 ± 0.00 |" in md
    assert "| scratch | alexnet | mnist | 10,000 | - | 2 | 99.50 ± 0.00 / 97.00 ± 0.00 |" in md
    assert "123.4" in md and "torchvision" in md  # wall time and data source
    for path in written:
        assert path.stat().st_size > 0


@pytest.mark.slow  # shares the study-report module fixture
def test_study_report_html_is_self_contained(study_report):
    study, _ = study_report
    html = (study / "report.html").read_text()
    sources = re.findall(r'<img[^>]*src="([^"]*)"', html)
    assert len(sources) >= 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "href=" not in html and ".png" not in html.replace("data:image/png", "")
    for heading in SECTIONS:
        assert heading in html


@pytest.mark.slow  # shares the study-report module fixture
def test_study_report_tables_and_tex(study_report):
    study, _ = study_report
    tables = study / "tables"
    for name in ("pretraining", "finetuning", "matrix_pgd_0.1", "hypothesis", "hypothesis_per_target",
                 "lineage_tests", "runs", "versions", "steps"):
        assert (tables / f"{name}.csv").stat().st_size > 0
        assert r"\begin{tabular}" in (tables / f"{name}.tex").read_text()
    assert list(pd.read_csv(tables / "pretraining.csv").columns) == ["source", "alexnet", "resnet"]
    tex = (study / "report.tex").read_text()
    assert r"\begin{document}" in tex and r"\includegraphics[width=\linewidth]{matrix/heatmap_pgd_0.1.png}" in tex


@pytest.mark.slow  # shares the study-report module fixture
def test_study_report_keeps_current_matrix_outputs(study_report):
    study, _ = study_report
    heatmap = study / "matrix" / "heatmap_pgd_0.1.png"
    before = heatmap.stat().st_mtime_ns
    written = write_study_report(study, formats="md")
    assert heatmap.stat().st_mtime_ns == before and heatmap not in written
    assert not (study / "report.html").exists() or (study / "report.html") not in written


def test_study_report_without_matrix_says_so(tmp_path):
    study = make_study(tmp_path, matrix=False)
    (study / "study.json").unlink()
    write_study_report(study)
    md = (study / "report.md").read_text()
    for heading in SECTIONS:
        assert heading in md
    assert md.count("No attack matrix yet") == 5  # the summary box and the four matrix sections
    assert "study.json is missing" in md
    assert "data:image/png;base64" not in (study / "report.html").read_text()


def test_a_study_without_attacks_is_not_told_to_run_its_attack_step(tmp_path):
    study = make_study(tmp_path, matrix=False)
    recorded = json.loads((study / "study.json").read_text())
    (study / "study.json").write_text(json.dumps({**recorded, "config": {"pretrain": [], "attack": []}}))
    write_study_report(study, formats="md")
    md = (study / "report.md").read_text()
    assert "No attack matrix yet" not in md and "run the study's attack step" not in md
    assert "Answer: not asked here. This study has no [[attack]] table" in md


@pytest.mark.slow  # a study report with its figures
def test_study_report_reads_a_study_layout_with_empty_tables(tmp_path):
    """As the study runner writes it: seed-suffixed run names, an empty lineage.csv, an empty runs.csv."""
    study = make_study(tmp_path)
    (study / "runs.csv").write_text("\n")  # pd.DataFrame().to_csv() of a study with no finished runs
    make_cells(suffix_seeds=True).to_csv(study / "matrix" / "cells.csv", index=False)
    (study / "matrix" / "lineage.csv").write_text("\n")
    write_study_report(study)
    md = (study / "report.md").read_text()
    assert "No pretraining runs" in md and "No fine-tuning or from-scratch runs" in md
    assert "Not testable: no target has both its own source" in md
    assert "| kmnist source | 50.5 | **2.5** | 50.5 | _20.5_ | _20.5_ |" in md  # seeds share a row
    assert "examples crafted on 5 models, each evaluated on 5 models" in md


def test_study_report_rejects_a_folder_without_runs_csv(tmp_path):
    with pytest.raises(UserError, match="is neither a study results folder \\(no runs.csv\\)"):
        write_study_report(tmp_path)
    (tmp_path / "runs.csv").write_text("name,kind\n")
    with pytest.raises(UserError, match="unknown report format"):
        write_study_report(tmp_path, formats=("pdf",))


@pytest.mark.slow  # a study report with its figures
def test_study_report_ranks_transfer_predictors(tmp_path):
    study = make_study(tmp_path)
    cells = make_cells()
    pairs = cells[["crafted_on", "evaluated", "seed"]].drop_duplicates().copy()
    asr = cells.groupby(["crafted_on", "evaluated", "seed"])["attack_success_rate"].mean()
    key = list(zip(pairs["crafted_on"], pairs["evaluated"], pairs["seed"]))
    # gradient cosine follows the success rate exactly; the other predictors are constant or noise
    pairs["grad_cosine"] = [asr[k] for k in key]
    pairs["cka"] = np.random.default_rng(0).random(len(pairs))
    pairs["param_identical"] = 0.0
    pairs["param_rel_l2"] = np.random.default_rng(1).random(len(pairs))
    pairs["clean_agreement"] = 0.9
    pairs.to_csv(study / "matrix" / "pairs.csv", index=False)
    write_study_report(study, formats=("md",))
    md = (study / "report.md").read_text()
    assert "### What predicts transfer?" in md and "](matrix/predictors.png)" in md
    assert "In this study input-gradient cosine explains transfer best" in md
    table = pd.read_csv(study / "tables" / "predictors.csv")
    grad = table[table["predictor"] == "input-gradient cosine"]
    assert len(grad) == len(EPS) and (grad["rho"].astype(float) == 1.0).all()


@pytest.mark.slow  # a study report with its figures
def test_study_report_without_pairs_says_so(tmp_path):
    study = make_study(tmp_path)
    write_study_report(study, formats=("md",))
    assert "matrix/pairs.csv is missing" in (study / "report.md").read_text()


@pytest.mark.slow  # a study report with its figures
def test_report_metric_asr_leads_with_success_rates_and_wilson_intervals(tmp_path, capsys):
    study = make_study(tmp_path)
    code, _, _ = run_cli(["report", str(study), "--format", "md", "--metric", "asr"], capsys)
    assert code == 0
    md = (study / "report.md").read_text()
    block = md.split("### pgd, eps = 0.1", 1)[1]
    # both views are there, success rate first, with its heatmap
    assert block.index("Attack success rate (%) under pgd") < block.index("Adversarial accuracy (%) under pgd")
    assert "](matrix/heatmap_asr_pgd_0.1.png)" in md
    # other-source transfer at eps 0.1: accuracy 0.50 (seed 0) and 0.51 (seed 1) of 0.95 clean-correct
    table = pd.read_csv(study / "tables" / "asr_pgd_0.1.csv")
    cell = table.set_index("crafted on \\ evaluated").loc["pre_alexnet_fmnist", "final_alexnet_kmnist_mnist_f0"]
    flipped, correct = 450 + 440, 950 * 2
    low, high = wilson_interval(flipped, correct)
    assert cell == f"{100 * flipped / correct:.1f} ({100 * low:.1f}-{100 * high:.1f})"
    assert_user_error(["report", str(study), "--metric", "rate"], capsys, "--metric")


@pytest.mark.slow  # a study report with its figures
def test_freeze_sweep_section_appears_for_several_freezes(tmp_path):
    study = make_study(tmp_path)  # the KMNIST source is fine-tuned with freeze 0 and freeze 8
    write_study_report(study, formats=("md",))
    md = (study / "report.md").read_text()
    assert "### Transfer vs number of frozen tensors" in md and "](matrix/freeze_sweep.png)" in md
    table = pd.read_csv(study / "tables" / "freeze_sweep.csv")
    kmnist = table[(table["own source"] == "pre_alexnet_kmnist") & (table["eps"] == 0.1)].set_index("freeze")
    assert list(kmnist.index) == [0, 8]
    # own-source transfer: 60% - eps - gap = 20% (seed 0) and 21% (seed 1), pooled -> 20.5%
    flipped_low, flipped_high = wilson_interval(410, 2000)
    assert kmnist.loc[0, "adv, own source"] == f"20.5 ({100 * flipped_low:.1f}-{100 * flipped_high:.1f})"
    assert kmnist.loc[0, "adv, other sources"].startswith("50.5 ")
    assert kmnist.loc[0, "clean"] == 95.0


@pytest.mark.slow  # a study report with its figures
def test_freeze_sweep_section_absent_for_one_freeze(tmp_path):
    study = make_study(tmp_path)
    cells = make_cells()
    keep = ((cells["crafted_on"] != "final_alexnet_kmnist_mnist_f8")
            & (cells["evaluated"] != "final_alexnet_kmnist_mnist_f8"))
    cells[keep].to_csv(study / "matrix" / "cells.csv", index=False)
    write_study_report(study, formats=("md",))
    md = (study / "report.md").read_text()
    assert "frozen tensors" not in md and not (study / "tables" / "freeze_sweep.csv").exists()


def test_runs_the_reference_experiment_also_reported_are_shown_beside_its_numbers(tmp_path):
    from transferlab.report.study_report import reference_table

    runs = make_runs()  # kmnist/fmnist alexnet/resnet pretraining, freeze-0 fine-tunes, scratch at n = 10,000
    table = reference_table(runs)
    shown = {(r["run"], r["source"], r["model"]): (r["this study: train / test (%)"], r["reference: train / test (%)"])
             for _, r in table.iterrows()}
    # Pretraining of all four and the two scratch models are in the reference; fine-tunes at freeze 0 are not.
    assert set(shown) == {("pretrain", d, m) for d in ("kmnist", "fmnist") for m in ("alexnet", "resnet")} | {
        ("scratch", "scratch", "alexnet"), ("scratch", "scratch", "resnet")}
    # Seeds 0 and 1 trained to 98 and 99% (make_runs): mean ± sample sd, next to the reference's one run.
    assert shown[("pretrain", "kmnist", "resnet")] == ("98.50 ± 0.71 / 90.00 ± 0.00", "99.19 / 94.83")
    assert shown[("scratch", "scratch", "resnet")][1] == "99.45 / 96.78"
    # A study with nothing the reference reported gets no table.
    assert reference_table(runs[runs["dataset"] == "nothing"]) is None

    make_study(tmp_path)
    write_study_report(tmp_path / "study")
    report = (tmp_path / "study" / "report.md").read_text()
    assert "### Against the reference experiment" in report and "| 99.19 / 94.83 |" in report
