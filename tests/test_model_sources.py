"""Models from anywhere: module:factory, the transferlab.models entry points, torchvision:NAME, timm:NAME."""

from __future__ import annotations

import importlib.metadata
import json
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import transferlab
import helpers
from helpers import assert_user_error, run_cli
from transferlab import attacks, model_sources
from transferlab.models import create_model

FACTORY = textwrap.dedent('''
    import torch
    from torch import nn

    def make(num_classes, in_channels, image_size, width=8):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, int(width)), nn.ReLU(),
                             nn.Linear(int(width), num_classes))

    def not_a_module(num_classes, in_channels, image_size):
        return "a string"

    def wrong_shape(num_classes, in_channels, image_size):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes + 1))
''')
TRAIN = dict(n=48, epochs=1, batch_size=16, device="cpu")



@pytest.fixture(autouse=True)
def trusted_code(monkeypatch):
    """These tests name their own modules in study files and run.json: trusted (tests/test_trust_code.py tests
    the refusal)."""
    monkeypatch.setenv("TRANSFERLAB_TRUST_CODE", "1")

@pytest.fixture
def user_module(tmp_path, monkeypatch):
    yield from helpers.user_module(tmp_path, monkeypatch, "user_models", FACTORY)


def test_user_factory_trains_records_its_source_and_reloads_only_where_importable(user_module, tmp_path,
                                                                                    monkeypatch, capsys):
    code, out, err = run_cli(["pretrain", "--model", f"{user_module}:make", "-o", "width=12", "--dataset",
                              "mnist-sample", "--n", 48, "--epochs", 1, "--device", "cpu", "--no-progress",
                              "--out", tmp_path / "runs"], capsys)
    assert code == 0, err
    run_dir = next((tmp_path / "runs").iterdir())
    config = json.loads((run_dir / "run.json").read_text())["model"]["config"]
    assert config["family"] == f"{user_module}:make" and config["width"] == 12
    run = transferlab.load_run(run_dir)
    assert run.model.net[1].out_features == 12

    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    sys.modules.pop(user_module, None)
    with pytest.raises(transferlab.UserError, match="cannot import"):
        transferlab.load_run(run_dir)


def test_entry_point_family(user_module, monkeypatch):
    point = importlib.metadata.EntryPoint(name="tiny-user-mlp", value=f"{user_module}:make",
                                          group=model_sources.ENTRY_POINT_GROUP)
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [point] if kw.get("group") == model_sources.ENTRY_POINT_GROUP else real(**kw))
    model = create_model("tiny-user-mlp", num_classes=5, in_channels=1, image_size=28)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 5)
    assert model.config["family"] == "tiny-user-mlp"


@pytest.mark.slow  # an 11 M-parameter net trained and fine-tuned on CPU: the costliest test here
@pytest.mark.parametrize("canvas", ["gray28", "rgb32"])
def test_torchvision_resnet18_trains_round_trips_attacks_and_freezes(canvas, tmp_path):
    run = transferlab.pretrain(model="torchvision:resnet18", dataset="fmnist-sample", canvas=canvas,
                               out=tmp_path, **TRAIN)
    channels, size = (1, 28) if canvas == "gray28" else (3, 32)
    images, labels = transferlab.load_dataset("fmnist-sample", "test", canvas)
    x = images[:6].float() / 255
    reloaded = transferlab.load_run(run.path)
    with torch.no_grad():
        assert reloaded.model(x).shape == (6, 10)
        assert torch.equal(reloaded.model(x), run.model(x))
    adversarial = attacks.craft(reloaded.model, x, labels[:6], "pgd", 0.05, steps=2)
    assert (adversarial - x).abs().max() <= 0.05 + 1e-6 and adversarial.min() >= 0 and adversarial.max() <= 1

    assert x.shape[1:] == (channels, size, size)
    if canvas == "rgb32":  # fine-tuning costs the most; the freezing logic does not depend on the canvas
        target = transferlab.finetune(source=run, dataset="mnist-sample", freeze=10, out=tmp_path, **TRAIN)
        assert target.config["freeze"]["n"] == 10 and target.config["freeze"]["trainable_tensors"] == 62 - 10


def test_inspect_counts_and_names_torchvision_blocks(capsys):
    code, out, err = run_cli(["inspect", "torchvision:resnet18", "--freeze-to", "net.layer1"], capsys)
    assert code == 0, err
    assert "net.conv1.weight" in out and "net.fc.bias" in out
    assert "15 frozen" in out.replace("\n", " ")


@pytest.mark.parametrize("model, fragment", [
    ("no_such_module_xyz:make", "cannot import"),
    ("{mod}:not_a_module", "not a torch nn.Module"),
    ("{mod}:wrong_shape", "expected (2, 10)"),
    ("torchvision:no_such_net", "torchvision has no model"),
])
def test_bad_model_sources_are_user_errors(model, fragment, user_module, capsys):
    assert_user_error(["inspect", model.format(mod=user_module)], capsys, fragment)


def test_weights_file_that_does_not_match_is_a_user_error(tmp_path, capsys):
    save_file({"fc.weight": torch.zeros(3, 3)}, str(tmp_path / "bad.safetensors"))
    assert_user_error(["inspect", "torchvision:resnet18", "-o", f"weights={tmp_path / 'bad.safetensors'}"],
                      capsys, "does not match")


def test_torchvision_weights_come_from_a_local_safetensors_file(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    model = create_model("torchvision:resnet18", num_classes=10, in_channels=3, image_size=32,
                         weights=str(tmp_path / "r18.safetensors"))
    assert torch.equal(model.net.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    gray = create_model("torchvision:resnet18", num_classes=10, in_channels=1, image_size=28,
                        weights=str(tmp_path / "r18.safetensors"))
    assert torch.allclose(gray.net.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))


@pytest.mark.timm
@pytest.mark.slow  # an 86 M-parameter ViT at 224 x 224, forward and backward
def test_timm_vit_base_at_224_from_a_local_random_weights_file(tmp_path):
    timm = pytest.importorskip("timm")
    reference = timm.create_model("vit_base_patch16_224", pretrained=False)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    model = create_model("timm:vit_base_patch16_224", num_classes=100, in_channels=3, image_size=32,
                         weights=str(tmp_path / "vit.safetensors"), resize=224)
    assert torch.equal(model.net.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight)
    out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 100)
    out.sum().backward()
    assert model.net.patch_embed.proj.weight.grad is not None


@pytest.mark.timm
@pytest.mark.slow  # imports timm (seconds) and trains a ViT
def test_tiny_timm_vit_trains_and_reloads(tmp_path):
    pytest.importorskip("timm")
    run = transferlab.pretrain(model="timm:vit_tiny_patch16_224", dataset="fmnist-sample", canvas="rgb32",
                               options={"img_size": 32, "patch_size": 8, "depth": 2}, out=tmp_path, **TRAIN)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(transferlab.load_run(run.path).model(x), run.model(x))
