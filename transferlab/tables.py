"""The attack matrix's tables: their columns, their schema version, and reading older ones.

transferlab.matrix writes cells.csv, lineage.csv and pairs.csv with these columns; the report
reads them. A table of an older schema is translated here (upgrade_table), so the report needs
only the current names. Nothing here needs torch.
"""

from __future__ import annotations

import warnings

import pandas as pd

# The tables' schema (cells.csv, lineage.csv, pairs.csv, matrix.json). 4: crafted_on / evaluated columns
# (3 called them source / target), roles pretrained | finetuned | scratch | ensemble.
MATRIX_SCHEMA = 4
# The cached files' schema (adversarial sets, correct/ results, pairs/ files): it is part of their content
# keys, so it changes only when what they hold changes. A new table schema re-merges from them.
CACHE_SCHEMA = 3
CELL_COLUMNS = [
    "crafted_on", "evaluated", "crafted_on_dataset", "evaluated_dataset", "crafted_on_model", "evaluated_model",
    "crafted_on_pretrain_dataset", "evaluated_pretrain_dataset", "crafted_on_role", "evaluated_role", "attack",
    "eps", "steps", "label_policy", "reference_labels", "seed", "samples", "clean_correct", "clean_accuracy",
    "adversarial_correct", "adversarial_accuracy", "attack_success_rate", "ci_low", "ci_high", "same_pretraining",
    "white_box", "evaluated_n", "evaluated_freeze", "attack_params", "adversarial_set", "craft_numerics",
    "eval_numerics",
]
# One row per (fine-tuned model, other pretrained model of its architecture, setting): the fine-tune's accuracy
# on the sets crafted on the model it was fine-tuned from ("own") and on the other one ("other").
LINEAGE_COLUMNS = [
    "finetuned", "finetuned_model", "pretrained_from", "other_pretrained", "attack", "eps", "seed", "samples",
    "acc_own", "acc_other", "difference", "diff_ci_low", "diff_ci_high", "own_only_correct", "other_only_correct",
    "mcnemar_statistic", "mcnemar_p", "method",
]
# pairs.csv: one row per key of a cell (the predictors do not depend on the attack, but a row per setting joins
# cells.csv one to one and a study's attack folders add up without repeating a pair); then one column per predictor.
PAIR_KEYS = ["crafted_on", "evaluated", "attack", "eps", "seed"]
# The transfer predictors computed per pair (transferlab.predictors), the other columns of pairs.csv.
PREDICTORS = ("grad_cosine", "cka", "param_identical", "param_rel_l2", "clean_agreement")
PAIR_COLUMNS = [*PAIR_KEYS, *PREDICTORS]
ROLES = ("pretrained", "finetuned", "scratch", "ensemble")
ROLE_OF_KIND = {"pretrain": "pretrained", "finetune": "finetuned", "scratch": "scratch", "ensemble": "ensemble"}

# Schema 3 names -> schema 4 names, for tables written before the rename (see upgrade_table).
V3_CELL_NAMES = {
    "source": "crafted_on", "target": "evaluated", "source_dataset": "crafted_on_dataset",
    "target_dataset": "evaluated_dataset", "source_model": "crafted_on_model", "target_model": "evaluated_model",
    "source_pretrain_dataset": "crafted_on_pretrain_dataset", "target_pretrain_dataset": "evaluated_pretrain_dataset",
    "source_role": "crafted_on_role", "target_role": "evaluated_role", "target_n": "evaluated_n",
    "target_freeze": "evaluated_freeze",
}
V3_LINEAGE_NAMES = {"target": "finetuned", "target_model": "finetuned_model", "own_source": "pretrained_from",
                    "other_source": "other_pretrained"}
V3_PAIR_NAMES = {"source": "crafted_on", "target": "evaluated"}

# Counts and settings that are whole numbers; a missing value (fgsm has no steps) must not turn them into floats.
INTEGER_COLUMNS = ("steps", "seed", "samples", "clean_correct", "adversarial_correct", "evaluated_n",
                   "evaluated_freeze", "own_only_correct", "other_only_correct")


def integer_columns(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with its integer columns as nullable integers (5, not 5.0, in every CSV)."""
    for column in INTEGER_COLUMNS:
        if column in table.columns:
            table[column] = pd.to_numeric(table[column]).round().astype("Int64")
    return table


def upgrade_table(table: pd.DataFrame, what: str, where: str) -> pd.DataFrame:
    """``table`` (``what``: cells, lineage or pairs) in this schema's column names. One written under schema 3
    (source / target columns) is renamed, and its roles translated, with a one-line warning; a folder's own
    tables are rewritten in the new names when its matrix is merged again (``transferlab run``, or
    ``transferlab attack-matrix`` with the same arguments), which reads the cached results and crafts nothing."""
    names = {"cells": V3_CELL_NAMES, "lineage": V3_LINEAGE_NAMES, "pairs": V3_PAIR_NAMES}[what]
    if not any(old in table.columns and new not in table.columns for old, new in names.items()):
        return table
    warnings.warn(f"{where} has the column names of attack-matrix schema 3 (source / target); read as schema "
                  f"{MATRIX_SCHEMA} (crafted_on / evaluated); re-run the study or attack matrix to rewrite it",
                  stacklevel=2)
    table = table.rename(columns=names)
    for side in ("crafted_on", "evaluated") if what == "cells" else ():
        role, pretrain = f"{side}_role", f"{side}_pretrain_dataset"
        if role not in table.columns:
            continue
        has_pretraining = table[pretrain].notna() if pretrain in table.columns else pd.Series(True, table.index)
        # Schema 3 roles said which list a run came in: "source" (pretrained), "target" (fine-tuned or scratch).
        table[role] = [{"source": "pretrained", "ensemble": "ensemble"}.get(r, "finetuned" if p else "scratch")
                       for r, p in zip(table[role], has_pretraining)]
    return table


def eps_label(eps: float, digits: int = 3) -> str:
    """Compact, file-name-safe eps: 0.1 -> '0.1', 8/255 -> '0.0314' (``digits`` significant digits: the report's
    file names use 3, the matrix's adversarial-set names 4; both are in file names already written)."""
    return f"{float(eps):.{digits}g}"


def eps_text(eps: float) -> str:
    """eps as a user wrote it: 0.1 -> '0.1', 8/255 -> '8/255' (not 0.0314); for captions and tables."""
    value = float(eps)
    if abs(value - round(value, 3)) < 1e-12:
        return f"{value:g}"
    steps = value * 255
    if abs(steps - round(steps)) < 1e-6:
        return f"{round(steps)}/255"
    return f"{value:.4g}"
