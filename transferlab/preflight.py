"""What a study run needs before its first step, checked the same way by ``--dry-run`` and by the real run:
every dataset (both splits) present or downloadable, the output folder writable, and room on its disk.

A dry run used to pass with a data_dir that did not exist; the real run then failed at its first step.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from transferlab import store
from transferlab.data import NPZ_PREFIX, SPLITS, default_data_dir, get_canvas, resolve_name
from transferlab.data.registry import NpzSource, registry_entry
from transferlab.errors import UserError

TRAIN_KINDS = ("pretrain", "finetune", "scratch")
BYTES_PER_PARAMETER = 4  # float32 safetensors
RUN_OVERHEAD = 64 * 1024  # run.json, subset indices, receipts


def study_data_dir(study: dict, data_dir: Path | None = None) -> Path | None:
    """Where a study's raw data lives, first match wins: ``--data-dir``; ``$TRANSFERLAB_DATA`` (a machine's own
    data folder overrides what a shared study file says); the study's ``data_dir``, relative to the study file
    (so a study runs from any working directory); None: the default (~/.cache/transferlab/data)."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("TRANSFERLAB_DATA"):
        return default_data_dir()
    given = study["data"].get("data_dir")
    if not given:
        return None
    path = Path(given).expanduser()
    if not path.is_absolute() and study.get("source_file"):
        path = Path(study["source_file"]).expanduser().resolve().parent / path
    return path


def missing_data(name: str, data_dir: Path | None, download: bool) -> str | None:
    """Why loading ``name`` would fail (both splits), in words; None when it would work (or may download)."""
    name = resolve_name(name)
    if name.startswith(NPZ_PREFIX):
        folder = Path(name[len(NPZ_PREFIX):])
        absent = [f"{split}.npz" for split in SPLITS if not (folder / f"{split}.npz").is_file()]
        return f"{name}: missing {', '.join(absent)} in {folder}" if absent else None
    _, source = registry_entry(name)
    if isinstance(source, Path):  # a shipped sample
        return None if source.is_file() else f"{name}: the shipped sample {source} is missing; reinstall transferlab"
    root = Path(data_dir or default_data_dir())
    # An npz copy may sit in one of several folders: the one loading reads (NpzSource.complete_folder).
    found = source.complete_folder(root) if isinstance(source, NpzSource) else None
    folder = found or root / source.folder
    absent = [f for f in source.files if not (folder / f).is_file()]
    if absent and not download:
        return (f"{name}: data files not found in {folder} (missing {', '.join(absent)}); set [data] download = true, "
                f"or point data_dir (relative to the study file), TRANSFERLAB_DATA or --data-dir at a folder that has them")
    return None


def study_datasets(steps) -> list[str]:
    """Every dataset the steps read: training data and the attacked test sets."""
    names = []
    for step in steps:
        if step.kind in TRAIN_KINDS:
            names.append(step.config["data"]["dataset"])
        elif "evaluation" in step.config:
            names.append(step.config["evaluation"]["dataset"])
    return list(dict.fromkeys(names))


def disk_estimate(steps, study: dict) -> int:
    """Bytes the steps will write, roughly: every trained zoo model's weights and every kept adversarial set.
    Models from outside the zoo count as none: building one would call its factory, which a dry run never does
    (model_sources: the trust model)."""
    from transferlab.model_registry import FAMILY_CLASSES  # lazy: import cost
    from transferlab.models import create_model  # lazy: import cost

    sizes: dict[str, int] = {}
    total = 0
    for step in steps:
        if step.kind in TRAIN_KINDS and "model" in step.config:
            key = repr((step.config["model"], step.config.get("options")))
            if str(step.config["model"]).strip().lower() not in FAMILY_CLASSES:
                sizes[key] = 0
            if key not in sizes:
                try:
                    model = create_model(step.config["model"], **(step.config.get("options") or {}))
                    sizes[key] = sum(p.numel() for p in model.parameters()) * BYTES_PER_PARAMETER
                except Exception:  # noqa: BLE001 - an estimate: a model that needs its source run counts as none
                    sizes[key] = 0
            total += sizes[key] + RUN_OVERHEAD
        elif step.kind == "craft" and (step.config["role"] != "target" or study["evaluation"]["scope"] == "full"):
            canvas = get_canvas(study["data"]["canvas"])
            pixels = canvas.channels * canvas.size * canvas.size
            total += step.config["evaluation"]["samples"] * pixels * 4
    return total


def check(steps, study: dict, out_dir: Path, data_dir: Path | None, download: bool) -> str:
    """Raise UserError (one line) for what would stop the run; return a line describing what was checked."""
    datasets = study_datasets(steps)
    problems = [p for p in (missing_data(n, data_dir, download) for n in datasets) if p]
    if problems:
        raise UserError("; ".join(problems))
    store.ensure_writable_dir(out_dir, "study output directory")
    existing = Path(out_dir)
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    needed, free = disk_estimate(steps, study), shutil.disk_usage(existing).free
    if needed > free:
        raise UserError(f"{out_dir}: the study needs about {needed / 1e6:,.0f} MB and its disk has "
                        f"{free / 1e6:,.0f} MB free; free space or choose another --out")
    data = f"data for {', '.join(datasets)} present" if datasets else "no data needed (no step left to run)"
    return (f"checked: {data}; {out_dir} writable; about "
            f"{needed / 1e6:,.1f} MB to write, {free / 1e9:,.1f} GB free")
