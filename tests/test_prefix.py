"""The frozen-prefix cache: a fine-tune trains its tail on activations computed once, with the same numbers;
where the frozen part is not a pure function of the image, it takes the full forward and says why."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from transferlab import prefix, runs as runs_module, store
from transferlab.api import load_dataset
from transferlab.device import Numerics
from transferlab.models import create_model, freeze, set_train_mode
from transferlab.runs import FinetuneRequest, PretrainRequest, RunOutput, finetune, pretrain
from transferlab.training import TrainConfig, fit

FAST = dict(epochs=1, batch_size=64, precision="fp32")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A small ResNet pretrained on 200 KMNIST-sample images."""
    outcome = pretrain(PretrainRequest(model="resnet", dataset="kmnist-sample", n=200), config=TrainConfig(**FAST),
                       device="cpu", output=RunOutput(tmp_path_factory.mktemp("runs"), progress=False))
    return outcome.run_dir


def _finetune(source, out_dir, name, **train):
    outcome = finetune(FinetuneRequest(dataset="mnist-sample", source=source, n=200, freeze_n=23), device="cpu",
                       output=RunOutput(out_dir, name=name, progress=False),
                       config=TrainConfig(**{**FAST, "val_fraction": 0.1, **train}))
    weights = store.load_run(outcome.run_dir)[0].state_dict()
    return json.loads((outcome.run_dir / "run.json").read_text()), weights


def test_cached_prefix_trains_the_weights_the_full_forward_trains(source, tmp_path, monkeypatch):
    cached, cached_weights = _finetune(source, tmp_path, "cached")
    monkeypatch.setenv(prefix.BUDGET_ENV, "0")  # no room on the device: a memory-mapped file
    mapped, mapped_weights = _finetune(source, tmp_path, "mapped")
    monkeypatch.setattr(prefix, "ENABLED", False)
    full, full_weights = _finetune(source, tmp_path, "full")

    assert cached["frozen_prefix"]["why"] == "prefix cache: 2 activations, 37.6 KB/img"
    assert cached["frozen_prefix"]["storage"] == "device" and mapped["frozen_prefix"]["storage"] == "file"
    assert full["frozen_prefix"]["path"] == "full forward"
    for weights in (cached_weights, mapped_weights):
        assert weights.keys() == full_weights.keys()
        # Equal here; the bound allows for a kernel that sums in another order where the cut changes its batch.
        assert max((weights[k].float() - full_weights[k].float()).abs().max().item() for k in weights) <= 1e-5
    for run in (cached, mapped):
        # train_accuracy: from the cached frontiers through the eval-mode tail; here, from the whole model
        assert run["metrics"] == full["metrics"]
        assert [h["val_accuracy"] for h in run["history"]] == [h["val_accuracy"] for h in full["history"]]


def test_the_train_split_accuracy_from_the_cached_frontier_is_the_whole_models(source, tmp_path, monkeypatch):
    """Without a held-out share too: the eval-mode tail is cut for the final train-split accuracy alone, and the
    whole model scores those images exactly as the tail on their frontier does."""
    scored = []
    real_accuracy = runs_module.accuracy
    monkeypatch.setattr(runs_module, "accuracy", lambda model, images, *a, **k: scored.append(len(images))
                        or real_accuracy(model, images, *a, **k))
    cached, weights = _finetune(source, tmp_path, "cached", val_fraction=0.0)
    assert scored == [900]  # the test split only (mnist-sample: 900 test images); the 200 training images were not
    model = store.load_run(tmp_path / "cached")[0]
    images, labels = load_dataset("mnist-sample", split="train")
    subset = torch.tensor(json.loads((tmp_path / "cached" / "subset_indices.json").read_text()))
    assert cached["metrics"]["train_accuracy"] == real_accuracy(model, images[subset], labels[subset],
                                                                torch.device("cpu"))


@pytest.mark.parametrize("train, why", [
    ({"augment_shift": 2}, "full forward: augmentation shifts the input"),
    ({"augment_flip": True}, "full forward: augmentation flips the input"),
    ({"bn_stats": "update"}, "full forward: a frozen BatchNorm updates its statistics (bn_stats=update)"),
])
def test_a_frozen_part_that_is_no_pure_function_of_the_image_takes_the_full_forward(source, tmp_path, train, why):
    run, _ = _finetune(source, tmp_path, "fallback", **train)
    assert run["frozen_prefix"] == {"path": "full forward", "why": why}


class DataDependent(nn.Module):
    """A user's model whose forward branches on the data: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
        self.head = nn.Linear(4 * 26 * 26, 3)

    def forward(self, x):
        x = self.body(x)
        if x.mean() > 0:
            x = x * 2
        return self.head(x.flatten(1))


def test_a_model_that_does_not_trace_takes_the_full_forward_and_says_why():
    model = DataDependent()
    freeze(model, 2)
    images, labels = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8), torch.arange(40) % 3
    result = fit(model, images, labels, TrainConfig(**FAST, min_steps=0), torch.device("cpu"), progress=False)
    assert result.frozen_prefix["path"] == "full forward"
    assert result.frozen_prefix["why"].startswith("full forward: the model does not trace with torch.fx (TraceError")


def test_a_frozen_dropout_ends_the_prefix_and_the_tail_matches_the_model():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(8, 8, 3), nn.Flatten(),
                          nn.Linear(8 * 24 * 24, 3))
    freeze(model, 4)  # both convolutions frozen; the dropout between them draws random numbers in training
    model.train()
    split = prefix.split_model(model, torch.rand(3, 1, 28, 28))
    assert split.shapes == [(8, 26, 26)]  # cut before the dropout, not after the second convolution
    model.eval()
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(split.tail(*split.prefix(x)), model(x))


def _split():
    torch.manual_seed(0)
    model = create_model("resnet", num_classes=10, in_channels=1, image_size=28)
    freeze(model, 23)
    set_train_mode(model)
    return prefix.split_model(model, torch.rand(3, 1, 28, 28))


def test_a_killed_or_damaged_cache_file_is_never_used(tmp_path, monkeypatch):
    split, images = _split(), torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8)
    cpu, fp32 = torch.device("cpu"), Numerics()
    expected = prefix.compute_frontier(split, images, cpu, fp32, chunk=8)  # on the device
    real = prefix._prefix_chunks

    def killed(*args):
        yield from list(real(*args))[:1]
        raise KeyboardInterrupt  # the fine-tune is stopped halfway through writing the file

    monkeypatch.setattr(prefix, "_prefix_chunks", killed)
    with pytest.raises(KeyboardInterrupt):
        prefix.compute_frontier(split, images, cpu, fp32, chunk=8, budget=0, cache_dir=tmp_path)
    assert list(tmp_path.rglob("*")) == [tmp_path / "frontier"]  # no half-written file, no temporary
    monkeypatch.setattr(prefix, "_prefix_chunks", real)

    resumed = prefix.compute_frontier(split, images, cpu, fp32, chunk=8, budget=0, cache_dir=tmp_path)
    assert resumed.storage == "file"
    assert all(torch.equal(a, b) for a, b in zip(resumed.tensors, expected.tensors))

    path = resumed.path
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # one flipped byte: the checksum no longer matches, so the file is rebuilt
    path.write_bytes(bytes(data))
    stale = path.with_name(f".{path.name}.abcd1234.tmp")
    stale.write_bytes(b"half")  # what a SIGKILL mid-write leaves: the next write of this key removes it
    rebuilt = prefix.compute_frontier(split, images, cpu, fp32, chunk=8, budget=0, cache_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.tensors, expected.tensors))
    assert not stale.exists()


@pytest.mark.slow  # over 0.7 s on 2 cores: the full suite (--all) runs it
def test_targets_of_one_source_share_their_prefix_in_the_matrix_with_identical_cells(source, tmp_path, monkeypatch):
    from transferlab.matrix import run_matrix

    targets = [finetune(FinetuneRequest(dataset="mnist-sample", source=source, n=n, freeze_n=23), device="cpu",
                        output=RunOutput(tmp_path, progress=False), config=TrainConfig(**FAST)).run_dir
               for n in (100, 150)]
    calls = []
    real = prefix.predict_shared
    monkeypatch.setattr(prefix, "predict_shared", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    common = dict(sources=[source], targets=targets, dataset="mnist-sample", attack_names=["fgsm"],
                  eps_values=[0.1], samples=40, device="cpu", progress=False, white_box=False, precision="fp32")
    shared = run_matrix(out_dir=tmp_path / "shared", **common)
    # one clean pass and one pass on the source's set, each running the prefix once for both targets
    assert calls == [2, 2]
    monkeypatch.setattr(prefix, "ENABLED", False)
    alone = run_matrix(out_dir=tmp_path / "alone", **common)
    assert calls == [2, 2]
    assert (tmp_path / "shared" / "cells.csv").read_text() == (tmp_path / "alone" / "cells.csv").read_text()
    assert len(shared.cells) == len(alone.cells) == 3


def test_the_planner_scores_fine_tunes_of_one_source_and_freeze_in_one_eval_step(tmp_path):
    from pathlib import Path

    from transferlab.study import load_study, plan

    steps = plan(load_study(Path(__file__).parent.parent / "studies" / "quick.toml"), tmp_path)
    evals = [s for s in steps if s.kind == "eval" and s.id.startswith("eval/fgsm/pre:kmnist-resnet/")]
    scored = sorted(tuple(s.config["evaluated"]) if isinstance(s.config["evaluated"], list)
                    else (s.config["evaluated"],) for s in evals)
    assert scored == [("finetune/fmnist-resnet/mnist-sample500/f23/s0", "finetune/fmnist-resnet/mnist-sample2000/f23/s0"),
                      ("finetune/kmnist-resnet/mnist-sample500/f23/s0", "finetune/kmnist-resnet/mnist-sample2000/f23/s0"),
                      ("pretrain/fmnist-resnet/s0",), ("pretrain/kmnist-resnet/s0",)]
    assert all(set(s.config["evaluated"]) <= set(s.inputs) for s in evals if isinstance(s.config["evaluated"], list))
