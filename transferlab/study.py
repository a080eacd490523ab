"""Studies: one TOML file describes an experiment; this module validates it, plans it and runs it.

The plan is a small DAG: pretrain -> finetune -> attack matrix (craft + evaluate) -> report.
Every step has a content key, a hash of its own config, its inputs' keys, its data
descriptor and a schema version. A step whose output already carries its key is done and
is skipped, so a killed study resumes where it stopped and a study with one more target or
eps runs only what is new. Inside the matrix step, adversarial sets and per-sample results
are cached by content too, so a new eps crafts only the new sets.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
import shutil
import socket
import time
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from filelock import FileLock, Timeout
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from transferlab import config as settings
from transferlab.config import StepKind
from transferlab import ensemble, store
from transferlab.attacks import parse_eps
from transferlab.errors import UserError, suggest
from transferlab.matrix import Matrix, Member, make_spec
from transferlab.names import check_name, clean_stale_staging, run_name, slug
from transferlab.report.study_report import ReportInputs, write_report
from transferlab.runs import DataOptions, finetune, pretrain
from transferlab.study_check import (KeyLines, _device_syntax, apply_overrides, check_values, data_fingerprint,
                                     parse_location)
from transferlab.tables import MATRIX_SCHEMA, integer_columns
from transferlab.tracking import check_targets, export_study
from transferlab.training import TrainConfig, progress_console, resolve_device

STUDY_SCHEMA = 1
REQUIRED = object()

# Training keys allowed in [train] (study-wide defaults) and in every [[pretrain]], [[finetune]], [[scratch]].
TRAIN_FIELDS = settings.train_field_types()
SCHEMA = {
    "study": {"name": (str, REQUIRED), "description": (str, ""), "seeds": ([int], [0]), "device": (str, "auto")},
    "data": {"canvas": (str, "gray28"), "download": (bool, True), "data_dir": (str, None)},
    "train": TRAIN_FIELDS,
    "pretrain": {"name": (str, None), "model": (str, REQUIRED), "dataset": (str, REQUIRED), "options": (dict, {}),
                 "n": (int, None), **TRAIN_FIELDS},
    "finetune": {"name": (str, None), "from": ([str], REQUIRED), "dataset": (str, REQUIRED), "n": ([int], [None]),
                 "freeze": ([int], None), "freeze_to": ([str], None), **TRAIN_FIELDS},
    "scratch": {"name": (str, None), "model": ([str], REQUIRED), "dataset": (str, REQUIRED), "options": (dict, {}),
                "n": ([int], [None]), **TRAIN_FIELDS},
    "attack": {"attack": (str, REQUIRED), "eps": ([float], REQUIRED), "steps": (int, None), "alpha": (float, None),
               "options": (dict, {})},
    "evaluation": {"samples": (int, settings.MATRIX.samples), "labels": (str, str(settings.MATRIX.labels)),
                   "white_box": (bool, settings.MATRIX.white_box), "batch_size": (int, settings.MATRIX.batch_size),
                   "precision": (str, str(settings.MATRIX.precision)), "ensembles": ([[str]], []),
                   "scope": (str, str(settings.MATRIX.scope))},
    # How steps are spread over a Ray cluster (transferlab.executors); never part of a step's key.
    "executor": {"train": (dict, {}), "craft": (dict, {}), "eval": (dict, {}), "merge": (dict, {}),
                 "max_retries": (int, 3)},
}
ARRAY_TABLES = ("pretrain", "finetune", "scratch", "attack")
TRAIN_KINDS = (StepKind.PRETRAIN, StepKind.FINETUNE, StepKind.SCRATCH)
# The from-scratch table's name before it was [[scratch]]; still read, with a warning.
OLD_SCRATCH_TABLE = "baseline"
MATRIX_KINDS = (StepKind.CRAFT, StepKind.EVAL, StepKind.MERGE)
DOC_HINT = "see the study file format in README.md"


# ------------------------------------------------------------------ validation
def _line_of(text: str, key: str, where: str | None = None) -> str:
    """' (line N)' of the line that sets ``key`` in table ``where`` (e.g. 'finetune[1]'), else of the first
    line that sets ``key``: tomllib reports no positions for valid TOML."""
    lines = getattr(text, "key_lines", None)
    if lines is not None and where is not None:
        table, index = parse_location(where)
        found = lines.where(table, index, key)
        if found:
            return found
    pattern = re.compile(rf"^\s*(\[\[?\s*{re.escape(key)}\s*\]\]?|\"?{re.escape(key)}\"?\s*=)")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return f" (line {number})"
    return ""


def _check_type(value, expected, where: str, text: str, key: str):
    def fail(what: str):
        raise UserError(f"study: {where}.{key}{_line_of(text, key, where)} {what}; {DOC_HINT}")

    if isinstance(expected, list):  # a list of items (a scalar is taken as a list of one)
        items = value if isinstance(value, list) else [value]
        if not items:
            fail("is an empty list; give at least one value")
        return [_check_type(item, expected[0], where, text, key) for item in items]
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            fail(f"must be a number, got {type(value).__name__}")
        if isinstance(value, str):
            try:
                return parse_eps(value)
            except UserError:
                fail(f"must be a number or a fraction like '8/255', got {value!r}")
        return float(value)
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        fail(f"must be a whole number, got {value!r}")
    if expected is not int and not isinstance(value, expected):
        fail(f"must be {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def _validate_table(table: dict, schema: dict, where: str, text: str) -> dict:
    if not isinstance(table, dict):
        raise UserError(f"study: [{where}] must be a table; {DOC_HINT}")
    out = {}
    for key, value in table.items():
        if key not in schema:
            raise UserError(f"study: unknown key {where}.{key}{_line_of(text, key, where)}{suggest(key, schema)}; "
                            f"allowed: {', '.join(schema)}")
        out[key] = _check_type(value, schema[key][0], where, text, key)
    for key, (_, default) in schema.items():
        if key not in out:
            if default is REQUIRED:
                raise UserError(f"study: [{where}] is missing the required key '{key}'; {DOC_HINT}")
            out[key] = default
    return out


def _renamed_scratch_table(raw: dict, overrides: list[str] | None, path: Path) -> tuple[dict, list[str] | None]:
    """A study that still says [[baseline]] (or --set baseline...), read as [[scratch]] with a one-line warning."""
    old = OLD_SCRATCH_TABLE
    old_overrides = [o for o in overrides or [] if re.match(rf"\s*{old}\b", str(o))]
    if old not in raw and not old_overrides:
        return raw, overrides
    if old in raw and "scratch" in raw:
        raise UserError(f"study {path}: has both [[{old}]] and [[scratch]] ({old} is the old name of scratch); "
                        f"move the [[{old}]] entries into [[scratch]]")
    warnings.warn(f"study {path}: [[{old}]] is now called [[scratch]]; it is read as [[scratch]], rename it "
                  f"(and --set {old}... to --set scratch...)", FutureWarning, stacklevel=3)
    raw = {("scratch" if key == old else key): value for key, value in raw.items()}
    overrides = [re.sub(rf"^(\s*){old}\b", r"\1scratch", str(o)) for o in overrides or []] or None
    return raw, overrides


class _StudyText(str):
    """The study's text, carrying where each key is (see study_check.KeyLines)."""

    key_lines = None


def load_study(path: Path, overrides: list[str] | None = None) -> dict:
    """Parse and validate a study file into a plain dict with every default filled in.

    ``overrides``: ``--set TABLE.KEY=VALUE`` items applied before validation (study_check.apply_overrides).
    """

    path = Path(path)
    if not path.is_file():
        raise UserError(f"study file not found: {path}")
    try:
        text = _StudyText(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"study {path} is not a UTF-8 text file; a study is a TOML file") from None
    except OSError as exc:
        raise UserError(f"cannot read study {path} ({exc.strerror or exc})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"study {path}: TOML syntax error: {exc}") from None
    raw, overrides = _renamed_scratch_table(raw, overrides, path)
    overridden = apply_overrides(raw, overrides, ARRAY_TABLES)
    text.key_lines = KeyLines(text, overridden, aliases={OLD_SCRATCH_TABLE: "scratch"})
    for key in raw:
        if key not in SCHEMA:
            raise UserError(f"study: unknown table [{key}]{_line_of(text, key)}{suggest(key, SCHEMA)}; "
                            f"allowed: {', '.join(SCHEMA)}")
    study = {}
    for section in ("study", "data", "train", "evaluation", "executor"):
        if section == "study" and section not in raw:
            raise UserError(f"study {path}: missing the [study] table with at least name = \"...\"; {DOC_HINT}")
        study[section] = _validate_table(raw.get(section, {}), SCHEMA[section], section, text)
    train_defaults = study["train"]
    given_keys: dict[tuple, set] = {}
    for section in ARRAY_TABLES:
        entries = raw.get(section, [])
        if not isinstance(entries, list):
            raise UserError(f"study: [{section}] must be an array of tables, written [[{section}]]; {DOC_HINT}")
        validated = []
        for i, entry in enumerate(entries):
            given = dict(entry) if isinstance(entry, dict) else entry
            if isinstance(given, dict):
                given_keys[(section, i)] = set(given)
            item = _validate_table(given, SCHEMA[section], f"{section}[{i}]", text)
            for key in TRAIN_FIELDS:  # unset training keys inherit [train]
                if key in item and key not in given:
                    item[key] = train_defaults[key]
            validated.append(item)
        study[section] = validated

    name = study["study"]["name"]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"study: study.name{_line_of(text, 'name', 'study')} {name!r} must be letters, digits, "
                        f"'.', '_' or '-' (it names a folder)")
    if not study["pretrain"] and not study["scratch"]:
        raise UserError(f"study {path}: nothing to train; add a [[pretrain]] or [[scratch]] entry")
    if len(set(study["study"]["seeds"])) != len(study["study"]["seeds"]):
        raise UserError("study: study.seeds has a duplicate seed")

    pretrain_names = []
    for entry in study["pretrain"]:
        entry["name"] = entry["name"] or f"{slug(entry['model'])}-{slug(entry['dataset'])}"
        try:  # it names folders: see names.py
            check_name(entry["name"], "pretrain name")
        except UserError as exc:
            i = len(pretrain_names)
            raise UserError(f"study: pretrain[{i}].name{_line_of(text, 'name', f'pretrain[{i}]')} is invalid: "
                            f"{exc}; {DOC_HINT}") from None
        pretrain_names.append(entry["name"])
    duplicates = {n for n in pretrain_names if pretrain_names.count(n) > 1}
    if duplicates:
        raise UserError(f"study: duplicate pretrain name {sorted(duplicates)[0]!r}{_line_of(text, 'pretrain')}; "
                        f"give each [[pretrain]] a unique name = \"...\"")
    for i, entry in enumerate(study["finetune"]):
        for ref in entry["from"]:
            if ref not in pretrain_names:
                raise UserError(f"study: finetune[{i}].from names pretrain {ref!r}{_line_of(text, 'from', f'finetune[{i}]')}, which is "
                                f"not defined{suggest(ref, pretrain_names)}; defined: {', '.join(pretrain_names)}")
        if entry["freeze"] is not None and entry["freeze_to"] is not None:
            raise UserError(f"study: finetune[{i}] sets both freeze and freeze_to; keep one")
        if entry["freeze"] is None and entry["freeze_to"] is None:
            entry["freeze"] = [0]
    targets = {e["dataset"] for e in study["finetune"]} | {e["dataset"] for e in study["scratch"]}
    if study["attack"] and len(targets) > 1:
        raise UserError(f"study: fine-tunes and from-scratch runs use several datasets ({', '.join(sorted(targets))}); "
                        "an attack matrix needs one target dataset")
    study["evaluation"]["dataset"] = targets.pop() if targets else None
    check_values(study, text.key_lines, TRAIN_FIELDS, given_keys)
    study["source_file"] = str(path)
    study["overrides"] = list(overrides or [])
    return study


# ------------------------------------------------------------------ planning
@dataclass
class Step:
    """A self-contained unit of work: its config and inputs fully determine its output."""

    id: str
    kind: StepKind  # given as its word; converted once here
    config: dict
    inputs: list[str] = field(default_factory=list)  # ids of steps whose outputs this one reads
    key: str = ""
    output: Path | None = None
    seed: int = 0

    def __post_init__(self):
        self.kind = StepKind(self.kind)

    def is_done(self) -> bool:
        if self.kind in TRAIN_KINDS:
            if not store.is_finished_run(self.output):
                return False
            try:
                return store.read_json(self.output / store.RUN_FILE).get("step_key") == self.key
            except UserError:
                return False
        if self.kind in MATRIX_KINDS:  # merge: the folder's matrix.json; craft / eval: a receipt in steps/
            if not self.output.is_file():
                return False
            try:
                written = store.read_json(self.output)
            except UserError:
                return False
            # Tables of an older schema are merged again, from the cached results (nothing is crafted).

            return written.get("step_key") == self.key and (self.kind != "merge"
                                                            or written.get("schema") == MATRIX_SCHEMA)
        return False  # the report is cheap and always rebuilt


def _data_descriptor(dataset: str, canvas: str, split: str, n, seed: int) -> dict:
    # Subset indices are a pure function of (dataset, n, seed), so these fields pin them down.
    descriptor = {"dataset": dataset, "canvas": canvas, "split": split, "n": n, "subset_seed": seed}

    fingerprint = data_fingerprint(dataset)  # a user's npz folder can change under the same name
    if fingerprint is not None:
        descriptor["files_sha256"] = fingerprint
    return descriptor


# Step keys predate the word "scratch": from-scratch steps were "baseline" steps, with ids "baseline/...".
# Keying them, and the craft and eval steps that name them, in the old word keeps a study that ran before
# the rename done: its runs are not trained again, its sets not crafted again.
_KEY_WORDS = {"scratch": "baseline"}


def _key_id(step_id: str) -> str:
    kind, sep, rest = step_id.partition("/")
    return f"{_KEY_WORDS.get(kind, kind)}{sep}{rest}"


def _key_config(step: Step) -> dict:
    """The config a step is keyed on: its own, with the ids of the runs it names in their keyed form."""
    if step.kind not in ("craft", "eval"):
        return step.config
    config = {**step.config, "crafter": [_key_id(i) for i in step.config["crafter"]]}
    if isinstance(config.get("evaluated"), list):  # a shared-prefix group (_shared_prefix_groups)
        config["evaluated"] = [_key_id(i) for i in config["evaluated"]]
    elif "evaluated" in config:
        config["evaluated"] = _key_id(config["evaluated"])
    return config


def plan(study: dict, out_dir: Path) -> list[Step]:
    """Expand lists into their Cartesian product and key every step; dependency order."""
    runs_dir = out_dir / "runs"
    canvas = study["data"]["canvas"]
    steps: list[Step] = []
    by_id: dict[str, Step] = {}


    def add(step: Step) -> Step:
        if step.output is not None and step.kind in TRAIN_KINDS:
            check_name(step.output.name, f"output name of step {step.id}")
        inputs = [by_id[i].key for i in step.inputs]
        step.key = store.content_key({"schema": STUDY_SCHEMA, "kind": _KEY_WORDS.get(step.kind, step.kind),
                                      "config": _key_config(step), "inputs": inputs, "seed": step.seed})
        steps.append(step)
        by_id[step.id] = step
        return step

    train_keys = list(TRAIN_FIELDS)

    def train_of(entry):  # min_steps resolved here, so a step's key names the budget it trains with

        train = {k: entry[k] for k in train_keys}
        train["min_steps"] = settings.DEFAULT_MIN_STEPS if train["min_steps"] is None else train["min_steps"]
        return train
    for seed in study["study"]["seeds"]:
        for entry in study["pretrain"]:
            config = {"model": entry["model"], "options": entry["options"], "train": train_of(entry),
                      "data": _data_descriptor(entry["dataset"], canvas, "train", entry["n"], seed)}
            add(Step(f"pretrain/{entry['name']}/s{seed}", "pretrain", config, [], seed=seed,
                     output=runs_dir / run_name("pretrain", entry["name"], seed)))
        for entry in study["finetune"]:
            freezes = [("freeze", f) for f in entry["freeze"]] if entry["freeze"] is not None else \
                [("freeze_to", f) for f in entry["freeze_to"]]
            for source, n, (freeze_kind, freeze_value) in itertools.product(entry["from"], entry["n"], freezes):
                config = {"from": source, freeze_kind: freeze_value, "train": train_of(entry),
                          "data": _data_descriptor(entry["dataset"], canvas, "train", n, seed)}
                size = "all" if n is None else n
                tag = f"f{freeze_value}" if freeze_kind == "freeze" else f"to-{freeze_value}"
                dataset = slug(entry["dataset"])
                add(Step(f"finetune/{source}/{dataset}{size}/{tag}/s{seed}", "finetune", config,
                         [f"pretrain/{source}/s{seed}"], seed=seed,
                         output=runs_dir / run_name("finetune", source, seed, dataset, size, tag)))
        for entry in study["scratch"]:
            for model, n in itertools.product(entry["model"], entry["n"]):
                config = {"model": model, "options": entry["options"], "train": train_of(entry),
                          "data": _data_descriptor(entry["dataset"], canvas, "train", n, seed)}
                size = "all" if n is None else n
                dataset = slug(entry["dataset"])
                add(Step(f"scratch/{model}/{dataset}{size}/s{seed}", "scratch", config, [], seed=seed,
                         output=runs_dir / run_name("scratch", slug(model), seed, dataset, size)))
        if study["attack"]:
            seed_steps = [s for s in steps if s.seed == seed]
            _ensemble_specs(study["evaluation"]["ensembles"], seed_steps, seed)  # bad names fail before training
            for attack in study["attack"]:
                for step in matrix_steps(study, attack, seed_steps, seed, out_dir):
                    add(step)
    return steps


def _label(step: Step) -> str:
    """A training step's short name in matrix step ids: 'pre:kmnist-resnet', 'final:kmnist-resnet/mnist500/f23'."""
    prefix = {"pretrain": "pre", "finetune": "final", "scratch": "scratch"}[step.kind]
    return f"{prefix}:{step.id.split('/', 1)[1].rsplit('/s', 1)[0]}"


def matrix_steps(study: dict, attack: dict, seed_steps: list[Step], seed: int, out_dir: Path) -> list[Step]:
    """One attack family's matrix as steps: craft each set, evaluate each model in scope on each crafter's
    sets, merge the tables. Crafting spreads over devices; evaluation is cheap and batches per model."""
    evaluation = study["evaluation"]
    folder = out_dir / "matrix" / f"s{seed}" / _attack_folder(attack)
    name = _attack_folder(attack)
    # What changes a crafted set or a score; white_box and ensembles only add crafters, so they are not here.
    core = {k: evaluation[k] for k in ("dataset", "samples", "labels", "batch_size", "precision", "scope")}
    sources = [s for s in seed_steps if s.kind == "pretrain"]
    targets = [s for s in seed_steps if s.kind in ("finetune", "scratch")]
    crafters = [(_label(s), [s.id], "source") for s in sources]
    by_name = {s.id.split("/")[1]: s for s in sources}
    crafters += [("ensemble:" + "+".join(group), [by_name[n].id for n in group], "ensemble")
                 for group in evaluation["ensembles"]]
    if evaluation["white_box"]:
        crafters += [(_label(t), [t.id], "target") for t in targets]
    # One eval step per group of fine-tunes that share a frozen prefix (a lone model keeps its own id and key).
    evaluated = [(_label(g[0]), g[0].id) if len(g) == 1 else ("+".join(_label(s) for s in g), [s.id for s in g])
                 for g in _shared_prefix_groups(targets + sources)]
    steps = []
    for label, inputs, role in crafters:
        crafts = []
        for eps in attack["eps"]:
            # The attack without its eps list: adding an eps must not re-key the sets already crafted.
            config = {"attack": {k: v for k, v in attack.items() if k != "eps"}, "eps": eps, "crafter": inputs,
                      "role": role, "evaluation": core}
            crafts.append(Step(f"craft/{name}/{label}/eps{eps:.4g}/s{seed}", "craft", config, list(inputs),
                               seed=seed))
        steps += crafts
        if role == "target" and evaluation["scope"] == "sources":
            continue  # its craft steps score the target on its own set (the set is not kept)
        for member_label, member_id in evaluated:
            config = {"attack": attack, "crafter": inputs, "role": role, "evaluated": member_id, "evaluation": core}
            member_ids = member_id if isinstance(member_id, list) else [member_id]
            steps.append(Step(f"eval/{name}/{label}/{member_label}/s{seed}", "eval", config,
                              [c.id for c in crafts] + member_ids, seed=seed))
    for step in steps:
        step.output = folder / "steps" / f"{step.kind}-{store.content_key(step.id)}.json"
    merge_config = {"attack": attack, "evaluation": {**core, "white_box": evaluation["white_box"],
                                                     "ensembles": evaluation["ensembles"]}}
    if not evaluation["ensembles"]:
        del merge_config["evaluation"]["ensembles"]
    steps.append(Step(f"merge/{name}/s{seed}", "merge", merge_config,
                      [s.id for s in seed_steps] + [s.id for s in steps], seed=seed, output=folder / "matrix.json"))
    return steps


def _shared_prefix_groups(models: list[Step]) -> list[list[Step]]:
    """Fine-tunes of one source step at one freeze depth, grouped: their frozen tensors are the source's, so
    an eval step scores them together and computes that prefix once per set (Matrix.evaluate_many checks the
    tensors by content when it runs, and shares nothing that differs). Every other model is a group of one."""
    groups: dict = {}
    for step in models:
        config = step.config
        if step.kind == "finetune" and (config.get("freeze") or config.get("freeze_to")):
            key = (step.inputs[0], config.get("freeze"), config.get("freeze_to"), config["train"]["bn_stats"])
        else:
            key = step.id
        groups.setdefault(key, []).append(step)
    return list(groups.values())


def matrix_work(steps: list[Step], study: dict) -> dict:
    """Forward(+backward) passes the plan's matrices take, for --dry-run: crafting (one forward and one backward
    pass per image and attack iteration) and evaluation (one forward pass per image, set and scored model)."""
    samples = study["evaluation"]["samples"]
    craft = sum(samples * (s.config["attack"]["steps"] or 1) for s in steps if s.kind == "craft")
    scored = {"sources": 0, "full": 0}
    for merge in (s for s in steps if s.kind == "merge"):
        inputs = [i for i in merge.inputs if i.split("/")[0] in TRAIN_KINDS]
        evaluated = len(inputs)
        crafts = [s for s in steps if s.kind == "craft" and s.id in merge.inputs]
        for craft_step in crafts:
            white = craft_step.config["role"] == "target"
            scored["full"] += samples * evaluated
            scored["sources"] += samples * (1 if white else evaluated)
    return {"craft": craft, "eval": scored[study["evaluation"]["scope"]], "eval_full": scored["full"],
            "eval_sources": scored["sources"]}
    return steps


def select(steps: list[Step], pattern: str | None) -> list[Step]:
    if not pattern:
        return steps
    return [s for s in steps if fnmatch.fnmatch(s.id, pattern) or pattern in s.id]


# ------------------------------------------------------------------ execution
@dataclass
class StudyContext:
    study: dict
    out_dir: Path
    device: str
    data: object  # runs.DataOptions
    progress: bool
    steps: dict[str, Step]
    worker: dict = field(default_factory=lambda: {"executor": "local", "host": socket.gethostname()})
    log: tuple[str, ...] = ()  # --log trackers; they mirror results and are never part of a step's key


def execute_step(step: Step, ctx: StudyContext) -> str:
    """Run one step; return its one-line summary. Everything it needs is in its config and its inputs' outputs."""

    if step.kind in TRAIN_KINDS:
        runs_dir = step.output.parent
        # An attempt killed mid-step (a worker that died and is retried) leaves its staging folder behind.
        clean_stale_staging(runs_dir, only_name=step.output.name)
        train = TrainConfig(**step.config["train"])
        data = step.config["data"]
        common = dict(config=train, seed=step.seed, n=data["n"], device=ctx.device, data=ctx.data,
                      out_dir=runs_dir, name=step.output.name, progress=ctx.progress,
                      overwrite=True,  # a step whose key changed replaces its own output
                      record={"step_key": step.key, "step_id": step.id, "worker": ctx.worker}, log=ctx.log)
        if step.kind == "pretrain":
            outcome = pretrain(model=step.config["model"], dataset=data["dataset"], options=step.config["options"],
                               canvas=data["canvas"], **common)
        elif step.kind == "finetune":
            source = ctx.steps[step.inputs[0]].output
            outcome = finetune(dataset=data["dataset"], source=source, freeze_n=step.config.get("freeze"),
                               freeze_to=step.config.get("freeze_to"), **common)
        else:
            outcome = finetune(dataset=data["dataset"], model=step.config["model"], options=step.config["options"],
                               canvas=data["canvas"], **common)
        return outcome.summary()
    if step.kind in MATRIX_KINDS:
        return _execute_matrix_step(step, ctx)
    raise ValueError(f"unknown step kind {step.kind}")


def _matrix_of(step: Step, ctx: StudyContext):
    """The transferlab.matrix.Matrix a craft, eval or merge step works on (nothing is loaded yet)."""

    attack, evaluation = step.config["attack"], step.config["evaluation"]
    runs = [ctx.steps[i] for i in ctx.steps if ctx.steps[i].seed == step.seed and ctx.steps[i].kind in TRAIN_KINDS]
    groups = ctx.study["evaluation"]["ensembles"]
    spec = make_spec(
        sources=[s.output for s in runs if s.kind == "pretrain"],
        targets=[s.output for s in runs if s.kind != "pretrain"], dataset=evaluation["dataset"],
        attack_names=[attack["attack"]], eps_values=attack["eps"] if "eps" in attack else [step.config["eps"]],
        steps=attack["steps"], alpha=attack["alpha"],
        attack_options=attack["options"], samples=evaluation["samples"], label_policy=evaluation["labels"],
        seed=step.seed, device=ctx.device, white_box=ctx.study["evaluation"]["white_box"], scope=evaluation["scope"],
        data=ctx.data, out_dir=_matrix_folder(step),
        batch_size=evaluation["batch_size"], precision=evaluation["precision"],
        ensembles=_ensemble_specs(groups, runs, step.seed))
    spec.canvas = ctx.study["data"]["canvas"]
    return Matrix(spec)


def _member(matrix, ctx: StudyContext, step_ids: list[str], role: str):
    if role == "ensemble":
        return ensemble.make_member([matrix.member(ctx.steps[i].output, "source") for i in step_ids], Member)
    return matrix.member(ctx.steps[step_ids[0]].output, role)


def _execute_matrix_step(step: Step, ctx: StudyContext) -> str:
    started = time.perf_counter()
    matrix = _matrix_of(step, ctx)
    if step.kind == "merge":
        # The work of this matrix's craft and eval steps, from their receipts (each ran in its own process).
        receipts = [store.read_json(s.output) for s in ctx.steps.values() if s.kind in ("craft", "eval")
                    and _matrix_folder(s) == _matrix_folder(step) and s.output.is_file()]
        crafts = [r for r in receipts if r["step_id"].startswith("craft/")]
        totals = {"crafted": sum(bool(r.get("crafted")) for r in crafts),
                  "reused": sum(not r.get("crafted") for r in crafts),
                  "craft_seconds": round(sum(r["seconds"] for r in crafts), 3),
                  "eval_seconds": round(sum(r["seconds"] for r in receipts if r not in crafts), 3)}
        result = matrix.merge(record={"step_key": step.key, "step_id": step.id, **totals})
        return result.summary()
    crafter = _member(matrix, ctx, step.config["crafter"], step.config["role"])
    if step.kind == "craft":
        setting = next(s for s in matrix.spec.settings if s.eps == step.config["eps"])
        adversarial = matrix.adversarial(crafter, setting)
        if not matrix.keeps_set(crafter):  # a white-box set that is not kept: score its target now
            matrix.evaluate(crafter, setting, crafter, adversarial)
            matrix.pair(crafter, crafter)
        what = f"{'crafted' if matrix.crafted else 'read back'} {setting.name} eps={setting.eps:.4g} on {crafter.name}"
    else:
        ids = step.config["evaluated"]
        evaluated = [ctx.steps[i] for i in (ids if isinstance(ids, list) else [ids])]
        members = [matrix.member(e.output, "source" if e.kind == "pretrain" else "target") for e in evaluated]
        for setting in matrix.spec.settings:
            matrix.evaluate_many(crafter, setting, members)
        for member in members:
            matrix.pair(crafter, member)
        what = f"{', '.join(m.name for m in members)} on {len(matrix.spec.settings)} sets of {crafter.name}"
    seconds = time.perf_counter() - started
    summary = f"{what} in {seconds:.1f}s"
    store.atomic_write_json(step.output, {"step_key": step.key, "step_id": step.id, "summary": summary,
                                          "seconds": round(seconds, 3), "crafted": matrix.crafted,
                                          "worker": ctx.worker})
    return summary


def _ensemble_specs(groups: list[list[str]], inputs: list, seed: int) -> list[str]:
    """Study ensembles (lists of [[pretrain]] names) -> run-directory specs for run_matrix."""
    by_name = {s.id.split("/")[1]: s.output for s in inputs if s.kind == "pretrain" and s.seed == seed}
    specs = []
    for group in groups:
        unknown = [name for name in group if name not in by_name]
        if unknown:
            raise UserError(f"study: evaluation.ensembles names {', '.join(map(repr, unknown))}, which is no "
                            f"[[pretrain]] name; known: {', '.join(sorted(by_name))}")
        specs.append(",".join(str(by_name[name]) for name in group))
    return specs


def _attack_folder(attack: dict) -> str:
    return attack["attack"].replace(":", "-") + ("" if attack["steps"] is None else f"_k{attack['steps']}")


class LocalExecutor:
    """Runs steps one after another in this process.

    The planner only hands over ``Step`` objects and a context, so another executor (one
    that ships steps to Ray workers, say) can replace this one without touching the plan.
    """

    def run(self, steps: list[Step], ctx: StudyContext, on_start=None, on_done=None) -> None:
        for step in steps:
            if on_start:
                on_start(step)
            started = time.perf_counter()
            summary = execute_step(step, ctx)
            if on_done:
                on_done(step, time.perf_counter() - started, summary)


# ------------------------------------------------------------------ the command
@dataclass
class StudyOutcome:
    out_dir: Path
    steps: list[Step]
    executed: list[str]
    seconds: float

    def summary(self) -> str:
        return (f"study done: {len(self.executed)} of {len(self.steps)} steps run "
                f"({len(self.steps) - len(self.executed)} already done) in {self.seconds:.1f}s -> {self.out_dir}")


def default_out_dir(study: dict) -> Path:
    return Path("results") / study["study"]["name"]


def _check_out_dir(out_dir: Path) -> None:
    package_dir = Path(__file__).resolve().parent
    resolved = out_dir.resolve()
    if resolved == package_dir or package_dir in resolved.parents:
        raise UserError(f"output directory {out_dir} is inside the transferlab package; choose another with --out")


def plan_table(steps: list[Step], states: dict[str, str]) -> Table:
    table = Table(title="plan")
    for column in ("#", "step", "key", "state"):
        table.add_column(column)
    for i, step in enumerate(steps, 1):
        table.add_row(str(i), step.id, step.key[:10], states[step.id])
    return table


def run_study(path: Path, out_dir: Path | None = None, *, dry_run: bool = False, only: str | None = None,
              force: str | None = None, device: str | None = None, data_dir: Path | None = None,
              download: bool | None = None, progress: bool = True, console: Console | None = None,
              executor=None, overrides: list[str] | None = None, log=()) -> StudyOutcome:
    console = console or Console(soft_wrap=True)
    started = time.perf_counter()
    study = load_study(path, overrides)
    log = check_targets(log)
    if device is not None:
        _device_syntax(device)
    out_dir = Path(out_dir) if out_dir else default_out_dir(study)
    _check_out_dir(out_dir)
    steps = plan(study, out_dir)
    wanted = select(steps, only)
    if only and not wanted:
        raise UserError(f"--only {only!r} matches no step; step ids look like {steps[0].id}")
    # A selected step needs its inputs: pull them in, in plan order.
    needed = {s.id for s in wanted}
    for step in reversed(steps):
        if step.id in needed:
            needed.update(step.inputs)
    wanted = [s for s in steps if s.id in needed]
    forced = {s.id for s in select(steps, force)} if force else set()
    for step in steps:  # a rebuilt step invalidates everything downstream of it
        if forced.intersection(step.inputs):
            forced.add(step.id)
    # A forced merge removes its whole matrix folder (so nothing cached is reused): all its steps run again.
    forced_folders = {s.output.parent for s in steps if s.id in forced and s.kind == "merge"}
    forced.update(s.id for s in steps if s.kind in MATRIX_KINDS and _matrix_folder(s) in forced_folders)
    # A step runs again when one of its inputs does: a training run deleted (or never committed, as in
    # results/quick) and retrained elsewhere has other weights, and the cells crafted on the old ones would
    # stand in the tables beside it. Steps come in plan order, so inputs are decided first.
    states: dict[str, str] = {}
    for s in steps:
        if s.id in forced:
            states[s.id] = "forced"
        elif s.is_done() and all(states.get(i) == "done" for i in s.inputs):
            states[s.id] = "done"
        else:
            states[s.id] = "to do"
    console.print(plan_table(wanted, states))
    todo = [s for s in wanted if states[s.id] != "done"]
    work = matrix_work(wanted, study)
    if work["craft"]:
        console.print(f"attack matrices: {work['craft']:,} crafting forward+backward passes, {work['eval']:,} "
                      f"evaluation forward passes (scope {study['evaluation']['scope']}; sources: "
                      f"{work['eval_sources']:,}, full: {work['eval_full']:,})")
    if dry_run:
        console.print(f"dry run: {len(todo)} of {len(wanted)} steps would run; nothing was executed")
        return StudyOutcome(out_dir, wanted, [], time.perf_counter() - started)


    resolve_device(device or study["study"]["device"])  # an absent cuda/mps fails here, before any folder exists
    store.ensure_writable_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir / ".lock"
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"another 'transferlab run' is working on {out_dir} (lock {lock_path}); "
                        "wait for it to finish, or use another --out") from None
    try:
        # A run killed between renames leaves '.NAME.XXXXXXXX.tmp/.old' staging folders; they are ours to remove.
        clean_stale_staging(out_dir, recursive=True)
        ctx = StudyContext(study, out_dir, device or study["study"]["device"],
                           DataOptions(data_dir=Path(data_dir) if data_dir else (
                               Path(study["data"]["data_dir"]) if study["data"]["data_dir"] else None),
                               download=study["data"]["download"] if download is None else download),
                           progress, {s.id: s for s in steps}, log=log)
        store.atomic_write_text(out_dir / "study.toml", Path(path).read_text(encoding="utf-8") + "".join(
            f"\n# --set {item}" for item in (overrides or [])))
        executed: list[str] = []
        step_seconds: dict[str, float] = {}
        overall = Progress(TextColumn("[bold]study {task.fields[name]}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("steps"), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                           disable=not progress, console=progress_console())
        with overall:
            task = overall.add_task("study", total=len(todo), name=study["study"]["name"])

            def on_start(step: Step):
                overall.console.print(f"[{len(executed) + 1}/{len(todo)}] {step.id}")

            def on_done(step: Step, seconds: float, summary: str):
                overall.console.print(f"    {summary}", soft_wrap=True)
                executed.append(step.id)
                step_seconds[step.id] = round(seconds, 3)
                overall.advance(task)

            # A forced matrix must craft again rather than reuse its cached adversarial sets.
            remove_outputs([s for s in todo if s.id in forced and s.kind == "merge"])
            (executor or LocalExecutor()).run(todo, ctx, on_start, on_done)
        clean_stale_staging(out_dir, recursive=True)  # what retried attempts of killed workers left
        seconds = time.perf_counter() - started

        write_report(collect_results(study, steps, out_dir, seconds, step_seconds, ctx))
        if log:
            export_study(out_dir, log, study["study"]["name"])
    finally:
        lock.release()
        lock_path.unlink(missing_ok=True)  # a finished or refused run leaves no .lock behind
    return StudyOutcome(out_dir, wanted, executed, time.perf_counter() - started)


def collect_results(study: dict, steps: list[Step], out_dir: Path, seconds: float, step_seconds: dict,
                    ctx: StudyContext):
    """Gather every finished step's outputs into the study's tables, write them (runs.csv, matrix/*.csv,
    study.json: what a later ``transferlab report`` reads) and return them as the report's inputs."""

    rows = []
    provenance = {}
    device = None
    for step in steps:
        if step.kind not in TRAIN_KINDS or not step.is_done():
            continue
        info = store.read_run_info(step.output)
        provenance[info["dataset"]["name"]] = info["dataset"]["provenance"]
        device = info.get("device_name", info.get("device"))
        rows.append({
            "name": info["name"], "kind": step.kind,
            "model": info["model"]["family"], "dataset": info["dataset"]["name"],
            "pretrain_dataset": (info.get("lineage") or {}).get("pretrain_dataset"),
            "n": info["dataset"]["subset"]["n"], "freeze": info["freeze"]["n"], "seed": info["seed"],
            "train_accuracy": info["metrics"]["train_accuracy"], "test_accuracy": info["metrics"]["test_accuracy"],
            "duration_s": info["duration_s"], "images_per_second": info["images_per_second"], "device": info["device"],
            "step": step.id,
        })
    runs = pd.DataFrame(rows)
    store.atomic_write_text(out_dir / "runs.csv", runs.to_csv(index=False))

    # Each merge step wrote its matrix's tables in its own folder (perhaps on another worker): read them once.
    cells, lineage, pairs, examples = [], [], [], None
    for step in steps:
        # Only the study's current attacks: a folder left by an attack since removed from the file is stale.
        if step.kind != "merge" or not step.is_done():
            continue
        folder = step.output.parent
        if (folder / "cells.csv").is_file():
            cells.append(pd.read_csv(folder / "cells.csv"))
        if (folder / "lineage.csv").is_file() and (folder / "lineage.csv").stat().st_size > 1:
            lineage.append(pd.read_csv(folder / "lineage.csv"))
        if (folder / "pairs.csv").is_file():
            pairs.append(pd.read_csv(folder / "pairs.csv"))
        if examples is None and (folder / "examples.safetensors").is_file():
            examples = folder / "examples.safetensors"
    matrix_dir = out_dir / "matrix"
    cells_table = lineage_table = pairs_table = examples_file = None
    if cells:
        matrix_dir.mkdir(parents=True, exist_ok=True)
        cells_table = integer_columns(pd.concat(cells, ignore_index=True))
        store.atomic_write_text(matrix_dir / "cells.csv", cells_table.to_csv(index=False))
        lineage_table = integer_columns(pd.concat(lineage, ignore_index=True)) if lineage else pd.DataFrame()
        store.atomic_write_text(matrix_dir / "lineage.csv", lineage_table.to_csv(index=False))
        if examples is not None:
            examples_file = matrix_dir / "examples.safetensors"
            store.atomic_write_bytes(examples_file, examples.read_bytes())
        if pairs:
            pairs_table = pd.concat(pairs, ignore_index=True)
            store.atomic_write_text(matrix_dir / "pairs.csv", pairs_table.to_csv(index=False))
    previous = {}
    if (out_dir / "study.json").is_file():
        previous = store.read_json(out_dir / "study.json").get("step_seconds", {})
    previous.update(step_seconds)
    record = {
        "study": study["study"]["name"], "description": study["study"]["description"],
        "seeds": study["study"]["seeds"], "device": device or ctx.device, "versions": store.versions(),
        "git_commit": store.git_commit(), "data_provenance": provenance, "wall_time_s": round(seconds, 3),
        "step_seconds": previous,
        "steps": [{"id": s.id, "kind": s.kind, "key": s.key, "seconds": previous.get(s.id)} for s in steps],
        "config": {k: v for k, v in study.items() if k != "source_file"},
    }
    store.atomic_write_json(out_dir / "study.json", record)
    return ReportInputs(out_dir, runs, record, None, matrix_dir, cells_table, lineage_table, pairs_table,
                        examples_file)


def _matrix_folder(step: Step) -> Path:
    """The attack folder (matrix/sSEED/ATTACK) a craft, eval or merge step writes into."""
    return step.output.parent if step.kind == "merge" else step.output.parent.parent


def remove_outputs(steps: list[Step]) -> None:
    """Used by --force: drop a step's output so it is rebuilt (a merge step's: its whole matrix folder)."""
    for step in steps:
        target = _matrix_folder(step) if step.kind == "merge" else step.output
        if target is not None and target.exists():
            shutil.rmtree(target)
