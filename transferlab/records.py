"""run.json as a type: what a finished run records, written once (inside the run's staging folder, with the
study's step key when a study ran it) and read back by everything that uses a run.

The nested parts (model, dataset, freeze, lineage ...) stay plain JSON objects: they are written by one
function each and read by name, and their keys are documented where they are built (runs.py). The top level is
typed, so a missing or misspelt key is an error where a record is made, not a KeyError in a report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from transferlab.errors import UserError

RUN_SCHEMA = 1
RUN_KINDS = ("pretrain", "finetune", "scratch", "imported", "in-memory",
             "ensemble")  # an attack matrix's member standing for several runs; never written as a run.json
# Keys a record carries only when they apply (a study's step key, an import's weights file ...).
_OPTIONAL = ("files_sha256", "step_key", "step_id", "worker", "imported_from", "note", "numerics", "epochs",
             "train_seconds", "duration_s", "images_per_second", "device", "device_name", "git_commit", "created",
             "frozen_prefix")


@dataclass
class RunRecord:
    kind: str  # one of RUN_KINDS
    name: str
    model: dict  # family, config (what rebuilds the architecture), parameters
    dataset: dict  # name, canvas, num_classes, label_space, subset, fingerprints, provenance
    seed: int | None
    freeze: dict  # n, to, bn_stats, head_replaced, frozen_names ...
    lineage: dict  # pretrain_dataset, pretrain_label_space, pretrain_run (None for scratch)
    source: dict | None = None  # the run this one was fine-tuned from, with its weights hash
    metrics: dict = field(default_factory=dict)  # train_accuracy, test_accuracy (val_accuracy)
    hyperparameters: dict = field(default_factory=dict)  # TrainConfig.to_dict()
    history: list = field(default_factory=list)  # one record per epoch
    versions: dict = field(default_factory=dict)
    numerics: dict | None = None  # the precision and layout it trained with (device.Numerics.record)
    epochs: dict | None = None  # asked, used, min_steps, steps
    # Which forward path trained it and why: "prefix cache" (the frozen prefix's activations computed once,
    # the tail trained on them) or "full forward" (transferlab.prefix.Decision.record)
    frozen_prefix: dict | None = None
    train_seconds: float | None = None
    duration_s: float | None = None
    images_per_second: float | None = None
    device: str | None = None
    device_name: str | None = None
    git_commit: str | None = None
    created: str | None = None
    step_key: str | None = None  # the study step that made it (transferlab run): done means this key
    step_id: str | None = None
    worker: dict | None = None  # executor, host, node: where it ran
    imported_from: dict | None = None  # transferlab import: the weights file and its sha256
    files_sha256: dict | None = None  # sha256 of each file of the run directory (store.save_run), checked on load
    note: str | None = None
    schema: int = RUN_SCHEMA

    def __post_init__(self):
        if self.kind not in RUN_KINDS:
            raise ValueError(f"run kind {self.kind!r} is not one of {RUN_KINDS}")

    # ---- what readers ask of a run
    @property
    def family(self) -> str:
        return self.model["family"]

    @property
    def label_space(self) -> str:
        return self.dataset["label_space"]

    @property
    def pretrain_dataset(self) -> str | None:
        return (self.lineage or {}).get("pretrain_dataset")

    @property
    def source_sha256(self) -> str | None:
        """The weights hash of the run this one was fine-tuned from (None for pretrain, scratch, imported)."""
        return (self.source or {}).get("weights_sha256")

    # ---- JSON
    def to_json(self) -> dict:
        data = asdict(self)
        return {key: value for key, value in data.items() if value is not None or key not in _OPTIONAL}

    @classmethod
    def from_json(cls, data: dict, where: str = "run.json") -> "RunRecord":
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{key: value for key, value in data.items() if key in known})
        except (TypeError, ValueError) as exc:
            raise UserError(f"{where} is not a transferlab run record ({exc}); train the run again") from None
