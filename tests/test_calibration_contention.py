"""Contention-proof calibration (issue 24): timings taken while another program holds the cores are not
cached for later runs, the thread count under contention follows the measurement and says so, and
``doctor`` shows each cached decision's age and load and can clear them."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
import torch

from helpers import run_cli
from transferlab import device as dev
from transferlab.models import create_model

CPU = torch.device("cpu")


@pytest.fixture
def calibrations(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(dev, "_contention_threads", None)
    dev.CalibrationCache.forget_memory()
    seen = []
    monkeypatch.setattr(dev, "CALIBRATION_HOOKS", [lambda key, decision: seen.append(decision)])
    threads = torch.get_num_threads()
    yield seen
    torch.set_num_threads(threads)
    dev.CalibrationCache.forget_memory()


def _contended_timings(model, device, candidates, batch, sample_shape, workload, rounds_at_most=4):
    """A busy second core: every step takes 500 ms on two threads and 50 ms on one."""
    return {c.label: 0.05 if torch.get_num_threads() == 1 else 0.5 for c in candidates}


def test_a_contended_calibration_is_used_once_not_cached_and_switches_to_one_thread(calibrations, monkeypatch,
                                                                                   capsys):
    monkeypatch.setattr(dev, "_time_candidates", _contended_timings)
    torch.set_num_threads(2)
    model = create_model("mlp", hidden=[8])
    dev.choose_numerics(model, CPU, "auto", batch_size=16, sample_shape=(1, 28, 28))
    decision = calibrations[0]
    assert decision["provisional"] and decision["contention"]["contended"] and "load_1min" in decision
    err = capsys.readouterr().err
    assert "contention: 2 threads took 500 ms per step, 1 thread 50 ms" in err and "uses 1 thread" in err
    assert dev.thread_count() == 1 and dev.configure_cpu_threads() == 1
    # This process keeps its decision for two threads; a later process on two threads measures again instead
    # of trusting contended timings.
    torch.set_num_threads(2)
    dev.choose_numerics(model, CPU, "auto", batch_size=16, sample_shape=(1, 28, 28))
    assert len(calibrations) == 1
    dev.CalibrationCache.forget_memory()
    monkeypatch.setattr(dev, "_contention_threads", None)
    dev.choose_numerics(model, CPU, "auto", batch_size=16, sample_shape=(1, 28, 28))
    assert len(calibrations) == 2


def test_omp_num_threads_overrides_the_measured_thread_policy(calibrations, monkeypatch):
    monkeypatch.setattr(dev, "_time_candidates", _contended_timings)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    dev.choose_numerics(create_model("mlp", hidden=[8]), CPU, "auto", batch_size=16, sample_shape=(1, 28, 28))
    assert calibrations[0]["provisional"] and dev.thread_count() == 2


def test_doctor_shows_age_and_load_and_clears(calibrations, tmp_path, capsys):
    created = (datetime.now(timezone.utc) - timedelta(hours=3)).isoformat(timespec="seconds")
    path = tmp_path / "cache" / dev.CALIBRATION_FILE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"schema": 1, "decisions": {"k": {
        "precision": "bf16", "channels_last": True, "model": "ResNet", "workload": "train", "batch_size": 128,
        "step_ms": {"fp32+channels_last": 58000.0}, "created": created, "load_1min": 4.2, "cores": 2,
        "contention": {"contended": True, "one_thread_ms": 900.0}, "provisional": True}}}))
    code, out, err = run_cli(["doctor", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "3 h ago" in out and "4.2 on 2 cores" in out and "provisional" in out
    code, out, _ = run_cli(["doctor", "--clear-calibration"], capsys)
    assert code == 0 and "cleared 1" in out and not path.exists()


def test_an_explicit_precision_still_gets_the_measured_thread_policy(calibrations, monkeypatch, capsys):
    monkeypatch.setattr(dev, "_time_candidates", _contended_timings)
    monkeypatch.setattr(dev, "_contention_probed", False)
    torch.set_num_threads(2)
    numerics = dev.choose_numerics(create_model("mlp", hidden=[8]), CPU, "fp32", batch_size=16,
                                   sample_shape=(1, 28, 28))
    assert numerics.decided_by == "asked" and calibrations == []  # no calibration, no cache entry
    assert "contention: 2 threads took 500 ms per step, 1 thread 50 ms" in capsys.readouterr().err
    assert dev.thread_count() == 1
