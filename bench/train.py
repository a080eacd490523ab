"""Training speed: the transferlab engine against a loop written the way the original experiment was.

Both loops train the same model (same initial weights), on the same MNIST images, with
Adam and the same per-step cosine learning-rate decay, batch size, epochs and device. The
baseline is what the original scripts did: a torchvision ``datasets.MNIST`` with ``ToTensor()`` and
``Normalize((0.1307,), (0.3081,))`` per sample, a ``DataLoader`` with shuffle and 2 workers
(4 on a GPU), fp32 and a plain loop. Ours is ``transferlab.training.fit``: the data resident
on the device as uint8, batches as index slices, normalisation inside the model.

Both then report accuracy on the full MNIST test set; the run fails unless the two are
within --tolerance points, so speed is not bought with broken training. The last line
printed is the speed ratio.

    python bench/train.py --quick                 # resnet, 10,000 images, 2 epochs
    python bench/train.py --model mixer --quick   # 10 epochs
    python bench/train.py --quick --ablation      # also: each of our speed choices switched off
    python bench/train.py --quick --repeat 3      # three pairs taking turns; medians (a shared VM drifts)

After training, ours also crafts PGD (10 steps) on 1,000 test images with the trained model, as
the attack matrix does (same precision decision), and prints crafting throughput in image-steps/s
beside training images/s: each PGD step is one forward and one backward pass, like a training
step without the optimizer, so crafting should reach at least 70% of training throughput.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import tempfile
from pathlib import Path

from _common import REAL_DATA, Timer, cores, finish, machine, table

import torch
import torch.nn.functional as F

from transferlab import attacks, data as data_mod
from transferlab import device as device_mod
from transferlab.device import choose_numerics, to_float
from transferlab.errors import UserError
from transferlab.models import create_model
from transferlab.training import TrainConfig, accuracy, fit, resolve_device

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet", choices=["resnet", "alexnet", "mixer"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--quick", action="store_true", help="10,000 training images and fewer epochs (minutes on 2 CPU cores)")
    p.add_argument("--n", type=int, default=None, help="training images (default: 20,000; --quick 10,000)")
    p.add_argument("--epochs", type=int, default=None,
                   help="default: resnet/alexnet 3 (--quick 2), mixer 10 (the mixer learns slower; before about "
                        "10 epochs its test accuracy still moves by half a point with the data order alone)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile our model (falls back to eager)")
    p.add_argument("--no-channels-last", action="store_true", help="ablation: our loop without channels_last")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="ours: auto (measured once per machine and model, then cached; the default users get), "
                        "fp32 or bf16")
    p.add_argument("--ablation", action="store_true",
                   help="also train ours with each speed choice set explicitly in turn: fp32, bf16, contiguous, "
                        "the other thread count, torch.compile on")
    p.add_argument("--craft-images", type=int, default=1000, help="test images PGD crafts on after training")
    p.add_argument("--baseline-threads", type=int, default=None,
                   help="torch threads for the baseline (default: torch's own default, as the original ran)")
    p.add_argument("--repeat", type=int, default=1,
                   help="train ours and the baseline this many times each, taking turns, and compare medians: a "
                        "shared 2-vCPU machine's speed drifts by 10-30%% within minutes, enough to move one pair's ratio")
    p.add_argument("--tolerance", type=float, default=0.5, help="allowed test-accuracy gap in points")
    p.add_argument("--data-dir", type=Path, default=REAL_DATA, help="torchvision root holding MNIST/raw")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    args.n = args.n or (10_000 if args.quick else 20_000)
    args.epochs = args.epochs or (10 if args.model == "mixer" else 2 if args.quick else 3)
    return args


# ------------------------------------------------------------------------- data
def _write_idx(path: Path, tensor: torch.Tensor) -> None:
    """Write a uint8 tensor as an IDX file (the MNIST format: magic, big-endian dims, bytes)."""
    dims = tuple(tensor.shape)
    magic = 0x0800 + len(dims)  # 0x08 = unsigned byte
    path.write_bytes(struct.pack(f">I{len(dims)}I", magic, *dims) + tensor.contiguous().numpy().tobytes())


def mnist_root(data_dir: Path, scratch: Path):
    """(root for torchvision.datasets.MNIST, our Dataset, description). Falls back to the shipped
    mnist-sample written out in torchvision's layout when the real files are not there."""
    try:
        ds = data_mod.load("mnist", data_dir=data_dir, download=False)
        return data_dir, ds, f"MNIST from {data_dir}"
    except UserError:
        ds = data_mod.load("mnist-sample")
        raw = scratch / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for split, prefix in (("train", "train"), ("test", "t10k")):
            part = getattr(ds, split)
            _write_idx(raw / f"{prefix}-images-idx3-ubyte", part.images[:, 0])
            _write_idx(raw / f"{prefix}-labels-idx1-ubyte", part.labels.to(torch.uint8))
        return scratch, ds, f"mnist-sample written as IDX files ({data_dir} has no MNIST)"


# --------------------------------------------------------------------- baseline
def baseline_train(model, root: Path, indices, args, device: torch.device):
    """The original's loop: per-sample transforms, DataLoader workers, fp32, nothing resident."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
    train_set = datasets.MNIST(str(root), train=True, transform=transform, download=False)
    if indices is not None:
        train_set = Subset(train_set, indices.tolist())
    workers = 4 if device.type == "cuda" else 2
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(args.seed))
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    # The same per-step cosine decay as ours: without it, where training stops decides the
    # test accuracy to +-3 points at these short runs, and the accuracy check means nothing.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(loader))
    seen = 0
    with Timer() as timer:
        for _ in range(args.epochs):
            model.train()
            running_loss = 0.0
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                schedule.step()
                running_loss += loss.item()
                seen += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return seen / timer.seconds, timer.seconds, workers


def baseline_test_accuracy(model, root: Path, device: torch.device) -> tuple[float, float]:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
    test_set = datasets.MNIST(str(root), train=False, transform=transform, download=False)
    loader = DataLoader(test_set, batch_size=1000, num_workers=4 if device.type == "cuda" else 2)
    model.eval()
    correct = 0
    with Timer() as timer, torch.no_grad():
        for x, y in loader:
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    return correct / len(test_set), timer.seconds


# ------------------------------------------------------------------------- ours
def train_ours(args, images, labels, test, device, threads: int | None = None, **overrides) -> dict:
    """Train a fresh model (the shared initial weights) with ``fit``; speed and test accuracy."""
    torch.manual_seed(args.seed)
    # Normalisation lives in the model, with the baseline's constants.
    model = create_model(args.model, mean=[MNIST_MEAN], std=[MNIST_STD])
    options = dict(compile=args.compile, channels_last=not args.no_channels_last, precision=args.precision)
    options.update(overrides)
    # min_steps=0: exactly the epochs the baseline trains (the default step budget would add epochs on
    # small data, and the images/s and accuracy would no longer compare like with like).
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer="adam",
                         schedule="cosine", min_steps=0, **options)
    saved = os.environ.get("OMP_NUM_THREADS")
    if threads is not None:  # configure_cpu_threads honours it
        os.environ["OMP_NUM_THREADS"] = str(threads)
    calibrations = []  # a first use of "auto" on this machine and model times its candidates inside fit
    device_mod.CALIBRATION_HOOKS.append(lambda key, decision: calibrations.append(decision["calibration_seconds"]))
    try:
        with Timer() as t_train:
            result = fit(model, images, labels, config, device, seed=args.seed, progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    finally:
        device_mod.CALIBRATION_HOOKS.pop()
        if threads is not None and saved is None:
            del os.environ["OMP_NUM_THREADS"]
        elif threads is not None:
            os.environ["OMP_NUM_THREADS"] = saved
    used_threads = torch.get_num_threads()
    numerics = result.numerics
    with Timer() as t_eval:
        acc = accuracy(model, test.images, test.labels, device, config.eval_batch_size, numerics)
    label = (f"{used_threads} thread{'s' if used_threads != 1 else ''}" if device.type == "cpu" else str(device)) + \
        f", {numerics.precision}, {'channels_last' if numerics.channels_last else 'contiguous'}" + \
        f" ({'measured' if numerics.decided_by == 'measured' else 'asked'})" + (", compile" if config.compile else "")
    return {"label": label, "threads": used_threads, "ips": args.epochs * len(labels) / t_train.seconds,
            "seconds": t_train.seconds, "calibration_seconds": sum(calibrations), "accuracy": acc, "eval_seconds": t_eval.seconds, "model": model,
            "precision": config.precision}


def craft_throughput(args, model, test, device, precision: str) -> dict:
    """PGD image-steps/s on the trained model, as the attack matrix crafts (its numerics decision)."""
    steps, n = 10, min(args.craft_images, len(test))
    images = to_float(test.images[:n]).to(device)
    labels = test.labels[:n].to(device)
    numerics = choose_numerics(model, device, precision, batch_size=n, sample_shape=tuple(images.shape[1:]),
                               workload="attack")
    numerics.apply(model).eval()
    attacks.craft(model, images[:64], labels[:64], "pgd", 0.1, steps=1, precision=numerics.precision)  # warm-up
    with Timer() as t:
        attacks.craft(model, images, labels, "pgd", 0.1, steps=steps, batch_size=n, precision=numerics.precision)
    return {"ips": n * steps / t.seconds, "seconds": t.seconds, "label": numerics.label,
            "decided_by": numerics.decided_by}


# ------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    default_threads = torch.get_num_threads()
    base_threads = args.baseline_threads or default_threads
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        root, ds, source = mnist_root(args.data_dir, Path(scratch))
        n = min(args.n, len(ds.train))
        indices = data_mod.stratified_subset(ds.train.labels, n, args.seed) if n < len(ds.train) else None
        images = ds.train.images if indices is None else ds.train.images[indices]
        labels = ds.train.labels if indices is None else ds.train.labels[indices]
        settings = (f"model {args.model}, device {device}, {n:,} training images ({source}), {args.epochs} epochs, "
                    f"batch {args.batch_size}, Adam lr {args.lr} with per-step cosine decay, seed {args.seed}, "
                    f"test set {len(ds.test):,} images"
                    + (", ablation rows after a short warm-up of every kernel" if args.ablation else "")
                    + f", precision {args.precision}"
                    + "".join(f", --{flag}" for flag in ("compile", "no-channels-last")
                              if getattr(args, flag.replace("-", "_"))))
        print(f"settings: {settings}", flush=True)

        if args.ablation:  # warm every kernel up first, so the order of the rows does not favour later ones
            warm = argparse.Namespace(**{**vars(args), "epochs": 1})
            for precision in ("fp32", "bf16"):
                train_ours(warm, images[:512], labels[:512], ds.test, device, precision=precision)
        print("training with the transferlab engine ...", flush=True)
        ours = train_ours(args, images, labels, ds.test, device)
        print("crafting PGD with the trained model ...", flush=True)
        crafting = craft_throughput(args, ours["model"], ds.test, device, args.precision)
        ablations = []
        if args.ablation:  # each of our speed choices set explicitly in turn
            variants = [("fp32", {"precision": "fp32"}), ("bf16", {"precision": "bf16"}),
                        ("contiguous (no channels_last)", {"channels_last": False}),
                        # the other thread count: every core if ours ran fewer (OMP_NUM_THREADS), else one
                        ("threads", {"threads": cores() if ours["threads"] < cores() else 1}),
                        ("torch.compile", {"compile": True})]
            if "contiguous" in ours["label"]:  # no 2-D convolutions, or measured slower: nothing to switch off
                variants = [v for v in variants if "channels_last" not in v[1]]
            for name, change in variants:
                print(f"ablation: {name} ...", flush=True)
                ablations.append(train_ours(args, images, labels, ds.test, device, **change))

        def baseline_once():
            torch.set_num_threads(base_threads)  # the original ran with torch's default
            # The same initial weights; the transform normalises, so the model's own layer is the identity.
            torch.manual_seed(args.seed)
            base = create_model(args.model, mean=[0.0], std=[1.0])
            ips, seconds, workers = baseline_train(base, root, indices, args, device)
            torch.set_num_threads(default_threads)
            return {"ips": ips, "seconds": seconds, "workers": workers, "model": base}

        print("training with the DataLoader baseline ...", flush=True)
        baselines = [baseline_once()]
        repeats = [ours]
        for i in range(1, args.repeat):  # more pairs, taking turns, so that a drift in speed hits both
            print(f"repeat {i + 1}/{args.repeat}: ours, then the baseline ...", flush=True)
            repeats.append(train_ours(args, images, labels, ds.test, device))
            baselines.append(baseline_once())
        torch.set_num_threads(base_threads)
        base_acc, base_eval_seconds = baseline_test_accuracy(baselines[0]["model"], root, device)
        workers = baselines[0]["workers"]

    base_ips = statistics.median(b["ips"] for b in baselines)
    base_seconds = statistics.median(b["seconds"] for b in baselines)
    if args.repeat > 1:  # the medians of the pairs; the first row's calibration stays in its own numbers
        ours = {**ours, "ips": statistics.median(r["ips"] for r in repeats),
                "seconds": statistics.median(r["seconds"] for r in repeats)}
    ratio = ours["ips"] / base_ips
    gap = abs(ours["accuracy"] - base_acc) * 100
    ok = gap <= args.tolerance

    def row(name, r):
        return [name, f"{r['ips']:,.0f}", f"{r['seconds']:.1f}", f"{r['accuracy']:.2%}", f"{r['eval_seconds']:.2f}",
                f"{r['ips'] / base_ips:.2f}x"]

    rows = [
        ["baseline: torchvision MNIST + ToTensor/Normalize, DataLoader "
         f"shuffle, {workers} workers, fp32, {base_threads} threads", f"{base_ips:,.0f}", f"{base_seconds:.1f}",
         f"{base_acc:.2%}", f"{base_eval_seconds:.2f}", "1.00x"],
        row(f"transferlab engine (fit), {ours['label']}", ours),
    ] + [row(f"ablation: {r['label']}", r) for r in ablations]
    craft_ratio = crafting["ips"] / ours["ips"]
    calibrated = ours["calibration_seconds"]
    if args.repeat > 1:
        calibration_line = (
            f"medians of {args.repeat} pairs taking turns (ours, baseline, ours, ...): ours "
            f"{min(r['ips'] for r in repeats):,.0f}-{max(r['ips'] for r in repeats):,.0f} img/s, baseline "
            f"{min(b['ips'] for b in baselines):,.0f}-{max(b['ips'] for b in baselines):,.0f}; calibration "
            f"{calibrated:.1f} s inside the first of ours (cached for the others)")
    elif calibrated:
        calibration_line = (
            f"calibration: {calibrated:.1f} s of our {ours['seconds']:.1f} s (first use of auto for this machine "
            f"and model, cached for later runs); without it "
            f"{ratio * ours['seconds'] / (ours['seconds'] - calibrated):.2f}x")
    else:
        calibration_line = "calibration: none in this run (the decision was cached by an earlier one)"
    printed = "\n".join([
        f"settings: {settings}",
        "",
        f"machine: {machine(device)}",
        "",
        table(["loop", "train images/s", "train s", "test accuracy", "test eval s", "vs baseline"], rows),
        "",
        table(["PGD crafting (10 steps, trained model)", "image-steps/s", "s", "vs our training images/s"],
              [[f"attacks.craft, {crafting['label']} ({crafting['decided_by']}), {args.craft_images} images",
                f"{crafting['ips']:,.0f}", f"{crafting['seconds']:.1f}", f"{craft_ratio:.2f} (target >= 0.70)"]]),
        "",
        f"accuracy check: |{ours['accuracy']:.2%} - {base_acc:.2%}| = {gap:.2f} points "
        f"{'<=' if ok else '>'} {args.tolerance} -> {'PASS' if ok else 'FAIL'}",
        calibration_line,
        f"ratio (ours / baseline images/s): {ratio:.2f}x",
    ])
    finish(f"bench/train.py: {args.model} on {device}", printed, not args.no_record, device)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
