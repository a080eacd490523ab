"""Study files, checked before anything runs: key locations, value checks and --set overrides.

``study.load_study`` checks the shape of a study (known keys, types, required keys). This
module adds what the steps would otherwise find out only when they run, often after
training: every value a step would reject (an eps outside [0, 1], an unknown model, a
freeze past the model's last tensor, zero epochs ...) is rejected at load time, naming the
key and the line it is on, so ``--dry-run`` catches it too.

Why not pydantic models: the schema is already a table of types and defaults that the
README documents key by key; what was missing was range and choice checks that need the
registries (models, datasets, attacks, freeze counts per model) and the line of each key
inside its own ``[[table]]``, which pydantic's error locations cannot give for TOML
(tomllib keeps no positions). ``KeyLines`` supplies the positions; the checks below reuse
the same validators the commands use, so a study and the CLI reject the same values.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path

import torch

from transferlab import attacks, data, model_sources, names
from transferlab.config import MatrixDefaults, StepResources, TrainConfig, setting_fields
from transferlab.errors import UserError, suggest
from transferlab.models import MODEL_FAMILIES, create_model, freeze_count_for, parameter_table
from transferlab.resources import RESOURCE_KINDS, check_request
from transferlab.runs import MAX_SEED
from transferlab.store import file_sha256, sha256_hex

DOC_HINT = "see the study file format in README.md"
FROM_SET = "from --set"


class KeyLines:
    """Where each key of a TOML text is set: (table, index of the [[table]] entry or None, key) -> line.

    tomllib reports no positions for valid TOML, so this is a small line scanner. It follows
    ``[table]`` and ``[[table]]`` headers (counting entries of each array table) and records
    ``key = ...`` lines; values spread over several lines are skipped by tracking brackets.
    """

    _HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\"-]+)\s*\]\]?")
    _KEY = re.compile(r"^\s*\"?([A-Za-z0-9_-]+)\"?\s*(?:\.[^=]*)?=")

    def __init__(self, text: str, overridden: set | None = None, aliases: dict | None = None):
        # aliases: old table name -> the name it is read as (see study.OLD_SCRATCH_TABLE)
        self.lines: dict[tuple, int] = {}
        self.headers: dict[tuple, int] = {}
        self.overridden = overridden or set()
        counts: dict[str, int] = {}
        table, index, depth = None, None, 0
        for number, line in enumerate(text.splitlines(), 1):
            stripped = _strip_comment(line)
            if depth == 0:
                header = self._HEADER.match(stripped)
                if header:
                    name = header.group(2).strip('"').split(".")[0]
                    name = (aliases or {}).get(name, name)
                    if header.group(1) == "[[":
                        index = counts.get(name, 0)
                        counts[name] = index + 1
                    else:
                        index = None
                    table = name
                    self.headers.setdefault((table, index), number)
                    continue
                key = self._KEY.match(stripped)
                if key:
                    self.lines.setdefault((table, index, key.group(1)), number)
            depth = max(0, depth + stripped.count("[") + stripped.count("{")
                        - stripped.count("]") - stripped.count("}"))

    def where(self, table: str | None, index: int | None, key: str | None) -> str:
        """' (line N)' for the key in that table entry; ' (from --set)' for an override; '' when unknown."""
        if (table, index, key) in self.overridden or (table, None, key) in self.overridden:
            return f" ({FROM_SET})"
        number = self.lines.get((table, index, key)) if key else self.headers.get((table, index))
        return f" (line {number})" if number else ""


def _strip_comment(line: str) -> str:
    # A '#' inside a string is rare in study files; cutting there at worst loses a bracket count.
    quoted, out = None, []
    for char in line:
        if quoted:
            if char == quoted:
                quoted = None
        elif char in "\"'":
            quoted = char
        elif char == "#":
            break
        out.append(char)
    return "".join(out)


def parse_location(where: str) -> tuple[str, int | None]:
    """'finetune[2]' -> ('finetune', 2); 'train' -> ('train', None)."""
    match = re.fullmatch(r"([A-Za-z_]+)(?:\[(\d+)\])?", where)
    if not match:
        return where, None
    return match.group(1), (int(match.group(2)) if match.group(2) is not None else None)


# ------------------------------------------------------------------ --set overrides
def apply_overrides(raw: dict, items: list[str] | None, array_tables: tuple[str, ...]) -> set:
    """Apply ``--set KEY=VALUE`` items to the parsed study; return the (table, index, key) triples set.

    KEY is ``table.key`` (``train.epochs``), ``table[i].key`` for one entry of an array table
    (``pretrain[0].n``), or ``table.key`` for an array table, which sets it in every entry.
    VALUE is read as TOML (``2``, ``[0, 1]``, ``"8/255"``, ``true``); anything that is not TOML
    is taken as a string, so ``--set study.device=cpu`` works unquoted.
    """
    overridden = set()
    for item in items or []:
        path, sep, text = str(item).partition("=")
        match = re.fullmatch(r"\s*([A-Za-z_]+)(?:\[(\d+)\])?\.([A-Za-z_]+)\s*", path)
        if not sep or not match:
            raise UserError(f"--set {item!r} is not TABLE.KEY=VALUE (e.g. --set train.epochs=2 or "
                            f"--set pretrain[0].n=500)")
        table, index, key = match.group(1), match.group(2), match.group(3)
        try:
            value = tomllib.loads(f"value = {text.strip()}")["value"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        if table in array_tables:
            entries = raw.setdefault(table, [])
            if not isinstance(entries, list):
                raise UserError(f"--set {item!r}: [{table}] in the study is not an array of tables")
            chosen = range(len(entries)) if index is None else [int(index)]
            for i in chosen:
                if i >= len(entries):
                    raise UserError(f"--set {item!r}: the study has {len(entries)} [[{table}]] entries "
                                    f"(indices 0 to {len(entries) - 1})")
                if isinstance(entries[i], dict):
                    entries[i][key] = value
                overridden.add((table, i, key))
            if not entries:
                raise UserError(f"--set {item!r}: the study has no [[{table}]] entry to set {key} in")
        else:
            if index is not None:
                raise UserError(f"--set {item!r}: [{table}] is a single table; write {table}.{key}=VALUE")
            section = raw.setdefault(table, {})
            if not isinstance(section, dict):
                raise UserError(f"--set {item!r}: [{table}] in the study is not a table")
            section[key] = value
            overridden.add((table, None, key))
    return overridden


# ------------------------------------------------------------------ value checks
class _Checker:
    def __init__(self, lines: KeyLines):
        self.lines = lines

    def fail(self, table: str, index: int | None, key: str, message: str, inherited_from: str | None = None):
        where = f"{table}[{index}]" if index is not None else table
        location = self.lines.where(table, index, key)
        if not location and inherited_from:  # the value came from [train]: point there
            location = self.lines.where(inherited_from, None, key)
        raise UserError(f"study: {where}.{key}{location} {message}; {DOC_HINT}")

    def run(self, table, index, key, check, value, inherited_from=None):
        """Call ``check(value)``; a UserError from it becomes a study error at this key's line."""
        try:
            return check(value)
        except UserError as exc:
            self.fail(table, index, key, f"is invalid: {_strip_error(exc)}", inherited_from)


def _strip_error(exc: Exception) -> str:
    return str(exc).rstrip(".")


def _at_least(minimum: int):
    def check(value):
        if value is not None and value < minimum:
            raise UserError(f"must be at least {minimum}, got {value}")
        return value
    return check


def _choice(choices):
    def check(value):
        if value not in choices:

            raise UserError(f"{value!r} is not one of {', '.join(choices)}{suggest(str(value), choices)}")
        return value
    return check


def _non_negative_finite(value):
    if not (math.isfinite(value) and value >= 0):
        raise UserError(f"must be a finite number of 0 or more, got {value}")
    return value


def device_syntax(value: str):

    if str(value).lower() == "auto":
        return value
    try:
        device = torch.device(str(value).lower())
    except RuntimeError:
        raise UserError(f"unknown device {value!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {value!r}; use auto, cpu, cuda, cuda:N or mps")
    return value


def _setting_checks(cls) -> dict:
    """{key: check} for ``cls``'s study keys: each setting's own type and range check (config.setting), the
    same one the CLI and the API apply."""
    return {f.name: (lambda value, f=f: f.coerce(value, "")) for f in setting_fields(cls, "study")}


def check_values(study: dict, lines: KeyLines, given: dict) -> None:
    """Every value a step would reject, rejected now, at its key's line (see the module doc)."""
    values = _StudyValues(study, _Checker(lines), given)
    values.check_study()
    values.check_train("train", None, study["train"], set(study["train"]))
    values.check_pretrain()
    values.check_finetune()
    values.check_scratch()
    values.check_attacks()
    values.check_evaluation()
    values.check_executor()


class _StudyValues:
    """The checks of one study's values, table by table; the models and datasets they build are kept, so a
    family or a shipped sample shared by several tables is built once."""

    def __init__(self, study: dict, checker: _Checker, given: dict):
        self.study, self.c, self.given = study, checker, given
        self.train_checks = _setting_checks(TrainConfig)
        self.models: dict[tuple, object] = {}
        self.loaded: dict[str, object] = {}
        self.sources: dict[str, object] = {}
        self.canvas = None

    def check_study(self) -> None:
        c, study = self.c, self.study
        self.canvas = c.run("data", None, "canvas", data.get_canvas, study["data"]["canvas"])
        c.run("study", None, "device", device_syntax, study["study"]["device"])
        for seed in study["study"]["seeds"]:
            if not 0 <= seed <= MAX_SEED:
                c.fail("study", None, "seeds", f"holds {seed}; seeds are whole numbers from 0 to {MAX_SEED}")

    def check_train(self, table, index, entry, given_keys) -> None:
        for key, check in self.train_checks.items():
            inherited = "train" if index is not None and key not in given_keys else None
            self.c.run(table, index, key, check, entry[key], inherited)

    def model_for(self, table, index, key, family, options, num_classes=10):
        """Build the model once to check its family and options (and count its tensors for freeze)."""
        c, canvas = self.c, self.canvas
        cache_key = (family, repr(sorted(options.items())))
        if cache_key not in self.models:
            external = str(family).strip().lower() not in MODEL_FAMILIES and model_sources.is_external(family)
            if external:
                # module:factory, an entry point, torchvision:NAME or timm:NAME (docs/models.md): the source must
                # resolve (named at the model key); building it checks its options and its output shape.
                c.run(table, index, key, model_sources.check_resolves, str(family).strip())
                if not model_sources.calls_factories() and not model_sources.is_library(family):
                    self.models[cache_key] = None  # a dry run resolves a factory, never calls it
                    return None
            else:
                c.run(table, index, key, _choice(tuple(MODEL_FAMILIES)), str(family).strip().lower())
            self.models[cache_key] = c.run(table, index, "options" if options or not external else key,
                                           lambda o: create_model(family, num_classes=num_classes,
                                                                  in_channels=canvas.channels, image_size=canvas.size,
                                                                  **o), options)
        return self.models[cache_key]

    def check_dataset(self, table, index, name):
        resolved = self.c.run(table, index, "dataset", data.resolve_name, name)
        # Shipped samples and npz folders load in milliseconds (no download, no raw files), so their sizes are
        # checked here too; a registry dataset is only sized once its step has the files.
        if resolved not in self.loaded and (resolved.endswith("-sample") or resolved.startswith("npz:")):
            self.loaded[resolved] = self.c.run(table, index, "dataset",
                                               lambda n: data.load(n, canvas=self.canvas, download=False), resolved)
        return self.loaded.get(resolved)

    def check_size(self, table, index, key, value, dataset, split) -> None:
        if dataset is None or value is None:
            return
        total = len(dataset.split(split))
        classes = int(dataset.split(split).labels.unique().numel())
        if not classes <= value <= total:
            self.c.fail(table, index, key, f"is {value}, but {dataset.spec.name}'s {split} split has {total} images "
                        f"in {classes} classes; use {classes} to {total}")

    def check_sizes(self, table, index, entry) -> None:
        dataset = self.check_dataset(table, index, entry["dataset"])
        for n in entry["n"] if isinstance(entry["n"], list) else [entry["n"]]:
            self.c.run(table, index, "n", _at_least(1), n)
            self.check_size(table, index, "n", n, dataset, "train")

    def check_name(self, table, index, entry) -> None:
        if entry["name"] is not None:
            self.c.run(table, index, "name", lambda n: names.check_name(n, f"{table} name"), entry["name"])

    def check_pretrain(self) -> None:
        for i, entry in enumerate(self.study["pretrain"]):
            self.c.run("pretrain", i, "name", lambda n: names.check_name(n, "pretrain name"), entry["name"])
            self.sources[entry["name"]] = self.model_for("pretrain", i, "model", entry["model"], entry["options"])
            self.check_sizes("pretrain", i, entry)
            self.check_train("pretrain", i, entry, self.given.get(("pretrain", i), set()))

    def check_finetune(self) -> None:
        c = self.c
        for i, entry in enumerate(self.study["finetune"]):
            self.check_name("finetune", i, entry)
            self.check_sizes("finetune", i, entry)
            for ref in entry["from"]:
                net = self.sources.get(ref)
                if net is None:
                    continue
                count = len(parameter_table(net))
                for value in entry["freeze"] or []:
                    if not 0 <= value <= count:
                        c.fail("finetune", i, "freeze", f"is {value}, but source {ref!r} ({net.family}) has {count} "
                               f"parameter tensors; use 0 to {count}")
                for block in entry["freeze_to"] or []:
                    c.run("finetune", i, "freeze_to", lambda b: freeze_count_for(net, b), block)
            self.check_train("finetune", i, entry, self.given.get(("finetune", i), set()))

    def check_scratch(self) -> None:
        for i, entry in enumerate(self.study["scratch"]):
            self.check_name("scratch", i, entry)
            for family in entry["model"]:
                self.model_for("scratch", i, "model", family, entry["options"])
            self.check_sizes("scratch", i, entry)
            self.check_train("scratch", i, entry, self.given.get(("scratch", i), set()))

    def check_attacks(self) -> None:
        c = self.c
        for i, entry in enumerate(self.study["attack"]):
            name = c.run("attack", i, "attack", attacks.resolve_attack, entry["attack"])
            options = dict(entry["options"])
            for key in ("steps", "alpha", "norm"):
                if key in options and entry.get(key) is not None:
                    c.fail("attack", i, "options", f"sets {key}, and so does {key} = ...; keep one")
            if entry.get("norm") is not None:  # checked at its own line: a bad word, or an attack without that norm
                c.run("attack", i, "norm", lambda n: attacks.attack_params(name, 0.0, norm=n), entry["norm"])
                options["norm"] = entry["norm"]
            norm = c.run("attack", i, "options", attacks.norm_of, options)
            for eps in entry["eps"]:
                c.run("attack", i, "eps", lambda e: attacks.parse_eps(e, norm), eps)
            c.run("attack", i, "steps", _at_least(1), entry["steps"])
            if entry["alpha"] is not None:
                c.run("attack", i, "alpha", _non_negative_finite, entry["alpha"])
            if "eps" in options:
                c.fail("attack", i, "options", "sets eps; write it as its own key (eps = [...]), not an option")
            steps, alpha = options.pop("steps", entry["steps"]), options.pop("alpha", entry["alpha"])
            for eps in entry["eps"]:
                c.run("attack", i, "options",
                      lambda o: attacks.attack_params(name, eps, steps=steps, alpha=alpha, **o), options)

    def check_evaluation(self) -> None:
        c, evaluation = self.c, self.study["evaluation"]
        for key, check in _setting_checks(MatrixDefaults).items():
            c.run("evaluation", None, key, check, evaluation[key])
        if self.study["attack"] and evaluation.get("dataset"):
            resolved = data.resolve_name(evaluation["dataset"])
            self.check_size("evaluation", None, "samples", evaluation["samples"], self.loaded.get(resolved), "test")

    def check_executor(self) -> None:
        executor = self.study["executor"]
        self.c.run("executor", None, "max_retries", _at_least(0), executor["max_retries"])
        for key, check in _setting_checks(StepResources).items():
            self.c.run("executor", None, key, check, executor[key])
        for kind in RESOURCE_KINDS:
            self.c.run("executor", None, kind,
                       lambda table, kind=kind: check_request(kind, table, "") if table else None,
                       executor[kind])


# ------------------------------------------------------------------ user data in step keys
def data_fingerprint(dataset: str) -> str | None:
    """For an npz folder, a hash of its train.npz and test.npz bytes (None for registry datasets).

    Registry datasets are fixed by name; an npz folder is the user's and may change under the
    same name, so its bytes go into the step keys and changed data reruns its steps.
    """
    if not str(dataset).startswith("npz:"):
        return None
    folder = Path(dataset[4:])
    try:
        hashes = [file_sha256(folder / f"{split}.npz") for split in ("train", "test")]
    except OSError:
        return None  # load_study's dataset check reports the missing file
    return sha256_hex(hashes, 16)
