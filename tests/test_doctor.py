"""``transferlab doctor`` answers without importing torch where it does not need it (issue 24: 16 s and 900 MB
on a busy 2-core machine), and what it reads without torch is what torch would have said."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time

import pytest
import torch

from helpers import assert_user_error, run_cli
from transferlab import machine, prefix
from transferlab.errors import UserError

DOCTOR_WITHOUT_TORCH = """
import json, sys
from transferlab.cli import main
for args in (["doctor", "--no-calibration"], ["doctor"], ["doctor", "--device", "cpu"]):
    try:
        main(args)
    except SystemExit as exit:
        assert not exit.code, (args, exit.code)
    heavy = sorted(m for m in ("torch", "torchvision", "numpy", "pandas") if m in sys.modules)
    assert not heavy, (args, heavy)
from transferlab import machine
print("VERSIONS " + json.dumps(machine.package_versions()))
"""


def _row(out: str, name: str) -> str:
    """The value cell of doctor's row ``name``."""
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 2 and cells[1] == name:
            return cells[2]
    raise AssertionError(f"no row {name!r} in {out}")


@pytest.mark.slow  # a fresh interpreter: 1-2 s on a busy 2-core machine
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GPU and MPS detection may need torch elsewhere")
def test_doctor_does_not_import_torch_and_reads_torchs_versions():
    if machine.nvidia_gpus()[0]:
        pytest.skip("this machine has NVIDIA GPUs: doctor rightly asks torch which one it would use")
    result = subprocess.run([sys.executable, "-c", DOCTOR_WITHOUT_TORCH], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "transferlab doctor" in result.stdout and "calibrated precision decisions" in result.stdout
    versions = json.loads(result.stdout.split("VERSIONS ", 1)[1])
    import torchvision

    # Read from the packages' version.py files: the build label ('+cu130', '+cpu') the distribution omits
    assert versions["torch"] == torch.__version__ and versions["torchvision"] == torchvision.__version__
    assert versions["python"] == platform.python_version()


def test_doctor_prints_the_machine_table_and_the_torch_free_facts_match_torchs(capsys):
    code, out, err = run_cli(["doctor", "--no-calibration"], capsys)
    assert code == 0, err
    assert _row(out, "device") == f"cpu ({machine.cpu_model()})" or torch.cuda.is_available()
    assert _row(out, "torch") == torch.__version__
    assert _row(out, "threads").startswith(str(machine.default_thread_count()))
    for row in ("cpu flags", "native bf16 reported", "cuda", "frozen-prefix cache"):
        assert _row(out, row)
    assert "calibrated precision decisions" not in out
    if platform.machine() in ("x86_64", "AMD64"):
        by_torch = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        assert machine.cpu_has_native_bf16() == by_torch
    # What a process that has not imported torch reads from torch/version.py
    assert machine._version_file_field("torch", "cuda") == torch.version.cuda
    assert machine._version_file_field("torch", "__version__") == torch.__version__


def test_doctor_asks_torch_only_when_a_gpu_may_be_there(capsys, monkeypatch):
    monkeypatch.setattr(machine, "nvidia_gpus", lambda: (2, "nvidia-smi"))
    threads = torch.get_num_threads()  # doctor's torch path sets this process's threads
    try:
        code, out, err = run_cli(["doctor", "--no-calibration"], capsys)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert _row(out, "cuda").startswith("2 GPU(s) (nvidia-smi)")
    # Found GPUs are no proof torch can use them (a CPU build, CUDA_VISIBLE_DEVICES): 'auto' is torch's answer
    assert _row(out, "device").startswith("cuda" if torch.cuda.is_available() else "cpu (")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_doctor_with_an_absent_gpu_is_a_one_line_error(capsys):
    assert_user_error(["doctor", "--device", "cuda:1"], capsys, "CUDA is not available")


def test_nvidia_smi_is_asked_first_and_a_hung_one_does_not_hang_doctor(tmp_path, monkeypatch):
    smi, sleep = tmp_path / "nvidia-smi", shutil.which("sleep")
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-1)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-2)'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert machine.nvidia_gpus() == (2, "nvidia-smi")
    assert machine.gpu_text().startswith("2 GPU(s) (nvidia-smi)")
    smi.write_text(f"#!/bin/sh\nexec {sleep} 30\n")  # a wedged driver
    monkeypatch.setattr(machine, "NVIDIA_SMI_TIMEOUT_S", 0.2)
    started = time.perf_counter()
    _, found_by = machine.nvidia_gpus()
    assert found_by != "nvidia-smi" and 0.2 <= time.perf_counter() - started < 10


def test_the_feature_budget_is_read_without_torch_as_prefix_reads_it(monkeypatch):
    monkeypatch.setenv(prefix.BUDGET_ENV, "1.5GB")
    assert prefix.budget_bytes() == machine.feature_budget_bytes() == 1_500_000_000
    assert prefix.budget_text().startswith("1.50 GB") and f"${prefix.BUDGET_ENV}" in prefix.budget_text()
    monkeypatch.setenv(prefix.BUDGET_ENV, "lots")
    with pytest.raises(UserError, match="is not a size"):
        machine.feature_budget_bytes()
    monkeypatch.delenv(prefix.BUDGET_ENV)
    assert machine.feature_budget_bytes(device_memory=8 * 10**9) == 2 * 10**9
    assert "a quarter of memory" in machine.feature_budget_text()
