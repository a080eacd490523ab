"""Reading datasets onto a canvas: torchvision's dataset classes, a user's npz folder, the shipped samples.

Where the data comes from:
  * torchvision's own dataset classes read the files under the data directory (and
    download them when allowed); we take their raw tensors, never one PIL image at a time;
  * ``npz:FOLDER`` reads a user's ``train.npz`` and ``test.npz``;
  * the ``*-sample`` datasets are small real samples shipped inside the package, so demos
    and tests run offline.

The first two are converted once and cached (see ``cache``); every loader records where its
data came from in the same provenance record (``_assemble``).
"""

from __future__ import annotations

import http.client
import json
import lzma
import zipfile
from pathlib import Path

import numpy as np
import torch

from transferlab import store
from transferlab.data.cache import dataset_from_cache, file_identity, read_cache, write_cache
from transferlab.data.canvas import DEFAULT_CANVAS, Canvas, get_canvas, to_canvas
from transferlab.data.dataset import SPLITS, Dataset, DatasetSpec, Split
from transferlab.data.registry import (NPZ_PREFIX, NpzSource, TorchvisionSource, default_cache_dir, default_data_dir,
                                      npz_spec, registry_entry, resolve_name)
from transferlab.errors import UserError

SAMPLE_FORMAT = "transferlab-sample/1"


def get_spec(name: str) -> DatasetSpec:
    """The spec of a registry dataset, or of an npz folder (whose labels are read to count classes)."""
    name = resolve_name(name)
    if name.startswith(NPZ_PREFIX):
        folder = Path(name[len(NPZ_PREFIX) :])
        max_label = max(int(_read_npz_labels(folder / f"{split}.npz").max()) for split in SPLITS)
        return npz_spec(name, max_label + 1)
    return registry_entry(name)[0]


def load(name: str, canvas: str = DEFAULT_CANVAS, data_dir=None, download: bool = True, cache_dir=None) -> Dataset:
    """Load a dataset onto ``canvas`` as uint8 tensors.

    The first load of a (dataset, canvas) reads the source files (through torchvision,
    downloading when ``download`` is on and files are missing), converts them and caches
    the result in ``cache_dir``; later loads read that cache. Shipped samples need neither
    a data directory nor the network.
    """
    name = resolve_name(name)
    canvas = get_canvas(canvas)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    if name.startswith(NPZ_PREFIX):
        return _load_npz_folder(name, canvas, cache_dir)
    spec, source = registry_entry(name)
    if isinstance(source, Path):
        return _load_sample(spec, source, canvas)
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if isinstance(source, NpzSource):
        return _load_npz_source(spec, source, canvas, data_dir.resolve(), cache_dir)
    return _load_torchvision(spec, source, canvas, data_dir.resolve(), download, cache_dir)


def _load_torchvision(spec, source: TorchvisionSource, canvas, data_dir: Path, download: bool, cache_dir: Path):
    folder = data_dir / source.folder
    missing = [f for f in source.files if not (folder / f).is_file()]
    how_to_get = "point --data-dir (or TRANSFERLAB_DATA) at a folder that has them"
    if missing and not download:
        raise UserError(
            f"{spec.name}: data files not found in {folder} (missing {', '.join(missing)}); "
            f"drop --no-download to fetch them, or {how_to_get}"
        )

    # The cache can only be consulted when the files are there to identify; after a
    # download they are, and the identity is taken then.
    if not missing:
        identity = file_identity(folder, source.files)
        cached = read_cache(cache_dir, spec.name, canvas, identity)
        if cached is not None:
            return dataset_from_cache(spec, canvas, cached)

    splits, transforms = {}, []
    for split in SPLITS:
        try:
            images, labels = _read_with_torchvision(source, data_dir, split, download)
        except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, http.client.HTTPException) as error:
            # torchvision reports missing files as RuntimeError("Dataset not found ...") and a
            # failed download as URLError / OSError / RuntimeError("Error downloading ...").
            reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
            if download:
                problem, advice = "could not be downloaded", f"check the network, or {how_to_get}"
            else:
                problem, advice = "could not be read", f"the files may be incomplete or corrupt; replace them, or {how_to_get}"
            raise UserError(
                f"{spec.name}: the data {problem} ({reason}); expected {', '.join(source.files)} in {folder}; {advice}"
            ) from error
        images, split_transforms = _normalise_raw(images, source)
        images, canvas_transforms = to_canvas(images, canvas)
        transforms = split_transforms + canvas_transforms
        splits[split] = Split(images, _shift_labels(labels, source.label_offset))
    if source.label_offset:
        transforms.append(_label_shift_note(spec, source.label_offset))

    identity = file_identity(folder, source.files)
    dataset = _assemble(spec, canvas, splits, transforms, _describe_source(source), root=str(data_dir),
                        files=_files_record(source.folder, source.files, identity))
    write_cache(cache_dir, spec.name, canvas, identity, dataset)
    return dataset


def _describe_source(source: TorchvisionSource) -> str:
    args = ", ".join(f"{key}={value!r}" for key, value in source.common_args.items())
    return f"torchvision.datasets.{source.class_name}" + (f"({args})" if args else "")


def _label_shift_note(spec: DatasetSpec, offset: int) -> str:
    return f"labels {offset}-{spec.num_classes + offset - 1} -> 0-{spec.num_classes - 1}"


def _shift_labels(labels: torch.Tensor, offset: int) -> torch.Tensor:
    return (labels - offset).contiguous() if offset else labels.contiguous()


def _read_with_torchvision(source: TorchvisionSource, data_dir: Path, split: str, download: bool):
    """Raw images ``[N, C, H, W]`` uint8 and int64 labels, straight from torchvision's arrays."""
    import torchvision.datasets

    # Looked up at call time, so tests can replace a class to prove the cache is used.
    dataset_class = getattr(torchvision.datasets, source.class_name)
    raw = dataset_class(str(data_dir), **source.common_args, **source.split_args[split], download=download)

    images = torch.as_tensor(np.asarray(raw.data))  # MNIST family: tensor; SVHN, USPS: numpy
    labels = raw.labels if hasattr(raw, "labels") else raw.targets  # SVHN calls them labels
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if labels.ndim == 2:
        labels = labels[:, 0]  # QMNIST keeps 8 columns of metadata per image; the first is the digit
    if images.ndim == 3:
        images = images.unsqueeze(1)
    return images, labels


def _normalise_raw(images: torch.Tensor, source: TorchvisionSource) -> tuple[torch.Tensor, list[str]]:
    if source.channels_last:
        images = images.permute(0, 3, 1, 2)
    if source.transposed:
        return images.transpose(2, 3).contiguous(), ["transposed upright"]
    return images.contiguous(), []


# ---- user npz folders ------------------------------------------------------------------


def _open_npz(path: Path):
    if not path.is_file():
        raise UserError(f"{path} not found; an npz folder needs train.npz and test.npz, each with x (uint8 images) and y (labels)")
    if not zipfile.is_zipfile(path):  # np.load would call any other file "pickled data"
        raise UserError(f"{path}: not an .npz archive (write it with numpy.savez or savez_compressed)")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise UserError(f"{path}: not a readable .npz file ({error})") from error


def _npz_array(npz, path: Path, key: str) -> np.ndarray:
    if key not in npz.files:
        raise UserError(f"{path}: has no '{key}' array (found: {', '.join(npz.files) or 'nothing'}); expected x and y")
    try:
        return npz[key]
    except ValueError as error:  # object arrays need pickle, which we never allow
        raise UserError(f"{path}: array '{key}' cannot be read without pickle ({error})") from error


MAX_NPZ_CLASSES = 100_000  # models.MAX_CLASSES: labels are class indices


def _check_labels(labels: np.ndarray, path: Path) -> None:
    if labels.ndim != 1:
        raise UserError(f"{path}: y must be 1-D [N], got shape {list(labels.shape)}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: y must hold integers, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise UserError(f"{path}: y has negative labels (min {int(labels.min())}); labels must be 0, 1, 2, ...")
    if labels.size and labels.max() >= MAX_NPZ_CLASSES:
        raise UserError(f"{path}: y has label {int(labels.max())}; labels must be 0 .. {MAX_NPZ_CLASSES - 1} "
                        "(class indices, not arbitrary ids)")


def _read_npz_labels(path: Path) -> np.ndarray:
    with _open_npz(path) as npz:
        labels = _npz_array(npz, path, "y")
    _check_labels(labels, path)
    if labels.size == 0:
        raise UserError(f"{path}: y is empty")
    return labels


def _read_npz_split(path: Path) -> Split:
    with _open_npz(path) as npz:
        images = _npz_array(npz, path, "x")
        labels = _npz_array(npz, path, "y")
    if images.dtype != np.uint8:
        raise UserError(f"{path}: x must be uint8 (pixels 0-255), got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[:, None, :, :]
    elif images.ndim == 4:
        if images.shape[3] not in (1, 3):
            raise UserError(f"{path}: x of shape {list(images.shape)} must be [N,H,W,C] with C = 1 or 3")
        images = images.transpose(0, 3, 1, 2)
    else:
        raise UserError(f"{path}: x must be [N,H,W] or [N,H,W,C], got {images.ndim} dimensions")
    if images.shape[2] == 0 or images.shape[3] == 0:
        raise UserError(f"{path}: images are {images.shape[2]}x{images.shape[3]} pixels; they need at least 1x1")
    _check_labels(labels, path)
    if len(labels) != len(images):
        raise UserError(f"{path}: x has {len(images)} images but y has {len(labels)} labels")
    if len(labels) == 0:
        raise UserError(f"{path}: holds no images")
    return Split(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)))


def _load_npz_source(spec: DatasetSpec, source: NpzSource, canvas: Canvas, data_dir: Path, cache_dir: Path) -> Dataset:
    """A registry dataset kept as npz files (no download: there is no official npz to fetch)."""
    folder = source.complete_folder(data_dir)
    if folder is None:
        looked = " or ".join(str(f) for f in source.candidates(data_dir))
        raise UserError(f"{spec.name}: {' and '.join(source.files)} not found in {looked}; point --data-dir (or "
                        f"TRANSFERLAB_DATA, or the study's data_dir) at the folder above them")
    identity = file_identity(folder, source.files)
    cached = read_cache(cache_dir, spec.name, canvas, identity)
    if cached is not None:
        return dataset_from_cache(spec, canvas, cached)
    splits, transforms = {}, []
    for split, name in zip(SPLITS, source.files):
        raw = _read_npz_split(folder / name)
        if int(raw.labels.max()) >= spec.num_classes:
            raise UserError(f"{folder / name}: label {int(raw.labels.max())} is outside {spec.name}'s "
                            f"{spec.num_classes} classes")
        images, transforms = to_canvas(raw.images, canvas)
        splits[split] = Split(images, raw.labels)
    dataset = _assemble(spec, canvas, splits, transforms, f"npz files ({source.note})" if source.note else "npz files",
                        root=str(folder), files=_files_record("", source.files, identity))
    write_cache(cache_dir, spec.name, canvas, identity, dataset)
    return dataset


def _load_npz_folder(name: str, canvas: Canvas, cache_dir: Path) -> Dataset:
    folder = Path(name[len(NPZ_PREFIX) :])
    files = [f"{split}.npz" for split in SPLITS]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise UserError(f"npz folder {folder} lacks {', '.join(missing)}; it needs train.npz and test.npz with x and y")

    identity = file_identity(folder, files)
    cached = read_cache(cache_dir, name, canvas, identity)
    if cached is not None:
        tensors, _ = cached
        num_classes = int(max(tensors["train_labels"].max(), tensors["test_labels"].max())) + 1
        return dataset_from_cache(npz_spec(name, num_classes), canvas, cached)

    splits, transforms = {}, []
    for split in SPLITS:
        raw = _read_npz_split(folder / f"{split}.npz")
        images, transforms = to_canvas(raw.images, canvas)
        splits[split] = Split(images, raw.labels)
    num_classes = int(max(splits["train"].labels.max(), splits["test"].labels.max())) + 1
    dataset = _assemble(npz_spec(name, num_classes), canvas, splits, transforms, "npz folder", root=str(folder),
                        files=_files_record("", files, identity))
    write_cache(cache_dir, name, canvas, identity, dataset)
    return dataset


# ---- shipped samples -------------------------------------------------------------------
#
# A sample file is an ordinary .npz (a zip of .npy files, readable by np.load) whose
# arrays are xz-compressed byte blobs: xz packs these images about 15% tighter than
# np.savez_compressed, which is what keeps all three samples under 3 MB in git.
#   "format"  0-d string, SAMPLE_FORMAT
#   "meta"    0-d string, JSON: dataset, source, seeds, counts, and for each array its dtype and shape
#   "<array>" uint8 blob = xz(raw bytes) for train_images, train_labels, train_source_indices,
#             test_images, test_labels, test_source_indices
# scripts/build_samples.py writes them.


def read_sample_file(path) -> tuple[dict, dict[str, np.ndarray]]:
    """The metadata and decompressed arrays of a shipped sample file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"shipped sample {path} is missing; reinstall transferlab or run scripts/build_samples.py")
    with np.load(path, allow_pickle=False) as npz:
        if str(npz["format"]) != SAMPLE_FORMAT:
            raise UserError(f"{path}: sample format {str(npz['format'])!r}, expected {SAMPLE_FORMAT!r}")
        meta = json.loads(str(npz["meta"]))
        arrays = {}
        for key, layout in meta["arrays"].items():
            raw = lzma.decompress(npz[key].tobytes())
            arrays[key] = np.frombuffer(raw, dtype=layout["dtype"]).reshape(layout["shape"])
    return meta, arrays


def _load_sample(spec: DatasetSpec, path: Path, canvas: Canvas) -> Dataset:
    # Not cached: a few thousand images convert in milliseconds, and this keeps samples
    # working where no cache directory can be written.
    meta, arrays = read_sample_file(path)
    splits, transforms = {}, []
    for split in SPLITS:
        images = torch.from_numpy(arrays[f"{split}_images"].copy()).unsqueeze(1)
        labels = torch.from_numpy(arrays[f"{split}_labels"].astype(np.int64))
        images, transforms = to_canvas(images, canvas)
        splits[split] = Split(images, labels)
    return _assemble(spec, canvas, splits, transforms, "shipped sample", file=f"transferlab/samples/{path.name}",
                     sha256=store.file_sha256(path), derived_from=meta["source"], selection=meta["selection"])


# ---- provenance ------------------------------------------------------------------------


def _assemble(spec: DatasetSpec, canvas: Canvas, splits: dict[str, Split], transforms: list[str], source: str,
              **details) -> Dataset:
    """The loaded dataset with its provenance record: the same keys for every source, in the same order,
    with ``details`` (where the files were, their sizes or hash) after the source."""
    provenance = {"dataset": spec.name, "source": source, **details, "canvas": canvas.name,
                  "transforms": transforms, "counts": {split: len(splits[split]) for split in SPLITS}}
    return Dataset(spec, canvas, splits["train"], splits["test"], provenance)


def _files_record(folder: str, files, identity) -> list[dict]:
    """The source files as provenance names them: relative to the data root, with their sizes and sha256."""
    return [{"path": str(Path(folder) / name), "bytes": entry["bytes"], "sha256": entry["sha256"]}
            for name, entry in zip(files, identity)]
