"""The two training steps of a study: pretrain a source, fine-tune it (or train from scratch).

Each step loads its data, builds or loads a model, trains it with the engine, measures
train and test accuracy and writes one finished run directory (see ``store.save_run``).
The run.json records everything needed to rebuild, audit and reproduce the run.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from transferlab import data as data_mod
from transferlab import model_sources, names, store
from transferlab.device import device_name
from transferlab.errors import UserError
from transferlab.models import create_model, freeze, freeze_count_for, parameter_table, set_train_mode
from transferlab.records import RunRecord
from transferlab.tracking import LOG_DIR, Tracker, check_targets as check_log_targets
from transferlab.training import FitHooks, TrainConfig, accuracy, fit, resolve_device

DEFAULT_RUNS_DIR = Path("results") / "runs"


@dataclass
class DataOptions:
    """Where data comes from; shared by every command that loads a dataset."""

    data_dir: Path | None = None
    download: bool = True
    cache_dir: Path | None = None


@dataclass(frozen=True)
class RunOutput:
    """Where and how a run is written; shared by pretrain, finetune and import."""

    out_dir: Path = DEFAULT_RUNS_DIR
    name: str | None = None  # None: the name made from the run's settings (pretrain_name, finetune_name)
    progress: bool = True
    overwrite: bool = False  # replace a finished run of other settings under the same name
    record: dict | None = None  # extra run.json fields (a study's step key), written in the run's one write
    log: tuple[str, ...] = ()  # trackers that mirror the per-epoch metrics under out_dir/logs/NAME


@dataclass(frozen=True)
class PretrainRequest:
    """The model and the data of a source run: what pretrain builds and trains it on."""

    model: str  # a family of the zoo, or an outside model (timm:..., hf:...)
    dataset: str
    options: dict | None = None  # the family's options (layer sizes, dropout, ...)
    n: int | None = None  # a stratified subset of the training split; None: all of it
    canvas: str = data_mod.DEFAULT_CANVAS


@dataclass(frozen=True)
class FinetuneRequest:
    """The model and the data of a target run: a source run fine-tuned with its first tensors frozen, or (with
    ``model`` instead of ``source``) the same subset trained from scratch."""

    dataset: str
    source: Path | None = None  # the source run's folder
    model: str | None = None  # from scratch: a family, with its ``options``
    options: dict | None = None
    n: int | None = None
    freeze_n: int | None = None  # freeze the first N tensors (None: 0) ...
    freeze_to: str | None = None  # ... or everything up to and including this named tensor
    canvas: str | None = None  # None: the source run's canvas (from scratch: the default canvas)


@dataclass(frozen=True)
class _Training:
    """One run as pretrain or finetune resolved it, ready to train: its model, data and lineage."""

    kind: str
    name: str
    model: torch.nn.Module
    dataset: data_mod.Dataset
    n: int | None
    seed: int
    source: dict | None
    freeze_record: dict


@dataclass
class RunOutcome:
    run_dir: Path
    info: dict = field(default_factory=dict)

    def summary(self) -> str:
        if self.info.get("kind") == "imported":
            d = self.info["dataset"]
            return (f"{self.info['name']}: {self.info['model']['family']}, {d['num_classes']} classes of label "
                    f"space {d['label_space']}, on canvas {d['canvas']} -> {self.run_dir}")
        m = self.info["metrics"]
        # Both in eval mode, after training: the progress bar's running accuracy (train mode, during the epoch) differs.
        return (f"{self.info['name']}: accuracy (eval mode) on the train split {m['train_accuracy']:.2%}, on the "
                f"test split {m['test_accuracy']:.2%} "
                f"in {self.info['duration_s']:.1f}s ({self.info['images_per_second']:,.0f} img/s on "
                f"{self.info['device']}) -> {self.run_dir}")


def _slug(text: str) -> str:
    return names.slug(text)


def pretrain_name(model: str, dataset: str, seed: int, n: int | None = None) -> str:
    return names.run_name("pretrain", _slug(model), seed, dataset, "" if n is None else n)


def finetune_name(source_info: dict | None, model: str, dataset: str, n: int | None, freeze_n: int, seed: int) -> str:
    """``final_<source run>_<dataset><n>_f<freeze>_s<seed>`` or ``scratch_<model>_<dataset><n>_s<seed>``.

    The source run's own name (less its ``pre_`` prefix, and its ``_s<seed>`` suffix when that equals
    this seed) is part of the name, so fine-tunes of two different sources never share a directory:
    pre_resnet_fmnist2000_s0 -> final_resnet_fmnist2000_mnist1000_f23_s0."""
    size = "" if n is None else n
    if source_info is None:
        return names.run_name("scratch", _slug(model), seed, dataset, size)
    source = source_info["name"]
    source = source[len("pre_"):] if source.startswith("pre_") else source
    source = source[: -len(f"_s{seed}")] if source.endswith(f"_s{seed}") else source
    source = re.sub(r"[^A-Za-z0-9._-]+", "-", source).strip("-")
    return names.run_name("finetune", source, seed, dataset, size, f"f{freeze_n}")


def _identity(kind: str, model_config: dict, dataset: str, n: int | None, seed: int, freeze_n: int,
              source_sha256: str | None, config: dict) -> dict:
    """What makes two runs the same run: re-running it may replace it, anything else may not."""
    return json.loads(store.json_compact({
        "kind": kind, "model": model_config, "dataset": dataset, "n": n, "seed": seed, "freeze": freeze_n,
        "source": source_sha256, "hyperparameters": config}))


def _refuse_overwrite(run_dir: Path, identity: dict, overwrite: bool) -> None:
    if overwrite or not store.is_finished_run(run_dir):
        return
    try:
        info = store.read_run_info(run_dir)
        existing = _identity(info.get("kind"), info["model"]["config"], info["dataset"]["name"],
                             info["dataset"]["subset"]["n"], info["seed"], info["freeze"]["n"],
                             (info.get("source") or {}).get("weights_sha256"), info["hyperparameters"])
    except (UserError, KeyError, TypeError):
        existing = None
    if existing != identity:
        changed = sorted(k for k in identity if existing is None or existing.get(k) != identity[k])
        raise UserError(f"{run_dir} already holds a different finished run (differs in: {', '.join(changed)}); "
                        f"give another --name or --out, or pass --force to replace it")


MAX_SEED = 2**63 - 1  # torch.manual_seed's limit


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}")


def _check_val_fraction(config: TrainConfig, dataset: data_mod.Dataset, n: int | None) -> None:
    """A held-out share must leave at least one batch of training images (and one validation image)."""
    if not config.val_fraction:
        return
    size = n if n is not None else len(dataset.train)
    held = max(int(round(size * config.val_fraction)), dataset.spec.num_classes)  # as training.fit holds out
    if size - held < 1:
        raise UserError(f"--val-fraction {config.val_fraction} of {size} training images leaves "
                        f"{size - held} to train on and {held} to validate; use a fraction that keeps both")


def _subset(dataset: data_mod.Dataset, n: int | None, seed: int):
    """The (possibly subsetted) training split and the chosen indices (None for all)."""
    if n is None:
        return dataset.train.images, dataset.train.labels, None
    indices = data_mod.stratified_subset(dataset.train.labels, n, seed)
    return dataset.train.images[indices], dataset.train.labels[indices], indices


def _dataset_record(dataset: data_mod.Dataset, n: int | None, seed: int, indices) -> dict:
    return {
        "name": dataset.spec.name,
        "canvas": dataset.canvas.name,
        "num_classes": dataset.spec.num_classes,
        "label_space": dataset.spec.label_space,
        "train_size": len(dataset.train),
        "test_size": len(dataset.test),
        "fingerprint_train": dataset.fingerprint("train"),
        "fingerprint_test": dataset.fingerprint("test"),
        "subset": {"n": n, "seed": seed, "indices_file": "subset_indices.json" if indices is not None else None},
        "provenance": dataset.provenance,
    }


def _train_and_save(job: _Training, config: TrainConfig, device: torch.device, output: RunOutput) -> RunOutcome:
    kind, name, model, dataset, n, seed = job.kind, job.name, job.model, job.dataset, job.n, job.seed
    source, freeze_record, out_dir = job.source, job.freeze_record, output.out_dir
    images, labels, indices = _subset(dataset, n, seed)
    run_dir = Path(out_dir) / name
    started = time.perf_counter()
    mode = (lambda m: set_train_mode(m, config.bn_stats))
    # Dropout and other in-model randomness draw from the global generator: seed it per run, so a run's
    # numbers never depend on what ran before it in the same process (a resumed study equals a clean one).
    torch.manual_seed(seed)
    params = {"kind": kind, "model": model.family, "dataset": dataset.spec.name, "n": n, "seed": seed,
              "freeze": freeze_record["n"], "source": (source or {}).get("name"), **config.to_dict()}
    with Tracker(output.log, Path(out_dir) / LOG_DIR, name, params) as tracker:
        result = fit(model, images, labels, config, device, seed=seed, progress=output.progress,
                     hooks=FitHooks(description=name, set_train_mode=mode, on_epoch=tracker.log_epoch))
    # A run whose weights diverged would be saved and then refused by every later command: stop here instead.
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise UserError(f"training of {name} diverged: {len(bad)} weight tensors are NaN or infinite (first: "
                        f"{bad[0]}); lower --lr (now {config.lr:g}) or use another --optimizer")
    train_accuracy = (result.fit_images_accuracy if result.fit_images_accuracy is not None
                      else accuracy(model, images, labels, device, config.eval_batch_size, result.numerics))
    test_accuracy = accuracy(model, dataset.test.images, dataset.test.labels, device, config.eval_batch_size,
                             result.numerics)
    metrics = {"train_accuracy": train_accuracy, "test_accuracy": test_accuracy}
    if result.history and "val_accuracy" in result.history[-1]:
        metrics["val_accuracy"] = result.history[-1]["val_accuracy"]
    model_record = {"family": model.family, "config": model.config,
                    "parameters": sum(p.numel() for p in model.parameters())}
    run = RunRecord(
        kind=kind, name=name, model=model_record, dataset=_dataset_record(dataset, n, seed, indices), source=source,
        lineage={"pretrain_dataset": source["dataset"] if source else dataset.spec.name,
                 "pretrain_label_space": source["label_space"] if source else dataset.spec.label_space,
                 "pretrain_run": source["name"] if source else name} if kind != "scratch" else
                {"pretrain_dataset": None, "pretrain_label_space": None, "pretrain_run": None},
        freeze=freeze_record, seed=seed, hyperparameters=config.to_dict(),
        numerics=result.numerics.record(),  # what precision "auto" chose here: rerun with it for the same numbers
        frozen_prefix=result.frozen_prefix or None,
        epochs={"asked": result.epochs_asked, "used": result.epochs_used, "min_steps": config.min_steps,
                "steps": result.steps},
        metrics=metrics, history=result.history, train_seconds=round(result.seconds, 3),
        duration_s=round(time.perf_counter() - started, 3), images_per_second=round(result.images_per_second, 1),
        device=str(device), device_name=device_name(device), versions=store.versions(), git_commit=store.git_commit(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(output.record or {}),  # a study's step key, in run.json from its one write (a kill cannot split them)
    )
    info = run.to_json()
    extra = {}
    if indices is not None:
        extra["subset_indices.json"] = indices.tolist()
    if result.val_indices is not None:
        extra["val_indices.json"] = result.val_indices.tolist()
    store.save_run(run_dir, model.cpu(), info, extra)
    return RunOutcome(run_dir, info)


def pretrain(request: PretrainRequest, *, config: TrainConfig | None = None, seed: int = 0, device: str = "auto",
             data: DataOptions | None = None, output: RunOutput = RunOutput()) -> RunOutcome:
    """Train a source model from scratch on ``request.dataset`` and save it as a run (``output``: where and how)."""
    model, dataset, options, n = request.model, request.dataset, request.options, request.n
    config = (config or TrainConfig()).validate()
    data = data or DataOptions()
    check_seed(seed)
    if output.name is not None:
        names.check_name(output.name, "--name")
    torch_device = resolve_device(device)
    out_dir = output.out_dir
    store.ensure_writable_dir(out_dir)
    check_log_targets(output.log, out_dir)
    ds = data_mod.load(dataset, canvas=request.canvas, data_dir=data.data_dir, download=data.download,
                       cache_dir=data.cache_dir)
    _check_val_fraction(config, ds, n)
    images, _, _ = _subset(ds, n, seed)
    mean, std = data_mod.channel_stats(images)
    torch.manual_seed(seed)
    net = create_model(model, num_classes=ds.spec.num_classes, in_channels=ds.canvas.channels,
                       image_size=ds.canvas.size, mean=mean, std=std, **(options or {}))
    name = names.check_name(output.name or pretrain_name(model, ds.spec.name, seed, n), "run name")
    store.check_replaceable_run(Path(out_dir) / name, name)  # never a user's folder, even with --force
    _refuse_overwrite(Path(out_dir) / name, _identity("pretrain", net.config, ds.spec.name, n, seed, 0, None,
                                                      config.to_dict()), output.overwrite)
    freeze_record = {"n": 0, "to": None, "bn_stats": config.bn_stats, "head_replaced": False,
                     "trainable_tensors": len(parameter_table(net))}
    job = _Training("pretrain", name, net, ds, n, seed, source=None, freeze_record=freeze_record)
    return _train_and_save(job, config, torch_device, output)


def finetune(request: FinetuneRequest, *, config: TrainConfig | None = None, seed: int = 0, device: str = "auto",
             data: DataOptions | None = None, output: RunOutput = RunOutput()) -> RunOutcome:
    """Fine-tune a pretrained run on ``request.dataset`` (or, with ``model``, train the same subset from scratch)."""
    dataset, source, model, options, n = request.dataset, request.source, request.model, request.options, request.n
    freeze_n, freeze_to, canvas = request.freeze_n, request.freeze_to, request.canvas
    _check_finetune_request(source, model, freeze_n, freeze_to, seed, output.name)
    config = (config or TrainConfig()).validate()
    data = data or DataOptions()
    torch_device = resolve_device(device)
    out_dir = output.out_dir
    store.ensure_writable_dir(out_dir)
    check_log_targets(output.log, out_dir)

    net, source_info, canvas = _source_model(source, canvas) if source is not None else (None, None, canvas)
    ds = data_mod.load(dataset, canvas=canvas or data_mod.DEFAULT_CANVAS, data_dir=data.data_dir,
                       download=data.download, cache_dir=data.cache_dir)
    _check_val_fraction(config, ds, n)
    if source is None:
        net = _scratch_model(model, options, ds, n, seed)
    elif options:
        raise UserError("model options come from the source run when fine-tuning; drop them or use --model")
    freeze_n = freeze_count_for(net, freeze_to) if freeze_to is not None else (freeze_n or 0)
    freeze_record = _freeze_for_target(net, freeze_n, freeze_to, config, ds, seed, source_info)
    source_record = _source_record(Path(source), source_info, net.family) if source_info is not None else None
    name = names.check_name(output.name or finetune_name(source_info, net.family, ds.spec.name, n, freeze_n, seed),
                            "run name")
    store.check_replaceable_run(Path(out_dir) / name, name)  # never a user's folder, even with --force
    kind = "finetune" if source_info else "scratch"
    _refuse_overwrite(Path(out_dir) / name, _identity(kind, net.config, ds.spec.name, n, seed, freeze_n,
                                                      (source_record or {}).get("weights_sha256"),
                                                      config.to_dict()), output.overwrite)
    job = _Training(kind, name, net, ds, n, seed, source=source_record, freeze_record=freeze_record)
    return _train_and_save(job, config, torch_device, output)


def _check_finetune_request(source, model, freeze_n, freeze_to, seed: int, name: str | None) -> None:
    if (source is None) == (model is None):
        raise UserError("give exactly one of --from RUN_DIR (fine-tune a source) or --model NAME (from scratch)")
    if freeze_n is not None and freeze_to is not None:
        raise UserError("give --freeze N or --freeze-to NAME, not both")
    check_seed(seed)
    if name is not None:
        names.check_name(name, "--name")


def _source_model(source: Path, canvas: str | None):
    """The source run's model (its weights verified), its run.json and the canvas to fine-tune on (its own)."""
    net, source_info = store.load_run(Path(source))
    source_canvas = source_info["dataset"]["canvas"]
    if canvas is not None and canvas != source_canvas:
        raise UserError(f"source {source} was trained on canvas {source_canvas} but --canvas {canvas} was given; "
                        f"fine-tune on the source's canvas (drop --canvas)")
    return net, source_info, source_canvas


def _scratch_model(model: str, options: dict | None, ds, n: int | None, seed: int):
    """A new model for a from-scratch run, normalised by its own training subset's statistics."""
    images, _, _ = _subset(ds, n, seed)
    mean, std = data_mod.channel_stats(images)
    torch.manual_seed(seed)
    return create_model(model, num_classes=ds.spec.num_classes, in_channels=ds.canvas.channels,
                        image_size=ds.canvas.size, mean=mean, std=std, **(options or {}))


def _freeze_for_target(net, freeze_n: int, freeze_to: str | None, config: TrainConfig, ds, seed: int,
                       source_info: dict | None) -> dict:
    """Freeze the first ``freeze_n`` tensors (range checked) and give the target's class count a new classifier;
    return run.json's ``freeze`` record."""
    freeze(net, freeze_n)  # validates the range
    # A different class count needs a new classifier; it must learn even where --freeze covers it.
    head_replaced = net.config["num_classes"] != ds.spec.num_classes
    if head_replaced:
        torch.manual_seed(seed)
        net.reset_classifier(ds.spec.num_classes)
        for p in net.get_classifier().parameters():
            p.requires_grad_(True)
    table = parameter_table(net)
    return {
        "n": freeze_n, "to": freeze_to, "bn_stats": config.bn_stats, "head_replaced": head_replaced,
        "head_replaced_from": source_info["model"]["config"]["num_classes"] if head_replaced else None,
        "trainable_tensors": sum(row["trainable"] for row in table),
        "frozen_names": [row["name"] for row in table if not row["trainable"]],
    }


def _source_record(source: Path, source_info: dict, family: str) -> dict:
    return {"run": str(source.resolve()), "name": source_info["name"],
            "dataset": source_info["dataset"]["name"], "label_space": source_info["dataset"]["label_space"],
            "model": family, "metrics": source_info["metrics"],
            "weights_sha256": store.file_sha256(source / store.WEIGHTS_FILE)}


def import_name(model: str, label_space: str) -> str:
    return f"imported_{_slug(model)}_{_slug(label_space)}"


def import_pretrained(*, model: str, label_space: str, num_classes: int, options: dict | None = None,
                      canvas: str = data_mod.DEFAULT_CANVAS, mean=None, std=None,
                      output: RunOutput = RunOutput()) -> RunOutcome:
    """Make a run of a model pretrained elsewhere (an ImageNet ViT from a local safetensors file, say), without
    training it, so that it can be a source: ``finetune --from`` it (lineage and the own-source question then
    work as for any pretrained run) and attack it in a matrix (its label space is its own, so the attack moves
    away from its predictions). ``mean``/``std``: the pixel statistics its weights were trained with. Of
    ``output`` it uses the folder, the name and overwrite (nothing is trained: no progress, log or record)."""
    options = dict(options or {})
    out_dir, name = output.out_dir, output.name
    label_space = str(label_space).strip()
    if not label_space:
        raise UserError("--label-space is empty; name the classes the model predicts, e.g. imagenet")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise UserError(f"--classes must be a whole number of at least 2, got {num_classes!r}")
    if not model_sources.is_external(model):
        raise UserError(f"{model!r} is a zoo family: train it with 'transferlab pretrain'; import takes models "
                        "from elsewhere (module.path:factory, torchvision:NAME or timm:NAME with -o weights=FILE)")
    library = str(model).partition(":")[0]
    if library in ("torchvision", "timm") and not options.get("weights"):
        raise UserError(f"importing {model} needs its pretrained weights: -o weights=FILE.safetensors "
                        "(runs never fetch from a hub)")
    if name is not None:
        names.check_name(name, "--name")
    store.ensure_writable_dir(out_dir)
    c = data_mod.get_canvas(canvas)
    torch.manual_seed(0)  # a factory that draws random numbers builds the same module every time
    net = create_model(model, num_classes=num_classes, in_channels=c.channels, image_size=c.size, mean=mean,
                       std=std, **options)
    name = names.check_name(name or import_name(model, label_space), "run name")
    run_dir = Path(out_dir) / name
    store.check_replaceable_run(run_dir, name)
    weights = options.get("weights")
    imported_from = ({"file": str(Path(weights).resolve()), "sha256": store.file_sha256(Path(weights))}
                     if weights else {"file": None, "sha256": None, "note": f"built by {model}"})
    _refuse_overwrite(run_dir, _identity("imported", net.config, label_space, None, None, 0,
                                         imported_from["sha256"], {}), output.overwrite)
    info = RunRecord(
        kind="imported", name=name,
        model={"family": net.family, "config": net.config, "parameters": sum(p.numel() for p in net.parameters())},
        dataset={"name": label_space, "canvas": c.name, "num_classes": num_classes, "label_space": label_space,
                 "subset": {"n": None}},
        imported_from=imported_from,
        lineage={"pretrain_dataset": label_space, "pretrain_label_space": label_space, "pretrain_run": name},
        freeze={"n": 0}, seed=None, versions=store.versions(), git_commit=store.git_commit(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    ).to_json()
    store.save_run(run_dir, net.cpu(), info)
    return RunOutcome(run_dir, info)
