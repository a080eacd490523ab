"""The attack-matrix cells, prepared once, and what every view of them shares.

``Cells`` is the one place a cells table is checked and cast; the helpers below pick one setting
(``choose``), pivot it into a matrix in one row and column order (``pivot``, ``pivots``) and name its files
(``setting_stem``). The tables, figures and report sections (``matrices``, ``asr``, ``freeze``,
``study_report``) are built on these, so they import this module and never each other's internals.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from transferlab.errors import UserError
from transferlab.tables import eps_label, eps_text, integer_columns, upgrade_table

__all__ = ["CELL_REQUIRED", "LEGEND", "LINEAGE_REQUIRED", "ROLE_ORDER_COLUMNS", "ROLE_ORDER_ROWS", "SIDES", "Cells",
           "Pivots", "choose", "eps_label", "eps_text", "merge_seed_names", "pivot", "pivots", "prepare_cells",
           "prepare_lineage", "read_cells", "read_csv", "read_lineage", "read_pairs", "run_order", "setting_stem",
           "settings", "strip_seed"]

CELL_REQUIRED = ["crafted_on", "evaluated", "crafted_on_role", "evaluated_role", "attack", "eps", "seed",
                 "adversarial_accuracy", "clean_accuracy", "same_pretraining", "white_box"]
LINEAGE_REQUIRED = ["finetuned", "pretrained_from", "other_pretrained", "attack", "eps", "seed", "acc_own", "acc_other",
                    "difference", "mcnemar_p"]

# Fine-tunes and from-scratch runs share a rank: within a model, from-scratch runs sort last by their
# missing pretraining data (see run_order).
ROLE_ORDER_ROWS = {"pretrained": 0, "finetuned": 1, "scratch": 1}  # pretrained models first
ROLE_ORDER_COLUMNS = {"finetuned": 0, "scratch": 0, "pretrained": 1}  # eps-curve panels: fine-tunes first
SIDES = ("crafted_on", "evaluated")  # a cell's two models; each has <side>_role, _model, _dataset, ...
LEGEND = ("Bold: white-box cell (examples crafted on the evaluated model itself). "
          "Italic: same pretraining (one model was fine-tuned from the other, or both from one source).")


# ------------------------------------------------------------------ inputs
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "attack"


def setting_stem(attack: str, eps: float) -> str:
    return f"{_slug(attack)}_{eps_label(eps)}"


def _as_bool(series: pd.Series) -> pd.Series:
    if series.dtype == bool:
        return series
    return series.map(lambda v: str(v).strip().lower() in {"true", "1", "1.0", "yes"}).astype(bool)


def _check_columns(frame: pd.DataFrame, required: list[str], what: str) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise UserError(f"{what} lacks column(s) {', '.join(missing)}; regenerate it with 'transferlab attack-matrix' or 'transferlab run'")


def prepare_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """The prepared frame of ``Cells.prepare`` (for callers that want the DataFrame itself)."""
    return Cells.prepare(cells).frame


def prepare_lineage(lineage: pd.DataFrame | None) -> pd.DataFrame | None:
    if lineage is None:
        return None
    if lineage.empty:  # no target had both its own source and another: the question is not testable
        return pd.DataFrame(columns=LINEAGE_REQUIRED)

    _check_columns(lineage, LINEAGE_REQUIRED, "lineage table")
    lineage = integer_columns(lineage.copy())
    lineage["eps"] = lineage["eps"].astype(float)
    return lineage


def read_csv(path: Path) -> pd.DataFrame:
    """A CSV file as a DataFrame; an empty file (a table with no rows, not even a header) as an empty frame."""
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise UserError(f"{path} is not a readable CSV table ({type(exc).__name__}); rebuild it by re-running "
                        "the study (transferlab run) or the attack matrix") from None


def read_cells(path: Path) -> pd.DataFrame:
    """The prepared frame of ``Cells.read``."""
    return Cells.read(path).frame


def read_lineage(path: Path) -> pd.DataFrame | None:
    return prepare_lineage(upgrade_table(read_csv(path), "lineage", str(path))) if Path(path).is_file() else None


def read_pairs(path: Path) -> pd.DataFrame | None:
    return upgrade_table(read_csv(path), "pairs", str(path)) if Path(path).is_file() else None


def strip_seed(name: str, seed) -> str:
    suffix = f"_s{int(seed)}" if pd.notna(seed) else None
    return name[: -len(suffix)] if suffix and str(name).endswith(suffix) else name


def merge_seed_names(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """With several seeds, drop each name's ``_s<seed>`` suffix so seeds of one configuration line up."""
    if frame["seed"].nunique() <= 1:
        return frame
    frame = frame.copy()
    for column in columns:
        frame[column] = [strip_seed(n, s) for n, s in zip(frame[column], frame["seed"])]
    return frame


def settings(cells: pd.DataFrame) -> list[tuple[str, float]]:
    pairs = cells[["attack", "eps"]].drop_duplicates().sort_values(["attack", "eps"])
    return [(a, float(e)) for a, e in pairs.itertuples(index=False)]


def _select(cells: pd.DataFrame, attack: str, eps: float) -> pd.DataFrame:
    chosen = cells[(cells["attack"] == attack) & np.isclose(cells["eps"].astype(float), float(eps))]
    if chosen.empty:
        available = ", ".join(f"{a} eps={eps_text(e)}" for a, e in settings(cells)) or "none"
        raise UserError(f"no attack-matrix cells for {attack} eps={eps_text(eps)}; available: {available}")
    return chosen


# ------------------------------------------------------------------ the cells, prepared once
@dataclass(frozen=True)
class Cells:
    """The cells table checked and cast once (real booleans, float eps, integer counts, varied ``steps`` named
    apart): the same frame whether it came from a CSV file or straight from the matrix. Report functions take
    this, never a raw DataFrame; public entry points convert what they are given with ``Cells.of``."""

    frame: pd.DataFrame

    @classmethod
    def prepare(cls, cells: pd.DataFrame) -> Cells:
        """A checked copy of a raw cells table: the only place cells are checked and cast."""
        _check_columns(cells, CELL_REQUIRED, "cells table")
        cells = integer_columns(cells.copy())
        for column in ("same_pretraining", "white_box"):
            cells[column] = _as_bool(cells[column])
        cells["eps"] = cells["eps"].astype(float)
        # One attack run with several step counts is several settings: name them apart rather than average them.
        if "steps" in cells.columns and len(cells):
            varied = cells.groupby("attack")["steps"].nunique()
            varied = set(varied[varied > 1].index)
            if varied:
                cells["attack"] = [f"{a}_k{int(k)}" if a in varied and pd.notna(k) else a
                                   for a, k in zip(cells["attack"], cells["steps"])]
        return cls(cells)

    @classmethod
    def of(cls, cells: Cells | pd.DataFrame) -> Cells:
        """``cells`` as prepared cells: passed through when they are already, prepared once when not."""
        return cells if isinstance(cells, Cells) else cls.prepare(cells)

    @classmethod
    def read(cls, path: Path) -> Cells:
        """cells.csv as written by any version: read, upgraded to the current column names, prepared."""
        cells = read_csv(path)
        return cls.prepare(upgrade_table(cells, "cells", str(path)) if len(cells.columns)
                           else pd.DataFrame(columns=CELL_REQUIRED))

    @property
    def empty(self) -> bool:
        return self.frame.empty

    @cached_property
    def merged(self) -> pd.DataFrame:
        """The frame with the seeds of one configuration under one name (``merge_seed_names``), made once."""
        return merge_seed_names(self.frame, list(SIDES))


# ------------------------------------------------------------------ pivots

def run_order(chosen: pd.DataFrame, side: str, role_order: dict) -> list[str]:
    """Run names on one side (crafted_on or evaluated), by role, then model, then pretraining data, then name."""
    runs = chosen[[side, f"{side}_role"] + [c for c in (f"{side}_model", f"{side}_pretrain_dataset")
                                           if c in chosen.columns]].drop_duplicates(subset=[side])

    def key(row):
        model = row.get(f"{side}_model")
        pretrain = row.get(f"{side}_pretrain_dataset")
        return (role_order.get(row[f"{side}_role"], 2), "" if pd.isna(model) else str(model),
                "~" if pd.isna(pretrain) else str(pretrain), str(row[side]))  # "~": from-scratch runs last

    return [row[side] for _, row in sorted(runs.iterrows(), key=lambda item: key(item[1]))]


def _common_order(chosen: pd.DataFrame) -> list[str]:
    """One order for rows and columns (pretrained models, then fine-tunes, then from-scratch runs), so a model
    that is both crafted on and evaluated sits at the same position on both axes: white-box cells form the
    diagonal."""
    order = run_order(chosen, "evaluated", ROLE_ORDER_ROWS)
    return order + [r for r in run_order(chosen, "crafted_on", ROLE_ORDER_ROWS) if r not in order]


def choose(cells: Cells, attack: str, eps: float) -> pd.DataFrame:
    """The checked cells of one setting, seeds of one configuration under one name."""
    return _select(cells.merged, attack, eps)


def pivot(chosen: pd.DataFrame, value: str, how: str = "mean") -> pd.DataFrame:
    """``value`` per cell (rows: crafted on, columns: evaluated, in the common order; seeds combined by ``how``).
    Every matrix the report shows is made here, so all of them share one shape and order."""
    order = _common_order(chosen)
    rows = [r for r in order if r in set(chosen["crafted_on"])]
    columns = [c for c in order if c in set(chosen["evaluated"])]
    table = chosen.groupby(["crafted_on", "evaluated"])[value].agg(how).unstack("evaluated")
    table = table.reindex(index=rows, columns=columns)
    table.index.name, table.columns.name = "crafted on", "evaluated"
    return table


@dataclass
class Pivots:
    """One setting's matrix with what is drawn beside it, all in the shape of ``values``."""

    values: pd.DataFrame
    white_box: pd.DataFrame  # bool: crafted on the evaluated model itself
    same_pretraining: pd.DataFrame  # bool
    clean: pd.Series  # the evaluated models' clean accuracy, one per column


def pivots(chosen: pd.DataFrame, value: str = "adversarial_accuracy", how: str = "mean") -> Pivots:
    values = pivot(chosen, value, how)

    def flag(column: str) -> pd.DataFrame:
        return pivot(chosen, column, "any").reindex_like(values).fillna(False).astype(bool)

    clean = chosen.groupby("evaluated")["clean_accuracy"].mean().reindex(values.columns)
    return Pivots(values, flag("white_box"), flag("same_pretraining"), clean)
