"""Models from outside the zoo: ``module.path:factory``, the ``transferlab.models`` entry-point group,
``torchvision:NAME`` and ``timm:NAME``.

Every such model is wrapped in ``ExternalModel``: the zoo's ``Normalize`` first (so, like the zoo, it takes
pixels in [0, 1] and carries its training data's statistics in the checkpoint), then the user's network.
The run records the source string and the options; reloading rebuilds the architecture from them, so a
checkpoint reloads only where the same code is importable. Pretrained weights come only from a local
safetensors file (``weights=PATH``): a run never fetches from a hub.

Trust: a ``module.path:factory`` the caller names (``--model`` on the command line, ``model=`` in the API) is
imported and called, as the caller asked. One named in a file (a study file's ``model`` key, a run.json's model
config, read by ``finetune --from``, ``attack-matrix --sources``, ``load_run`` ...) may come from someone else,
so it is imported only when trusted: ``--trust-code``, ``trust_code=True`` or ``TRANSFERLAB_TRUST_CODE=1`` (or
``=pkg,other.pkg``: those modules only), as Hugging Face's ``trust_remote_code``. Zoo families, torchvision:/timm:
names and installed entry points are code the user installed, and need no opt-in. ``--dry-run`` calls no factory.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from transferlab.errors import UserError
from transferlab.model_registry import Normalize, register_source

ENTRY_POINT_GROUP = "transferlab.models"
LIBRARY_OPTIONS = {"weights": "", "resize": 0}  # torchvision:/timm: options (defaults)


class ExternalModel(nn.Module):
    """Normalize, an optional resize (e.g. rgb32 up to 224 for an ImageNet ViT), then ``net``."""

    head_path = ""

    def __init__(self, net: nn.Module, in_channels: int, resize: int = 0):
        super().__init__()
        self.normalize = Normalize(in_channels)  # registered first: it runs first
        self.net = net
        self.resize = int(resize or 0)
        self.config: dict = {}
        self.family = ""
        linears = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
        self.head_path = f"net.{linears[-1]}" if linears else ""

    def forward(self, x):
        x = self.normalize(x)
        if self.resize and x.shape[-1] != self.resize:
            x = nn.functional.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        return self.net(x)

    def get_classifier(self) -> nn.Linear:
        if not self.head_path:
            raise UserError(f"model {self.family}: no nn.Linear head found, so it cannot take a new label space")
        return self.get_submodule(self.head_path)

    def reset_classifier(self, num_classes: int) -> None:
        old = self.get_classifier()
        new = nn.Linear(old.in_features, int(num_classes), bias=old.bias is not None, device=old.weight.device,
                        dtype=old.weight.dtype)
        parent_path, _, child = self.head_path.rpartition(".")
        setattr(self.get_submodule(parent_path), child, new)
        self.config["num_classes"] = int(num_classes)


TRUST_ENV = "TRANSFERLAB_TRUST_CODE"
_LIBRARIES = ("torchvision", "timm")
_factory_calls = [True]  # False while a dry run checks a study: factories are resolved, never called


def trust_code(modules: str = "1") -> None:
    """Trust code named in files for the rest of this process and the processes it starts (Ray workers):
    ``"1"`` every module, or a comma list of module names (their submodules included)."""
    os.environ[TRUST_ENV] = str(modules)


def is_trusted(module_name: str) -> bool:
    if module_name == "transferlab" or module_name.startswith("transferlab."):
        return True  # its own factories (the API's in-memory models)
    value = os.environ.get(TRUST_ENV, "").strip()
    if value.lower() in ("1", "true", "yes", "all"):
        return True
    allowed = [part.strip() for part in value.split(",") if part.strip()]
    return any(module_name == m or module_name.startswith(m + ".") for m in allowed)


def check_trusted(source: str, named_in: str) -> None:
    """Refuse to import the ``module:factory`` named in a file (``named_in``) unless that module is trusted."""
    module_name, sep, _ = str(source).strip().partition(":")
    if not sep or module_name in _LIBRARIES or is_trusted(module_name):
        return
    raise UserError(f"model {source!r} is code named in {named_in}, imported only when trusted: if you trust "
                    f"whoever wrote it, pass --trust-code (API: trust_code=True; or {TRUST_ENV}={module_name})")


@contextmanager
def factories_called(allowed: bool):
    """While ``allowed`` is False (a dry run), checks resolve factories but never call them."""
    _factory_calls.append(bool(allowed))
    try:
        yield
    finally:
        _factory_calls.pop()


def calls_factories() -> bool:
    return _factory_calls[-1]


def is_library(name: str) -> bool:
    """torchvision:NAME or timm:NAME: built by the library, no user factory."""
    return str(name).strip().partition(":")[0] in _LIBRARIES


def is_external(name: str) -> bool:
    return ":" in str(name) or str(name).strip() in _entry_points()


def _entry_points() -> dict:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def check_resolves(source: str) -> str:
    """A model from outside the zoo resolves: its module imports and has the factory, or its entry point exists
    (a study file's models are checked before anything runs). torchvision:/timm: names are checked by building
    the model (the library says which names it has)."""
    library = source.partition(":")[0]
    if library in ("torchvision", "timm"):
        return source
    if ":" in source:
        check_trusted(source, "the study file")
        _import_factory(source)
    elif source not in _entry_points():
        raise UserError(f"no entry point {source!r} in group {ENTRY_POINT_GROUP}")
    return source


def _import_factory(source: str):
    module_name, _, attr = source.partition(":")
    if not module_name or not attr:
        raise UserError(f"model {source!r}: write module.path:factory")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module itself failing to import
        raise UserError(f"model {source!r}: cannot import {module_name} ({type(exc).__name__}: {exc}); "
                        "install it or put it on PYTHONPATH") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise UserError(f"model {source!r}: {module_name} has no callable {attr}")
    return factory


def _library_options(source: str, options: dict) -> dict:
    unknown = [k for k in options if k not in LIBRARY_OPTIONS]
    if unknown and source.startswith("timm:"):
        # timm's create_model takes architecture overrides (img_size, patch_size, depth, embed_dim ...)
        resolved = _library_options("torchvision:", {k: v for k, v in options.items() if k in LIBRARY_OPTIONS})
        return {**resolved, **{k: _json_value(options[k]) for k in unknown}}
    if unknown:
        raise UserError(f"unknown option {unknown[0]!r} for model {source}; valid options: "
                        f"{', '.join(LIBRARY_OPTIONS)}")
    resolved = dict(LIBRARY_OPTIONS, **options)
    try:
        resolved["resize"] = int(resolved["resize"])
    except (TypeError, ValueError):
        raise UserError(f"model {source}: option resize must be an integer, got {options['resize']!r}") from None
    resolved["weights"] = str(resolved["weights"] or "")
    return resolved


def _json_value(value):
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _load_weights(net: nn.Module, path: str, source: str) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"model {source}: weights file {file} not found (weights come from a local safetensors file)")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"model {source}: weights file {file} is not a readable safetensors file ({exc})") from None
    # Say how it differs in a few words (torch's own message lists every key: one line of kilobytes).
    expected = net.state_dict()
    problems = []
    for label, keys in (("missing", [k for k in expected if k not in state]),
                        ("unexpected", [k for k in state if k not in expected]),
                        ("of another shape", [k for k in state if k in expected
                                              and tuple(state[k].shape) != tuple(expected[k].shape)])):
        if keys:
            problems.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    if problems:
        raise UserError(f"model {source}: weights file {file} does not match the architecture: tensors "
                        f"{'; '.join(problems)}")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])
        raise UserError(f"model {source}: weights file {file} does not match the architecture: {first}") from None


def _adapt_first_conv(net: nn.Module, in_channels: int) -> None:
    """The first Conv2d takes ``in_channels``; pretrained RGB filters are summed for one channel (luma-like)."""
    for name, conv in net.named_modules():
        if isinstance(conv, nn.Conv2d):
            if conv.in_channels == in_channels:
                return
            new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
            with torch.no_grad():
                if in_channels == 1:
                    new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, new)
            return


def _library_net(source: str, options: dict) -> nn.Module:
    library, _, arch = source.partition(":")
    if library == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model(arch, weights=None)
        except ValueError:
            known = ", ".join(sorted(torchvision.models.list_models())[:8])
            raise UserError(f"model {source}: torchvision has no model {arch!r} (e.g. {known}, ...)") from None
    try:
        import timm
    except ImportError:
        raise UserError(f"model {source}: timm is not installed; pip install timm") from None
    try:
        overrides = {k: v for k, v in options.items() if k not in LIBRARY_OPTIONS}
        return timm.create_model(arch, pretrained=False, **overrides)
    except (RuntimeError, TypeError) as exc:  # timm's "Unknown model", or an override it does not take
        raise UserError(f"model {source}: {exc}") from None


def create_external(source: str, num_classes: int, in_channels: int, image_size: int, mean=None, std=None,
                    load_weights: bool = True, named_in: str | None = None, **options) -> nn.Module:
    """Build ``source`` (see the module docstring) for the canvas and check one forward pass's shape.
    ``named_in``: the file that named it (a run.json), whose code must be trusted (``check_trusted``)."""
    source = str(source).strip()
    library = source.partition(":")[0]
    resize = 0
    if named_in is not None:
        check_trusted(source, named_in)
    if library in _LIBRARIES:
        resolved = _library_options(source, options)
        net = _library_net(source, resolved)
        if resolved["weights"] and load_weights:
            _load_weights(net, resolved["weights"], source)  # the library's own shapes, before adapting
        _adapt_first_conv(net, in_channels)
        resize = resolved["resize"]
        record = resolved
    else:
        if ":" in source:
            factory = _import_factory(source)
        else:
            eps = _entry_points()
            if source not in eps:
                raise UserError(f"model {source!r}: no entry point {source!r} in group {ENTRY_POINT_GROUP}")
            try:
                factory = eps[source].load()
            except Exception as exc:
                raise UserError(f"model {source!r}: its entry point cannot be loaded ({type(exc).__name__}: "
                                f"{exc})") from None
        try:
            net = factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **options)
        except UserError:
            raise
        except TypeError as exc:
            raise UserError(f"model {source!r}: the factory rejected its arguments ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - the user's code failed: one line naming it, not a traceback
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise UserError(f"model {source!r}: the factory failed ({type(exc).__name__}: {first})") from None
        if not isinstance(net, nn.Module):
            raise UserError(f"model {source!r}: the factory returned {type(net).__name__}, not a torch nn.Module")
        record = dict(options)
    model = ExternalModel(net, in_channels, resize)
    model.family = source
    if library in ("torchvision", "timm"):
        head = model.get_classifier()
        if head.out_features != num_classes:
            model.reset_classifier(num_classes)
    model.normalize.set_stats(mean, std)
    _check_output(model, source, num_classes, in_channels, image_size)
    model.config = {"family": source, "num_classes": num_classes, "in_channels": in_channels,
                    "image_size": image_size, **record}
    return model


def _check_output(model: nn.Module, source: str, num_classes: int, in_channels: int, image_size: int) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, in_channels, image_size, image_size))
    except Exception as exc:
        raise UserError(f"model {source}: a forward pass on [2, {in_channels}, {image_size}, {image_size}] fails "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                        "a fixed-size model needs -o resize=SIZE") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"model {source}: output is {shape} for 2 images, expected (2, {num_classes})")


register_source(is_external, create_external)  # models.create_model finds these names through the registry
