"""Everything that touches disk for runs: atomic writes, content hashes, checkpoints.

A checkpoint is a run directory holding ``model.safetensors`` (tensors only, never
pickled) and ``run.json`` (the config needed to rebuild the model plus everything the
run recorded). Directories are built under a temporary name and renamed into place,
so a killed process never leaves a directory that looks finished.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from transferlab._version import __version__
from transferlab.errors import UserError
# Atomic writes, JSON, content keys and file hashes live in transferlab.files (torch-free, so that the report
# and the study tooling need not import torch); store's callers keep using them as store.X.
from transferlab.files import (  # noqa: F401
    UMASK, atomic_file, atomic_write_bytes, atomic_write_json, atomic_write_text, content_key, ensure_writable_dir,
    file_sha256, json_compact, json_default, read_json, sha256_hex, staging_dir)
from transferlab.machine import package_versions
from transferlab.models import model_from_config
from transferlab.names import check_name

SCHEMA_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
RUN_FILE = "run.json"
FILES_SHA256 = "files_sha256"  # run.json's record of the sha256 of every other file in the run directory



def save_tensors_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """``safetensors.save_file`` that follows the umask and fails as an ``OSError``.

    safetensors creates its files 0600 whatever the umask, and reports a full disk as a
    ``SafetensorError``, which is no ``OSError``; callers here only need to handle OSError.
    """
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
    except SafetensorError as exc:
        code = re.search(r"(?:code: |os error )(\d+)", str(exc))  # safetensors' two wordings of an OS error
        errno_code = int(code.group(1)) if code else errno.EIO
        raise OSError(errno_code, os.strerror(errno_code), str(path)) from None
    os.chmod(path, 0o666 & ~UMASK)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file, written through ``atomic_file``."""
    with atomic_file(path) as tmp:
        save_tensors_file(tmp, tensors, metadata)


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors``: stored with a cache file, checked on read."""
    def parts():
        for name in sorted(tensors):
            yield f"{name}|{tensors[name].dtype}|{list(tensors[name].shape)}|"
            yield tensor_bytes(tensors[name])

    return sha256_hex(parts())


def save_checked_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """``atomic_save_tensors`` plus a checksum of the tensors in the metadata (see ``load_checked_tensors``)."""
    metadata = dict(metadata or {})
    metadata["checksum"] = tensor_checksum(tensors)
    atomic_save_tensors(path, tensors, metadata)


def load_checked_tensors(path: Path, what: str = "cache file", expect: dict[str, str] | None = None):
    """(tensors, metadata) of a file written by ``save_checked_tensors``, or None with a warning.

    A missing, unreadable, unchecked or altered file, or one whose metadata differs from
    ``expect`` (what the caller's key says it must hold), is never used: the caller rebuilds it.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - any damage means: rebuild, never a traceback
        warnings.warn(f"{what} {path} is unreadable ({type(exc).__name__}); rebuilding it", stacklevel=2)
        return None
    if metadata.get("checksum") != tensor_checksum(tensors):
        warnings.warn(f"{what} {path} fails its checksum (altered or from an older version); rebuilding it",
                      stacklevel=2)
        return None
    for key, value in (expect or {}).items():
        if metadata.get(key) != value:
            warnings.warn(f"{what} {path} was made for {key}={metadata.get(key)!r}, not {value!r}; rebuilding it",
                          stacklevel=2)
            return None
    return tensors, metadata


def tensor_bytes(tensor: torch.Tensor):
    """The raw bytes of ``tensor`` in C order, on the CPU, without a copy where it already is there.

    Viewed as uint8 rather than through numpy, which has no bfloat16.
    """
    tensor = tensor.detach().contiguous().cpu()
    return tensor.reshape(-1).view(torch.uint8).numpy().data if tensor.numel() else b""


# ------------------------------------------------------------------- provenance
def versions() -> dict:
    """The versions a run records (machine.package_versions: read without importing torchvision, 2 s here)."""
    return package_versions()


def git_commit() -> str | None:
    """The commit of the transferlab checkout in use, if it is one (None for an installed wheel)."""
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# ------------------------------------------------------------------ checkpoints
def save_run(run_dir: Path, model: torch.nn.Module, info: dict, extra_files: dict[str, object] | None = None) -> Path:
    """Write a finished run directory atomically: weights, run.json and any extra JSON files.

    An existing ``run_dir`` is replaced only when it is a finished run of the same name.
    """
    check_replaceable_run(run_dir, info.get("name", Path(run_dir).name))
    with staging_dir(run_dir) as tmp:
        save_tensors_file(tmp / WEIGHTS_FILE, model.state_dict())
        for filename, obj in (extra_files or {}).items():
            (tmp / filename).write_text(json.dumps(obj, default=json_default, separators=(",", ":")) + "\n")
        # Every later load checks the weights against this (verified_weights): a flipped bit or another run's
        # weights copied in is refused, never used. Set on the caller's record too, so what it returns is what
        # run.json says.
        info[FILES_SHA256] = {path.name: file_sha256(path) for path in sorted(tmp.iterdir())}
        (tmp / RUN_FILE).write_text(json.dumps(info, indent=2, default=json_default) + "\n")
    return Path(run_dir)


def check_replaceable_run(run_dir: Path, name: str) -> None:
    """Refuse to replace ``run_dir`` unless it is a finished transferlab run called ``name``.

    Writing a run replaces its folder; this is the guard that keeps a user's folder (or a
    different run that happens to sit there) from being deleted.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists() and not run_dir.is_symlink():
        return
    if run_dir.is_symlink() or not run_dir.is_dir():
        raise UserError(f"{run_dir} exists and is not a transferlab run directory; move it away or choose another --name")
    if not is_finished_run(run_dir):
        if not any(run_dir.iterdir()):
            return  # an empty folder holds nothing to lose
        raise UserError(f"{run_dir} exists and is not a finished transferlab run; move it away or choose another --name")
    try:
        info = read_json(run_dir / RUN_FILE, what="run file")
    except UserError:
        info = None
    if not isinstance(info, dict) or info.get("name") != name:
        found = info.get("name") if isinstance(info, dict) else None
        raise UserError(f"{run_dir} holds another run ({found!r}), not {name!r}; choose another --name or --out")


def is_finished_run(run_dir: Path) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / RUN_FILE).is_file() and (run_dir / WEIGHTS_FILE).is_file()


def require_weights(run_dir: Path) -> Path:
    """The run's weights file, or a UserError saying the run never finished."""
    weights = Path(run_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"checkpoint missing: {weights}; the run did not finish, re-run it")
    return weights


_UNVERIFIED_WARNED: set[str] = set()


def verified_weights(run_dir: Path, info: dict) -> tuple[Path, str]:
    """The run's weights file and its sha256, once that sha256 equals the one its run.json recorded.

    A mismatch (a flipped bit, a truncated copy, another run's weights copied in) is a UserError naming the
    run. A run.json written before checksums were recorded (no ``files_sha256``) is used unverified, with one
    warning per run and process: such runs cannot be checked, and refusing them would strand every older study.
    """
    weights = require_weights(run_dir)
    actual = file_sha256(weights)
    sums = info.get(FILES_SHA256)
    recorded = sums.get(WEIGHTS_FILE) if isinstance(sums, dict) else None
    if recorded is None:
        if str(weights) not in _UNVERIFIED_WARNED:
            _UNVERIFIED_WARNED.add(str(weights))
            warnings.warn(f"run {info.get('name')} ({run_dir}) records no checksum of its weights (made by an older "
                          "transferlab); they are used unverified: train it again to have them checked", stacklevel=2)
    elif recorded != actual:
        raise UserError(f"checkpoint {weights} of run {info.get('name')} does not match the sha256 its run.json "
                        f"recorded ({actual[:12]}..., recorded {str(recorded)[:12]}...): it is corrupt, altered or "
                        "another run's; train the run again (or copy back its own model.safetensors)")
    return weights, actual


def read_run_info(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}; pass a directory made by 'transferlab pretrain' or 'finetune'")
    info = read_json(run_dir / RUN_FILE, what="run file")
    if not isinstance(info, dict) or not isinstance(info.get("model"), dict) or "config" not in info["model"]:
        raise UserError(f"run file {run_dir / RUN_FILE} is not a transferlab run (no model config)")
    for key in ("name", "dataset"):
        if key not in info:
            raise UserError(f"run file {run_dir / RUN_FILE} has no '{key}'; it is damaged: train the run again")
    check_name(info["name"], f"run name in {run_dir / RUN_FILE}")
    dataset = info["dataset"]
    if not isinstance(dataset, dict) or not all(k in dataset for k in ("name", "canvas", "label_space")):
        raise UserError(f"run file {run_dir / RUN_FILE} has an incomplete 'dataset' record; train the run again")
    return info


def load_run(run_dir: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a run's model from run.json and load its safetensors weights (no unpickling)."""
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    weights, _ = verified_weights(run_dir, info)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"checkpoint {weights} is corrupt ({exc}); delete the run and train it again") from None
    broken = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if broken:
        raise UserError(f"checkpoint {weights} holds NaN or infinite weights ({broken[0]}); the run diverged or the "
                        "file is damaged: train it again")
    model = model_from_config(info["model"]["config"], named_in=str(run_dir / RUN_FILE))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0:2]
        raise UserError(
            f"checkpoint {weights} does not match its architecture {info['model']['config'].get('family')}: "
            + " ".join(line.strip() for line in first)
        ) from None
    return model.to(device), info
