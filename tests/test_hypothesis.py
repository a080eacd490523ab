"""The answer's statistics on synthetic studies whose truth is planted: the unit (pretraining runs), the
source-strength adjustment (difference in differences with from-scratch targets), floors and Holm."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from transferlab.report.hypothesis import hypothesis_by_setting, hypothesis_summary, per_source_table

SOURCES = ("kmnist", "fmnist", "usps", "emnist")
NS = (1000, 10000)


def synthetic_study(seed: int = 0, seeds: int = 3, effect: float = 0.0, strength=None, base: float = 0.5,
                    eps=(0.1,), scratch: bool = True):
    """(cells, lineage) of a study with 4 sources x ``seeds`` seeds x 2 n at one freeze: a target's accuracy on a
    source's examples is ``base`` + that source's ``strength`` (it hits every model, scratch included) + the
    run's own-source ``effect`` (only on its own fine-tunes) + noise. ``base`` per eps (a dict) makes floors."""
    rng = np.random.default_rng(seed)
    strength = strength or {}
    cells, lineage = [], []
    for s, e in ((s, e) for s in range(seeds) for e in eps):
        level = base[e] if isinstance(base, dict) else base
        run_effect = {src: effect + rng.normal(0, 0.02) for src in SOURCES}
        evaluated = [(f"final_{src}_n{n}_s{s}", "finetuned", src, n) for src in SOURCES for n in NS]
        evaluated += [(f"scratch_n{n}_s{s}", "scratch", None, n) for n in NS] if scratch else []
        acc = {}
        for name, role, own, n in evaluated:
            for crafter in SOURCES:
                value = level + strength.get(crafter, 0.0) + rng.normal(0, 0.003)
                value += run_effect[own] if crafter == own else 0.0
                acc[name, crafter] = value
                cells.append({"crafted_on": f"pre_{crafter}_s{s}", "evaluated": name, "crafted_on_role": "pretrained",
                              "evaluated_role": role, "evaluated_model": "resnet", "evaluated_n": n,
                              "evaluated_freeze": 23 if role == "finetuned" else None,
                              "evaluated_pretrain_dataset": own, "attack": "pgd", "eps": e, "seed": s,
                              "adversarial_accuracy": value})
        for name, role, own, n in evaluated:
            for other in (o for o in SOURCES if role == "finetuned" and o != own):
                lineage.append({"finetuned": name, "finetuned_model": "resnet", "pretrained_from": f"pre_{own}_s{s}",
                                "other_pretrained": f"pre_{other}_s{s}", "attack": "pgd", "eps": e, "seed": s,
                                "acc_own": acc[name, own], "acc_other": acc[name, other],
                                "difference": acc[name, own] - acc[name, other], "mcnemar_p": 0.5})
    return pd.DataFrame(cells), pd.DataFrame(lineage)


def test_units_are_pretraining_runs_and_a_planted_effect_is_found():
    cells, lineage = synthetic_study(effect=-0.08)
    s = hypothesis_summary(lineage, cells)
    # 4 sources x 3 seeds = 12 pretraining runs; 2 n x 3 other sources each are averaged into them.
    assert s["units"] == 12 and s["rows"] == len(lineage) == 12 * 2 * 3
    assert s["verdict"] == "yes" and s["p_value"] < 0.001 and s["adjusted"]
    assert s["effect_points"] == pytest.approx(-8.0, abs=1.5)
    assert "over 12 pretraining runs, the unit of the test" in s["sentence"]


def test_a_null_study_is_not_called_yes():
    cells, lineage = synthetic_study(effect=0.0, seed=3)
    s = hypothesis_summary(lineage, cells)
    assert s["verdict"] == "no clear difference" and s["p_value"] > 0.05


def test_source_strength_is_removed_by_the_from_scratch_targets():
    """kmnist's examples hit every model 10 points harder, no lineage effect: raw says kmnist transfers better to
    its own fine-tunes, the adjusted effect (the answer) says nothing is there."""
    cells, lineage = synthetic_study(effect=0.0, strength={"kmnist": -0.10})
    table = per_source_table(lineage, cells).set_index("source")
    assert table.loc["kmnist", "raw_points"] == pytest.approx(-10.0, abs=1.5)
    assert table.loc["kmnist", "adjusted_points"] == pytest.approx(0.0, abs=1.5)
    assert table.loc["fmnist", "raw_points"] == pytest.approx(10 / 3, abs=1.5)  # kmnist is one of its 3 others
    assert table.loc["fmnist", "adjusted_points"] == pytest.approx(0.0, abs=1.5)
    assert (table["units"] == 3).all()
    s = hypothesis_summary(lineage, cells)
    assert s["adjusted"] and "Adjusted for source strength" in s["sentence"] and s["verdict"] != "yes"


def test_without_scratch_targets_the_effect_is_said_to_be_unadjusted():
    cells, lineage = synthetic_study(effect=-0.08, scratch=False)
    s = hypothesis_summary(lineage, cells)
    assert not s["adjusted"] and "Unadjusted for source strength" in s["sentence"]
    assert per_source_table(lineage, cells)["adjusted_points"].isna().all()


@pytest.mark.slow  # over 0.7 s on 2 cores: the full suite (--all) runs it
def test_floor_settings_are_flagged_left_out_and_named():
    # At eps 0.3 every model sits at chance (10%): own vs other cannot differ there.
    cells, lineage = synthetic_study(effect=-0.08, eps=(0.1, 0.3), base={0.1: 0.5, 0.3: 0.1})
    by_setting = hypothesis_by_setting(lineage, cells)
    floors = by_setting[by_setting["floor"]]
    assert set(floors["eps"]) == {0.3} and len(floors) == 2  # both n
    assert floors["p_value"].isna().all() and floors["holm_p"].isna().all()
    assert floors["floor_reason"].str.startswith("from-scratch targets at").all()
    s = hypothesis_summary(lineage, cells)
    assert s["floor_settings"] == 2 and len(s["floors"]) == 2
    assert "pgd eps 0.3, resnet, n = 1,000, freeze 23 is a floor" in s["floors"][0]
    assert "left out of the tests" in s["floors"][0]


@pytest.mark.slow  # over 0.7 s on 2 cores: the full suite (--all) runs it
def test_holm_is_applied_across_settings_and_marks_survivors():
    cells, lineage = synthetic_study(effect=-0.08, eps=(0.05, 0.1, 0.2))
    by_setting = hypothesis_by_setting(lineage, cells)
    assert len(by_setting) == 6 and (by_setting["units"] == 12).all()
    m = len(by_setting)
    ranked = np.sort(by_setting["p_value"].to_numpy())
    assert by_setting["holm_p"].min() == pytest.approx(min(1.0, m * ranked[0]))
    assert by_setting["survives_holm"].all()  # 12 runs, all negative: 2/4096 * 6 < 0.05
    s = hypothesis_summary(lineage, cells)
    assert "6 of 6 settings survive Holm's correction at 0.05" in s["sentence"]


def test_a_balanced_design_says_its_scratch_gaps_cancel_and_a_monte_carlo_p_says_so():
    from transferlab.report.hypothesis_blocks import hypothesis_measures

    # Every source compared with every other: the per-source scratch gaps sum to zero, so the mean is unadjusted
    # in effect while the per-source effects move; the report says why raw and adjusted means agree.
    cells, lineage = synthetic_study(effect=-0.08, strength={"kmnist": -0.10})
    s = hypothesis_summary(lineage, cells)
    assert s["scratch_gap_points"] == pytest.approx(0.0, abs=0.05)
    assert "The gaps cancel in the mean" in s["sentence"]
    labels = hypothesis_measures(s)["measure"].tolist()
    assert "sign-flip test over 12 pretraining runs, p" in labels  # 2^12 patterns: enumerated, exact
    # 24 runs have 2^24 patterns: p comes from 10,000 random ones, and the label says so.
    many = pd.concat([lineage, lineage.assign(seed=lineage["seed"] + 3,
                                              pretrained_from=lineage["pretrained_from"] + "x")])
    s24 = hypothesis_summary(many, pd.concat([cells, cells.assign(seed=cells["seed"] + 3)]))
    assert s24["units"] == 24
    assert "sign-flip test over 24 pretraining runs (10,000 random of 2^24 sign patterns), p" in \
        hypothesis_measures(s24)["measure"].tolist()
