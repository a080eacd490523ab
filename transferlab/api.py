"""The Python API: the CLI's commands as functions, returning Python objects (runs, DataFrames).

Arguments and defaults mirror the CLI's options (``--batch-size`` is ``batch_size``, ``-o KEY=VALUE`` is
``options={"KEY": VALUE}``, ``--from`` is ``source``); the CLI is a thin layer over these functions, so a
notebook and a shell get the same runs and the same tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transferlab.errors import UserError

if TYPE_CHECKING:  # torch and pandas load lazily, so `import transferlab` (and the CLI's --help) stays quick
    import pandas as pd
    import torch

DEFAULT_RUNS_DIR = Path("results/runs")
DEFAULT_MATRIX_DIR = Path("results/matrix")


@dataclass
class Run:
    """A finished training run: its model (eval mode, on CPU unless asked), run.json and metrics."""

    path: Path
    model: torch.nn.Module
    config: dict
    metrics: dict

    @property
    def name(self) -> str:
        return self.config["name"]


@dataclass
class MatrixTables:
    """An attack matrix's tidy tables; ``out`` is where they were written (None when nothing was)."""

    cells: pd.DataFrame
    lineage: pd.DataFrame
    pairs: pd.DataFrame | None = None
    out: Path | None = None


def _train_config(epochs, batch_size, lr, optimizer, schedule, weight_decay, label_smoothing, augment_shift,
                  val_fraction, compile, channels_last, **extra):
    from transferlab.training import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, schedule=schedule,
                       weight_decay=weight_decay, label_smoothing=label_smoothing, augment_shift=augment_shift,
                       val_fraction=val_fraction, compile=compile, channels_last=channels_last, **extra)


def _data_options(data_dir, download: bool):
    from transferlab.runs import DataOptions

    return DataOptions(data_dir=Path(data_dir) if data_dir is not None else None, download=download)


def load_run(path, device: str = "cpu") -> Run:
    """Load a run directory made by ``pretrain`` / ``finetune`` (safetensors weights; nothing is unpickled)."""
    from transferlab.store import load_run as _load

    model, info = _load(Path(path), device=device)
    model.eval()
    return Run(path=Path(path), model=model, config=info, metrics=dict(info.get("metrics", {})))


def pretrain(*, model: str, dataset: str, options: dict | None = None, n: int | None = None, epochs: int = 10,
             batch_size: int = 128, lr: float = 1e-3, optimizer: str = "adam", schedule: str = "cosine",
             weight_decay: float = 0.0, label_smoothing: float = 0.0, augment_shift: int = 0,
             val_fraction: float = 0.0, canvas: str = "gray28", compile: bool = False, channels_last: bool = True,
             seed: int = 0, device: str = "auto", data_dir=None, download: bool = True,
             out=DEFAULT_RUNS_DIR, name: str | None = None, progress: bool = False) -> Run:
    """Train a source model from scratch (``transferlab pretrain``); return the saved run."""
    from transferlab.runs import pretrain as _pretrain

    config = _train_config(epochs, batch_size, lr, optimizer, schedule, weight_decay, label_smoothing, augment_shift,
                           val_fraction, compile, channels_last)
    outcome = _pretrain(model=model, dataset=dataset, options=options or {}, config=config, seed=seed, n=n,
                        device=device, canvas=canvas, data=_data_options(data_dir, download), out_dir=Path(out),
                        name=name, progress=progress)
    return load_run(outcome.run_dir)


def finetune(*, dataset: str, source=None, model: str | None = None, options: dict | None = None,
             n: int | None = None, freeze: int | None = None, freeze_to: str | None = None,
             bn_stats: str = "frozen", epochs: int = 10, batch_size: int = 128, lr: float = 1e-3,
             optimizer: str = "adam", schedule: str = "cosine", weight_decay: float = 0.0,
             label_smoothing: float = 0.0, augment_shift: int = 0, val_fraction: float = 0.0,
             canvas: str | None = None, compile: bool = False, channels_last: bool = True, seed: int = 0,
             device: str = "auto", data_dir=None, download: bool = True, out=DEFAULT_RUNS_DIR,
             name: str | None = None, progress: bool = False) -> Run:
    """Fine-tune a pretrained run (``source``: a run directory or a ``Run``) on ``dataset``, or with ``model``
    train the same subset from scratch (``transferlab finetune``); return the saved run."""
    from transferlab.runs import finetune as _finetune

    if isinstance(source, Run):
        source = source.path
    config = _train_config(epochs, batch_size, lr, optimizer, schedule, weight_decay, label_smoothing, augment_shift,
                           val_fraction, compile, channels_last, bn_stats=bn_stats)
    outcome = _finetune(dataset=dataset, source=Path(source) if source is not None else None, model=model,
                        options=options or {}, n=n, freeze_n=freeze, freeze_to=freeze_to, config=config, seed=seed,
                        device=device, canvas=canvas, data=_data_options(data_dir, download), out_dir=Path(out),
                        name=name, progress=progress)
    return load_run(outcome.run_dir)


def _run_paths(items, role: str) -> list[Path]:
    if items is None:
        return []
    if isinstance(items, (str, Path, Run)):
        items = [items]
    if isinstance(items, dict):
        # In-memory modules need a recorded architecture to be rebuilt by the matrix's cache and workers;
        # until that exists, say so instead of failing deep inside.
        raise UserError(f"{role}: in-memory models are not supported yet; save them as runs "
                        "(transferlab.pretrain / finetune) and pass the run directories")
    return [item.path if isinstance(item, Run) else Path(item) for item in items]


def attack_matrix(*, dataset: str, sources=None, targets=None, runs_dir=None, select: str = "pre_*",
                  select_targets: str = "final_*", attack=("pgd",), attack_options: dict | None = None,
                  eps="0.1,0.2,0.3", steps: int | None = None, alpha: float | None = None, samples: int = 5000,
                  labels: str = "auto", white_box: bool = True, scope: str = "sources", batch_size: int = 1000,
                  seed: int = 0,
                  device: str = "auto", data_dir=None, download: bool = True, out=DEFAULT_MATRIX_DIR,
                  report: bool = True, progress: bool = False) -> MatrixTables:
    """Craft adversarial examples once per source and score every target on them
    (``transferlab attack-matrix``). ``sources`` / ``targets``: run directories or ``Run`` objects;
    ``eps``: a comma string like the CLI's or a list of floats. Returns the tidy tables as DataFrames; the
    CSVs (and, with ``report``, the per-setting matrices and figures) are written under ``out``."""
    import numpy as np

    from transferlab.attacks import parse_eps_list
    from transferlab.matrix import run_matrix, select_runs
    from transferlab.report import write_matrix_outputs

    sources, targets = _run_paths(sources, "sources"), _run_paths(targets, "targets")
    if runs_dir is not None:
        sources += select_runs(Path(runs_dir), select)
        targets += select_runs(Path(runs_dir), select_targets)
    eps_values = parse_eps_list(eps) if isinstance(eps, str) else [float(e) for e in np.atleast_1d(eps)]
    attack_names = [attack] if isinstance(attack, str) else list(attack)
    out = Path(out)
    result = run_matrix(sources=sources, targets=targets, dataset=dataset, attack_names=attack_names,
                        eps_values=eps_values, steps=steps, alpha=alpha, attack_options=dict(attack_options or {}),
                        samples=samples, label_policy=labels, seed=seed, device=device, white_box=white_box,
                        scope=scope,
                        data=_data_options(data_dir, download), out_dir=out, batch_size=batch_size,
                        progress=progress)
    if report:
        write_matrix_outputs(out, result.cells, result.lineage, result.examples_file)
    return MatrixTables(cells=result.cells, lineage=result.lineage, pairs=result.pairs, out=out)


def run_study(path, out=None, *, dry_run: bool = False, only: str | None = None, force: str | None = None,
              device: str | None = None, data_dir=None, download: bool | None = None, progress: bool = False):
    """Run a study file resumably (``transferlab run``); returns the study outcome (``.out_dir`` holds the
    results and report)."""
    from transferlab.study import run_study as _run_study

    return _run_study(Path(path), Path(out) if out is not None else None, dry_run=dry_run, only=only, force=force,
                      device=device, data_dir=Path(data_dir) if data_dir is not None else None, download=download,
                      progress=progress)


def load_dataset(name: str, split: str = "train", canvas: str = "gray28", data_dir=None,
                 download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One split of a registered dataset on a canvas: (uint8 images [N, C, H, W], int64 labels [N])."""
    from transferlab import data as data_mod

    if split not in data_mod.SPLITS:
        raise UserError(f"unknown split {split!r}; use {' or '.join(data_mod.SPLITS)}")
    ds = data_mod.load(name, canvas=canvas, data_dir=data_dir, download=download)
    part = ds.split(split)
    return part.images.numpy(), part.labels.numpy()
