"""What each kind of study step asks of a Ray cluster: its task's num_cpus, num_gpus, memory and custom resources.

The amounts are typed settings, declared once (config.StepResources): on the command line for every step
(``--num-cpus``, ``--num-gpus``, ``--memory`` in GiB, ``--resource NAME=AMOUNT``), in a study's ``[executor]``
table for every step (``num_gpus = 1``) and for one kind of step (``train = { num_gpus = 1, num_cpus = 2 }``).
The kinds are the study's step kinds grouped by what they do: ``train`` (pretrain, finetune, scratch),
``craft``, ``eval``, ``merge``. Each amount comes from, last one winning: the defaults, the study's
``[executor]`` keys, its kind's table, the command line's options, the deprecated ``--step-resources`` string
(``'train:gpu=1,cpu=2;eval:gpu=0.25'``, per kind, read with a warning).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

from transferlab.config import StepResources
from transferlab.errors import UserError

RESOURCE_KINDS = ("train", "craft", "eval", "merge")
STEP_KIND_RESOURCES = {"pretrain": "train", "finetune": "train", "scratch": "train",
                       "craft": "craft", "eval": "eval", "merge": "merge"}
FIELDS = tuple(f.name for f in dataclasses.fields(StepResources))
# The names a kind's table (and the --step-resources string) used before the settings were typed.
OLD_NAMES = {"cpu": "num_cpus", "gpu": "num_gpus"}
EXAMPLE = "'train:gpu=1,cpu=2;craft:gpu=1;eval:gpu=0.25'"
GIB = 1 << 30  # Ray counts memory in bytes


def given(settings: StepResources | dict | None) -> dict:
    """The amounts a StepResources (or a dict of its fields) sets, without the defaults (None)."""
    if settings is None:
        return {}
    values = dataclasses.asdict(settings) if isinstance(settings, StepResources) else settings
    return {k: v for k, v in values.items() if k in FIELDS and v is not None}


def check_request(kind: str, request: dict, where: str, old_names: str = "warn") -> dict:
    """One kind's table (``{num_gpus = 1, num_cpus = 2}``) checked by the settings' own checks; the amounts it
    sets. Its old names cpu and gpu are read as num_cpus and num_gpus (``old_names``: "warn" says so once).
    ``where`` starts each error ("" where the caller names the place itself)."""
    at = f"{where}: " if where else ""
    if kind not in RESOURCE_KINDS:
        raise UserError(f"{at}unknown step kind {kind!r}; use {', '.join(RESOURCE_KINDS)}")
    if not isinstance(request, dict):
        raise UserError(f"{at}{kind} must be a table like {{ num_gpus = 1, num_cpus = 2 }}")
    renamed = {}
    for name, value in request.items():
        new = OLD_NAMES.get(name, name)
        if new in renamed:
            raise UserError(f"{at}{kind} gives {new} twice (as {name} and {new}); keep {new}")
        if new != name and old_names == "warn":
            warnings.warn(f"{where or 'study: [executor]'}: {kind}.{name} is read as {kind}.{new}, its name now; "
                          f"rename it", FutureWarning, stacklevel=3)
        renamed[new] = value
    try:
        return given(StepResources.from_values(renamed, style="arg"))
    except UserError as exc:
        raise type(exc)(f"{at}{kind}: {exc}") from None


def parse_resources(text: str | None, where: str = "--step-resources") -> dict[str, dict]:
    """The deprecated string ``'train:gpu=1,cpu=2;craft:gpu=1'`` -> ``{"train": {"num_gpus": 1.0, "num_cpus":
    2.0}, "craft": {"num_gpus": 1.0}}`` (its caller warns that it is deprecated)."""
    parsed: dict[str, dict] = {}
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
            name = name.strip()
            if not eq:
                raise UserError(f"{where}: {item!r} in {part!r} is not NAME=VALUE; e.g. {EXAMPLE}")
            if name not in OLD_NAMES:
                raise UserError(f"{where}: unknown resource {name!r} for {kind}; use cpu and/or gpu")
            try:
                request[name] = float(value)
            except ValueError:
                raise UserError(f"{where}: {name}={value!r} in {part!r} is not a number") from None
        parsed[kind] = check_request(kind, request, where, old_names="read")
    return parsed


def check_table(executor: dict, where: str = "study: [executor]", old_names: str = "warn") -> dict[str, dict]:
    """A study's ``[executor]`` kinds' tables (already type-checked as tables) checked like the command line."""
    return {kind: check_request(kind, request, where, old_names) for kind, request in executor.items()
            if kind in RESOURCE_KINDS and request}


def default_resources(cluster_gpus: float, device: str = "auto") -> dict[str, dict]:
    """One GPU per training or crafting step and four evaluations per GPU where the cluster has GPUs and the
    study's device may use them; otherwise none. CPUs: see ray_options (one per thread a step runs)."""
    if cluster_gpus > 0 and not str(device).startswith("cpu"):
        return {"train": {"num_gpus": 1.0}, "craft": {"num_gpus": 1.0}, "eval": {"num_gpus": 0.25}, "merge": {}}
    return {kind: {} for kind in RESOURCE_KINDS}


def merged(cluster_gpus: float, executor: dict | None, command_line: StepResources | dict | None = None,
           per_kind: dict | None = None, device: str = "auto") -> dict[str, dict]:
    """Each kind's amounts: the defaults, the study's [executor] keys and kind tables, the command line's
    settings (every kind), the deprecated per-kind string, each amount replaced on its own."""
    executor = executor or {}
    resources = default_resources(cluster_gpus, device)
    tables = check_table(executor, old_names="read")  # loading the study said it once
    for kind in RESOURCE_KINDS:
        for layer in (given(executor), tables.get(kind), given(command_line), (per_kind or {}).get(kind)):
            resources[kind].update(layer or {})
        if resources[kind].get("num_cpus", 1) == 0 and resources[kind].get("num_gpus", 0) == 0:
            raise UserError(f"{kind} steps ask for no CPU and no GPU; give them num_cpus 1 or a GPU share")
    return resources


def ray_options(request: dict, threads: int, most_cpus: float) -> dict:
    """The ``.options(...)`` of one step's Ray task: its kind's ``request`` (merged), with num_cpus defaulting
    to one per thread the step runs (at least one, at most the largest node's CPUs), memory in bytes."""
    cpus = request.get("num_cpus")
    options = {"num_cpus": cpus if cpus is not None else min(max(1, threads), most_cpus),
               "num_gpus": request.get("num_gpus", 0.0)}
    if request.get("memory"):
        options["memory"] = int(math.ceil(request["memory"] * GIB))
    if request.get("custom_resources"):
        options["resources"] = {name: float(amount) for name, amount in request["custom_resources"].items()}
    return options


def fits(request: dict, node: dict, threads: int = 1) -> bool:
    """Whether a node's resources (Ray's node table: CPU, GPU, memory in bytes, custom names) can hold one step."""
    options = ray_options(request, threads, node.get("CPU", 0) or 1)
    need = {"CPU": options["num_cpus"] if request.get("num_cpus") is not None else 1, "GPU": options["num_gpus"],
            "memory": options.get("memory", 0), **options.get("resources", {})}
    return all(node.get(name, 0) >= amount for name, amount in need.items() if amount)


def describe(request: dict) -> str:
    """'num_gpus=1, memory=4 GiB, accelerator_type:A100=0.001' for an error message."""
    parts = [f"{name}={request[name]:g}" for name in ("num_cpus", "num_gpus") if name in request]
    if request.get("memory"):
        parts.append(f"memory={request['memory']:g} GiB")
    parts += [f"{name}={amount:g}" for name, amount in (request.get("custom_resources") or {}).items()]
    return ", ".join(parts) or "one CPU"
