"""Studies: one TOML file describes an experiment; this package validates it, plans it and runs it.

The plan is a small DAG: pretrain -> finetune -> attack matrix (craft + evaluate) -> report. The package
reads top to bottom: schema.py (load_study: parse and validate), plan.py (Step, plan: the steps and their
content keys), execute.py (execute_step, LocalExecutor: run the steps), collect.py (collect_results: the
study's tables). run_study here chains them. Inside the matrix step, adversarial sets and per-sample results
are cached by content too, so a new eps crafts only the new sets.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from transferlab import model_sources, preflight, store
from transferlab.errors import UserError
from transferlab.names import clean_stale_staging
from transferlab.report.study_report import write_report
from transferlab.runs import DataOptions
from transferlab.study.collect import collect_results
from transferlab.study.estimate import describe as describe_estimate
from transferlab.study.execute import LocalExecutor, StudyContext, execute_step, remove_outputs
from transferlab.study.plan import (MATRIX_KINDS, STUDY_SCHEMA, TRAIN_KINDS, Step, matrix_folder, matrix_steps,
                                    matrix_work, plan, select)
from transferlab.study.schema import ARRAY_TABLES, REQUIRED, SCHEMA, TRAIN_FIELDS, load_study
from transferlab.study_check import device_syntax
from transferlab.tracking import check_targets, export_study
from transferlab.training import progress_console, resolve_device

__all__ = ["ARRAY_TABLES", "LocalExecutor", "MATRIX_KINDS", "REQUIRED", "SCHEMA", "STUDY_SCHEMA", "Step",
           "StudyContext", "StudyOutcome", "StudyRunOptions", "TRAIN_FIELDS", "TRAIN_KINDS", "collect_results",
           "default_out_dir", "execute_step", "load_study", "matrix_steps", "matrix_work", "plan", "plan_table",
           "remove_outputs", "run_study", "select"]


@dataclass
class StudyOutcome:
    out_dir: Path
    steps: list[Step]
    executed: list[str]
    seconds: float

    def summary(self) -> str:
        return (f"study done: {len(self.executed)} of {len(self.steps)} steps run "
                f"({len(self.steps) - len(self.executed)} already done) in {self.seconds:.1f}s -> {self.out_dir}")


def default_out_dir(study: dict) -> Path:
    return Path("results") / study["study"]["name"]


def _check_out_dir(out_dir: Path) -> None:
    package_dir = Path(__file__).resolve().parent.parent  # transferlab/, not transferlab/study/
    resolved = out_dir.resolve()
    if resolved == package_dir or package_dir in resolved.parents:
        raise UserError(f"output directory {out_dir} is inside the transferlab package; choose another with --out")


def plan_table(steps: list[Step], states: dict[str, str]) -> Table:
    table = Table(title="plan")
    for column in ("#", "step", "key", "state"):
        table.add_column(column)
    for i, step in enumerate(steps, 1):
        table.add_row(str(i), step.id, step.key[:10], states[step.id])
    return table


@dataclass(frozen=True)
class StudyRunOptions:
    """How one run of a study file goes, beyond the file: api.run_study's keywords once checked (``--only``,
    ``--force``, ``--set``, ...). None for device, data_dir and download: the study file's own setting."""

    dry_run: bool = False  # plan, check and estimate; run nothing
    only: str | None = None  # a glob of step ids: run those and what they need
    force: str | None = None  # a glob of step ids: rebuild those and everything downstream
    device: str | None = None
    data_dir: Path | None = None
    download: bool | None = None
    progress: bool = True
    console: Console | None = None  # the plan and progress (default: stdout)
    executor: object = None  # a LocalExecutor or RayExecutor (default: local)
    overrides: list[str] | None = None  # --set items
    log: tuple = ()  # trackers for every run's epochs and the study's tables


def run_study(path: Path, out_dir: Path | None = None, options: StudyRunOptions = StudyRunOptions()) -> StudyOutcome:
    dry_run, only, force, device = options.dry_run, options.only, options.force, options.device
    data_dir, download, progress, overrides = options.data_dir, options.download, options.progress, options.overrides
    log = options.log
    console = options.console or Console(soft_wrap=True)
    started = time.perf_counter()
    study, out_dir, log = _load_checked(path, out_dir, overrides, dry_run, device, log)
    steps = plan(study, out_dir)
    wanted = _wanted_steps(steps, only)
    forced = _forced_steps(steps, force)
    states = _step_states(steps, forced)
    console.print(plan_table(wanted, states))
    todo = [s for s in wanted if states[s.id] != "done"]
    _print_matrix_work(console, wanted, study)
    # What the run needs (data, a writable out dir, disk space): checked alike by the dry run and the real run.
    data_options = DataOptions(data_dir=preflight.study_data_dir(study, data_dir),
                               download=study["data"]["download"] if download is None else download)
    checked = preflight.check(todo, study, out_dir, data_options.data_dir, data_options.download)
    if dry_run:
        console.print(checked)
        console.print(f"dry run: {len(todo)} of {len(wanted)} steps would run; nothing was executed")
        console.print(describe_estimate(wanted, states, study, device, data_options.data_dir))
        return StudyOutcome(out_dir, wanted, [], time.perf_counter() - started)
    resolve_device(device or study["study"]["device"])  # an absent cuda/mps fails here, before any folder exists
    with _study_lock(out_dir):
        ctx = StudyContext(study, out_dir, device or study["study"]["device"], data_options,
                           progress, {s.id: s for s in steps}, log=log)
        _write_study_file(path, out_dir, overrides)
        executed, step_seconds = _execute_steps(todo, forced, ctx, options.executor)
        clean_stale_staging(out_dir, recursive=True)  # what retried attempts of killed workers left
        write_report(collect_results(study, steps, out_dir, time.perf_counter() - started, step_seconds, ctx))
        if log:
            export_study(out_dir, log, study["study"]["name"])
    return StudyOutcome(out_dir, wanted, executed, time.perf_counter() - started)


def _load_checked(path: Path, out_dir: Path | None, overrides: list[str] | None, dry_run: bool,
                  device: str | None, log) -> tuple[dict, Path, tuple]:
    """The study, its output folder and its --log trackers, each checked before anything is planned."""
    with model_sources.factories_called(not dry_run):  # a dry run names the code it would run, runs none
        study = load_study(path, overrides)
    log = check_targets(log)
    if device is not None:
        device_syntax(device)
    out_dir = Path(out_dir) if out_dir else default_out_dir(study)
    _check_out_dir(out_dir)
    check_targets(log, out_dir)
    return study, out_dir, log


def _wanted_steps(steps: list[Step], only: str | None) -> list[Step]:
    """The steps --only selects, with the inputs they need pulled in, in plan order."""
    wanted = select(steps, only)
    if only and not wanted:
        raise UserError(f"--only {only!r} matches no step; step ids look like {steps[0].id}")
    needed = {s.id for s in wanted}
    for step in reversed(steps):
        if step.id in needed:
            needed.update(step.inputs)
    return [s for s in steps if s.id in needed]


def _forced_steps(steps: list[Step], force: str | None) -> set[str]:
    """The ids --force rebuilds: the steps it names and everything downstream of them."""
    forced = {s.id for s in select(steps, force)} if force else set()
    for step in steps:  # a rebuilt step invalidates everything downstream of it
        if forced.intersection(step.inputs):
            forced.add(step.id)
    # A forced merge removes its whole matrix folder (so nothing cached is reused): all its steps run again.
    forced_folders = {s.output.parent for s in steps if s.id in forced and s.kind == "merge"}
    forced.update(s.id for s in steps if s.kind in MATRIX_KINDS and matrix_folder(s) in forced_folders)
    return forced


def _step_states(steps: list[Step], forced: set[str]) -> dict[str, str]:
    """Each step's state: 'forced', 'done' or 'to do'.

    A step runs again when one of its inputs does: a training run deleted (or never committed, as in
    results/quick) and retrained elsewhere has other weights, and the cells crafted on the old ones would
    stand in the tables beside it. Steps come in plan order, so inputs are decided first."""
    states: dict[str, str] = {}
    for s in steps:
        if s.id in forced:
            states[s.id] = "forced"
        elif s.is_done() and all(states.get(i) == "done" for i in s.inputs):
            states[s.id] = "done"
        else:
            states[s.id] = "to do"
    return states


def _print_matrix_work(console: Console, wanted: list[Step], study: dict) -> None:
    work = matrix_work(wanted, study)
    if work["craft"]:
        console.print(f"attack matrices: {work['craft']:,} crafting forward+backward passes, {work['eval']:,} "
                      f"evaluation forward passes (scope {study['evaluation']['scope']}; sources: "
                      f"{work['eval_sources']:,}, full: {work['eval_full']:,})")


@contextmanager
def _study_lock(out_dir: Path):
    """Hold out_dir/.lock (one run per output folder) and clear what a killed run left; no .lock stays behind."""
    store.ensure_writable_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir / ".lock"
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"another 'transferlab run' is working on {out_dir} (lock {lock_path}); "
                        "wait for it to finish, or use another --out") from None
    try:
        # A run killed between renames leaves '.NAME.XXXXXXXX.tmp/.old' staging folders; they are ours to remove.
        clean_stale_staging(out_dir, recursive=True)
        yield
    finally:
        lock.release()
        lock_path.unlink(missing_ok=True)  # a finished or refused run leaves no .lock behind


def _write_study_file(path: Path, out_dir: Path, overrides: list[str] | None) -> None:
    """The study file as run, its --set overrides appended as comments."""
    store.atomic_write_text(out_dir / "study.toml", Path(path).read_text(encoding="utf-8") + "".join(
        f"\n# --set {item}" for item in (overrides or [])))


def _execute_steps(todo: list[Step], forced: set[str], ctx: StudyContext, executor) -> tuple[list[str], dict]:
    """Run the steps to do under a progress bar; the ids executed and each one's seconds."""
    executed: list[str] = []
    step_seconds: dict[str, float] = {}
    overall = Progress(TextColumn("[bold]study {task.fields[name]}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("steps"), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                       disable=not ctx.progress, console=progress_console())
    with overall:
        task = overall.add_task("study", total=len(todo), name=ctx.study["study"]["name"])
        announced: set[str] = set()

        def on_start(step: Step):
            overall.console.print(f"[{len(executed) + 1}/{len(todo)}] {step.id}")
            announced.add(step.id)

        def on_done(step: Step, seconds: float, summary: str):
            if step.id not in announced:  # an executor that cannot see a step start (Ray) names it when done
                on_start(step)
            overall.console.print(f"    {summary}", soft_wrap=True)
            executed.append(step.id)
            step_seconds[step.id] = round(seconds, 3)
            overall.advance(task)

        # A forced matrix must craft again rather than reuse its cached adversarial sets.
        remove_outputs([s for s in todo if s.id in forced and s.kind == "merge"])
        (executor or LocalExecutor()).run(todo, ctx, on_start, on_done)
    return executed, step_seconds
