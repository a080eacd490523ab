"""The model zoo: every network transferlab trains, behind one registry.

Read top to bottom:
  1. the shared base class (the registry, ``ModelFamily`` and ``register``, is ``model_registry``),
  2. the families: alexnet, resnet and mixer exactly as in the reference experiment
     (docs: shared/reference/experiment.md), then mlp, cnn, vgg, vit and lstm,
  3. ``create_model`` / ``model_from_config``, which validate names and options,
  4. the tools the steps use on any model: parameter tables, freezing the first N
     parameter tensors, and BatchNorm handling while fine-tuning.

Every model takes pixels in [0, 1], shaped [N, C, H, W], and normalises them itself in
a first ``normalize`` module (buffers only, no parameters). Attacks can then work in
pixel space, and the parameter tables stay exactly those of the original networks.
"""

from __future__ import annotations

import contextlib
import copy
import json
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from transferlab import model_sources  # noqa: F401 - its import registers the outside sources (timm's pattern)
from transferlab.errors import UserError, suggest
from transferlab.model_registry import (MODEL_FAMILIES, ModelFamily, Normalize, external_source,  # noqa: F401
                                        list_models, register)  # ModelFamily, list_models: importable from here
from transferlab.model_registry import FAMILY_CLASSES as _CLASSES

# ----------------------------------------------------------------------------- checks


def _check(ok: bool, family: str, message: str) -> None:
    if not ok:
        raise UserError(f"model {family}: {message}")


class ZooModel(nn.Module):
    """What every family shares: the ``normalize`` first module and the classifier handle.

    ``head_path`` names the final nn.Linear (a dotted module path), so one
    get_classifier/reset_classifier serves every family.
    """

    family = ""  # set by @register
    head_path = "head"

    def __init__(self, in_channels: int):
        super().__init__()
        self.normalize = Normalize(in_channels)  # registered first: it runs first
        self.config: dict = {}  # filled by create_model

    def get_classifier(self) -> nn.Linear:
        return self.get_submodule(self.head_path)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh final Linear with ``num_classes`` outputs (same device and dtype); the
        rest of the network is untouched. Used when fine-tuning to a new label space."""
        n = _as_int(num_classes)
        if n is None or n < 1:
            raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
        old = self.get_classifier()
        new = nn.Linear(old.in_features, n, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
        parent_path, _, child = self.head_path.rpartition(".")
        setattr(self.get_submodule(parent_path) if parent_path else self, child, new)
        self.config["num_classes"] = n


def _patchify(x, patch: int):
    """[N, C, H, W] -> [N, patches, patch*patch*C], patches in row-major order."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 3, 5, 1)  # N, rows, cols, p1, p2, C
    return x.reshape(n, (h // patch) * (w // patch), patch * patch * c)


# ----------------------------------------------------------------------------- alexnet


@register(
    "alexnet",
    "AlexNet-style CNN of the reference experiment: convs 32-64-128-256-256, FC 1024-512",
    defaults={"relu34": False},
    block_help="conv1, conv2, conv3, conv4, conv5, fc6, fc7, fc8",
)
class AlexNet(ZooModel):
    head_path = "fc8"

    def __init__(self, num_classes, in_channels, image_size, *, relu34):
        super().__init__(in_channels)
        # three 2x2 max-pools, each rounding down: 28 -> 14 -> 7 -> 3 (2304 features), 32 -> 4
        side = image_size // 8
        _check(side >= 1, "alexnet", f"image_size must be at least 8, got {image_size}")
        self.relu34 = relu34  # the original had no ReLU after conv3 and conv4; this adds them
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.conv4 = nn.Conv2d(128, 256, 3, padding=1)
        self.conv5 = nn.Conv2d(256, 256, 3, padding=1)
        self.fc6 = nn.Linear(256 * side * side, 1024)
        self.fc7 = nn.Linear(1024, 512)
        self.fc8 = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.normalize(x)
        x = F.relu(F.max_pool2d(self.conv1(x), 2))  # pool before ReLU, as in the original
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = self.conv3(x)
        if self.relu34:
            x = F.relu(x)
        x = self.conv4(x)
        if self.relu34:
            x = F.relu(x)
        x = F.relu(F.max_pool2d(self.conv5(x), 2))
        x = x.flatten(1)
        x = F.relu(self.fc6(x))
        x = F.relu(self.fc7(x))
        return self.fc8(x)


# ----------------------------------------------------------------------------- resnet


class ResNetStem(nn.Module):
    def __init__(self, in_channels, width):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)  # with bias, as in the original
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x):
        return F.max_pool2d(F.relu(self.bn(self.conv(x))), 3, stride=1, padding=1)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            # the original's shortcut is a 3x3 conv with bias (not the usual 1x1), then BN
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


@register(
    "resnet",
    "small ResNet of the reference experiment: stem 16, basic blocks 16-32-64, global average pool",
    defaults={},
    block_help="stem, block1, block2, block3, head",
)
class ResNet(ZooModel):
    def __init__(self, num_classes, in_channels, image_size):
        super().__init__(in_channels)
        _check(image_size >= 4, "resnet", f"image_size must be at least 4, got {image_size}")
        self.stem = ResNetStem(in_channels, 16)
        self.block1 = BasicBlock(16, 16, 1)
        self.block2 = BasicBlock(16, 32, 2)
        self.block3 = BasicBlock(32, 64, 2)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.stem(self.normalize(x))
        x = self.block3(self.block2(self.block1(x)))
        return self.head(x.mean(dim=(2, 3)))  # global average pool (7x7 at 28, 8x8 at 32)


# ----------------------------------------------------------------------------- mixer


class PreNormResidual(nn.Module):
    """x + fn(norm(x)). ``fn`` is registered before ``norm`` on purpose: the reference
    parameter table lists the mixing layer's tensors before its LayerNorm's."""

    def __init__(self, dim, fn):
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return x + self.fn(self.norm(x))


class MixerLayer(nn.Module):
    def __init__(self, patches, dim, channel_hidden):
        super().__init__()
        # token mixing: a 1x1 Conv1d over the patch axis ([N, patches, dim] has patches as
        # its "channels"), i.e. the same patches -> 4*patches -> patches MLP for every feature
        self.token_mix = PreNormResidual(
            dim, nn.Sequential(nn.Conv1d(patches, 4 * patches, 1), nn.GELU(), nn.Conv1d(4 * patches, patches, 1))
        )
        self.channel_mix = PreNormResidual(
            dim, nn.Sequential(nn.Linear(dim, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, dim))
        )

    def forward(self, x):
        return self.channel_mix(self.token_mix(x))


@register(
    "mixer",
    "MLP-Mixer of the reference experiment: patch 4, dim 128, depth 1 or 2",
    defaults={"depth": 1, "patch": 4, "dim": 128, "channel_hidden": 64},
    block_help="embed, layers.0 (.. layers.1 at depth 2), norm, head",
)
class Mixer(ZooModel):
    def __init__(self, num_classes, in_channels, image_size, *, depth, patch, dim, channel_hidden):
        super().__init__(in_channels)
        # the reference experiment ran depth 1 and 2 only; other depths have no table to match
        _check(depth in (1, 2), "mixer", f"depth must be 1 or 2, got {depth}")
        _check(patch >= 1 and image_size % patch == 0, "mixer",
               f"patch {patch} must divide image_size {image_size}")
        _check(dim >= 1 and channel_hidden >= 1, "mixer", "dim and channel_hidden must be positive")
        self.patch = patch
        patches = (image_size // patch) ** 2  # 49 at 28, 64 at 32
        self.embed = nn.Linear(patch * patch * in_channels, dim)
        self.layers = nn.Sequential(*[MixerLayer(patches, dim, channel_hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(_patchify(self.normalize(x), self.patch))
        x = self.norm(self.layers(x))
        return self.head(x.mean(dim=1))


# ----------------------------------------------------------------------------- mlp


@register(
    "mlp",
    "fully connected net on the flattened image (ReLU + dropout between layers)",
    defaults={"hidden": [512, 256], "dropout": 0.1},
    block_help="layers.0, layers.1 (one per hidden layer), head",
)
class MLP(ZooModel):
    def __init__(self, num_classes, in_channels, image_size, *, hidden, dropout):
        super().__init__(in_channels)
        _check(all(_as_int(h) is not None and h >= 1 for h in hidden), "mlp",
               f"hidden must be a list of positive integers, got {hidden}")
        _check(0 <= dropout < 1, "mlp", f"dropout must be in [0, 1), got {dropout}")
        widths = [in_channels * image_size * image_size, *hidden]
        # one Sequential per hidden layer, so "layers.1" names a whole layer for freezing
        self.layers = nn.Sequential(
            *[nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)) for a, b in zip(widths, widths[1:])]
        )
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        return self.head(self.layers(self.normalize(x).flatten(1)))


# ----------------------------------------------------------------------------- cnn


@register(
    "cnn",
    "LeNet-style CNN: two 5x5 conv + ReLU + 2x2 max-pool stages, then two FC layers",
    defaults={"channels": [32, 64], "hidden": 128},
    block_help="conv1, conv2, fc1, fc2",
)
class CNN(ZooModel):
    head_path = "fc2"

    def __init__(self, num_classes, in_channels, image_size, *, channels, hidden):
        super().__init__(in_channels)
        _check(len(channels) == 2 and all(_as_int(c) is not None and c >= 1 for c in channels), "cnn",
               f"channels must be two positive integers, got {channels}")
        _check(hidden >= 1, "cnn", f"hidden must be positive, got {hidden}")
        # conv1 is padded (size kept), conv2 is not: 28 -> 14 -> 10 -> 5, 32 -> 16 -> 12 -> 6
        side = (image_size // 2 - 4) // 2
        _check(side >= 1, "cnn", f"image_size must be at least 12, got {image_size}")
        self.conv1 = nn.Conv2d(in_channels, channels[0], 5, padding=2)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 5)
        self.fc1 = nn.Linear(channels[1] * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(self.normalize(x))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


# ----------------------------------------------------------------------------- vgg


@register(
    "vgg",
    "VGG-style CNN: 3x3 conv + BN + ReLU units ('M' = 2x2 max-pool), then a 2-layer classifier",
    defaults={"cfg": [64, 64, "M", 128, 128, "M", 256, 256, "M"], "hidden": 256, "dropout": 0.5},
    block_help="features.0, features.1, features.3, features.4, features.6, features.7, classifier.0, classifier.3",
)
class VGG(ZooModel):
    head_path = "classifier.3"

    def __init__(self, num_classes, in_channels, image_size, *, cfg, hidden, dropout):
        super().__init__(in_channels)
        _check(all(v == "M" or (_as_int(v) is not None and v >= 1) for v in cfg) and any(v != "M" for v in cfg),
               "vgg", f"cfg must list positive channel counts and 'M' (max-pool), got {cfg}")
        _check(hidden >= 1, "vgg", f"hidden must be positive, got {hidden}")
        _check(0 <= dropout < 1, "vgg", f"dropout must be in [0, 1), got {dropout}")
        side = image_size // 2 ** cfg.count("M")  # each pool rounds down: 28 -> 14 -> 7 -> 3
        _check(side >= 1, "vgg", f"{cfg.count('M')} max-pools leave nothing of a {image_size}px image")
        units, channels = [], in_channels
        for v in cfg:
            if v == "M":
                units.append(nn.MaxPool2d(2))
            else:
                # one Sequential per conv unit: "features.6" then names conv + BN together;
                # no conv bias, the BN right after it has its own shift
                units.append(nn.Sequential(nn.Conv2d(channels, v, 3, padding=1, bias=False), nn.BatchNorm2d(v),
                                           nn.ReLU(inplace=True)))
                channels = v
        self.features = nn.Sequential(*units)
        self.classifier = nn.Sequential(
            nn.Linear(channels * side * side, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(self.normalize(x)).flatten(1))


# ----------------------------------------------------------------------------- vit


class PatchEmbed(nn.Module):
    """Patches -> tokens, plus the class token and learned position embeddings. They live
    here rather than on the model so they are the first tensors of block "embed"."""

    def __init__(self, in_channels, image_size, patch, dim, cls_token):
        super().__init__()
        tokens = (image_size // patch) ** 2 + (1 if cls_token else 0)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if cls_token:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2)  # [N, patches, dim]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed


class Attention(nn.Module):
    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # the fused kernel (flash / memory-efficient on CUDA) and no causal mask: an encoder
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class TransformerBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, dropout):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))  # pre-norm: the residual path stays an identity
        return x + self.mlp(self.norm2(x))


@register(
    "vit",
    "small Vision Transformer from scratch: patch embedding, pre-norm encoder blocks, cls or mean pooling",
    defaults={"patch": 4, "dim": 128, "depth": 4, "heads": 4, "mlp_ratio": 2.0, "pool": "cls", "dropout": 0.0},
    block_help="embed, blocks.0 .. blocks.3 (one per depth), norm, head",
)
class ViT(ZooModel):
    def __init__(self, num_classes, in_channels, image_size, *, patch, dim, depth, heads, mlp_ratio, pool, dropout):
        super().__init__(in_channels)
        _check(patch >= 1 and image_size % patch == 0, "vit", f"patch {patch} must divide image_size {image_size}")
        _check(depth >= 1, "vit", f"depth must be positive, got {depth}")
        _check(heads >= 1 and dim >= 1 and dim % heads == 0, "vit", f"dim {dim} must be a multiple of heads {heads}")
        _check(int(dim * mlp_ratio) >= 1, "vit", f"mlp_ratio must be positive, got {mlp_ratio}")
        _check(pool in ("cls", "mean"), "vit", f"pool must be 'cls' or 'mean', got {pool!r}")
        _check(0 <= dropout < 1, "vit", f"dropout must be in [0, 1), got {dropout}")
        self.pool = pool
        self.embed = PatchEmbed(in_channels, image_size, patch, dim, cls_token=pool == "cls")
        self.blocks = nn.ModuleList([TransformerBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        # small-normal init of the Linear layers, as usual for ViTs trained from scratch
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.embed(self.normalize(x))
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.head(x[:, 0] if self.pool == "cls" else x.mean(dim=1))


# ----------------------------------------------------------------------------- lstm


@contextlib.contextmanager
def _cudnn_disabled():
    previous = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = previous


@register(
    "lstm",
    "LSTM reading the image row by row (one step per row), classifying its final hidden state",
    defaults={"hidden": 128, "layers": 1, "bidirectional": False},
    block_help="lstm, head",
)
class LSTMNet(ZooModel):
    def __init__(self, num_classes, in_channels, image_size, *, hidden, layers, bidirectional):
        super().__init__(in_channels)
        _check(hidden >= 1 and layers >= 1, "lstm", "hidden and layers must be positive")
        self.lstm = nn.LSTM(in_channels * image_size, hidden, num_layers=layers, batch_first=True,
                            bidirectional=bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)

    def forward(self, x):
        x = self.normalize(x)
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 1, 3).reshape(n, h, c * w)  # step t sees row t of every channel
        # cuDNN's LSTM can only backpropagate in training mode, yet attacks need input
        # gradients of a model in eval mode: use the native kernel for exactly that case.
        needs_native = rows.is_cuda and not self.training and torch.is_grad_enabled()
        # oneDNN has no bf16 LSTM on CPUs without bf16 units ("could not create a primitive descriptor for
        # the LSTM forward propagation primitive"): under CPU autocast the recurrence runs in fp32.
        cpu_autocast = rows.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        fp32 = torch.autocast("cpu", enabled=False) if cpu_autocast else contextlib.nullcontext()
        with _cudnn_disabled() if needs_native else contextlib.nullcontext(), fp32:
            _, (h_n, _) = self.lstm(rows.float() if cpu_autocast else rows)
        # h_n: [layers * directions, N, hidden]; the last layer's final states (for a
        # bidirectional LSTM, forward after the last row and backward after the first)
        directions = 2 if self.lstm.bidirectional else 1
        last = h_n[-directions:].transpose(0, 1).reshape(n, -1)
        return self.head(last)


# ----------------------------------------------------------------------------- building


def _as_int(value):
    """int(value) for real integers (numpy ones too), None for anything else (bools too)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _coerce(family: str, key: str, value, default):
    """Bring an option value to its default's type; strings (from a command line) are parsed."""
    bad = UserError(f"model {family}: option {key} must be {type(default).__name__} like {json.dumps(default)}, "
                    f"got {value!r}")
    if isinstance(value, str) and not isinstance(default, str):
        text = value.strip()
        if isinstance(default, bool):
            value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                if not isinstance(default, list):
                    raise bad from None
                # "64,64,M,128" -> [64, 64, "M", 128]
                value = [int(v) if v.strip().lstrip("-").isdigit() else v.strip() for v in text.split(",") if v.strip()]
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if _as_int(value) in (0, 1):
            return bool(value)
        raise bad
    if isinstance(default, int):
        if _as_int(value) is None:
            raise bad
        return _as_int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if isinstance(default, list):
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_as_int(v) if _as_int(v) is not None else v for v in value]  # JSON-able ints
    if not isinstance(value, type(default)):
        raise bad
    return value


MAX_CLASSES = 100_000


def create_model(name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                 mean=None, std=None, **options) -> nn.Module:
    """Build a model of family ``name`` for a [in_channels, image_size, image_size] canvas.

    ``mean``/``std``: per-channel statistics of the training data on the [0, 1] scale
    (default 0.5 for every channel). ``options``: the family's options, see
    ``MODEL_FAMILIES[name].defaults``; everything is checked and a mistake is a UserError.
    """
    key = str(name).strip().lower()
    if key not in _CLASSES:
        source = external_source(name)  # module:factory, torchvision:/timm:NAME or an entry point
        if source is not None:
            return source.build(name, num_classes, in_channels, image_size, mean=mean, std=std, **options)
        raise UserError(f"unknown model {name!r}{suggest(key, MODEL_FAMILIES)}; known models: "
                        f"{', '.join(MODEL_FAMILIES)}")
    family = MODEL_FAMILIES[key]
    sizes = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    for arg, value in sizes.items():
        if _as_int(value) is None or value < 1:
            raise UserError(f"{arg} must be a positive integer, got {value!r}")
        sizes[arg] = _as_int(value)
    # Past these a Linear layer alone would need gigabytes: a typo, not a model.
    for arg, limit in (("num_classes", MAX_CLASSES), ("in_channels", 64), ("image_size", 1024)):
        if sizes[arg] > limit:
            raise UserError(f"{arg} must be at most {limit:,}, got {sizes[arg]:,}")
    unknown = [k for k in options if k not in family.defaults]
    if unknown:
        valid = ", ".join(family.defaults) or "none"
        raise UserError(f"unknown option {unknown[0]!r} for model {key}{suggest(unknown[0], family.defaults)}; "
                        f"valid options: {valid}")
    resolved = copy.deepcopy(family.defaults)
    for k, v in options.items():
        resolved[k] = _coerce(key, k, v, family.defaults[k])

    model = _CLASSES[key](sizes["num_classes"], sizes["in_channels"], sizes["image_size"], **resolved)
    model.normalize.set_stats(mean, std)
    # everything needed to rebuild the architecture, JSON-able (mean/std travel as buffers)
    model.config = {"family": key, **sizes, **resolved}
    return model


def model_from_config(config: dict, mean=None, std=None, named_in: str | None = None) -> nn.Module:
    """Rebuild a model from ``model.config`` (weights not included: load its state dict). ``named_in``: the file
    the config was read from; code it names is imported only when trusted (model_sources.check_trusted)."""
    config = dict(config)
    family = config.pop("family", None)
    name = config.pop("name", None)
    if family is None and name is None:
        raise UserError(f"model config has no 'family': {config}")
    # statistics normally come back with the state dict; a config that carries them works too
    stored_mean, stored_std = config.pop("mean", None), config.pop("std", None)
    mean = stored_mean if mean is None else mean
    std = stored_std if std is None else std
    source = None if str(family or name).strip().lower() in _CLASSES else external_source(family or name)
    if source is not None:
        # the checkpoint holds the weights: don't re-read a pretrained weights file that may be gone
        return source.build(family or name, mean=mean, std=std, load_weights=False, named_in=named_in, **config)
    return create_model(family or name, mean=mean, std=std, **config)


# ----------------------------------------------------------------------------- parameters and freezing


def parameter_table(model: nn.Module) -> list[dict]:
    """One row per parameter tensor, in named_parameters() order: the order freeze() counts in."""
    return [
        {"index": i, "name": name, "shape": tuple(p.shape), "count": p.numel(), "trainable": p.requires_grad}
        for i, (name, p) in enumerate(model.named_parameters())
    ]


def freeze(model: nn.Module, n: int) -> None:
    """Freeze the first ``n`` parameter tensors (requires_grad False) and unfreeze the rest,
    the reference experiment's "freeze N". Use set_train_mode to keep frozen BN stats still."""
    params = list(model.parameters())
    count = _as_int(n)
    if count is None or not 0 <= count <= len(params):
        family = getattr(model, "family", type(model).__name__)
        raise UserError(f"--freeze {n} is out of range: {family} has {len(params)} parameter tensors "
                        f"(use 0..{len(params)})")
    for i, p in enumerate(params):
        p.requires_grad_(i >= count)


def block_names(model: nn.Module) -> list[str]:
    """Blocks freeze_count_for knows, in order: top-level modules with parameters, and the
    parameterised children of top-level Sequential/ModuleList containers."""
    def has_params(module):
        return next(module.parameters(), None) is not None

    names = []
    for name, child in model.named_children():
        if not has_params(child):
            continue
        if isinstance(child, (nn.Sequential, nn.ModuleList)) or (name == "net" and hasattr(model, "resize")):
            names += [f"{name}.{sub}" for sub, grandchild in child.named_children() if has_params(grandchild)]
        else:
            names.append(name)
    return names


def freeze_count_for(model: nn.Module, block: str) -> int:
    """The n for which freeze(model, n) freezes everything up to and including ``block``
    (any module path: "block2", "conv4", "blocks.2", "features.6", "block3.conv1")."""
    block = str(block).strip().rstrip(".")
    names = [name for name, _ in model.named_parameters()]
    hits = [i for i, name in enumerate(names) if name == block or name.startswith(block + ".")]
    if not block or not hits:
        known = block_names(model)
        family = getattr(model, "family", type(model).__name__)
        raise UserError(f"{family} has no block {block!r}{suggest(block, known)}; blocks: {', '.join(known)}")
    return hits[-1] + 1


def set_train_mode(model: nn.Module, bn_stats: str = "frozen") -> None:
    """model.train(), and with bn_stats="frozen" every BatchNorm whose parameters are all
    frozen goes back to eval(), so its running statistics stay those of pretraining.
    "update" lets them drift with the new data, as the original experiment did."""
    if bn_stats not in ("frozen", "update"):
        raise UserError(f"bn_stats must be 'frozen' or 'update', got {bn_stats!r}")
    model.train()
    if bn_stats == "update":
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
