"""A study file's schema: parse the TOML, check every key and value, fill in the defaults.

load_study turns a study file (plus ``--set`` overrides) into a plain dict with every default filled in; the
value checks live in transferlab.study_check. Nothing here plans or runs anything.
"""

from __future__ import annotations

import re
import tomllib
import warnings
from pathlib import Path

from transferlab import config as settings
from transferlab.attacks import parse_eps
from transferlab.errors import UserError, suggest
from transferlab.names import check_name, slug
from transferlab.study_check import KeyLines, apply_overrides, check_values, parse_location

REQUIRED = object()

# Training keys allowed in [train] (study-wide defaults) and in every [[pretrain]], [[finetune]], [[scratch]].
# Both generated from the settings' declarations (config.setting): a new setting is a new key here too.
TRAIN_FIELDS = settings.study_keys(settings.TrainConfig)
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
    # norm: "Linf" (None: the default) or "L2"; moved into options by _norm_into_options once checked.
    "attack": {"attack": (str, REQUIRED), "eps": ([float], REQUIRED), "steps": (int, None), "alpha": (float, None),
               "norm": (str, None), "options": (dict, {})},
    "evaluation": {**settings.study_keys(settings.MatrixDefaults), "ensembles": ([[str]], [])},
    # How steps are spread over a Ray cluster (transferlab.executors); never part of a step's key.
    # Ray resources of every step (config.StepResources), then of one kind of step (a table of the same keys).
    "executor": {**settings.study_keys(settings.StepResources), "train": (dict, {}), "craft": (dict, {}),
                 "eval": (dict, {}), "merge": (dict, {}), "max_retries": (int, 3)},
}
ARRAY_TABLES = ("pretrain", "finetune", "scratch", "attack")
# The from-scratch table's name before it was [[scratch]]; still read, with a warning.
OLD_SCRATCH_TABLE = "baseline"
DOC_HINT = "see the study file format in README.md"

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
                return parse_eps(value, norm=None)  # the range depends on the norm: study_check checks it
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
    text, raw = _read_study(path)
    raw, overrides = _renamed_scratch_table(raw, overrides, path)
    overridden = apply_overrides(raw, overrides, ARRAY_TABLES)
    text.key_lines = KeyLines(text, overridden, aliases={OLD_SCRATCH_TABLE: "scratch"})
    study = _validated_tables(raw, text, path)
    given_keys = _validated_entries(raw, text, study)
    _check_study_table(study, text, path)
    pretrain_names = _pretrain_names(study, text)
    _check_finetunes(study, text, pretrain_names)
    study["evaluation"]["dataset"] = _target_dataset(study)
    check_values(study, text.key_lines, given_keys)
    _norm_into_options(study)
    study["source_file"] = str(path)
    study["overrides"] = list(overrides or [])
    return study


def _read_study(path: Path) -> tuple[_StudyText, dict]:
    """The study file's text and its parsed TOML."""
    if not path.is_file():
        raise UserError(f"study file not found: {path}")
    try:
        text = _StudyText(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"study {path} is not a UTF-8 text file; a study is a TOML file") from None
    except OSError as exc:
        raise UserError(f"cannot read study {path} ({exc.strerror or exc})") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"study {path}: TOML syntax error: {exc}") from None


def _validated_tables(raw: dict, text: str, path: Path) -> dict:
    """The single tables ([study], [data], [train], [evaluation], [executor]), validated; unknown tables fail."""
    for key in raw:
        if key not in SCHEMA:
            raise UserError(f"study: unknown table [{key}]{_line_of(text, key)}{suggest(key, SCHEMA)}; "
                            f"allowed: {', '.join(SCHEMA)}")
    study = {}
    for section in ("study", "data", "train", "evaluation", "executor"):
        if section == "study" and section not in raw:
            raise UserError(f"study {path}: missing the [study] table with at least name = \"...\"; {DOC_HINT}")
        study[section] = _validate_table(raw.get(section, {}), SCHEMA[section], section, text)
    return study


def _validated_entries(raw: dict, text: str, study: dict) -> dict[tuple, set]:
    """The array tables ([[pretrain]], ...) validated into ``study``, unset training keys taken from [train];
    returns the keys each entry gave, by (table, index)."""
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
    return given_keys


def _check_study_table(study: dict, text: str, path: Path) -> None:
    name = study["study"]["name"]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"study: study.name{_line_of(text, 'name', 'study')} {name!r} must be letters, digits, "
                        f"'.', '_' or '-' (it names a folder)")
    if not study["pretrain"] and not study["scratch"]:
        raise UserError(f"study {path}: nothing to train; add a [[pretrain]] or [[scratch]] entry")
    if len(set(study["study"]["seeds"])) != len(study["study"]["seeds"]):
        raise UserError("study: study.seeds has a duplicate seed")


def _pretrain_names(study: dict, text: str) -> list[str]:
    """Each [[pretrain]]'s name (defaulted to MODEL-DATASET), checked to be a valid, unique folder name."""
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
    return pretrain_names


def _check_finetunes(study: dict, text: str, pretrain_names: list[str]) -> None:
    """Each [[finetune]] names defined pretrain runs and one of freeze / freeze_to (freeze = [0] if neither)."""
    for i, entry in enumerate(study["finetune"]):
        for ref in entry["from"]:
            if ref not in pretrain_names:
                raise UserError(f"study: finetune[{i}].from names pretrain {ref!r}{_line_of(text, 'from', f'finetune[{i}]')}, which is "
                                f"not defined{suggest(ref, pretrain_names)}; defined: {', '.join(pretrain_names)}")
        if entry["freeze"] is not None and entry["freeze_to"] is not None:
            raise UserError(f"study: finetune[{i}] sets both freeze and freeze_to; keep one")
        if entry["freeze"] is None and entry["freeze_to"] is None:
            entry["freeze"] = [0]


def _norm_into_options(study: dict) -> None:
    """An [[attack]]'s norm (checked) becomes the attack option it is (attacks.attack_params), written as
    torchattacks spells it; an Linf attack gets none, so a study written before norms existed keeps its step
    keys."""
    for entry in study["attack"]:
        options = dict(entry["options"])  # never the schema's shared default
        norm = entry.pop("norm")
        if norm is not None and settings.choice(settings.Norm, norm, "norm") != settings.Norm.LINF:
            options["norm"] = norm
        if "norm" in options:
            options["norm"] = settings.choice(settings.Norm, options["norm"], "norm").value
        entry["options"] = options


def _target_dataset(study: dict) -> str | None:
    """The one dataset the fine-tunes and from-scratch runs train on (an attack matrix needs exactly one)."""
    targets = {e["dataset"] for e in study["finetune"]} | {e["dataset"] for e in study["scratch"]}
    if study["attack"] and len(targets) > 1:
        raise UserError(f"study: fine-tunes and from-scratch runs use several datasets ({', '.join(sorted(targets))}); "
                        "an attack matrix needs one target dataset")
    return targets.pop() if targets else None
