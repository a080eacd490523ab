"""The Python API: the CLI's commands as functions, returning Python objects (runs, DataFrames).

Arguments and defaults mirror the CLI's options (``--batch-size`` is ``batch_size``, ``-o KEY=VALUE`` is
``options={"KEY": VALUE}``, ``--from`` is ``source``); the CLI is a thin layer over these functions, so a
notebook and a shell get the same runs and the same tables. Defaults come from transferlab/config.py.

Imports of torch-backed modules sit inside the functions, on purpose: ``import transferlab`` and
``transferlab --help`` load this module, and torch alone takes 2.7 s to import on a 2-core machine (the
CLI's help takes 0.16 s). Everything else in the package imports at the top.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from transferlab.arguments import checked, with_settings
from transferlab.config import MATRIX, RUNS_DIR, MatrixDefaults, StepResources, TrainConfig
from transferlab.errors import UserError, UserValueError
from transferlab.records import RunRecord

if TYPE_CHECKING:  # torch and pandas load lazily, so `import transferlab` (and the CLI's --help) stays quick
    import pandas as pd
    import torch

DEFAULT_RUNS_DIR = RUNS_DIR
DEFAULT_MATRIX_DIR = MATRIX.out


@dataclass
class Run:
    """A finished training run: its run.json (``config``), metrics and model (eval mode, on ``device``).

    The model is loaded on first use, so ``pretrain`` and ``finetune`` (and the CLI over them) hand back a
    run without reading its weights again."""

    path: Path
    config: dict
    metrics: dict
    device: str = "cpu"
    _model: object = field(default=None, repr=False, compare=False)

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            from transferlab.store import load_run as _load

            self._model, _ = _load(self.path, device=self.device)
            self._model.eval()
        return self._model

    @property
    def name(self) -> str:
        return self.config["name"]

    def summary(self) -> str:
        """The line ``transferlab pretrain`` / ``finetune`` prints."""
        from transferlab.runs import RunOutcome

        return RunOutcome(self.path, self.config).summary()


@dataclass
class MatrixTables:
    """An attack matrix's tidy tables; ``out`` is where they were written (None when nothing was)."""

    cells: pd.DataFrame
    lineage: pd.DataFrame
    pairs: pd.DataFrame | None = None
    out: Path | None = None
    summary: str = ""  # the line ``transferlab attack-matrix`` prints (cells, sets crafted and reused, time)


def _data_options(data_dir, download: bool):
    from transferlab.runs import DataOptions

    return DataOptions(data_dir=Path(data_dir) if data_dir is not None else None, download=download)


def _trust(trust_code: bool) -> None:
    """``trust_code=True``: import module:factory code named in run.json and study files, from now on in this
    process (transferlab.model_sources: the trust model)."""
    if trust_code:
        from transferlab.model_sources import trust_code as allow_code  # lazy: import cost

        allow_code()


@checked
def load_run(path: str | Path, device: str = "cpu", trust_code: bool = False) -> Run:
    """Load a run directory made by ``pretrain`` / ``finetune`` (safetensors weights; nothing is unpickled)."""
    from transferlab.store import load_run as _load

    _trust(trust_code)

    model, info = _load(Path(path), device=device)
    model.eval()
    return Run(path=Path(path), config=info, metrics=dict(info.get("metrics", {})), device=device, _model=model)


def _finished(outcome) -> Run:
    return Run(path=outcome.run_dir, config=outcome.info, metrics=dict(outcome.info.get("metrics", {})))


@with_settings(TrainConfig, "pretrain")
def pretrain(*, model: str, dataset: str, options: dict | None = None, n: int | None = None,
             train: TrainConfig | None = None, canvas: str = "gray28", seed: int = 0, device: str = "auto",
             data_dir: str | Path | None = None, download: bool = True, out: str | Path = DEFAULT_RUNS_DIR,
             name: str | None = None, force: bool = False, progress: bool = False,
             log: str | list[str] | tuple[str, ...] | None = None) -> Run:
    """Train a source model from scratch (``transferlab pretrain``); return the saved run.

    Every training setting (config.TrainConfig: ``epochs``, ``lr``, ``optimizer``, ...) is a keyword argument
    with the CLI option's default; ``train=TrainConfig(...)`` passes them as one object (keywords override it).
    ``min_steps`` (``--min-steps``; None: the default budget of DEFAULT_MIN_STEPS) raises ``epochs`` on small
    data until training makes that many optimizer steps; ``min_steps=0`` trains exactly ``epochs``.
    ``log``: "csv", "tensorboard" and/or "mlflow" (a name or a list) mirrors the per-epoch metrics there."""
    from transferlab.runs import PretrainRequest, RunOutput, pretrain as _pretrain

    output = RunOutput(out_dir=Path(out), name=name, progress=progress, overwrite=force, log=_log_targets(log))
    outcome = _pretrain(PretrainRequest(model=model, dataset=dataset, options=options or {}, n=n, canvas=canvas),
                        config=train, seed=seed, device=device, data=_data_options(data_dir, download), output=output)
    return _finished(outcome)


@with_settings(TrainConfig, "finetune")
def finetune(*, dataset: str, source: str | Path | Run | None = None, model: str | None = None,
             options: dict | None = None, n: int | None = None, freeze: int | None = None,
             freeze_to: str | None = None, train: TrainConfig | None = None, canvas: str | None = None,
             seed: int = 0, device: str = "auto", data_dir: str | Path | None = None, download: bool = True,
             out: str | Path = DEFAULT_RUNS_DIR, name: str | None = None, force: bool = False,
             progress: bool = False, log: str | list[str] | tuple[str, ...] | None = None,
             trust_code: bool = False) -> Run:
    """Fine-tune a pretrained run (``source``: a run directory or a ``Run``) on ``dataset``, or with ``model``
    train the same subset from scratch (``transferlab finetune``); return the saved run. Training settings as
    in ``pretrain``, plus ``bn_stats``."""
    from transferlab.runs import FinetuneRequest, RunOutput, finetune as _finetune

    _trust(trust_code)
    if isinstance(source, Run):
        source = source.path
    request = FinetuneRequest(dataset=dataset, source=Path(source) if source is not None else None, model=model,
                              options=options or {}, n=n, freeze_n=freeze, freeze_to=freeze_to, canvas=canvas)
    outcome = _finetune(request, config=train, seed=seed, device=device, data=_data_options(data_dir, download),
                        output=RunOutput(out_dir=Path(out), name=name, progress=progress, overwrite=force,
                                         log=_log_targets(log)))
    return _finished(outcome)


@checked
def import_run(*, model: str, label_space: str, classes: int, options: dict | None = None, canvas: str = "gray28",
               mean: list[float] | tuple[float, ...] | None = None, std: list[float] | tuple[float, ...] | None = None,
               out: str | Path = DEFAULT_RUNS_DIR, name: str | None = None, force: bool = False) -> Run:
    """A model pretrained elsewhere as a source run, without training (``transferlab import``): e.g.
    ``import_run(model="timm:vit_base_patch16_224", options={"weights": "vit.safetensors", "resize": 224},
    label_space="imagenet", classes=1000, canvas="rgb32", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])``.
    Fine-tune from it with ``finetune(source=run, ...)``; attack it in ``attack_matrix``."""
    from transferlab.runs import RunOutput, import_pretrained

    outcome = import_pretrained(model=model, label_space=label_space, num_classes=classes, options=options,
                                canvas=canvas, mean=mean, std=std,
                                output=RunOutput(out_dir=Path(out), name=name, overwrite=force))
    return _finished(outcome)


def _log_targets(log) -> tuple[str, ...]:
    from transferlab.cli_args import split_list
    from transferlab.tracking import check_targets

    split_list(log, "--log")  # --log '' is a mistake, not "no logging"

    return check_targets(log)


def _run_paths(items, role: str) -> list[Path]:
    """Run directories from paths and ``Run`` objects (a dict of in-memory modules is handled by the caller)."""
    if items is None:
        return []
    if isinstance(items, (str, Path, Run)):
        items = [items]
    paths = []
    for item in items:
        if isinstance(item, Run):
            paths.append(item.path)
        elif isinstance(item, (str, Path)):
            paths.append(Path(item))
        else:
            raise UserError(f"{role}: {type(item).__name__} is neither a run directory nor a Run; pass in-memory "
                            f"models as a dict, {role}={{'name': module}}")
    return paths


# ------------------------------------------------------------------ in-memory models for attack_matrix
# An nn.Module handed to attack_matrix is saved as a run directory under OUT/in-memory/NAME (its weights in
# safetensors and a run.json, like any run: the matrix, its caches and its provenance then work unchanged).
# Its architecture cannot be written down, so the run's model source is this factory, which hands back a copy
# of the module registered for the duration of the call; in another process the run does not reload (one-line
# error), which is what "the same code must be importable" means for a module that exists only in memory.
IN_MEMORY_FACTORY = "transferlab.api:_in_memory_model"
IN_MEMORY_DIR = "in-memory"
_IN_MEMORY: dict = {}


def _in_memory_model(num_classes: int, in_channels: int, image_size: int, handle: str):
    import copy

    module = _IN_MEMORY.get(handle)
    if module is None:
        raise UserError(f"in-memory model {handle!r} lived only in the Python session that passed it to "
                        "transferlab.attack_matrix; pass the module again, or save it as a run "
                        "(transferlab.pretrain / finetune with model='module.path:factory')")
    try:
        return copy.deepcopy(module).cpu().eval()
    except Exception as exc:  # noqa: BLE001 - a module that cannot be copied: say which and why
        raise UserError(f"in-memory model {handle!r} cannot be copied ({type(exc).__name__}: {exc})") from None


def _label_space_record(space: str) -> tuple[str, str, int | None]:
    """(dataset name, label space, classes) for a label space given as a dataset name ("kmnist", "npz:DIR") or
    as the name of a label space ("digits"; any other name is a label space of its own, e.g. "imagenet")."""
    from transferlab import data as data_mod

    space = str(space)
    try:
        spec = data_mod.get_spec(space)
    except UserError:
        spec = None
    if spec is not None:
        return spec.name, spec.label_space, spec.num_classes
    known = next((d for d in data_mod.list_datasets() if d.label_space == space), None)
    return (known.name if known else space), space, (known.num_classes if known else None)


def _probe_logits(module, role: str, name: str, canvas) -> int:
    """The number of logits an in-memory module gives for two blank images on ``canvas``; one line if it fails."""
    import torch

    c = canvas
    try:
        with torch.no_grad():
            was_training = module.training
            probe = module.eval()(torch.zeros(2, c.channels, c.size, c.size,
                                              device=next(module.parameters(), torch.zeros(0)).device))
            module.train(was_training)
    except Exception as exc:  # noqa: BLE001 - the user's module: one line, not a traceback
        raise UserError(f"{role}[{name!r}]: a forward pass on [2, {c.channels}, {c.size}, {c.size}] pixels in "
                        f"[0, 1] fails ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                        ) from None
    if not isinstance(probe, torch.Tensor) or probe.ndim != 2 or probe.shape[0] != 2:
        shape = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
        raise UserError(f"{role}[{name!r}]: output is {shape} for 2 images, expected logits [2, classes]")
    return int(probe.shape[1])


def _in_memory_source(name: str, source_name: str | None, saved: dict) -> dict | None:
    """The source record of an in-memory target that names an in-memory source in fine_tuned_from."""
    if source_name is None:
        return None
    if source_name not in saved:
        raise UserError(f"fine_tuned_from[{name!r}] = {source_name!r} is not one of the in-memory sources")
    return {"name": source_name, "weights_sha256": saved[source_name]["sha"],
            "dataset": saved[source_name]["dataset"], "label_space": saved[source_name]["space"]}


@dataclass
class _InMemorySave:
    """What every in-memory model of one attack_matrix call is saved with (its keyword arguments, as given)."""

    dataset: str
    canvas: str | None  # None: the canvas of the first run given, else gray28
    label_spaces: dict | None
    fine_tuned_from: dict | None
    out: Path
    handles: list  # the session's in-memory handles, released when the matrix is done
    saved: dict = field(default_factory=dict)  # the runs saved so far: targets name sources in fine_tuned_from


def _save_in_memory(models: dict, role: str, request: _InMemorySave) -> list[Path]:
    """Save each ``name -> module`` (or ``name -> (module, label_space)``) as a run under OUT/in-memory/."""
    import torch

    from transferlab import data as data_mod
    from transferlab import names, store
    from transferlab.model_sources import create_external

    handles, saved = request.handles, request.saved
    c = data_mod.get_canvas(request.canvas)
    target_dataset = data_mod.resolve_name(request.dataset)
    paths = []
    for name, value in models.items():
        names.check_name(name, f"{role} name")
        module, space = value if isinstance(value, tuple) and len(value) == 2 else (value, None)
        if not isinstance(module, torch.nn.Module):
            raise UserError(f"{role}[{name!r}] is {type(module).__name__}, not a torch nn.Module")
        space = space if space is not None else request.label_spaces.get(name)
        if space is None:
            if role == "sources":
                raise UserError(f"source {name!r}: give its label space, e.g. label_spaces={{{name!r}: 'kmnist'}} "
                                f"(a dataset name, or the name of the label space its classes live in)")
            space = target_dataset  # a target is evaluated on the matrix's data: its labels
        ds_name, label_space, classes = _label_space_record(space)
        if role == "targets":
            ds_name = target_dataset  # a target is a model of the matrix's data, whatever its classes are called
        num_classes = _probe_logits(module, role, name, c)
        if classes is not None and num_classes != classes:
            raise UserError(f"{role}[{name!r}] gives {num_classes} logits, but label space {label_space!r} has "
                            f"{classes} classes")
        handle = f"{name}-{len(handles)}-{id(module):x}"
        _IN_MEMORY[handle] = module
        handles.append(handle)
        # pixels in [0, 1] reach the module unchanged: the wrapper's normalisation is the identity
        wrapped = create_external(IN_MEMORY_FACTORY, num_classes=num_classes, in_channels=c.channels,
                                  image_size=c.size, mean=0.0, std=1.0, handle=handle)
        source_record = _in_memory_source(name, request.fine_tuned_from.get(name), saved)
        pretrain_dataset = source_record["dataset"] if source_record else (ds_name if role == "sources" else None)
        info = RunRecord(
            kind="in-memory", name=name,
            # the family names the module's class (tables and lineage compare architectures by it); the config's
            # family is the factory that rebuilds it
            model={"family": f"in-memory:{type(module).__qualname__}", "config": wrapped.config,
                   "parameters": sum(p.numel() for p in module.parameters()),
                   "class": f"{type(module).__module__}.{type(module).__qualname__}"},
            dataset={"name": ds_name, "canvas": c.name, "num_classes": num_classes, "label_space": label_space,
                     "subset": {"n": None}},
            source=source_record,
            lineage={"pretrain_dataset": pretrain_dataset, "pretrain_label_space": label_space,
                     "pretrain_run": source_record["name"] if source_record else None},
            freeze={"n": None}, seed=None,
            note="an in-memory nn.Module passed to transferlab.attack_matrix; reloads only in that session",
            versions=store.versions(),
        ).to_json()
        run_dir = request.out / IN_MEMORY_DIR / name
        store.save_run(run_dir, wrapped, info)
        saved[name] = {"sha": store.file_sha256(run_dir / store.WEIGHTS_FILE), "dataset": ds_name,
                       "space": label_space}
        paths.append(run_dir)
    return paths


@with_settings(MatrixDefaults, "attack-matrix", into="evaluation")
def attack_matrix(*, dataset: str, sources=None, targets=None, runs_dir: str | Path | None = None,
                  select: str | list[str] | tuple[str, ...] = "pre_*",
                  select_targets: str | list[str] | tuple[str, ...] | None = None,
                  attack: str | list[str] | tuple[str, ...] = MATRIX.attacks, attack_options: dict | None = None,
                  eps=MATRIX.eps, steps: int | None = None, alpha: float | None = None,
                  evaluation: MatrixDefaults | None = None, ensembles=None, seed: int = 0, device: str = "auto",
                  data_dir: str | Path | None = None, download: bool = True, out: str | Path | None = None,
                  report: bool = True, progress: bool = False, label_spaces: dict | None = None,
                  fine_tuned_from: dict | None = None, canvas: str | None = None,
                  log: str | list[str] | tuple[str, ...] | None = None, force: bool = False,
                  trust_code: bool = False) -> MatrixTables:
    """Craft adversarial examples once per source and score every target on them
    (``transferlab attack-matrix``). ``sources`` / ``targets``: run directories or ``Run`` objects, or a dict
    of in-memory models ``{"name": nn.Module}`` (``{"name": (module, label_space)}`` also works). An in-memory
    model takes pixels in [0, 1] on the canvas (``canvas``, default: the runs' canvas, else gray28) and returns
    logits; a source's label space is required (``label_spaces={"name": "kmnist"}``: a dataset name, or a
    label-space name such as "digits"); a target's defaults to ``dataset``'s. ``fine_tuned_from={"target":
    "source"}`` records lineage between in-memory models. In-memory models are saved as runs under
    ``out/in-memory/``. ``eps``: a comma string like the CLI's or a list of floats. Returns the tidy tables as
    DataFrames; the CSVs (and, with ``report``, the per-setting matrices and figures) are written under ``out``.
    ``select_targets`` None (the CLI's default): every finished run under ``runs_dir`` that is not a source.
    ``log``: trackers ("csv", "tensorboard", "mlflow") that receive the tables, under ``out/logs``.
    The matrix settings (config.MatrixDefaults: ``samples``, ``labels``, ``white_box``, ``scope``,
    ``batch_size``, ``precision``) are keyword arguments, or one object as ``evaluation=``.
    ``out`` None: ``results/matrix/<dataset>-<attacks>`` (matrix.outputs.default_out). A folder holding another
    matrix's results is never replaced unless ``force`` (only added to: more eps, runs or attacks)."""
    from transferlab.cli_args import split_list
    from transferlab.matrix import run_matrix
    from transferlab.report import update_matrix_outputs
    from transferlab.tracking import check_targets

    _trust(trust_code)
    log = _log_targets(log)
    in_memory = {role: items for role, items in (("sources", sources), ("targets", targets)) if isinstance(items, dict)}
    source_paths, target_paths = _matrix_run_paths(sources, targets, in_memory, runs_dir, select, select_targets)
    eps_values = _eps_values(eps, (attack_options or {}).get("norm", "Linf"))
    attack_names = split_list([attack] if isinstance(attack, str) else list(attack))
    out = Path(out) if out is not None else _default_matrix_out(dataset, attack_names, attack_options or {})
    check_targets(log, out)  # before the matrix runs (transferlab.tracking)
    ensembles = [ensembles] if isinstance(ensembles, str) else ensembles
    with _in_memory_handles() as handles:
        _save_all_in_memory(in_memory, source_paths, target_paths,
                            _InMemorySave(dataset, canvas, label_spaces, fine_tuned_from, out, handles))
        result = run_matrix(sources=source_paths, targets=target_paths, dataset=dataset, attack_names=attack_names,
                            eps_values=eps_values, steps=steps, alpha=alpha,
                            attack_options=dict(attack_options or {}), samples=evaluation.samples,
                            label_policy=evaluation.labels, seed=seed, device=device,
                            white_box=evaluation.white_box, scope=evaluation.scope,
                            data=_data_options(data_dir, download), out_dir=out, batch_size=evaluation.batch_size,
                            precision=evaluation.precision, ensembles=ensembles, progress=progress, force=force)
    if report:
        update_matrix_outputs(out, result.cells, result.lineage, result.examples_file)
    if log:
        _log_matrix_tables(log, out, result)
    return MatrixTables(cells=result.cells, lineage=result.lineage, pairs=result.pairs, out=out,
                        summary=result.summary())


def _default_matrix_out(dataset: str, attack_names: list[str], attack_options: dict) -> Path:
    """results/matrix/<dataset>-<attacks>, each attack named as its rows are: an L2 matrix's folder is not its
    Linf twin's ('mnist-pgd-L2'), so neither refuses the other as a clobber."""
    from transferlab.attacks import attack_label
    from transferlab.matrix.outputs import default_out

    return default_out(dataset, [attack_label(a, attack_options) for a in attack_names], DEFAULT_MATRIX_DIR)


def _eps_values(eps, norm="Linf") -> list[float]:
    """attack_matrix's eps: a comma string like the CLI's, or one number or a list of numbers (an L2 eps may
    exceed 1)."""
    import numpy as np

    from transferlab.attacks import parse_eps_list

    return parse_eps_list(eps, norm) if isinstance(eps, str) else [float(e) for e in np.atleast_1d(eps)]


@contextmanager
def _in_memory_handles():
    """The handles of in-memory models registered for one matrix; unregistered when it is done or fails."""
    handles: list = []
    try:
        yield handles
    finally:
        for handle in handles:
            _IN_MEMORY.pop(handle, None)


def _matrix_run_paths(sources, targets, in_memory: dict, runs_dir, select, select_targets) -> tuple[list, list]:
    """attack_matrix's source and target run folders: those given, then those selected under ``runs_dir``."""
    from transferlab.cli_args import split_list
    from transferlab.matrix import select_runs

    source_paths = [] if "sources" in in_memory else _run_paths(sources, "sources")
    target_paths = [] if "targets" in in_memory else _run_paths(targets, "targets")
    if runs_dir is not None:
        patterns = split_list([select] if isinstance(select, str) else list(select or [])) or ["pre_*"]
        source_paths += [p for glob in patterns for p in select_runs(Path(runs_dir), glob) if p not in source_paths]
        if select_targets:
            patterns = split_list([select_targets] if isinstance(select_targets, str) else list(select_targets))
            target_paths += [p for glob in patterns for p in select_runs(Path(runs_dir), glob)
                             if p not in target_paths]
        else:  # every finished run that is not a source: fine-tunes and from-scratch runs alike
            target_paths += [p for p in select_runs(Path(runs_dir), "*")
                             if p not in source_paths and p not in target_paths]
    return source_paths, target_paths


def _save_all_in_memory(in_memory: dict, source_paths: list, target_paths: list, request: _InMemorySave) -> None:
    """Save attack_matrix's in-memory models as runs, adding their folders to ``source_paths`` / ``target_paths``."""
    from transferlab import store

    if not in_memory:
        if request.label_spaces or request.fine_tuned_from:
            raise UserError("label_spaces and fine_tuned_from describe in-memory models; runs record their own")
        return
    canvas = request.canvas
    if canvas is None:
        given = source_paths + target_paths
        canvas = store.read_run_info(given[0])["dataset"]["canvas"] if given else "gray28"
    request = replace(request, canvas=canvas, label_spaces=dict(request.label_spaces or {}),
                      fine_tuned_from=dict(request.fine_tuned_from or {}))
    for role in ("sources", "targets"):  # sources first: targets may name them in fine_tuned_from
        if role in in_memory:
            paths = _save_in_memory(in_memory[role], role, request)
            (source_paths if role == "sources" else target_paths).extend(paths)


def _log_matrix_tables(log, out: Path, result) -> None:
    """Hand the matrix's tables to the --log trackers, under out/logs."""
    from transferlab.tracking import LOG_DIR, Tracker

    with Tracker(log, out / LOG_DIR, out.resolve().name) as tracker:
        for table, frame in (("cells", result.cells), ("lineage", result.lineage), ("pairs", result.pairs)):
            if frame is not None:
                tracker.log_table(table, frame)


@with_settings(StepResources, "run", into="ray_resources")
def run_study(path: str | Path, out: str | Path | None = None, *, dry_run: bool = False, only: str | None = None,
              force: str | None = None, device: str | None = None, data_dir: str | Path | None = None,
              download: bool | None = None, progress: bool = False,
              overrides: list[str] | tuple[str, ...] | None = None, executor="local", address: str | None = None,
              jobs: int | None = None, ray_resources: StepResources | None = None, step_resources: str | None = None,
              console=None, log: str | list[str] | tuple[str, ...] | None = None, trust_code: bool = False):
    """Run a study file resumably (``transferlab run``); returns the study outcome (``.out_dir`` holds the
    results and report). ``path``: a study file, or the name of a packaged study ("quick"). ``overrides``:
    ``--set`` items, e.g. ``["train.epochs=2", "study.seeds=[0,1]"]``. ``executor``: "local" or "ray" (with
    ``address``, ``jobs`` as on the command line, and each step's Ray resources ``num_cpus``, ``num_gpus``,
    ``memory`` in GiB, ``custom_resources={"name": amount}``, or all of them as ``ray_resources=``;
    ``step_resources``: the deprecated per-kind string), or an executor object. ``console``: a rich Console for
    the plan and progress (default: stdout). ``log``: trackers for every run's epochs and the study's tables
    (``--log``)."""
    from transferlab.packaged import resolve_study
    from transferlab.study import StudyRunOptions, run_study as _run_study

    wanted = {"only": "a glob of step ids (see 'transferlab run STUDY --dry-run')",
              "force": "a glob of step ids (see 'transferlab run STUDY --dry-run')",
              "address": "host:port of a running Ray cluster, or auto", "step-resources": "e.g. 'train:gpu=1'"}
    for flag, value in (("only", only), ("force", force), ("address", address), ("step-resources", step_resources)):
        if value is not None and not value.strip():  # an empty value is a mistake, not "every step" or "none"
            raise UserValueError(f"--{flag} is empty; give {wanted[flag]}, or leave --{flag} out")

    _trust(trust_code)
    if isinstance(executor, str):
        from transferlab.executors import make_executor

        executor = make_executor(executor, address=address, jobs=jobs, step_resources=step_resources,
                                 resources=ray_resources)
    options = StudyRunOptions(dry_run=dry_run, only=only, force=force, device=device,
                              data_dir=Path(data_dir) if data_dir is not None else None, download=download,
                              progress=progress, console=console, executor=executor,
                              overrides=list(overrides or []) or None, log=_log_targets(log))
    return _run_study(resolve_study(Path(path)), Path(out) if out is not None else None, options)


@checked
def load_dataset(name: str, split: str = "train", canvas: str = "gray28", data_dir: str | Path | None = None,
                 download: bool = True, *, as_numpy: bool = False):
    """One split of a registered dataset on a canvas: (uint8 images [N, C, H, W], int64 labels [N]) as torch
    tensors (``as_numpy=True``: NumPy arrays). ``images.float() / 255`` is what every model takes."""
    from transferlab import data as data_mod

    if split not in data_mod.SPLITS:
        raise UserError(f"unknown split {split!r}; use {' or '.join(data_mod.SPLITS)}")
    ds = data_mod.load(name, canvas=canvas, data_dir=data_dir, download=download)
    part = ds.split(split)
    if as_numpy:
        return part.images.numpy(), part.labels.numpy()
    return part.images, part.labels


# ------------------------------------------------------------------ one-call crafting and scoring
@dataclass
class Evaluation:
    """A model scored on an adversarial set (``transferlab.evaluate``): accuracies in [0, 1], per-sample results."""

    accuracy: float  # on the adversarial images
    clean_accuracy: float | None  # on the clean images, when given
    attack_success_rate: float | None  # share of the clean-correct samples the attack turned wrong
    correct: torch.Tensor  # bool [N]: adversarial prediction == label
    clean_correct: torch.Tensor | None = None


def _module(model, device: str | None):
    """An nn.Module from a module, a Run or a run directory (loaded in eval mode)."""
    if isinstance(model, Run):
        return model.model
    if isinstance(model, (str, Path)):
        return load_run(model, device=device or "cpu").model
    return model


def _pixels(images):
    """Float [0, 1] tensors from uint8 or float tensors or NumPy arrays (what load_dataset returns)."""
    import torch

    images = torch.as_tensor(images)
    return images.float().div(255.0) if images.dtype == torch.uint8 else images


def craft(model, images, labels, attack: str = "pgd", eps: float | str = 0.1, *, steps: int | None = None,
          alpha: float | None = None, seed: int = 0, precision: str = "fp32", batch_size: int = MATRIX.batch_size,
          device: str | None = None, target_labels=None, **options) -> torch.Tensor:
    """Adversarial images for ``images`` against ``model`` in one call: the crafting the attack matrix (and so
    the CLI) runs, untargeted away from ``labels``. ``model``: an nn.Module taking [0, 1] pixels, a ``Run`` or a
    run directory; ``images``: uint8 or float [0, 1] [N, C, H, W] (tensors or NumPy); ``attack``: as
    ``--attack`` (fgsm, pgd, ..., torchattacks:NAME); ``eps``: a number or "8/255"; ``options``: further
    attack options (``--attack-opt``), e.g. ``norm="L2"`` (fgsm, pgd: eps then bounds each image's L2 distance);
    ``target_labels``: a targeted attack towards these classes (attacks with a targeted mode). Returns float
    [N, C, H, W] within eps (L-infinity, or L2 under norm="L2") of the images and in [0, 1]."""
    import torch

    from transferlab import attacks

    labels = torch.as_tensor(labels)
    return attacks.craft(_module(model, device), _pixels(images), labels, attack, eps, batch_size=batch_size,
                         seed=seed, precision=precision, steps=steps, alpha=alpha,
                         target_labels=None if target_labels is None else torch.as_tensor(target_labels), **options)


def evaluate(model, adversarial_set, labels=None, *, clean=None, precision: str = "fp32",
             batch_size: int = 2048, device: str | None = None) -> Evaluation:
    """Score ``model`` on an adversarial set in one call, as the attack matrix scores a cell (argmax against
    the labels). ``adversarial_set``: images ([N, C, H, W], uint8 or [0, 1] float) with ``labels``, or an
    ``(images, labels)`` pair; ``clean``: the clean images, for the clean accuracy and the attack success rate."""
    import torch

    from transferlab.device import Numerics, predict

    if labels is None:
        if not isinstance(adversarial_set, (tuple, list)) or len(adversarial_set) != 2:
            raise TypeError("evaluate needs labels: evaluate(model, images, labels) or evaluate(model, (images, labels))")
        adversarial_set, labels = adversarial_set
    labels = torch.as_tensor(labels).cpu()
    module = _module(model, device)
    where = torch.device(device) if device else next(module.parameters(), torch.empty(0)).device
    numerics = Numerics(precision=precision)
    correct = predict(module, _pixels(adversarial_set), where, batch_size, numerics) == labels
    clean_correct = None if clean is None else predict(module, _pixels(clean), where, batch_size, numerics) == labels
    success = None
    if clean_correct is not None and bool(clean_correct.any()):
        success = float((clean_correct & ~correct).sum()) / float(clean_correct.sum())
    return Evaluation(accuracy=float(correct.double().mean()) if len(labels) else float("nan"),
                      clean_accuracy=None if clean_correct is None else float(clean_correct.double().mean()),
                      attack_success_rate=success, correct=correct, clean_correct=clean_correct)
