"""Frozen-prefix cache: fine-tuning and attack-matrix evaluation with and without it, in one run.

1. Fine-tune K->M: a source pretrained on KMNIST, fine-tuned on n MNIST images (default 10,000) at each
   family's reference freeze depth (resnet 23, alexnet 8, mixer 2: studies/reference.toml), fp32, once with
   the frozen prefix cached (transferlab.prefix) and once with the full forward (prefix.ENABLED off). Prints
   seconds per epoch both ways and their ratio, the one-time cost of computing the frontier, the largest
   difference between the two runs' trained weights, and the test accuracy both ways.
2. Shared-prefix evaluation: 4 targets fine-tuned from the resnet source, scored on one PGD set of 2,000
   MNIST test images, each model whole against Matrix.predict_many (the prefix once per batch, then each
   tail); the predictions must be equal.
   Beside each measured ratio, its FLOP bound: what the cache would gain if every FLOP took the same time and
   nothing else cost any (flop_bounds). Where time follows FLOPs the measured ratio sits near it; saved per-step
   or per-model overhead can put it above, slow early layers (the issue's Intel Xeon) far above.
3. The quick study (studies/quick.toml), cold cache, as a subprocess under /usr/bin/time: wall, peak memory,
   and where the seconds went (steps by kind, and the rest: start-up imports, planning, report). With
   --baseline-tree PATH it also runs the study with the code of another checkout (before/after).

    python bench/prefix.py                         # everything (about 10 minutes on 2 busy cores)
    python bench/prefix.py --families resnet --skip-study
    python bench/prefix.py --baseline-tree /work/main

Timings on a shared machine drift: the load average is printed and recorded with the results.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REAL_DATA, ROOT, Timer, cpu_model, finish, load_average, table

import torch

from transferlab import prefix
from transferlab.config import MatrixDefaults
from transferlab.runs import DataOptions, FinetuneRequest, PretrainRequest, RunOutput, finetune, pretrain
from transferlab.store import load_run
from transferlab.training import TrainConfig

REFERENCE_FREEZE = {"resnet": 23, "alexnet": 8, "mixer": 2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="resnet,alexnet,mixer")
    p.add_argument("--n", type=int, default=10_000, help="MNIST images each fine-tune trains on")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--source-n", type=int, default=5000, help="KMNIST images the sources pretrain on (1 epoch)")
    p.add_argument("--eval-images", type=int, default=2000, help="PGD set size for the shared-prefix part")
    p.add_argument("--targets", type=int, default=4)
    p.add_argument("--target-n", type=int, default=1000, help="MNIST images each of those targets fine-tunes on")
    p.add_argument("--pgd-steps", type=int, default=5)
    p.add_argument("--skip-study", action="store_true")
    p.add_argument("--baseline-tree", type=Path, default=None, help="another checkout: its quick study too")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("TRANSFERLAB_DATA", REAL_DATA)))
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    return p.parse_args(argv)


def _train(args, work: Path, family: str, source: Path, cached: bool, n: int, name: str, epochs: int):
    prefix.ENABLED = cached
    try:
        outcome = finetune(FinetuneRequest(dataset="mnist", source=source, n=n, freeze_n=REFERENCE_FREEZE[family]),
                           device="cpu", output=RunOutput(work, name=name, progress=False),
                           data=DataOptions(args.data_dir, download=False),
                           config=TrainConfig(epochs=epochs, batch_size=128, precision="fp32", min_steps=0))
    finally:
        prefix.ENABLED = True
    return outcome.info, load_run(outcome.run_dir)[0].state_dict()


@functools.lru_cache(maxsize=None)  # both tables ask for the resnet source's bounds: counted once
def flop_bounds(source: Path, freeze_n: int, targets: int) -> tuple[float, float]:
    """The most either cache can gain if every FLOP costs the same time (FlopCounterMode's multiply-add count,
    per image): fine-tuning, (prefix forward + tail forward and backward) / (tail forward and backward);
    evaluation of ``targets`` models sharing the prefix, targets x (prefix + tail) / (prefix + targets x tail),
    forward only."""
    from torch.utils.flop_counter import FlopCounterMode

    from transferlab.models import freeze, set_train_mode

    model = load_run(source)[0].float()
    freeze(model, freeze_n)
    set_train_mode(model, "frozen")
    sample = torch.rand(3, 1, 28, 28)  # the bench's sources are KMNIST (gray28) models
    split = prefix.split_model(model, sample)
    frontier = [t.detach() for t in split.prefix(sample[:1])]

    def counted(fn) -> float:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return float(counter.get_total_flops())

    train_tail = counted(lambda: split.tail(*frontier).logsumexp(1).sum().backward())
    model.eval()
    with torch.no_grad():
        eval_prefix = counted(lambda: split.prefix(sample[:1]))
        eval_tail = counted(lambda: split.tail(*frontier))
    fine_tune = (split.flops_per_image + train_tail) / train_tail
    shared = targets * (eval_prefix + eval_tail) / (eval_prefix + targets * eval_tail)
    return fine_tune, shared


def finetune_rows(args, work: Path) -> tuple[list, dict]:
    rows, sources = [], {}
    for family in args.families.split(","):
        sources[family] = pretrain(PretrainRequest(model=family, dataset="kmnist", n=args.source_n), device="cpu",
                                   output=RunOutput(work, progress=False),
                                   data=DataOptions(args.data_dir, download=False),
                                   config=TrainConfig(epochs=1, batch_size=128, precision="fp32",
                                                      min_steps=0)).run_dir
        cached, cached_w = _train(args, work, family, sources[family], True, args.n, f"{family}-cached", args.epochs)
        full, full_w = _train(args, work, family, sources[family], False, args.n, f"{family}-full", args.epochs)
        per_epoch = [sum(h["seconds"] for h in run["history"]) / len(run["history"]) for run in (cached, full)]
        one_time = cached["frozen_prefix"].get("seconds", 0.0)
        diff = max((cached_w[k].float() - full_w[k].float()).abs().max().item() for k in cached_w)
        bound = (f"{flop_bounds(sources[family], REFERENCE_FREEZE[family], args.targets)[0]:.2f}x"
                 if cached["frozen_prefix"]["path"] != "full forward" else "-")
        rows.append([family, REFERENCE_FREEZE[family], cached["frozen_prefix"]["why"], f"{per_epoch[1]:.2f}",
                     f"{per_epoch[0]:.2f}", f"{per_epoch[1] / per_epoch[0]:.2f}x", bound, f"{one_time:.2f}",
                     f"{full['train_seconds'] / cached['train_seconds']:.2f}x", f"{diff:.3g}",
                     f"{full['metrics']['test_accuracy']:.2%}", f"{cached['metrics']['test_accuracy']:.2%}"])
    return rows, sources


def shared_eval_rows(args, work: Path, source: Path) -> list:
    from transferlab import matrix as matrix_mod
    from transferlab.matrix import members as matrix_members

    targets = [finetune(FinetuneRequest(dataset="mnist", source=source, n=args.target_n, freeze_n=23), seed=i,
                        device="cpu", output=RunOutput(work, progress=False),
                        data=DataOptions(args.data_dir, download=False),
                        config=TrainConfig(epochs=1, batch_size=128, min_steps=0)).run_dir
               for i in range(args.targets)]
    spec = matrix_mod.make_spec(runs=matrix_mod.MatrixRuns([source], targets), dataset="mnist",
                                attack=matrix_mod.AttackRequest(["pgd"], [0.1], steps=args.pgd_steps),
                                evaluation=MatrixDefaults(samples=args.eval_images), device="cpu",
                                data=DataOptions(args.data_dir, download=False), out_dir=work / "matrix")
    matrix = matrix_mod.Matrix(spec)
    members = matrix.targets()
    adversarial = matrix.adversarial(matrix.sources()[0], spec.settings[0])
    for member in members:
        matrix.model(member)  # loaded and calibrated before either timing
    with Timer() as alone:
        each = [matrix.predict(m, adversarial) for m in members]
    matrix_members._SPLITS.values.clear()  # the shared pass pays for tracing the models, as an eval step's first set does
    with Timer() as shared:
        together = matrix.predict_many(members, adversarial)
    with Timer() as again:
        matrix.predict_many(members, adversarial)
    equal = all(torch.equal(a, b) for a, b in zip(each, together))
    return [[f"{args.targets} resnet targets (freeze 23), PGD ({args.pgd_steps} steps) set of {args.eval_images}", f"{alone.seconds:.2f}",
             f"{shared.seconds:.2f}", f"{again.seconds:.2f}", f"{alone.seconds / again.seconds:.2f}x",
             f"{flop_bounds(source, 23, args.targets)[1]:.2f}x", "yes" if equal else "NO"]]


def quick_study(tree: Path) -> dict:
    """The quick study under /usr/bin/time -v with the code of ``tree``, cold caches."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(tree), "TRANSFERLAB_CACHE": f"{tmp}/cache"}
        env.pop("OMP_NUM_THREADS", None)
        started = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "transferlab.cli", "run",
                               str(tree / "studies" / "quick.toml"), "--out", f"{tmp}/q", "--no-progress"],
                              env=env, capture_output=True, text=True, cwd=tree)
        wall = time.perf_counter() - started
        if done.returncode:
            raise SystemExit(f"quick study failed in {tree}:\n{done.stderr[-2000:]}")
        peak_kb = next(int(line.split()[-1]) for line in done.stderr.splitlines() if "Maximum resident" in line)
        record = json.loads(Path(f"{tmp}/q/study.json").read_text())
        imports = subprocess.run([sys.executable, "-c", "import time; t = time.perf_counter(); "
                                  "import transferlab.cli, transferlab.study; print(time.perf_counter() - t)"],
                                 env=env, capture_output=True, text=True).stdout.strip()
    kinds: dict[str, float] = {}
    for step in record["steps"]:
        kinds[step["kind"]] = kinds.get(step["kind"], 0.0) + (step["seconds"] or 0.0)
    return {"wall": wall, "peak_gb": peak_kb / 1e6, "kinds": kinds, "study_wall": record["wall_time_s"],
            "imports": float(imports or "nan")}


def study_rows(args) -> list:
    trees = ([("before", args.baseline_tree)] if args.baseline_tree else []) + [("after", ROOT)]
    rows = []
    for label, tree in trees:
        r = quick_study(Path(tree))
        steps = sum(r["kinds"].values())
        rows.append([label, f"{r['wall']:.1f}", f"{r['peak_gb']:.2f}", f"{r['imports']:.1f}",
                     *(f"{r['kinds'].get(k, 0.0):.1f}" for k in ("pretrain", "finetune", "craft", "eval", "merge")),
                     f"{r['study_wall'] - steps:.1f}", f"{r['wall'] - r['study_wall']:.1f}"])
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    print(f"CPU: {cpu_model()}; load average at the start (1/5/15 min): {load_average()}")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("TRANSFERLAB_CACHE", f"{tmp}/cache")
        train, sources = finetune_rows(args, Path(tmp))
        printed = "Fine-tune K->M, n={:,}, {} epochs, batch 128, fp32, 2 threads:\n\n".format(args.n, args.epochs)
        printed += table(["model", "freeze", "path", "full s/epoch", "cached s/epoch", "ratio",
                          "FLOP bound", "frontier once s", "whole fit ratio", "max weight diff", "test acc full", "test acc cached"],
                         train)
        if "resnet" in sources:
            printed += "\n\nShared-prefix evaluation (forward passes on the adversarial set; models loaded before):\n\n"
            printed += table(["work", "each model whole s", "shared, first (tracing) s", "shared s", "ratio",
                              "FLOP bound", "same predictions"], shared_eval_rows(args, Path(tmp), sources["resnet"]))
    if not args.skip_study:
        printed += ("\n\nQuick study (studies/quick.toml, cold cache, /usr/bin/time; seconds):\n\n"
                    + table(["code", "wall", "peak GB", "imports", "pretrain", "finetune", "craft", "eval", "merge",
                             "run_study outside steps", "outside run_study (imports, report)"], study_rows(args)))
    printed += f"\n\nload average at the end (1/5/15 min): {load_average()}"
    finish("Frozen-prefix cache (bench/prefix.py)", printed, not args.no_record)


if __name__ == "__main__":
    main()
