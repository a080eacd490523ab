"""What this machine is, read without torch: CPU, cores and threads, GPUs, installed versions, memory budget.

``transferlab doctor`` prints these; importing torch for them cost 10-16 s and 900 MB on a busy 2-core machine
(issue 24), longer than the answer is worth. device.py re-exports the names that lived there.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from transferlab._version import __version__
from transferlab.errors import UserError

INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
NVIDIA_SMI_TIMEOUT_S = 3  # nvidia-smi can hang on a wedged driver; doctor must still answer
FEATURE_BUDGET_ENV = "TRANSFERLAB_FEATURE_BUDGET"  # bytes (suffixes KB, MB, GB), e.g. 2GB; default a quarter of memory


# ---------------------------------------------------------------------- CPU
def usable_cores() -> list[int]:
    """The cores this process may run on, trimmed to a cgroup CPU quota (containers)."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:
        cores = list(range(os.cpu_count() or 1))
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = cores[:max(1, int(int(quota) / int(period)))]
    except (OSError, ValueError):
        pass
    return cores


def default_thread_count() -> int:
    """OMP_NUM_THREADS if set, else one thread per usable core: the count a fresh process computes with
    (device.thread_count adds what only a running study or calibration knows)."""
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, len(usable_cores()))


def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return {}
    info = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if info:
                break  # the first processor's block is enough
            continue
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_model() -> str:
    """The CPU's marketing name ('AMD EPYC', 'Intel(R) Xeon(R) ...'), as bench tables print it."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> list[str]:
    """The CPU features that matter for torch's CPU kernels (vector width, bf16, AMX)."""
    flags = set(_cpuinfo().get("flags", "").split())
    return [f for f in INTERESTING_FLAGS if f in flags]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU reports native bf16 (AVX512-BF16 or AMX), as torch.cpu's checks read it: from the flags
    the kernel lists (it leaves out those the OS has not enabled). Printed by ``doctor``; it does not decide
    precision, since native bf16 was still slower than fp32 on one such CPU."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_tile" in flags


# ---------------------------------------------------------------------- GPUs
def nvidia_gpus() -> tuple[int, str]:
    """(how many NVIDIA GPUs, how they were counted), without torch: ``nvidia-smi -L`` where it answers, else
    the driver's /proc/driver/nvidia/gpus, else the /dev/nvidiaN device files. Whether torch can use them
    (its CUDA build, CUDA_VISIBLE_DEVICES) only torch can say."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S,
                                    check=False)
            if listed.returncode == 0:
                return sum(line.startswith("GPU ") for line in listed.stdout.splitlines()), "nvidia-smi"
        except (OSError, subprocess.SubprocessError):
            pass  # no driver, or a hung one: the files below still tell
    try:
        return len(list(Path("/proc/driver/nvidia/gpus").iterdir())), "/proc/driver/nvidia/gpus"
    except OSError:
        pass
    return len([p for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name)]), "/dev/nvidia*"


def gpu_text(gpus: tuple[int, str] | None = None) -> str:
    """doctor's 'cuda' row: '2 GPU(s) (nvidia-smi)', or 'none found (...)' naming what was looked at; ``gpus``
    is what nvidia_gpus() returned, if the caller asked already."""
    count, found_by = gpus or nvidia_gpus()
    text = f"{count} GPU(s) ({found_by})" if count else "none found (nvidia-smi, /proc/driver/nvidia, /dev/nvidia*)"
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        text += f"; CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}"
    return text


def may_have_mps() -> bool:
    """Apple silicon: only torch can say whether its MPS backend is there."""
    return sys.platform == "darwin" and platform.machine() == "arm64"


# ---------------------------------------------------------------------- versions
def package_versions() -> dict:
    """transferlab's, torch's, torchvision's, Python's and (if installed) torchattacks' versions, without
    importing them (importing torchvision only to read its version cost 2 s on a 2-core machine)."""
    out = {"transferlab": __version__}
    for name in ("torch", "torchvision", "python", "torchattacks"):
        version = platform.python_version() if name == "python" else _package_version(name)
        if version is not None:  # torchattacks is optional
            out[name] = version
    return out


def _package_version(name: str) -> str | None:
    """The package's own ``__version__`` where it is imported (what this process runs); else the one its
    version.py declares (torch and torchvision keep their build there: '2.14.1+cu130', where the installed
    distribution says '2.14.1'); else the installed distribution's."""
    if getattr(sys.modules.get(name), "__version__", None) is not None:
        return str(sys.modules[name].__version__)
    declared = _version_file_field(name, "__version__")
    if declared:
        return declared
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _version_file_field(package: str, field: str) -> str | None:
    """A string assigned at the top of ``package/version.py``, read as text (finding a package imports nothing)."""
    try:
        spec = importlib.util.find_spec(package)
        folder = spec and spec.submodule_search_locations and spec.submodule_search_locations[0]
        text = Path(folder, "version.py").read_text(encoding="utf-8") if folder else ""
    except (ImportError, ValueError, OSError):
        return None
    match = re.search(rf"^{re.escape(field)}\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return match.group(1) if match else None


def torch_cuda_build() -> str | None:
    """The CUDA version this torch was built for ('13.0'), None for a CPU build or where it cannot be read."""
    if "torch" in sys.modules:
        return getattr(getattr(sys.modules["torch"], "version", None), "cuda", None)
    return _version_file_field("torch", "cuda")


# ---------------------------------------------------------------------- memory
def feature_budget_bytes(device_memory: int | None = None) -> int:
    """How many bytes of frozen-prefix activations stay on the device (prefix.budget_bytes):
    $TRANSFERLAB_FEATURE_BUDGET (e.g. 2GB), else a quarter of ``device_memory`` (a GPU's), else a quarter of
    this machine's memory."""
    text = os.environ.get(FEATURE_BUDGET_ENV, "").strip()
    if text:
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?B?)", text.upper())
        if not match:
            raise UserError(f"${FEATURE_BUDGET_ENV}={text!r} is not a size; write it like 2GB, 500MB or 1000000")
        scale = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[match.group(2)]
        return int(float(match.group(1)) * scale)
    if device_memory is not None:
        return device_memory // 4
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 2 * 10**9


def feature_budget_text() -> str:
    source = (f"${FEATURE_BUDGET_ENV}" if os.environ.get(FEATURE_BUDGET_ENV, "").strip()
              else f"a quarter of memory; ${FEATURE_BUDGET_ENV}")
    return f"{feature_budget_bytes() / 1e9:.2f} GB on the device, beyond it a memory-mapped file ({source})"
