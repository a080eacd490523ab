"""Everything that touches disk for runs: atomic writes, content hashes, checkpoints.

A checkpoint is a run directory holding ``model.safetensors`` (tensors only, never
pickled) and ``run.json`` (the config needed to rebuild the model plus everything the
run recorded). Directories are built under a temporary name and renamed into place,
so a killed process never leaves a directory that looks finished.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from transferlab._version import __version__
from transferlab.errors import UserError
from transferlab.machine import package_versions
from transferlab.models import model_from_config
from transferlab.names import check_name

SCHEMA_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
RUN_FILE = "run.json"
FILES_SHA256 = "files_sha256"  # run.json's record of the sha256 of every other file in the run directory


# ---------------------------------------------------------------- atomic writes
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_file(path: Path):
    """Yield a temporary path beside ``path`` for the caller to write; when the block ends without error the
    file is fsynced and renamed onto ``path``, so a reader sees the old file or the new one, never half of one.

    On any error (a full disk, Ctrl-C) the temporary file is removed and ``path`` is left as it was. Every
    atomic file write in transferlab goes through here; ``names.STAGING_PATTERN`` matches the temporary name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as handle:  # data on disk before the rename, or a crash can leave an empty file
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp, open(tmp, "xb") as handle:  # open() follows the umask: results are shared
        handle.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


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
    os.chmod(path, 0o666 & ~_UMASK)


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


def json_compact(obj) -> str:
    """One-line, key-sorted JSON: for a value stored inside a CSV cell."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def read_json(path: Path, what: str = "file"):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {path} is corrupt ({exc.__class__.__name__}: {exc}); delete it and re-run the step that made it") from None


# ------------------------------------------------------------------ directories
def ensure_writable_dir(path: Path, what: str = "output directory") -> Path:
    """Prove we can write at ``path`` before any long work starts, without creating it.

    A command refused later must leave nothing behind, not even an empty folder, so a
    missing ``path`` is only checked through its nearest existing parent; the first file
    written creates it.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} exists and is not a folder; choose another with --out")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write to {what} {path}: {existing} is not a folder; choose another with --out")
    try:
        probe = existing / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to {what} {path} ({exc.strerror or exc}); choose another with --out") from None
    return path


@contextmanager
def staging_dir(final: Path):
    """Yield a hidden temporary directory beside ``final``; on success it replaces ``final``.

    Renaming a directory is atomic on POSIX, so readers see either the old finished
    directory, the new finished one, or none, never a half-written one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    old = None
    try:
        yield tmp
        if final.exists():
            old = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(final, old)
        os.replace(tmp, final)
        tmp = None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and not final.exists():
                os.replace(old, final)  # put the previous finished run back
                old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------- content keys
def sha256_hex(chunks, length: int | None = None) -> str:
    """The sha256 of ``chunks`` (str, bytes or buffers, hashed in order) as hex, cut to ``length`` characters.

    Every content hash transferlab records (config keys, file and tensor checksums, dataset fingerprints)
    is this one, so they all mean the same kind of thing.
    """
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk.encode("utf-8") if isinstance(chunk, str) else chunk)
    return digest.hexdigest()[:length]


def tensor_bytes(tensor: torch.Tensor):
    """The raw bytes of ``tensor`` in C order, on the CPU, without a copy where it already is there.

    Viewed as uint8 rather than through numpy, which has no bfloat16.
    """
    tensor = tensor.detach().contiguous().cpu()
    return tensor.reshape(-1).view(torch.uint8).numpy().data if tensor.numel() else b""


def content_key(obj, length: int = 16) -> str:
    """Stable hash of a JSON-able object: same config, same key, on any machine."""
    return sha256_hex([json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)], length)


_FILE_HASHES: dict[tuple, str] = {}
_SETTLED_NS = 2_000_000_000


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, remembered per (path, inode, size, mtime, ctime): a study hashes the same
    checkpoints and data files many times. Any rewrite changes the ctime, which, unlike the mtime, cannot be
    set back (``os.utime`` itself sets it), so a file rewritten in place with its old size and mtime is hashed
    again."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key in _FILE_HASHES:
        return _FILE_HASHES[key]
    with open(path, "rb") as f:
        digest = sha256_hex(iter(lambda: f.read(1 << 20), b""))
    # A file changed within the file system's clock tick keeps its ctime: only settled files are remembered
    # (git's "racy clean" rule).
    if time.time_ns() - stat.st_ctime_ns > _SETTLED_NS:
        _FILE_HASHES[key] = digest
    return digest


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
            (tmp / filename).write_text(json.dumps(obj, default=_json_default, separators=(",", ":")) + "\n")
        # Every later load checks the weights against this (verified_weights): a flipped bit or another run's
        # weights copied in is refused, never used. Set on the caller's record too, so what it returns is what
        # run.json says.
        info[FILES_SHA256] = {path.name: file_sha256(path) for path in sorted(tmp.iterdir())}
        (tmp / RUN_FILE).write_text(json.dumps(info, indent=2, default=_json_default) + "\n")
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
