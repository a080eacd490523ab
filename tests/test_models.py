"""The model zoo: reference parameter tables, every family's contract, freezing, BN modes."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from transferlab.errors import UserError
from transferlab.models import (
    MODEL_FAMILIES,
    block_names,
    create_model,
    freeze,
    freeze_count_for,
    list_models,
    model_from_config,
    parameter_table,
    set_train_mode,
)

FAMILIES = list(MODEL_FAMILIES)
CANVASES = [(1, 28), (3, 32)]


# ----------------------------------------------------------------- reference tables (experiment.md)


def alexnet_shapes(k):
    return [
        (32, 1, 3, 3), (32,), (64, 32, 3, 3), (64,), (128, 64, 3, 3), (128,),
        (256, 128, 3, 3), (256,), (256, 256, 3, 3), (256,),
        (1024, 2304), (1024,), (512, 1024), (512,), (k, 512), (k,),
    ]


def resnet_shapes(k):
    bn16, bn32, bn64 = [(16,), (16,)], [(32,), (32,)], [(64,), (64,)]
    return [
        (16, 1, 3, 3), (16,), *bn16,                              # 0-3 stem
        (16, 16, 3, 3), *bn16, (16, 16, 3, 3), *bn16,             # 4-9 block1
        (32, 16, 3, 3), *bn32, (32, 32, 3, 3), *bn32,             # 10-15 block2 convs
        (32, 16, 3, 3), (32,), *bn32,                             # 16-19 block2 shortcut
        (64, 32, 3, 3), *bn64, (64, 64, 3, 3), *bn64,             # 20-25 block3 convs
        (64, 32, 3, 3), (64,), *bn64,                             # 26-29 block3 shortcut
        (k, 64), (k,),                                            # 30-31 head
    ]


def mixer_shapes(k, depth):
    layer = [
        (196, 49, 1), (196,), (49, 196, 1), (49,), (128,), (128,),  # token mixing, then its LayerNorm
        (64, 128), (64,), (128, 64), (128,), (128,), (128,),        # channel mixing, then its LayerNorm
    ]
    return [(128, 16), (128,), *layer * depth, (128,), (128,), (k, 128), (k,)]


def shapes(model):
    return [row["shape"] for row in parameter_table(model)]


@pytest.mark.parametrize("k", [10, 47])
def test_alexnet_table(k):
    model = create_model("alexnet", num_classes=k)
    assert shapes(model) == alexnet_shapes(k)
    names = [row["name"] for row in parameter_table(model)]
    assert names[:2] == ["conv1.weight", "conv1.bias"] and names[8] == "conv5.weight" and names[-1] == "fc8.bias"


@pytest.mark.parametrize("k", [10, 47])
def test_resnet_table(k):
    model = create_model("resnet", num_classes=k)
    assert shapes(model) == resnet_shapes(k)
    names = [row["name"] for row in parameter_table(model)]
    assert names[:4] == ["stem.conv.weight", "stem.conv.bias", "stem.bn.weight", "stem.bn.bias"]
    assert names[16:20] == ["block2.shortcut.0.weight", "block2.shortcut.0.bias",
                            "block2.shortcut.1.weight", "block2.shortcut.1.bias"]
    assert names[30:] == ["head.weight", "head.bias"]


@pytest.mark.parametrize("depth,count", [(1, 18), (2, 30)])
def test_mixer_table(depth, count):
    model = create_model("mixer", depth=depth)
    assert shapes(model) == mixer_shapes(10, depth)
    assert len(shapes(model)) == count
    names = [row["name"] for row in parameter_table(model)]
    assert names[2] == "layers.0.token_mix.fn.0.weight" and names[6] == "layers.0.token_mix.norm.weight"


def test_table_rows_and_canvas_dependent_sizes():
    row = parameter_table(create_model("resnet"))[0]
    assert row == {"index": 0, "name": "stem.conv.weight", "shape": (16, 1, 3, 3), "count": 144, "trainable": True}
    assert shapes(create_model("alexnet", in_channels=3, image_size=32))[10] == (1024, 256 * 4 * 4)
    # mixer on 32x32: 64 patches of 4x4x3 values, token hidden 4 * 64
    assert shapes(create_model("mixer", in_channels=3, image_size=32))[:3] == [(128, 48), (128,), (256, 64, 1)]


def test_normalize_has_buffers_only():
    model = create_model("resnet", in_channels=3, mean=[0.1, 0.2, 0.3], std=0.25)
    assert list(model.children())[0] is model.normalize
    assert not list(model.normalize.parameters())
    assert model.normalize.mean.shape == (1, 3, 1, 1)
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    assert torch.allclose(model.normalize.std.flatten(), torch.full((3,), 0.25))
    assert "normalize.mean" in model.state_dict()


# ----------------------------------------------------------------- every family


def structured_data(n=64, classes=4, channels=1, size=28, seed=0):
    """A bright square in one of four quadrants (the class) on noise: easy to learn."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.rand(n, channels, size, size, generator=g) * 0.3
    half = size // 2
    for c in range(classes):
        r, col = divmod(c, 2)
        x[y == c, :, r * half:(r + 1) * half, col * half:(col + 1) * half] += 0.7
    return x, y


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("channels,size", CANVASES)
def test_forward_shape(family, channels, size):
    model = create_model(family, num_classes=7, in_channels=channels, image_size=size)
    out = model(torch.rand(5, channels, size, size))
    assert out.shape == (5, 7)
    assert model.family == family
    assert model.config["family"] == family and model.config["image_size"] == size


@pytest.mark.parametrize("family", FAMILIES)
def test_channels_last_and_cpu_autocast(family):
    torch.manual_seed(0)
    model = create_model(family, in_channels=3, image_size=32).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        assert torch.allclose(model(x.to(memory_format=torch.channels_last)), reference, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x).shape == (4, 10)


# Adam without warmup: the transformer and the 4M-parameter alexnet want the smaller step
LEARNING_RATE = {"vit": 1e-3, "alexnet": 1e-3}


# The costliest family to train ten steps (about 1.5 s on one core): in the full suite only.
@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f == "vgg" else f for f in FAMILIES])
def test_training_reduces_loss(family):
    torch.manual_seed(0)
    x, y = structured_data(n=16)
    model = create_model(family, num_classes=4)
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE.get(family, 2e-3))
    model.train()  # measured in train mode too: ten steps are too few for BN running statistics
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = F.cross_entropy(model(x), y).item()
    assert final < 0.7 * losses[0], losses


@pytest.mark.parametrize("family", FAMILIES)
def test_safetensors_round_trip(family, tmp_path):
    torch.manual_seed(0)
    model = create_model(family, in_channels=3, image_size=32, mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.4])
    x = torch.rand(8, 3, 32, 32)
    model.train()
    F.cross_entropy(model(x), torch.arange(8) % 10).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # moves weights and BN statistics
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))

    config = json.loads(json.dumps(model.config))  # the config must survive JSON
    clone = model_from_config(config)
    clone.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    clone.eval()
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
    assert clone.config == model.config


@pytest.mark.parametrize("family", FAMILIES)
def test_input_gradients(family):
    """Attacks need d(loss)/d(pixels), from a model in eval mode (and in train mode)."""
    torch.manual_seed(0)
    model = create_model(family)
    for train in (False, True):
        model.train(train)
        x = torch.rand(4, 1, 28, 28).requires_grad_(True)
        F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_reset_classifier(family):
    torch.manual_seed(0)
    model = create_model(family, num_classes=10)
    head = model.get_classifier()
    assert isinstance(head, torch.nn.Linear) and head.out_features == 10
    before = {k: v.clone() for k, v in model.state_dict().items()}
    freeze(model, len(parameter_table(model)))
    model.reset_classifier(47)

    assert model.get_classifier().out_features == 47 and model.get_classifier() is not head
    assert model.config["num_classes"] == 47
    after = model.state_dict()
    head_keys = {k for k in after if k.startswith(model.head_path + ".")}
    assert head_keys == {model.head_path + ".weight", model.head_path + ".bias"}
    assert all(torch.equal(after[k], v) for k, v in before.items() if k not in head_keys)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 47)
    assert all(p.requires_grad for p in model.get_classifier().parameters())
    assert model_from_config(model.config).get_classifier().out_features == 47


def test_block_help_matches_block_names():
    for family in list_models():
        model = create_model(family.name)
        names = block_names(model)
        for name in names:  # every listed block resolves
            freeze_count_for(model, name)
        assert names[0] in family.block_help and names[-1] in family.block_help


# ----------------------------------------------------------------- freezing


def test_freeze_first_n():
    model = create_model("resnet")
    freeze(model, 23)
    assert [row["trainable"] for row in parameter_table(model)] == [False] * 23 + [True] * 9
    freeze(model, 0)
    assert all(p.requires_grad for p in model.parameters())
    freeze(model, 32)
    assert not any(p.requires_grad for p in model.parameters())


def test_freeze_out_of_range():
    model = create_model("resnet")
    with pytest.raises(UserError, match=r"--freeze 40 is out of range: resnet has 32 parameter tensors \(use 0\.\.32\)"):
        freeze(model, 40)
    with pytest.raises(UserError):
        freeze(model, -1)


@pytest.mark.parametrize("family,block,expected", [
    ("resnet", "block2", 20),
    ("resnet", "block3.bn1", 23),  # the experiment's "freeze 23"
    ("alexnet", "conv4", 8),
    ("alexnet", "conv5", 10),
    ("mixer", "layers.0", 14),
    ("vit", "blocks.2", 4 + 3 * 12),  # embed: cls, pos, proj w/b; 12 tensors per block
    ("vgg", "features.6", 3 * 4 + 3),  # features.0,1,3,4 (conv w + BN w/b each) and features.6
    ("lstm", "lstm", 4),
    ("mlp", "layers.1", 4),
    ("cnn", "conv2", 4),
])
def test_freeze_count_for(family, block, expected):
    model = create_model(family)
    assert freeze_count_for(model, block) == expected
    freeze(model, expected)
    frozen = [row["name"] for row in parameter_table(model) if not row["trainable"]]
    assert frozen[-1].startswith(block + ".")


def test_freeze_count_for_unknown_block():
    model = create_model("resnet")
    with pytest.raises(UserError, match=r"did you mean block2.*blocks: stem, block1, block2, block3, head"):
        freeze_count_for(model, "blok2")
    with pytest.raises(UserError):
        freeze_count_for(model, "block")  # a prefix of a name is not a module
    with pytest.raises(UserError):
        freeze_count_for(model, "normalize")  # no parameters to freeze


# ----------------------------------------------------------------- BatchNorm modes while fine-tuning


def test_set_train_mode_keeps_frozen_bn_statistics():
    torch.manual_seed(0)
    model = create_model("resnet")
    freeze(model, 20)
    set_train_mode(model, "frozen")
    frozen_bns = [model.stem.bn, model.block1.bn1, model.block1.bn2, model.block2.bn1, model.block2.bn2,
                  model.block2.shortcut[1]]
    live_bns = [model.block3.bn1, model.block3.bn2, model.block3.shortcut[1]]
    assert model.training and not any(bn.training for bn in frozen_bns) and all(bn.training for bn in live_bns)

    frozen_before = [bn.running_mean.clone() for bn in frozen_bns]
    live_before = [bn.running_mean.clone() for bn in live_bns]
    model(torch.rand(8, 1, 28, 28))
    assert all(torch.equal(bn.running_mean, b) for bn, b in zip(frozen_bns, frozen_before))
    assert not any(torch.equal(bn.running_mean, b) for bn, b in zip(live_bns, live_before))

    set_train_mode(model, "update")
    assert all(bn.training for bn in frozen_bns)
    model(torch.rand(8, 1, 28, 28))
    assert not any(torch.equal(bn.running_mean, b) for bn, b in zip(frozen_bns, frozen_before))

    with pytest.raises(UserError, match="bn_stats"):
        set_train_mode(model, "freeze")


# ----------------------------------------------------------------- user errors


def test_unknown_family_suggests():
    with pytest.raises(UserError, match=r"unknown model 'resnt' \(did you mean resnet.*known models: alexnet, resnet"):
        create_model("resnt")


def test_unknown_option_lists_valid_ones():
    with pytest.raises(UserError, match=r"unknown option 'dept'.*did you mean depth.*valid options: depth, patch"):
        create_model("mixer", dept=2)
    with pytest.raises(UserError, match="valid options: none"):
        create_model("resnet", depth=2)


@pytest.mark.parametrize("family,kwargs", [
    ("mixer", {"depth": 3}),
    ("mixer", {"patch": 5}),
    ("vit", {"patch": 7, "image_size": 32, "in_channels": 3}),
    ("vit", {"dim": 130, "heads": 4}),
    ("vit", {"pool": "max"}),
    ("vgg", {"cfg": [64, "X"]}),
    ("cnn", {"channels": [8]}),
    ("mlp", {"hidden": "wide"}),
    ("lstm", {"bidirectional": "maybe"}),
    ("lstm", {"hidden": 1.5}),
    ("resnet", {"num_classes": 0}),
    ("resnet", {"in_channels": 3, "mean": [0.5, 0.5]}),
    ("resnet", {"std": 0.0}),
])
def test_bad_values_are_user_errors(family, kwargs):
    with pytest.raises(UserError):
        create_model(family, **kwargs)


def test_string_options_are_parsed():
    model = create_model("vgg", cfg="16,M,32,M", hidden="64", dropout="0.2")
    assert model.config["cfg"] == [16, "M", 32, "M"] and model.config["hidden"] == 64
    assert create_model("lstm", bidirectional="true").config["bidirectional"] is True


def test_options_change_the_architecture():
    vit = create_model("vit", patch=7, depth=2, pool="mean")
    assert block_names(vit) == ["embed", "blocks.0", "blocks.1", "norm", "head"]
    assert shapes(vit)[0] == (1, 16, 128)  # no class token: 16 patches of 7x7
    lstm = create_model("lstm", hidden=32, layers=2, bidirectional=True)
    assert lstm.get_classifier().in_features == 64 and lstm(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert shapes(create_model("alexnet", relu34=True)) == alexnet_shapes(10)


def test_bidirectional_lstm_uses_both_final_states():
    """Forward direction after the last row, backward direction after the first row."""
    torch.manual_seed(0)
    model = create_model("lstm", hidden=8, layers=2, bidirectional=True).eval()
    x = torch.rand(3, 1, 28, 28)
    features = {}
    model.head.register_forward_hook(lambda module, inputs, output: features.update(h=inputs[0]))
    with torch.no_grad():
        model(x)
        rows = model.normalize(x).reshape(3, 28, 28)
        out, _ = model.lstm(rows)
    assert torch.allclose(features["h"], torch.cat([out[:, -1, :8], out[:, 0, 8:]], dim=1), atol=1e-6)
