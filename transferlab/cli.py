"""The ``transferlab`` command line: parse, call one function of the API (transferlab/api.py), print.

No logic lives here; options take their defaults from transferlab/config.py. The few commands that are not
API calls (inspect, models, datasets, doctor, report) import what they need inside, as api.py does, so that
``transferlab --help`` does not pay torch's 2.7 s import.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from transferlab import api, terminal
from transferlab.cli_args import enum_option, normalise_argv, setting_options, split_list
from transferlab.config import MATRIX, RUNS_DIR, Executor, MatrixDefaults, ReportMetric, StepResources, TrainConfig
from transferlab.errors import UserError

app = typer.Typer(
    add_completion=True,  # --install-completion / --show-completion: bash, zsh, fish and PowerShell
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Transfer-learning and adversarial-transferability studies: pretrain, fine-tune, attack, report.",
)
# soft_wrap: a piped run prints whole lines (paths are never broken at 80 columns); piped tables (doctor's,
# pasted into bug reports) get 160 columns rather than rich's 80, unless COLUMNS says otherwise (terminal.py).
console = terminal.console()
err_console = Console(stderr=True, soft_wrap=True)

# Options shared by several commands, declared once.
SeedOpt = typer.Option(0, "--seed", help="Random seed: same seed, same device, same numbers.")
DeviceOpt = typer.Option("auto", "--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")
DataDirOpt = typer.Option(None, "--data-dir", help="Data root (default $TRANSFERLAB_DATA or ~/.cache/transferlab/data).")
NoDownloadOpt = typer.Option(False, "--no-download", help="Never download; fail with a clear message if files are missing.")
RunsDirOpt = typer.Option(RUNS_DIR, "--out", help="Directory that receives the run directory.")
ProgressOpt = typer.Option(True, "--progress/--no-progress", help="Show progress bars.")
LogOpt = typer.Option(None, "--log", help="Mirror per-epoch metrics and final tables to csv, tensorboard and/or mlflow (under OUT/logs): --log csv,tensorboard or repeated.")
ForceRunOpt = typer.Option(False, "--force", help="Replace a different finished run of the same name.")
TrustCodeOpt = typer.Option(False, "--trust-code", help="Import module:factory code named in run.json or study files "
                            "(only if you trust whoever wrote them; also TRANSFERLAB_TRUST_CODE=1).")



def parse_options(items: list[str] | None, flag: str = "--option") -> dict:
    """['depth=2', 'hidden=[256,128]', 'pool=mean'] -> {'depth': 2, 'hidden': [256, 128], 'pool': 'mean'}."""
    options = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} {item!r} is not KEY=VALUE (e.g. {flag} depth=2)")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = {"true": True, "false": False}.get(raw.lower(), raw)
        options[key.strip()] = value
    return options


def _api_arguments(params: dict) -> dict:
    """A command's parameters (``locals()`` at its start) as its API function's keyword arguments: the API
    takes the same names, except ``-o`` (``options``, parsed) and ``--no-download`` (``download``)."""
    args = dict(params)
    if "option" in args:
        args["options"] = parse_options(args.pop("option"))
    if "no_download" in args:
        args["download"] = not args.pop("no_download")
    return args


def _print_table(title: str, columns, rows, right=()) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _print_version(value: bool) -> None:
    if value:
        from transferlab._version import __version__

        print(f"transferlab {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
):
    """Transfer-learning and adversarial-transferability studies: pretrain, fine-tune, attack, report."""


# ------------------------------------------------------------------- training
@app.command()
@setting_options(TrainConfig, "pretrain", into="train")
def pretrain(
    model: str = typer.Option(..., "--model", help="Model family (see 'transferlab models')."),
    dataset: str = typer.Option(..., "--dataset", help="Dataset name (see 'transferlab datasets') or npz:FOLDER."),
    option: Optional[List[str]] = typer.Option(None, "--option", "-o", help="Model option KEY=VALUE, repeatable."),
    n: Optional[int] = typer.Option(None, "--n", help="Train on a class-stratified seeded subset of N images."),
    train: TrainConfig = None,  # the training options, generated from config.TrainConfig's settings
    canvas: str = typer.Option("gray28", "--canvas", help="gray28 (1x28x28) or rgb32 (3x32x32)."),
    seed: int = SeedOpt,
    device: str = DeviceOpt,
    data_dir: Optional[Path] = DataDirOpt,
    no_download: bool = NoDownloadOpt,
    out: Path = RunsDirOpt,
    name: Optional[str] = typer.Option(None, "--name", help="Run name (default pre_MODEL_DATASET_sSEED)."),
    force: bool = ForceRunOpt,
    progress: bool = ProgressOpt,
    log: Optional[List[str]] = LogOpt,
):
    """Train a source model from scratch on a dataset."""
    run = api.pretrain(**_api_arguments(locals()))
    console.print(f"pretrained {run.summary()}")


@app.command()
@setting_options(TrainConfig, "finetune", into="train")
def finetune(
    source: Optional[Path] = typer.Option(None, "--from", help="Run directory of the pretrained source."),
    model: Optional[str] = typer.Option(None, "--model", help="Instead of --from: train this family from scratch."),
    dataset: str = typer.Option(..., "--dataset", help="Fine-tuning dataset (e.g. mnist)."),
    option: Optional[List[str]] = typer.Option(None, "--option", "-o", help="Model option KEY=VALUE (with --model)."),
    n: Optional[int] = typer.Option(None, "--n", help="Class-stratified seeded subset of N training images."),
    freeze: Optional[int] = typer.Option(None, "--freeze", help="Freeze the first N parameter tensors."),
    freeze_to: Optional[str] = typer.Option(None, "--freeze-to", help="Freeze up to and including this block."),
    train: TrainConfig = None,  # the training options, generated from config.TrainConfig's settings
    canvas: Optional[str] = typer.Option(None, "--canvas", help="Defaults to the source's canvas."),
    seed: int = SeedOpt,
    device: str = DeviceOpt,
    data_dir: Optional[Path] = DataDirOpt,
    no_download: bool = NoDownloadOpt,
    out: Path = RunsDirOpt,
    name: Optional[str] = typer.Option(None, "--name", help="Run name (default final_SOURCE_DATASETN_fFREEZE_sSEED or scratch_MODEL_DATASETN_sSEED)."),
    force: bool = ForceRunOpt,
    progress: bool = ProgressOpt,
    log: Optional[List[str]] = LogOpt,
    trust_code: bool = TrustCodeOpt,
):
    """Fine-tune a pretrained source on a (subset of a) dataset, or train the same subset from scratch."""
    run = api.finetune(**_api_arguments(locals()))
    console.print(f"{'fine-tuned' if source else 'trained from scratch'} {run.summary()}")


@app.command("import")
def import_(
    model: str = typer.Option(..., "--model", help="module.path:factory, torchvision:NAME or timm:NAME."),
    label_space: str = typer.Option(..., "--label-space", help="The classes it predicts, e.g. imagenet (or a dataset name)."),
    classes: int = typer.Option(..., "--classes", help="How many classes its head has (1000 for ImageNet)."),
    option: Optional[List[str]] = typer.Option(None, "--option", "-o", help="Model option KEY=VALUE, repeatable; weights=FILE.safetensors for torchvision:/timm:."),
    canvas: str = typer.Option("gray28", "--canvas", help="gray28 (1x28x28) or rgb32 (3x32x32): the canvas it will be fine-tuned and attacked on."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Pixel means its weights were trained with, e.g. 0.485,0.456,0.406 (default 0.5)."),
    std: Optional[str] = typer.Option(None, "--std", help="Pixel standard deviations, e.g. 0.229,0.224,0.225 (default 0.5)."),
    out: Path = RunsDirOpt,
    name: Optional[str] = typer.Option(None, "--name", help="Run name (default imported_MODEL_LABELSPACE)."),
    force: bool = ForceRunOpt,
):
    """Make a source run of a model pretrained elsewhere (e.g. an ImageNet ViT from a local safetensors file), without training it."""
    run = api.import_run(model=model, label_space=label_space, classes=classes, options=parse_options(option),
                         canvas=canvas, mean=_floats(mean, "--mean"), std=_floats(std, "--std"), out=out, name=name,
                         force=force)
    console.print(f"imported {run.summary()}")


def _floats(text: Optional[str], flag: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(part) for part in split_list(text)]
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a comma list of numbers (e.g. {flag} 0.5,0.5,0.5)") from None


# ----------------------------------------------------------------- inspection
@app.command()
def inspect(
    model: str = typer.Argument(..., help="Model family, or a run directory."),
    num_classes: int = typer.Option(10, "--num-classes"),
    canvas: str = typer.Option("gray28", "--canvas"),
    option: Optional[List[str]] = typer.Option(None, "--option", "-o"),
    freeze: Optional[int] = typer.Option(None, "--freeze"),
    freeze_to: Optional[str] = typer.Option(None, "--freeze-to"),
    trust_code: bool = TrustCodeOpt,
):
    """Print the parameter table: index, name, shape, count, trainable or frozen."""
    from transferlab.data import get_canvas
    from transferlab.model_sources import trust_code as allow_code

    if trust_code:
        allow_code()
    from transferlab.models import create_model, freeze as apply_freeze, freeze_count_for, parameter_table

    if freeze is not None and freeze_to is not None:
        raise UserError("give --freeze N or --freeze-to NAME, not both")
    looks_like_path = "/" in model or "\\" in model or model.startswith(".")
    if looks_like_path and not Path(model).is_dir():
        raise UserError(f"run directory not found: {model}; give a model family (see 'transferlab models') "
                        f"or a run directory")
    if Path(model).is_dir():
        from transferlab.store import load_run

        net, info = load_run(Path(model))
        title = f"{info['name']} ({net.family})"
        recorded = info.get("freeze") or {}
        if freeze is None and freeze_to is None and recorded.get("n"):
            # What the run really trained: its recorded frozen tensors (a replaced head learns even under
            # --freeze, so the names, when recorded, are the truth; the count otherwise).
            names = recorded.get("frozen_names")
            if names is not None:
                frozen = set(names)
                for param_name, param in net.named_parameters():
                    param.requires_grad_(param_name not in frozen)
            else:
                apply_freeze(net, int(recorded["n"]))
            title += f", as trained: freeze {recorded['n']}" + (f" (to {recorded['to']})" if recorded.get("to") else "")
    else:
        c = get_canvas(canvas)
        net = create_model(model, num_classes=num_classes, in_channels=c.channels, image_size=c.size,
                           **parse_options(option))
        title = f"{model} ({c.name}, {num_classes} classes)"
    n = freeze_count_for(net, freeze_to) if freeze_to else freeze
    if n is not None:
        apply_freeze(net, n)
    rows = parameter_table(net)
    _print_table(title, ("index", "name", "shape", "count", "state"),
                 [(str(r["index"]), r["name"], str(list(r["shape"])), f"{r['count']:,}",
                   "trainable" if r["trainable"] else "frozen") for r in rows], right=("index", "count"))
    frozen = sum(not r["trainable"] for r in rows)
    console.print(f"{len(rows)} parameter tensors, {sum(r['count'] for r in rows):,} parameters; "
                  f"{frozen} frozen, {len(rows) - frozen} trainable")


@app.command()
def models():
    """List the model families and their options."""
    from transferlab.model_catalog import list_families  # torch-free: models.py's declarations, read

    _print_table("model families", ("name", "description", "options", "blocks (for --freeze-to)"),
                 [(f["name"], f["description"], json.dumps(f["defaults"]), f["block_help"]) for f in list_families()])


@app.command()
def datasets():
    """List the datasets transferlab knows."""
    from transferlab.data import list_datasets  # torch-free (data.registry)

    _print_table("datasets", ("name", "classes", "label space", "description"),
                 [(d.name, str(d.num_classes), d.label_space, d.description) for d in list_datasets()])
    console.print("Also: npz:FOLDER with train.npz and test.npz (x uint8 [N,H,W(,C)], y int).")


@app.command()
def doctor(
    device: str = DeviceOpt,
    data_dir: Optional[Path] = DataDirOpt,
    calibration: bool = typer.Option(True, "--calibration/--no-calibration",
                                     help="Also list the cached precision decisions."),
    clear_calibration: bool = typer.Option(False, "--clear-calibration", help="Forget the cached precision decisions (the next --precision auto run measures again)."),
):
    """What this machine is and what transferlab decided on it: paste it into bug reports."""
    from transferlab.calibration_cache import CalibrationCache, describe_decisions  # torch-free

    _print_table("transferlab doctor", ("what", "value"), _machine_rows(device, data_dir))
    if not calibration:
        return
    cache = CalibrationCache()
    if clear_calibration:
        console.print(f"cleared {cache.clear()} cached precision decisions from {cache.path}")
        return
    decisions = cache.read()
    _print_table(f"calibrated precision decisions ({cache.path})",
                 ("model", "workload", "batch", "chosen", "step ms per candidate", "measured", "load then"),
                 describe_decisions(decisions))
    if not decisions:
        console.print("no calibrations yet: the first run with --precision auto measures and caches one per model")


def _machine_rows(device: str, data_dir: Optional[Path]) -> list[tuple[str, str]]:
    """doctor's machine table, read without torch (10-16 s and 900 MB on a busy 2-core machine) unless the
    answer needs it: a device other than the CPU, asked for or possibly found (GPUs, Apple silicon)."""
    from transferlab import machine
    from transferlab.data import default_cache_dir, default_data_dir  # torch-free (data.registry)

    name, gpus = str(device).lower(), machine.nvidia_gpus()
    if name == "cpu" or (name == "auto" and not gpus[0] and not machine.may_have_mps()):
        device_row, threads = f"cpu ({machine.cpu_model()})", machine.default_thread_count()
    else:
        from transferlab import device as dev  # imports torch: only torch can resolve and name a GPU

        torch_device = dev.resolve_device(device)
        device_row, threads = f"{torch_device} ({dev.device_name(torch_device)})", dev.configure_cpu_threads()
    cuda_build = machine.torch_cuda_build()
    why = ("OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit()
           else "one per usable core (affinity, cgroup quota)")
    return [("device", device_row),
            ("cpu", machine.cpu_model()),
            ("cpu flags", " ".join(machine.cpu_flags()) or "none of " + ", ".join(machine.INTERESTING_FLAGS)),
            ("native bf16 reported", "yes" if machine.cpu_has_native_bf16() else "no"),
            ("threads", f"{threads} ({why}; {os.cpu_count()} logical CPUs)"),
            *machine.package_versions().items(),
            ("cuda", machine.gpu_text(gpus) + (f"; torch built for CUDA {cuda_build}" if cuda_build else "")),
            ("data dir", str(data_dir or default_data_dir())),
            ("cache dir", str(default_cache_dir())), ("frozen-prefix cache", machine.feature_budget_text())]


# --------------------------------------------------------------- attack matrix
@app.command("attack-matrix")
@setting_options(MatrixDefaults, "attack-matrix", into="evaluation")
def attack_matrix(
    sources: Optional[List[str]] = typer.Option(None, "--sources", help="Source run directories: --sources A B C, A,B or repeated (or --runs-dir/--select)."),
    targets: Optional[List[str]] = typer.Option(None, "--targets", help="Target run directories, as --sources (or --runs-dir/--select-targets)."),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help="Pick runs from this directory by glob."),
    select: Optional[List[str]] = typer.Option(None, "--select", help="Globs of source run names under --runs-dir (default pre_*)."),
    select_targets: Optional[List[str]] = typer.Option(None, "--select-targets", help="Globs of target run names under --runs-dir (default: every finished run there that is not a source: final_* fine-tunes and scratch_* from-scratch runs)."),
    dataset: str = typer.Option(..., "--dataset", help="The targets' dataset; its test split is attacked."),
    attack: Optional[List[str]] = typer.Option(None, "--attack", help="fgsm, pgd, mifgsm, difgsm, tifgsm, nifgsm, vmifgsm or torchattacks:NAME; several as --attack fgsm,pgd, --attack fgsm pgd or repeated (default pgd)."),
    attack_opt: Optional[List[str]] = typer.Option(None, "--attack-opt", help="Attack option KEY=VALUE, repeatable; norm=L2 bounds each image's L2 distance instead of every pixel's (fgsm, pgd, torchattacks classes with a norm)."),
    eps: Optional[List[str]] = typer.Option(None, "--eps", help="eps on the [0,1] pixel scale (under norm=L2 an L2 radius, which may exceed 1), fractions like 8/255 work; several as --eps 0.1,0.2, --eps 0.1 0.2 or repeated (default 0.1,0.2,0.3)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Iterations of iterative attacks (default 10)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Step size (pgd default 2.5*eps/steps)."),
    evaluation: MatrixDefaults = None,  # --samples ... --precision, generated from config.MatrixDefaults
    ensemble: Optional[List[str]] = typer.Option(None, "--ensemble", help="Also craft on the mean logits of these runs, e.g. 'pre_a,pre_b' (names or directories among the sources; repeatable)."),
    seed: int = SeedOpt,
    device: str = DeviceOpt,
    data_dir: Optional[Path] = DataDirOpt,
    no_download: bool = NoDownloadOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default results/matrix/<dataset>-<attacks>)."),
    force: bool = typer.Option(False, "--force", help="Replace another matrix's results in --out (otherwise refused; adding eps, runs or attacks is always allowed)."),
    progress: bool = ProgressOpt,
    log: Optional[List[str]] = LogOpt,
    trust_code: bool = TrustCodeOpt,
):
    """Craft adversarial examples once per source and tabulate every target's accuracy on them."""
    from transferlab.attacks import parse_attack_options

    result = api.attack_matrix(dataset=dataset, sources=split_list(sources, "--sources") or None,
                               targets=split_list(targets, "--targets") or None, runs_dir=runs_dir,
                               select=split_list(select, "--select") or "pre_*",
                               select_targets=split_list(select_targets, "--select-targets") or None,
                               attack=split_list(attack, "--attack") or MATRIX.attacks,
                               attack_options=parse_attack_options(attack_opt or []),
                               eps=",".join(split_list(eps, "--eps")) or MATRIX.eps, steps=steps, alpha=alpha,
                               evaluation=evaluation, ensembles=ensemble, seed=seed, device=device,
                               data_dir=data_dir, download=not no_download, out=out, progress=progress, log=log,
                               force=force, trust_code=trust_code)
    console.print(f"attack matrix: {result.summary}; see {result.out / 'summary.md'}")


# ---------------------------------------------------------------- studies
@app.command()
@setting_options(StepResources, "run", into="resources")
def run(
    study: Path = typer.Argument(..., help="Study file (TOML), e.g. studies/quick.toml, or the name of a packaged study (quick)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Results directory (default results/<study name>)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and stop."),
    only: Optional[str] = typer.Option(None, "--only", help="Run only steps matching this glob (and what they need)."),
    force: Optional[str] = typer.Option(None, "--force", help="Redo steps matching this glob, and every step that depends on them; forcing a merge step (merge/*) redoes its whole attack matrix, its craft and eval steps too, crafting again instead of reusing cached sets."),
    device: Optional[str] = typer.Option(None, "--device", help="Overrides the study's device."),
    data_dir: Optional[Path] = DataDirOpt,
    no_download: bool = typer.Option(False, "--no-download", help="Never download (overrides the study)."),
    progress: bool = ProgressOpt,
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a study value, TABLE.KEY=VALUE with a TOML "
                                             "value (--set train.epochs=2 --set study.seeds=[0,1]); repeatable."),
    executor: Executor = enum_option(Executor, Executor.LOCAL, "--executor", help="local (one step after another in "
                                     "this process) or ray (a Ray task per step, across cores, GPUs and nodes; "
                                     "pip install 'transferlab[ray]')."),
    address: Optional[str] = typer.Option(None, "--address", help="With --executor ray: join this running Ray cluster "
                                          "(host:port, or auto) instead of starting a local one."),
    jobs: Optional[int] = typer.Option(None, "--jobs", help="With --executor ray and no --address: CPU slots of the "
                                       "local Ray (default: every core), so up to N one-CPU steps at once."),
    resources: StepResources = None,  # --num-cpus, --num-gpus, --memory, --resource, from config.StepResources
    step_resources: Optional[str] = typer.Option(None, "--step-resources", help="Deprecated (use --num-cpus, "
                                                 "--num-gpus, --memory, --resource or the study's [executor] "
                                                 "tables): per kind of step, e.g. 'train:gpu=1,cpu=2;eval:gpu=0.25'."),
    log: Optional[List[str]] = LogOpt,
    trust_code: bool = TrustCodeOpt,
):
    """Run a whole study, resumably: finished steps are skipped."""
    outcome = api.run_study(study, out, dry_run=dry_run, only=only, force=force, device=device, data_dir=data_dir,
                            download=False if no_download else None, progress=progress, overrides=set_,
                            executor=executor, address=address, jobs=jobs, step_resources=step_resources,
                            ray_resources=resources,
                            console=console, log=log, trust_code=trust_code)
    if not dry_run:
        console.print(f"{outcome.summary()}; report: {outcome.out_dir / 'report.md'}")


@app.command()
def report(
    results: Path = typer.Argument(..., help="A study results folder (results/quick) or an attack-matrix output folder."),
    format: Optional[List[str]] = typer.Option(None, "--format", help="md, html and/or tex: --format md,html or repeated (default md,html)."),
    metric: ReportMetric = enum_option(ReportMetric, ReportMetric.ACCURACY, "--metric", help="accuracy or asr: which matrix table leads and which heatmap is shown (both tables are always there)."),
):
    """Turn a study's results into tables, figures and report.md / report.html."""
    from transferlab.report import write_study_report

    formats = tuple(split_list(format, "--format") or ["md", "html"])  # write_study_report checks them
    written = write_study_report(results, formats=formats, metric=metric)
    console.print(f"report: {len(written)} files written under {results}")


# ------------------------------------------------------------------- entry
def _is_click_error(exc: BaseException, name: str) -> bool:
    # typer raises click's exceptions, or those of the click copy it ships (typer >= 0.20);
    # matching on the class name works with both without importing a private module.
    return any(cls.__name__ == name for cls in type(exc).__mro__)


_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def main(argv: list[str] | None = None) -> None:
    """Console entry point: a user's mistake is one line on stderr and exit status 2, never a traceback."""
    def fail(message: str, code: int):
        err_console.print(message, markup=False, highlight=False, soft_wrap=True)
        sys.exit(code)

    # A warning (a cache rebuilt, a cache that could not be written) is one line, like an error.
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"

    try:
        argv = normalise_argv(app, list(sys.argv[1:] if argv is None else argv))
        code = app(args=argv, prog_name="transferlab", standalone_mode=False)
    except UserError as exc:
        fail(f"error: {exc}", 2)
    except KeyboardInterrupt:
        code = 130
    except OSError as exc:
        # The environment, not the input or a bug: a full disk, a read-only or vanished folder.
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        fail(f"error: {exc.strerror or exc}{where}; free space or choose another --out, then re-run "
             "(finished steps are kept)", 2)
    except Exception as exc:
        if _is_click_error(exc, "NoArgsIsHelpError"):  # bare 'transferlab': show the help, not an error
            print(exc.ctx.get_help())
            sys.exit(0)
        if _is_click_error(exc, "UsageError"):
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            fail(f"error: {exc.format_message()}{hint}", 2)
        if _is_click_error(exc, "Abort"):
            code = 130
        else:
            raise
    if code == 130:
        fail("interrupted; finished steps are kept: re-run the same command to resume", 130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
