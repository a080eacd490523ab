"""The dataset registry: every dataset's name, aliases and spec, and where its files come from."""

from __future__ import annotations

import os
import string
from dataclasses import dataclass, field
from pathlib import Path

from transferlab.data.spec import DatasetSpec
from transferlab.errors import UserError, suggest

# Where this machine keeps things. Here, in the torch-free registry, so that `transferlab doctor` can say
# without importing torch.
def default_data_dir() -> Path:
    """Where raw dataset files live: $TRANSFERLAB_DATA, else ~/.cache/transferlab/data."""
    env = os.environ.get("TRANSFERLAB_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "transferlab" / "data"


def default_cache_dir() -> Path:
    """Where canvas-converted tensors are cached: $TRANSFERLAB_CACHE, else ~/.cache/transferlab/canvas."""
    env = os.environ.get("TRANSFERLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "transferlab" / "canvas"


SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"

# Each sample holds this many train / test images (see scripts/build_samples.py for why).
SAMPLE_TRAIN_COUNT = 2700
SAMPLE_TEST_COUNT = 900


@dataclass(frozen=True)
class TorchvisionSource:
    """How one registry entry is read through a torchvision dataset class."""

    class_name: str  # attribute of torchvision.datasets
    folder: str  # where torchvision keeps the files, relative to the data directory
    files: tuple[str, ...]  # the files a complete copy has in that folder
    split_args: dict  # split -> keyword arguments for the class
    common_args: dict = field(default_factory=dict)
    transposed: bool = False  # EMNIST's raw images are stored transposed
    label_offset: int = 0  # subtracted from the raw labels
    channels_last: bool = False  # CIFAR keeps [N, H, W, C] arrays


@dataclass(frozen=True)
class NpzSource:
    """A registry dataset kept as train.npz / test.npz (keys x: uint8 images, y: labels), looked for in
    ``folder`` under the data directory, then in each of ``also`` (relative to it as well)."""

    folder: str
    also: tuple[str, ...] = ()
    files: tuple[str, ...] = ("train.npz", "test.npz")
    note: str = ""  # what the copy is and is not, recorded in the provenance

    def candidates(self, data_dir: Path) -> list[Path]:
        return [(data_dir / folder).resolve() for folder in (self.folder, *self.also)]

    def complete_folder(self, data_dir: Path) -> Path | None:
        """The first candidate folder that holds every file (what loading reads and a dry run checks), or None."""
        return next((f for f in self.candidates(data_dir) if all((f / name).is_file() for name in self.files)), None)


def _idx_files(prefix_train: str, prefix_test: str, labels_kind: str = "labels-idx1-ubyte") -> tuple[str, ...]:
    return (
        f"{prefix_train}-images-idx3-ubyte",
        f"{prefix_train}-{labels_kind}",
        f"{prefix_test}-images-idx3-ubyte",
        f"{prefix_test}-{labels_kind}",
    )


_TRAIN_TEST = {"train": {"train": True}, "test": {"train": False}}


def _emnist_source(split: str, label_offset: int = 0) -> TorchvisionSource:
    return TorchvisionSource(
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
    TorchvisionSource("MNIST", "MNIST/raw", _idx_files("train", "t10k"), _TRAIN_TEST),
)
_register(
    DatasetSpec("kmnist", 10, _KMNIST_CLASSES, "kmnist", _KMNIST_PROVENANCE,
                "cursive Japanese (Kuzushiji) hiragana, 60,000 train / 10,000 test, 1x28x28"),
    TorchvisionSource("KMNIST", "KMNIST/raw", _idx_files("train", "t10k"), _TRAIN_TEST),
)
_register(
    DatasetSpec("fmnist", 10, _FMNIST_CLASSES, "fmnist", _FMNIST_PROVENANCE,
                "Zalando clothing images (Fashion-MNIST), 60,000 train / 10,000 test, 1x28x28"),
    TorchvisionSource("FashionMNIST", "FashionMNIST/raw", _idx_files("train", "t10k"), _TRAIN_TEST),
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
    TorchvisionSource(
        "QMNIST", "QMNIST/raw", _idx_files("qmnist-train", "qmnist-test", "labels-idx2-int"),
        {"train": {"what": "train"}, "test": {"what": "test"}},
    ),
)
_register(
    DatasetSpec("svhn", 10, _DIGITS, "digits",
                "Netzer et al. 2011 (Stanford, Google); non-commercial use only; http://ufldl.stanford.edu/housenumbers/",
                "Street View House Numbers, cropped digits, 73,257 train / 26,032 test, 3x32x32 (label 10 is 0)"),
    TorchvisionSource("SVHN", "", ("train_32x32.mat", "test_32x32.mat"),
                       {"train": {"split": "train"}, "test": {"split": "test"}}),
)
_register(
    DatasetSpec("usps", 10, _DIGITS, "digits",
                "J. J. Hull 1994 (US Postal Service / CEDAR), libsvm copy by C.-J. Lin; no licence stated; "
                "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass.html#usps",
                "US Postal Service handwritten digits, 7,291 train / 2,007 test, 1x16x16"),
    TorchvisionSource("USPS", "", ("usps.bz2", "usps.t.bz2"), _TRAIN_TEST),
)

# EMNIST byclass as the npz copy in ../shared/datasets/npz/emnist-byclass (see its SOURCES.md): upright images,
# labels 0-9 digits, 10-35 A-Z, 36-61 a-z (torchvision's EMNIST byclass order). Only EMNIST's official byclass
# *test* split was reachable, split at random into 100,000 train / 16,323 test: a 62-class source, not EMNIST's
# own train/test split. It is found in <data_dir>/emnist-byclass, or next to a torchvision folder as
# <data_dir>/../npz/emnist-byclass (the layout of ../shared/datasets).
_register(
    DatasetSpec("emnist-byclass", 62, tuple(string.digits + string.ascii_uppercase + string.ascii_lowercase),
                "emnist-byclass", _EMNIST_PROVENANCE,
                "EMNIST byclass (npz copy): digits and letters, 62 unbalanced classes, 100,000 train / 16,323 test "
                "drawn from EMNIST's byclass test split"),
    NpzSource("emnist-byclass", also=("../npz/emnist-byclass",),
              note="EMNIST byclass official test split (116,323 images) split at random (seed 0) into 100,000 train "
                   "and 16,323 test; not EMNIST's own train/test split"),
)

_CIFAR_PROVENANCE = ("A. Krizhevsky 2009, Learning Multiple Layers of Features from Tiny Images (University of "
                     "Toronto); no licence stated; https://www.cs.toronto.edu/~kriz/cifar.html")
_register(
    DatasetSpec("cifar10", 10, ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                "truck"), "cifar10", _CIFAR_PROVENANCE,
                "CIFAR-10: 10 object classes, 50,000 train / 10,000 test, 3x32x32"),
    TorchvisionSource("CIFAR10", "cifar-10-batches-py",
                       ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                        "test_batch", "batches.meta"), _TRAIN_TEST, channels_last=True),
)
_register(
    DatasetSpec("cifar100", 100, tuple(f"class{i}" for i in range(100)), "cifar100", _CIFAR_PROVENANCE,
                "CIFAR-100: 100 fine object classes, 50,000 train / 10,000 test, 3x32x32"),
    TorchvisionSource("CIFAR100", "cifar-100-python", ("train", "test", "meta"), _TRAIN_TEST, channels_last=True),
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


def registry_entry(name: str) -> tuple[DatasetSpec, object]:
    """(spec, source) of a resolved registry name: a ``TorchvisionSource``, an ``NpzSource`` or the Path of a
    shipped sample."""
    return _REGISTRY[name]


def list_datasets() -> list[DatasetSpec]:
    """Every registry dataset, in registry order (npz folders are not listed)."""
    return [spec for spec, _ in _REGISTRY.values()]


def npz_spec(name: str, num_classes: int) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        num_classes=num_classes,
        class_names=tuple(str(i) for i in range(num_classes)),
        label_space=name,
        provenance=f"user data from {name[len(NPZ_PREFIX):]}",
        description="user-supplied train.npz / test.npz",
    )
