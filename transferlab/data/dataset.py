"""The records the data package hands out: a dataset's spec, its splits, and the loaded dataset."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from transferlab import store
from transferlab.data.canvas import Canvas
from transferlab.data.spec import DatasetSpec
from transferlab.errors import UserError

SPLITS = ("train", "test")


@dataclass
class Split:
    """One split: uint8 images ``[N, C, H, W]`` (CPU, contiguous) and int64 labels ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Dataset:
    """A dataset on one canvas, with a JSON-able provenance record."""

    spec: DatasetSpec
    canvas: Canvas
    train: Split
    test: Split
    provenance: dict
    _fingerprints: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise UserError(f"unknown split '{name}'; use train or test")
        return self.train if name == "train" else self.test

    def fingerprint(self, split: str) -> str:
        """A short hex hash of the dataset name, canvas and the split's exact tensors.

        Two runs that saw the same fingerprint saw the same pixels and labels, however
        the data reached them (download, cache, another machine).
        """
        if split not in self._fingerprints:
            data = self.split(split)
            parts = [f"{self.spec.name}\n{self.canvas.name}\n"]
            for tensor in (data.images, data.labels):
                # numpy's dtype names ("uint8", "int64"), as fingerprints were first spelled
                parts += [f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}", store.tensor_bytes(tensor)]
            self._fingerprints[split] = store.sha256_hex(parts, 16)
        return self._fingerprints[split]
