"""Tests for transferlab.data.

The loaders run on tiny files written here in each dataset's real on-disk format (IDX,
SVHN's .mat, USPS's bz2 libsvm text, npz) and are parsed by torchvision's own code. No
test needs the network or the real data sets; only the shipped samples are real.
"""

import bz2
import hashlib
import json
import os
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision

from transferlab import data
from transferlab.errors import UserError

RNG = np.random.default_rng(1234)


# ---- writers for the real on-disk formats ------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX ("sn3 pascalvincent") file: magic 0 0 type ndim, big-endian dims, big-endian data."""
    type_codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}
    header = bytes([0, 0, type_codes[array.dtype], array.ndim])
    header += b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def random_images(count: int, size: int = 28) -> np.ndarray:
    return RNG.integers(0, 256, size=(count, size, size), dtype=np.uint8)


def write_mnist_like(root: Path, class_name: str, splits: dict, prefixes=("train", "t10k")) -> None:
    """splits: {"train": (images, labels), "test": (images, labels)} as uint8 arrays."""
    raw = root / class_name / "raw"
    for (images, labels), prefix in zip((splits["train"], splits["test"]), prefixes):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))


def tiny_splits(train_count=30, test_count=20, num_classes=10, first_label=0):
    make = lambda n: (random_images(n), (np.arange(n) % num_classes + first_label).astype(np.uint8))  # noqa: E731
    return {"train": make(train_count), "test": make(test_count)}


@pytest.fixture
def dirs(tmp_path):
    return {"data_dir": tmp_path / "data", "cache_dir": tmp_path / "cache"}


# ---- registry, names, canvases ------------------------------------------------------------


def test_registry_order_and_class_names_match_torchvision():
    names = [spec.name for spec in data.list_datasets()]
    assert names == [
        "mnist", "kmnist", "fmnist", "emnist-balanced", "emnist-letters", "emnist-digits",
        "qmnist", "svhn", "usps", "emnist-byclass", "cifar10", "cifar100", "mnist-sample", "kmnist-sample",
        "fmnist-sample",
    ]
    datasets = torchvision.datasets
    assert list(data.get_spec("kmnist").class_names) == datasets.KMNIST.classes
    assert list(data.get_spec("fmnist").class_names) == datasets.FashionMNIST.classes
    assert list(data.get_spec("emnist-balanced").class_names) == datasets.EMNIST.classes_split_dict["balanced"]
    assert data.get_spec("emnist-balanced").num_classes == 47
    assert list(data.get_spec("emnist-letters").class_names) == datasets.EMNIST.classes_split_dict["letters"][1:]
    for spec in data.list_datasets():
        assert len(spec.class_names) == spec.num_classes
        assert spec.provenance and "\n" not in spec.provenance


def test_label_spaces():
    space = {spec.name: spec.label_space for spec in data.list_datasets()}
    for name in ("mnist", "qmnist", "usps", "svhn", "emnist-digits", "mnist-sample"):
        assert space[name] == "digits"
    assert space["kmnist"] == space["kmnist-sample"] == "kmnist"
    assert space["fmnist"] == space["fmnist-sample"] == "fmnist"
    assert space["emnist-balanced"] == "emnist-balanced"
    assert space["emnist-letters"] == "emnist-letters"


def test_resolve_name_aliases_case_and_npz(tmp_path, monkeypatch):
    assert data.resolve_name("Fashion-MNIST") == "fmnist"
    assert data.resolve_name("MNIST") == "mnist"
    assert data.resolve_name("emnist_balanced") == "emnist-balanced"
    monkeypatch.chdir(tmp_path)
    assert data.resolve_name("npz:mine") == f"npz:{tmp_path / 'mine'}"


def test_unknown_name_suggests_nearest():
    with pytest.raises(UserError, match="did you mean mnist"):
        data.resolve_name("mnsit")
    with pytest.raises(UserError, match="unknown canvas 'grey28'.*gray28"):
        data.get_canvas("grey28")
    assert data.get_canvas("rgb32") == data.Canvas("rgb32", 3, 32)


def test_default_dirs_follow_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFERLAB_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "c"))
    assert data.default_data_dir() == tmp_path / "d"
    assert data.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TRANSFERLAB_DATA")
    monkeypatch.delenv("TRANSFERLAB_CACHE")
    assert data.default_data_dir() == Path.home() / ".cache" / "transferlab" / "data"
    assert data.default_cache_dir() == Path.home() / ".cache" / "transferlab" / "canvas"


# ---- torchvision formats -------------------------------------------------------------------


@pytest.mark.parametrize("name,class_name", [("mnist", "MNIST"), ("kmnist", "KMNIST"), ("fmnist", "FashionMNIST")])
def test_idx_datasets_load_on_both_canvases(dirs, name, class_name):
    splits = tiny_splits()
    write_mnist_like(dirs["data_dir"], class_name, splits)

    gray = data.load(name, "gray28", download=False, **dirs)
    assert gray.train.images.dtype == torch.uint8 and gray.train.images.shape == (30, 1, 28, 28)
    assert gray.train.images.is_contiguous()
    assert torch.equal(gray.train.images[:, 0], torch.from_numpy(splits["train"][0]))
    assert gray.test.labels.dtype == torch.int64
    assert gray.test.labels.tolist() == splits["test"][1].tolist()
    assert len(gray.train) == 30 and len(gray.test) == 20
    assert gray.provenance["source"] == f"torchvision.datasets.{class_name}"
    assert gray.provenance["transforms"] == []

    rgb = data.load(name, "rgb32", download=False, **dirs)
    assert rgb.train.images.shape == (30, 3, 32, 32) and rgb.train.images.dtype == torch.uint8
    assert torch.equal(rgb.train.images[:, 0], rgb.train.images[:, 2])
    assert "gray replicated to 3 channels" in rgb.provenance["transforms"]


def write_emnist(root: Path, split: str, upright: dict) -> None:
    # EMNIST's raw files hold each image transposed; write them the way NIST did.
    raw = root / "EMNIST" / "raw"
    for part, (images, labels) in upright.items():
        write_idx(raw / f"emnist-{split}-{part}-images-idx3-ubyte", np.ascontiguousarray(images.transpose(0, 2, 1)))
        write_idx(raw / f"emnist-{split}-{part}-labels-idx1-ubyte", labels)


def test_emnist_is_transposed_upright(dirs):
    splits = tiny_splits(num_classes=47)
    write_emnist(dirs["data_dir"], "balanced", splits)
    dataset = data.load("emnist-balanced", download=False, **dirs)
    assert torch.equal(dataset.train.images[:, 0], torch.from_numpy(splits["train"][0]))
    assert dataset.test.labels.tolist() == splits["test"][1].tolist()
    assert "transposed upright" in dataset.provenance["transforms"]
    assert dataset.provenance["source"] == "torchvision.datasets.EMNIST(split='balanced')"


def test_emnist_letters_labels_shift_to_zero(dirs):
    splits = tiny_splits(train_count=52, test_count=26, num_classes=26, first_label=1)
    write_emnist(dirs["data_dir"], "letters", splits)
    dataset = data.load("emnist-letters", download=False, **dirs)
    assert dataset.train.labels.min() == 0 and dataset.train.labels.max() == 25
    assert dataset.train.labels.tolist() == (splits["train"][1].astype(int) - 1).tolist()
    assert "labels 1-26 -> 0-25" in dataset.provenance["transforms"]


def test_qmnist_reads_first_label_column(dirs):
    raw = dirs["data_dir"] / "QMNIST" / "raw"
    expected = {}
    for part in ("train", "test"):
        images = random_images(12)
        # QMNIST labels are int32 [N, 8]: digit, NIST class, writer id, ... ; only column 0 is the class.
        labels = RNG.integers(0, 1000, size=(12, 8)).astype(np.int32)
        labels[:, 0] = np.arange(12) % 10
        write_idx(raw / f"qmnist-{part}-images-idx3-ubyte", images)
        write_idx(raw / f"qmnist-{part}-labels-idx2-int", labels)
        expected[part] = (images, labels[:, 0])
    dataset = data.load("qmnist", download=False, **dirs)
    assert torch.equal(dataset.test.images[:, 0], torch.from_numpy(expected["test"][0]))
    assert dataset.train.labels.tolist() == expected["train"][1].tolist()


@pytest.fixture
def svhn_skips_md5(monkeypatch):
    # SVHN checks the official md5 of its .mat files; ours are tiny fakes, so only that check is relaxed.
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def write_svhn(folder: Path, count: int = 8):
    import scipy.io

    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for part in ("train", "test"):
        images = RNG.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)  # [N, H, W, RGB]
        images[0] = (255, 0, 0)  # pure red: luma 0.299 * 255 = 76.2
        images[1] = 255
        labels = (np.arange(count) % 10 + 1).astype(np.uint8)  # SVHN writes digit 0 as 10
        scipy.io.savemat(folder / f"{part}_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": labels[:, None]})
        written[part] = (images, labels)
    return written


def test_svhn_gray28_and_rgb32(dirs, svhn_skips_md5):
    written = write_svhn(dirs["data_dir"])
    gray = data.load("svhn", "gray28", download=False, **dirs)
    assert gray.train.images.shape == (8, 1, 28, 28)
    assert (gray.train.images[0] == 76).all() and (gray.train.images[1] == 255).all()
    assert gray.train.labels.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0][:8]
    assert gray.provenance["transforms"] == ["grayscale (ITU-R 601 luma weights)", "antialiased bilinear resize 32->28"]

    rgb = data.load("svhn", "rgb32", download=False, **dirs)
    assert rgb.provenance["transforms"] == []
    assert torch.equal(rgb.test.images, torch.from_numpy(written["test"][0]).permute(0, 3, 1, 2))


def test_corrupt_svhn_is_a_user_error(dirs):
    write_svhn(dirs["data_dir"])  # md5 check left in place: these files are not the official ones
    with pytest.raises(UserError, match="svhn: the data could not be read.*train_32x32.mat"):
        data.load("svhn", download=False, **dirs)


def test_usps_bz2_resized_to_28(dirs):
    folder = dirs["data_dir"]
    folder.mkdir(parents=True)
    expected = {}
    for part, file_name in (("train", "usps.bz2"), ("test", "usps.t.bz2")):
        pixels = RNG.choice([-1.0, 1.0], size=(10, 256))  # USPS stores pixels in [-1, 1]
        labels = np.arange(10) + 1  # USPS labels are 1-10
        lines = [f"{label} " + " ".join(f"{j + 1}:{value:g}" for j, value in enumerate(row)) for label, row in zip(labels, pixels)]
        with bz2.open(folder / file_name, "wt") as handle:
            handle.write("\n".join(lines) + "\n")
        expected[part] = (((pixels + 1) / 2 * 255).astype(np.uint8).reshape(10, 1, 16, 16), labels - 1)

    dataset = data.load("usps", download=False, **dirs)
    # exactly what torchvision's own USPS class reads from these files, resized onto the canvas
    native = torchvision.datasets.USPS(str(folder), train=True, download=False)
    assert np.array_equal(np.asarray(native.data)[:, None], expected["train"][0])
    assert dataset.train.images.shape == (10, 1, 28, 28)
    assert dataset.train.labels.tolist() == expected["train"][1].tolist()
    resized, _ = data.to_canvas(torch.from_numpy(expected["train"][0]), "gray28")
    assert torch.equal(dataset.train.images, resized)
    assert dataset.provenance["transforms"] == ["antialiased bilinear resize 16->28"]


def test_emnist_byclass_npz_found_beside_a_torchvision_folder_with_its_provenance(tmp_path):
    """The shared layout: datasets/torchvision (the data_dir) and datasets/npz/emnist-byclass/{train,test}.npz."""
    root = tmp_path / "datasets"
    folder = root / "npz" / "emnist-byclass"
    folder.mkdir(parents=True)
    train_x, test_x = random_images(62), random_images(10)
    np.savez(folder / "train.npz", x=train_x, y=np.arange(62, dtype=np.int64))
    np.savez(folder / "test.npz", x=test_x, y=np.arange(10, dtype=np.int64) * 6)
    (root / "torchvision").mkdir()
    dataset = data.load("emnist_byclass", download=False, data_dir=root / "torchvision", cache_dir=tmp_path / "cache")
    assert dataset.spec.num_classes == 62
    assert dataset.spec.class_names[10] == "A" and dataset.spec.class_names[36] == "a"
    assert torch.equal(dataset.train.images[:, 0], torch.from_numpy(train_x))  # already upright: not transposed
    assert dataset.test.labels.tolist() == list(range(0, 60, 6))
    assert "not EMNIST's own train/test split" in dataset.provenance["source"]
    assert dataset.provenance["root"] == str(folder.resolve())
    with pytest.raises(UserError, match="emnist-byclass: train.npz and test.npz not found in .*emnist-byclass"):
        data.load("emnist-byclass", download=False, data_dir=tmp_path / "elsewhere", cache_dir=tmp_path / "cache")


# ---- cache ---------------------------------------------------------------------------------


def test_second_load_reads_cache_without_torchvision(dirs, monkeypatch):
    write_mnist_like(dirs["data_dir"], "MNIST", tiny_splits())
    first = data.load("mnist", "rgb32", download=False, **dirs)
    assert len(list(dirs["cache_dir"].glob("mnist-rgb32-*.safetensors"))) == 1
    assert not list(dirs["cache_dir"].glob("*.tmp"))

    class NoTorchvision:
        def __init__(self, *args, **kwargs):
            raise AssertionError("torchvision was called although the cache should have been used")

    monkeypatch.setattr(torchvision.datasets, "MNIST", NoTorchvision)
    second = data.load("mnist", "rgb32", download=False, **dirs)
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)
    assert first.provenance == second.provenance
    assert first.fingerprint("train") == second.fingerprint("train")


def test_changed_source_rebuilds_cache(dirs):
    splits = tiny_splits()
    write_mnist_like(dirs["data_dir"], "MNIST", splits)
    assert data.load("mnist", download=False, **dirs).test.labels[0] == 0

    new_labels = np.full(20, 7, dtype=np.uint8)
    label_file = dirs["data_dir"] / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    write_idx(label_file, new_labels)
    os.utime(label_file, ns=(1_000_000_000, 1_000_000_000))  # same size, so make sure the mtime differs
    assert data.load("mnist", download=False, **dirs).test.labels.tolist() == [7] * 20


def test_copied_data_dir_gets_its_own_provenance(dirs, tmp_path):
    import shutil

    write_mnist_like(dirs["data_dir"], "MNIST", tiny_splits())
    first = data.load("mnist", download=False, **dirs)
    shutil.copytree(dirs["data_dir"], tmp_path / "copy")  # copy2 keeps sizes and mtimes
    second = data.load("mnist", data_dir=tmp_path / "copy", download=False, cache_dir=dirs["cache_dir"])
    assert second.provenance["root"] == str((tmp_path / "copy").resolve())
    assert first.fingerprint("train") == second.fingerprint("train")


def test_fingerprint_depends_on_split_canvas_and_content(dirs):
    write_mnist_like(dirs["data_dir"], "MNIST", tiny_splits())
    gray = data.load("mnist", download=False, **dirs)
    rgb = data.load("mnist", "rgb32", download=False, **dirs)
    fingerprints = {gray.fingerprint("train"), gray.fingerprint("test"), rgb.fingerprint("train")}
    assert len(fingerprints) == 3
    assert all(len(f) == 16 and int(f, 16) >= 0 for f in fingerprints)
    assert gray.fingerprint("train") == gray.fingerprint("train")


# ---- missing data --------------------------------------------------------------------------


def test_missing_files_without_download_names_them(dirs):
    with pytest.raises(UserError) as caught:
        data.load("mnist", download=False, **dirs)
    message = str(caught.value)
    assert "\n" not in message
    assert str(dirs["data_dir"] / "MNIST" / "raw") in message
    for file_name in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert file_name in message
    assert "--no-download" in message and "TRANSFERLAB_DATA" in message


def test_failed_download_is_a_user_error(dirs, monkeypatch):
    def no_network(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", no_network)
    with pytest.raises(UserError, match="kmnist: the data could not be downloaded.*train-images-idx3-ubyte") as caught:
        data.load("kmnist", download=True, **dirs)
    assert "\n" not in str(caught.value)


# ---- user npz folders ------------------------------------------------------------------------


def write_npz_folder(folder: Path, train_x, train_y, test_x=None, test_y=None) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "train.npz", x=train_x, y=train_y)
    np.savez(folder / "test.npz", x=train_x if test_x is None else test_x, y=train_y if test_y is None else test_y)
    return f"npz:{folder}"


def test_npz_gray_and_hwc(tmp_path):
    name = write_npz_folder(tmp_path / "gray", random_images(6, size=20), np.array([0, 1, 2, 3, 4, 4]))
    dataset = data.load(name, cache_dir=tmp_path / "cache")
    assert dataset.train.images.shape == (6, 1, 28, 28)
    assert dataset.spec.num_classes == 5 and dataset.spec.label_space == name
    assert data.get_spec(name).num_classes == 5
    assert dataset.provenance["source"] == "npz folder"

    colour = RNG.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    name = write_npz_folder(tmp_path / "colour", colour, np.array([0, 1, 0, 1]))
    rgb = data.load(name, "rgb32", cache_dir=tmp_path / "cache")
    assert torch.equal(rgb.train.images, torch.from_numpy(colour).permute(0, 3, 1, 2))
    assert data.load(name, "gray28", cache_dir=tmp_path / "cache").train.images.shape == (4, 1, 28, 28)


@pytest.mark.parametrize(
    "x,y,problem",
    [
        (np.zeros((3, 28, 28), np.float32), np.array([0, 1, 2]), "x must be uint8"),
        (np.zeros((3, 28), np.uint8), np.array([0, 1, 2]), r"x must be \[N,H,W\]"),
        (np.zeros((3, 28, 28, 2), np.uint8), np.array([0, 1, 2]), "C = 1 or 3"),
        (np.zeros((3, 28, 28), np.uint8), np.array([0, 1]), "3 images but y has 2 labels"),
        (np.zeros((3, 28, 28), np.uint8), np.array([0, -1, 2]), "negative labels"),
        (np.zeros((3, 28, 28), np.uint8), np.array([0.0, 1.0, 2.0]), "y must hold integers"),
    ],
)
def test_npz_validation(tmp_path, x, y, problem):
    name = write_npz_folder(tmp_path / "bad", x, y)
    with pytest.raises(UserError, match=problem) as caught:
        data.load(name, cache_dir=tmp_path / "cache")
    assert "train.npz" in str(caught.value)


def test_npz_missing_file_and_key(tmp_path):
    (tmp_path / "half").mkdir()
    np.savez(tmp_path / "half" / "train.npz", x=random_images(2), y=np.array([0, 1]))
    with pytest.raises(UserError, match="lacks test.npz"):
        data.load(f"npz:{tmp_path / 'half'}", cache_dir=tmp_path / "cache")
    np.savez(tmp_path / "half" / "test.npz", images=random_images(2), y=np.array([0, 1]))
    with pytest.raises(UserError, match="test.npz: has no 'x' array"):
        data.load(f"npz:{tmp_path / 'half'}", cache_dir=tmp_path / "cache")


# ---- stratified subsets --------------------------------------------------------------------


def test_stratified_subset_exact_proportions():
    labels = torch.tensor([0] * 500 + [1] * 300 + [2] * 200)
    indices = data.stratified_subset(labels, 100, seed=0)
    assert indices.dtype == torch.int64 and len(indices) == 100
    assert torch.equal(indices, torch.sort(indices).values) and len(set(indices.tolist())) == 100
    assert torch.bincount(labels[indices]).tolist() == [50, 30, 20]


def test_stratified_subset_largest_remainder_and_rare_classes():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    # quotas 3.5, 2.1, 1.4 -> floors 3, 2, 1 and the one left over goes to the largest remainder (class 0)
    assert torch.bincount(labels[data.stratified_subset(labels, 7, seed=3)]).tolist() == [4, 2, 1]
    rare = torch.tensor([0] * 98 + [1] + [2])
    # class 0's quota is 2.94, classes 1 and 2 earn 0.03 each, yet every class present gets one
    assert torch.bincount(rare[data.stratified_subset(rare, 3, seed=0)]).tolist() == [1, 1, 1]


def test_stratified_subset_is_seeded():
    labels = torch.arange(1000) % 10
    assert torch.equal(data.stratified_subset(labels, 100, 5), data.stratified_subset(labels, 100, 5))
    assert not torch.equal(data.stratified_subset(labels, 100, 5), data.stratified_subset(labels, 100, 6))


@pytest.mark.parametrize("n", [2, 1001])
def test_stratified_subset_bounds(n):
    labels = torch.arange(1000) % 3
    with pytest.raises(UserError, match="between 3 .* and 1000"):
        data.stratified_subset(labels, n, 0)


# ---- channel statistics --------------------------------------------------------------------


def test_channel_stats_match_direct_computation():
    images = torch.from_numpy(RNG.integers(0, 256, size=(5000, 3, 2, 2), dtype=np.uint8))  # more than one chunk
    mean, std = data.channel_stats(images)
    scaled = images.double() / 255
    assert np.allclose(mean, scaled.mean(dim=(0, 2, 3)).tolist())
    assert np.allclose(std, scaled.std(dim=(0, 2, 3), unbiased=False).tolist())
    float_mean, _ = data.channel_stats(scaled.float())
    assert np.allclose(float_mean, mean, atol=1e-6)


# ---- shipped samples -----------------------------------------------------------------------


SAMPLE_NAMES = ("mnist-sample", "kmnist-sample", "fmnist-sample")


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_samples_load_offline(tmp_path, name, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "MNIST", None)  # nothing may reach torchvision's loaders
    dataset = data.load(name, data_dir=tmp_path / "nowhere", download=False, cache_dir=tmp_path / "cache")
    assert dataset.train.images.shape == (data.SAMPLE_TRAIN_COUNT, 1, 28, 28)
    assert dataset.test.images.shape == (data.SAMPLE_TEST_COUNT, 1, 28, 28)
    counts = torch.bincount(dataset.train.labels, minlength=10)
    assert counts.min() >= 0.8 * counts.float().mean() and counts.max() <= 1.2 * counts.float().mean()
    assert dataset.train.images.float().mean() > 10  # real pictures, not blank
    assert dataset.provenance["source"] == "shipped sample"
    json.dumps(dataset.provenance)
    assert data.load(name, "rgb32", cache_dir=tmp_path / "cache").test.images.shape == (data.SAMPLE_TEST_COUNT, 3, 32, 32)


def test_sample_files_are_small_and_documented():
    sizes = {name: (data.SAMPLES_DIR / f"{name}.npz").stat().st_size for name in SAMPLE_NAMES}
    assert sum(sizes.values()) < 3_000_000
    assert all(size < 2 * 1024 * 1024 for size in sizes.values())
    sources = (data.SAMPLES_DIR / "SOURCES.md").read_text()
    for name in SAMPLE_NAMES:
        assert hashlib.sha256((data.SAMPLES_DIR / f"{name}.npz").read_bytes()).hexdigest() in sources
    for licence in ("CC BY-SA 3.0", "CC BY-SA 4.0", "MIT"):
        assert licence in sources
