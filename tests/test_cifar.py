"""CIFAR-10/100 in the registry, on files in the real format (python pickled batches) written by the test."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torchvision.datasets.cifar

import transferlab


def _write_batch(path, images_hwc, labels, key):
    # The real layout: rows of 3072 bytes (R plane, G plane, B plane). The TEST writes the pickles; transferlab
    # reads them only through torchvision's own CIFAR10/CIFAR100 classes, never unpickling anything itself.
    rows = images_hwc.transpose(0, 3, 1, 2).reshape(len(labels), -1)
    with open(path, "wb") as f:
        pickle.dump({"data": rows, key: list(labels)}, f)


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    data = {}
    ten = tmp_path / "cifar-10-batches-py"
    ten.mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, 4)
        _write_batch(ten / name, images, labels, "labels")
        data[("cifar10", name)] = (images, labels)
    with open(ten / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    hundred = tmp_path / "cifar-100-python"
    hundred.mkdir()
    for name in ("train", "test"):
        images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 100, 5)
        _write_batch(hundred / name, images, labels, "fine_labels")
        data[("cifar100", name)] = (images, labels)
    with open(hundred / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    # torchvision checks the official files' md5 sums; these tiny files are in the format but not those files.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    return tmp_path, data


@pytest.mark.parametrize("name, split, batches, count", [
    ("cifar10", "train", [f"data_batch_{i}" for i in range(1, 6)], 20),
    ("cifar10", "test", ["test_batch"], 4),
    ("cifar100", "train", ["train"], 5),
    ("cifar100", "test", ["test"], 5),
])
def test_cifar_loads_on_both_canvases(cifar_root, name, split, batches, count):
    root, data = cifar_root
    expected_images = np.concatenate([data[(name, b)][0] for b in batches]).transpose(0, 3, 1, 2)
    expected_labels = np.concatenate([data[(name, b)][1] for b in batches])
    images, labels = transferlab.load_dataset(name, split, "rgb32", data_dir=root, download=False, as_numpy=True)
    assert images.shape == (count, 3, 32, 32) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)

    gray, gray_labels = transferlab.load_dataset(name, split, "gray28", data_dir=root, download=False, as_numpy=True)
    assert gray.shape == (count, 1, 28, 28) and gray.dtype == np.uint8
    np.testing.assert_array_equal(gray_labels, expected_labels)
