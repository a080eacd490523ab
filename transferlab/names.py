"""Names that become paths: one rule, checked wherever a name enters transferlab.

A run, step, pretrain, ensemble or adversarial-set name ends up as a folder or file name
under ``--out``. It must therefore be exactly one path component: letters, digits, '.', '_'
and '-', not '.' or '..', so no name can point outside ``--out`` or at ``--out`` itself.
Dataset names (``npz:../some/folder``) are paths, not names: ``slug`` turns them into one.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from transferlab.errors import UserError

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
MAX_NAME_LENGTH = 200  # well under the 255 bytes of a file name, leaving room for suffixes


def check_name(name, what: str = "run name") -> str:
    """Return ``name`` if it is one safe path component; otherwise a UserError saying why."""
    if not isinstance(name, str) or not name:
        raise UserError(f"{what} must be a non-empty string of letters, digits, '.', '_' or '-', got {name!r}")
    if name in (".", "..") or not NAME_PATTERN.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
        raise UserError(f"{what} {name!r} is not a name: use one folder name of letters, digits, '.', '_' or '-' "
                        f"(not '.' or '..', at most {MAX_NAME_LENGTH} characters)")
    return name


def slug(text: str) -> str:
    """A name-safe token for a dataset or model name: ``npz:../data/my set`` -> ``npz-my-set``."""
    text = str(text)
    prefix = ""
    if text.startswith("npz:"):
        text = Path(text[4:].rstrip("/\\")).name or "data"
        prefix = "npz-"
    cleaned = re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-.")
    return prefix + (cleaned or "x")


RUN_PREFIXES = {"pretrain": "pre", "finetune": "final", "scratch": "scratch"}


def run_name(kind: str, label: str, seed: int, dataset: str | None = None, size="", tag: str | None = None) -> str:
    """The one place run directories are named: ``pre_<label>_s<seed>``,
    ``final_<label>_<dataset><size>_<tag>_s<seed>``, ``scratch_<label>_<dataset><size>_s<seed>``. The CLI's
    label is the model and data (``pre_resnet_kmnist_s0``), a study's the entry name (``pre_kmnist-resnet_s0``)."""
    parts = [RUN_PREFIXES[kind], label]
    if dataset is not None:
        parts.append(f"{slug(dataset)}{size}")
    if tag:
        parts.append(tag)
    return "_".join(parts) + f"_s{seed}"


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` resolves to ``root`` itself or somewhere below it."""
    path, root = Path(path).resolve(), Path(root).resolve()
    return path == root or root in path.parents


def clean_stale_staging(folder: Path, recursive: bool = False, only_name: str | None = None) -> list[Path]:
    """Remove '.NAME.XXXXXXXX.tmp' / '.old' folders and files left by a killed transferlab process.

    Only names of transferlab's own staging patterns (``store.staging_dir``, ``store.atomic_file``)
    are touched, so nothing a user put there is deleted. Call it only where no other transferlab
    process can be writing (the study holds its lock). ``only_name``: only the staging of that one entry
    (a run about to be redone by the one step that writes it). Returns what was removed.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    entries = folder.rglob(".*") if recursive else folder.iterdir()
    for entry in sorted(entries, key=lambda p: len(p.parts)):
        if entry.is_symlink() or not STAGING_PATTERN.fullmatch(entry.name) or not entry.exists():
            continue
        if only_name is not None and not re.fullmatch(rf"\.{re.escape(only_name)}\.[A-Za-z0-9_]{{8}}\.(tmp|old)",
                                                      entry.name):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


# store.staging_dir and store.atomic_file: 8 hex digits. [A-Za-z0-9_] also takes the mkstemp names that
# atomic writes of earlier versions left.
STAGING_PATTERN = re.compile(r"\.[A-Za-z0-9._-]+\.[A-Za-z0-9_]{8}\.(tmp|old)")
