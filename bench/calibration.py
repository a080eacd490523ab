"""What ``--precision auto`` costs the first time, and what CPU batches cost crafting.

1. For each model family and workload (train: parameter gradients; attack: input gradients, shared by
   crafting and evaluation), times ``device.choose_numerics`` from a cold cache, as a user's first run
   waits for it, and prints the decision and each candidate's step time. The first calibration of the
   process also pays the one-thread contention check; its row says so. Aim (issue 10): under 3 s per model.
2. Crafts PGD (5 steps) on 500 random images with each family, once in one batch of 500 (how crafting
   ran before ``CPU_CRAFT_BATCH``) and once in the CPU's capped batches, and prints the share of pixels
   that differ (rounding in other kernels; the run fails above 1%, where batching would be broken).

    python bench/calibration.py                    # resnet, alexnet, mixer
    python bench/calibration.py --models resnet    # one family
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _common import Timer, finish, machine, table

import torch

from transferlab import attacks, device as device_mod
from transferlab.device import choose_numerics, configure_cpu_threads, resolve_device
from transferlab.models import create_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet,alexnet,mixer", help="comma list of model families")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=128, help="the training batch the decision is for")
    p.add_argument("--craft-images", type=int, default=500)
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    return p.parse_args(argv)


def calibrate(model, device, workload: str, batch_size: int) -> dict:
    seen = []
    device_mod.CALIBRATION_HOOKS.append(lambda key, decision: seen.append(decision))
    try:
        with tempfile.TemporaryDirectory() as cache, Timer() as timer:
            chosen = choose_numerics(model, device, "auto", batch_size=batch_size, sample_shape=(1, 28, 28),
                                     workload=workload, cache_dir=Path(cache))
    finally:
        device_mod.CALIBRATION_HOOKS.pop()
    steps = ", ".join(f"{label} {ms:,.0f}" for label, ms in seen[0]["step_ms"].items())
    return {"seconds": timer.seconds, "chosen": chosen.label, "numerics": chosen, "steps": steps}


def crafting(model, device, images, labels, batch_size: int, steps: int = 5) -> tuple[float, torch.Tensor]:
    attacks.craft(model, images[:32], labels[:32], "pgd", 0.1, steps=1, batch_size=batch_size)  # warm-up
    with Timer() as timer:
        adversarial = attacks.craft(model, images, labels, "pgd", 0.1, steps=steps, batch_size=batch_size, seed=1)
    return len(images) * steps / timer.seconds, adversarial


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu":
        configure_cpu_threads()
    families = [m.strip() for m in args.models.split(",") if m.strip()]
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((args.craft_images, 1, 28, 28), generator=generator).to(device)
    labels = torch.randint(0, 10, (args.craft_images,), generator=generator).to(device)
    calibration_rows, craft_rows, all_close = [], [], True
    first = True
    for family in families:
        torch.manual_seed(0)
        model = create_model(family, num_classes=10).to(device)
        decided = {}
        for workload in ("train", "attack"):
            print(f"calibrating {family} ({workload}) ...", flush=True)
            r = calibrate(model, device, workload, args.batch_size)
            decided[workload] = r["numerics"]
            note = " (+ the contention check, once per process)" if first and device.type == "cpu" else ""
            first = False
            aim = "yes" if r["seconds"] < 3 else "no"
            calibration_rows.append([family, workload + note, f"{r['seconds']:.2f}", aim, r["chosen"], r["steps"]])
        numerics = decided["attack"]  # crafting runs as the attack matrix would
        numerics.apply(model).eval()
        print(f"crafting with {family} ...", flush=True)
        saved = attacks.CPU_CRAFT_BATCH
        attacks.CPU_CRAFT_BATCH = len(images)  # the batch as asked: how crafting ran before the cap
        try:
            whole_ips, whole = crafting(model, device, images, labels, len(images))
        finally:
            attacks.CPU_CRAFT_BATCH = saved
        capped_ips, capped = crafting(model, device, images, labels, len(images))
        moved = float((whole != capped).float().mean())
        all_close &= moved < 1e-2
        craft_rows.append([family, numerics.label, f"{whole_ips:,.0f}", f"{capped_ips:,.0f}",
                           f"{capped_ips / whole_ips:.2f}x", f"{moved:.4%}"])

    capped_batch = min(len(images), device_mod.CPU_CRAFT_BATCH) if device.type == "cpu" else len(images)
    printed = "\n".join([
        f"machine: {machine(device)}",
        "",
        table(["model", "workload", "cold calibration s", "< 3 s", "decision", "step ms per candidate"],
              calibration_rows),
        "",
        table(["PGD, 5 steps", "numerics", f"one batch of {len(images)}: image-steps/s",
               f"batches of {capped_batch}: image-steps/s", "speed-up", "pixels that differ"], craft_rows),
        "",
        "(the batch picks the convolution kernels; their rounding can flip the sign of a near-zero gradient in "
        "an iterative attack; a broken batching would move most of them: the run fails above 1%)",
    ])
    finish(f"bench/calibration.py on {device}", printed, not args.no_record, device)
    return 0 if all_close else 1


if __name__ == "__main__":
    sys.exit(main())
