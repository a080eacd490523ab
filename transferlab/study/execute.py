"""Running a study's steps: one step in this process (execute_step), or all of them one after another
(LocalExecutor). Everything a step needs is in its config, its inputs' outputs and the StudyContext."""

from __future__ import annotations

import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from transferlab import ensemble, store
from transferlab.device import pinned_threads
from transferlab.config import MatrixDefaults
from transferlab.matrix import AttackRequest, Matrix, MatrixRuns, Member, make_spec
from transferlab.names import clean_stale_staging
from transferlab.runs import FinetuneRequest, PretrainRequest, RunOutput, finetune, pretrain
from transferlab.study.plan import MATRIX_KINDS, TRAIN_KINDS, Step, ensemble_specs, matrix_folder
from transferlab.training import TrainConfig


@dataclass
class StudyContext:
    study: dict
    out_dir: Path
    device: str
    data: object  # runs.DataOptions
    progress: bool
    steps: dict[str, Step]
    worker: dict = field(default_factory=lambda: {"executor": "local", "host": socket.gethostname()})
    log: tuple[str, ...] = ()  # --log trackers; they mirror results and are never part of a step's key
    # Merge steps run in this process, by step id: their tables, so collect_results need not read back the files
    # they have just written (a Ray worker's context is a copy: its merges are read from disk).
    merged: dict = field(default_factory=dict)


def execute_step(step: Step, ctx: StudyContext) -> str:
    """Run one step; return its one-line summary. Everything it needs is in its config and its inputs' outputs
    (and the thread count its plan decided)."""
    with pinned_threads(step.threads):
        return _execute_step(step, ctx)


def _execute_step(step: Step, ctx: StudyContext) -> str:
    if step.kind in TRAIN_KINDS:
        runs_dir = step.output.parent
        # An attempt killed mid-step (a worker that died and is retried) leaves its staging folder behind.
        clean_stale_staging(runs_dir, only_name=step.output.name)
        train = TrainConfig(**step.config["train"])
        data = step.config["data"]
        output = RunOutput(out_dir=runs_dir, name=step.output.name, progress=ctx.progress,
                           overwrite=True,  # a step whose key changed replaces its own output
                           record={"step_key": step.key, "step_id": step.id, "worker": ctx.worker}, log=ctx.log)
        common = dict(config=train, seed=step.seed, device=ctx.device, data=ctx.data, output=output)
        if step.kind == "pretrain":
            outcome = pretrain(PretrainRequest(model=step.config["model"], dataset=data["dataset"],
                                               options=step.config["options"], n=data["n"], canvas=data["canvas"]),
                               **common)
        elif step.kind == "finetune":
            source = ctx.steps[step.inputs[0]].output
            outcome = finetune(FinetuneRequest(dataset=data["dataset"], source=source, n=data["n"],
                                               freeze_n=step.config.get("freeze"),
                                               freeze_to=step.config.get("freeze_to")), **common)
        else:
            outcome = finetune(FinetuneRequest(dataset=data["dataset"], model=step.config["model"],
                                               options=step.config["options"], n=data["n"], canvas=data["canvas"]),
                               **common)
        return outcome.summary()
    if step.kind in MATRIX_KINDS:
        return _execute_matrix_step(step, ctx)
    raise ValueError(f"unknown step kind {step.kind}")


def _matrix_of(step: Step, ctx: StudyContext):
    """The transferlab.matrix.Matrix a craft, eval or merge step works on (nothing is loaded yet)."""

    attack, evaluation = step.config["attack"], step.config["evaluation"]
    runs = [ctx.steps[i] for i in ctx.steps if ctx.steps[i].seed == step.seed and ctx.steps[i].kind in TRAIN_KINDS]
    groups = ctx.study["evaluation"]["ensembles"]
    members = MatrixRuns(sources=[s.output for s in runs if s.kind == "pretrain"],
                         targets=[s.output for s in runs if s.kind != "pretrain"],
                         ensembles=ensemble_specs(groups, runs, step.seed))
    request = AttackRequest(names=[attack["attack"]], eps=attack["eps"] if "eps" in attack else [step.config["eps"]],
                            steps=attack["steps"], alpha=attack["alpha"], options=attack["options"])
    settings = MatrixDefaults(samples=evaluation["samples"], labels=evaluation["labels"],
                              white_box=ctx.study["evaluation"]["white_box"], scope=evaluation["scope"],
                              batch_size=evaluation["batch_size"], precision=evaluation["precision"])
    spec = make_spec(runs=members, dataset=evaluation["dataset"], attack=request, evaluation=settings,
                     seed=step.seed, device=ctx.device, data=ctx.data, out_dir=matrix_folder(step))
    spec.canvas = ctx.study["data"]["canvas"]
    return Matrix(spec)


def _member(matrix, ctx: StudyContext, step_ids: list[str], role: str):
    if role == "ensemble":
        return ensemble.make_member([matrix.member(ctx.steps[i].output, "source") for i in step_ids], Member)
    return matrix.member(ctx.steps[step_ids[0]].output, role)


def _execute_matrix_step(step: Step, ctx: StudyContext) -> str:
    started = time.perf_counter()
    matrix = _matrix_of(step, ctx)
    if step.kind == "merge":
        # The work of this matrix's craft and eval steps, from their receipts (each ran in its own process).
        receipts = [store.read_json(s.output) for s in ctx.steps.values() if s.kind in ("craft", "eval")
                    and matrix_folder(s) == matrix_folder(step) and s.output.is_file()]
        crafts = [r for r in receipts if r["step_id"].startswith("craft/")]
        totals = {"crafted": sum(bool(r.get("crafted")) for r in crafts),
                  "reused": sum(not r.get("crafted") for r in crafts),
                  "craft_seconds": round(sum(r["seconds"] for r in crafts), 3),
                  "eval_seconds": round(sum(r["seconds"] for r in receipts if r not in crafts), 3)}
        result = matrix.merge(record={"step_key": step.key, "step_id": step.id, **totals})
        ctx.merged[step.id] = result
        return result.summary()
    crafter = _member(matrix, ctx, step.config["crafter"], step.config["role"])
    if step.kind == "craft":
        setting = next(s for s in matrix.spec.settings if s.eps == step.config["eps"])
        adversarial = matrix.adversarial(crafter, setting)
        if not matrix.keeps_set(crafter):  # a white-box set that is not kept: score its target now
            matrix.evaluate(crafter, setting, crafter, adversarial)
            matrix.pair(crafter, crafter)
        what = f"{'crafted' if matrix.crafted else 'read back'} {setting.name} eps={setting.eps:.4g} on {crafter.name}"
    else:
        ids = step.config["evaluated"]
        evaluated = [ctx.steps[i] for i in (ids if isinstance(ids, list) else [ids])]
        members = [matrix.member(e.output, "source" if e.kind == "pretrain" else "target") for e in evaluated]
        for setting in matrix.spec.settings:
            matrix.evaluate_many(crafter, setting, members)
        for member in members:
            matrix.pair(crafter, member)
        what = f"{', '.join(m.name for m in members)} on {len(matrix.spec.settings)} sets of {crafter.name}"
    seconds = time.perf_counter() - started
    summary = f"{what} in {seconds:.1f}s"
    store.atomic_write_json(step.output, {"step_key": step.key, "step_id": step.id, "summary": summary,
                                          "seconds": round(seconds, 3), "crafted": matrix.crafted,
                                          "worker": ctx.worker, "threads": step.threads})
    return summary


class LocalExecutor:
    """Runs steps one after another in this process.

    The planner only hands over ``Step`` objects and a context, so another executor (one
    that ships steps to Ray workers, say) can replace this one without touching the plan.
    """

    def run(self, steps: list[Step], ctx: StudyContext, on_start=None, on_done=None) -> None:
        """``on_start(step)`` as a step begins, ``on_done(step, seconds, summary)`` once it has finished."""
        for step in steps:
            if on_start:
                on_start(step)
            started = time.perf_counter()
            summary = execute_step(step, ctx)
            if on_done:
                on_done(step, time.perf_counter() - started, summary)


def remove_outputs(steps: list[Step]) -> None:
    """Used by --force: drop a step's output so it is rebuilt (a merge step's: its whole matrix folder)."""
    for step in steps:
        target = matrix_folder(step) if step.kind == "merge" else step.output
        if target is not None and target.exists():
            shutil.rmtree(target)
