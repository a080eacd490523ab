"""Settings and their defaults, declared once.

Each user setting is one dataclass field written with ``setting(default, help=..., check=...,
commands=...)``: its name, type, default, allowed range (``check``) or choices (a ``StrEnum`` type), help
text and the commands that take it. Everything else is generated from those fields
(``setting_fields``): the CLI's options (cli_args.setting_options), the Python API's keyword arguments
(arguments.with_settings), the study file's keys and their checks (study.SCHEMA, study_check), and the docs
table (``markdown_table``, docs/settings.md). Adding a training option is one ``setting(...)`` line here plus
its use in the training loop.

Words with a fixed set of values are ``StrEnum``s, converted once where the input arrives (``choice``), so a
typo is a one-line error at the door rather than a surprise deep inside a run. Being ``str`` subclasses, they
compare equal to their words and serialise as them: content keys and run.json are unchanged by the conversion.

This module imports neither torch nor pandas: ``transferlab --help`` reads it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Callable

from transferlab.errors import UserTypeError, UserValueError, suggest

class Optimizer(StrEnum):
    ADAM = "adam"
    ADAMW = "adamw"
    SGD = "sgd"


class Schedule(StrEnum):
    COSINE = "cosine"
    ONECYCLE = "onecycle"
    CONSTANT = "constant"


class Precision(StrEnum):
    AUTO = "auto"  # measured once per machine and model, then cached (device.choose_numerics)
    FP32 = "fp32"
    BF16 = "bf16"


class BnStats(StrEnum):
    FROZEN = "frozen"  # BatchNorm layers whose parameters are all frozen keep their running statistics
    UPDATE = "update"  # the original experiment's behaviour: statistics move even under a frozen layer


class LabelPolicy(StrEnum):
    AUTO = "auto"  # true labels where the crafter's label space is the data's, else its own predictions
    TRUE = "true"
    PRED = "pred"


class Norm(StrEnum):
    """The distance an attack's eps bounds, spelt as torchattacks spells it (any case is read)."""

    LINF = "Linf"  # no pixel moves by more than eps
    L2 = "L2"  # each image's change has an L2 length of at most eps

    @classmethod
    def _missing_(cls, value):
        if isinstance(value, str):
            return next((member for member in cls if member.value.lower() == value.lower()), None)
        return None


class Scope(StrEnum):
    SOURCES = "sources"  # every model on the sources' sets, each target on its own white-box set
    FULL = "full"  # every model on every set (grows as models squared)


class StepKind(StrEnum):
    """The kinds of step in a study's plan: three that train a run, three that make an attack matrix."""

    PRETRAIN = "pretrain"
    FINETUNE = "finetune"
    SCRATCH = "scratch"
    CRAFT = "craft"  # one adversarial set
    EVAL = "eval"  # one model on one crafter's sets
    MERGE = "merge"  # a matrix's tables


class Executor(StrEnum):
    LOCAL = "local"  # one step after another in this process
    RAY = "ray"  # a Ray task per step, across cores, GPUs and nodes


class ReportMetric(StrEnum):
    ACCURACY = "accuracy"
    ASR = "asr"


TRACKERS = ("csv", "tensorboard", "mlflow")  # --log; here so the CLI can gather them without loading torch


# What each fixed-choice word says when it is wrong: the flag users type, and what to type instead.
_HINTS = {
    Precision: "auto (measure once, then cached), fp32 or bf16",
    Norm: "Linf (the default) or L2",
    Scope: "sources (every model on the sources' sets, each target on its own white-box set) or full "
           "(every model on every set)",
}


def choice(kind: type[StrEnum], value, flag: str) -> StrEnum:
    """``value`` as a member of ``kind`` (case-insensitive), or a one-line error naming ``flag``."""
    if isinstance(value, kind):
        return value
    if not isinstance(value, str):
        raise UserTypeError(f"{flag} must be a word ({', '.join(kind)}), got {type(value).__name__} {value!r}".lstrip())
    try:
        return kind(value.lower())
    except ValueError:
        hint = _HINTS.get(kind) or "one of " + ", ".join(member.value for member in kind)
        raise UserValueError(f"unknown {flag + ' ' if flag else ''}{value!r}; use {hint}") from None


# ------------------------------------------------------------------ one declaration per setting
# Bounds on sizes: values past them cannot be held (a batch of 10**20 images, a 10**9-pixel shift that pads
# every image to 10**18 pixels) and used to end in an overflow deep inside torch. Each is far above any
# useful value and well inside what a machine can allocate.
MAX_BATCH = 1 << 20  # images in one batch
MAX_SHIFT = 32  # pixels: the largest canvas is 32 wide, so a larger shift leaves only padding
MAX_EPOCHS = 100_000
MAX_STEPS = 100_000_000
MAX_SAMPLES = 10_000_000

SETTING = "transferlab.setting"  # the key of a field's metadata that makes it a user setting
TRAINING = ("pretrain", "finetune", "study")  # the commands (and the study file) that take a training setting


@dataclass(frozen=True)
class Setting:
    """What a field says about itself, besides its name, type and default."""

    help: str = ""
    check: Callable | None = None  # raises ValueError('must ...') for a value of the right type out of range
    commands: tuple[str, ...] = TRAINING  # CLI commands that have it as an option; "study": a study file key
    flag: str | None = None  # the option's spelling where it is not --name-with-dashes (e.g. a --x/--no-x pair)


def setting(default, *, help: str, check: Callable | None = None, commands=TRAINING, flag: str | None = None):
    """A dataclass field that is a user setting: ``lr: float = setting(1e-3, help="...", check=positive)``."""
    return field(default=default, metadata={SETTING: Setting(help=help, check=check, commands=tuple(commands),
                                                             flag=flag)})


def at_least(minimum: int, at_most: int | None = None) -> Callable:
    def check(value):
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        if at_most is not None and value > at_most:
            raise ValueError(f"must be at most {at_most:,}")
    check.describe = f"{minimum} to {at_most:,}" if at_most is not None else f"at least {minimum}"
    return check


def positive(value) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError("must be a finite number above 0")


positive.describe = "above 0, finite"


def non_negative(value) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError("must be a finite number of 0 or more")


non_negative.describe = "0 or more, finite"


def fraction(value) -> None:
    if not (math.isfinite(value) and 0 <= value < 1):
        raise ValueError("must be in [0, 1)")


fraction.describe = "in [0, 1)"


def ray_share(value) -> None:
    """Ray's rule for the CPUs and GPUs a task holds: a share below 1 or a whole number."""
    non_negative(value)
    if value > 1 and value != int(value):
        raise ValueError("is a fraction above 1; Ray takes a share below 1 (0.25) or a whole number (2)")


ray_share.describe = "0 or more: below 1 or whole"


def amounts(value: dict) -> None:
    """Custom Ray resources: names to finite amounts of 0 or more (CPU, GPU and memory have their own settings)."""
    for name, amount in value.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"names a resource {name!r}; a resource name is a word (e.g. accelerator_type:A100)")
        if name in ("CPU", "GPU", "memory"):
            raise ValueError(f"sets {name}; give it with num_cpus, num_gpus or memory")
        if isinstance(amount, bool) or not isinstance(amount, numbers.Real) or not (math.isfinite(amount)
                                                                                     and amount >= 0):
            raise ValueError(f"gives {name} {amount!r}; an amount is a finite number of 0 or more")


amounts.describe = "NAME=AMOUNT, amounts 0 or more"


@dataclass(frozen=True)
class SettingField:
    """One setting of a settings class, with its type resolved (``int | None`` is ``int``, optional)."""

    name: str
    kind: type
    optional: bool
    default: object
    meta: Setting

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self.kind) if issubclass(self.kind, StrEnum) else ()

    def plain_default(self):
        return _plain(self.default)

    def type_text(self) -> str:
        words = {bool: "true/false", int: "whole number", float: "number", str: "text", dict: "NAME=VALUE pairs"}
        text = " / ".join(self.choices) if self.choices else words.get(self.kind, self.kind.__name__)
        return text + (" or none" if self.optional else "")

    def range_text(self) -> str:
        return getattr(self.meta.check, "describe", "")

    def coerce(self, value, label: str):
        """``value`` checked against this setting's type and range: the value (an enum word as its member), a
        UserTypeError for the wrong type, or a UserValueError naming ``label`` (``--lr`` or ``lr``)."""
        if value is None and self.optional:
            return None
        if self.choices:
            return choice(self.kind, value, label)
        value = self._of_type(value, label)
        if self.meta.check is not None:
            try:
                self.meta.check(value)
            except ValueError as exc:
                raise UserValueError(f"{label} {exc} (got {value!r})".lstrip()) from None
        return value

    def _of_type(self, value, label: str):
        kind = self.kind
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            wanted = {bool: "true or false (a bool)", int: "a whole number (int)",
                      float: "a number (float)"}.get(kind, f"a {kind.__name__}")
            raise UserTypeError(f"{label} must be {wanted}{' or None' if self.optional else ''}, "
                                f"got {type(value).__name__} {value!r}".lstrip())
        return float(value) if kind is float else int(value) if kind is int else dict(value) if kind is dict else value


def setting_fields(cls, command: str | None = None) -> list[SettingField]:
    """The user settings of ``cls`` in declaration order; with ``command``, those that command takes."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in fields(cls):
        meta = f.metadata.get(SETTING)
        if meta is None or (command is not None and command not in meta.commands):
            continue
        kind, optional = hints[f.name], False
        args = typing.get_args(kind)
        if type(None) in args:
            kind, optional = next(a for a in args if a is not type(None)), True
        found.append(SettingField(f.name, kind, optional, f.default, meta))
    return found


def label_of(name: str, style: str, flag: str | None = None) -> str:
    """How an error names a setting: ``--batch-size`` on the command line (its own ``flag`` where it has one:
    the first spelling), ``batch_size`` in Python."""
    if style != "flag":
        return name
    return flag.split("/")[0].split(" ")[0] if flag else "--" + name.replace("_", "-")


class Settings:
    """Checking shared by the settings dataclasses: every setting field by its type and range."""

    def validate(self, style: str = "flag"):
        """Check every setting (converting words to their enum members) and return self; errors name the
        setting as ``style`` says ("flag": ``--lr``, "arg": ``lr``)."""
        for f in setting_fields(type(self)):
            object.__setattr__(self, f.name, f.coerce(getattr(self, f.name), label_of(f.name, style, f.meta.flag)))
        return self

    @classmethod
    def from_values(cls, values: dict, base=None, style: str = "arg"):
        """``base`` (default: the defaults) with ``values`` set, validated; an unknown name is a TypeError."""
        known = {f.name for f in fields(cls)}
        for name in values:
            if name not in known:
                raise UserTypeError(f"unknown setting {name!r}{suggest(name, known)}")
        if base is not None and not isinstance(base, cls):
            raise UserTypeError(f"expected a {cls.__name__}, got {type(base).__name__}")
        return dataclasses.replace(base if base is not None else cls(), **values).validate(style)

    def to_dict(self) -> dict:
        return {key: _plain(value) for key, value in asdict(self).items()}


def markdown_table(cls, title: str) -> str:
    """The docs table of ``cls``'s settings: option, study key, type, default, range and help."""
    rows = [f"| `{f.meta.flag or f.flag}` | `{f.name}` | {f.type_text()} | `{f.plain_default()}` | "
            f"{f.range_text()} | {', '.join(c for c in f.meta.commands if c != 'study')} | {f.meta.help} |"
            for f in setting_fields(cls)]
    return "\n".join([f"### {title}", "", "| option | study key | type | default | range | commands | what it does |",
                      "|---|---|---|---|---|---|---|", *rows, ""])


# The least number of optimizer steps a run takes: 10 epochs of 1,000 images at batch 128 are only
# 80 steps, and KMNIST -> MNIST at n = 1,000 then stopped at 86% test (88% train) where the reference
# reached 94%. The budget must follow the work, not the epoch count, so small data gets more epochs.
# TrainConfig(min_steps=None) means this value, read when validated (so a test may lower it).
DEFAULT_MIN_STEPS = 600


@dataclass
class TrainConfig(Settings):
    """How a model is trained: the CLI's training options, the API's arguments and a study's [train] keys.

    Fields written with ``setting`` are what a user sets; the others are engine internals."""

    epochs: int = setting(10, help="Passes over the training data (raised on small data to reach --min-steps).",
                          check=at_least(1, MAX_EPOCHS))
    batch_size: int = setting(128, help="Images per optimizer step.", check=at_least(1, MAX_BATCH))
    lr: float = setting(1e-3, help="Peak learning rate.", check=positive)
    optimizer: Optimizer = setting(Optimizer.ADAM, help="adam, adamw or sgd.")
    weight_decay: float = setting(0.0, help="L2 penalty on the weights.", check=non_negative)
    momentum: float = 0.9  # sgd only
    schedule: Schedule = setting(Schedule.COSINE, help="Learning-rate schedule: cosine, onecycle or constant.")
    label_smoothing: float = setting(0.0, help="Label smoothing of the cross-entropy loss.", check=fraction)
    # random translation of up to this many pixels, done on the device
    augment_shift: int = setting(0, help="Random shifts of up to this many pixels.", check=at_least(0, MAX_SHIFT))
    # mirror symmetric classes (clothes: Fashion-MNIST); wrong for digits and letters, whose mirror image is no digit
    augment_flip: bool = setting(False, flag="--augment-flip/--no-augment-flip",
                                 help="Mirror a random half of the images left to right (for symmetric classes).")
    # held-out share of the training split, reported per epoch
    val_fraction: float = setting(0.0, help="Hold out this share of the training data.", check=fraction)
    bn_stats: BnStats = setting(BnStats.FROZEN, commands=("finetune", "study"),
                                help="frozen: frozen BatchNorms keep their statistics; update: the original's "
                                     "behaviour.")
    precision: Precision = setting(Precision.AUTO, help="auto (measured once per machine and model, then "
                                                        "cached), fp32 or bf16.")
    # allow NHWC for models with 2-D convolutions (auto measures whether it pays)
    channels_last: bool = setting(True, flag="--channels-last/--no-channels-last",
                                  help="Allow NHWC for conv nets (auto precision measures whether it pays).")
    # torch.compile; falls back to eager if it fails, at creation or at the first step
    compile: bool = setting(False, help="torch.compile the model (falls back to eager).")
    eval_batch_size: int = 2048  # capped at CPU_EVAL_BATCH on CPU (see device.predict)
    log_every: int = 25
    # None: DEFAULT_MIN_STEPS; 0 trains exactly `epochs` epochs
    min_steps: int | None = setting(None, check=at_least(0, MAX_STEPS),
                                    help=f"Train at least this many optimizer steps, adding epochs on small data "
                                         f"(default {DEFAULT_MIN_STEPS}; 0: exactly --epochs).")

    def validate(self, style: str = "flag") -> "TrainConfig":
        super().validate(style)
        if self.min_steps is None:
            self.min_steps = DEFAULT_MIN_STEPS
        return self


TRAIN = TrainConfig()  # the defaults, read as TRAIN.epochs by the CLI and the API
# Training settings that change the input image every epoch, with what they do to it: where one is on, a frozen
# prefix is no fixed function of the image (prefix.decide) and the dry-run estimate times the full forward.
AUGMENTATIONS = {"augment_shift": "shifts", "augment_flip": "flips"}


def augmentation_of(train: "TrainConfig | dict") -> str | None:
    """What the first augmentation ``train`` turns on does to the input ("shifts", "flips"), or None."""
    value = train.get if isinstance(train, dict) else lambda name: getattr(train, name)
    return next((verb for name, verb in AUGMENTATIONS.items() if value(name)), None)
# TrainConfig fields a user sets (CLI option, API argument, study key); the others are engine internals.
USER_TRAIN_FIELDS = tuple(f.name for f in setting_fields(TrainConfig))


def study_keys(cls) -> dict[str, tuple[type, object]]:
    """{key: (type, default)} of ``cls``'s settings that a study file takes, for the study schema (a word from
    a fixed set is read as ``str`` and checked by its setting)."""
    return {f.name: (str if f.choices else f.kind, f.plain_default()) for f in setting_fields(cls, "study")}


def _plain(value):
    return str(value) if isinstance(value, StrEnum) else value


MATRIX_COMMANDS = ("attack-matrix", "study")


@dataclass(frozen=True)
class MatrixDefaults(Settings):
    """The attack matrix's settings: ``transferlab attack-matrix``, ``transferlab.attack_matrix`` and a
    study's [evaluation] table."""

    attacks: tuple[str, ...] = ("pgd",)
    eps: str = "0.1,0.2,0.3"
    samples: int = setting(5000, commands=MATRIX_COMMANDS, check=at_least(1, MAX_SAMPLES),
                           help="Size of the shared, stratified test sample set.")
    labels: LabelPolicy = setting(LabelPolicy.AUTO, commands=MATRIX_COMMANDS,
                                  help="auto, true or pred: which labels the attack moves away from.")
    white_box: bool = setting(True, commands=MATRIX_COMMANDS, flag="--white-box/--no-white-box",
                              help="Also attack each target with examples crafted on itself.")
    scope: Scope = setting(Scope.SOURCES, commands=MATRIX_COMMANDS,
                           help="sources: every model on the sources' sets, each target on its own white-box set; "
                                "full: every model on every set.")
    batch_size: int = setting(1000, commands=MATRIX_COMMANDS, check=at_least(1, MAX_BATCH),
                              help="Images per crafting batch.")
    precision: Precision = setting(Precision.AUTO, commands=MATRIX_COMMANDS,
                                   help="auto (the attacked model's measured decision), fp32 or bf16.")
    out: Path = Path("results/matrix")


MATRIX = MatrixDefaults()
RUNS_DIR = Path("results/runs")

RAY_COMMANDS = ("run", "study")


@dataclass(frozen=True)
class StepResources(Settings):
    """What each step of a study asks of a Ray cluster (``run --executor ray``): the ``num_cpus``, ``num_gpus``,
    ``memory`` and custom ``resources`` of its Ray task. On the command line and in ``run_study`` they apply to
    every step; a study's [executor] table takes them for every step too, and its train / craft / eval / merge
    tables for one kind of step (transferlab.resources). None: the default."""

    num_cpus: float | None = setting(None, commands=RAY_COMMANDS, check=ray_share,
                                     help="With --executor ray: CPUs each step holds (default: one per thread it "
                                          "runs, as far as a node has them).")
    num_gpus: float | None = setting(None, commands=RAY_COMMANDS, check=ray_share,
                                     help="With --executor ray: GPUs each step holds, e.g. 0.25 for four per GPU "
                                          "(default on a cluster with GPUs, unless the device is cpu: 1 per "
                                          "training or crafting step, 0.25 per evaluation; else 0).")
    memory: float | None = setting(None, commands=RAY_COMMANDS, check=non_negative,
                                   help="With --executor ray: GiB of memory each step reserves (Ray's memory "
                                        "resource; default: none).")
    custom_resources: dict | None = setting(None, commands=RAY_COMMANDS, check=amounts, flag="--resource",
                                            help="With --executor ray: a custom Ray resource each step holds, "
                                                 "NAME=AMOUNT (repeatable; e.g. accelerator_type:A100=0.001).")


def settings_doc() -> str:
    """docs/settings.md: every user setting, generated from the declarations above."""
    return "\n".join([
        "# Settings", "",
        "Generated from transferlab/config.py by `python scripts/settings_doc.py > docs/settings.md`; each setting",
        "is declared there once, and its command-line option, Python keyword argument and study-file key all",
        "come from that declaration. In a study file, training keys go in `[train]` (or one `[[pretrain]]`,",
        "`[[finetune]]`, `[[scratch]]` entry), matrix keys in `[evaluation]` and Ray resources in `[executor]` (for",
        "every step) or `[executor] train = { ... }` (one kind: train, craft, eval, merge).", "",
        markdown_table(TrainConfig, "Training (`pretrain`, `finetune`, `[train]`)"),
        markdown_table(MatrixDefaults, "Attack matrix (`attack-matrix`, `[evaluation]`)"),
        markdown_table(StepResources, "Ray resources per step (`run --executor ray`, `[executor]` and its "
                                      "`train` / `craft` / `eval` / `merge` tables)"),
    ])
