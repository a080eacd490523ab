"""A study's plan: its steps (pretrain -> finetune -> craft + eval -> merge), each with a content key.

Every step has a content key, a hash of its own config, its inputs' keys, its data descriptor and a schema
version. A step whose output already carries its key is done and is skipped, so a killed study resumes where it
stopped and a study with one more target or eps runs only what is new. Planning does no I/O beyond is_done().
"""

from __future__ import annotations

import fnmatch
import itertools
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from transferlab import config as settings
from transferlab import store
from transferlab.config import StepKind
from transferlab.device import thread_count
from transferlab.errors import UserError
from transferlab.names import check_name, run_name, slug
from transferlab.study.schema import TRAIN_FIELDS
from transferlab.study_check import data_fingerprint
from transferlab.tables import MATRIX_SCHEMA

STUDY_SCHEMA = 1
TRAIN_KINDS = (StepKind.PRETRAIN, StepKind.FINETUNE, StepKind.SCRATCH)
MATRIX_KINDS = (StepKind.CRAFT, StepKind.EVAL, StepKind.MERGE)


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
    threads: int = 1  # torch threads it computes with, decided once by the plan for every executor (in its key)

    def __post_init__(self):
        self.kind = StepKind(self.kind)

    def is_done(self) -> bool:
        if self.kind in TRAIN_KINDS:
            if not store.is_finished_run(self.output):
                return False
            try:
                info = store.read_json(self.output / store.RUN_FILE)
                if info.get("step_key") != self.key or not self._same_threads(info.get("numerics")):
                    return False
                store.verified_weights(self.output, info)
            except UserError as exc:
                _warn_redo(self, exc)
                return False
            return True
        if self.kind in MATRIX_KINDS:  # merge: the folder's matrix.json; craft / eval: a receipt in steps/
            if not self.output.is_file():
                return False
            try:
                written = store.read_json(self.output)
            except UserError:
                return False
            # Tables of an older schema are merged again, from the cached results (nothing is crafted).

            return written.get("step_key") == self.key and self._same_threads(written) and (
                self.kind != "merge" or written.get("schema") == MATRIX_SCHEMA)
        return False  # the report is cheap and always rebuilt

    def _same_threads(self, record) -> bool:
        """Whether an output was made with this step's thread count (outputs from before it was recorded: yes)."""
        threads = (record or {}).get("threads") if isinstance(record, dict) else None
        return threads is None or threads == self.threads


_REDO_WARNED: set[tuple] = set()


def _warn_redo(step: "Step", exc: UserError) -> None:
    """Say, once per step and cause, why a step whose output exists is done again (a damaged or swapped run)."""
    if (step.id, str(exc)) not in _REDO_WARNED:
        _REDO_WARNED.add((step.id, str(exc)))
        warnings.warn(f"step {step.id} is done again: {exc}", stacklevel=3)


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


# Training settings added after studies had run, with the value every earlier step trained with: a step at that
# value is keyed without the setting, so adding a setting does not make every finished step run again.
_KEYED_WHEN_SET = {"augment_flip": False}


def _key_config(step: Step) -> dict:
    """The config a step is keyed on: its own, with the ids of the runs it names in their keyed form."""
    if step.kind not in ("craft", "eval"):
        if "train" not in step.config:
            return step.config
        train = {k: v for k, v in step.config["train"].items()
                 if k not in _KEYED_WHEN_SET or v != _KEYED_WHEN_SET[k]}
        return {**step.config, "train": train}
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

    # The thread count changes CPU float reductions: decided here, once, so the local executor and Ray compute
    # a step alike. It is checked by is_done against what the step's output records (a step made with other
    # threads is made again) rather than keyed, so the keys of studies made before stay theirs.
    threads = thread_count()

    def add(step: Step) -> Step:
        if step.output is not None and step.kind in TRAIN_KINDS:
            check_name(step.output.name, f"output name of step {step.id}")
        inputs = [by_id[i].key for i in step.inputs]
        step.threads = threads
        step.key = store.content_key({"schema": STUDY_SCHEMA, "kind": _KEY_WORDS.get(step.kind, step.kind),
                                      "config": _key_config(step), "inputs": inputs, "seed": step.seed})
        steps.append(step)
        by_id[step.id] = step
        return step

    for seed in study["study"]["seeds"]:
        for entry in study["pretrain"]:
            config = {"model": entry["model"], "options": entry["options"], "train": _train_of(entry),
                      "data": _data_descriptor(entry["dataset"], canvas, "train", entry["n"], seed)}
            add(Step(f"pretrain/{entry['name']}/s{seed}", "pretrain", config, [], seed=seed,
                     output=runs_dir / run_name("pretrain", entry["name"], seed)))
        for entry in study["finetune"]:
            freezes = [("freeze", f) for f in entry["freeze"]] if entry["freeze"] is not None else \
                [("freeze_to", f) for f in entry["freeze_to"]]
            for source, n, (freeze_kind, freeze_value) in itertools.product(entry["from"], entry["n"], freezes):
                config = {"from": source, freeze_kind: freeze_value, "train": _train_of(entry),
                          "data": _data_descriptor(entry["dataset"], canvas, "train", n, seed)}
                size = "all" if n is None else n
                tag = f"f{freeze_value}" if freeze_kind == "freeze" else f"to-{freeze_value}"
                dataset = slug(entry["dataset"])
                add(Step(f"finetune/{source}/{dataset}{size}/{tag}/s{seed}", "finetune", config,
                         [f"pretrain/{source}/s{seed}"], seed=seed,
                         output=runs_dir / run_name("finetune", source, seed, dataset, size, tag)))
        for entry in study["scratch"]:
            for model, n in itertools.product(entry["model"], entry["n"]):
                config = {"model": model, "options": entry["options"], "train": _train_of(entry),
                          "data": _data_descriptor(entry["dataset"], canvas, "train", n, seed)}
                size = "all" if n is None else n
                dataset = slug(entry["dataset"])
                add(Step(f"scratch/{model}/{dataset}{size}/s{seed}", "scratch", config, [], seed=seed,
                         output=runs_dir / run_name("scratch", slug(model), seed, dataset, size)))
        if study["attack"]:
            seed_steps = [s for s in steps if s.seed == seed]
            ensemble_specs(study["evaluation"]["ensembles"], seed_steps, seed)  # bad names fail before training
            for attack in study["attack"]:
                for step in matrix_steps(study, attack, seed_steps, seed, out_dir):
                    add(step)
    return steps


def _train_of(entry: dict) -> dict:
    """A training entry's training settings; min_steps resolved here, so a step's key names the budget it trains
    with."""
    train = {k: entry[k] for k in TRAIN_FIELDS}
    train["min_steps"] = settings.DEFAULT_MIN_STEPS if train["min_steps"] is None else train["min_steps"]
    return train


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


def select(steps: list[Step], pattern: str | None) -> list[Step]:
    if not pattern:
        return steps
    return [s for s in steps if fnmatch.fnmatch(s.id, pattern) or pattern in s.id]


def ensemble_specs(groups: list[list[str]], inputs: list, seed: int) -> list[str]:
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
    # An L2 attack's folder (and step ids) name its norm, as its rows do ('pgd-L2'); an Linf attack's keep theirs.
    norm = attack["options"].get("norm", settings.Norm.LINF)
    norm_part = "" if settings.choice(settings.Norm, norm, "norm") == settings.Norm.LINF else f"-{norm}"
    return attack["attack"].replace(":", "-") + norm_part + ("" if attack["steps"] is None else f"_k{attack['steps']}")


def matrix_folder(step: Step) -> Path:
    """The attack folder (matrix/sSEED/ATTACK) a craft, eval or merge step writes into."""
    return step.output.parent if step.kind == "merge" else step.output.parent.parent
