"""A dataset's spec, torch-free: the registry (and ``transferlab datasets``) need it without loading torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is: its classes, the label space they live in, and where it comes from.

    ``label_space`` says which datasets share labels: all digit datasets are "digits", so a
    model trained on SVHN can be scored against MNIST labels; every other family has its own.
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    label_space: str
    provenance: str
    description: str
