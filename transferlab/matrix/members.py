"""The shared state of one attack matrix: its members (runs, loaded when a phase needs them), the sample set
every cell shares, each model with its numerics, the frozen-prefix cut of fine-tunes (shared-prefix evaluation)
and each evaluated model's clean predictions. The phases (crafting, evaluation, pairs, merge) build on it."""

from __future__ import annotations

import collections
from pathlib import Path

import torch

from transferlab import attacks, data as data_mod, ensemble, prefix, store
from transferlab.device import Numerics, choose_numerics, predict, resolve_device, to_float
from transferlab.errors import UserError
from transferlab.matrix.spec import Member, MatrixSpec, validate_runs
from transferlab.records import RunRecord


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


class Kept:
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


# Clean predictions are one int64 each.
_CLEAN_PREDICTIONS = Kept(64)
# Each fine-tune's eval-mode cut at its frozen tensors (or None), keyed by weights and numerics: tracing costs
# more than an eval step's forward passes on small sets, and every eval step of a study asks again.
_SPLITS = Kept(32)


class MatrixCore:
    """One attack matrix on disk, the state every phase shares: each phase reads what it needs, writes its own files.

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
        canvas = validate_runs(self.sources(), self.targets(), self.spec.dataset)
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
