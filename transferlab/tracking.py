"""Experiment tracking (``--log csv|tensorboard|mlflow``): per-epoch metrics and the final tables.

``pretrain``, ``finetune``, ``attack-matrix`` and ``run`` take ``--log``: training mirrors each epoch's record
(loss, accuracy, learning rate, validation accuracy) as it is appended to the run's history, and a matrix or a
study mirrors its final tables. Logs go under ``OUT/logs/NAME`` (``tensorboard --logdir results/runs/logs``).
After the fact works too, since every run records its history in run.json and every matrix its tables:
``export_run(run_dir, "csv,tensorboard")`` and ``export_matrix(matrix_dir, "mlflow")``.

Convention: the source of truth stays the tidy files transferlab writes (run.json's ``history``, cells.csv,
lineage.csv, pairs.csv); a tracker only mirrors them into a tool, so a tracker never changes a result or a key.
``csv`` needs nothing and is what most papers in this field end up plotting from; ``tensorboard``
(``pip install tensorboard``) is for watching long GPU runs live; ``mlflow`` (``pip install mlflow``) for a
team's tracking server (``MLFLOW_TRACKING_URI``; else a local store under the log folder).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from transferlab import names, store
from transferlab.config import TRACKERS
from transferlab.errors import UserError

KINDS = TRACKERS
LOG_DIR = "logs"  # under a command's --out
_PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard"), "mlflow": ("mlflow", "pip install mlflow")}


def parse_kinds(kinds) -> list[str]:
    """'csv,tensorboard' / ['csv', 'mlflow'] / None -> a checked list (order kept, duplicates dropped)."""
    if kinds is None:
        return []
    items = kinds.split(",") if isinstance(kinds, str) else [k for item in kinds for k in str(item).split(",")]
    out = []
    for kind in (k.strip().lower() for k in items):
        if not kind:
            continue
        if kind not in KINDS:
            raise UserError(f"unknown --log {kind!r}; use csv, tensorboard or mlflow (several: --log csv,tensorboard)")
        if kind not in out:
            out.append(kind)
    return out


def check_targets(kinds, out_dir: Path | None = None) -> tuple[str, ...]:
    """The checked tracker list, refused up front (before any training) when a tracker's package is missing
    or, given the command's ``out_dir``, when its log folder ``out_dir/logs`` cannot be written (a file there
    would otherwise fail the first epoch's log, after the training it was to log)."""
    import importlib.util

    checked = tuple(parse_kinds(kinds))
    for kind in checked:
        if kind in _PACKAGES and importlib.util.find_spec(_PACKAGES[kind][0]) is None:
            raise UserError(f"--log {kind} needs the {_PACKAGES[kind][0]} package: {_PACKAGES[kind][1]} "
                            f"(or use --log csv, which needs nothing)")
    if checked and out_dir is not None:
        logs = Path(out_dir) / LOG_DIR
        if logs.exists() and not logs.is_dir():
            raise UserError(f"--log {','.join(checked)} writes under {logs}, which is a file; move it away, "
                            "or choose another --out")
        store.ensure_writable_dir(logs, "log folder")
    return checked


def _numbers(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


class _CsvBackend:
    def __init__(self, log_dir: Path, name: str, params: dict):
        self.dir = Path(log_dir)
        self.rows: list[dict] = []
        self.params = params

    def epoch(self, record: dict) -> None:
        import pandas as pd

        self.rows.append(dict(record))
        # Rewritten whole each epoch (a few hundred rows at most), atomically: a reader never sees half a file.
        store.atomic_write_text(self.dir / "metrics.csv", pd.DataFrame(self.rows).to_csv(index=False))

    def table(self, name: str, frame) -> None:
        store.atomic_write_text(self.dir / "tables" / f"{name}.csv", frame.to_csv(index=False))

    def close(self) -> None:
        if self.params:
            store.atomic_write_json(self.dir / "params.json", self.params)


class _TensorBoardBackend:
    def __init__(self, log_dir: Path, name: str, params: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--log tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(Path(log_dir) / "tensorboard"))
        if params:
            self.writer.add_text("params", "```\n" + json.dumps(params, indent=2, default=str) + "\n```")

    def epoch(self, record: dict) -> None:
        step = int(record.get("epoch", 0))
        for key, value in _numbers(record).items():
            if key != "epoch":
                self.writer.add_scalar(f"train/{key}", value, step)

    def table(self, name: str, frame) -> None:
        self.writer.add_text(f"tables/{name}", "```\n" + frame.to_string(index=False) + "\n```")

    def close(self) -> None:
        self.writer.close()


class _MlflowBackend:
    def __init__(self, log_dir: Path, name: str, params: dict):
        try:
            import mlflow
        except ImportError:
            raise UserError("--log mlflow needs the mlflow package: pip install mlflow") from None
        self.mlflow = mlflow
        if "MLFLOW_TRACKING_URI" not in os.environ:  # a team's server when set; else a local store under log_dir
            # mlflow 3 refuses its file store unless asked; a database would need sqlalchemy, which
            # mlflow-skinny (the extra) leaves out, and `mlflow ui --backend-store-uri DIR` reads files fine.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((Path(log_dir) / "mlruns").resolve().as_uri())
        self.run = mlflow.start_run(run_name=name)
        flat = {k: json.dumps(v, default=str) if isinstance(v, (dict, list)) else v for k, v in (params or {}).items()}
        if flat:
            mlflow.log_params(flat)

    def epoch(self, record: dict) -> None:
        metrics = {k: v for k, v in _numbers(record).items() if k != "epoch"}
        self.mlflow.log_metrics(metrics, step=int(record.get("epoch", 0)))

    def table(self, name: str, frame) -> None:
        self.mlflow.log_text(frame.to_csv(index=False), f"tables/{name}.csv")

    def close(self) -> None:
        self.mlflow.end_run()


_BACKENDS = {"csv": _CsvBackend, "tensorboard": _TensorBoardBackend, "mlflow": _MlflowBackend}


class Tracker:
    """Fans per-epoch records and final tables out to the chosen backends; a no-op with none."""

    def __init__(self, kinds, log_dir: Path, name: str, params: dict | None = None):
        names.check_name(name, "tracked run name")
        self.kinds = parse_kinds(kinds)
        self.log_dir = Path(log_dir) / name
        self.backends = [_BACKENDS[kind](self.log_dir, name, dict(params or {})) for kind in self.kinds]

    def log_epoch(self, record: dict) -> None:
        """One training epoch's record, as training.fit appends it to the run's history."""
        for backend in self.backends:
            backend.epoch(record)

    def log_table(self, name: str, frame) -> None:
        """A final table (cells, lineage, pairs ...), as a DataFrame."""
        names.check_name(name, "table name")
        for backend in self.backends:
            backend.table(name, frame)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def export_run(run_dir, kinds, log_dir=None) -> Path:
    """Mirror a finished run's recorded per-epoch history and its metrics into the trackers, after the fact.
    ``log_dir`` defaults to ``<run_dir's parent>/logs``; returns the run's log folder."""
    import pandas as pd

    run_dir = Path(run_dir)
    info = store.read_run_info(run_dir)
    log_dir = Path(log_dir) if log_dir is not None else run_dir.parent / "logs"
    params = {"kind": info.get("kind"), "model": info["model"].get("family"), "dataset": info["dataset"]["name"],
              "n": (info["dataset"].get("subset") or {}).get("n"), "seed": info.get("seed"),
              "freeze": (info.get("freeze") or {}).get("n"), **(info.get("hyperparameters") or {})}
    with Tracker(kinds, log_dir, info["name"], params) as tracker:
        for record in info.get("history") or []:
            tracker.log_epoch(record)
        if info.get("metrics"):
            tracker.log_table("metrics", pd.DataFrame([info["metrics"]]))
        return tracker.log_dir


def export_matrix(matrix_dir, kinds, log_dir=None, name: str | None = None) -> Path:
    """Mirror an attack matrix's tables (cells.csv, lineage.csv, pairs.csv) into the trackers."""
    import pandas as pd

    matrix_dir = Path(matrix_dir)
    if not (matrix_dir / "cells.csv").is_file():
        raise UserError(f"{matrix_dir} has no cells.csv; give an attack-matrix output folder")
    log_dir = Path(log_dir) if log_dir is not None else matrix_dir / "logs"
    with Tracker(kinds, log_dir, name or matrix_dir.resolve().name) as tracker:
        for table in ("cells", "lineage", "pairs"):
            path = matrix_dir / f"{table}.csv"
            if path.is_file():
                tracker.log_table(table, pd.read_csv(path))
        return tracker.log_dir


def export_study(out_dir, kinds, name: str) -> Path:
    """Mirror a study's tables (runs.csv and the attack matrix's cells, lineage and pairs) into the trackers."""
    import pandas as pd

    out_dir = Path(out_dir)
    with Tracker(kinds, out_dir / LOG_DIR, name) as tracker:
        for table, path in (("runs", out_dir / "runs.csv"), ("cells", out_dir / "matrix" / "cells.csv"),
                            ("lineage", out_dir / "matrix" / "lineage.csv"), ("pairs", out_dir / "matrix" / "pairs.csv")):
            if path.is_file() and path.stat().st_size > 1:
                tracker.log_table(table, pd.read_csv(path))
        return tracker.log_dir
