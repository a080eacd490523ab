"""Files, torch-free: atomic writes, JSON, content hashes, writable and staged directories.

Every write in transferlab goes through :func:`atomic_file` (a reader sees the old file or the new one, never
half of one) and every content hash through :func:`sha256_hex`. The report and the study tooling use these
without importing torch; transferlab.store builds checkpoints on them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from transferlab.errors import UserError

# ---------------------------------------------------------------- atomic writes
UMASK = os.umask(0)
os.umask(UMASK)


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
    atomic_write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def json_compact(obj) -> str:
    """One-line, key-sorted JSON: for a value stored inside a CSV cell."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=json_default)


def json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    torch = sys.modules.get("torch")  # a tensor can only come from a process that imported torch
    if torch is not None and isinstance(obj, torch.Tensor):
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


def content_key(obj, length: int = 16) -> str:
    """Stable hash of a JSON-able object: same config, same key, on any machine."""
    return sha256_hex([json.dumps(obj, sort_keys=True, separators=(",", ":"), default=json_default)], length)


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
