"""Build the small real-data samples shipped in transferlab/samples/.

    python scripts/build_samples.py --source /work/shared/datasets/torchvision --out transferlab/samples

For each of MNIST, KMNIST and Fashion-MNIST this reads the real files through
torchvision (download=False), takes a class-stratified seeded subset of the train and
test splits with transferlab.data.stratified_subset, and writes ``<name>-sample.npz``
in the format transferlab.data.read_sample_file reads (arrays stored as xz blobs inside
an ordinary .npz). It then writes SOURCES.md with the provenance, counts, seeds,
sha256 of each file and the licences.

Why 2,700 / 900 and not 3,000 / 1,000: the three samples must stay under 3 MB together.
Losslessly, xz needs about 140 bytes per MNIST image, 270 per KMNIST and 370 per
Fashion-MNIST image (zlib in np.savez_compressed needs 15-20% more), so 3,000 + 1,000 of
each comes to about 3.13 MB; 2,700 + 900 comes to about 2.8 MB.

The output is byte-for-byte reproducible: same seeds, fixed zip timestamps, fixed xz settings.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transferlab.data import (  # noqa: E402
    SAMPLE_FORMAT,
    SAMPLE_TEST_COUNT,
    SAMPLE_TRAIN_COUNT,
    get_spec,
    read_sample_file,
    stratified_subset,
)

# sample name -> torchvision class and the licence line from /work/shared/datasets/SOURCES.md
SAMPLES = {
    "mnist-sample": ("MNIST", "MNIST: Y. LeCun, C. Cortes, C. Burges; CC BY-SA 3.0"),
    "kmnist-sample": ("KMNIST", "Kuzushiji-MNIST: ROIS-DS Center for Open Data in the Humanities (CODH); CC BY-SA 4.0"),
    "fmnist-sample": ("FashionMNIST", "Fashion-MNIST: Zalando Research; MIT"),
}
SEEDS = {"train": 0, "test": 1}
XZ_PRESET = 9 | lzma.PRESET_EXTREME
ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can hold; fixed so rebuilds are identical


def take_sample(root: Path, class_name: str, train: bool, count: int, seed: int):
    from torchvision import datasets

    raw = getattr(datasets, class_name)(str(root), train=train, download=False)
    labels = raw.targets.to("cpu")
    indices = stratified_subset(labels, count, seed)
    images = raw.data[indices].numpy().astype(np.uint8)
    return images, labels[indices].numpy().astype(np.uint8), indices.numpy().astype(np.int32), len(labels)


def write_sample_file(path: Path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """An .npz whose arrays are xz blobs, with a fixed zip timestamp so rebuilds are byte-identical."""
    meta = dict(meta, arrays={key: {"dtype": str(a.dtype), "shape": list(a.shape)} for key, a in arrays.items()})
    entries = {"format": np.array(SAMPLE_FORMAT), "meta": np.array(json.dumps(meta, sort_keys=True))}
    for key, array in arrays.items():
        blob = lzma.compress(np.ascontiguousarray(array).tobytes(), preset=XZ_PRESET)
        entries[key] = np.frombuffer(blob, dtype=np.uint8)
    temp = path.with_suffix(".tmp")
    with zipfile.ZipFile(temp, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, array in entries.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_TIMESTAMP), buffer.getvalue())
    os.replace(temp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="torchvision root holding MNIST/, KMNIST/, FashionMNIST/")
    parser.add_argument("--out", type=Path, required=True, help="output folder (transferlab/samples)")
    parser.add_argument("--train", type=int, default=SAMPLE_TRAIN_COUNT, help="train images per sample")
    parser.add_argument("--test", type=int, default=SAMPLE_TEST_COUNT, help="test images per sample")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    for name, (class_name, licence) in SAMPLES.items():
        arrays, selection, available = {}, {}, {}
        for split, count in (("train", args.train), ("test", args.test)):
            images, labels, indices, total = take_sample(args.source, class_name, split == "train", count, SEEDS[split])
            arrays[f"{split}_images"] = images
            arrays[f"{split}_labels"] = labels
            arrays[f"{split}_source_indices"] = indices
            available[split] = total
            selection[split] = {
                "method": "transferlab.data.stratified_subset",
                "seed": SEEDS[split],
                "count": count,
                "of": total,
            }
        meta = {
            "dataset": name,
            "source": f"torchvision.datasets.{class_name}",
            "licence": licence,
            "selection": selection,
        }
        path = args.out / f"{name}.npz"
        write_sample_file(path, meta, arrays)

        # Read back through the loader's own reader: what ships is what was taken.
        _, reread = read_sample_file(path)
        for key, array in arrays.items():
            assert np.array_equal(reread[key], array), f"{path}: {key} did not survive the round trip"

        size = path.stat().st_size
        sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        per_class = np.bincount(arrays["train_labels"], minlength=10).tolist()
        rows.append((name, class_name, licence, selection, available, size, sha256, per_class))
        print(f"{path}: {size:,} bytes, train {args.train} of {available['train']}, test {args.test} of {available['test']}")

    total_size = sum(row[5] for row in rows)
    print(f"total {total_size:,} bytes")
    (args.out / "SOURCES.md").write_text(sources_markdown(rows, total_size))
    return 0


def sources_markdown(rows, total_size: int) -> str:
    lines = [
        "# Shipped samples: provenance and licences",
        "",
        "Small real samples of three datasets, so transferlab's demos and tests run offline.",
        "Built by `scripts/build_samples.py --source <torchvision root> --out transferlab/samples`",
        "from copies verified against the official checksums (see the project's dataset notes),",
        "read through torchvision's dataset classes with `download=False`.",
        "",
        "Selection: `transferlab.data.stratified_subset(labels, count, seed)` on each split: class",
        "proportions of the split kept (largest remainder), seeded `torch.Generator`, indices sorted.",
        "The indices into the original split are stored in each file (`train_source_indices`,",
        "`test_source_indices`). Images are the original uint8 28x28 pixels, unchanged.",
        "",
        "| file | from | train (seed, of) | test (seed, of) | bytes | sha256 |",
        "|---|---|---|---|---|---|",
    ]
    for name, class_name, _, selection, available, size, sha256, _ in rows:
        train, test = selection["train"], selection["test"]
        lines.append(
            f"| `{name}.npz` | torchvision.datasets.{class_name} | {train['count']:,} (seed {train['seed']}, of {available['train']:,})"
            f" | {test['count']:,} (seed {test['seed']}, of {available['test']:,}) | {size:,} | `{sha256}` |"
        )
    lines += [
        "",
        f"Total: {total_size:,} bytes.",
        "",
        "Train images per class (0-9):",
        "",
    ]
    for name, *_, per_class in rows:
        lines.append(f"- `{name}`: {', '.join(str(c) for c in per_class)}")
    lines += [
        "",
        "Notes:",
        "",
        "- The KMNIST train sample is drawn from the 7,011 train images available when it was",
        "  built (the first 7,011 of the official 60,000, in order), not from all 60,000.",
        f"- Sizes are {rows[0][3]['train']['count']:,} train / {rows[0][3]['test']['count']:,} test rather than 3,000 / 1,000 so that all three",
        "  files stay under 3 MB together (lossless xz needs about 140, 270 and 370 bytes per",
        "  MNIST, KMNIST and Fashion-MNIST image).",
        "",
        "## File format",
        "",
        "An ordinary `.npz` (zip of `.npy`, readable with `numpy.load(allow_pickle=False)`):",
        "`format` and `meta` (JSON) are 0-d strings; every other entry is a uint8 blob holding the",
        "xz-compressed raw bytes of one array, whose dtype and shape are in `meta[\"arrays\"]`.",
        "`transferlab.data.read_sample_file(path)` returns the decoded arrays.",
        "",
        "## Licences and attribution",
        "",
    ]
    for name, _, licence, *_ in rows:
        spec = get_spec(name)
        lines.append(f"- `{name}.npz` - {licence}. {spec.provenance.split('; ')[-1]}")
    lines += [
        "",
        "The samples are redistributed under the same licences as their sources: the MNIST and",
        "Kuzushiji-MNIST samples under CC BY-SA (3.0 and 4.0), the Fashion-MNIST sample under the",
        "MIT licence. Kuzushiji-MNIST: Clanuwat et al., \"Deep Learning for Classical Japanese",
        "Literature\" (2018), data by the National Institute of Japanese Literature, processed by",
        "ROIS-DS CODH. Fashion-MNIST: Xiao, Rasul and Vollgraf, \"Fashion-MNIST: a Novel Image",
        "Dataset for Benchmarking Machine Learning Algorithms\" (2017).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
