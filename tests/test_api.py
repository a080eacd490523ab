"""The Python API: the same runs and tables as the CLI, as Python objects."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import transferlab
from helpers import assert_user_error, run_cli

TRAIN = dict(n=300, epochs=1, batch_size=64, device="cpu", seed=0)


def _comparable(frame: pd.DataFrame) -> pd.DataFrame:
    # Wall-clock columns differ between any two runs; everything else must match.
    timing = [c for c in frame.columns if "second" in c or "time" in c]
    return frame.drop(columns=timing).reset_index(drop=True)


@pytest.mark.slow  # pretrain, fine-tune and a matrix twice (API and CLI)
def test_api_pipeline_matches_the_cli(tmp_path, capsys):
    runs = tmp_path / "runs"
    source = transferlab.pretrain(model="mlp", dataset="kmnist-sample", out=runs, **TRAIN)
    assert isinstance(source.model, torch.nn.Module) and 0.0 <= source.metrics["test_accuracy"] <= 1.0
    target = transferlab.finetune(source=source, dataset="mnist-sample", freeze=2, out=runs, **TRAIN)
    assert target.config["kind"] == "finetune"
    tables = transferlab.attack_matrix(sources=[source], targets=[target.path], dataset="mnist-sample",
                                       attack="fgsm", eps=[0.1, 0.2], samples=60, device="cpu",
                                       out=tmp_path / "api")
    assert isinstance(tables.cells, pd.DataFrame) and len(tables.cells) > 0

    code, out, err = run_cli(["attack-matrix", "--sources", source.path, "--targets", target.path,
                              "--dataset", "mnist-sample", "--attack", "fgsm", "--eps", "0.1,0.2", "--samples", 60,
                              "--device", "cpu", "--no-progress", "--out", tmp_path / "cli"], capsys)
    assert code == 0, err
    for name, frame in (("cells", tables.cells), ("lineage", tables.lineage)):
        written = pd.read_csv(tmp_path / "api" / f"{name}.csv")
        from_cli = pd.read_csv(tmp_path / "cli" / f"{name}.csv")
        pd.testing.assert_frame_equal(_comparable(written), _comparable(from_cli))
        # The returned frame is what was written (round-tripped through CSV the same way).
        round_trip = pd.read_csv(io.StringIO(frame.to_csv(index=False)))
        pd.testing.assert_frame_equal(_comparable(round_trip), _comparable(from_cli))

    reloaded = transferlab.load_run(target.path)
    images, _ = transferlab.load_dataset("mnist-sample", "test", "gray28")
    batch = images[:8].float() / 255
    with torch.no_grad():
        assert torch.equal(reloaded.model(batch), target.model(batch))


def test_load_dataset_returns_uint8_tensors_on_the_canvas():
    images, labels = transferlab.load_dataset("fmnist-sample", split="train", canvas="rgb32")
    assert isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
    assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
    assert set(labels.unique().tolist()) <= set(range(10))
    as_arrays = transferlab.load_dataset("fmnist-sample", split="train", canvas="rgb32", as_numpy=True)
    assert as_arrays[0].dtype == np.uint8 and np.array_equal(as_arrays[0], images.numpy())


def test_load_dataset_rejects_an_unknown_split():
    with pytest.raises(transferlab.UserError, match="unknown split"):
        transferlab.load_dataset("mnist-sample", split="validation")


@pytest.mark.slow  # pretrain, fine-tune and an attack matrix, as docs/api.md writes them
def test_docs_api_example_runs(tmp_path, monkeypatch):
    # docs/api.md's example must run as written (it is tiny on purpose).
    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/api.md", "exec"), {})
    assert (tmp_path / "results" / "api-demo" / "matrix" / "cells.csv").is_file()
