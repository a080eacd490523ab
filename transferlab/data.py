"""Datasets as uint8 tensors on one canvas.

Every dataset, whatever its source format, becomes a ``Dataset``: a train and a test
``Split`` of uint8 images ``[N, C, H, W]`` and int64 labels, all on one canvas (by
default 1x28x28), plus a provenance record for the run's JSON.

Where the data comes from:
  * torchvision's own dataset classes read the files under the data directory (and
    download them when allowed); we take their raw tensors, never one PIL image at a time;
  * ``npz:FOLDER`` reads a user's ``train.npz`` and ``test.npz``;
  * the ``*-sample`` datasets are small real samples shipped inside the package, so demos
    and tests run offline.

Converting to the canvas (grayscale, resize, EMNIST's transposition) happens once per
(dataset, canvas) and the result is cached as a safetensors file in the cache directory,
which is separate from the data directory because the latter may be read-only.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import lzma
import os
import string
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from transferlab.errors import UserError, suggest

# Bump when the cached tensors or their metadata change meaning, so old caches are rebuilt.
CACHE_FORMAT_VERSION = 1

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
SAMPLE_FORMAT = "transferlab-sample/1"

# Each sample holds this many train / test images (see scripts/build_samples.py for why).
SAMPLE_TRAIN_COUNT = 2700
SAMPLE_TEST_COUNT = 900

SPLITS = ("train", "test")


# ----------------------------------------------------------------------------------------
# Canvases
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Canvas:
    """The image shape every dataset is brought to: channels x size x size."""

    name: str
    channels: int
    size: int


CANVASES = {"gray28": Canvas("gray28", 1, 28), "rgb32": Canvas("rgb32", 3, 32)}
DEFAULT_CANVAS = "gray28"


def get_canvas(name) -> Canvas:
    """The canvas called ``name`` (a Canvas passes through); unknown names are a UserError."""
    if isinstance(name, Canvas):
        return name
    if name not in CANVASES:
        raise UserError(f"unknown canvas '{name}'{suggest(str(name), CANVASES)}; known canvases: {', '.join(CANVASES)}")
    return CANVASES[name]


# ITU-R BT.601 luma weights, the usual RGB -> gray conversion (PIL's "L" mode uses them too).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# Images converted per step, so that 120k images never become one huge float tensor.
_CHUNK = 4096


def to_canvas(images: torch.Tensor, canvas) -> tuple[torch.Tensor, list[str]]:
    """Bring uint8 images ``[N, C, H, W]`` (C = 1 or 3) onto ``canvas``.

    Returns the converted uint8 images and the list of transforms applied (empty when
    the images already fit). Gray -> RGB replicates the channel; RGB -> gray uses the
    ITU-R 601 luma weights; resizing is bilinear with antialiasing. The whole chain runs
    in float and rounds to uint8 once at the end.
    """
    canvas = get_canvas(canvas)
    n, channels, height, width = images.shape
    if channels not in (1, 3):
        raise UserError(f"images have {channels} channels; only 1 (gray) or 3 (RGB) can be put on a canvas")

    transforms = []
    if channels == 3 and canvas.channels == 1:
        transforms.append("grayscale (ITU-R 601 luma weights)")
    needs_resize = (height, width) != (canvas.size, canvas.size)
    if needs_resize:
        source_size = f"{height}" if height == width else f"{height}x{width}"
        transforms.append(f"antialiased bilinear resize {source_size}->{canvas.size}")
    if channels == 1 and canvas.channels == 3:
        transforms.append("gray replicated to 3 channels")
    if not transforms:
        return images.contiguous(), []

    # Resize on the smaller number of channels: gray before resizing when reducing, and
    # replicate only after resizing when expanding (the result is the same, the work less).
    luma = torch.tensor(LUMA_WEIGHTS, dtype=torch.float32).view(1, 3, 1, 1)
    out = torch.empty((n, canvas.channels, canvas.size, canvas.size), dtype=torch.uint8)
    for start in range(0, n, _CHUNK):
        chunk = images[start : start + _CHUNK].to(torch.float32)
        if channels == 3 and canvas.channels == 1:
            chunk = (chunk * luma).sum(dim=1, keepdim=True)
        if needs_resize:
            chunk = torch.nn.functional.interpolate(
                chunk, size=(canvas.size, canvas.size), mode="bilinear", antialias=True, align_corners=False
            )
        chunk = chunk.round_().clamp_(0, 255).to(torch.uint8)
        if chunk.shape[1] == 1 and canvas.channels == 3:
            chunk = chunk.expand(-1, 3, -1, -1)
        out[start : start + _CHUNK] = chunk
    return out, transforms


# ----------------------------------------------------------------------------------------
# Specs, splits, datasets
# ----------------------------------------------------------------------------------------


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
            digest = hashlib.sha256()
            digest.update(f"{self.spec.name}\n{self.canvas.name}\n".encode())
            for tensor in (data.images, data.labels):
                array = tensor.contiguous().numpy()
                digest.update(f"{array.dtype}{list(array.shape)}".encode())
                digest.update(array.data)
            self._fingerprints[split] = digest.hexdigest()[:16]
        return self._fingerprints[split]


# ----------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TorchvisionSource:
    """How one registry entry is read through a torchvision dataset class."""

    class_name: str  # attribute of torchvision.datasets
    folder: str  # where torchvision keeps the files, relative to the data directory
    files: tuple[str, ...]  # the files a complete copy has in that folder
    split_args: dict  # split -> keyword arguments for the class
    common_args: dict = field(default_factory=dict)
    transposed: bool = False  # EMNIST's raw images are stored transposed
    label_offset: int = 0  # subtracted from the raw labels
    channels_last: bool = False  # CIFAR keeps [N, H, W, C] arrays


def _idx_files(prefix_train: str, prefix_test: str, labels_kind: str = "labels-idx1-ubyte") -> tuple[str, ...]:
    return (
        f"{prefix_train}-images-idx3-ubyte",
        f"{prefix_train}-{labels_kind}",
        f"{prefix_test}-images-idx3-ubyte",
        f"{prefix_test}-{labels_kind}",
    )


_TRAIN_TEST = {"train": {"train": True}, "test": {"train": False}}


def _emnist_source(split: str, label_offset: int = 0) -> _TorchvisionSource:
    return _TorchvisionSource(
        "EMNIST",
        "EMNIST/raw",
        _idx_files(f"emnist-{split}-train", f"emnist-{split}-test"),
        _TRAIN_TEST,
        common_args={"split": split},
        transposed=True,
        label_offset=label_offset,
    )


_DIGITS = tuple(string.digits)
# torchvision.datasets.KMNIST.classes, FashionMNIST.classes and EMNIST.classes_split_dict['balanced'],
# written out so listing datasets does not import torchvision.
_KMNIST_CLASSES = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
_FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_EMNIST_MERGED = set("cijklmopsuvwxyz")  # lowercase letters EMNIST merges with their capitals
_EMNIST_BALANCED_CLASSES = tuple(sorted(set(string.digits + string.ascii_letters) - _EMNIST_MERGED))
_LETTERS = tuple(string.ascii_lowercase)

_MNIST_PROVENANCE = "Y. LeCun, C. Cortes, C. J. C. Burges; CC BY-SA 3.0; http://yann.lecun.com/exdb/mnist/"
_KMNIST_PROVENANCE = (
    "ROIS-DS Center for Open Data in the Humanities (CODH), Clanuwat et al. 2018; CC BY-SA 4.0; "
    "https://github.com/rois-codh/kmnist"
)
_FMNIST_PROVENANCE = "Zalando Research, Xiao et al. 2017; MIT; https://github.com/zalandoresearch/fashion-mnist"
_EMNIST_PROVENANCE = (
    "Cohen et al. 2017 from NIST Special Database 19; NIST terms of use; "
    "https://www.nist.gov/itl/products-and-services/emnist-dataset"
)

# name -> (spec, source); registry order is the order of this dict.
_REGISTRY: dict[str, tuple[DatasetSpec, object]] = {}


def _register(spec: DatasetSpec, source) -> None:
    _REGISTRY[spec.name] = (spec, source)


_register(
    DatasetSpec("mnist", 10, _DIGITS, "digits", _MNIST_PROVENANCE,
                "handwritten digits, 60,000 train / 10,000 test, 1x28x28"),
    _TorchvisionSource("MNIST", "MNIST/raw", _idx_files("train", "t10k"), _TRAIN_TEST),
)
_register(
    DatasetSpec("kmnist", 10, _KMNIST_CLASSES, "kmnist", _KMNIST_PROVENANCE,
                "cursive Japanese (Kuzushiji) hiragana, 60,000 train / 10,000 test, 1x28x28"),
    _TorchvisionSource("KMNIST", "KMNIST/raw", _idx_files("train", "t10k"), _TRAIN_TEST),
)
_register(
    DatasetSpec("fmnist", 10, _FMNIST_CLASSES, "fmnist", _FMNIST_PROVENANCE,
                "Zalando clothing images (Fashion-MNIST), 60,000 train / 10,000 test, 1x28x28"),
    _TorchvisionSource("FashionMNIST", "FashionMNIST/raw", _idx_files("train", "t10k"), _TRAIN_TEST),
)
_register(
    DatasetSpec("emnist-balanced", 47, _EMNIST_BALANCED_CLASSES, "emnist-balanced", _EMNIST_PROVENANCE,
                "EMNIST balanced: digits and letters, 47 classes, 112,800 train / 18,800 test"),
    _emnist_source("balanced"),
)
_register(
    DatasetSpec("emnist-letters", 26, _LETTERS, "emnist-letters", _EMNIST_PROVENANCE,
                "EMNIST letters: a-z with cases merged, 124,800 train / 20,800 test (labels 1-26 shifted to 0-25)"),
    _emnist_source("letters", label_offset=1),
)
_register(
    DatasetSpec("emnist-digits", 10, _DIGITS, "digits", _EMNIST_PROVENANCE,
                "EMNIST digits, 240,000 train / 40,000 test"),
    _emnist_source("digits"),
)
_register(
    DatasetSpec("qmnist", 10, _DIGITS, "digits",
                "C. Yadav, L. Bottou 2019 (Facebook AI Research), reconstruction of MNIST from NIST SD19; "
                "licence as stated in the repository; https://github.com/facebookresearch/qmnist",
                "QMNIST: MNIST reconstructed with a larger test set, 60,000 train / 60,000 test"),
    _TorchvisionSource(
        "QMNIST", "QMNIST/raw", _idx_files("qmnist-train", "qmnist-test", "labels-idx2-int"),
        {"train": {"what": "train"}, "test": {"what": "test"}},
    ),
)
_register(
    DatasetSpec("svhn", 10, _DIGITS, "digits",
                "Netzer et al. 2011 (Stanford, Google); non-commercial use only; http://ufldl.stanford.edu/housenumbers/",
                "Street View House Numbers, cropped digits, 73,257 train / 26,032 test, 3x32x32 (label 10 is 0)"),
    _TorchvisionSource("SVHN", "", ("train_32x32.mat", "test_32x32.mat"),
                       {"train": {"split": "train"}, "test": {"split": "test"}}),
)
_register(
    DatasetSpec("usps", 10, _DIGITS, "digits",
                "J. J. Hull 1994 (US Postal Service / CEDAR), libsvm copy by C.-J. Lin; no licence stated; "
                "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass.html#usps",
                "US Postal Service handwritten digits, 7,291 train / 2,007 test, 1x16x16"),
    _TorchvisionSource("USPS", "", ("usps.bz2", "usps.t.bz2"), _TRAIN_TEST),
)

_CIFAR_PROVENANCE = ("A. Krizhevsky 2009, Learning Multiple Layers of Features from Tiny Images (University of "
                     "Toronto); no licence stated; https://www.cs.toronto.edu/~kriz/cifar.html")
_register(
    DatasetSpec("cifar10", 10, ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                "truck"), "cifar10", _CIFAR_PROVENANCE,
                "CIFAR-10: 10 object classes, 50,000 train / 10,000 test, 3x32x32"),
    _TorchvisionSource("CIFAR10", "cifar-10-batches-py",
                       ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                        "test_batch", "batches.meta"), _TRAIN_TEST, channels_last=True),
)
_register(
    DatasetSpec("cifar100", 100, tuple(f"class{i}" for i in range(100)), "cifar100", _CIFAR_PROVENANCE,
                "CIFAR-100: 100 fine object classes, 50,000 train / 10,000 test, 3x32x32"),
    _TorchvisionSource("CIFAR100", "cifar-100-python", ("train", "test", "meta"), _TRAIN_TEST, channels_last=True),
)

_SAMPLE_NOTE = f"{SAMPLE_TRAIN_COUNT:,} train / {SAMPLE_TEST_COUNT:,} test, class-stratified, shipped with transferlab"
_register(
    DatasetSpec("mnist-sample", 10, _DIGITS, "digits", _MNIST_PROVENANCE, f"sample of MNIST: {_SAMPLE_NOTE}"),
    SAMPLES_DIR / "mnist-sample.npz",
)
_register(
    DatasetSpec("kmnist-sample", 10, _KMNIST_CLASSES, "kmnist", _KMNIST_PROVENANCE,
                f"sample of KMNIST: {_SAMPLE_NOTE}"),
    SAMPLES_DIR / "kmnist-sample.npz",
)
_register(
    DatasetSpec("fmnist-sample", 10, _FMNIST_CLASSES, "fmnist", _FMNIST_PROVENANCE,
                f"sample of Fashion-MNIST: {_SAMPLE_NOTE}"),
    SAMPLES_DIR / "fmnist-sample.npz",
)

_ALIASES = {
    "fashion-mnist": "fmnist",
    "fashionmnist": "fmnist",
    "kuzushiji-mnist": "kmnist",
}

NPZ_PREFIX = "npz:"


def resolve_name(name: str) -> str:
    """The canonical registry name for ``name``: case and '_' vs '-' don't matter, aliases
    map to their dataset, and ``npz:PATH`` comes back with PATH made absolute."""
    if name[: len(NPZ_PREFIX)].lower() == NPZ_PREFIX:
        path = name[len(NPZ_PREFIX) :]
        if not path:
            raise UserError("npz: needs a folder, as in npz:path/to/folder (with train.npz and test.npz)")
        return NPZ_PREFIX + str(Path(path).expanduser().resolve())
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        known = list(_REGISTRY) + list(_ALIASES)
        raise UserError(
            f"unknown dataset '{name}'{suggest(key, known)}; known: {', '.join(_REGISTRY)}, or npz:FOLDER for your own"
        )
    return key


def get_spec(name: str) -> DatasetSpec:
    """The spec of a registry dataset, or of an npz folder (whose labels are read to count classes)."""
    name = resolve_name(name)
    if name.startswith(NPZ_PREFIX):
        folder = Path(name[len(NPZ_PREFIX) :])
        max_label = max(int(_read_npz_labels(folder / f"{split}.npz").max()) for split in SPLITS)
        return _npz_spec(name, max_label + 1)
    return _REGISTRY[name][0]


def list_datasets() -> list[DatasetSpec]:
    """Every registry dataset, in registry order (npz folders are not listed)."""
    return [spec for spec, _ in _REGISTRY.values()]


def _npz_spec(name: str, num_classes: int) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        num_classes=num_classes,
        class_names=tuple(str(i) for i in range(num_classes)),
        label_space=name,
        provenance=f"user data from {name[len(NPZ_PREFIX):]}",
        description="user-supplied train.npz / test.npz",
    )


# ----------------------------------------------------------------------------------------
# Directories
# ----------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """Where raw dataset files live: $TRANSFERLAB_DATA, else ~/.cache/transferlab/data."""
    env = os.environ.get("TRANSFERLAB_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "transferlab" / "data"


def default_cache_dir() -> Path:
    """Where canvas-converted tensors are cached: $TRANSFERLAB_CACHE, else ~/.cache/transferlab/canvas."""
    env = os.environ.get("TRANSFERLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "transferlab" / "canvas"


# ----------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------


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
    spec, source = _REGISTRY[name]
    if isinstance(source, Path):
        return _load_sample(spec, source, canvas)
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    return _load_torchvision(spec, source, canvas, data_dir.resolve(), download, cache_dir)


def _load_torchvision(spec, source: _TorchvisionSource, canvas, data_dir: Path, download: bool, cache_dir: Path):
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
        identity = _file_identity(folder, source.files)
        cached = _read_cache(cache_dir, spec.name, canvas, identity)
        if cached is not None:
            return _dataset_from_cache(spec, canvas, cached)

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

    identity = _file_identity(folder, source.files)
    provenance = {
        "dataset": spec.name,
        "source": _describe_source(source),
        "root": str(data_dir),
        "files": [{"path": str(Path(source.folder) / f), "bytes": entry["bytes"]}
                  for f, entry in zip(source.files, identity)],
        "canvas": canvas.name,
        "transforms": transforms,
        "counts": {split: len(splits[split]) for split in SPLITS},
    }
    dataset = Dataset(spec, canvas, splits["train"], splits["test"], provenance)
    _write_cache(cache_dir, spec.name, canvas, identity, dataset)
    return dataset


def _describe_source(source: _TorchvisionSource) -> str:
    args = ", ".join(f"{key}={value!r}" for key, value in source.common_args.items())
    return f"torchvision.datasets.{source.class_name}" + (f"({args})" if args else "")


def _label_shift_note(spec: DatasetSpec, offset: int) -> str:
    return f"labels {offset}-{spec.num_classes + offset - 1} -> 0-{spec.num_classes - 1}"


def _shift_labels(labels: torch.Tensor, offset: int) -> torch.Tensor:
    return (labels - offset).contiguous() if offset else labels.contiguous()


def _read_with_torchvision(source: _TorchvisionSource, data_dir: Path, split: str, download: bool):
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


def _normalise_raw(images: torch.Tensor, source: _TorchvisionSource) -> tuple[torch.Tensor, list[str]]:
    if source.channels_last:
        images = images.permute(0, 3, 1, 2)
    if source.transposed:
        return images.transpose(2, 3).contiguous(), ["transposed upright"]
    return images.contiguous(), []


def _file_identity(folder: Path, files) -> list[dict]:
    """A cheap identity of the source files (absolute path, size, mtime), so a changed or
    moved source rebuilds the cache and the cached provenance never names a stale root."""
    identity = []
    for name in files:
        path = folder / name
        stat = path.stat()
        identity.append({"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return identity


# ---- canvas cache ----------------------------------------------------------------------


def _cache_path(cache_dir: Path, name: str, canvas: Canvas, identity) -> Path:
    key_source = json.dumps(
        {"format": CACHE_FORMAT_VERSION, "dataset": name, "canvas": canvas.name, "sources": identity},
        sort_keys=True,
    )
    key = hashlib.sha256(key_source.encode()).hexdigest()[:16]
    readable = name
    if name.startswith(NPZ_PREFIX):
        # A path is no file name; keep its last folder for people browsing the cache.
        readable = "npz-" + "".join(c if c.isalnum() or c in "-." else "_" for c in Path(name[4:]).name)
    return cache_dir / f"{readable}-{canvas.name}-{key}.safetensors"


def _cache_expectation(name: str, canvas: Canvas, identity) -> dict[str, str]:
    """What a cache file must say it holds: the dataset, the canvas and the source files it was built from."""
    return {"format": str(CACHE_FORMAT_VERSION), "dataset": name, "canvas": canvas.name,
            "sources": json.dumps(identity, sort_keys=True)}


def _read_cache(cache_dir: Path, name: str, canvas: Canvas, identity):
    """The cached tensors and provenance, or None (with a warning) for a file that is damaged, altered, or
    was built from another dataset, canvas or set of files: such a file is rebuilt, never trusted."""
    from transferlab.store import load_checked_tensors

    path = _cache_path(cache_dir, name, canvas, identity)
    loaded = load_checked_tensors(path, "canvas cache file", expect=_cache_expectation(name, canvas, identity))
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


def _write_cache(cache_dir: Path, name: str, canvas: Canvas, identity, dataset: Dataset) -> None:
    from transferlab.store import save_checked_tensors

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
        save_checked_tensors(path, tensors, metadata)
    except OSError as error:
        warnings.warn(f"could not cache {name} on {canvas.name} in {cache_dir} ({error}); it will be converted again next time")


def _dataset_from_cache(spec: DatasetSpec, canvas: Canvas, cached) -> Dataset:
    tensors, provenance = cached
    train = Split(tensors["train_images"], tensors["train_labels"])
    test = Split(tensors["test_images"], tensors["test_labels"])
    return Dataset(spec, canvas, train, test, provenance)


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


def _load_npz_folder(name: str, canvas: Canvas, cache_dir: Path) -> Dataset:
    folder = Path(name[len(NPZ_PREFIX) :])
    files = [f"{split}.npz" for split in SPLITS]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise UserError(f"npz folder {folder} lacks {', '.join(missing)}; it needs train.npz and test.npz with x and y")

    identity = _file_identity(folder, files)
    cached = _read_cache(cache_dir, name, canvas, identity)
    if cached is not None:
        tensors, _ = cached
        num_classes = int(max(tensors["train_labels"].max(), tensors["test_labels"].max())) + 1
        return _dataset_from_cache(_npz_spec(name, num_classes), canvas, cached)

    splits, transforms = {}, []
    for split in SPLITS:
        raw = _read_npz_split(folder / f"{split}.npz")
        images, transforms = to_canvas(raw.images, canvas)
        splits[split] = Split(images, raw.labels)
    num_classes = int(max(splits["train"].labels.max(), splits["test"].labels.max())) + 1
    spec = _npz_spec(name, num_classes)
    provenance = {
        "dataset": name,
        "source": "npz folder",
        "root": str(folder),
        "files": [{"path": f, "bytes": entry["bytes"]} for f, entry in zip(files, identity)],
        "canvas": canvas.name,
        "transforms": transforms,
        "counts": {split: len(splits[split]) for split in SPLITS},
    }
    dataset = Dataset(spec, canvas, splits["train"], splits["test"], provenance)
    _write_cache(cache_dir, name, canvas, identity, dataset)
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
    provenance = {
        "dataset": spec.name,
        "source": "shipped sample",
        "file": f"transferlab/samples/{path.name}",
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "derived_from": meta["source"],
        "selection": meta["selection"],
        "canvas": canvas.name,
        "transforms": transforms,
        "counts": {split: len(splits[split]) for split in SPLITS},
    }
    return Dataset(spec, canvas, splits["train"], splits["test"], provenance)


# ----------------------------------------------------------------------------------------
# Subsets and statistics
# ----------------------------------------------------------------------------------------


def stratified_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted int64 indices of ``n`` items whose class mix matches ``labels``.

    Each class gets its share n * count / total rounded by largest remainder (ties go to
    the lower class), and at least one item, so every class present appears. Within a
    class the items are the first of one seeded random permutation, so the result depends
    only on (labels, n, seed).
    """
    labels = torch.as_tensor(labels).reshape(-1).to(torch.int64)
    total = int(labels.numel())
    classes, counts = torch.unique(labels, return_counts=True)
    if not (len(classes) <= n <= total):
        raise UserError(
            f"subset size {n} is out of range: it must be between {len(classes)} (one per class present) "
            f"and {total} (all items)"
        )

    counts_list = [int(c) for c in counts]
    quotas = [n * c / total for c in counts_list]
    allocation = [int(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - allocation[i]), i))
    for i in by_remainder[: n - sum(allocation)]:
        allocation[i] += 1
    # A class too rare to earn an item takes one from the class furthest above its quota
    # among those that can spare one (n >= number of classes guarantees there is one).
    for i, amount in enumerate(allocation):
        if amount == 0:
            donors = [j for j in range(len(allocation)) if allocation[j] > 1]
            donor = max(donors, key=lambda j: (allocation[j] - quotas[j], -j))
            allocation[donor] -= 1
            allocation[i] = 1

    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(total, generator=generator)
    shuffled_labels = labels[order]
    chosen = [order[shuffled_labels == cls][:amount] for cls, amount in zip(classes, allocation)]
    return torch.sort(torch.cat(chosen)).values.to(torch.int64)


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of ``[N, C, H, W]`` images on the [0, 1] scale.

    uint8 images are divided by 255; float images are taken as already in [0, 1]. Sums
    run in float64 over chunks, so 120k images never become one float64 copy.
    """
    if images.ndim != 4:
        raise UserError(f"channel_stats needs [N, C, H, W] images, got shape {list(images.shape)}")
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.shape[0], _CHUNK):
        chunk = images[start : start + _CHUNK].to(torch.float64) / scale
        total += chunk.sum(dim=(0, 2, 3))
        total_squares += (chunk * chunk).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    if count == 0:
        raise UserError("channel_stats needs at least one image")
    mean = total / count
    variance = (total_squares / count - mean * mean).clamp_min(0.0)
    return mean.tolist(), variance.sqrt().tolist()
