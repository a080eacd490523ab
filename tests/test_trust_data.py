"""Issue 26, item 2: the canvas cache is keyed by the bytes of the source files, not by their size and mtime."""

from __future__ import annotations

import os

import numpy as np

import transferlab
from transferlab import store


def _write_npz(folder, train_labels, test_labels):
    rng = np.random.default_rng(0)
    for split, labels in (("train", train_labels), ("test", test_labels)):
        if labels is not None:
            images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
            np.savez(folder / f"{split}.npz", x=images, y=np.asarray(labels, dtype=np.int64))


def test_changed_labels_at_the_same_size_and_mtime_are_seen(tmp_path):
    folder = tmp_path / "digits"
    folder.mkdir()
    _write_npz(folder, [0, 1, 2, 3] * 5, [0, 1, 2, 3])
    name = f"npz:{folder}"
    _, first = transferlab.load_dataset(name, split="test")  # converted, then cached
    _, again = transferlab.load_dataset(name, split="test")  # from the cache
    assert first.tolist() == again.tolist() == [0, 1, 2, 3]

    test_file = folder / "test.npz"
    before = test_file.stat()
    _write_npz(folder, None, [3, 2, 1, 0])  # train.npz untouched
    os.utime(test_file, ns=(before.st_atime_ns, before.st_mtime_ns))  # the edit hidden from size and mtime
    after = test_file.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)

    _, labels = transferlab.load_dataset(name, split="test")
    assert labels.tolist() == [3, 2, 1, 0]


def test_the_source_files_hash_is_in_the_provenance(tmp_path):
    from transferlab import data as data_mod

    folder = tmp_path / "digits"
    folder.mkdir()
    _write_npz(folder, [0, 1] * 5, [0, 1])
    for _ in range(2):  # converted, then read back from the cache: both say which bytes they came from
        files = data_mod.load(f"npz:{folder}").provenance["files"]
        assert {f["path"]: f["sha256"] for f in files} == {
            f"{split}.npz": store.file_sha256(folder / f"{split}.npz") for split in ("train", "test")}
