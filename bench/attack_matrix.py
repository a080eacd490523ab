"""Attack matrix: craft once per source and evaluate every target, against crafting per cell.

S sources x T targets. The original experiment ran one script per (source, target) cell, so
each source's adversarial examples were crafted again for every target. ``run_matrix`` crafts
once per (source, attack, eps) and evaluates every target on that set. Both produce a table of
the targets' adversarial accuracy per cell; the bench checks the two tables are identical and
prints both times and their ratio (ideal: T).
Each per-cell 'script' reports what the original's did: the target's clean and adversarial
accuracy next to the source's accuracy on its own adversarial images.

The sources and targets are trained here, quickly, on the shipped samples: resnets pretrained
on kmnist-sample and fmnist-sample (3 epochs), and T fine-tunes of them on mnist-sample.

    python bench/attack_matrix.py            # S=2, T=4, PGD 10 steps, 500 samples
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _common import Timer, finish, table

import torch

from transferlab import attacks, data as data_mod, store
from transferlab.matrix import run_matrix
from transferlab.runs import FinetuneRequest, PretrainRequest, RunOutput, finetune, pretrain
from transferlab.device import choose_numerics, predict, resolve_device, to_float
from transferlab.training import TrainConfig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet", help="model family of sources and targets")
    p.add_argument("--targets", type=int, default=4, help="T, the number of fine-tuned targets")
    p.add_argument("--attack", default="pgd")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--samples", type=int, default=500, help="adversarial samples per cell (mnist-sample test: 900)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    return p.parse_args(argv)


def train_members(model: str, n_targets: int, device: str, runs: Path):
    """Two pretrained sources and ``n_targets`` fine-tunes of them, 3 epochs each, on the samples."""
    quick = TrainConfig(epochs=3, batch_size=128, lr=2e-3, schedule="onecycle", min_steps=0)
    sources = [pretrain(PretrainRequest(model=model, dataset=name), config=quick, device=device,
                        output=RunOutput(runs, progress=False)).run_dir
               for name in ("kmnist-sample", "fmnist-sample")]
    targets = []
    for i in range(n_targets):
        outcome = finetune(FinetuneRequest(dataset="mnist-sample", source=sources[i % 2], n=2000, freeze_n=0),
                           config=quick, seed=i // 2, device=device, output=RunOutput(runs, progress=False))
        targets.append(outcome.run_dir)
    return sources, targets


def per_cell_baseline(sources, targets, args, device: torch.device) -> tuple[dict, int]:
    """One 'script' per cell, as the original ran it: load both runs, craft on the source, and report
    the target's clean and adversarial accuracy next to the source's accuracy on its own set."""
    ds = data_mod.load("mnist-sample")
    index = data_mod.stratified_subset(ds.test.labels, args.samples, args.seed)  # run_matrix's sample set
    clean = to_float(ds.test.images[index].to(device))
    labels = ds.test.labels[index]
    params = attacks.attack_params(args.attack, args.eps, steps=args.steps)
    cells, crafted = {}, 0
    for source_dir in sources:
        for target_dir in targets:
            source, source_info = store.load_run(source_dir, device)
            target, target_info = store.load_run(target_dir, device)
            numerics = {}
            for name, model in (("source", source), ("target", target)):  # as run_matrix does: like with like
                numerics[name] = choose_numerics(model, device, "auto", batch_size=1000,
                                                 sample_shape=tuple(clean.shape[1:]), workload="attack")
                numerics[name].apply(model).eval()
            policy = attacks.choose_label_policy("auto", source_info["dataset"]["label_space"],
                                                 source_info["dataset"]["name"], ds.spec.label_space, ds.spec.name)
            src, tgt = numerics["source"], numerics["target"]
            y = predict(source, clean, device, 4096, src).to(device) if policy == "pred" else labels.to(device)
            adversarial = attacks.craft(source, clean, y, args.attack, args.eps, batch_size=1000, seed=args.seed,
                                        precision=src.precision, **params)
            crafted += 1
            # A source with other classes than MNIST's is scored against its own clean predictions (as run_matrix does).
            source_reference = labels if policy == "true" else predict(source, clean, device, 4096, src)
            cells[(source_info["name"], target_info["name"])] = {
                "target_clean": int((predict(target, clean, device, 4096, tgt) == labels).sum()),
                "target_adversarial": int((predict(target, adversarial, device, 4096, tgt) == labels).sum()),
                "source_own": int((predict(source, adversarial, device, 4096, src) == source_reference).sum()),
            }
    return cells, crafted


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    S, T = 2, args.targets
    settings = (f"S={S} sources x T={T} targets ({args.model}, trained 3 epochs on the shipped samples), "
                f"{args.attack} eps {args.eps} steps {args.steps}, {args.samples} mnist-sample test images, "
                f"device {device}")
    print(f"settings: {settings}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-matrix-") as scratch:
        scratch = Path(scratch)
        print("training sources and targets ...", flush=True)
        with Timer() as t_train:
            sources, targets = train_members(args.model, T, args.device, scratch / "runs")

        settings += f", {torch.get_num_threads()} torch threads (as the engine's last fit chose)"
        crafts = []

        def counting_craft(*a, **kw):
            crafts.append(1)
            return attacks.craft(*a, **kw)

        print("run_matrix: craft once per source ...", flush=True)
        with Timer() as t_ours:
            result = run_matrix(sources=sources, targets=targets, dataset="mnist-sample", attack_names=[args.attack],
                                eps_values=[args.eps], steps=args.steps, samples=args.samples, seed=args.seed,
                                device=args.device, white_box=False, out_dir=scratch / "matrix", batch_size=1000,
                                progress=False, craft_fn=counting_craft)
        print("baseline: craft per cell ...", flush=True)
        with Timer() as t_base:
            base_table, base_crafts = per_cell_baseline(sources, targets, args, device)

    by_cell = {(r.crafted_on, r.evaluated): r for r in result.cells.itertuples()}
    ours_table = {(src, tgt): {"target_clean": int(by_cell[(src, tgt)].clean_correct),
                               "target_adversarial": int(by_cell[(src, tgt)].adversarial_correct),
                               "source_own": int(by_cell[(src, src)].adversarial_correct)}
                  for (src, tgt) in base_table if (src, tgt) in by_cell and (src, src) in by_cell}
    identical = ours_table == base_table
    rows = []
    for key in sorted(base_table):
        mine, theirs = ours_table.get(key, {}), base_table[key]
        rows.append([*key, *(f"{mine.get(k, 'missing')} / {theirs[k]}" for k in theirs),
                     "yes" if mine == theirs else "NO"])
    ratio = t_base.seconds / t_ours.seconds
    printed = "\n".join([
        f"settings: {settings}",
        f"(training the {S + T} runs took {t_train.seconds:.1f}s, not counted)",
        "",
        f"correct out of {args.samples}, run_matrix / per cell:",
        table(["source", "target", "target clean", "target adversarial", "source on its own set", "same"], rows),
        "",
        table(["method", "crafts", "seconds"], [
            ["per cell (craft for every target; evaluate target and source)", base_crafts, f"{t_base.seconds:.1f}"],
            [f"run_matrix (craft once per source; also evaluates the {S} sources)", len(crafts),
             f"{t_ours.seconds:.1f}"],
        ]),
        "",
        f"tables identical: {'yes' if identical else 'NO'}",
        f"ratio (per cell / run_matrix seconds): {ratio:.2f}x  (target >= 0.8*T = {0.8 * T:.1f})",
    ])
    finish("bench/attack_matrix.py", printed, not args.no_record, device)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
