"""What a report writer produced, so that a re-run removes what it no longer produces.

Each writer keeps a manifest (``.transferlab-outputs.json`` in its output folder) of the files it wrote,
per writer name. Re-running with fewer attacks or eps deletes the files of the previous manifest that
the new run did not write again. Only files listed there are ever deleted: a user's own files in the
same folder are never touched, and neither are files written before manifests existed.

A writer may also record a content key of what it drew from (``inputs``): a later call with the same key
and layout finds its outputs current and need not draw them again.
"""

from __future__ import annotations

import json
from pathlib import Path
from transferlab.files import atomic_write_json

MANIFEST = ".transferlab-outputs.json"


def _read(folder: Path) -> dict:
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def recorded_outputs(folder: Path, writer: str, layout: int | None = None, inputs: str | None = None) -> set[str] | None:
    """The files ``writer`` recorded in ``folder`` (relative paths); None when there is no record, or it was
    written by another ``layout`` version of the writer (its outputs then look different and are redone), or,
    when ``inputs`` is given, from other inputs."""
    manifest = _read(Path(folder).resolve())
    if writer not in manifest or manifest.get(f"{writer}@layout") != layout:
        return None
    if inputs is not None and manifest.get(f"{writer}@inputs") != inputs:
        return None
    return set(manifest[writer])


def replace_outputs(folder: Path, writer: str, written: list[Path], layout: int | None = None,
                    inputs: str | None = None) -> list[Path]:
    """Record ``written`` as ``writer``'s outputs in ``folder``; delete what it wrote last time and not now.

    Returns the removed paths."""

    folder = Path(folder).resolve()
    manifest = _read(folder)
    now = sorted({str(Path(p).resolve().relative_to(folder)) for p in written
                  if Path(p).resolve().is_relative_to(folder)})
    before = manifest.get(writer, [])
    removed = []
    for relative in before if isinstance(before, list) else []:
        if relative in now or not isinstance(relative, str):
            continue
        path = (folder / relative).resolve()
        # Never follow a recorded name out of the folder, and never another writer's current file.
        if not path.is_relative_to(folder) or any(isinstance(v, list) and relative in v
                                                  for k, v in manifest.items() if k != writer):
            continue
        if path.is_file():
            path.unlink()
            removed.append(path)
    manifest[writer] = now
    manifest[f"{writer}@layout"] = layout
    manifest[f"{writer}@inputs"] = inputs
    atomic_write_json(folder / MANIFEST, manifest)
    return removed
