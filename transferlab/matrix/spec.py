"""What defines an attack matrix: its runs (``Member``), its attack settings and sample set (``MatrixSpec``,
checked and resolved by :func:`make_spec`), and what a whole matrix returns (``MatrixResult``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from transferlab import attacks, data as data_mod, store
from transferlab.config import MATRIX, LabelPolicy, MatrixDefaults, Scope, choice
from transferlab.device import check_precision
from transferlab.errors import UserError
from transferlab.records import RunRecord
from transferlab.runs import DataOptions, check_seed
from transferlab.tables import ROLE_OF_KIND


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


def validate_runs(sources: list[Member], targets: list[Member], dataset_name: str) -> str:
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


@dataclass(frozen=True)
class MatrixRuns:
    """Who takes part in a matrix: source and target run directories, and ensembles of them ('pre_a,pre_b')."""

    sources: list[Path]
    targets: list[Path]
    ensembles: list[str] | None = None


@dataclass(frozen=True)
class AttackRequest:
    """The attacks as asked for, before make_spec resolves them into one AttackSetting per attack and eps:
    steps/alpha come as --steps/--alpha or inside ``options`` (--attack-opt steps=1), not both."""

    names: list[str]
    eps: list[float]
    steps: int | None = None
    alpha: float | None = None
    options: dict | None = None


def make_spec(*, runs: MatrixRuns, dataset: str, attack: AttackRequest, evaluation: MatrixDefaults = MATRIX,
              seed: int = 0, device: str = "auto", data=None, out_dir: Path = Path("results/matrix")) -> MatrixSpec:
    """Check a matrix's arguments (one-line errors) and resolve its attack settings. Of ``evaluation`` it takes
    samples, labels, white_box, scope, batch_size and precision (the attacks come as ``attack``)."""
    label_policy = choice(LabelPolicy, evaluation.labels, "--labels")
    scope = choice(Scope, evaluation.scope, "--scope")
    if not attack.eps:
        raise UserError("no eps given; pass e.g. --eps 0.1,0.2,0.3")
    check_seed(seed)
    for flag, value in (("--batch-size", evaluation.batch_size), ("--samples", evaluation.samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{flag} must be a whole number of at least 1, got {value!r}")
    precision = check_precision(evaluation.precision)
    settings = _attack_settings(attack, seed)
    return MatrixSpec(sources=[Path(p) for p in runs.sources], targets=[Path(p) for p in runs.targets],
                      dataset=data_mod.resolve_name(dataset), settings=settings, samples=evaluation.samples,
                      label_policy=label_policy, seed=seed, device=device, white_box=evaluation.white_box,
                      scope=scope, data=data or DataOptions(), out_dir=Path(out_dir),
                      batch_size=evaluation.batch_size, precision=precision, ensembles=list(runs.ensembles or []))


def _attack_settings(attack: AttackRequest, seed: int) -> list[AttackSetting]:
    """One AttackSetting per attack and eps, its torchattacks parameters resolved."""
    attack_names = [attacks.resolve_attack(a) for a in attack.names]
    steps, alpha = attack.steps, attack.alpha
    # steps/alpha may come as --steps/--alpha or as attack options (--attack-opt steps=1); one of each.
    attack_options = dict(attack.options or {})
    for key, flag in (("steps", steps), ("alpha", alpha)):
        if key in attack_options:
            if flag is not None:
                raise UserError(f"{key} given twice: as --{key} and as the attack option {key}=; keep one")
            if key == "steps":
                steps = attack_options.pop(key)
            else:
                alpha = attack_options.pop(key)
    settings = [AttackSetting(attacks.attack_label(a, p), e, p, attack=a)
                for a in attack_names for e in attack.eps
                for p in [attacks.attack_params(a, e, steps=steps, alpha=alpha, **attack_options)]]
    for setting in settings:
        # A torchattacks class with its own constructor seed (APGD, Square, ...) draws from the matrix's seed,
        # so its randomness varies across a study's seeds like everything else; a seed given as an option stays.
        if "seed" in setting.params and "seed" not in attack_options:
            setting.params["seed"] = seed
    return settings


# run_matrix's flat keyword arguments (the API's and the tests' way of asking) -> make_spec's objects.
_RUNS_KEYS = {"sources": "sources", "targets": "targets", "ensembles": "ensembles"}
_ATTACK_KEYS = {"attack_names": "names", "eps_values": "eps", "steps": "steps", "alpha": "alpha",
                "attack_options": "options"}
_EVALUATION_KEYS = {"samples": "samples", "label_policy": "labels", "white_box": "white_box", "scope": "scope",
                    "batch_size": "batch_size", "precision": "precision"}


def spec_from_keywords(**arguments) -> MatrixSpec:
    """make_spec from flat keyword arguments: sources, targets, ensembles (MatrixRuns); attack_names, eps_values,
    steps, alpha, attack_options (AttackRequest); samples, label_policy, white_box, scope, batch_size,
    precision (MatrixDefaults); and make_spec's own dataset, seed, device, data and out_dir."""
    def take(keys: dict) -> dict:
        return {field_name: arguments.pop(key) for key, field_name in keys.items() if key in arguments}

    runs, attack = MatrixRuns(**take(_RUNS_KEYS)), AttackRequest(**take(_ATTACK_KEYS))
    evaluation = MatrixDefaults(**take(_EVALUATION_KEYS))
    return make_spec(runs=runs, attack=attack, evaluation=evaluation, **arguments)
