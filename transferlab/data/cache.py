"""The canvas cache: converted datasets kept as checked safetensors files, keyed by their source files' bytes.

Converting a torchvision dataset or an npz folder to the canvas (grayscale, resize, EMNIST's
transposition) happens once per (dataset, canvas, source files); the result is written to the cache
directory, which is separate from the data directory because the latter may be read-only. A cache file
that is damaged, altered or built from other files is never trusted: it is rebuilt.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from transferlab import store
from transferlab.data.canvas import Canvas
from transferlab.data.dataset import SPLITS, Dataset, DatasetSpec, Split
from transferlab.data.registry import NPZ_PREFIX

# Bump when the cached tensors or their metadata change meaning, so old caches are rebuilt.
# 2: keyed on the source files' sha256 rather than their mtime.
CACHE_FORMAT_VERSION = 2


def file_identity(folder: Path, files) -> list[dict]:
    """What the source files are: absolute path, size and the sha256 of their bytes. The cache is keyed on
    it, so a file whose bytes change (even at the same size and with its mtime put back) rebuilds the cache,
    and one that is only touched or copied does not. ``store.file_sha256`` hashes each file once per
    (path, inode, size, mtime, ctime): the ctime, which no user can set back, catches what mtime misses."""
    identity = []
    for name in files:
        path = folder / name
        identity.append({"path": str(path), "bytes": path.stat().st_size, "sha256": store.file_sha256(path)})
    return identity


def _cache_path(cache_dir: Path, name: str, canvas: Canvas, identity) -> Path:
    # Not store.content_key: its compact JSON would rename every existing cache file.
    key = store.sha256_hex([json.dumps(
        {"format": CACHE_FORMAT_VERSION, "dataset": name, "canvas": canvas.name, "sources": identity},
        sort_keys=True,
    )], 16)
    readable = name
    if name.startswith(NPZ_PREFIX):
        # A path is no file name; keep its last folder for people browsing the cache.
        readable = "npz-" + "".join(c if c.isalnum() or c in "-." else "_" for c in Path(name[4:]).name)
    return cache_dir / f"{readable}-{canvas.name}-{key}.safetensors"


def _cache_expectation(name: str, canvas: Canvas, identity) -> dict[str, str]:
    """What a cache file must say it holds: the dataset, the canvas and the source files it was built from."""
    return {"format": str(CACHE_FORMAT_VERSION), "dataset": name, "canvas": canvas.name,
            "sources": json.dumps(identity, sort_keys=True)}


def read_cache(cache_dir: Path, name: str, canvas: Canvas, identity):
    """The cached tensors and provenance, or None (with a warning) for a file that is damaged, altered, or
    was built from another dataset, canvas or set of files: such a file is rebuilt, never trusted."""
    path = _cache_path(cache_dir, name, canvas, identity)
    loaded = store.load_checked_tensors(path, "canvas cache file", expect=_cache_expectation(name, canvas, identity))
    if loaded is None:
        return None
    tensors, metadata = loaded
    try:
        provenance = json.loads(metadata["provenance"])
        labels_ok = all(tensors[f"{split}_labels"].dtype == torch.int64 for split in SPLITS)
        images_ok = all(tensors[f"{split}_images"].dtype == torch.uint8 for split in SPLITS)
    except (KeyError, json.JSONDecodeError):
        labels_ok = images_ok = False
    if not (labels_ok and images_ok):
        warnings.warn(f"canvas cache file {path} lacks tensors or provenance; rebuilding it")
        return None
    return tensors, provenance


def write_cache(cache_dir: Path, name: str, canvas: Canvas, identity, dataset: Dataset) -> None:
    path = _cache_path(cache_dir, name, canvas, identity)
    tensors = {}
    for split in SPLITS:
        data = dataset.split(split)
        tensors[f"{split}_images"] = data.images.contiguous()
        tensors[f"{split}_labels"] = data.labels.contiguous()
    metadata = {**_cache_expectation(name, canvas, identity), "provenance": json.dumps(dataset.provenance)}
    try:
        # Written beside the target and renamed: readers never see half a file, and two
        # processes building the same cache at once both end with a whole one. The cache is
        # optional: a full or read-only cache directory costs a conversion next time, nothing more.
        store.save_checked_tensors(path, tensors, metadata)
    except OSError as error:
        warnings.warn(f"could not cache {name} on {canvas.name} in {cache_dir} ({error}); it will be converted again next time")


def dataset_from_cache(spec: DatasetSpec, canvas: Canvas, cached) -> Dataset:
    tensors, provenance = cached
    train = Split(tensors["train_images"], tensors["train_labels"])
    test = Split(tensors["test_images"], tensors["test_labels"])
    return Dataset(spec, canvas, train, test, provenance)
