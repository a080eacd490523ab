"""What each kind of study step asks of a Ray cluster: CPUs and GPUs per step kind.

Written on the command line as ``'train:gpu=1,cpu=2;craft:gpu=1;eval:gpu=0.25'`` or in a study's
``[executor]`` table as ``train = { gpu = 1, cpu = 2 }``. The kinds are the study's step kinds
grouped by what they do: ``train`` (pretrain, finetune, scratch), ``craft``, ``eval``, ``merge``.
"""

from __future__ import annotations

import math

from transferlab.errors import UserError

RESOURCE_KINDS = ("train", "craft", "eval", "merge")
RESOURCE_NAMES = ("cpu", "gpu")
STEP_KIND_RESOURCES = {"pretrain": "train", "finetune": "train", "scratch": "train",
                       "craft": "craft", "eval": "eval", "merge": "merge"}
EXAMPLE = "'train:gpu=1,cpu=2;craft:gpu=1;eval:gpu=0.25'"


def check_request(kind: str, request: dict, where: str) -> dict[str, float]:
    """``{"cpu": 2, "gpu": 0.5}`` checked: known names, finite numbers >= 0, at most one GPU unless whole."""
    if kind not in RESOURCE_KINDS:
        raise UserError(f"{where}: unknown step kind {kind!r}; use {', '.join(RESOURCE_KINDS)}")
    if not isinstance(request, dict):
        raise UserError(f"{where}: {kind} must be a table like {{ gpu = 1, cpu = 2 }}")
    checked = {}
    for name, value in request.items():
        if name not in RESOURCE_NAMES:
            raise UserError(f"{where}: unknown resource {name!r} for {kind}; use cpu and/or gpu")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise UserError(f"{where}: {kind} {name} must be a number >= 0, got {value!r}")
        if value > 1 and value != int(value):
            raise UserError(f"{where}: {kind} {name}={value} is a fraction above 1; Ray takes fractions only "
                            f"below 1 (gpu=0.25) or whole numbers (gpu=2)")
        checked[name] = float(value)
    if checked.get("cpu", 1) == 0 and checked.get("gpu", 0) == 0:
        raise UserError(f"{where}: {kind} asks for no CPU and no GPU; give it cpu=1 or a GPU share")
    return checked


def parse_resources(text: str | None, where: str = "--step-resources") -> dict[str, dict[str, float]]:
    """``'train:gpu=1,cpu=2;craft:gpu=1'`` -> ``{"train": {"gpu": 1.0, "cpu": 2.0}, "craft": {"gpu": 1.0}}``."""
    parsed: dict[str, dict[str, float]] = {}
    for part in (p.strip() for p in (text or "").split(";")):
        if not part:
            continue
        kind, sep, body = part.partition(":")
        kind = kind.strip()
        if not sep or not body.strip():
            raise UserError(f"{where}: {part!r} is not KIND:NAME=VALUE,...; e.g. {EXAMPLE}")
        if kind in parsed:
            raise UserError(f"{where}: {kind} is given twice")
        request = {}
        for item in (i.strip() for i in body.split(",")):
            name, eq, value = item.partition("=")
            if not eq:
                raise UserError(f"{where}: {item!r} in {part!r} is not NAME=VALUE; e.g. {EXAMPLE}")
            try:
                request[name.strip()] = float(value)
            except ValueError:
                raise UserError(f"{where}: {name.strip()}={value!r} in {part!r} is not a number") from None
        parsed[kind] = check_request(kind, request, where)
    return parsed


def check_table(table: dict, where: str = "study: [executor]") -> dict[str, dict[str, float]]:
    """A study's ``[executor]`` resource entries (already type-checked as tables) checked like the CLI's."""
    return {kind: check_request(kind, request, where) for kind, request in table.items()
            if kind in RESOURCE_KINDS and request}


def default_resources(cluster_gpus: float) -> dict[str, dict[str, float]]:
    """One GPU per training or crafting step and four evaluations per GPU where the cluster has GPUs;
    one CPU per step where it has none (each step then runs one torch thread per CPU it holds)."""
    if cluster_gpus > 0:
        return {"train": {"cpu": 1.0, "gpu": 1.0}, "craft": {"cpu": 1.0, "gpu": 1.0},
                "eval": {"cpu": 1.0, "gpu": 0.25}, "merge": {"cpu": 1.0}}
    return {kind: {"cpu": 1.0} for kind in RESOURCE_KINDS}


def merged(cluster_gpus: float, study_table: dict, command_line: dict) -> dict[str, dict[str, float]]:
    """Defaults, then the study's [executor] table, then --step-resources (each kind replaced whole)."""
    resources = default_resources(cluster_gpus)
    resources.update(check_table(study_table or {}))
    resources.update(command_line or {})
    return resources
