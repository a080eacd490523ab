"""The attack matrix: craft once per (model, attack, eps), evaluate every model on every set.

Every cell shares one seeded, stratified sample set of the target data's test split, so
cells are paired and can be compared sample by sample (McNemar). Adversarial sets and
per-sample correctness are cached under the output directory, keyed by content, so a
second run, or one with an extra target, crafts nothing that already exists.

Rows of the result are tidy: one per (crafted-on model, evaluated model, attack, eps, seed), in
cells.csv (columns ``crafted_on`` / ``evaluated``, each with its ``*_role``: pretrained, finetuned,
scratch or ensemble), lineage.csv (per fine-tune: the model it was fine-tuned from against each other
pretrained model of its architecture) and pairs.csv (transfer predictors per crafted-on / evaluated pair).
"""

from __future__ import annotations

import collections
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from transferlab import attacks, data as data_mod, ensemble, predictors, prefix, stats, store
from transferlab.config import LabelPolicy, Scope, choice
from transferlab.device import Numerics, check_precision, choose_numerics, predict, resolve_device, to_float
from transferlab.errors import UserError
from transferlab.matrix_outputs import check_no_clobber
from transferlab.records import RunRecord
from transferlab.runs import DataOptions, check_seed
from transferlab.training import progress_console
# The tables' columns and schema live in transferlab.tables (the report reads them without torch).
from transferlab.tables import (CACHE_SCHEMA, CELL_COLUMNS, INTEGER_COLUMNS, LINEAGE_COLUMNS,  # noqa: F401
                                MATRIX_SCHEMA, ROLE_OF_KIND, V3_PAIR_NAMES, eps_label, eps_text, integer_columns,
                                upgrade_table)


@dataclass
class Member:
    """One run taking part in the matrix, as a crafter (row), an evaluated model (column), or both."""

    run_dir: Path
    record: RunRecord
    # Which list the run came in: "source" (--sources), "target" (--targets) or "ensemble". It decides what
    # the run does in the matrix (whose sets are kept, who is scored on them); ``role`` says what the run is.
    listed_as: str
    weights_sha256: str
    members: list = field(default_factory=list)  # an ensemble's runs

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def dataset(self) -> str:
        return self.record.dataset["name"]

    @property
    def label_space(self) -> str:
        return self.record.label_space

    @property
    def family(self) -> str:
        return self.record.family

    @property
    def pretrain_dataset(self):
        return self.record.pretrain_dataset

    @property
    def source_sha256(self):
        """The weights hash of the run this one was fine-tuned from (None for pretrain/scratch)."""
        return self.record.source_sha256

    @property
    def role(self) -> str:
        """pretrained | finetuned | scratch | ensemble, the role written in the tables; from run.json's kind
        (an in-memory run has none: fine-tuned when it has a source, else by the list it came in)."""
        if self.listed_as == "ensemble":
            return "ensemble"
        role = ROLE_OF_KIND.get(self.record.kind)
        if role is not None:
            return role
        if self.source_sha256:
            return "finetuned"
        return "pretrained" if self.listed_as == "source" else "scratch"

    @property
    def pretraining_root(self) -> str:
        """Which pretrained weights this model descends from: its source's, or its own."""
        return self.source_sha256 or self.weights_sha256


@dataclass
class AttackSetting:
    name: str  # as the tables name it: the attack, with its norm unless Linf ('pgd-L2': attacks.attack_label)
    eps: float
    params: dict  # fully resolved torchattacks parameters, recorded with every row
    attack: str = ""  # what craft runs ('pgd'); "" : the name

    def __post_init__(self):
        self.attack = self.attack or self.name

    @property
    def norm(self) -> str:
        return attacks.norm_of(self.params)


@dataclass
class MatrixResult:
    out_dir: Path
    cells: pd.DataFrame
    lineage: pd.DataFrame
    crafted: int = 0  # adversarial sets crafted in this call (the rest came from the cache)
    reused: int = 0
    seconds: float = 0.0
    examples_file: Path | None = None
    timings: dict = field(default_factory=dict)
    pairs: pd.DataFrame | None = None

    def summary(self) -> str:
        return (f"{len(self.cells)} cells ({self.crafted} adversarial sets crafted, {self.reused} reused) "
                f"in {self.seconds:.1f}s -> {self.out_dir}")


def select_runs(runs_dir: Path, pattern: str) -> list[Path]:
    """Finished run directories under ``runs_dir`` whose name matches the glob ``pattern``."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise UserError(f"--runs-dir {runs_dir} does not exist")
    return sorted(p for p in runs_dir.glob(pattern) if store.is_finished_run(p))


def _validate(sources: list[Member], targets: list[Member], dataset_name: str) -> str:
    if not sources:
        raise UserError("no source runs given; pass --sources RUN_DIR... (or --runs-dir DIR --select 'pre_*')")
    if not targets:
        raise UserError("no target runs given; pass --targets RUN_DIR... (or --runs-dir DIR: every run there that is not a source)")
    canvases = {m.record.dataset["canvas"] for m in sources + targets}
    if len(canvases) > 1:
        detail = ", ".join(f"{m.name}={m.record.dataset['canvas']}" for m in sources + targets)
        raise UserError(f"runs were trained on different canvases ({detail}); attack only runs on one canvas")
    for target in targets:
        if target.dataset != dataset_name:
            raise UserError(f"target {target.name} was trained on {target.dataset}, not on --dataset {dataset_name}; "
                            f"pass --dataset {target.dataset} or drop that target")
    names = [m.name for m in sources + targets]
    shared = {m.name for m in sources} & {m.name for m in targets}
    if len(set(names)) != len(names) - len(shared):
        raise UserError("two different runs share one name; give each run a unique --name")
    return canvases.pop()


def _same_pretraining(crafter: Member, evaluated: Member) -> bool:
    return crafter.pretraining_root == evaluated.pretraining_root


def _set_key(crafter: Member, setting: AttackSetting, policy: str, sample_fingerprint: str, seed: int,
             numerics: str) -> str:
    return store.content_key({
        "schema": CACHE_SCHEMA, "weights": crafter.weights_sha256, "attack": setting.name, "eps": setting.eps,
        "params": setting.params, "labels": policy, "samples": sample_fingerprint, "seed": seed,
        "numerics": numerics,
    })


def _load_cached_set(path: Path, key: str, clean: torch.Tensor, eps: float, norm: str = "Linf"):
    """A cached adversarial set and its metadata, or None (with a warning) when it is damaged, foreign,
    mis-shaped or off its eps ball."""
    loaded = store.load_checked_tensors(path, "adversarial set", expect={"key": key})
    if loaded is None:
        return None
    adversarial = loaded[0].get("adversarial")
    try:
        if adversarial is None or adversarial.dtype != clean.dtype:
            raise attacks.AttackBoundError("no float 'adversarial' tensor")
        attacks.check_eps_ball(clean, adversarial.to(clean.device), eps, norm=norm)
        if eps > 0 and adversarial.shape == clean.shape and torch.equal(adversarial.to(clean.device), clean):
            raise attacks.AttackBoundError("it holds the clean images themselves")  # a set no attack produces
    except attacks.AttackBoundError as exc:
        warnings.warn(f"adversarial set {path} is unusable ({exc}); crafting it again", stacklevel=2)
        return None
    return adversarial.to(clean.device), loaded[1]


# ------------------------------------------------------------------ the matrix as phases
# A matrix is (1) a spec, (2) a sample set, (3) crafted sets, (4) per-(set, model) results and per-pair
# predictors, (5) merged tables. Phases 3 and 4 write one file per unit of work, so a study can run each
# unit as its own step, on any worker that sees the output folder (transferlab.study), while run_matrix runs them
# all in this process; both leave the same files and the same tables.
SCOPES = tuple(Scope)


@dataclass
class MatrixSpec:
    """Everything that defines one attack matrix: its runs, its attack settings and its sample set."""

    sources: list[Path]
    targets: list[Path]
    dataset: str
    settings: list[AttackSetting]
    samples: int = 5000
    label_policy: str = "auto"
    seed: int = 0
    device: str = "auto"
    white_box: bool = True
    scope: str = "sources"
    data: object = None  # runs.DataOptions
    out_dir: Path = Path("results/matrix")
    batch_size: int = 1000
    eval_batch_size: int = 4096
    examples: int = 6
    keep_white_box_sets: bool = False
    precision: str = "auto"
    ensembles: list[str] = field(default_factory=list)
    canvas: str | None = None  # None: the canvas the runs were trained on


def make_spec(
    *, sources: list[Path], targets: list[Path], dataset: str, attack_names: list[str], eps_values: list[float],
    steps: int | None = None, alpha: float | None = None, attack_options: dict | None = None,
    samples: int = 5000, label_policy: str = "auto", seed: int = 0, device: str = "auto", white_box: bool = True,
    scope: str = "sources", data=None, out_dir: Path = Path("results/matrix"), batch_size: int = 1000,
    eval_batch_size: int = 4096, examples: int = 6, keep_white_box_sets: bool = False, precision: str = "auto",
    ensembles: list[str] | None = None,
) -> MatrixSpec:
    """Check a matrix's arguments (one-line errors) and resolve its attack settings."""
    label_policy = choice(LabelPolicy, label_policy, "--labels")
    scope = choice(Scope, scope, "--scope")
    if not eps_values:
        raise UserError("no eps given; pass e.g. --eps 0.1,0.2,0.3")
    check_seed(seed)
    for flag, value in (("--batch-size", batch_size), ("--samples", samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{flag} must be a whole number of at least 1, got {value!r}")
    precision = check_precision(precision)
    attack_names = [attacks.resolve_attack(a) for a in attack_names]
    # steps/alpha may come as --steps/--alpha or as attack options (--attack-opt steps=1); one of each.
    attack_options = dict(attack_options or {})
    for key, flag in (("steps", steps), ("alpha", alpha)):
        if key in attack_options:
            if flag is not None:
                raise UserError(f"{key} given twice: as --{key} and as the attack option {key}=; keep one")
            if key == "steps":
                steps = attack_options.pop(key)
            else:
                alpha = attack_options.pop(key)
    settings = [AttackSetting(attacks.attack_label(a, p), e, p, attack=a)
                for a in attack_names for e in eps_values
                for p in [attacks.attack_params(a, e, steps=steps, alpha=alpha, **attack_options)]]
    for setting in settings:
        # A torchattacks class with its own constructor seed (APGD, Square, ...) draws from the matrix's seed,
        # so its randomness varies across a study's seeds like everything else; a seed given as an option stays.
        if "seed" in setting.params and "seed" not in attack_options:
            setting.params["seed"] = seed
    return MatrixSpec(sources=[Path(p) for p in sources], targets=[Path(p) for p in targets],
                      dataset=data_mod.resolve_name(dataset), settings=settings, samples=samples,
                      label_policy=label_policy, seed=seed, device=device, white_box=white_box, scope=scope,
                      data=data or DataOptions(), out_dir=Path(out_dir), batch_size=batch_size,
                      eval_batch_size=eval_batch_size, examples=examples, keep_white_box_sets=keep_white_box_sets,
                      precision=precision, ensembles=list(ensembles or []))


# Loading a dataset is the same work in every step of a matrix that a worker runs (and so is hashing
# checkpoints, which store.file_sha256 remembers).
_DATASETS: dict[tuple, object] = {}


def _dataset(name: str, canvas: str, data) -> object:
    key = (name, canvas, str(data.data_dir), data.download, str(data.cache_dir))
    if key not in _DATASETS:
        _DATASETS.clear()  # one at a time: a worker moves from study to study
        _DATASETS[key] = data_mod.load(name, canvas=canvas, data_dir=data.data_dir, download=data.download,
                                       cache_dir=data.cache_dir)
    return _DATASETS[key]


class _Kept:
    """The last few values of a computation that every eval step of a study repeats, kept per process
    (LRU): a model's predictor profile (input gradients, features and predictions on the sample set; the
    quick study computed 48 for its 8 models, 0.4 s each) and its clean predictions (24 times for 6 models).
    Keys hold everything the value depends on, so a hit returns exactly what computing would."""

    def __init__(self, kept: int):
        self.kept, self.values = kept, collections.OrderedDict()

    def get(self, key: tuple, compute):
        if key in self.values:
            self.values.move_to_end(key)
        else:
            self.values[key] = compute()
            while len(self.values) > self.kept:
                self.values.popitem(last=False)
        return self.values[key]


# A profile is a few MB (reference scale: 5,000 x 784 gradients, 16 MB); clean predictions are one int64 each.
_PROFILES = _Kept(16)
_CLEAN_PREDICTIONS = _Kept(64)
# Each fine-tune's eval-mode cut at its frozen tensors (or None), keyed by weights and numerics: tracing costs
# more than an eval step's forward passes on small sets, and every eval step of a study asks again.
_SPLITS = _Kept(32)


class Matrix:
    """One attack matrix on disk: every phase reads what it needs and writes its own files.

    Members (runs) are loaded only when a phase needs them, so a step that crafts on one source
    does not wait for, or read, the targets' checkpoints.
    """

    def __init__(self, spec: MatrixSpec, craft_fn=None):
        self.spec = spec
        self.craft_fn = craft_fn or attacks.craft
        self.out_dir = store.ensure_writable_dir(spec.out_dir, "matrix output directory")
        self.device = resolve_device(spec.device)
        self._members: dict[str, Member] = {}
        self._models: dict[str, torch.nn.Module] = {}
        self._numerics: dict[str, Numerics] = {}
        self._clean: dict[str, tuple] = {}
        self._set_numerics: dict[tuple, dict] = {}  # how each set was crafted, as recorded with it
        self._canvas = None
        self.crafted = self.reused = 0
        self._reused_sets: dict[tuple, bool] = {}
        self.craft_seconds = self.eval_seconds = 0.0

    # ---------------------------------------------------------------- members
    def member(self, run_dir: Path, listed_as: str) -> Member:
        key = (str(Path(run_dir)), listed_as)
        if key not in self._members:
            info = store.read_run_info(Path(run_dir))
            record = RunRecord.from_json(info, where=str(Path(run_dir) / store.RUN_FILE))
            _, sha = store.verified_weights(run_dir, info)  # cells are keyed on it: a swapped file must not pass
            self._members[key] = Member(Path(run_dir), record, listed_as, sha)
        return self._members[key]

    def sources(self) -> list[Member]:
        return [self.member(p, "source") for p in self.spec.sources]

    def targets(self) -> list[Member]:
        return [self.member(p, "target") for p in self.spec.targets]

    def ensembles(self) -> list[Member]:
        candidates = self.sources() + self.targets() if self.spec.ensembles else []
        return [ensemble.make_member(group, Member) for group in ensemble.resolve(self.spec.ensembles, candidates)]

    def crafters(self) -> list[Member]:
        """The sources and ensembles, then (white-box diagonal) the targets that are not sources already."""
        crafters = self.sources() + self.ensembles()
        if self.spec.white_box:
            crafters += [t for t in self.targets() if t.weights_sha256 not in {s.weights_sha256 for s in crafters}]
        return crafters

    def evaluated(self) -> list[Member]:
        target_weights = {t.weights_sha256 for t in self.targets()}
        return self.targets() + [s for s in self.sources() if s.weights_sha256 not in target_weights]

    def scope_of(self, crafter: Member) -> list[Member]:
        """Who is evaluated on ``crafter``'s sets: everyone, except that with scope "sources" a target's
        white-box set is scored on that target alone (the question needs the diagonal, not target-to-target)."""
        if self.spec.scope == "full" or crafter.listed_as != "target":
            return self.evaluated()
        return [crafter]

    def keeps_set(self, crafter: Member) -> bool:
        """Sources' sets are what every model is measured on, so they stay on disk. A target's white-box set is
        kept only when others are scored on it (scope "full") or on request: a full grid has one per target."""
        return crafter.listed_as != "target" or self.spec.keep_white_box_sets or self.spec.scope == "full"

    def validate(self) -> str:
        canvas = _validate(self.sources(), self.targets(), self.spec.dataset)
        if self.spec.canvas and canvas != self.spec.canvas:
            raise UserError(f"the runs were trained on the {canvas} canvas, not on {self.spec.canvas}")
        self._canvas = canvas
        return canvas

    # ---------------------------------------------------------------- data
    @property
    def canvas(self) -> str:
        if self._canvas is None and self.spec.canvas:
            self._canvas = self.spec.canvas
        if self._canvas is None:
            first = self.spec.sources[0] if self.spec.sources else self.spec.targets[0]
            self._canvas = store.read_run_info(Path(first))["dataset"]["canvas"]
        return self._canvas

    @property
    def ds(self):
        return _dataset(self.spec.dataset, self.canvas, self.spec.data)

    def sample_set(self):
        """(uint8 images, labels, index, fingerprint) of the one stratified sample set every cell shares."""
        if not hasattr(self, "_sample"):
            ds, samples = self.ds, self.spec.samples
            if samples > len(ds.test):
                raise UserError(f"--samples {samples} is larger than the {self.spec.dataset} test split "
                                f"({len(ds.test)} images)")
            index = data_mod.stratified_subset(ds.test.labels, samples, self.spec.seed)
            fingerprint = store.content_key({"test": ds.fingerprint("test"), "n": samples, "seed": self.spec.seed})
            self._sample = (ds.test.images[index], ds.test.labels[index], index, fingerprint)
            self._clean_images = to_float(self._sample[0].to(self.device))
        return self._sample

    @property
    def clean_images(self) -> torch.Tensor:
        self.sample_set()
        return self._clean_images

    @property
    def labels(self) -> torch.Tensor:
        return self.sample_set()[1]

    # ---------------------------------------------------------------- models
    def model(self, member: Member) -> torch.nn.Module:
        sha = member.weights_sha256
        if sha not in self._models and getattr(member, "members", None):
            parts = [self.model(m) for m in member.members]
            # Each member keeps its own layout; the ensemble runs in bf16 only where every member measured it
            # faster (or bf16 was asked for), since one autocast region covers them all.
            shared = {self._numerics[m.weights_sha256].precision for m in member.members}
            self._models[sha] = ensemble.MeanLogits(parts).eval()
            self._numerics[sha] = Numerics(shared.pop() if len(shared) == 1 else "fp32", False, "members")
        if sha not in self._models:
            model, _ = store.load_run(member.run_dir, self.device)
            # One decision per model for crafting and evaluation: both run its forward (and backward) passes.
            decision = choose_numerics(model, self.device, self.spec.precision, batch_size=self.spec.batch_size,
                                       sample_shape=tuple(self.sample_set()[0].shape[1:]), workload="attack")
            decision.apply(model).eval()
            self._models[sha], self._numerics[sha] = model, decision
        return self._models[sha]

    def numerics(self, member: Member) -> Numerics:
        self.model(member)
        return self._numerics[member.weights_sha256]

    def predict(self, member: Member, images: torch.Tensor) -> torch.Tensor:
        return predict(self.model(member), images, self.device, self.spec.eval_batch_size, self.numerics(member))

    def split(self, member: Member):
        """``member``'s eval-mode model cut after its frozen tensors (prefix.Split), or None: runs that froze
        nothing, ensembles, and models that do not trace are evaluated whole."""
        frozen_n = (member.record.freeze or {}).get("n") or 0
        if getattr(member, "members", None) or not frozen_n or not prefix.ENABLED:
            return None
        numerics = self.numerics(member)
        key = (member.weights_sha256, str(self.device), numerics.label, tuple(self.sample_set()[0].shape[1:]))

        def cut():
            model = self.model(member)
            names = (member.record.freeze or {}).get("frozen_names")
            frozen = {id(p) for i, (name, p) in enumerate(model.named_parameters())
                      if (name in names if names is not None else i < frozen_n)}
            sample = self.clean_images[:prefix.SAMPLE_BATCH].contiguous(memory_format=numerics.memory_format)
            found = prefix.split_model(model, sample, numerics, frozen)
            return (found, prefix.eval_prefix_key(found, numerics)) if isinstance(found, prefix.Split) else None

        return _SPLITS.get(key, cut)

    def predict_many(self, members: list[Member], images: torch.Tensor) -> list[torch.Tensor]:
        """Each member's predictions on ``images``; members whose frozen prefixes are equal by content (code,
        tensors, numerics: prefix.eval_prefix_key) share one pass of that prefix, then run their tails. The
        batches are predict's, so every prediction equals the member's own full forward pass."""
        out: dict[int, torch.Tensor] = {}
        groups: dict[str, list[int]] = collections.defaultdict(list)
        for i, member in enumerate(members):
            found = self.split(member) if len(members) > 1 else None
            groups[found[1] if found else f"alone-{i}"].append(i)
        for indices in groups.values():
            if len(indices) == 1:
                out[indices[0]] = self.predict(members[indices[0]], images)
                continue
            splits = [self.split(members[i])[0] for i in indices]
            predicted = prefix.predict_shared(splits[0].prefix, [s.tail for s in splits], images, self.device,
                                              self.spec.eval_batch_size, self.numerics(members[indices[0]]))
            out.update(zip(indices, predicted))
        return [out[i] for i in range(len(members))]

    def reference_kind(self, member: Member) -> str:
        """What "correct" means for an evaluated model. A model trained on the target's label space is scored
        against the true labels. A source with other classes (KMNIST characters on MNIST digits) has no right
        answer here, so it is scored against its own clean predictions: its "accuracy" is then the share of
        predictions the attack failed to change (clean accuracy 100% by construction)."""
        if member.label_space == self.ds.spec.label_space or member.dataset == self.spec.dataset:
            return "true labels"
        return "own clean predictions"

    def clean(self, member: Member) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference labels, clean correctness) of an evaluated model on the sample set."""
        sha = member.weights_sha256
        if sha not in self._clean:
            clean_pred = _CLEAN_PREDICTIONS.get(self._clean_key(member), lambda: self.predict(member, self.clean_images))
            reference = self.labels if self.reference_kind(member) == "true labels" else clean_pred
            self._clean[sha] = (reference, clean_pred == reference)
        return self._clean[sha]

    def _clean_key(self, member: Member) -> tuple:
        return (member.weights_sha256, self.sample_set()[3], str(self.device), self.numerics(member).label,
                self.spec.eval_batch_size)

    def _share_clean(self, members: list[Member]) -> None:
        """Clean predictions of the members that have none yet, in one shared-prefix pass."""
        missing = [m for m in members if m.weights_sha256 not in self._clean
                   and self._clean_key(m) not in _CLEAN_PREDICTIONS.values]
        for member, predicted in zip(missing, self.predict_many(missing, self.clean_images)):
            _CLEAN_PREDICTIONS.get(self._clean_key(member), lambda: predicted)

    # ---------------------------------------------------------------- crafted sets
    def policy(self, crafter: Member) -> str:
        return attacks.choose_label_policy(self.spec.label_policy, crafter.label_space, crafter.dataset,
                                           self.ds.spec.label_space, self.spec.dataset)

    def set_key(self, crafter: Member, setting: AttackSetting) -> str:
        # The precision asked for, not the one a calibration chose: a resumed study keeps what its finished
        # steps used (recorded in every file and row), whichever worker decides next.
        return _set_key(crafter, setting, self.policy(crafter), self.sample_set()[3], self.spec.seed,
                        self.spec.precision)

    def set_id(self, crafter: Member, setting: AttackSetting) -> str:
        return (f"{crafter.name}__{setting.name.replace(':', '-')}_{eps_label(setting.eps, digits=4)}__"
                f"{self.set_key(crafter, setting)}")

    def set_path(self, crafter: Member, setting: AttackSetting) -> Path:
        return self.out_dir / "adversarial" / f"{self.set_id(crafter, setting)}.safetensors"

    @staticmethod
    def _set_ref(crafter: Member, setting: AttackSetting) -> tuple:
        return crafter.weights_sha256, setting.name, setting.eps

    def count_reused(self, crafter: Member, setting: AttackSetting) -> None:
        """A set whose every result is on disk: reused without reading it (a rebuild for the examples uncounts it)."""
        self.reused += 1
        self._reused_sets[self._set_ref(crafter, setting)] = True

    def adversarial(self, crafter: Member, setting: AttackSetting, count: bool = True) -> torch.Tensor:
        """The crafted set: read back (checked: key, checksum, shape, eps ball) or crafted and, if kept, saved.
        ``count``: whether a read counts in ``reused`` (not for the example images); a craft always counts."""
        t0 = time.perf_counter()
        path, key = self.set_path(crafter, setting), self.set_key(crafter, setting)
        found = _load_cached_set(path, key, self.clean_images, setting.eps, setting.norm) if path.is_file() else None
        if found is not None:
            adversarial, metadata = found
            record = json.loads(metadata["numerics"]) if "numerics" in metadata else self.numerics(crafter).record()
            self.reused += count
        else:
            model, policy = self.model(crafter), self.policy(crafter)
            # "pred" labels come from the same predict() the cells are scored with (same precision).
            attack_y = (self.predict(crafter, self.clean_images).to(self.device) if policy == "pred"
                        else self.labels.to(self.device))
            params = dict(setting.params)
            if "seed" in params:  # a constructor seed (APGD, Square, ...) would collide with craft's own
                params["attack_seed"] = params.pop("seed")
            adversarial = self.craft_fn(model, self.clean_images, attack_y, setting.attack, setting.eps,
                                        batch_size=self.spec.batch_size, seed=self.spec.seed,
                                        precision=self.numerics(crafter).precision, **params).detach()
            record = self.numerics(crafter).record()
            if self.keeps_set(crafter):
                store.save_checked_tensors(path, {"adversarial": adversarial}, metadata={
                    "crafter": crafter.name, "attack": setting.name, "eps": str(setting.eps), "norm": str(setting.norm),
                    "label_policy": policy, "samples": self.sample_set()[3], "key": key,
                    "numerics": store.json_compact(record)})
            self.crafted += 1
            if not count and self._reused_sets.pop(self._set_ref(crafter, setting), False):
                self.reused -= 1  # counted as reused (every result on it was on disk), but its file was damaged
        self._set_numerics[self._set_ref(crafter, setting)] = record
        self.craft_seconds += time.perf_counter() - t0
        return adversarial

    # ---------------------------------------------------------------- results
    def result_path(self, crafter: Member, setting: AttackSetting, member: Member) -> Path:
        return self.out_dir / "correct" / self.set_id(crafter, setting) / f"{member.name}.safetensors"

    def result_key(self, crafter: Member, setting: AttackSetting, member: Member) -> str:
        return store.content_key({"set": self.set_key(crafter, setting), "model": member.weights_sha256,
                                  "precision": self.spec.precision, "reference": self.reference_kind(member)})

    def load_result(self, crafter: Member, setting: AttackSetting, member: Member):
        """(metadata, adversarial correctness, clean correctness) from disk, or None when absent or damaged."""
        path = self.result_path(crafter, setting, member)
        if not path.is_file():
            return None
        loaded = store.load_checked_tensors(path, "matrix cache file",
                                            expect={"key": self.result_key(crafter, setting, member)})
        if loaded is None:
            return None
        tensors, metadata = loaded
        samples = self.spec.samples
        if set(tensors) != {"adversarial_correct", "clean_correct"} or any(
                t.dtype != torch.uint8 or tuple(t.shape) != (samples,) or bool((t > 1).any())
                for t in tensors.values()):
            warnings.warn(f"matrix cache file {path} holds results of the wrong shape or type; evaluating again",
                          stacklevel=2)
            return None
        return metadata, tensors["adversarial_correct"].bool(), tensors["clean_correct"].bool()

    def evaluate(self, crafter: Member, setting: AttackSetting, member: Member,
                 adversarial: torch.Tensor | None = None):
        """Score ``member`` on ``crafter``'s set (crafting or reading it if not given) and save the result."""
        found = self.load_result(crafter, setting, member)
        if found is not None:
            return found
        if adversarial is None:
            adversarial = self.adversarial(crafter, setting)
        t0 = time.perf_counter()
        found = self._save_result(crafter, setting, member, self.predict(member, adversarial))
        self.eval_seconds += time.perf_counter() - t0
        return found

    def evaluate_many(self, crafter: Member, setting: AttackSetting, members: list[Member],
                      adversarial: torch.Tensor | None = None) -> list:
        """``evaluate`` for several members on one set: those fine-tuned from one source with equal frozen
        tensors share their prefix (predict_many). Same files and results as evaluating each alone."""
        results = {m.name: self.load_result(crafter, setting, m) for m in members}
        missing = [m for m in members if results[m.name] is None]
        if missing:
            if adversarial is None:
                adversarial = self.adversarial(crafter, setting)
            t0 = time.perf_counter()
            self._share_clean(missing)
            for member, predicted in zip(missing, self.predict_many(missing, adversarial)):
                results[member.name] = self._save_result(crafter, setting, member, predicted)
            self.eval_seconds += time.perf_counter() - t0
        return [results[m.name] for m in members]

    def _save_result(self, crafter: Member, setting: AttackSetting, member: Member, predicted: torch.Tensor):
        reference, clean_ok = self.clean(member)
        adv_ok = predicted == reference
        metadata = {"key": self.result_key(crafter, setting, member), "crafter": crafter.name,
                    "evaluated": member.name, "reference_labels": self.reference_kind(member),
                    "label_policy": self.policy(crafter),
                    "craft_numerics": store.json_compact(self._set_numerics[(crafter.weights_sha256, setting.name,
                                                                             setting.eps)]),
                    "eval_numerics": store.json_compact(self.numerics(member).record())}
        store.save_checked_tensors(self.result_path(crafter, setting, member), {
            "adversarial_correct": adv_ok.to(torch.uint8).cpu(), "clean_correct": clean_ok.to(torch.uint8).cpu()},
            metadata=metadata)
        return metadata, adv_ok.cpu(), clean_ok.cpu()

    # ---------------------------------------------------------------- predictors
    def pair_path(self, crafter: Member, member: Member) -> Path:
        return self.out_dir / "pairs" / f"{crafter.name}__{member.name}.json"

    def pair(self, crafter: Member, member: Member) -> dict:
        """The transfer predictors of one (crafter, evaluated) pair (transferlab.predictors), cached."""
        path = self.pair_path(crafter, member)
        key = store.content_key({"crafter": crafter.weights_sha256, "evaluated": member.weights_sha256,
                                 "samples": self.sample_set()[3], "labels": self.spec.label_policy,
                                 "precision": self.spec.precision, "schema": CACHE_SCHEMA})
        if path.is_file():
            try:
                cached = store.read_json(path, what="pair file")
            except UserError:
                cached = None
            well_formed = isinstance(cached, dict) and isinstance(cached.get("row"), dict) and "key" in cached
            if well_formed and cached["key"] == key:
                # A pair file written under table schema 3 names the pair source / target.
                return {V3_PAIR_NAMES.get(k, k): v for k, v in cached["row"].items()}
            if not well_formed:  # a stale key (another sample set, precision ...) is a plain miss: no warning
                warnings.warn(f"matrix cache file {path} is damaged or foreign; computing it again", stacklevel=2)

        def profile_of(m: Member):
            own = self.policy(m) == "pred"
            key = (m.weights_sha256, self.sample_set()[3], own, str(self.device), self.spec.batch_size,
                   self.spec.precision)
            return _PROFILES.get(key, lambda: predictors.profile(
                self.model(m), self.clean_images, None if own else self.labels.to(self.device),
                self.spec.batch_size))

        row = {**predictors.pair_row(crafter.name, member.name, profile_of(crafter), profile_of(member),
                                     self.model(crafter), self.model(member)), "seed": self.spec.seed}
        store.atomic_write_json(path, {"key": key, "row": row})
        return row

    # ---------------------------------------------------------------- merge
    def _pairs_table(self, crafters) -> pd.DataFrame:
        """One row per (crafted_on, evaluated, attack, eps, seed), the keys of a cell: pairs.csv joins the cells
        one to one, and the tables of a study's attack folders add up without repeating a pair."""
        pair_rows = {(c.name, m.name): self.pair(c, m) for c in crafters for m in self.scope_of(c)}
        return pd.DataFrame([{**pair_rows[c.name, m.name], "attack": s.name, "eps": s.eps}
                             for c in crafters for s in self.spec.settings for m in self.scope_of(c)],
                            columns=predictors.PAIR_COLUMNS)

    def _write_examples(self, crafters) -> Path | None:
        """The first images of up to 12 sources' sets of the last setting (always kept on disk), or None."""
        spec = self.spec
        example_sets = {c.name: self.adversarial(c, spec.settings[-1], count=False)[:spec.examples].cpu()
                        for c in [c for c in crafters if c.listed_as == "source"][:12]}
        if not example_sets:
            return None
        examples_file = self.out_dir / "examples.safetensors"
        tensors = {"clean": self.clean_images[:spec.examples].cpu()}
        tensors.update({f"adv/{name}": t for name, t in example_sets.items()})
        store.atomic_save_tensors(examples_file, tensors, metadata={
            "attack": spec.settings[-1].name, "eps": str(spec.settings[-1].eps)})
        return examples_file

    def merge(self, record: dict | None = None) -> MatrixResult:
        """Cells, lineage, pairs, examples, sample_set.json and matrix.json from the files the phases wrote
        (anything missing or damaged is computed here, with a warning from the check that found it)."""
        started = time.perf_counter()
        spec = self.spec
        canvas = self.validate()
        sources, targets = self.sources(), self.targets()
        crafters = self.crafters()
        images_u8, labels, index, fingerprint = self.sample_set()
        rows, per_sample, applied_policy = [], {}, {}
        craft_records, eval_records, reference_kinds = {}, {}, {}
        for crafter in crafters:
            applied_policy[crafter.name] = self.policy(crafter)
            for setting in spec.settings:
                set_id = self.set_id(crafter, setting)
                for member in self.scope_of(crafter):
                    metadata, adv_ok, clean_ok = self.evaluate(crafter, setting, member)
                    craft_record, eval_record = json.loads(metadata["craft_numerics"]), json.loads(metadata["eval_numerics"])
                    craft_records.setdefault(crafter.name, craft_record)
                    eval_records.setdefault(member.name, eval_record)
                    reference_kinds[member.name] = metadata["reference_labels"]
                    rows.append(_cell_row(crafter, member, setting, metadata["label_policy"], spec.seed, clean_ok,
                                          adv_ok, set_id, metadata["reference_labels"],
                                          _numerics_label(craft_record), _numerics_label(eval_record)))
                    per_sample[(crafter.name, member.name, setting.name, setting.eps)] = adv_ok
        pairs = self._pairs_table(crafters)
        cells = integer_columns(pd.DataFrame(rows, columns=CELL_COLUMNS))
        lineage = _lineage_tests(sources, targets, spec.settings, per_sample, spec.seed, spec.samples)
        out_dir = self.out_dir
        store.atomic_write_text(out_dir / "pairs.csv", pairs.to_csv(index=False))
        store.atomic_write_text(out_dir / "cells.csv", cells.to_csv(index=False))
        store.atomic_write_text(out_dir / "lineage.csv", lineage.to_csv(index=False))
        examples_file = self._write_examples(crafters)
        store.atomic_write_json(out_dir / "sample_set.json", {
            "dataset": spec.dataset, "canvas": canvas, "samples": spec.samples, "seed": spec.seed,
            "fingerprint": fingerprint, "test_fingerprint": self.ds.fingerprint("test"), "indices": index.tolist(),
        })
        seconds = time.perf_counter() - started
        # A study's merge step passes the totals of its craft and eval steps (each ran in its own process).
        totals = {"crafted": self.crafted, "reused": self.reused, "craft_seconds": round(self.craft_seconds, 3),
                  "eval_seconds": round(self.eval_seconds, 3), **(record or {})}
        store.atomic_write_json(out_dir / "matrix.json", {
            "schema": MATRIX_SCHEMA, "dataset": spec.dataset, "canvas": canvas, "samples": spec.samples,
            "seed": spec.seed, "label_policy": spec.label_policy, "white_box": spec.white_box, "scope": spec.scope,
            # What was actually applied: the policy per crafter, the labels each evaluated model is scored against,
            # and the precision / memory layout of crafting and of scoring (one decision per model: --precision).
            "label_policy_applied": applied_policy,
            "reference_labels": reference_kinds,
            "precision": spec.precision,
            "numerics": {"crafting": craft_records, "evaluation": eval_records},
            "attacks": [{"attack": s.name, "eps": s.eps, "params": s.params} for s in spec.settings],
            "sources": [str(m.run_dir) for m in sources], "targets": [str(m.run_dir) for m in targets],
            "ensembles": [[str(x.run_dir) for x in m.members] for m in self.ensembles()],
            "seconds": round(seconds, 3), "device": str(self.device), "versions": store.versions(),
            "data_provenance": self.ds.provenance, **totals,
        })
        return MatrixResult(out_dir, cells, lineage, totals["crafted"], totals["reused"], seconds, examples_file,
                            {"craft": totals["craft_seconds"], "eval": totals["eval_seconds"]}, pairs)


def _numerics_label(record: dict) -> str:
    return f"{record['precision']}+{record['memory_format']}"


def run_matrix(*, progress: bool = True, craft_fn=None, force: bool = False, **arguments) -> MatrixResult:
    """Craft on every source (and, with ``white_box``, every target), evaluate every model in scope, write tidy
    tables: every phase of :class:`Matrix` in this process. Arguments are :func:`make_spec`'s.

    ``craft_fn`` defaults to :func:`transferlab.attacks.craft`; tests pass a counting wrapper.
    ``force``: replace another matrix's results in ``out_dir`` (otherwise refused: matrix_outputs).
    ``ensembles``: specs like 'pre_a,pre_b' (run names or directories among the sources and targets);
    each is one more crafter, on the mean of its members' logits (transferlab.ensemble).
    """
    started = time.perf_counter()
    spec = make_spec(**arguments)
    check_no_clobber(spec, force)  # before anything is written: another matrix's tables stay whole
    matrix = Matrix(spec, craft_fn)
    matrix.validate()
    crafters = matrix.crafters()
    progress_bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), disable=not progress, console=progress_console())
    with progress_bar:
        task = progress_bar.add_task("attack matrix", total=len(crafters) * len(spec.settings))
        for crafter in crafters:
            for setting in spec.settings:
                progress_bar.update(task, description=f"{setting.name} eps={eps_text(setting.eps)} on {crafter.name}")
                missing = [m for m in matrix.scope_of(crafter) if matrix.load_result(crafter, setting, m) is None]
                if missing:
                    matrix.evaluate_many(crafter, setting, missing, matrix.adversarial(crafter, setting))
                else:
                    matrix.count_reused(crafter, setting)  # every result on this set is already on disk
                progress_bar.advance(task)
    result = matrix.merge()
    result.seconds = time.perf_counter() - started
    return result


def _cell_row(crafter: Member, member: Member, setting: AttackSetting, policy: str, seed: int,
              clean_ok: torch.Tensor, adv_ok: torch.Tensor, set_id: str, reference_labels: str,
              craft_numerics: str, eval_numerics: str) -> dict:
    n = len(clean_ok)
    clean_correct = int(clean_ok.sum())
    adversarial_correct = int(adv_ok.sum())
    # Success counts only samples the evaluated model got right when clean: a miss it already made is no success.
    flipped = int((clean_ok & ~adv_ok).sum())
    low, high = stats.wilson_interval(adversarial_correct, n)
    dataset_info = member.record.dataset
    return {
        "crafted_on": crafter.name, "evaluated": member.name,
        "crafted_on_dataset": crafter.dataset, "evaluated_dataset": member.dataset,
        "crafted_on_model": crafter.family, "evaluated_model": member.family,
        "crafted_on_pretrain_dataset": crafter.pretrain_dataset, "evaluated_pretrain_dataset": member.pretrain_dataset,
        "crafted_on_role": crafter.role, "evaluated_role": member.role,
        "attack": setting.name, "eps": setting.eps, "steps": setting.params.get("steps"),
        "label_policy": policy, "reference_labels": reference_labels, "seed": seed, "samples": n,
        "clean_correct": clean_correct, "clean_accuracy": clean_correct / n,
        "adversarial_correct": adversarial_correct, "adversarial_accuracy": adversarial_correct / n,
        "attack_success_rate": flipped / clean_correct if clean_correct else float("nan"),
        "ci_low": low, "ci_high": high,
        "same_pretraining": _same_pretraining(crafter, member),
        "white_box": crafter.weights_sha256 == member.weights_sha256,
        "evaluated_n": (dataset_info.get("subset") or {}).get("n"),
        "evaluated_freeze": (member.record.freeze or {}).get("n"),
        "attack_params": store.json_compact(setting.params), "adversarial_set": set_id,
        "craft_numerics": craft_numerics, "eval_numerics": eval_numerics,
    }


def _lineage_tests(sources: list[Member], targets: list[Member], settings: list[AttackSetting],
                   per_sample: dict, seed: int, samples: int) -> pd.DataFrame:
    """For each fine-tuned target: own source's examples vs each other source of the same architecture."""
    rows = []
    for target in targets:
        own = next((s for s in sources if s.weights_sha256 == target.source_sha256), None)
        if own is None:
            continue
        others = [s for s in sources if s is not own and s.family == own.family]
        for setting in settings:
            own_ok = per_sample[(own.name, target.name, setting.name, setting.eps)]
            for other in others:
                other_ok = per_sample[(other.name, target.name, setting.name, setting.eps)]
                test = stats.mcnemar_test(own_ok.numpy(), other_ok.numpy())
                diff = stats.paired_difference(own_ok.numpy(), other_ok.numpy())
                rows.append({
                    "finetuned": target.name, "finetuned_model": target.family, "pretrained_from": own.name,
                    "other_pretrained": other.name, "attack": setting.name, "eps": setting.eps, "seed": seed,
                    "samples": samples, "acc_own": int(own_ok.sum()) / len(own_ok),
                    "acc_other": int(other_ok.sum()) / len(other_ok), "difference": diff["difference"],
                    "diff_ci_low": diff["ci_low"], "diff_ci_high": diff["ci_high"],
                    "own_only_correct": test["a_only"], "other_only_correct": test["b_only"],
                    "mcnemar_statistic": test["statistic"], "mcnemar_p": test["p_value"], "method": test["method"],
                })
    return integer_columns(pd.DataFrame(rows, columns=LINEAGE_COLUMNS))
