"""`transferlab import`: a model pretrained elsewhere (weights from a local safetensors file) becomes a source run
without training, so it can be fine-tuned from (with lineage) and attacked in a matrix, as the ViT seed
experiment needs for its ImageNet ViT. A small torchvision model stands in for the ViT here."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from helpers import assert_user_error, run_cli

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture
def imagenet_weights(tmp_path):
    """A torchvision mobilenet_v3_small with random weights and its 1,000-class head, saved as safetensors."""
    torch.manual_seed(0)
    net = torchvision.models.get_model("mobilenet_v3_small", weights=None).eval()
    path = tmp_path / "mobilenet_in1k.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return net, path


@pytest.mark.slow  # import, fine-tune and an attack matrix through the CLI, on a 1,000-class mobilenet
def test_an_imported_model_is_a_source_run_that_fine_tunes_and_is_attacked(imagenet_weights, tmp_path, capsys):
    reference, weights = imagenet_weights
    runs = tmp_path / "runs"
    code, out, err = run_cli(["import", "--model", "torchvision:mobilenet_v3_small", "-o", f"weights={weights}",
                              "--label-space", "imagenet", "--classes", "1000", "--canvas", "rgb32",
                              "--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD)),
                              "--name", "mnv3_in1k", "--out", runs], capsys)
    assert code == 0, err
    assert "imported mnv3_in1k" in out and "1000 classes of label space imagenet" in out
    info = json.loads((runs / "mnv3_in1k" / "run.json").read_text())
    assert info["kind"] == "imported" and info["dataset"]["label_space"] == "imagenet"
    assert info["imported_from"]["sha256"] == __import__("hashlib").sha256(weights.read_bytes()).hexdigest()

    # The run computes what the pretrained network computes on normalised pixels: nothing was retrained.
    import transferlab

    run = transferlab.load_run(runs / "mnv3_in1k")
    x = torch.rand(3, 3, 32, 32)
    expected = reference((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    torch.testing.assert_close(run.model(x), expected, rtol=1e-4, atol=1e-4)

    code, out, err = run_cli(["finetune", "--from", runs / "mnv3_in1k", "--dataset", "mnist-sample", "--n", "200",
                              "--freeze", "10", "--epochs", "1", "--batch-size", "50", "--precision", "fp32",
                              "--out", runs, "--no-progress", "--name", "final_mnv3"], capsys)
    assert code == 0, err
    tuned = json.loads((runs / "final_mnv3" / "run.json").read_text())
    assert tuned["lineage"]["pretrain_run"] == "mnv3_in1k" and tuned["lineage"]["pretrain_label_space"] == "imagenet"
    assert tuned["freeze"]["head_replaced"] and tuned["freeze"]["head_replaced_from"] == 1000

    code, out, err = run_cli(["attack-matrix", "--sources", runs / "mnv3_in1k", "--targets", runs / "final_mnv3",
                              "--dataset", "mnist-sample", "--attack", "fgsm", "--eps", "0.1", "--samples", "40",
                              "--precision", "fp32", "--out", tmp_path / "matrix", "--no-progress"], capsys)
    assert code == 0, err
    cells = pd.read_csv(tmp_path / "matrix" / "cells.csv")
    assert len(cells) >= 1 and cells["clean_correct"].notna().all()


def test_import_mistakes_are_one_line_errors(imagenet_weights, tmp_path, capsys):
    _, weights = imagenet_weights
    common = ["--label-space", "imagenet", "--classes", "1000", "--canvas", "rgb32", "--out", tmp_path / "runs"]
    assert_user_error(["import", "--model", "torchvision:mobilenet_v3_small", *common], capsys,
                      "-o weights=FILE.safetensors")
    assert_user_error(["import", "--model", "resnet", *common], capsys, "zoo family", "transferlab pretrain")
    assert_user_error(["import", "--model", "torchvision:resnet18", "-o", f"weights={weights}", *common], capsys,
                      "does not match")
    assert_user_error(["import", "--model", "torchvision:mobilenet_v3_small", "-o", f"weights={weights}",
                       "--mean", "a,b", *common], capsys, "--mean")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
