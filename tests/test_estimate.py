"""The dry run's time estimate (transferlab/study/estimate.py): image passes from the plan x seconds per image
measured here, serial and critical path, with and without the compute-once paths (issue 22, item 6).

Most tests put fixed per-image costs in place of the timings, so that the arithmetic is checked exactly; the
ones that time real (tiny) models only assert what holds whatever the machine's load."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import run_cli
from test_study import TINY, write_study
from transferlab import model_sources
from transferlab.study import load_study, plan
from transferlab.study import estimate as est
from transferlab.study.plan import Step

FAMILY = est.FamilyCosts(step=1e-3, forward=1e-4, attack=5e-4)
FROZEN = est.FrozenCosts(step_full=6.0, cache=(4.0, 2.0), shared_eval=(0.8, 0.2))  # x FAMILY.forward


@pytest.fixture
def fixed_costs(monkeypatch):
    """Every model costs FAMILY, every frozen model FROZEN: no timing, exact numbers."""
    monkeypatch.setattr(est._Timer, "family", lambda self, *a: FAMILY)
    monkeypatch.setattr(est._Timer, "frozen_costs", lambda self, *a: FROZEN)


def _estimate(tmp_path: Path, text: str = TINY, states: dict | None = None) -> est.Estimate:
    study = load_study(write_study(tmp_path, text))
    steps = plan(study, tmp_path / "out")
    return est.estimate(steps, states or {}, study)


def test_training_costs_its_image_passes(tmp_path, fixed_costs):
    estimate = _estimate(tmp_path)
    # pretrain: 400 kmnist-sample images x 1 epoch forward+backward, then scores them and the 900 test images
    assert estimate.after["pretrain/k/s0"] == pytest.approx(400 * 1e-3 + (400 + 900) * 1e-4)
    # fine-tune, 200 images x 2 epochs with freeze 2: the whole frozen model's step each epoch before; the prefix
    # once per image and the tail's step each epoch after
    finetune = "finetune/k/mnist-sample200/f2/s0"
    assert estimate.before[finetune] == pytest.approx(400 * 6e-4 + (200 + 900) * 1e-4)
    assert estimate.after[finetune] == pytest.approx(200 * 4e-4 + 400 * 2e-4 + (200 + 900) * 1e-4)


def test_estimate_grows_with_epochs_and_samples(tmp_path, fixed_costs):
    base = _estimate(tmp_path)
    longer = _estimate(tmp_path, TINY.replace("epochs = 1", "epochs = 3"))
    assert longer.after["pretrain/k/s0"] - base.after["pretrain/k/s0"] == pytest.approx(2 * 400 * 1e-3)
    more = _estimate(tmp_path, TINY.replace("samples = 100", "samples = 300"))
    for step in base.steps:
        if step.kind in ("craft", "eval"):
            assert more.after[step.id] == pytest.approx(3 * base.after[step.id]) and base.after[step.id] > 0
    # PGD's iterations multiply its crafting: 5 steps cost five FGSM steps
    pgd = _estimate(tmp_path, TINY.replace('attack = "fgsm"', 'attack = "pgd"\nsteps = 5'))
    craft = "craft/fgsm/pre:k/eps0.1/s0"
    assert pgd.after[craft.replace("fgsm", "pgd_k5")] == pytest.approx(5 * base.after[craft])
    assert base.after[craft] == pytest.approx(100 * 5e-4)


def test_done_steps_cost_nothing(tmp_path, fixed_costs):
    everything = _estimate(tmp_path)
    some_done = _estimate(tmp_path, states={"pretrain/k/s0": "done", "pretrain/f/s0": "to do"})
    assert some_done.after["pretrain/k/s0"] == some_done.before["pretrain/k/s0"] == 0
    assert some_done.serial() == pytest.approx(everything.serial() - everything.after["pretrain/k/s0"])
    all_done = _estimate(tmp_path, states={s.id: "done" for s in everything.steps})
    assert all_done.serial() == all_done.critical() == all_done.serial(before=True) == 0
    assert "serial 0 s" in all_done.line()


def test_critical_path_lies_between_the_longest_step_and_the_serial_sum(tmp_path, fixed_costs):
    estimate = _estimate(tmp_path)
    for before in (False, True):
        costs = estimate.before if before else estimate.after
        assert max(costs.values()) <= estimate.critical(before) < estimate.serial(before)
        # one chain: pretrain -> fine-tune -> the eval step that scores it
        chain = costs["pretrain/k/s0"] + costs["finetune/k/mnist-sample400/f2/s0"] + max(
            v for k, v in costs.items() if k.startswith("eval/") and "final:k/" in k)
        assert estimate.critical(before) >= chain


def test_critical_path_of_a_diamond():
    steps = [Step("pretrain/a", "pretrain", {}), Step("pretrain/b", "pretrain", {}),
             Step("finetune/c", "finetune", {}, ["pretrain/a"]),
             Step("merge/d", "merge", {}, ["finetune/c", "pretrain/b"])]
    seconds = {"pretrain/a": 1.0, "pretrain/b": 5.0, "finetune/c": 2.0, "merge/d": 0.5}
    assert est.critical_path(steps, seconds) == 5.5  # b -> d, not a -> c -> d (3.5)
    seconds["finetune/c"] = 10.0
    assert est.critical_path(steps, seconds) == 11.5
    assert est.critical_path([], {}) == 0.0


def test_before_is_above_after_with_a_frozen_finetune(tmp_path, monkeypatch):
    """Real timings of the tiny study's mlp: the cached prefix saves the frozen layers' forward in every epoch
    but the first, so "before" is above "after" whatever the machine's load."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the plan's steps on one thread: no speedup to time
    estimate = _estimate(tmp_path, TINY.replace('model = "mlp"', 'model = "mlp"\noptions = {hidden = [64]}'))
    finetunes = [s.id for s in estimate.steps if s.kind == "finetune"]
    assert all(estimate.after[i] < estimate.before[i] for i in finetunes)
    assert all(estimate.after[i] <= estimate.before[i] for i in estimate.after)
    assert estimate.serial() < estimate.serial(before=True)
    assert estimate.critical() <= estimate.critical(before=True)
    assert estimate.unknown == []


def test_without_a_frozen_layer_both_ways_cost_the_same(tmp_path, fixed_costs):
    unfrozen = _estimate(tmp_path, TINY.replace("freeze = [2]", "freeze = [0]"))
    assert all(unfrozen.after[i] == unfrozen.before[i] for i in unfrozen.after)
    assert unfrozen.after["finetune/k/mnist-sample200/f0/s0"] == pytest.approx(400 * 1e-3 + (200 + 900) * 1e-4)


def test_the_frozen_timings_follow_prefix_decide(tmp_path):
    timer = est._Timer(est.resolve_device("cpu"), 1, (1, 28, 28))
    train = {"bn_stats": "frozen", "augment_shift": 0, "augment_flip": False}
    frozen = timer.frozen_costs("mlp", {"hidden": [64]}, "fp32", 2, train)
    assert frozen.cache is not None and all(t > 0 for t in frozen.cache)
    assert frozen.step_full == pytest.approx(sum(frozen.cache))
    assert frozen.shared_eval is not None and frozen.why.startswith("prefix cache")
    # An augmenting fine-tune shifts the input every epoch: no cache, the whole frozen step (prefix.decide's call)
    shifted = timer.frozen_costs("mlp", {"hidden": [64]}, "fp32", 2, {**train, "augment_shift": 2})
    assert shifted.cache is None and "augmentation" in shifted.why and shifted.step_full > 0
    assert shifted.shared_eval is not None  # the attack matrix still shares its prefix
    assert timer.frozen_costs("mlp", {"hidden": [64]}, "fp32", 2, train) is frozen  # timed once per process


@pytest.mark.parametrize("speedup", [2.0, 0.5])
def test_costs_are_timed_on_one_thread_and_scaled_to_the_plans_threads(monkeypatch, speedup):
    """One thread waits for no other on a busy machine; the plan's threads come in through their measured speedup,
    below 1 where another program holds the cores (the run's threads would wait as the timing's did)."""
    monkeypatch.setattr(est, "_MEASURED", {})
    threads = []
    monkeypatch.setattr(est, "_per_image", lambda calls, *a: threads.append(torch.get_num_threads()) or
                        {name: 1e-3 for name in calls})
    monkeypatch.setattr(est._Timer, "_time_speedup", lambda self, *a: speedup)
    timer = est._Timer(est.resolve_device("cpu"), 2, (1, 28, 28))
    costs = timer.family("mlp", {}, "fp32")
    assert threads == [1] and (costs.step, costs.forward, costs.attack) == (1e-3 / speedup,) * 3
    assert timer.family("cnn", {}, "fp32").speedup == speedup  # measured once
    where = est._where(timer.device, 2, speedup)
    assert where.startswith(f"{est.device_name(timer.device)}, 2 threads ({speedup:.2g}x one thread's speed")
    assert ("another program holds the cores" in where) == (speedup < 1)


def test_the_speedup_is_measured_on_the_plans_threads(monkeypatch):
    monkeypatch.setattr(est, "_MEASURED", {})
    one = est._Timer(est.resolve_device("cpu"), 1, (1, 28, 28)).family("mlp", {"hidden": [32]}, "fp32")
    assert one.speedup == 1.0  # nothing to compare on one thread
    two = est._Timer(est.resolve_device("cpu"), 2, (1, 28, 28)).family("mlp", {"hidden": [32]}, "fp32")
    assert two.speedup > 0 and two.step > 0


def test_models_outside_the_zoo_are_not_estimated(tmp_path, monkeypatch, fixed_costs):
    """A dry run never builds a model from code named in a study (the trust model): such steps are counted."""
    calls = []
    monkeypatch.setattr(os, "system", lambda *a, **k: calls.append(a) or 0)
    monkeypatch.setenv("TRANSFERLAB_TRUST_CODE", "os")
    with model_sources.factories_called(False):
        estimate = _estimate(tmp_path, TINY.replace('model = "mlp"', 'model = "os:system"', 1))
    assert calls == []
    # the source k, its fine-tunes and every craft and eval step that runs one of them
    assert "pretrain/k/s0" in estimate.unknown and "pretrain/f/s0" not in estimate.unknown
    assert all(i in estimate.unknown for i in estimate.after if i.startswith("finetune/k/"))
    assert f"{len(estimate.unknown)} steps not estimated" in estimate.line()


def test_dry_run_prints_the_estimate(tmp_path, capsys, fixed_costs):
    code, out, err = run_cli(["run", write_study(tmp_path), "--dry-run", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    dry = next(i for i, line in enumerate(lines) if line.startswith("dry run: "))
    assert lines[dry + 1].startswith("estimate on ")
    assert "serial " in lines[dry + 1] and "critical path " in lines[dry + 1]
    assert "without the compute-once paths" in lines[dry + 1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_that_is_not_here_leaves_the_dry_run_as_it_was(tmp_path, capsys):
    code, out, err = run_cli(["run", write_study(tmp_path), "--dry-run", "--device", "cuda", "--out",
                              tmp_path / "o"], capsys)
    assert code == 0, err
    assert "no time estimate: --device cuda asked for, but CUDA is not available here" in out


def test_split_sizes_come_without_loading_the_data(tmp_path):
    assert (est.split_size("mnist", "train"), est.split_size("mnist", "test")) == (60000, 10000)
    assert est.split_size("usps", "train") == 7291 and est.split_size("emnist-letters", "test") == 20800
    assert est.split_size("kmnist-sample", "train") == 2700
    np.savez(tmp_path / "train.npz", x=np.zeros((123, 28, 28), np.uint8), y=np.zeros(123, np.int64))
    assert est.split_size(f"npz:{tmp_path}", "train") == 123
    assert est.split_size(f"npz:{tmp_path}", "test") is None  # no file: not estimated


def test_a_partial_local_copy_is_sized_by_its_files_not_the_registry(tmp_path):
    # The offline KMNIST copy holds 7,011 of 60,000 training images: its pretraining was estimated 8.5x too long.
    raw = tmp_path / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-labels-idx1-ubyte").write_bytes(bytes(8 + 7011))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(bytes(8 + 10000))
    assert (est.split_size("kmnist", "train", tmp_path), est.split_size("kmnist", "test", tmp_path)) == (7011, 10000)
    assert est.split_size("kmnist", "train", tmp_path / "elsewhere") == 60000  # no copy there: the registry's size
    assert est.split_size("fmnist", "train", tmp_path) == 60000


def test_durations_read_like_a_person_would_write_them():
    assert [est.duration(s) for s in (0, 42.4, 14 * 60, 3 * 3600 + 12 * 60, 2 * 3600, 154.5 * 3600)] == [
        "0 s", "42 s", "14 min", "3 h 12 min", "2 h", "154 h"]
