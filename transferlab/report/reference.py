"""The reference experiment's reported accuracies (shared/reference/experiment.md, "Reported results"), as data:
a study that trains one of the same (source, model[, n, freeze]) runs shows its own numbers beside these.

Keys: pretraining (dataset, model); fine-tuning (source dataset, model, target dataset, n, freeze); from scratch
("scratch", model, dataset, n, None). Values: (train %, test %), one run each (the reference had no repeats,
except where its note says so). Its pretraining used each data set's full training split and its own epochs.
"""

from __future__ import annotations

SOURCE = "shared/reference/experiment.md"

PRETRAIN: dict[tuple[str, str], tuple[float, float]] = {
    ("kmnist", "alexnet"): (98.65, 92.00), ("kmnist", "resnet"): (99.19, 94.83),
    ("fmnist", "alexnet"): (92.67, 90.27), ("fmnist", "resnet"): (95.70, 92.30),
    ("mnist", "alexnet"): (98.56, 98.21), ("mnist", "resnet"): (99.51, 98.98),
    ("usps", "alexnet"): (99.93, 97.21), ("usps", "resnet"): (99.95, 97.46),
    ("svhn", "resnet"): (95.56, 93.68),
}

TUNED: dict[tuple[str, str, str, int, int | None], tuple[float, float]] = {
    ("kmnist", "alexnet", "mnist", 10_000, 8): (100.0, 96.36),  # repeats: 95.74, 96.07
    ("fmnist", "alexnet", "mnist", 20_000, 8): (99.94, 93.42),
    ("fmnist", "alexnet", "mnist", 20_000, 10): (95.20, 89.28),
    ("kmnist", "resnet", "mnist", 10_000, 23): (99.65, 97.34),
    ("kmnist", "resnet", "mnist", 1_000, 23): (99.50, 94.20),
    ("kmnist", "resnet", "mnist", 500, 23): (100.0, 91.60),
    ("fmnist", "resnet", "mnist", 20_000, 20): (99.56, 95.70),
    ("fmnist", "resnet", "mnist", 10_000, 20): (99.90, 94.24),
    ("fmnist", "resnet", "mnist", 10_000, 23): (98.62, 93.42),
    ("scratch", "resnet", "mnist", 10_000, None): (99.45, 96.78),
    ("scratch", "resnet", "mnist", 20_000, None): (99.59, 98.04),
    ("scratch", "alexnet", "mnist", 10_000, None): (99.16, 97.13),
    ("scratch", "alexnet", "mnist", 20_000, None): (98.83, 97.79),
}
